"""The functional core against a float64 NumPy reference: statistics, output, state, dtypes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jaxbn_helpers import DTYPES, Y_TOL, affine, make_mask, reference

from maskbn_jax import init, masked_batch_norm


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pattern", ["all", "random", "prefix", "single"])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [((4, 16, 8), -1), ((2, 5, 3, 4), 1), ((32, 6), -1)],
    ids=["BNC-last", "BCHW-axis1", "BC"],
)
def test_training_matches_reference(rng, dtype, pattern, shape, axis):
    x = jnp.asarray(rng.normal(2.0, 3.0, shape), DTYPES[dtype])
    c = shape[axis]
    m = make_mask(pattern, tuple(np.delete(shape, axis % len(shape))))
    params, state = affine(rng, c)
    run = jax.jit(functools.partial(masked_batch_norm, training=True, momentum=0.9, epsilon=1e-3, axis=axis))
    y, new = run(x, m, params, state)
    ref_y, ref_mean, ref_var = reference(
        np.asarray(x.astype(jnp.float32)),
        m,
        np.asarray(params["scale"]),
        np.asarray(params["bias"]),
        np.asarray(state["mean"]),
        np.asarray(state["var"]),
        training=True,
        momentum=0.9,
        epsilon=1e-3,
        axis=axis,
    )
    assert y.dtype == x.dtype and y.shape == x.shape
    assert new["mean"].dtype == new["var"].dtype == jnp.float32
    # float32 statistics even for half input: the state is as exact as for float32 input
    np.testing.assert_allclose(new["mean"], ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new["var"], ref_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref_y, **Y_TOL[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_eval_uses_moving_stats_and_keeps_state(rng, dtype):
    x = jnp.asarray(rng.normal(size=(3, 10, 4)), DTYPES[dtype])
    m = make_mask("random", (3, 10))
    params, state = affine(rng, 4)
    y, new = masked_batch_norm(x, m, params, state, training=False, epsilon=1e-3)
    ref_y, _, _ = reference(
        np.asarray(x.astype(jnp.float32)),
        m,
        *(np.asarray(v) for v in (params["scale"], params["bias"], state["mean"], state["var"])),
        training=False,
        momentum=0.9,
        epsilon=1e-3,
    )
    assert all(new[k] is state[k] for k in state)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref_y, **Y_TOL[dtype])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_padded_output_is_exactly_zero(rng, training):
    x = jnp.asarray(rng.normal(size=(4, 12, 5)), jnp.float32)
    m = make_mask("random", (4, 12))
    params, state = affine(rng, 5)
    y, _ = masked_batch_norm(x, m, params, state, training=training, padded_output="zero")
    y_norm, _ = masked_batch_norm(x, m, params, state, training=training)
    assert np.all(np.asarray(y)[~m] == 0)
    np.testing.assert_array_equal(np.asarray(y)[m], np.asarray(y_norm)[m])


def test_empty_mask_in_training_normalizes_with_moving_stats_and_keeps_them(rng):
    x = jnp.asarray(rng.normal(size=(4, 8, 3)), jnp.float32)
    m = np.zeros((4, 8), bool)
    params, state = affine(rng, 3)
    y, new = masked_batch_norm(x, m, params, state, training=True)
    y_eval, _ = masked_batch_norm(x, m, params, state, training=False)
    np.testing.assert_array_equal(new["mean"], state["mean"])
    np.testing.assert_array_equal(new["var"], state["var"])
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, y_eval, rtol=1e-6, atol=1e-6)


def test_no_mask_is_the_all_real_mask(rng):
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(6, 7, 3)), jnp.float32)
    params, state = affine(rng, 3)
    y0, s0 = masked_batch_norm(x, None, params, state, training=True)
    y1, s1 = masked_batch_norm(x, np.ones((6, 7), bool), params, state, training=True)
    np.testing.assert_allclose(y0, y1, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s0, s1)


@functools.partial(jax.jit, static_argnames=("padded_output",))
def _forward_and_grads(x, m, params, state, dy, padded_output="normalize"):
    def f(x, params):
        return masked_batch_norm(x, m, params, state, training=True, padded_output=padded_output)

    y, pullback, new = jax.vjp(f, x, params, has_aux=True)
    return y, new, pullback(dy)


@pytest.mark.parametrize("x_dtype", ["float32", "float16"])
@pytest.mark.parametrize("mask_dtype", ["int8", "uint8", "int32"])
@pytest.mark.parametrize("channel_dim", ["dropped", "kept"])
def test_int_masks_give_bit_for_bit_the_bool_mask_results(rng, x_dtype, mask_dtype, channel_dim):
    """Non-zero means real whatever the value, and the results (outputs, stats and gradients,
    under jit) are bit-identical to the bool mask's."""
    x = jnp.asarray(rng.normal(size=(8, 16, 4)), DTYPES[x_dtype])
    dy = jnp.asarray(rng.normal(size=x.shape), DTYPES[x_dtype])
    m = make_mask("random", (8, 16))
    raw = (m * 7).astype(mask_dtype)
    if channel_dim == "kept":
        raw = raw[..., None]
    params, state = affine(rng, 4)
    got = _forward_and_grads(x, raw, params, state, dy)
    want = _forward_and_grads(x, m, params, state, dy)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("ratio", [1e3, 1e6])
def test_variance_is_accurate_for_large_mean_over_std(ratio):
    """Corrected two-pass: fp32 relative error <= 1e-5 up to |mean|/std = 1e6,
    where E[x^2] - E[x]^2 would lose every digit."""
    std = 1e-2
    x32 = np.random.default_rng(3).normal(ratio * std, std, (8, 256, 4)).astype(np.float32)
    m = make_mask("random", (8, 256))
    _, state = init(4)
    _, new = masked_batch_norm(jnp.asarray(x32), m, {}, state, training=True, momentum=0.0)
    real = x32.astype(np.float64)[m]
    np.testing.assert_allclose(new["var"], real.var(0), rtol=1e-5)
    np.testing.assert_allclose(new["mean"], real.mean(0), rtol=1e-7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_variance_neither_overflows_nor_collapses(dtype):
    # float16 max is 65504: x**2 of 300 overflows if reduced in float16; tiny spread
    # around a large mean collapses to 0 in bfloat16 arithmetic
    x = jnp.asarray(np.random.default_rng(0).normal(300.0, 50.0, (4, 64, 3)), DTYPES[dtype])
    _, state = init(3)
    _, new = masked_batch_norm(x, None, {}, state, training=True, momentum=0.0)
    ref = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, 3)
    np.testing.assert_allclose(new["var"], ref.var(0), rtol=1e-5)


def test_momentum_is_the_decay_of_the_moving_stats(rng):
    x = jnp.asarray(rng.normal(size=(2, 50, 2)), jnp.float32)
    params, state = affine(rng, 2)
    _, frozen = masked_batch_norm(x, None, params, state, training=True, momentum=1.0)
    _, replaced = masked_batch_norm(x, None, params, state, training=True, momentum=0.0)
    np.testing.assert_array_equal(frozen["mean"], state["mean"])
    flat = np.asarray(x, np.float64).reshape(-1, 2)
    np.testing.assert_allclose(replaced["mean"], flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(replaced["var"], flat.var(0), rtol=1e-5)


@pytest.mark.parametrize(("use_scale", "use_bias"), [(True, False), (False, True), (False, False)])
def test_scale_and_bias_can_be_absent(rng, use_scale, use_bias):
    params, state = init(3, use_scale=use_scale, use_bias=use_bias)
    assert set(params) == {k for k, on in (("scale", use_scale), ("bias", use_bias)) if on}
    x = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    y, _ = masked_batch_norm(x, None, params, state, training=True, epsilon=0.0)
    flat = np.asarray(x, np.float64).reshape(-1, 3)
    np.testing.assert_allclose(y.reshape(-1, 3), (flat - flat.mean(0)) / flat.std(0), atol=1e-5)


def test_init_layout_and_dtypes():
    params, state = init(5)
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
        "scale": ((5,), jnp.float32),
        "bias": ((5,), jnp.float32),
    }
    np.testing.assert_array_equal(state["mean"], np.zeros(5))
    np.testing.assert_array_equal(state["var"], np.ones(5))
    with pytest.raises(ValueError, match="positive"):
        init(0)


def test_float64_layer_keeps_float64(rng):
    with jax.enable_x64(True):
        params, state = init(3, param_dtype=jnp.float64, stats_dtype=jnp.float64)
        x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float64)
        y, new = masked_batch_norm(x, np.arange(5) % 2, params, state, training=True, momentum=0.0)
        assert y.dtype == new["mean"].dtype == new["var"].dtype == jnp.float64
        np.testing.assert_allclose(new["var"], np.asarray(x)[1::2].var(0), rtol=1e-13)


@st.composite
def layouts(draw):
    """A random rank-2..4 shape, channel axis, mask density and seed."""
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    return shape, axis, draw(st.floats(0.0, 1.0)), draw(st.integers(0, 2**16))


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_any_layout_matches_reference(layout):
    shape, axis, density, seed = layout
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    m = rng.random(tuple(np.delete(shape, axis % len(shape)))) < density
    params, state = affine(rng, shape[axis])
    run = jax.jit(functools.partial(masked_batch_norm, training=True, momentum=0.5, epsilon=1e-2, axis=axis))
    y, new = run(jnp.asarray(x), m, params, state)
    ref_y, ref_mean, ref_var = reference(
        x, m, *(np.asarray(v) for v in (params["scale"], params["bias"], state["mean"], state["var"])),
        training=True, momentum=0.5, epsilon=1e-2, axis=axis,
    )  # fmt: skip
    np.testing.assert_allclose(new["mean"], ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], ref_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
