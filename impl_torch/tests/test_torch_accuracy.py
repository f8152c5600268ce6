"""Accuracy at scale (issue 12): statistics, outputs and the backward's sums against float64, eager and compiled.

Raw coordinates (offsets 1e4-1e6, std 1 or 1e-2) over up to 2^18 real rows: the batch
mean within one float32 ulp of the exact mean, the variance within 1e-5 relative, and the
backward's two sums (dy; dy * xhat) within 1e-6 of their magnitude. Few channels keep
each case to milliseconds; the compiled cases are few (each compiles once).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskbn_torch import masked_batch_norm

CHANNELS = 2
EPS = 1e-5


def _batch(real_rows: int, offset: float, std: float, dtype: torch.dtype, channels_last: bool, seed: int = 0):
    """x (B, L, C) or (B, C, L) with uneven prefix masks (about half padded, NaN padding), dy with an offset."""
    gen = torch.Generator().manual_seed(seed)
    batch = 16
    length = 2 * real_rows // batch
    lengths = torch.full((batch,), real_rows // batch)
    lengths[0::2] += length // 8
    lengths[1::2] -= length // 8
    lengths[-1] += real_rows - int(lengths.sum())
    mask = torch.arange(length)[None] < lengths[:, None]
    x = (torch.randn(batch, length, CHANNELS, generator=gen, dtype=torch.float64) * std + offset).to(dtype)
    x = torch.where(mask[..., None], x, float("nan"))
    dy = (torch.randn(batch, length, CHANNELS, generator=gen) + 3.0).to(dtype)
    if not channels_last:
        x, dy = x.movedim(-1, 1).contiguous(), dy.movedim(-1, 1).contiguous()
    return x, mask, dy


def _real(t: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> np.ndarray:
    return (t if channels_last else t.movedim(1, -1))[mask].double().numpy()


def _layer(channels_last: bool):
    def layer(x, mask, weight, bias, running_mean, running_var):
        return masked_batch_norm(
            x,
            mask,
            running_mean,
            running_var,
            weight,
            bias,
            training=True,
            momentum=1.0,  # the running stats become the batch stats
            eps=EPS,
            channel_axis=-1 if channels_last else 1,
            unbiased_running_var=False,
        )

    return layer


def _step(fn, x, mask, dy):
    weight = torch.ones(CHANNELS, requires_grad=True)
    bias = torch.zeros(CHANNELS, requires_grad=True)
    running_mean, running_var = torch.zeros(CHANNELS), torch.ones(CHANNELS)
    xg = x.clone().requires_grad_()
    y = fn(xg, mask, weight, bias, running_mean, running_var)
    y.backward(dy)
    return y.detach(), running_mean, running_var, weight.grad, bias.grad


def _check(real_rows, offset, std, dtype, channels_last, compiled):
    x, mask, dy = _batch(real_rows, offset, std, dtype, channels_last)
    fn = _layer(channels_last)
    if compiled:
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    y, mean, var, dweight, dbias = _step(fn, x, mask, dy)
    rows = _real(x, mask, channels_last)
    exact_mean, exact_var = rows.mean(0), rows.var(0)
    assert (exact_var > 0).all(), "the case must have a spread after rounding to the input dtype"
    ulp = np.spacing(np.abs(exact_mean).astype(np.float32)).astype(np.float64)
    mean_error = np.abs(mean.double().numpy() - exact_mean)
    assert (mean_error <= ulp).all(), (
        f"mean off by {mean_error / ulp} float32 ulp ({mean_error / np.sqrt(exact_var)} sigma)"
    )
    var_error = np.abs(var.double().numpy() - exact_var) / exact_var
    assert (var_error <= 1e-5).all(), f"variance off by {var_error} relative"
    # the backward's sums, against float64 sums with the layer's own (float32) statistics
    dy_rows = _real(dy, mask, channels_last)
    xhat = (rows - mean.double().numpy()) / np.sqrt(var.double().numpy() + EPS)
    for got, terms in ((dbias, dy_rows), (dweight, dy_rows * xhat)):
        error = np.abs(got.double().numpy() - terms.sum(0))
        assert (error <= 1e-6 * np.abs(terms).sum(0)).all(), f"sum off by {error / np.abs(terms).sum(0)} relative"
    # real outputs: the error that the mean's own float32 rounding implies, and rounding to the output dtype
    y_exact = (rows - exact_mean) / np.sqrt(exact_var + EPS)
    allowed = (2 * ulp + 4 * np.finfo(np.float32).eps * np.abs(exact_mean)) / np.sqrt(exact_var + EPS)
    allowed = allowed + 2 * float(torch.finfo(dtype).eps) * (np.abs(y_exact) + 1e-3)
    y_error = np.abs(_real(y, mask, channels_last) - y_exact)
    assert (y_error <= allowed).all(), f"outputs off by up to {(y_error / allowed).max()} x the allowance"
    # padded rows of y are garbage in, garbage out; the statistics never saw the NaN padding
    assert torch.isfinite(mean).all() and torch.isfinite(dweight).all()


SCALES = [
    (1000, 1e4, 1.0),
    (1000, 1e6, 1.0),
    (2**18, 1e4, 1.0),
    (2**18, 1e6, 1.0),
    (2**18, 1e4, 1e-2),
    (2**18, 1e6, 1e-2),
]


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "channels-first"])
@pytest.mark.parametrize(
    ("real_rows", "offset", "std"), SCALES, ids=[f"n{n}-offset{o:g}-std{s:g}" for n, o, s in SCALES]
)
def test_eager_float32_accuracy_at_scale(real_rows, offset, std, channels_last):
    _check(real_rows, offset, std, torch.float32, channels_last, compiled=False)


HALF_SCALES = [(1000, 100.0, 1.0), (2**18, 100.0, 1.0)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "channels-first"])
@pytest.mark.parametrize(("real_rows", "offset", "std"), HALF_SCALES, ids=[f"n{n}" for n, _, _ in HALF_SCALES])
def test_eager_half_precision_input_keeps_float32_moments(real_rows, offset, std, channels_last, dtype):
    _check(real_rows, offset, std, dtype, channels_last, compiled=False)


COMPILED = {
    "n262144-offset1e6-std1-channels-last": (2**18, 1e6, 1.0, torch.float32, True),
    "n262144-offset1e4-std0.01-channels-first": (2**18, 1e4, 1e-2, torch.float32, False),
    "n262144-bfloat16-channels-last": (2**18, 100.0, 1.0, torch.bfloat16, True),
}


@pytest.mark.parametrize("case", COMPILED.values(), ids=COMPILED.keys())
def test_torch_compile_inductor_accuracy_at_scale(case):
    torch._dynamo.reset()
    _check(*case, compiled=True)
