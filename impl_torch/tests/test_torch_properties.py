"""Property tests: any layout and mask agrees with stock batch norm on the compacted real rows."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch_helpers import real_rows

from maskbn_torch import MaskedBatchNorm


@st.composite
def padded_batches(draw):
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    axis = draw(st.sampled_from([1, -1]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    keep_dim = draw(st.booleans())
    m_shape = tuple(1 if i == axis % rank else s for i, s in enumerate(shape))
    mask = torch.rand(m_shape, generator=gen) < draw(st.floats(0.2, 1.0))
    mask.view(-1)[draw(st.integers(0, mask.numel() - 1))] = True
    scale = draw(st.sampled_from([1e-2, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 5.0, -1e4]))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    # float64 rounding of x relative to its spread: |mean| / std bounds how well any
    # implementation (stock BN included) can do
    condition = 1.0 + abs(offset) / scale
    return x, (mask if keep_dim else mask.squeeze(axis)), axis, gen, condition


@given(padded_batches())
def test_real_rows_match_stock_batch_norm_on_compacted_rows(batch):
    x, mask, axis, gen, condition = batch
    channels = x.shape[axis]
    masked = MaskedBatchNorm(channels, channel_axis=axis, dtype=torch.float64, unbiased_running_var=True)
    stock = nn.BatchNorm1d(channels, dtype=torch.float64)
    with torch.no_grad():
        for layer in (masked, stock):
            layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xm = x.clone().requires_grad_()
    y = masked(xm, mask)
    y.backward(dy)
    rows = real_rows(x, mask, axis).clone().requires_grad_()
    single_row = rows.shape[0] == 1  # stock BN refuses one value per channel in training
    if single_row:
        assert torch.equal(real_rows(y, mask, axis), masked.bias.detach().expand(1, channels))
        return
    want = stock(rows)
    want.backward(real_rows(dy, mask, axis))
    tol = {"rtol": 1e-12 * condition, "atol": 1e-12 * condition}
    torch.testing.assert_close(real_rows(y, mask, axis), want, **tol)
    torch.testing.assert_close(masked.running_mean, stock.running_mean, **tol)
    torch.testing.assert_close(masked.running_var, stock.running_var, **tol)
    torch.testing.assert_close(real_rows(xm.grad, mask, axis), rows.grad, **tol)
    torch.testing.assert_close(masked.weight.grad, stock.weight.grad, **tol)
    torch.testing.assert_close(masked.bias.grad, stock.bias.grad, **tol)
