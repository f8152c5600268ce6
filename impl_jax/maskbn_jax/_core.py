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
    """Static (hashable) configuration of one call."""

    axis: int  # the channel axis (non-negative)
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


def _broadcasts(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Same rank, each dim 1 or target's."""
    return len(shape) == len(target) and all(m in (1, t) for m, t in zip(shape, target))


def mask_layout(mask_shape: Sequence[int], x_shape: Sequence[int], axis: int) -> tuple[int, ...]:
    """The same-rank shape a mask of ``mask_shape`` is read as, for x of ``x_shape`` (channel ``axis``).

    Accepted, in this order (the first reading that fits wins):

    (a) x's shape without the channel axis, or with a size-1 channel axis: one
        flag per position, shared by every channel;
    (b) Keras' convention: ``x.shape[:-1]`` (rank(x) - 1) or a shape that
        broadcasts to it (each dim 1 or x's), covering x's leading axes and
        broadcast over the last one. With the channel axis last this is
        (a); with another channel axis the mask varies along the channels;
    (c) Flax's convention: same rank as x, each dim 1 or x's, broadcast.

    A rank(x) - 1 shape that fits both (a) and (b) is read as (a); write it as
    ``x.shape[:-1] + (1,)`` for (b). Anything else raises ValueError.
    """
    x_shape, mask_shape = _shape(x_shape), _shape(mask_shape)
    without = x_shape[:axis] + x_shape[axis + 1 :]
    with_one = x_shape[:axis] + (1,) + x_shape[axis + 1 :]
    if mask_shape in (without, with_one):
        return with_one
    if _broadcasts(mask_shape, x_shape[:-1]):
        return mask_shape + (1,)
    if _broadcasts(mask_shape, x_shape):
        return mask_shape
    raise ValueError(
        f"mask shape {mask_shape} does not fit x shape {x_shape} with channel axis {axis}: expected "
        f"{without} or {with_one} (one flag per position), {x_shape[:-1]} or a broadcast of it "
        f"(Keras: x's leading axes), or a rank-{len(x_shape)} shape that broadcasts to {x_shape} (Flax)"
    )


def flax_mask(mask, x_shape: Sequence[int], axis: int):
    """A mask as Flax's BatchNorm reads it: any shape that broadcasts to x under NumPy's rules.

    A lower-rank mask that none of :func:`mask_layout`'s readings fits is
    aligned with x's trailing axes (NumPy broadcasting, e.g. a ``(C,)`` mask of
    channels); every other mask is passed on unchanged, so where a shape fits
    both NumPy's and reading (a) or (b), that reading wins, as everywhere."""
    if mask is None:
        return mask
    mask_shape = _shape(np.shape(mask))
    if len(mask_shape) >= len(x_shape):
        return mask
    try:
        mask_layout(mask_shape, x_shape, axis)
        return mask
    except ValueError:
        padded = (1,) * (len(x_shape) - len(mask_shape)) + mask_shape
        if _broadcasts(padded, x_shape):
            return jnp.reshape(jnp.asarray(mask), padded)
        raise


def _validate(x, mask, params, state, axis, padded_output, training):
    """Check everything that can be checked from shapes and dtypes alone.

    Returns ``(x, m, axis)`` with ``m`` a bool array of x's shape with the
    channel axis 1 (one flag per position) or C (a mask that varies along the
    channels), or None when there is no mask.
    """
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a Python bool (it selects what is traced), got {type(training).__name__}")
    if padded_output not in PADDED_OUTPUTS:
        raise ValueError(f"padded_output must be one of {PADDED_OUTPUTS}, got {padded_output!r}")
    # dtypes are checked on what the caller passed: jnp.asarray would first turn a NumPy int64 or
    # float64 array into int32 / float32 (JAX without x64) and the error would name the wrong dtype
    x_dtype = _given_dtype(x)
    if jnp.issubdtype(x_dtype, jnp.complexfloating):
        raise TypeError(
            f"x dtype {x_dtype.name} is complex (x shape {_shape(np.shape(x))}): masked batch norm is defined "
            "for real inputs only; normalize the real and imaginary parts as separate channels instead"
        )
    if not jnp.issubdtype(x_dtype, jnp.floating):
        raise TypeError(
            f"x dtype {x_dtype.name} is not a floating dtype (x shape {_shape(np.shape(x))}); "
            "masked batch norm takes float16, bfloat16, float32 or float64 input"
        )
    x = jnp.asarray(x)
    axis = channel_axis(x.shape, axis)
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
            "(non-zero = real row), e.g. mask > 0.5 or mask.astype(bool)"
        )
    mask = jnp.asarray(mask)
    layout = mask_layout(mask.shape, x.shape, axis)
    # every mask dtype goes through the same int32 compare: XLA:CPU's fused reductions then get the
    # same code whatever the mask's dtype (a bool mask read directly vectorizes differently and moves
    # results by an ulp), so int masks give bit-for-bit the bool mask's results
    if mask.dtype.itemsize > 4:
        mask = mask != 0  # a 64-bit int would wrap to 0 when narrowed (2**32 -> 0)
    m = (mask.astype(jnp.int32) != 0).reshape(layout)
    target = tuple(x.shape[a] if a != axis or layout[axis] != 1 else 1 for a in range(x.ndim))
    return x, jnp.broadcast_to(m, target), axis


def _psum(tree, cfg: _Config):
    if cfg.axis_name is None:
        return tree
    return jax.lax.psum(tree, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)


def _psum_count(n_local, cfg: _Config):
    """The replicas' total count, in a psum of its own: jax 0.8.1 cannot transpose a psum
    that mixes the (integer, non-differentiable) count with a differentiated sum."""
    return _psum(n_local, cfg)


def _sel(m, a, b):
    """``where(m, a, b)``, or ``a`` when there is no mask (every row real)."""
    return a if m is None else jnp.where(m, a, b)


def _count(x, m, cfg: _Config):
    """Real positions per channel (broadcastable to x), counted in int32 (exact to 2**31)."""
    if m is None:
        return jnp.full((1,) * x.ndim, int(np.prod([x.shape[a] for a in cfg.axes])), jnp.int32)
    return jnp.sum(m, axis=cfg.axes, keepdims=True, dtype=jnp.int32)


def _shift(xc, m, n_local, cfg: _Config):
    """Per channel, the value of the first real position of x (0 where there is none): the
    shift of the first pass of :func:`_moments`. A constant for autodiff (the moments do not depend on it)."""
    if m is None:
        first = tuple(slice(None) if a == cfg.axis else slice(0, 1) for a in range(xc.ndim))
        return jax.lax.stop_gradient(xc[first])
    channels = xc.shape[cfg.axis]
    rest = tuple(d for a, d in enumerate(xc.shape) if a != cfg.axis)
    if m.shape[cfg.axis] == 1:
        # one flag per position: one argmax over the mask, shared by every channel
        flat = jnp.argmax(m.reshape(-1))
    else:
        flat = jnp.argmax(jnp.moveaxis(m, cfg.axis, 0).reshape(channels, -1), axis=1)
    coords = iter(jnp.unravel_index(flat.astype(jnp.int32), rest))
    idx = tuple(jnp.arange(channels) if a == cfg.axis else next(coords) for a in range(xc.ndim))
    shift = xc[idx].reshape(cfg.bshape)
    return jax.lax.stop_gradient(jnp.where(n_local > 0, shift, 0))


def _moments(xc, m, cfg: _Config):
    """Shifted by a real row, then re-centred: ``(n, centre, e, mean, delta, var)`` per channel
    (``centre`` the re-centring point, ``e = x - centre`` on real rows and 0 on padded ones,
    ``delta = mean - centre``).

    Pass 1 reduces ``sum(x - shift)`` with ``shift`` a real row's value, so
    ``x - shift`` is of the size of the spread even for |mean| >> std, giving
    ``centre = shift + sum(x - shift) / n``. That sum's rounding grows with
    |shift - mean|, so pass 2 re-centres: ``e = x - centre`` is of the size of
    the spread around ~the mean, one fused reduction gives ``sum e`` and
    ``sum e^2``, and ``mean = centre + sum e / n``, ``var = sum e^2 / n -
    (sum e / n)^2`` keep the error of the mean at the spread's rounding (as
    two-pass) and the variance's relative accuracy at |mean| / std of 1e6.
    ``centre`` is a constant for autodiff: both moments are exact identities in
    it. Under ``axis_name`` the centre comes from psums of (n, n * shift +
    sum(x - shift)) and pass 2's sums are psummed, so every device holds the
    same statistics.
    """
    n_local = _count(xc, m, cfg)
    shift = _shift(xc, m, n_local, cfg)
    nf_local = n_local.astype(cfg.compute_dtype)
    s = jnp.sum(_sel(m, xc - shift, 0), axis=cfg.axes, keepdims=True)
    if cfg.axis_name is None:
        n = n_local
        centre = shift + s / jnp.maximum(nf_local, 1)
    else:
        n, total = _psum_count(n_local, cfg), _psum(nf_local * shift + s, cfg)
        centre = total / jnp.maximum(n.astype(cfg.compute_dtype), 1)
    centre = jax.lax.stop_gradient(centre)
    e = _sel(m, xc - centre, 0)
    s1, s2 = _psum((jnp.sum(e, axis=cfg.axes, keepdims=True), jnp.sum(e * e, axis=cfg.axes, keepdims=True)), cfg)
    denom = jnp.maximum(n.astype(cfg.compute_dtype), 1)
    delta = s1 / denom
    var = s2 / denom - jnp.square(delta)
    return n, centre, e, centre + delta, delta, jnp.maximum(var, 0)


def _vec(v, cfg: _Config):
    """A per-channel (C,) vector in the compute dtype, shaped to broadcast against x."""
    return None if v is None else v.astype(cfg.compute_dtype).reshape(cfg.bshape)


def _gain_offset(r, scale, bias, centre):
    """``y = (x - c) * gain + offset`` with ``gain = scale * r``, ``offset = bias - centre * gain``."""
    gain = r if scale is None else r * scale
    offset = -centre * gain
    return gain, offset if bias is None else offset + bias


def _train(cfg: _Config, x, m, scale, bias, moving_mean, moving_var):
    """The training forward; plain JAX, so every derivative (reverse, forward, higher order) is
    autodiff's. The differentiable path only ever sees real rows (``e`` is 0 on padded rows) and
    padded output rows go through ``stop_gradient``: padded values never reach a derivative."""
    xc = x.astype(cfg.compute_dtype)
    n, centre, e, mean, delta, var = _moments(xc, m, cfg)
    has = n > 0  # per channel; none real: normalize with the moving stats (no Python branch)
    r = jax.lax.rsqrt(jnp.where(has, var, _vec(moving_var, cfg)) + cfg.epsilon)
    # real rows: (x - mean) * gain + bias as (e - delta) * gain + bias; delta is 0 where has is False
    gain, offset = _gain_offset(r, _vec(scale, cfg), _vec(bias, cfg), delta)
    real = e * gain + offset
    if m is None:
        y = real
    elif cfg.zero_padded:
        y = jnp.where(m, real, 0)
    else:
        centre = jnp.where(has, centre, _vec(moving_mean, cfg))
        y = jnp.where(m, real, jax.lax.stop_gradient((xc - centre) * gain + offset))
    return y, mean, var, n


def _train_two_pass(cfg: _Config, x, m, scale, bias, moving_mean, moving_var):
    """An independent formulation for the tests: the textbook two-pass moments (mean, then
    squares around it), normalized around the mean. Same contract, different arithmetic."""
    xc = x.astype(cfg.compute_dtype)
    n_local = _count(xc, m, cfg)
    n, total = _psum_count(n_local, cfg), _psum(jnp.sum(_sel(m, xc, 0), axis=cfg.axes, keepdims=True), cfg)
    denom = jnp.maximum(n, 1).astype(cfg.compute_dtype)
    mean = total / denom
    dm = _sel(m, xc - mean, 0)
    q, c = _psum((jnp.sum(dm * dm, axis=cfg.axes, keepdims=True), jnp.sum(dm, axis=cfg.axes, keepdims=True)), cfg)
    var = jnp.maximum(q / denom - jnp.square(c / denom), 0)
    has = n > 0
    mu = jnp.where(has, mean, _vec(moving_mean, cfg))
    r = jax.lax.rsqrt(jnp.where(has, var, _vec(moving_var, cfg)) + cfg.epsilon)
    return _output(cfg, xc, m, mu, r, _vec(scale, cfg), _vec(bias, cfg)), mean, var, n


def _output(cfg: _Config, xc, m, mu, r, scale, bias):
    """``(x - mu) * r * scale + bias``, centred first (folding ``mu`` into the offset would cancel
    catastrophically for |mean| >> std); padded rows are constants for autodiff."""
    gain, offset = _gain_offset(r, scale, bias, 0)
    real = (_sel(m, xc, mu) - mu) * gain + offset
    if m is None:
        return real
    padded = jnp.zeros((), real.dtype) if cfg.zero_padded else jax.lax.stop_gradient((xc - mu) * gain + offset)
    return jnp.where(m, real, padded)


def _eval(cfg: _Config, x, m, scale, bias, moving_mean, moving_var):
    r = jax.lax.rsqrt(_vec(moving_var, cfg) + cfg.epsilon)
    return _output(cfg, x.astype(cfg.compute_dtype), m, _vec(moving_mean, cfg), r, _vec(scale, cfg), _vec(bias, cfg))


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
    unbiased_var: bool = False,
    dtype: Any = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> tuple[Array, State]:
    """Batch norm whose batch statistics come only from the real rows of ``x``.

    Args:
      x: float16, bfloat16, float32 or float64 input with a channel axis
        (complex input raises TypeError). A dimension of size 0 gives an empty
        output and the state unchanged.
      mask: bool or integer array, non-zero = real; ``None`` means every row is
        real (plain BN). Shapes (see :func:`mask_layout`): x's shape without the
        channel axis or with it set to 1; ``x.shape[:-1]`` (Keras); any shape of
        x's rank that broadcasts to x (Flax). Where the mask varies along the
        channel axis the statistics are per channel over that channel's real
        positions, and a channel with none keeps its moving stats and is
        normalized with them.
      params: ``{"scale": (C,), "bias": (C,)}``; either key may be absent
        (``use_scale`` / ``use_bias`` off). See :func:`init`.
      state: ``{"mean": (C,), "var": (C,)}``, the moving statistics (Flax's
        ``batch_stats``).
      training: Python bool. True: normalize with the statistics of the real
        rows and return updated moving stats; when no row is real, normalize
        with the moving stats and leave them unchanged. False: normalize with
        the moving stats, return the state unchanged.
      momentum: Flax convention, the decay: ``moving = momentum * moving +
        (1 - momentum) * batch``.
      epsilon: added to the variance before ``rsqrt``.
      axis: the channel axis of ``x``.
      padded_output: ``"normalize"`` (padded rows normalized like real ones)
        or ``"zero"`` (padded rows exactly 0).
      unbiased_var: the moving variance's convention. False (Flax's, Keras'):
        the population variance of the batch; True (PyTorch's): ``n / (n - 1)``
        times it, n the real count (the factor is 1 for n = 1). Normalization
        always uses the population variance.
      dtype: the output dtype; None: x's dtype.
      axis_name: under ``shard_map``/``pmap``, the mapped axis to merge the
        statistics over with count weights (``psum``), so uneven (even empty)
        shards give the statistics of the unsharded batch.
      axis_index_groups: as for ``jax.lax.psum``.

    Returns:
      ``(y, new_state)``: the moving stats keep the dtype of ``state``.
      Statistics and the normalization are computed in float32 (float64 if
      ``x`` or the state is float64), shifted by a real row, then re-centred on
      the shifted mean in a second pass (accurate for |mean| / std up to 1e6
      and beyond, and as accurate as two-pass for a mean near 0).

    Every derivative is autodiff's (``grad``, ``jvp``, ``hessian``, ...).
    Padded output rows are constants for autodiff: ``d y / d x`` is exactly 0
    on padded rows, and padded values (NaN, Inf, ...) never reach real outputs,
    the moving stats, or any derivative.

    Raises:
      TypeError: integer or complex ``x``, float ``mask``, non-bool ``training``.
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
        unbiased_var=unbiased_var,
        dtype=dtype,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
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
    unbiased_var=False,
    dtype=None,
    two_pass=False,
):
    """:func:`masked_batch_norm`; ``two_pass=True`` computes the training call with the
    textbook two-pass formulation instead (the tests' independent oracle)."""
    x, m, axis = _validate(x, mask, params, state, axis, padded_output, training)
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    if x.size == 0:
        # contract 1a: an empty batch is not an error; nothing to normalize, nothing learned
        return jnp.zeros(x.shape, out_dtype), dict(state)
    mm, mv = state["mean"], state["var"]
    compute_dtype = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), mm.dtype)
    groups = None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    cfg = _Config(
        axis=axis,
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
        return _eval(cfg, x, m, scale, bias, mm, mv).astype(out_dtype), dict(state)
    y, mean, var, n = (_train_two_pass if two_pass else _train)(cfg, x, m, scale, bias, mm, mv)
    has = n > 0
    if unbiased_var:
        nf = n.astype(compute_dtype)
        var = var * (nf / jnp.maximum(nf - 1, 1))

    def update(moving, batch):
        batch = batch.reshape(moving.shape).astype(compute_dtype)
        new = momentum * moving.astype(compute_dtype) + (1 - momentum) * batch
        return jnp.where(has.reshape(-1), new, moving).astype(moving.dtype)

    new_state = dict(state)
    new_state["mean"] = update(mm, mean)
    new_state["var"] = update(mv, var)
    return y.astype(out_dtype), new_state
