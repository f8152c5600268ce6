"""Functional masked batch normalization: the core that :class:`maskbn_torch.MaskedBatchNorm` calls.

Batch statistics come only from the real positions of a padded batch (``mask != 0``).
Everything here is plain tensor code without Python branching on tensor values, so
it runs unchanged under ``torch.compile`` (fullgraph), ``torch.export``, autocast
and on any device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ChannelMismatchError

__all__ = ["PADDED_OUTPUTS", "masked_batch_norm"]

#: accepted values of ``padded_output``
PADDED_OUTPUTS = ("normalize", "zero")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the name error messages use."""
    return str(dtype).removeprefix("torch.")


def _shape(t: Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in (t.shape if isinstance(t, Tensor) else t))


def _resolve_channel_axis(x: Tensor, channel_axis: int) -> int:
    rank = x.dim()
    if not -rank <= channel_axis < rank:
        raise ValueError(f"channel_axis {channel_axis} is out of range for x of rank {rank} (x shape {_shape(x)})")
    return channel_axis % rank


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype, got dtype {dtype_name(x.dtype)}")
    if x.dim() < 1:
        raise ValueError(f"x must have a channel axis, got a 0-dim tensor (x shape {_shape(x)})")


def _broadcasts(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Same rank, each dim 1 or target's (sizes compared as they are: symbolic ones stay symbolic)."""
    return len(shape) == len(target) and all(m in (1, t) for m, t in zip(shape, target))


def _prepare_mask(mask: Tensor | None, x: Tensor, axis: int) -> Tensor | None:
    """Validate ``mask`` and return it as a bool tensor of x's rank that broadcasts to x.

    Accepted (contract 1a), tried in this order, so the ambiguous rank(x) - 1 shape reads as (a):
    (a) x's shape without the channel axis; (b) x's leading axes, ``x.shape[:-1]`` or a
    shape that broadcasts to it (Keras' convention, broadcast over the last axis); (c) a
    mask of x's rank that broadcasts to x (Flax's convention; it may vary along the channel
    axis: then each channel has its own real positions). The result's channel dim is 1 or C; its other dims are x's.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"mask must be bool or an integer dtype (non-zero means real), got dtype {dtype_name(mask.dtype)}; "
            "make a bool mask first, e.g. `mask > 0` or `mask.bool()`"
        )
    # compare torch.Size objects, not ints: int() would pin symbolic sizes under torch.export
    without = x.shape[:axis] + x.shape[axis + 1 :]
    keep = x.shape[:axis] + (1,) + x.shape[axis + 1 :]
    if mask.shape == without:
        mask = mask.unsqueeze(axis)
    elif _broadcasts(mask.shape, x.shape[:-1]):
        mask = mask.unsqueeze(-1)
    elif not _broadcasts(mask.shape, x.shape):
        raise ValueError(
            f"mask shape {_shape(mask)} does not fit x shape {_shape(x)} with channel axis {axis}: "
            f"expected {_shape(without)} (x without the channel axis), {_shape(x.shape[:-1])} (x's leading "
            f"axes) or a broadcast of it, or a shape of x's rank that broadcasts to it, such as {_shape(keep)}"
        )
    # every dim but the channel one as x's (counts sum over them); the channel dim stays 1 or C
    channel = 1 if mask.shape[axis] == 1 else x.shape[axis]
    mask = mask.expand(x.shape[:axis] + (channel,) + x.shape[axis + 1 :])
    return mask if mask.dtype == torch.bool else mask != 0


# the integer type of each float type's width, for the bitwise select below
_BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _keep_bits(m: Tensor, dtype: torch.dtype) -> Tensor:
    """All bits set on real positions, 0 on padded ones, in the integer type of ``dtype``'s width."""
    return m.to(_BITS[dtype]).neg_()


def _select(t: Tensor, keep: Tensor, *, inplace: bool) -> Tensor:
    """``where(mask, t, +0.0)``, bit for bit, as an AND of t's bits with ``keep``.

    A select, never ``t * mask`` (NaN * 0 is NaN): padded NaN/Inf become exactly +0.0
    and real values keep every bit. On CPU a bool-conditioned where/masked_fill is
    about 5x slower than this vectorized integer AND, and it runs several times per
    call, so it decides a large part of the cost relative to native batch norm.
    """
    if torch.compiler.is_compiling():
        # inductor vectorizes a select but not the bit-cast below, which compiles to
        # scalar loops (training step 2.4x native BN instead of 0.8x, benchmarks/README.md).
        # masked_fill writes +0.0, the same bits as the AND.
        padded = keep == 0
        return t.masked_fill_(padded, 0.0) if inplace else t.masked_fill(padded, 0.0)
    bits = t.view(keep.dtype)
    return bits.bitwise_and_(keep).view(t.dtype) if inplace else bits.bitwise_and(keep).view(t.dtype)


def _all_reduce_sum(group: Any, *parts: Tensor) -> tuple[Tensor, ...]:
    """Sum each tensor over ``group`` in one collective; a no-op without a group."""
    if group is None:
        return parts
    flat = torch.cat([p.reshape(-1) for p in parts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return tuple(chunk.reshape(p.shape) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts))


def _reduction_dtype(acc: torch.dtype, device: torch.device) -> torch.dtype:
    """The accumulator of every sum over the positions.

    Eager ATen sums are cascaded (CPU) or tree-shaped (CUDA): float32 keeps about one ulp
    over 2^24 terms. Inductor's generated reductions accumulate each lane sequentially,
    which loses the mean (13 sigma at offset 1e4 over 262k rows, issue 12), so compiled
    code accumulates in float64 (not available on MPS: float32 there).
    """
    if acc == torch.float32 and torch.compiler.is_compiling() and device.type != "mps":
        return torch.float64
    return acc


def _runs_eagerly(x: Tensor) -> bool:
    """Whether this call runs op by op on real data, where data-dependent shapes and host
    reads are fine: not traced (torch.compile, torch.export) and not on the meta device."""
    return not torch.compiler.is_compiling() and x.device.type != "meta"


def _rows_2d(t: Tensor) -> Tensor | None:
    """``t`` (channel axis last) as a (positions, C) view, or None where its layout has none.

    The leading dims merge into one where each (of size > 1) steps by the next one's extent,
    checked on the strides first: a failed ``view`` raises, and that costs about 30 us, which
    channels-first calls paid several times each.
    """
    if not t.is_contiguous():
        lead = [(size, step) for size, step in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
        if any(step != size * next_step for (_, step), (size, next_step) in itertools.pairwise(lead)):
            return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # the strides allowed it, the view did not (a zero-size t)
        return None


def _samples_3d(t: Tensor, axis: int) -> Tensor | None:
    """``t`` as an (N, C, L) view with the channel axis second (channels first), or None."""
    if axis == 0 or t.dim() < 2:
        return None
    t3 = t.movedim(axis, 1)
    return t3.view(t.shape[0], t.shape[axis], -1) if t3.is_contiguous() and t3.numel() > 0 else None


def _masked_samples(x: Tensor, m: Tensor | None, axis: int, group: Any) -> tuple[Tensor, Tensor | None] | None:
    """Eager channels-first work in chunks of samples: x as (N, C, L) and the mask as
    (N, 1, L) (None: every position real), or None where x has no such view or the mask
    varies along the channel axis (and in compiled code, or with a process group)."""
    if group is not None or not _runs_eagerly(x) or (m is not None and m.shape[axis] != 1):
        return None
    x3 = _samples_3d(x, axis)
    if x3 is None:
        return None
    return x3, None if m is None else m.movedim(axis, 1).reshape(x3.shape[0], 1, x3.shape[2])


def _gathers_rows(x: Tensor, m: Tensor | None, axis: int, group: Any) -> bool:
    """Whether eager work happens on the gathered real rows, (n, C), with fused ATen kernels.

    Eager only (the row count is data dependent; compiled code uses selects), for masks
    constant along the channel axis; unmasked inputs only where they already are rows
    (channels last). On this path the statistics are cascaded ATen sums of the n real rows
    and the backward is native batch norm's own kernel on those rows.
    """
    if not _runs_eagerly(x) or group is not None:
        return False
    if m is None or _samples_3d(x, axis) is not None:
        return _rows_2d(x.movedim(axis, -1)) is not None and (m is None or m.shape[axis] == 1)
    return m.shape[axis] == 1


def _records_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call: grad mode on and some input requiring grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _mask_is_moot(
    m: Tensor,
    x: Tensor,
    axis: int,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    padded_output: str,
    process_group: Any,
) -> tuple[bool, Tensor | None]:
    """Whether the mask changes nothing this call computes, so it can run unmasked; and the
    real rows' index (:func:`_real_index`) where this call found it, else None.

    Inference that normalizes padded rows and records no derivative (padded rows are
    constants for autodiff, so a gradient would see the mask); or an eager call without a
    process group whose every position is real (measured 5.6x native BN at 0 % padding with
    a gather and a scatter of every row). Where the eager work gathers rows, that test is the
    length of the index the gather needs anyway (one host read, no separate ``m.all()``).
    """
    tensors = [t for t in (x, weight, bias) if t is not None]
    if _forward_mode_active(m, *tensors):
        return False, None  # a tangent or a vmapped mask: no host read, keep the masked path
    if not training and padded_output == "normalize":
        if not _records_graph(*tensors):
            return True, None
    if process_group is not None or not _runs_eagerly(x):
        return False, None
    if _gathers_rows(x, m, axis, None) and _rows_2d(x.movedim(axis, -1)) is not None:
        index = _real_index(m, axis)
        moot = index.shape[0] == m.numel() // m.shape[axis]
        return moot, None if moot else index
    return bool(m.all()), None


def _real_index(m: Tensor, axis: int) -> Tensor:
    """The flat positions of the real rows (int64, in order): computed once per pass and
    shared by its gathers and its scatter (each nonzero is a host sync)."""
    return m.squeeze(axis).reshape(-1).nonzero().squeeze(1)


def _real_rows(t: Tensor, m: Tensor | None, axis: int, index: Tensor | None = None) -> Tensor:
    """(n, C): t's real positions, channel last, in position order (a view when ``m`` is None).

    ``index``: :func:`_real_index` of ``m``, where the caller already has it.
    """
    tl = t.movedim(axis, -1)
    if m is None:
        return tl.reshape(-1, tl.shape[-1])
    rows = _rows_2d(tl)
    if rows is not None:
        # index_select copies whole rows: several times faster than boolean indexing
        return rows.index_select(0, _real_index(m, axis) if index is None else index)
    return tl[m.squeeze(axis)]


def _scatter_rows(rows: Tensor, like: Tensor, m: Tensor | None, axis: int, index: Tensor | None = None) -> Tensor:
    """The inverse of :func:`_real_rows`: ``rows`` at the real positions of a tensor of ``like``'s
    shape and dtype, 0 elsewhere (rows are cast before the scatter: n rows, not all)."""
    rows = rows.to(like.dtype)
    if m is None:
        return rows.view(like.movedim(axis, -1).shape).movedim(-1, axis)
    like_last = like.movedim(axis, -1)
    if _rows_2d(like_last) is None:
        out = torch.zeros_like(like)
        out.movedim(axis, -1)[m.squeeze(axis)] = rows
        return out
    # a gather of every position from the rows and one zero row: index_select copies whole
    # rows, several times faster than index_copy_ into a zeroed buffer (which writes each
    # element by index after a memset)
    flat = m.squeeze(axis).reshape(-1)
    source = torch.cat([rows, rows.new_zeros((1, rows.shape[1]))])
    inverse = torch.where(flat, flat.cumsum(0) - 1, rows.shape[0])
    return source.index_select(0, inverse).view(like_last.shape).movedim(-1, axis)


# bytes of one chunk of positions in the eager statistics: small enough that its temporaries
# stay in the last-level cache, large enough that the per-op overhead stays small
_CHUNK_BYTES = 2 << 20


def _chunk_step(per: int, acc: torch.dtype) -> int:
    """Leading-axis entries per chunk, ``per`` elements each in ``acc``: at least one."""
    return max(1, _CHUNK_BYTES // (per * acc.itemsize))


def _chunked_moments(
    src: Tensor, stat_shape: tuple[int, ...], acc: torch.dtype, m3: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, var) over the real positions of ``src``, in one read of them.

    ``src``: (positions, C) rows, all real, or (N, C, L) whose real positions are ``m3``
    (N, 1, L) (None: all; padded positions are selected away, :func:`_select`, so NaN/Inf
    there never enter a sum). Work goes chunk by chunk through a cache-sized buffer: no
    full-size temporary, and each position is read from memory once instead of the three
    to five times of a two-pass over the whole tensor (at (16, 4096, 64) unmasked, 2
    threads: 2.3 ms against 5.4 ms). Masked rows are gathered instead (:func:`_row_moments`):
    one gather and a two-pass on the n rows measured faster than gathering chunk by chunk.

    Shifted sums: with K the mean of the first chunk, d = x - K, mean = K + sum(d) / n and
    var = sum(d^2) / n - (sum(d) / n)^2, each sum cascaded (ATen's per chunk, then over the
    chunks). The subtraction loses the variance only as (mean - K)^2 / var grows; where
    that exceeds 1 (data not stationary: the first chunk is off by over one std) a second
    pass shifts by the mean just found, so float32 keeps about one ulp of the mean and 1e-5
    of the variance even when |mean| / std is 1e6 (never E[x^2] - E[x]^2).
    """
    n = src.shape[0]
    if src.dim() == 3:
        n = n * src.shape[2] if m3 is None else int(m3.sum())
    count = torch.full(stat_shape, n, dtype=acc, device=src.device)
    if n == 0:
        zero = torch.zeros(stat_shape, dtype=acc, device=src.device)
        return count, zero, zero
    dims = (0,) if src.dim() == 2 else (0, 2)
    per = src[0].numel()  # elements of one position (rows) or one sample (N, C, L)
    length = per // src.shape[1]  # positions per sample: 1 for rows
    total = src.shape[0]
    step = _chunk_step(per, acc)
    work = torch.empty((min(step, total), *src.shape[1:]), dtype=acc, device=src.device)
    starts = range(0, total, step)
    sums = torch.empty((2, len(starts), src.shape[1]), dtype=acc, device=src.device)
    kshape = (src.shape[1],) if src.dim() == 2 else (1, src.shape[1], 1)
    keep = None if m3 is None else _keep_bits(m3, acc)

    def shifted_sums(shift: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        for i, start in enumerate(starts):
            stop = min(total, start + step)
            part = src[start:stop]
            if shift is None and (keep is None or m3 is None):  # the first chunk's mean
                shift = (part.sum(dims, dtype=acc) / ((stop - start) * length)).reshape(kshape)
            elif shift is None:  # the first chunk's mean over its real positions (0 without any)
                assert keep is not None and m3 is not None
                first = _select(work[: stop - start].copy_(part), keep[start:stop], inplace=True)
                shift = (first.sum(dims) / m3[start:stop].sum(dtype=acc).clamp_(min=1)).reshape(kshape)
            if part.dtype == acc:
                d = torch.sub(part, shift, out=work[: stop - start])
            else:  # a cast, then a subtraction in acc: 2x faster than one mixed-dtype sub
                d = work[: stop - start].copy_(part).sub_(shift)
            if keep is not None:
                _select(d, keep[start:stop], inplace=True)
            torch.sum(d, dims, out=sums[0, i])
            torch.sum(d.square_(), dims, out=sums[1, i])
        assert shift is not None
        s1, s2 = sums.sum(1)
        return shift.reshape(-1), s1 / n, s2 / n

    shift, mean_d, mean_d2 = shifted_sums(None)
    var = mean_d2 - mean_d.square()
    if bool((mean_d.square() > var).any()):
        shift, mean_d, mean_d2 = shifted_sums((shift + mean_d).reshape(kshape))
        var = mean_d2 - mean_d.square()
    return count, (shift + mean_d).reshape(stat_shape), var.clamp_(min=0).reshape(stat_shape)


def _row_moments(
    rows: Tensor, owned: bool, stat_shape: tuple[int, ...], acc: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, var) of (n, C) real rows: the corrected two-pass of :func:`_batch_moments`.

    ``owned``: ``rows`` is a fresh copy (a gather) that may be modified in place.
    """
    n = rows.shape[0]
    count = torch.full(stat_shape, n, dtype=acc, device=rows.device)
    denom = max(n, 1)
    owned = owned or rows.dtype != acc
    rows = rows.to(acc)
    mean1 = rows.sum(0) / denom
    d = rows.sub_(mean1) if owned else rows - mean1
    shift = d.sum(0) / denom
    sum_d2 = d.square_().sum(0)  # d is a fresh buffer either way
    var = (sum_d2 / denom - shift.square()).clamp_(min=0)
    return count, (mean1 + shift).reshape(stat_shape), var.reshape(stat_shape)


def _batch_moments(
    x: Tensor,
    m: Tensor | None,
    axis: int,
    dims: tuple[int, ...],
    stat_shape: tuple[int, ...],
    acc: torch.dtype,
    group: Any,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, var) per channel over the real positions, each of ``stat_shape``.

    Corrected two-pass: mean1 = sum(x) / n, then with d = x - mean1 over the real positions
    mean = mean1 + sum(d) / n and var = sum(d^2) / n - (sum(d) / n)^2. The correction term
    removes the rounding error of the first pass from the mean itself and from the variance,
    so float32 keeps about one ulp of the mean and 1e-5 of the variance even when
    |mean| / std is 1e6 (E[x^2] - E[x]^2 would lose all of it). The work happens in place
    in one full-size buffer: on CPU each fresh full-size allocation costs about a pass.

    With a process ``group`` both passes are summed over the group (count with the first),
    so every replica centres on the global mean before the second pass: the merge is exact
    (Chan's formula with a common centre), empty shards included, in two small collectives.
    """
    x = x.detach()
    if _gathers_rows(x, m, axis, group):
        rows = _rows_2d(x.movedim(axis, -1))
        if rows is not None and m is None:
            return _chunked_moments(rows, stat_shape, acc)
        # masked: one gather and the two-pass in place on the real rows (2 threads: 1.37 ms
        # against 1.54 ms chunked at (16, 4096, 64) 50 % padding; 0.42 against 0.50 at 90 %)
        return _row_moments(_real_rows(x, m, axis, index), m is not None, stat_shape, acc)
    samples = _masked_samples(x, m, axis, group)
    if samples is not None:
        return _chunked_moments(samples[0], stat_shape, acc, samples[1])
    red = _reduction_dtype(acc, x.device)
    if m is None:
        count = torch.full(stat_shape, x.numel() // math.prod(stat_shape), dtype=acc, device=x.device)
        xs = x  # not ours: never modified in place
    else:
        count = m.sum(dims, keepdim=True, dtype=acc).expand(stat_shape)
        keep = _keep_bits(m, acc)
        xs = _select(x, keep, inplace=False) if x.dtype == acc else _select(x.to(acc), keep, inplace=True)
    total, count = _all_reduce_sum(group, xs.sum(dims, keepdim=True, dtype=red), count.contiguous())
    denom = count.clamp(min=1)
    mean1 = (total / denom).to(acc)
    d = xs - mean1 if m is None else _select(xs.sub_(mean1), keep, inplace=True)
    sum_d = d.sum(dims, keepdim=True, dtype=red)
    sum_d2 = (d * d).sum(dims, keepdim=True, dtype=red) if red != acc else d.square_().sum(dims, keepdim=True)
    sum_d, sum_d2 = _all_reduce_sum(group, sum_d, sum_d2)
    shift = sum_d / denom
    mean = (mean1 + shift).to(acc)
    var = (sum_d2 / denom - shift.square()).clamp_(min=0).to(acc)
    return count, mean, var


def _forward_mode_active(*tensors: Tensor | None) -> bool:
    """Whether forward-mode AD (a dual level) or a torch.func transform sees this call."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by vmap: torch.func's, or the autograd engine's batched grads."""
    if torch.compiler.is_compiling():
        return False  # dynamo cannot trace these checks; a compiled backward is not vmapped
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def _has_tangent(t: Tensor | None) -> bool:
    """Whether ``t`` carries a forward-mode tangent (a dual tensor at the current level)."""
    return t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _all_reduce_sum_differentiable(group: Any, t: Tensor) -> Tensor:
    if group is None:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _composite(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    m: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor | None,
    eps: float,
    zero_padded: bool,
    axis: int,
    dims: tuple[int, ...],
    stat_shape: tuple[int, ...],
    group: Any,
) -> Tensor:
    """The layer as plain differentiable ops, whose autograd gives derivatives of every order.

    ``mean``/``var`` are the accurate values (detached, from :func:`_batch_moments`). With
    ``count`` (batch statistics) they get their dependence on x through the identity
    ``v + (f(x) - f(x).detach())``: the value stays ``v`` bit for bit, the derivatives (any
    order, reverse or forward mode) are those of f, the textbook formula over the real
    positions. Padded output rows are computed from detached values: constants, as in the
    fast path. Padded x enters only through ``where`` (NaN/Inf there never reach a gradient).
    """
    acc = mean.dtype
    xa = x.to(acc)
    xs = xa if m is None else torch.where(m, xa, 0.0)
    if count is not None:
        n = count.clamp(min=1)
        s = _all_reduce_sum_differentiable(group, xs.sum(dims, keepdim=True)) / n
        mean_ad = mean + (s - s.detach())
        centred = xs - mean_ad if m is None else torch.where(m, xs - mean_ad, 0.0)
        v = _all_reduce_sum_differentiable(group, centred.square().sum(dims, keepdim=True)) / n
        var_ad = var + (v - v.detach())
    else:
        mean_ad, var_ad = mean, var
    invstd = torch.rsqrt(var_ad + eps)
    w = None if weight is None else weight.to(acc).reshape(stat_shape)
    b = None if bias is None else bias.to(acc).reshape(stat_shape)

    def affine(xhat: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        y = xhat if w is None else xhat * w
        return y if b is None else y + b

    y = affine((xs - mean_ad) * invstd, w, b)
    if m is not None:
        if zero_padded:
            padded = torch.zeros((), dtype=acc, device=x.device)
        else:
            padded = affine(
                (xa.detach() - mean) * invstd.detach(),
                None if w is None else w.detach(),
                None if b is None else b.detach(),
            )
        y = torch.where(m, y, padded)
    return y.to(x.dtype)


def _normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    m: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    zero_padded: bool,
    axis: int,
    stat_shape: tuple[int, ...],
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias (padded rows 0 with ``zero_padded``): the
    forward of :class:`_MaskedBatchNormFn`, and the whole call where nothing records a graph."""
    acc = mean.dtype
    if _native_normalizes(x, weight, bias, mean, var, eps):
        y = _native_normalize(x, weight, bias, mean, var, eps, axis)
    else:
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(acc).reshape(stat_shape)
        # (x - mean) * scale + bias, not x * scale + shift: the latter cancels when
        # |mean| >> std; one fused pass when compiled
        y = (x - mean).mul_(scale)  # x - mean promotes float16/bfloat16 x to acc
        if bias is not None:
            y.add_(bias.to(acc).reshape(stat_shape))
        y = y.to(x.dtype)
    if zero_padded and m is not None:
        _select(y, _keep_bits(m, y.dtype), inplace=True)
    return y


class _MaskedBatchNormFn(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with the analytic masked-BN backward.

    ``mean``/``var`` come in detached; when ``count`` is given (batch statistics) the
    backward adds their dependence on x analytically. Padded rows are constants: they get
    no gradient, and their dy and x never enter a reduction (selected away first). Saves
    only x, the bool mask and per-channel vectors, like native batch norm.

    The analytic backward is first order. Under ``create_graph=True`` (double backward,
    Hessian-vector products) it differentiates :func:`_composite` instead, so every
    higher derivative is autograd's own. Forward mode never reaches this Function
    (:func:`masked_batch_norm` routes it to the composite).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        m: Tensor | None,
        mean: Tensor,
        var: Tensor,
        count: Tensor | None,
        eps: float,
        zero_padded: bool,
        axis: int,
        dims: tuple[int, ...],
        stat_shape: tuple[int, ...],
        group: Any,
        index: Tensor | None,
    ) -> Tensor:
        y = _normalize(x, weight, bias, m, mean, var, eps, zero_padded, axis, stat_shape)
        ctx.save_for_backward(x, weight, bias, m, mean, var, count, index)
        ctx.eps = eps
        ctx.zero_padded = zero_padded
        ctx.group = group
        ctx.axis = axis
        ctx.dims = dims
        ctx.stat_shape = stat_shape
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, bias, m, mean, var, count, index = ctx.saved_tensors
        nones = (None,) * 11
        # a graph wanted (create_graph), or a vmapped backward (batched grads, torch.func):
        # the composite's out-of-place autograd; the in-place fast path below refuses vmap
        if torch.is_grad_enabled() or _vmapped(grad_out):
            return (*_composite_grads(ctx, grad_out, x, weight, bias, m, mean, var, count), *nones)
        dims, stat_shape = ctx.dims, ctx.stat_shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = mean.dtype
        red = _reduction_dtype(acc, x.device)
        invstd = torch.rsqrt(var + ctx.eps)
        if _gathers_rows(x, m, ctx.axis, ctx.group):
            return (*_row_backward(ctx, grad_out, x, weight, bias, m, mean, var, invstd, count, index), *nones)
        samples = _masked_samples(x, m, ctx.axis, ctx.group)
        if samples is not None and m is None:
            return (*_samples_backward(ctx, grad_out, x, weight, bias, mean, var, invstd, count), *nones)
        if samples is not None and count is not None:
            return (*_masked_samples_backward(ctx, grad_out, x, weight, bias, *samples, mean, invstd, count), *nones)
        keep = None if m is None else _keep_bits(m, acc)
        if keep is None:
            dy = grad_out.to(acc)  # may be grad_out itself: never modified in place
        elif grad_out.dtype == acc:
            dy = _select(grad_out, keep, inplace=False)
        else:
            dy = _select(grad_out.to(acc), keep, inplace=True)
        s1 = dy.sum(dims, keepdim=True, dtype=red)
        grad_x = grad_w = grad_b = None
        if need_w or (need_x and count is not None):
            xhat = (x - mean).mul_(invstd)
            if keep is not None:
                _select(xhat, keep, inplace=True)
            s2 = (dy * xhat).sum(dims, keepdim=True, dtype=red)
        if need_x:
            g = invstd if weight is None else invstd * weight.to(acc).reshape(stat_shape)
            if count is not None:
                # through the batch mean and variance: g * (dy - (s1 + xhat * s2) / n), in
                # xhat's buffer; count >= 1 wherever a row is real. Synchronized: the sums
                # and n are the whole group's (weight/bias grads stay per replica, as DDP
                # and nn.SyncBatchNorm expect)
                n = count.clamp(min=1)
                g_s1, g_s2 = _all_reduce_sum(ctx.group, s1, s2)
                grad_x = xhat.mul_((-g_s2 / n).to(acc)).add_(dy).sub_((g_s1 / n).to(acc)).mul_(g)
                if keep is not None:
                    _select(grad_x, keep, inplace=True)
            else:
                # fixed stats: dy is already 0 on padded rows
                grad_x = dy * g
            grad_x = grad_x.to(x.dtype)
        if need_w:
            grad_w = s2.reshape(-1).to(weight.dtype)
        if need_b:
            grad_b = s1.reshape(-1).to(bias.dtype)
        return grad_x, grad_w, grad_b, *nones


# |mean| / std up to which native batch norm's x * a + b form rounds like (x - mean) * a + b
_NATIVE_FORM_MAX_OFFSET = 4.0


def _native_normalizes(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> bool:
    """Whether eager normalization is native batch norm's inference kernel: one pass over x.

    It computes x * a + b with a = weight * invstd, b = bias - mean * a, whose rounding
    error is about 3 u |mean| invstd in normalized units: within the (x - mean) form's
    u-sized error only while |mean| / std is small, so that is checked per call (a
    per-channel test, one host sync); offset data (|mean| / std above 4, or a single real
    row, var 0) takes the exact form, two to four passes. Compiled code fuses the exact
    form into one pass by itself.
    """
    if not _runs_eagerly(x):
        return False
    if x.dtype != mean.dtype and not (mean.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not all(t is None or t.dtype == mean.dtype for t in (weight, bias)):
        return False
    if mean.device.type == "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(mean):
        # C values on the host: NumPy's few microseconds instead of six ATen calls (~40 us,
        # a few % of native inference at the benchmark's shapes)
        mean_np, var_np = mean.numpy(force=False), var.numpy(force=False)
        return bool(np.all(np.abs(mean_np) <= _NATIVE_FORM_MAX_OFFSET * np.sqrt(var_np + eps)))
    return bool((mean.abs() * torch.rsqrt(var + eps)).amax() <= _NATIVE_FORM_MAX_OFFSET)


def _native_normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float, axis: int
) -> Tensor:
    stats = (mean.reshape(-1), var.reshape(-1))
    if axis == 1 and x.is_contiguous():  # channels first: batch norm's own layout, no view to try
        return torch.batch_norm(x, weight, bias, *stats, False, 0.0, eps, False)
    last = axis == x.dim() - 1
    xl = x if last else x.movedim(axis, -1)
    rows = _rows_2d(xl)
    if rows is not None:  # channels last: batch norm's own channels-last kernel on the (P, C) view
        y = torch.batch_norm(rows, weight, bias, *stats, False, 0.0, eps, False).view(xl.shape)
        return y if last else y.movedim(-1, axis)
    return torch.batch_norm(x.movedim(axis, 1), weight, bias, *stats, False, 0.0, eps, False).movedim(1, axis)


def _kernel_inputs(dy: Tensor, x: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """dy and x as native batch norm's backward kernel takes them: float16/bfloat16 as they are
    (it computes in float32 with float32 statistics and weight), anything else cast to ``acc``."""
    if acc == torch.float32 and x.dtype in (torch.float16, torch.bfloat16) and dy.dtype == x.dtype:
        return dy, x
    return dy.to(acc), x.to(acc)


def _row_backward(ctx, grad_out, x, weight, bias, m, mean, var, invstd, count, index) -> tuple[Tensor | None, ...]:
    """The backward on the gathered real rows: native batch norm's backward kernel on (n, C).

    Padded rows neither enter it nor get gradient (zeros are scattered around the rows).
    grad_bias is a cascaded ATen sum of dy (the kernel's own sums are sequential float32,
    1e-5 relative off over 2^18 rows with an offset in dy). float16/bfloat16 rows go into
    the kernel as they are (it computes in float32 with float32 statistics and weight).
    ``index``: the forward's :func:`_real_index` of ``m`` (None: found here where needed).
    """
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    acc = mean.dtype
    axis = ctx.axis
    if index is None and m is not None and _rows_2d(x.movedim(axis, -1)) is not None:
        index = _real_index(m, axis)
    dy_rows, x_rows = _kernel_inputs(_real_rows(grad_out, m, axis, index), _real_rows(x, m, axis, index), acc)
    w = None if weight is None else weight.to(acc)
    train = count is not None
    mean_v, var_v, invstd_v = mean.reshape(-1), var.reshape(-1), invstd.reshape(-1)
    if dy_rows.shape[0] == 0:  # no real row: the kernel would divide by zero
        grad_rows, grad_w = dy_rows, torch.zeros_like(mean_v)
    else:
        grad_rows, grad_w, _ = _native_backward(
            dy_rows, x_rows, w, mean_v, var_v, invstd_v, train, ctx.eps, need_x, need_w
        )
    return (
        _scatter_rows(grad_rows, x, m, axis, index) if need_x else None,
        grad_w.to(weight.dtype) if need_w else None,
        dy_rows.sum(0, dtype=acc).to(bias.dtype) if need_b else None,
    )


def _samples_backward(ctx, grad_out, x, weight, bias, mean, var, invstd, count) -> tuple[Tensor | None, ...]:
    """The unmasked channels-first backward: native batch norm's backward kernel on the
    (N, C, L) view of x, grad_bias a cascaded ATen sum of dy (as :func:`_row_backward`)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    acc = mean.dtype
    axis = ctx.axis
    x3 = _samples_3d(x, axis)
    assert x3 is not None
    dy3, x3 = _kernel_inputs(grad_out.movedim(axis, 1).reshape(x3.shape), x3, acc)
    w = None if weight is None else weight.to(acc)
    grad_x, grad_w, _ = _native_backward(
        dy3, x3, w, mean.reshape(-1), var.reshape(-1), invstd.reshape(-1), count is not None, ctx.eps, need_x, need_w
    )
    moved = x.movedim(axis, 1).shape
    return (
        grad_x.to(x.dtype).view(moved).movedim(1, axis) if need_x else None,
        grad_w.to(weight.dtype) if need_w else None,
        dy3.sum((0, 2), dtype=acc).to(bias.dtype) if need_b else None,
    )


def _masked_samples_backward(ctx, grad_out, x, weight, bias, x3, m3, mean, invstd, count) -> tuple[Tensor | None, ...]:
    """The masked channels-first training backward, in chunks of samples (as
    :func:`_chunked_moments`): a pass for the sums s1 = sum(dy), s2 = sum(dy * (x - mean)) over
    the real positions, then one that writes grad_x = g * (dy - s1 / n - (x - mean) * invstd^2
    * s2 / n) on real positions and 0 on padded ones straight into the result. No
    full-size temporary; dy and x are each read twice, as native batch norm's backward does.
    """
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    acc = mean.dtype
    axis = ctx.axis
    dy3 = grad_out.movedim(axis, 1).reshape(x3.shape)
    keep = _keep_bits(m3, acc)
    channels = x3.shape[1]
    step = _chunk_step(x3[0].numel(), acc)
    starts = range(0, x3.shape[0], step)
    dy_work = torch.empty((min(step, x3.shape[0]), *x3.shape[1:]), dtype=acc, device=x.device)
    x_work = torch.empty_like(dy_work)
    sums = torch.empty((2, len(starts), channels), dtype=acc, device=x.device)
    mean3 = mean.reshape(1, channels, 1)

    def chunk(start: int, stop: int) -> tuple[Tensor, Tensor]:
        """dy and x - mean of a chunk, 0 on padded positions."""
        dy = _select(dy_work[: stop - start].copy_(dy3[start:stop]), keep[start:stop], inplace=True)
        centred = x_work[: stop - start].copy_(x3[start:stop]).sub_(mean3)
        _select(centred, keep[start:stop], inplace=True)
        return dy, centred

    for i, start in enumerate(starts):
        dy, centred = chunk(start, min(x3.shape[0], start + step))
        torch.sum(dy, (0, 2), out=sums[0, i])
        torch.sum(centred.mul_(dy), (0, 2), out=sums[1, i])
    s1, s2c = sums.sum(1)  # s2c = sum(dy * (x - mean)); sum(dy * xhat) = s2c * invstd
    grad_x = None
    if need_x:
        n = count.reshape(-1).clamp(min=1)
        g = invstd.reshape(-1) if weight is None else invstd.reshape(-1) * weight.to(acc)
        coef_x = (-g * invstd.reshape(-1).square() * s2c / n).reshape(1, channels, 1)
        coef_dy = g.reshape(1, channels, 1)
        shift = (-g * s1 / n).reshape(1, channels, 1)
        grad_x = torch.empty_like(x)
        out3 = _samples_3d(grad_x, axis)
        assert out3 is not None
        for start in starts:
            stop = min(x3.shape[0], start + step)
            dy, centred = chunk(start, stop)
            res = centred.mul_(coef_x).addcmul_(dy, coef_dy).add_(shift)
            out3[start:stop].copy_(_select(res, keep[start:stop], inplace=True))
    return (
        grad_x,
        (s2c * invstd.reshape(-1)).to(weight.dtype) if need_w else None,
        s1.to(bias.dtype) if need_b else None,
    )


def _native_backward(dy_rows, x_rows, w, mean_v, var_v, invstd_v, train, eps, need_x, need_w):
    return torch.ops.aten.native_batch_norm_backward(
        dy_rows,
        x_rows,
        w,
        None if train else mean_v,
        None if train else var_v,
        mean_v if train else None,
        invstd_v if train else None,
        train,
        eps,
        [need_x, need_w, False],
    )


def _composite_grads(ctx, grad_out, x, weight, bias, m, mean, var, count) -> tuple[Tensor | None, ...]:
    """The backward as autograd of :func:`_composite`, with a graph (create_graph=True)."""
    inputs = [t for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3]) if need]
    with torch.enable_grad():
        y = _composite(
            x,
            weight,
            bias,
            m,
            mean,
            var,
            count,
            ctx.eps,
            ctx.zero_padded,
            ctx.axis,
            ctx.dims,
            ctx.stat_shape,
            ctx.group,
        )
        grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3]):
        g = next(grads) if need else None
        # an input y does not depend on (e.g. weight with an empty mask and zero padding)
        out.append(torch.zeros_like(t) if need and g is None else g)
    return tuple(out)


def masked_batch_norm(
    input: Tensor,
    mask: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    channel_axis: int = 1,
    padded_output: str = "normalize",
    num_batches_tracked: Tensor | None = None,
    unbiased_running_var: bool = True,
    process_group: Any = None,
) -> Tensor:
    """Batch normalization whose batch statistics come only from the real positions of ``input``.

    Args:
        input: floating tensor with a channel axis (``channel_axis``) and any other axes.
        mask: None (every position real), or a bool/integer tensor, non-zero = real: of
            ``input``'s shape without the channel axis; or ``input.shape[:-1]`` (Keras'
            convention: the leading axes, broadcast over the last); or of ``input``'s rank,
            broadcasting to it (Flax's convention; the channel dim may be 1 or C). A rank - 1
            shape that fits both of the first two readings is read as the first. Where the
            mask varies along the channel axis, each channel's statistics come from its own
            real positions; a channel without any behaves as an empty mask does.
        running_mean, running_var: per-channel running statistics, updated in place when
            ``training``; required when not ``training``.
        weight, bias: optional per-channel affine parameters (gamma, beta).
        training: True normalizes with the batch statistics of the real positions (and
            updates the running stats); False normalizes with the running stats.
        momentum: weight of the new batch in the running average, PyTorch's convention
            (``running = (1 - momentum) * running + momentum * batch``); None gives a
            cumulative average driven by ``num_batches_tracked``, as ``nn.BatchNorm``.
        eps: added to the variance before the square root; > 0 (0 allowed in inference, as stock).
        channel_axis: the channel axis of ``input`` (1: ``(B, C, ...)``; -1: channels-last).
        padded_output: ``"normalize"`` normalizes padded rows like real ones, ``"zero"``
            makes them exactly 0.
        num_batches_tracked: int64 scalar counter incremented (in place) by each training
            call that has at least one real position.
        unbiased_running_var: store ``n / max(n - 1, 1) * var`` (n: the channel's real
            positions) in ``running_var``, as stock ``nn.BatchNorm`` does (the default);
            False stores the population variance. Normalization always uses the
            population variance.
        process_group: a ``torch.distributed`` process group (e.g. ``group.WORLD``) whose
            replicas share batch statistics when ``training``: counts, sums and centred
            sums are summed over the group, so k shards with uneven masks (empty ones
            included) get the statistics of the unsharded batch. Every replica must make
            the call (and its backward). None: statistics of this process's batch only.

    A training call whose mask has no real position normalizes with the running stats
    (mean 0, var 1 when there are none), updates nothing and gives zero gradients.
    Padded positions never influence real outputs, running stats or gradients, and get
    no gradient themselves (padded output rows are constants for autodiff). Reductions
    run in float32 (float64 for float64 inputs or state); the output has ``input``'s dtype.
    Derivatives of every order work: double backward and Hessian-vector products
    (``create_graph=True``) and forward mode (``torch.autograd.forward_ad``, ``torch.func``).
    An input with a zero-size dimension gives an empty output of its shape and dtype and
    changes no state, as stock batch norm.

    Raises:
        TypeError: integer ``input``, or a floating-point ``mask``.
        ValueError: channel axis out of range, a mask shape that does not fit, a channel
            count that differs from the parameters', ``eps <= 0`` in training (< 0 in
            inference). Nothing is updated then.
    """
    _check_input(input)
    if padded_output not in PADDED_OUTPUTS:
        raise ValueError(f"padded_output must be one of {PADDED_OUTPUTS}, got {padded_output!r}")
    # as stock batch norm: eps > 0 in training, eps >= 0 in inference (NaN neither)
    if not (eps > 0 or (eps == 0 and not training)):
        # "eps must be positive": the words torch's own BatchNorm error inputs look for
        raise ValueError(f"eps must be positive (or 0 in inference, as stock batch norm), got {eps!r}")
    if (
        _forward_mode_active(input)
        and _has_tangent(input)
        and (_has_tangent(running_mean) or _has_tangent(running_var))
    ):
        # as stock batch norm: a tangent on the running stats would be dropped silently
        raise RuntimeError("masked_batch_norm is not differentiable with respect to running_mean and running_var")
    axis = _resolve_channel_axis(input, channel_axis)
    channels = int(input.shape[axis])
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and t.shape != (channels,):
            raise ChannelMismatchError(
                f"x shape {_shape(input)} has {channels} channels at axis {axis}, but {name} has shape {_shape(t)}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    running = None if running_mean is None or running_var is None else (running_mean, running_var)
    if not training and running is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if training and momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    m = _prepare_mask(mask, input, axis)
    index = None  # the real rows' positions, where the eager work gathers rows (found once per call)
    if m is not None:
        moot, index = _mask_is_moot(m, input, axis, weight, bias, training, padded_output, process_group)
        if moot:
            m = None  # validated above; the unmasked path skips the gather and the scatter

    float64 = any(t is not None and t.dtype == torch.float64 for t in (input, weight, running_mean))
    acc = torch.float64 if float64 else torch.float32
    dims = tuple(i for i in range(input.dim()) if i != axis)
    stat_shape = tuple(channels if i == axis else 1 for i in range(input.dim()))
    if input.numel() == 0:
        return _empty_output(input, weight, bias, stat_shape)

    count = group = None
    if training:
        group = process_group if process_group is not None and dist.get_world_size(process_group) > 1 else None
        count, batch_mean, batch_var = _batch_moments(input, m, axis, dims, stat_shape, acc, group, index)
        has_real = count > 0
        if running is not None:
            prior_mean, prior_var = (t.detach().to(acc).reshape(stat_shape) for t in running)
        else:
            # no running stats to fall back on: the initial ones (mean 0, var 1)
            prior_mean = torch.zeros((), dtype=acc, device=input.device)
            prior_var = torch.ones((), dtype=acc, device=input.device)
        # n == 0: the inference path, chosen by `where` so there is no data-dependent branch.
        # Selected before the in-place update below, which may alias prior_mean/prior_var.
        mean = torch.where(has_real, batch_mean, prior_mean)
        var = torch.where(has_real, batch_var, prior_var)
        if running is not None:
            _update_running_stats(
                *running,
                num_batches_tracked,
                batch_mean,
                batch_var,
                count,
                has_real,
                momentum,
                unbiased_running_var,
            )
    else:
        assert running is not None  # required when not training (checked above)
        mean, var = (t.detach().to(acc).reshape(stat_shape) for t in running)
    args = (
        input,
        weight,
        bias,
        m,
        mean,
        var,
        count,
        float(eps),
        padded_output == "zero",
        axis,
        dims,
        stat_shape,
        group,
    )
    if _forward_mode_active(input, weight, bias):
        return _composite(*args)
    if _runs_eagerly(input) and not _records_graph(input, weight, bias):
        # no graph to record (inference, torch.no_grad): the forward without autograd.Function's
        # per-call cost (about 40 us, 2-4 % of native inference at the benchmark's shapes)
        return _normalize(input, weight, bias, m, mean, var, float(eps), padded_output == "zero", axis, stat_shape)
    return _MaskedBatchNormFn.apply(*args, index)


def _empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None, stat_shape: tuple[int, ...]) -> Tensor:
    """x with a zero-size dimension: an empty output of its shape and dtype, connected to
    the graph of x, weight and bias (as stock batch norm: their gradients are zeros)."""
    out = input.clone()
    if weight is not None:
        out = out * weight.reshape(stat_shape).to(out.dtype)
    if bias is not None:
        out = out + bias.reshape(stat_shape).to(out.dtype)
    return out


def _update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    has_real: Tensor,
    momentum: float | None,
    unbiased: bool,
) -> None:
    """In-place running-stat update; a channel without real positions keeps its stats (by ``where``)."""
    with torch.no_grad():
        any_real = has_real.any()
        if num_batches_tracked is not None:
            num_batches_tracked.add_(any_real.to(num_batches_tracked.dtype))
        acc = mean.dtype
        if momentum is not None:
            factor = torch.tensor(momentum, dtype=acc, device=mean.device)
        else:
            assert num_batches_tracked is not None  # required by a cumulative average (checked by the caller)
            factor = 1.0 / num_batches_tracked.clamp(min=1).to(acc)
        count = count.reshape(-1)
        batch_var = var.reshape(-1)
        if unbiased:
            batch_var = batch_var * (count / (count - 1).clamp(min=1))
        real = has_real.reshape(-1)
        for buf, batch in ((running_mean, mean.reshape(-1)), (running_var, batch_var)):
            old = buf.to(acc)
            new = (1 - factor) * old + factor * batch
            buf.copy_(torch.where(real, new, old))
