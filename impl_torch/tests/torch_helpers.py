"""Test helpers: the compacted-rows oracle (plain BN on the real rows only) and mask builders."""

from __future__ import annotations

import torch


def real_rows(x: torch.Tensor, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """(n, C): the real positions of x, channel last, in C order."""
    xl = x.movedim(axis, -1)
    return xl[mask.bool()] if mask.dim() == xl.dim() - 1 else xl[mask.squeeze(axis).bool()]


def compacted_batch_norm(x: torch.Tensor, mask: torch.Tensor, axis: int, eps: float, weight=None, bias=None):
    """Plain batch norm on the compacted real rows (float64), as an (n, C) tensor."""
    rows = real_rows(x, mask, axis).double()
    mean = rows.mean(0)
    var = rows.var(0, unbiased=False)
    y = (rows - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y, mean, var


def prefix_mask(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    """(batch, length) bool mask, item b real on its first lengths[b] positions."""
    return torch.arange(length).expand(batch, length) < torch.tensor(lengths)[:, None]
