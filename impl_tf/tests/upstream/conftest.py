"""Expectations of the upstream Keras suite: data in expectations.json, strict xfails.

Each entry names a test (its unittest method name; a trailing "*" matches absl's
parameterized variants), the Keras backends it applies to, and a reason. An expected
failure that passes fails the run (strict), so the list cannot go stale.
"""

import fnmatch
import json
from pathlib import Path

import keras
import pytest

EXPECTATIONS = json.loads(Path(__file__).with_name("expectations.json").read_text())["expected_failures"]


def pytest_configure(config):
    # the upstream module marks tests that need a backend with autodiff; every backend here has one
    config.addinivalue_line("markers", "requires_trainable_backend: Keras' marker (a backend with autodiff)")


def pytest_collection_modifyitems(config, items):
    backend = keras.config.backend()
    for item in items:
        if "upstream" not in item.nodeid:
            continue
        for entry in EXPECTATIONS:
            if backend in entry["backends"] and fnmatch.fnmatchcase(item.name, entry["test"]):
                item.add_marker(pytest.mark.xfail(reason=entry["reason"], strict=True))
