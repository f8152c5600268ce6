"""Shared fixtures for the maskbn_tf unit tests, on whichever Keras backend KERAS_BACKEND names
(tox: tf, keras-jax, keras-torch); modules that need TensorFlow itself skip elsewhere."""

import os

# Before Keras is imported anywhere: TensorFlow unless the env says otherwise.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

# `pytest impl_tf/tests spec --backend tf` (tox -e tf) runs the spec in this process: split
# the CPU for its sharded cases now, before any test starts TensorFlow's runtime.
if keras.config.backend() == "tensorflow":
    try:
        from maskbn_tf.conformance_adapter import configure_shard_devices
    except ImportError:  # maskbn-conformance not installed: only the unit tests run
        pass
    else:
        configure_shard_devices()


def pytest_collection_modifyitems(config, items):
    """A module that sets NEEDS_TENSORFLOW_BACKEND (tf.function, XLA, tf.distribute) skips,
    visibly, unless Keras runs on TensorFlow."""
    if keras.config.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"needs Keras' TensorFlow backend; Keras runs on {keras.config.backend()}")
    for item in items:
        # spec checks (`--backend tf` in the same run) are items of a YAML file, not of a module
        if getattr(getattr(item, "module", None), "NEEDS_TENSORFLOW_BACKEND", False):
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def padded_batch(rng):
    """(x, mask): 4 sequences of up to 10 steps, 3 channels, real rows ~ N(4, 2), padding 0."""
    lengths = np.array([10, 6, 3, 1])
    mask = np.arange(10)[None, :] < lengths[:, None]
    x = np.where(mask[..., None], rng.normal(4.0, 2.0, size=(4, 10, 3)), 0.0).astype(np.float32)
    return x, mask


@pytest.fixture
def restore_dtype_policy():
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


@pytest.fixture
def masked_moments():
    """f(x, mask) -> float64 mean and population variance over the real rows (channels last)."""

    def moments(x, mask):
        real = np.asarray(x, np.float64)[np.asarray(mask, bool)]
        return real.mean(axis=0), real.var(axis=0)

    return moments
