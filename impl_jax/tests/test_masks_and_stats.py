"""Contract 1a in the functional core: every mask layout (per-channel counts, empty channels),
the zero-size batch, both moving-variance conventions, the output dtype, accuracy at scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxbn_helpers import affine

from maskbn_jax import init, masked_batch_norm
from maskbn_jax._core import flax_mask, mask_layout


def per_channel_reference(x, m_full, moving_mean, moving_var, momentum, unbiased=False):
    """float64 (mean, var, new moving stats) per channel over that channel's real positions;
    ``m_full`` has x's shape, channel axis last."""
    x = np.asarray(x, np.float64)
    mean, var, new_mean, new_var = [], [], [], []
    for c in range(x.shape[-1]):
        real = x[..., c][m_full[..., c]]
        if real.size:
            mu, v = real.mean(), real.var()
            stored = v * real.size / max(real.size - 1, 1) if unbiased else v
            new_mean.append(momentum * moving_mean[c] + (1 - momentum) * mu)
            new_var.append(momentum * moving_var[c] + (1 - momentum) * stored)
        else:
            mu, v = moving_mean[c], moving_var[c]
            new_mean.append(moving_mean[c])
            new_var.append(moving_var[c])
        mean.append(mu)
        var.append(v)
    return [np.asarray(a) for a in (mean, var, new_mean, new_var)]


LAYOUTS = {
    # id: (x shape, axis, mask shape, how the mask reaches x: a function of the mask -> x-shaped bool)
    "without-channel": ((4, 5, 3), -1, (4, 5), lambda m: np.broadcast_to(m[..., None], (4, 5, 3))),
    "size-1-channel": ((4, 5, 3), -1, (4, 5, 1), lambda m: np.broadcast_to(m, (4, 5, 3))),
    "flax-B-1-C": ((4, 5, 3), -1, (4, 1, 3), lambda m: np.broadcast_to(m, (4, 5, 3))),
    "flax-1-1-C": ((4, 5, 3), -1, (1, 1, 3), lambda m: np.broadcast_to(m, (4, 5, 3))),
    "flax-full": ((4, 5, 3), -1, (4, 5, 3), lambda m: m),
    # Keras: rank(x) - 1 mask over the leading axes, channel axis 1 -> varies along the channels
    "keras-channels-first": (
        (4, 3, 5),
        1,
        (4, 3),
        lambda m: np.moveaxis(np.broadcast_to(m[..., None], (4, 3, 5)), 1, -1),
    ),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_mask_layout_gives_per_channel_statistics(rng, layout, training):
    shape, axis, mshape, to_full = LAYOUTS[layout]
    x = jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)
    m = rng.random(mshape) < 0.6
    params, state = affine(rng, shape[axis])
    y, new = masked_batch_norm(x, m, params, state, training=training, momentum=0.8, axis=axis, padded_output="zero")
    full = to_full(m)  # channel axis last
    mean, var, new_mean, new_var = per_channel_reference(
        np.moveaxis(np.asarray(x), axis, -1), full, np.asarray(state["mean"]), np.asarray(state["var"]), 0.8
    )
    if not training:
        mean, var = np.asarray(state["mean"], np.float64), np.asarray(state["var"], np.float64)
        new_mean, new_var = state["mean"], state["var"]
    want = (np.moveaxis(np.asarray(x, np.float64), axis, -1) - mean) / np.sqrt(var + 1e-5)
    want = np.where(full, want * np.asarray(params["scale"]) + np.asarray(params["bias"]), 0.0)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), axis, -1), want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(new["mean"], new_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], new_var, rtol=1e-5, atol=1e-6)


def test_a_channel_without_real_rows_keeps_its_moving_stats_and_gets_no_gradient(rng):
    x = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    m = rng.random((4, 6, 3)) < 0.5
    m[..., 1] = False
    params, state = affine(rng, 3)

    def f(x, params):
        y, new = masked_batch_norm(x, m, params, state, training=True, momentum=0.5)
        return jnp.sum(jnp.where(m, y, 0) ** 2), new

    (_, new), (dx, dp) = jax.value_and_grad(f, (0, 1), has_aux=True)(x, params)
    assert new["mean"][1] == state["mean"][1] and new["var"][1] == state["var"][1]
    assert np.all(np.asarray(dx)[..., 1] == 0) and dp["scale"][1] == 0 and dp["bias"][1] == 0
    assert np.all(np.asarray(dx)[~m] == 0)
    # that channel is normalized with its moving stats, as an empty mask is
    y, _ = masked_batch_norm(x, m, params, state, training=True)
    want = (x[..., 1] - state["mean"][1]) * jax.lax.rsqrt(state["var"][1] + 1e-5) * params["scale"][1] + params["bias"][
        1
    ]
    np.testing.assert_allclose(y[..., 1], want, rtol=1e-6, atol=1e-6)


def test_the_ambiguous_rank_minus_one_shape_is_read_as_one_flag_per_position():
    # x (4, 3, 3), channel axis 1: (4, 3) is both "x without the channel axis" and Keras' x.shape[:-1]
    assert mask_layout((4, 3), (4, 3, 3), 1) == (4, 1, 3)
    # the Keras reading, written unambiguously
    assert mask_layout((4, 3, 1), (4, 3, 3), 1) == (4, 3, 1)
    # channels last: both readings coincide
    assert mask_layout((4, 3), (4, 3, 5), 2) == (4, 3, 1)


def test_flax_lower_rank_masks_broadcast_from_the_trailing_axes():
    """A (C,) mask (Flax's own test uses one) broadcasts like NumPy; shapes that a core reading
    fits keep that reading."""
    assert flax_mask(np.ones(5, bool), (10, 5), 1).shape == (1, 5)
    assert flax_mask(np.ones(10, bool), (10, 5), 1).shape == (10,)  # reading (a): one flag per row
    with pytest.raises(ValueError, match=r"mask shape \(3,\) does not fit x shape \(10, 5\)"):
        flax_mask(np.ones(3, bool), (10, 5), 1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (0, 3)])
def test_zero_size_batch_gives_an_empty_output_and_keeps_the_state(rng, shape, training):
    params, state = affine(rng, 3)
    x = jnp.zeros(shape, jnp.bfloat16)
    mask = np.zeros(shape[:-1], bool)
    for m in (None, mask):
        y, new = jax.jit(lambda x, m: masked_batch_norm(x, m, params, state, training=training))(x, m)
        assert y.shape == shape and y.dtype == jnp.bfloat16
        jax.tree.map(np.testing.assert_array_equal, new, state)
    dx = jax.grad(lambda x: jnp.sum(masked_batch_norm(x, None, params, state, training=training)[0]))(x)
    assert dx.shape == shape


@pytest.mark.parametrize("mask_kind", ["rows", "per-channel"])
def test_unbiased_moving_var_is_n_over_n_minus_1_per_channel(rng, mask_kind):
    x = jnp.asarray(rng.normal(size=(3, 4, 3)), jnp.float32)
    m = rng.random((3, 4) if mask_kind == "rows" else (3, 4, 3)) < 0.5
    m.reshape(-1)[:2] = True
    if mask_kind == "per-channel":
        m[..., 2] = False
        m[0, 0, 2] = True  # one real entry: the factor is 1
    full = np.broadcast_to(m if m.ndim == 3 else m[..., None], x.shape)
    params, state = affine(rng, 3)
    for unbiased in (False, True):
        _, new = masked_batch_norm(x, m, params, state, training=True, momentum=0.7, unbiased_var=unbiased)
        *_, new_mean, new_var = per_channel_reference(
            x, full, np.asarray(state["mean"]), np.asarray(state["var"]), 0.7, unbiased=unbiased
        )
        np.testing.assert_allclose(new["var"], new_var, rtol=1e-5)
        np.testing.assert_allclose(new["mean"], new_mean, rtol=1e-5, atol=1e-7)


def test_the_output_dtype_can_be_asked_for(rng):
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16)
    params, state = affine(rng, 3)
    y32, _ = masked_batch_norm(x, None, params, state, training=True, dtype=jnp.float32)
    y16, _ = masked_batch_norm(x, None, params, state, training=True)
    assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y32.astype(jnp.bfloat16), y16)


@pytest.mark.parametrize(("rows", "offset"), [(262_144, 1e6), (1 << 21, 1e4), (1 << 21, 1e6)])
def test_accuracy_at_scale(rows, offset):
    """Contract 1a at scale (sized to run in seconds): the batch mean within ~1 float32 ulp of
    the exact mean and the variance within 1e-5 relative, |mean| / std up to 1e6, with a mask."""
    rng = np.random.default_rng(rows)
    x = (offset + rng.standard_normal((rows, 2))).astype(np.float32)
    m = rng.random(rows) < 0.7
    _, state = init(2)
    _, new = jax.jit(lambda x, m: masked_batch_norm(x, m, {}, state, training=True, momentum=0.0))(x, m)
    real = x.astype(np.float64)[m]
    ulp = np.spacing(np.float32(offset))
    assert np.all(np.abs(np.asarray(new["mean"], np.float64) - real.mean(0)) <= 1.0 * ulp)
    np.testing.assert_allclose(new["var"], real.var(0), rtol=1e-5)
    # outputs: as accurate as the mean allows, for real rows
    y, _ = jax.jit(lambda x, m: masked_batch_norm(x, m, {}, state, training=True))(x, m)
    want = (x.astype(np.float64)[m] - real.mean(0)) / np.sqrt(real.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[m], want, atol=2 * ulp + 1e-5)
