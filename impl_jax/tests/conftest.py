"""Shared fixtures for the maskbn_jax unit tests (helpers live in jaxbn_helpers.py)."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
