"""Shared fixtures for the maskbn_jax unit tests (helpers live in jaxbn_helpers.py)."""

import contextlib

import numpy as np
import pytest

# `pytest impl_jax/tests spec --backend jax` runs the spec's sharded cases in this process too, and
# they need a CPU device per shard, which JAX only creates before its runtime starts: ask now,
# before any test module is imported (the jax backend itself is loaded only after collection).
with contextlib.suppress(ImportError):
    from maskbn_jax.conformance_adapter import request_shard_devices

    request_shard_devices()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
