"""Expected differences from torch's own batch-norm tests: data next to the tests, strict.

``expected_differences.yaml`` lists the upstream checks maskbn does not pass on purpose,
each with the reason. Every listed check is a strict xfail (one that passes fails the
run), and an entry that matches no collected test of its function is an error, so the
list cannot go stale.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import yaml

EXPECTATIONS = Path(__file__).with_name("expected_differences.yaml")


def _load() -> list[dict[str, str]]:
    entries = yaml.safe_load(EXPECTATIONS.read_text()) or []
    for entry in entries:
        missing = {"test", "id", "reason"} - set(entry)
        if missing:
            raise pytest.UsageError(f"{EXPECTATIONS.name}: entry {entry} lacks {sorted(missing)}")
    return entries


def _function(item: pytest.Item) -> str:
    return f"{item.path.name}::{getattr(item, 'originalname', item.name)}"


def _case_id(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else ""


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so the stale check sees every case
def pytest_collection_modifyitems(config, items):
    here = [item for item in items if item.path.parent == EXPECTATIONS.parent]
    functions = {_function(item) for item in here}
    for entry in _load():
        if entry["test"] not in functions:
            continue  # its file or function is not part of this run
        matched = [
            item
            for item in here
            if _function(item) == entry["test"] and fnmatch.fnmatchcase(_case_id(item), entry["id"])
        ]
        if not matched:
            raise pytest.UsageError(
                f"{EXPECTATIONS.name}: no test matches {entry['test']}[{entry['id']}]; remove or fix the entry"
            )
        for item in matched:
            item.add_marker(pytest.mark.xfail(strict=True, reason=" ".join(entry["reason"].split())))
