"""The maths of masked batch normalization, in `keras.ops` (every Keras backend).

- `broadcast_mask`: a caller's mask -> a bool mask of x's rank that broadcasts to x.
- `masked_moments`: per-channel count, shift, mean correction and population variance
  of the real positions, shifted by a real value of each channel so that neither the
  mean nor the variance loses accuracy at large |mean| / std or many rows.
- `masked_normalize`: y = gamma * (r * xhat + d) + beta with the masked-BN gradient
  (padded positions are constants for autodiff), as one `custom_gradient`.

The layer (`maskbn_tf.layer`) does the bookkeeping: validation, variables, updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

ReplicaSum = Callable[..., tuple]


def local_sum(*tensors):
    """The replica sum of a single device: the identity."""
    return tensors


def shape_of(t):
    """t's dims: its static shape where every dim is known (no op to run), else ``ops.shape``
    (a tensor for each unknown dim). Keras' ``ops.shape`` runs a Shape op even in eager mode."""
    static = tuple(t.shape)
    return static if None not in static else ops.shape(t)


def reshape(t, shape):
    """``ops.reshape``; nothing to run when t already has that static shape.

    In TensorFlow's eager mode a shape passed as a tuple misses the fast path of the op
    call and takes a fallback that converts it first: 188 against 70 us per reshape on
    the CI machine, for the 20 reshapes of a training call. An int32 array takes the fast
    path, so an all-int shape goes to TensorFlow as one."""
    shape = tuple(shape)
    if not all(isinstance(d, int) for d in shape):
        return ops.reshape(t, shape)
    if tuple(t.shape) == shape:
        return t
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly():
            return tf.reshape(t, np.asarray(shape, dtype=np.int32))
    return ops.reshape(t, shape)


def _dims_broadcast(shape, target) -> bool:
    # None (unknown while tracing) fits anything; the runtime broadcast catches the rest.
    return len(shape) == len(target) and all(a is None or b is None or a == 1 or a == b for a, b in zip(shape, target))


def _dims_equal(shape, target) -> bool:
    return len(shape) == len(target) and all(a is None or b is None or a == b for a, b in zip(shape, target))


def broadcast_mask(mask, x_shape, axis: int):
    """``mask`` (bool or integer, already a tensor) as a bool tensor of rank(x) that broadcasts to x.

    Accepted, in this order of precedence (contract 1a, `reference.mask_elements`):
    (a) x's shape without its channel axis ``axis``;
    (b) Keras' convention: rank(x) - 1 dims that broadcast to ``x.shape[:-1]`` (the leading
        axes), broadcast over the last axis too;
    (c) rank(x) dims that broadcast to x (size 1 or C on the channel axis).
    (a) is an exact shape; (a) wins where both fit (an ambiguous shape, channel axis not last);
    ``x.shape[:-1] + (1,)`` states (b) unambiguously.
    """
    x_shape = tuple(x_shape)
    m_shape = tuple(mask.shape)
    rank = len(x_shape)
    without_channel = x_shape[:axis] + x_shape[axis + 1 :]
    leading = x_shape[:-1]
    if len(m_shape) == rank - 1:
        if _dims_equal(m_shape, without_channel):
            mask = ops.expand_dims(mask, axis)
        elif _dims_broadcast(m_shape, leading):
            mask = ops.expand_dims(mask, -1)
        else:
            raise ValueError(
                f"mask shape {m_shape} does not fit x shape {x_shape}: a mask of rank {rank - 1} must "
                f"be {without_channel} (x without its channel axis {axis}) or broadcast to {leading} "
                f"(x's leading axes, Keras' convention), or have rank {rank} and broadcast to x"
            )
    elif len(m_shape) != rank or not _dims_broadcast(m_shape, x_shape):
        raise ValueError(
            f"mask shape {m_shape} does not fit x shape {x_shape}: expected rank {rank - 1} "
            f"(x without its channel axis {axis}, or x's leading axes {leading}) or rank {rank} "
            "broadcastable to x"
        )
    if keras.backend.standardize_dtype(mask.dtype) != "bool":
        mask = ops.not_equal(mask, 0)
    return mask


def _in_xla() -> bool:
    """True while TensorFlow traces for XLA (`tf.function(jit_compile=True)`, or inside one)."""
    if keras.config.backend() != "tensorflow":
        return False
    import tensorflow as tf

    if tf.executing_eagerly():
        return False
    try:  # a private TF module: without it, the blocked sum, whose blocks XLA folds into one reduce
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return False


# rows per block of `channel_sum`'s outer reduction
SUM_BLOCK = 128
SUM_LEVELS = 3  # 128**3 rows before the last sum adds block totals one after another


def channel_sum(t, axis: int):
    """Sum of t over every axis but ``axis`` (kept as size 1), accurate for millions of rows.

    A plain reduction over the outer axes adds each column's values one after another
    (TensorFlow/Eigen, XLA:CPU): a relative error of ~sqrt(n) ulps, 3e-5 at 2.6e5 rows.
    Here the inner axes (contiguous, reduced as a tree) go first, then the outer rows in
    blocks of SUM_BLOCK (a prefix slice on dim 0 aliases, so this reads t once); under
    XLA in two levels, see :func:`_xla_row_sum`.
    """
    rank = len(t.shape)
    shape = shape_of(t)
    channels = t.shape[axis]
    bshape = [channels if i == axis else 1 for i in range(rank)]
    inner = t.shape[axis + 1 :]
    if all(d == 1 for d in inner):  # channels last: a free reshape, no reduction
        rows = reshape(t, (-1, channels))
    else:
        rows = ops.sum(reshape(t, (_prod(shape[:axis]), channels, _prod(shape[axis + 1 :]))), axis=2)
    total = _xla_row_sum(rows, channels) if _in_xla() else _blocked_row_sum(rows, channels, SUM_LEVELS)
    return reshape(total, bshape)


def _xla_row_sum(rows, channels):
    """Column sums of (rows, channels) under XLA: float32 sums of SUM_BLOCK-row blocks, then
    a float64 sum of the block sums.

    XLA folds a reduce of a reduce into one reduce, so the blocks of `_blocked_row_sum`
    vanish there; the cast between the levels keeps them apart. Measured on the training
    step at (16, 4096, 64), CPU: 5.6 ms, against 16.1 ms when every sum ran in float64 and
    11.0 ms with float64 for the backward's sums only (float32 alone lost sum(dy): 1.4e-5
    relative at 2.1e6 rows); variance 1.3e-7 relative and sum(dy) 3e-8 at 2.1e6 rows.
    """
    n = rows.shape[0] if rows.shape[0] is not None else shape_of(rows)[0]
    split = (n // SUM_BLOCK) * SUM_BLOCK
    blocks = ops.sum(reshape(rows[:split], (n // SUM_BLOCK, SUM_BLOCK, channels)), axis=1)
    tail = ops.sum(rows[split:], axis=0)  # fewer than SUM_BLOCK rows (none when n divides)
    total = ops.sum(ops.cast(blocks, "float64"), axis=0) + ops.cast(tail, "float64")
    return ops.cast(total, rows.dtype)


def _blocked_row_sum(rows, channels, levels: int):
    """Column sums of (rows, channels): each level adds runs of SUM_BLOCK rows, so no
    value joins a running sum longer than SUM_BLOCK. Runs of 2048 were too long for
    quantized data (bfloat16 input centred off its grid): the rounding of equal terms
    is biased, not random, and 65536 rows carried 1.1e-5 relative error."""
    if levels == 0:
        return ops.sum(rows, axis=0)
    static_rows = rows.shape[0]
    if static_rows is not None and static_rows <= SUM_BLOCK:
        return ops.sum(rows, axis=0)
    if static_rows is not None and static_rows % SUM_BLOCK == 0:
        partial = ops.sum(reshape(rows, (static_rows // SUM_BLOCK, SUM_BLOCK, channels)), axis=1)
        return _blocked_row_sum(partial, channels, levels - 1)
    blocks = shape_of(rows)[0] // SUM_BLOCK
    split = blocks * SUM_BLOCK
    partial = ops.sum(reshape(rows[:split], (blocks, SUM_BLOCK, channels)), axis=1)
    return _blocked_row_sum(partial, channels, levels - 1) + ops.sum(rows[split:], axis=0)


def _prod(values):
    out = 1
    for v in values:
        out = out * v
    return out


def real_count(mask, x, axis: int):
    """Per-channel number of real positions, int32, shaped like ``mask`` reduced over the non-channel axes."""
    red = tuple(i for i in range(len(x.shape)) if i != axis)
    if mask is None:
        return reshape(ops.cast(_prod(shape_of(x)[i] for i in red), "int32"), [1] * len(x.shape))
    count = ops.sum(ops.cast(mask, "int32"), axis=red, keepdims=True)
    # a size-1 mask dim broadcasts over x's dim: each of its values counts that many times
    x_dims = shape_of(x)
    repeats = _prod(x_dims[i] for i in red if mask.shape[i] == 1 and x.shape[i] != 1)
    return count * ops.cast(repeats, "int32")


def first_real_value(x, mask, axis: int, fallback):
    """Per channel (shaped like ``fallback``, 1 except on ``axis``), x at the channel's first real
    position, or ``fallback`` where the channel has none. Costs a pass over the mask, not over x."""
    shape = shape_of(x)
    rank = len(x.shape)
    channels = x.shape[axis]
    pre = _prod(shape[:axis])
    post = _prod(shape[axis + 1 :])
    if mask is None:
        flat = ops.arange(channels, dtype="int32") * ops.cast(post, "int32")
        has = None
    else:
        m_channels = mask.shape[axis]  # 1, or C where the mask varies along the channel axis
        m_dims = list(shape)
        m_dims[axis] = m_channels
        m = mask if tuple(mask.shape) == tuple(m_dims) else ops.broadcast_to(mask, m_dims)
        m = reshape(ops.cast(m, "int32"), (pre, m_channels, post))
        if m_channels != 1:  # moving a size-1 axis first changes no order: the reshape alone does it
            m = ops.transpose(m, (1, 0, 2))
        m = reshape(m, (m_channels, -1))
        index = ops.cast(ops.argmax(m, axis=1), "int32")  # the first maximum: the first real position
        has_shape = [m_channels if i == axis else 1 for i in range(rank)]
        has = reshape(ops.greater(ops.max(m, axis=1), 0), has_shape)
        post32 = ops.cast(post, "int32")
        flat = (index // post32) * (channels * post32) + ops.arange(channels, dtype="int32") * post32 + index % post32
    value = reshape(ops.take(reshape(x, (-1,)), flat), shape_of(fallback))
    if has is None:
        return value
    return ops.where(has, value, fallback)


class Moments(NamedTuple):
    """Statistics of the real positions, per channel (shaped to broadcast against x).

    The mean is ``shift + delta`` (kept apart: ``shift`` is a value of x, so ``x - shift``
    is exact for values near it, and ``delta`` is small); ``centered`` is ``x - shift``
    for every position and ``centered_real`` the same, 0 at padded positions.
    """

    count: Any  # float, >= 0
    shift: Any
    delta: Any
    variance: Any  # population
    centered: Any
    centered_real: Any


def masked_moments(x, mask, axis: int, fallback_shift, replica_sum: ReplicaSum = local_sum) -> Moments:
    """Masked per-channel moments of x (float32 or float64), accurate at scale.

    Shifted by a real value s of each channel (a value of the data, so x - s is of
    the size of the spread, not of |mean|): pass 1 gives m1 = s + sum(x - s)/n; pass 2,
    with d = x - m1 on the real positions, gives mean = m1 + sum(d)/n and
    var = sum(d^2)/n - (sum(d)/n)^2. The mean is within about an ulp of the exact one
    and the variance keeps its relative accuracy at |mean| / std of 1e6 and millions
    of rows (interface decision 5); the second pass keeps the error of the mean at the
    size of the spread's rounding even when s is far from the mean. ``replica_sum``
    sums over the replicas that share the statistics; they share one shift, the mean
    of the replicas' shifts (replicas without any real position leave it out).
    Channels without any real position get ``fallback_shift`` as shift, delta 0 and
    variance 0 (their count is 0: callers select their fallback statistics).
    """
    dtype = x.dtype
    count = ops.cast(real_count(mask, x, axis), dtype)
    shift = first_real_value(x, mask, axis, fallback_shift)
    if replica_sum is not local_sum:
        has = ops.cast(ops.greater(count, 0), dtype) * ops.ones_like(shift)
        replicas_with_rows, shift_sum = replica_sum(has, ops.where(ops.greater(has, 0), shift, 0.0))
        shift = ops.where(ops.greater(replicas_with_rows, 0), shift_sum / ops.maximum(replicas_with_rows, 1.0), shift)
    # pass 1: the mean about the shift; its error scales with |shift - mean|, so pass 2
    # re-centres on it and corrects both moments by its (small) residual
    count = replica_sum(count * ops.ones_like(shift))[0] if replica_sum is not local_sum else count
    first = x - shift
    first = first if mask is None else ops.where(mask, first, 0.0)
    (sum_first,) = replica_sum(channel_sum(first, axis))
    shift = shift + sum_first / ops.maximum(count, 1.0)
    centered = x - shift
    centered_real = centered if mask is None else ops.where(mask, centered, 0.0)
    sum_d = channel_sum(centered_real, axis)
    sum_dd = channel_sum(ops.square(centered_real), axis)
    sum_d, sum_dd = replica_sum(sum_d, sum_dd)
    count = count * ops.ones_like(shift)
    n_safe = ops.maximum(count, 1.0)
    delta = sum_d / n_safe
    variance = ops.maximum(sum_dd / n_safe - ops.square(delta), 0.0)
    return Moments(count, shift, delta, variance, centered, centered_real)


def _nested_tape_active() -> bool:
    """True while TensorFlow records this backward pass for a higher-order derivative."""
    if keras.config.backend() != "tensorflow":
        return False
    from tensorflow.python.eager import record

    return record.could_possibly_record()


def masked_normalize(
    x,
    mask,
    shift,
    delta,
    variance,
    params: dict,
    *,
    axis: int,
    epsilon: float,
    count=None,
    centered=None,
    centered_real=None,
    renorm=None,
    zero_padded: bool = False,
    replica_sum: ReplicaSum = local_sum,
):
    """y = gamma * (r * xhat + d) + beta, xhat = (x - shift - delta) / sqrt(variance + epsilon).

    ``params`` maps "gamma" / "beta" to tensors (absent: 1 / 0). ``renorm`` is None or the
    batch-renormalization corrections (r, d), constants as in Keras. With ``count``
    (training), shift/delta/variance are the batch statistics of the real positions and the
    gradient includes their dependence on x (summed over replicas with ``replica_sum``);
    without it they are constants (the moving statistics). Padded positions are constants
    for autodiff: zero gradient, and no gradient reaches gamma, beta or the statistics
    through them; NaN/Inf there never reaches anything but their own output.

    Second order: under TensorFlow, a backward pass that an outer tape records (nested
    GradientTape) is computed by differentiating plain ops (the statistics as functions of
    x), so the second derivatives are right. On Keras' torch backend a recorded backward
    (create_graph=True) raises, since its custom-function backward cannot be differentiated.
    """
    rank = len(x.shape)
    red = tuple(i for i in range(rank) if i != axis)
    bshape = [1] * rank
    bshape[axis] = x.shape[axis]
    names = [k for k in ("gamma", "beta") if params.get(k) is not None]
    r_renorm, d_renorm = (None, None) if renorm is None else renorm
    if centered is None:
        centered = x - shift
    training = count is not None

    def real_or(a, b):
        return a if mask is None else ops.where(mask, a, b)

    def per_channel(v):
        return reshape(ops.cast(v, x.dtype), bshape)

    def affine(gamma, beta, rsqrt):
        """(factor, offset): y = (x - shift - delta) * factor + offset."""
        g = 1.0 if gamma is None else gamma
        factor = rsqrt * g if r_renorm is None else rsqrt * r_renorm * g
        offset = 0.0 if d_renorm is None else d_renorm * g
        if beta is not None:
            offset = offset + beta
        return factor, offset

    def plain_forward(x, *values):
        """The same function in differentiable ops: statistics recomputed from x (for second order)."""
        p = dict(zip(names, (per_channel(v) for v in values)))
        x_real = real_or(x, shift)  # padded positions: a finite constant, no gradient
        c = real_or(x_real - shift, 0.0)
        if training:
            n, s, ss = replica_sum(count, ops.sum(c, axis=red, keepdims=True), ops.sum(c * c, axis=red, keepdims=True))
            n_safe = ops.maximum(n, 1.0)
            dlt = s / n_safe
            var = ops.where(ops.greater(n, 0), ops.maximum(ss / n_safe - dlt * dlt, 0.0), variance)
            dlt = ops.where(ops.greater(n, 0), dlt, delta)
        else:
            dlt, var = delta, variance
        factor, offset = affine(p.get("gamma"), p.get("beta"), ops.rsqrt(var + epsilon))
        y_real = (x_real - shift - dlt) * factor + offset
        return real_or(y_real, 0.0)

    @ops.custom_gradient
    def normalize(x, *values):
        p = dict(zip(names, (per_channel(v) for v in values)))
        rsqrt = ops.rsqrt(variance + epsilon)
        factor, offset = affine(p.get("gamma"), p.get("beta"), rsqrt)
        # x - shift first (exact near the data), the small delta folded into the offset
        y = centered * factor + (offset - delta * factor)
        if zero_padded:
            y = real_or(y, 0.0)

        def grad(*args, upstream=None):
            dy = args[0] if upstream is None else upstream
            dy = ops.cast(dy, x.dtype)
            if keras.config.backend() == "torch":
                import torch

                if torch.is_grad_enabled():
                    raise NotImplementedError(
                        "MaskedBatchNormalization on Keras' torch backend has no second derivative "
                        "(its gradient is a custom autograd function); use the TensorFlow or JAX backend, "
                        "or maskbn_torch, for double backward"
                    )
            if _nested_tape_active():
                import tensorflow as tf

                with tf.GradientTape() as inner:
                    inner.watch([x, *values])
                    y_plain = plain_forward(x, *values)
                grads = inner.gradient(y_plain, [x, *values], output_gradients=dy)
                return tuple(ops.zeros_like(v) if g is None else g for g, v in zip(grads, [x, *values]))
            # Padded rows are constants: their dy never counts, and xhat is computed from the
            # centred values that are 0 there, so NaN/Inf garbage cannot reach any product.
            dy_real = real_or(dy, 0.0)
            c_real = real_or(centered, 0.0) if centered_real is None else centered_real
            s1 = channel_sum(dy_real, axis)
            # sum(dy * xhat) = (sum(dy * c) - delta * sum(dy)) * rsqrt
            s2 = (channel_sum(dy_real * c_real, axis) - delta * s1) * rsqrt
            if training:
                # Batch statistics depend on every real position (of every replica). A channel
                # without any has dy_real, s1 and s2 all 0 there: its gradient is all zeros.
                all_s1, all_s2 = replica_sum(s1, s2)
                n_safe = ops.maximum(count, 1.0)
                k = factor * rsqrt * all_s2 / n_safe
                dx = dy_real * factor - c_real * k + (delta * k - factor * all_s1 / n_safe)
            else:
                dx = dy_real * factor
            dx = real_or(dx, 0.0)
            # gamma/beta get this replica's share; the optimizer sums the replicas' gradients.
            grads = [dx]
            for name, value in zip(names, values):
                if name == "gamma":
                    g = s2 if r_renorm is None else s2 * r_renorm + s1 * d_renorm
                else:
                    g = s1
                grads.append(ops.cast(reshape(g, value.shape), value.dtype))
            return tuple(grads)

        return y, grad

    return normalize(x, *[params[k] for k in names])
