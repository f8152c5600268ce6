"""Test helpers: a tiny float64 NumPy reference and input builders.

The reference is deliberately independent of maskbn_jax (compaction with
boolean indexing, np.var), so it checks the maths rather than re-running it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
#: tolerance of y against the float64 reference, per input dtype: output rounding dominates
#: (rtol is the dtype's unit roundoff, with headroom for large |y| when var is tiny)
Y_TOL = {
    "float32": {"atol": 2e-5, "rtol": 1e-6},
    "float16": {"atol": 4e-3, "rtol": 1e-3},
    "bfloat16": {"atol": 3e-2, "rtol": 8e-3},
}


def reference(x, m, scale, bias, moving_mean, moving_var, *, training, momentum, epsilon, axis=-1, zero=False):
    """float64 ``(y, new_mean, new_var)``; ``m`` has x's shape without the channel axis."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    m = np.asarray(m, bool)
    real = x[m]
    if training and real.shape[0] > 0:
        mean, var = real.mean(0), real.var(0)
        new_mean = momentum * moving_mean + (1 - momentum) * mean
        new_var = momentum * moving_var + (1 - momentum) * var
    else:
        mean, var = np.asarray(moving_mean, np.float64), np.asarray(moving_var, np.float64)
        new_mean, new_var = moving_mean, moving_var
    y = (x - mean) / np.sqrt(var + epsilon) * scale + bias
    if zero:
        y = np.where(m[..., None], y, 0.0)
    return np.moveaxis(y, -1, axis), np.asarray(new_mean), np.asarray(new_var)


def make_mask(pattern: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Masks of x's shape without the channel axis."""
    if pattern == "all":
        return np.ones(shape, bool)
    if pattern == "none":
        return np.zeros(shape, bool)
    if pattern == "single":
        m = np.zeros(shape, bool)
        m.flat[3] = True
        return m
    if pattern == "prefix":
        # each batch item has a different number of real positions, one has none
        flat = np.zeros((shape[0], int(np.prod(shape[1:]))), bool)
        for b in range(shape[0]):
            flat[b, : (b * flat.shape[1]) // max(shape[0] - 1, 1)] = True
        return flat.reshape(shape)
    if pattern == "random":
        return np.random.default_rng(seed).random(shape) < 0.6
    raise ValueError(pattern)


def affine(rng, channels: int):
    """Non-trivial float32 scale/bias/moving stats, so no term hides behind a 1 or a 0."""
    params = {
        "scale": jnp.asarray(rng.normal(1.0, 0.3, channels), jnp.float32),
        "bias": jnp.asarray(rng.normal(0.0, 0.5, channels), jnp.float32),
    }
    state = {
        "mean": jnp.asarray(rng.normal(0.5, 0.2, channels), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32),
    }
    return params, state
