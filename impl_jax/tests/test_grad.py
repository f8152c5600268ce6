"""Derivatives: the shifted single-pass layer against the two-pass formulation, compacted
plain BN and finite differences (reverse, forward and second order); padded rows are
constants; padded garbage never leaks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from jaxbn_helpers import DTYPES, affine, make_mask

from maskbn_jax import init, masked_batch_norm
from maskbn_jax._core import _masked_batch_norm

CORE_KW = {"momentum": 0.9, "epsilon": 1e-3, "axis": -1, "axis_name": None, "axis_index_groups": None}
#: tolerance between two float32 gradient computations (different summation orders)
GRAD_TOL = {
    "float32": {"atol": 1e-5, "rtol": 1e-4},
    "float16": {"atol": 2e-3, "rtol": 2e-3},
    "bfloat16": {"atol": 2e-2, "rtol": 2e-2},
}


@functools.partial(jax.jit, static_argnames=("two_pass", "padded_output"))
def vjp_all(x, m, params, state, dy, *, two_pass, padded_output="normalize", stat_weights=None):
    """(Jitted: one compile per test instead of one per eager op.) Gradients of ``sum(y * dy) + w . new_mean + w^2 . new_var`` for x and params."""

    def f(x, params):
        y, new = _masked_batch_norm(
            x, m, params, state, training=True, padded_output=padded_output, two_pass=two_pass, **CORE_KW
        )
        return y, new

    (y, new), pullback = jax.vjp(f, x, params)
    w = jnp.zeros_like(state["mean"]) if stat_weights is None else stat_weights
    return y, new, pullback((dy, {"mean": w, "var": w * w}))


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
@pytest.mark.parametrize(
    ("dtype", "pattern"),
    # every mask pattern in float32; the half dtypes on the random mask (their difference is the rounding)
    [("float32", p) for p in ("random", "prefix", "single", "all")] + [(d, "random") for d in ("float16", "bfloat16")],
)
def test_single_pass_gradients_match_the_two_pass_formulation(rng, dtype, padded_output, pattern):
    x = jnp.asarray(rng.normal(1.0, 2.0, (4, 10, 6)), DTYPES[dtype])
    m = make_mask(pattern, (4, 10))
    params, state = affine(rng, 6)
    # dy is non-zero on padded rows too: those rows must still send no gradient
    dy = jnp.asarray(rng.normal(size=x.shape), DTYPES[dtype])
    w = jnp.asarray(rng.normal(size=6), jnp.float32)
    _, _, (dx_c, dp_c) = vjp_all(x, m, params, state, dy, two_pass=False, padded_output=padded_output, stat_weights=w)
    _, _, (dx_a, dp_a) = vjp_all(x, m, params, state, dy, two_pass=True, padded_output=padded_output, stat_weights=w)
    assert dx_c.dtype == x.dtype and dp_c["scale"].dtype == jnp.float32
    assert np.all(np.asarray(dx_c)[~m] == 0) and np.all(np.asarray(dx_a)[~m] == 0)
    tol = GRAD_TOL[dtype]
    np.testing.assert_allclose(np.asarray(dx_c, np.float32), np.asarray(dx_a, np.float32), **tol)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(dp_c[k], dp_a[k], **GRAD_TOL["float32"])


def plain_bn(x, scale, bias, eps):
    """Unmasked batch norm in float32, written out so autodiff gives its textbook gradient."""
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def plain_bn_vjp(x, scale, bias, dy):
    y, pullback = jax.vjp(lambda x, s, b: plain_bn(x, s, b, 1e-3), x, scale, bias)
    return y, pullback(dy)


@pytest.mark.parametrize("two_pass", [False, True], ids=["single-pass", "two-pass"])
def test_real_row_gradients_equal_plain_bn_on_the_compacted_rows(rng, two_pass):
    x = jnp.asarray(rng.normal(-1.0, 3.0, (5, 8, 4)), jnp.float32)
    m = make_mask("random", (5, 8))
    params, state = affine(rng, 4)
    dy = jnp.where(m[..., None], jnp.asarray(rng.normal(size=x.shape), jnp.float32), 0)
    y, _, (dx, dp) = vjp_all(x, m, params, state, dy, two_pass=two_pass)
    real, dy_real = x[m], dy[m]
    y_ref, (dx_ref, ds_ref, db_ref) = jax.jit(plain_bn_vjp)(real, params["scale"], params["bias"], dy_real)
    np.testing.assert_allclose(y[m], y_ref, atol=1e-5)
    np.testing.assert_allclose(dx[m], dx_ref, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(dp["scale"], ds_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dp["bias"], db_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("two_pass", [False, True], ids=["single-pass", "two-pass"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_padded_rows_get_exactly_zero_gradient_for_any_loss(rng, two_pass, training):
    x = jnp.asarray(rng.normal(size=(3, 7, 2)), jnp.float32)
    m = make_mask("random", (3, 7))
    params, state = affine(rng, 2)

    def cubed(x, params):
        y, _ = _masked_batch_norm(
            x,
            m,
            params,
            state,
            training=training,
            padded_output="normalize",
            two_pass=two_pass,
            **CORE_KW,
        )
        return y**3

    every_row = lambda x, p: jnp.sum(cubed(x, p))  # noqa: E731
    real_rows = lambda x, p: jnp.sum(jnp.where(m[..., None], cubed(x, p), 0))  # noqa: E731
    dx, dp = jax.jit(jax.grad(every_row, (0, 1)))(x, params)
    assert np.all(np.asarray(dx)[~m] == 0)
    assert np.any(np.asarray(dx)[m] != 0)
    # padded output rows are constants: the loss over every row differentiates like the real-row loss
    dx_real, dp_real = jax.jit(jax.grad(real_rows, (0, 1)))(x, params)
    np.testing.assert_allclose(dx, dx_real, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), dp, dp_real)


@pytest.mark.parametrize("two_pass", [False, True], ids=["single-pass", "two-pass"])
def test_empty_mask_gives_zero_gradients(rng, two_pass):
    x = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    m = np.zeros((2, 5), bool)
    params, state = affine(rng, 3)
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    _, new, (dx, dp) = vjp_all(x, m, params, state, dy, two_pass=two_pass, stat_weights=jnp.ones(3))
    assert not np.any(np.asarray(dx)) and not np.any(np.asarray(dp["scale"])) and not np.any(np.asarray(dp["bias"]))
    np.testing.assert_array_equal(new["mean"], state["mean"])


GARBAGE = {
    "nan": np.nan,
    "inf": np.inf,
    "-inf": -np.inf,
    "huge": 1e38,
    "random-bits": None,
}


def fill_padded(x: np.ndarray, m: np.ndarray, kind: str) -> np.ndarray:
    x = x.copy()
    if kind == "random-bits":
        bits = np.random.default_rng(5).integers(0, 2**32, size=x.shape, dtype=np.uint64).astype(np.uint32)
        x[~m] = bits.view(np.float32)[~m]
    else:
        x[~m] = GARBAGE[kind]
    return x


@pytest.mark.parametrize("kind", list(GARBAGE))
@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
@pytest.mark.parametrize("two_pass", [False, True], ids=["single-pass", "two-pass"])
def test_padded_garbage_is_isolated_bit_for_bit(rng, kind, padded_output, two_pass):
    m = make_mask("random", (4, 9))
    x0 = np.where(m[..., None], rng.normal(size=(4, 9, 3)), 0).astype(np.float32)
    params, state = affine(rng, 3)
    dy = jnp.where(m[..., None], jnp.asarray(rng.normal(size=x0.shape), jnp.float32), 0)
    run = functools.partial(vjp_all, two_pass=two_pass, padded_output=padded_output)
    clean = run(jnp.asarray(x0), m, params, state, dy, stat_weights=jnp.ones(3))
    dirty = run(jnp.asarray(fill_padded(x0, m, kind)), m, params, state, dy, stat_weights=jnp.ones(3))
    (y0, s0, (dx0, dp0)), (y1, s1, (dx1, dp1)) = clean, dirty
    np.testing.assert_array_equal(np.asarray(y1)[m], np.asarray(y0)[m])
    jax.tree.map(np.testing.assert_array_equal, (s1, dx1, dp1), (s0, dx0, dp0))
    if padded_output == "zero":
        assert np.all(np.asarray(y1)[~m] == 0)


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
@pytest.mark.parametrize("pattern", ["random", "single"])
def test_gradients_match_finite_differences_in_float64(padded_output, pattern):
    """check_grads in reverse mode against central differences; x64 only inside this test."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        m = make_mask(pattern, (3, 6))
        x = jnp.asarray(rng.normal(0.5, 2.0, (3, 6, 2)), jnp.float64)
        _, state = init(2, param_dtype=jnp.float64, stats_dtype=jnp.float64)
        scale = jnp.asarray(rng.normal(1.0, 0.3, 2))
        bias = jnp.asarray(rng.normal(size=2))

        @jax.jit
        def f(x, scale, bias):
            y, new = masked_batch_norm(
                x,
                m,
                {"scale": scale, "bias": bias},
                state,
                training=True,
                momentum=0.5,
                padded_output=padded_output,
            )
            # the contract's gradients are those of a loss over real rows (plus the new stats)
            return jnp.where(m[..., None], y, 0), new["mean"], new["var"]

        check_grads(f, (x, scale, bias), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("mask_kind", ["none", "rows", "per-channel"], ids=["no-mask", "row-mask", "per-channel-mask"])
@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
def test_every_mode_and_order_matches_finite_differences_in_float64(mask_kind, padded_output):
    """jvp, vjp and their second order (jvp of grad = Hessian-vector products, grad of grad)
    through a training call, against central finite differences, as for a stock BN."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(12)
        x = jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float64)
        m = {
            "none": None,
            "rows": make_mask("random", (3, 5)),
            "per-channel": rng.random((3, 5, 2)) < 0.6,
        }[mask_kind]
        params, state = init(2, param_dtype=jnp.float64, stats_dtype=jnp.float64)
        params = {"scale": params["scale"] * 1.3, "bias": params["bias"] + 0.2}
        keep = (
            (lambda y: y)
            if m is None
            else (lambda y: jnp.where(jnp.broadcast_to(m if m.ndim == 3 else m[..., None], y.shape), y, 0))
        )

        def f(x, scale, bias):
            y, new = masked_batch_norm(
                x, m, {"scale": scale, "bias": bias}, state, training=True, padded_output=padded_output
            )
            return jnp.sum(jnp.sin(keep(y))) + jnp.sum(new["var"] ** 2 + new["mean"])

        check_grads(jax.jit(f), (x, params["scale"], params["bias"]), order=2, modes=("fwd", "rev"))
    assert not jax.config.jax_enable_x64


def test_hessian_vector_products_agree_in_every_composition(rng):
    """forward-over-reverse, reverse-over-forward and reverse-over-reverse give one HVP."""
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(2.0, 3.0, (4, 6, 3)), jnp.float64)
        m = make_mask("prefix", (4, 6))
        params, state = init(3, param_dtype=jnp.float64, stats_dtype=jnp.float64)
        f = lambda x: jnp.sum(jnp.tanh(masked_batch_norm(x, m, params, state, training=True)[0]) ** 2)  # noqa: E731
        v = jnp.asarray(rng.normal(size=x.shape), jnp.float64)
        fwd_rev = jax.jvp(jax.grad(f), (x,), (v,))[1]
        rev_fwd = jax.grad(lambda x: jax.jvp(f, (x,), (v,))[1])(x)
        rev_rev = jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x)
        np.testing.assert_allclose(fwd_rev, rev_fwd, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fwd_rev, rev_rev, rtol=1e-10, atol=1e-12)
        assert np.all(np.asarray(fwd_rev)[~m] == 0)
        full = jax.hessian(f)(x).reshape(x.size, x.size)
        np.testing.assert_allclose(
            full @ np.asarray(v).reshape(-1), np.asarray(fwd_rev).reshape(-1), rtol=1e-9, atol=1e-11
        )
    assert not jax.config.jax_enable_x64


def test_forward_mode_padded_tangents_move_nothing(rng):
    """A tangent on padded rows only (even NaN there) changes no real output and no statistic."""
    x = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
    m = make_mask("random", (4, 5))
    params, state = affine(rng, 3)
    t = jnp.broadcast_to(jnp.where(m[..., None], 0.0, jnp.nan), x.shape)
    _, (ty, tnew) = jax.jvp(lambda x: masked_batch_norm(x, m, params, state, training=True), (x,), (t,))
    assert np.all(np.asarray(ty) == 0)
    assert all(np.all(np.asarray(v) == 0) for v in tnew.values())
