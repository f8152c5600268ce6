"""The layer is written in keras.ops, so it also runs on Keras' JAX and torch backends.

Each backend runs in its own process (Keras picks a backend once per process), and only
where that framework is installed: the tf env has neither, so there these are skips.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_keras_backend_worker.py")


def _reference(x, mask, dy, eps=1e-3):
    real, g = x.astype(np.float64)[mask], dy.astype(np.float64)[mask]
    mean, var = real.mean(0), real.var(0)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (real - mean) * r
    s1, s2 = g.sum(0), (g * xhat).sum(0)
    dx = np.zeros(x.shape)
    dx[mask] = r * (g - (s1 + xhat * s2) / len(real))
    return {"y": xhat, "moving_mean": mean, "moving_var": var, "dx": dx, "dgamma": s2, "dbeta": s1}


@pytest.fixture(scope="module", params=["jax", "torch"])
def results(request, tmp_path_factory):
    backend = request.param
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed in this environment")
    out = tmp_path_factory.mktemp(backend) / "results.npz"
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(out) as data:
        return dict(data)


@pytest.mark.parametrize("quantity", ["y", "moving_mean", "moving_var", "dx", "dgamma", "dbeta"])
def test_matches_reference_and_isolates_nan_padding(results, quantity):
    mask = results["mask"]
    want = _reference(results["x"], mask, results["dy"])[quantity]
    got = results[f"zero-{quantity}"]
    if quantity == "y":
        got = got[mask]
    if quantity == "dx":
        np.testing.assert_array_equal(got[~mask], 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * np.abs(want).max())
    # NaN in padded rows changes no real output, statistic or gradient bit
    clean, dirty = results[f"zero-{quantity}"], results[f"nan-{quantity}"]
    if quantity == "y":
        clean, dirty = clean[mask], dirty[mask]
    np.testing.assert_array_equal(dirty, clean)
