"""The pure functional core of masked batch normalization for JAX.

Everything here is a pure function of arrays: no Python branching on traced
values (the empty-mask fallback is a ``where``), so it runs under ``jit``,
``grad``, ``vmap`` and ``shard_map``. All validation looks at shapes and dtypes
only, so a bad call raises while tracing, before any state could change.

Naming follows Flax: ``params = {"scale", "bias"}`` (gamma, beta) and
``state = {"mean", "var"}`` (the ``batch_stats`` collection of
``flax.linen.BatchNorm``), so Flax checkpoints of a stock BatchNorm load as is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PADDED_OUTPUTS = ("normalize", "zero")

Array = jax.Array
Params = dict[str, Array]
State = dict[str, Array]


def init(
    num_features: int,
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    param_dtype: Any = jnp.float32,
    stats_dtype: Any = jnp.float32,
) -> tuple[Params, State]:
    """Build ``(params, state)`` for a layer with ``num_features`` channels.

    ``params`` holds ``scale`` (ones) and ``bias`` (zeros), each only when
    enabled; ``state`` holds the moving ``mean`` (zeros) and ``var`` (ones) in
    ``stats_dtype`` (float32; float64 for a float64 layer, which needs
    ``jax_enable_x64``).
    """
    if not isinstance(num_features, (int, np.integer)) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    shape = (int(num_features),)
    params: Params = {}
    if use_scale:
        params["scale"] = jnp.ones(shape, param_dtype)
    if use_bias:
        params["bias"] = jnp.zeros(shape, param_dtype)
    state: State = {"mean": jnp.zeros(shape, stats_dtype), "var": jnp.ones(shape, stats_dtype)}
    return params, state


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) configuration of one call, passed to the custom_vjp."""

    axes: tuple[int, ...]  # reduction axes: every axis but the channel axis
    bshape: tuple[int, ...]  # per-channel vectors reshaped to broadcast against x
    epsilon: float
    zero_padded: bool
    compute_dtype: Any
    axis_name: Any
    axis_index_groups: Any


def _shape(s: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in s)


def channel_axis(shape: Sequence[int], axis: int) -> int:
    """``axis`` as a non-negative index into ``shape``; ValueError when out of range."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be a single int, got {axis!r}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"channel axis {axis} is out of range for x shape {_shape(shape)} (rank {len(shape)})")
    return int(axis) % len(shape)


def _given_dtype(a) -> np.dtype:
    """The dtype of ``a`` as given (NumPy or JAX array, tracer, or nested list), without converting it."""
    return np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype


def channel_mismatch(x_shape, axis: int, what: str, shape) -> ValueError:
    """The error for a layer whose per-channel ``what`` (of ``shape``) does not fit x."""
    layer = shape[0] if len(shape) == 1 else _shape(shape)
    return ValueError(
        f"x has {x_shape[axis]} channels on axis {axis} (x shape {_shape(x_shape)}) but the layer has "
        f"{layer} ({what} shape {_shape(shape)})"
    )


def _validate(x, mask, params, state, axis, padded_output, training):
    """Check everything that can be checked from shapes and dtypes alone.

    Returns ``(x, m, axis)`` with ``m`` a bool array broadcastable to ``x``
    (size 1 on the channel axis), or None when there is no mask.
    """
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a Python bool (it selects what is traced), got {type(training).__name__}")
    if padded_output not in PADDED_OUTPUTS:
        raise ValueError(f"padded_output must be one of {PADDED_OUTPUTS}, got {padded_output!r}")
    # dtypes are checked on what the caller passed: jnp.asarray would first turn a NumPy int64 or
    # float64 array into int32 / float32 (JAX without x64) and the error would name the wrong dtype
    x_dtype = _given_dtype(x)
    if not jnp.issubdtype(x_dtype, jnp.floating):
        raise TypeError(
            f"x dtype {x_dtype.name} is not a floating dtype (x shape {_shape(np.shape(x))}); "
            "masked batch norm takes float16, bfloat16, float32 or float64 input"
        )
    x = jnp.asarray(x)
    axis = channel_axis(x.shape, axis)
    if x.size == 0:
        # the spec's choice: an empty *mask* falls back to the moving stats, an empty *batch* is an error
        raise ValueError(f"x shape {_shape(x.shape)} has no elements: masked batch norm needs a non-empty batch")
    channels = x.shape[axis]
    for where, tree in (("params", params), ("state", state)):
        for key, value in tree.items():
            if value is None:
                continue
            if tuple(value.shape) != (channels,):
                raise channel_mismatch(x.shape, axis, f"{where}[{key!r}]", value.shape)
    for key in ("mean", "var"):
        if key not in state:
            raise KeyError(f"state must hold 'mean' and 'var' (got keys {sorted(state)})")
    if mask is None:
        return x, None, axis
    mask_dtype = _given_dtype(mask)
    if not (mask_dtype == np.bool_ or jnp.issubdtype(mask_dtype, jnp.integer)):
        raise TypeError(
            f"mask dtype {mask_dtype.name} is not bool or an integer dtype; pass a bool mask "
            "(non-zero = real row), e.g. mask > 0.5"
        )
    mask = jnp.asarray(mask)
    without = x.shape[:axis] + x.shape[axis + 1 :]
    with_one = x.shape[:axis] + (1,) + x.shape[axis + 1 :]
    if mask.shape not in (without, with_one):
        raise ValueError(
            f"mask shape {_shape(mask.shape)} does not fit x shape {_shape(x.shape)} with channel axis "
            f"{axis}: expected {_shape(without)} or {_shape(with_one)}"
        )
    # every mask dtype goes through the same int32 compare: XLA:CPU's fused reductions then get the
    # same code whatever the mask's dtype (a bool mask read directly vectorizes differently and moves
    # results by an ulp), so int masks give bit-for-bit the bool mask's results
    if mask.dtype.itemsize > 4:
        mask = mask != 0  # a 64-bit int would wrap to 0 when narrowed (2**32 -> 0)
    m = mask.astype(jnp.int32) != 0
    return x, m.reshape(with_one), axis


def _psum(tree, cfg: _Config):
    if cfg.axis_name is None:
        return tree
    return jax.lax.psum(tree, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)


def _sel(m, a, b):
    """``where(m, a, b)``, or ``a`` when there is no mask (every row real)."""
    return a if m is None else jnp.where(m, a, b)


def _count(x, m, cfg: _Config):
    # counted in int32 (exact to 2**31 positions), float only after the sum
    if m is None:
        n = jnp.asarray(int(np.prod([x.shape[a] for a in cfg.axes])), jnp.int32)
    else:
        n = jnp.sum(m, dtype=jnp.int32)
    return n


def _varying(v, cfg: _Config):
    """Under ``axis_name``, type ``v`` as varying over the mapped axis (a no-op on its value).

    The custom_vjp rules below are per-device: they return per-device partial
    cotangents for every input, so every input must be per-device (varying)
    too. A ``where`` on the (varying) device index does that on any JAX
    version, and its transpose is the ``psum`` that gathers those partials for
    replicated inputs (params, global statistics) under shard_map's
    varying-axis typing, exactly as plain autodiff would.
    """
    if cfg.axis_name is None or v is None:
        return v
    return jnp.where(jax.lax.axis_index(cfg.axis_name) >= 0, v, v)


def _moments(xc, m, cfg: _Config, centered_sums):
    """Count-weighted ``(n, mean, var)`` over the real positions, merged
    over ``cfg.axis_name``: psum of (n, sum) gives the global mean, then psum
    of the centered sums around that global mean gives the exact global
    variance (uneven and empty shards included).

    Corrected two-pass variance: ``sum(d^2)/n - (sum(d)/n)^2`` with
    ``d = x - mean`` on real rows; never ``E[x^2] - E[x]^2``.
    """
    n_local = _count(xc, m, cfg)
    n, s = _psum((n_local, jnp.sum(_sel(m, xc, 0), axis=cfg.axes, keepdims=True)), cfg)
    denom = jnp.maximum(n, 1).astype(cfg.compute_dtype)
    mean = s / denom
    q, c = _psum(centered_sums(cfg, xc, m, _varying(mean, cfg), n_local), cfg)
    var = jnp.maximum(q / denom - jnp.square(c / denom), 0)
    return n, mean, var


def _centered_sums_plain(cfg: _Config, xc, m, mean, n_local):
    """Per-device ``(sum d^2, sum d)`` over real rows, ``d = x - mean``."""
    d = _sel(m, xc - mean, 0)
    return jnp.sum(d * d, axis=cfg.axes, keepdims=True), jnp.sum(d, axis=cfg.axes, keepdims=True)


def _vec(v, cfg: _Config):
    """A per-channel (C,) vector in the compute dtype, shaped to broadcast against x."""
    return None if v is None else v.astype(cfg.compute_dtype).reshape(cfg.bshape)


def _affine(centered, r, scale, bias):
    """``scale * centered * r + bias`` with the per-channel factors folded first."""
    mul = r if scale is None else r * scale
    y = centered * mul
    return y if bias is None else y + bias


# -- training path with analytic backward rules (the default) -----------------------------------------------
#
# Two per-device custom_vjp pieces carry all the full-size work; the per-channel
# glue between them (psum, mean, var, rsqrt, the empty-mask where, the moving
# stats) is left to autodiff, so collectives transpose the way JAX defines them.
# Summed over the pieces, the backward is the textbook one,
# dx = scale*r*(g - (S1 + xhat*S2)/n) on real rows (plus the terms of the
# returned batch stats), in one reduction pass and one elementwise pass, and
# keeps only x, the mask and per-channel vectors as residuals. Every
# full-size product is behind a ``where`` on the mask, so NaN/Inf in padded
# rows can never reach a gradient.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _centered_sums(cfg, xc, m, mean, n_local):
    return _centered_sums_plain(cfg, xc, m, mean, n_local)


def _centered_sums_fwd(cfg, xc, m, mean, n_local):
    q, c = _centered_sums_plain(cfg, xc, m, mean, n_local)
    return (q, c), (xc, m, mean, c, n_local)


def _centered_sums_bwd(cfg: _Config, res, cts):
    xc, m, mean, c, n_local = res
    gq, gc = cts
    dxc = _sel(m, 2 * gq * (xc - mean) + gc, 0)
    # sum of dxc over real rows, from the forward's own sums: sum(d) = c, count = n_local
    dmean = -(2 * gq * c + gc * n_local.astype(c.dtype))
    return dxc, None, dmean, None


_centered_sums.defvjp(_centered_sums_fwd, _centered_sums_bwd)


def _normalize_plain(cfg: _Config, xc, m, mu, r, scale, bias):
    y = _affine(xc - mu, r, scale, bias)
    return _sel(m, y, 0) if cfg.zero_padded else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _normalize(cfg, xc, m, mu, r, scale, bias, mean):
    """``scale * (x - mu) * r + bias`` on every row; padded rows are constants for autodiff.

    ``mean`` is the batch mean as ``_moments`` centred on it (``mu`` or, with no real row, unused);
    only the backward reads it, and sends it no cotangent."""
    return _normalize_plain(cfg, xc, m, mu, r, scale, bias)


def _normalize_fwd(cfg, xc, m, mu, r, scale, bias, mean):
    # bias is kept only to know whether it exists (its value is never needed)
    return _normalize_plain(cfg, xc, m, mu, r, scale, bias), (xc, m, mean, r, scale, bias)


def _normalize_bwd(cfg: _Config, res, gy):
    xc, m, mean, r, scale, bias = res
    g = _sel(m, gy, 0)  # padded output rows send nothing back
    s1 = jnp.sum(g, axis=cfg.axes, keepdims=True)
    # centred on the batch mean, the very expression the forward's variance pass reduces, so XLA
    # computes it once for both: on real rows mu == mean (a real row means n > 0), and with no real
    # row the select is 0 everywhere whatever it subtracts
    s2 = jnp.sum(g * _sel(m, xc - mean, 0), axis=cfg.axes, keepdims=True)
    gain = r if scale is None else r * scale
    dxc = _sel(m, g * gain, 0)
    dmu = -gain * s1
    dr = s2 if scale is None else scale * s2
    dscale = None if scale is None else r * s2
    dbias = None if bias is None else s1
    return dxc, None, dmu, dr, dscale, dbias, None


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _train_custom(cfg: _Config, x, m, scale, bias, moving_mean, moving_var):
    xc = _varying(x.astype(cfg.compute_dtype), cfg)
    n, mean, var = _moments(xc, m, cfg, _centered_sums)
    has = n > 0  # empty mask: normalize with the moving stats (no Python branch)
    mu = jnp.where(has, mean, _vec(moving_mean, cfg))
    r = jax.lax.rsqrt(jnp.where(has, var, _vec(moving_var, cfg)) + cfg.epsilon)
    per_device = functools.partial(_varying, cfg=cfg)
    y = _normalize(cfg, xc, m, *map(per_device, (mu, r, _vec(scale, cfg), _vec(bias, cfg), mean)))
    return y.astype(x.dtype), mean, var, n


# -- autodiff paths: eval, and the training oracle the tests check the custom_vjp against -------------------


def _train_autodiff(cfg: _Config, x, m, scale, bias, moving_mean, moving_var):
    """The training forward written so that plain autodiff gives the contract's
    gradients: the differentiable path only sees ``where(m, x, 0)`` and padded
    output rows go through ``stop_gradient``."""
    xc = x.astype(cfg.compute_dtype)
    n, mean, var = _moments(xc, m, cfg, _centered_sums_plain)
    has = n > 0
    mu = jnp.where(has, mean, _vec(moving_mean, cfg))
    r = jax.lax.rsqrt(jnp.where(has, var, _vec(moving_var, cfg)) + cfg.epsilon)
    y = _output(cfg, xc, m, mu, r, _vec(scale, cfg), _vec(bias, cfg))
    return y.astype(x.dtype), mean, var, n


def _output(cfg: _Config, xc, m, mu, r, scale, bias):
    real = _affine(_sel(m, xc, 0) - mu, r, scale, bias)
    if m is None:
        return real
    padded = jnp.zeros((), real.dtype) if cfg.zero_padded else jax.lax.stop_gradient(_affine(xc - mu, r, scale, bias))
    return jnp.where(m, real, padded)


def _eval(cfg: _Config, x, m, scale, bias, moving_mean, moving_var):
    xc = x.astype(cfg.compute_dtype)
    r = jax.lax.rsqrt(_vec(moving_var, cfg) + cfg.epsilon)
    return _output(cfg, xc, m, _vec(moving_mean, cfg), r, _vec(scale, cfg), _vec(bias, cfg)).astype(x.dtype)


# -- public entry point -------------------------------------------------------------------------------------


def masked_batch_norm(
    x: Array,
    mask: Array | None,
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    *,
    training: bool,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis: int = -1,
    padded_output: str = "normalize",
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> tuple[Array, State]:
    """Batch norm whose batch statistics come only from the real rows of ``x``.

    Args:
      x: float16, bfloat16, float32 or float64 input with a channel axis.
      mask: bool or integer array, non-zero = real. Its shape is ``x.shape``
        without the channel axis, or ``x.shape`` with the channel axis set to 1;
        nothing else broadcasts. ``None`` means every row is real (plain BN).
      params: ``{"scale": (C,), "bias": (C,)}``; either key may be absent
        (``use_scale`` / ``use_bias`` off). See :func:`init`.
      state: ``{"mean": (C,), "var": (C,)}``, the moving statistics (Flax's
        ``batch_stats``).
      training: Python bool. True: normalize with the statistics of the real
        rows and return updated moving stats; when no row is real, normalize
        with the moving stats and leave them unchanged. False: normalize with
        the moving stats, return the state unchanged.
      momentum: Flax convention, the decay: ``moving = momentum * moving +
        (1 - momentum) * batch`` (population variance).
      epsilon: added to the variance before ``rsqrt``.
      axis: the channel axis of ``x``.
      padded_output: ``"normalize"`` (padded rows normalized like real ones)
        or ``"zero"`` (padded rows exactly 0).
      axis_name: under ``shard_map``/``pmap``, the mapped axis to merge the
        statistics over: per-device (n, sum) and then the centered sums around
        the global mean are summed with ``psum``, so uneven (even empty) shards
        give the statistics of the unsharded batch.
      axis_index_groups: as for ``jax.lax.psum``.

    Returns:
      ``(y, new_state)``: ``y`` has the dtype of ``x``; the moving stats keep
      the dtype of ``state``. Statistics and the normalization are computed in
      float32 (float64 if ``x`` or the state is float64).

    Padded output rows are constants for autodiff: ``d loss / d x`` is exactly
    0 on padded rows for any loss, and padded values (NaN, Inf, ...) never
    reach real outputs, the moving stats, or any gradient.

    Raises:
      TypeError: integer ``x``, float ``mask``, non-bool ``training``.
      ValueError: a mask shape that does not fit ``x``, a channel count that
        does not match ``params``/``state``, an out-of-range ``axis``.
      All raised while tracing, before anything is computed.
    """
    return _masked_batch_norm(
        x,
        mask,
        params,
        state,
        training=training,
        momentum=momentum,
        epsilon=epsilon,
        axis=axis,
        padded_output=padded_output,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        custom_vjp=True,
    )


def _masked_batch_norm(
    x,
    mask,
    params,
    state,
    *,
    training,
    momentum,
    epsilon,
    axis,
    padded_output,
    axis_name,
    axis_index_groups,
    custom_vjp,
):
    """:func:`masked_batch_norm`, with the training backward selectable:
    ``custom_vjp=False`` differentiates the forward with plain autodiff (the
    tests use it as an independent oracle for the analytic backward)."""
    x, m, axis = _validate(x, mask, params, state, axis, padded_output, training)
    mm, mv = state["mean"], state["var"]
    compute_dtype = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), mm.dtype)
    groups = None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    cfg = _Config(
        axes=tuple(a for a in range(x.ndim) if a != axis),
        bshape=tuple(x.shape[axis] if a == axis else 1 for a in range(x.ndim)),
        epsilon=float(epsilon),
        zero_padded=padded_output == "zero",
        compute_dtype=jnp.dtype(compute_dtype),
        axis_name=axis_name,
        axis_index_groups=groups,
    )
    scale, bias = params.get("scale"), params.get("bias")
    if not training:
        return _eval(cfg, x, m, scale, bias, mm, mv), dict(state)
    train = functools.partial(_train_custom, cfg) if custom_vjp else functools.partial(_train_autodiff, cfg)
    y, mean, var, n = train(x, m, scale, bias, mm, mv)
    has = n > 0

    def update(moving, batch):
        batch = batch.reshape(moving.shape).astype(compute_dtype)
        new = momentum * moving.astype(compute_dtype) + (1 - momentum) * batch
        return jnp.where(has, new, moving).astype(moving.dtype)

    new_state = dict(state)
    new_state["mean"] = update(mm, mean)
    new_state["var"] = update(mv, var)
    return y, new_state
