"""Accuracy does not depend on the batch size, the magnitude or the form (contract 1a, issue 12).

One training call (momentum 0) on real rows ~ N(offset, std), half the positions padded
with garbage, against float64 NumPy on the same (rounded) values: the batch mean within
one float32 ulp of the exact mean, the variance within 1e-5 relative, outputs and the
backward's reductions accordingly. Every form the running Keras backend offers.
"""

import keras
import numpy as np
import pytest

from maskbn_tf import MaskedBatchNormalization
from maskbn_tf.autodiff import training_vjp

CHANNELS = 3


def _forms():
    if keras.config.backend() != "tensorflow":
        return {"eager": lambda f: f}
    import tensorflow as tf

    return {
        "eager": lambda f: f,
        "tf.function": tf.function,
        "xla": lambda f: tf.function(f, jit_compile=True),
    }


FORMS = _forms()
CASES = (
    [
        pytest.param(rows, offset, std, "float32", id=f"{rows}-rows-offset-{offset:g}-std-{std:g}-float32")
        for rows in (1000, 262144)
        for offset in (1e4, 1e6)
        for std in (1.0, 1e-2)
    ]
    + [
        # issue 12's worst measured case: 48 sigma off before
        pytest.param(32768, 1e6, 1.0, "float32", id="32768-rows-offset-1e+06-std-1-float32"),
    ]
    + [
        pytest.param(65536, 1e3, 1.0, dtype, id=f"65536-rows-offset-1e3-std-1-{dtype}")
        for dtype in ("bfloat16", "float16")
    ]
)


def _batch(rows, offset, std, dtype, axis, seed=0):
    """x (2, 2*rows/2 ... ) with exactly `rows` real positions, unevenly split over the two items."""
    rng = np.random.default_rng(seed)
    length = rows  # each item has `rows` positions; together 2*rows, half of them real
    mask = np.zeros((2, length), bool)
    first = rows * 3 // 4  # uneven: 3/4 of the real rows in item 0, 1/4 in item 1
    mask[0, rng.permutation(length)[:first]] = True
    mask[1, rng.permutation(length)[: rows - first]] = True
    x = rng.normal(offset, std, size=(2, length, CHANNELS))
    x = np.where(mask[..., None], x, 1e30)  # garbage in the padding
    x = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.convert_to_tensor(x.astype(np.float32)), dtype))
    dy = rng.normal(size=x.shape).astype(np.float32)
    if axis == 1:
        x, dy = np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1)
    return x, mask, dy


def _reference(x, mask, dy, axis, eps):
    last = lambda a: np.moveaxis(np.asarray(a, np.float64), 1, -1) if axis == 1 else np.asarray(a, np.float64)  # noqa: E731
    real, g = last(x)[mask], last(dy)[mask]
    mean, var = real.mean(0), real.var(0)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (real - mean) * r
    s1, s2 = g.sum(0), (g * xhat).sum(0)
    dx = r * (g - (s1 + xhat * s2) / len(real))
    return mean, var, xhat, dx, s2, s1


@pytest.mark.parametrize("axis", [-1, 1], ids=["channels-last", "channels-first"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("rows,offset,std,dtype", CASES)
def test_moments_outputs_and_gradients_at_scale(rows, offset, std, dtype, form, axis):
    x, mask, dy = _batch(rows, offset, std, dtype, axis)
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[dtype]
    layer = MaskedBatchNormalization(axis=axis, momentum=0.0, epsilon=1e-12, dtype=policy)
    layer.build(x.shape)
    step = FORMS[form](lambda x, dy, m: training_vjp(layer, x, dy, mask=m))
    x_t = keras.ops.cast(keras.ops.convert_to_tensor(x), dtype)
    y, dx, (dgamma, dbeta) = step(x_t, keras.ops.convert_to_tensor(dy), keras.ops.convert_to_tensor(mask))
    mean, var, y_ref, dx_ref, dgamma_ref, dbeta_ref = _reference(x, mask, dy, axis, 1e-12)

    ulp = np.spacing(np.abs(mean).astype(np.float32)).astype(np.float64)
    mean_error = np.abs(keras.ops.convert_to_numpy(layer.moving_mean) - mean)
    assert (mean_error <= ulp).all(), f"mean off by {mean_error / ulp} float32 ulps"
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-5, atol=1e-30)

    def real(a):
        a = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(a, "float32")), np.float64)
        return (np.moveaxis(a, 1, -1) if axis == 1 else a)[mask]

    if dtype == "float32":
        # a few ulps of |y| (up to ~5) plus the float32 mean's own ulp, in std units
        tol = 8 * 5 * np.finfo(np.float32).eps + ulp / np.sqrt(var)
        y_error = np.abs(real(y) - y_ref).max(axis=0)
        assert (y_error <= tol).all(), f"outputs off by {y_error} (allowed {tol})"
        np.testing.assert_allclose(real(dx), dx_ref, atol=2e-5 * np.abs(dx_ref).max())
        np.testing.assert_allclose(dgamma, dgamma_ref, atol=1e-5 * np.abs(dy).sum(axis=None) / CHANNELS / 100)
        np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-5, atol=1e-5 * np.sqrt(rows))
