"""Outputs, moving statistics and gradients through the running Keras backend's own autodiff.

The layer is written in keras.ops, so it runs on every Keras backend; tox runs this module
under each (tf, keras-jax, keras-torch), in-process.
"""

import keras
import numpy as np
import pytest

from maskbn_tf import MaskedBatchNormalization
from maskbn_tf.autodiff import training_vjp


def _reference(x, mask, dy, eps=1e-3):
    real, g = x.astype(np.float64)[mask], dy.astype(np.float64)[mask]
    mean, var = real.mean(0), real.var(0)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (real - mean) * r
    s1, s2 = g.sum(0), (g * xhat).sum(0)
    dx = np.zeros(x.shape)
    dx[mask] = r * (g - (s1 + xhat * s2) / len(real))
    return {"y": xhat, "moving_mean": mean, "moving_var": var, "dx": dx, "dgamma": s2, "dbeta": s1}


def _step(x, mask, dy):
    layer = MaskedBatchNormalization(momentum=0.0)
    layer.build(x.shape)
    y, dx, (dgamma, dbeta) = training_vjp(layer, x, dy, mask=mask)
    values = dict(y=y, moving_mean=layer.moving_mean, moving_var=layer.moving_variance, dx=dx)
    values.update(dgamma=dgamma, dbeta=dbeta)
    return {k: keras.ops.convert_to_numpy(v) for k, v in values.items()}


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    mask = np.arange(10)[None, :] < np.array([10, 6, 3, 1])[:, None]
    x = rng.normal(4.0, 2.0, size=(4, 10, 3)).astype(np.float32)
    dy = np.where(mask[..., None], rng.normal(size=x.shape), 0.0).astype(np.float32)
    out = {"x": x, "mask": mask, "dy": dy}
    for fill in ("zero", "nan"):
        padded = np.where(mask[..., None], x, 0.0 if fill == "zero" else np.nan).astype(np.float32)
        out.update({f"{fill}-{k}": v for k, v in _step(padded, mask, dy).items()})
    return out


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


def test_synchronized_needs_tensorflow_elsewhere():
    if keras.config.backend() == "tensorflow":
        assert MaskedBatchNormalization(synchronized=True).synchronized
    else:
        with pytest.raises(ValueError, match="TensorFlow backend"):
            MaskedBatchNormalization(synchronized=True)
