"""Forward semantics: statistics from real rows only, running stats, modes, dtypes, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch_helpers import compacted_batch_norm, prefix_mask, real_rows

from maskbn_torch import MaskedBatchNorm, masked_batch_norm

# (x shape, channel axis, mask shape)
LAYOUTS = {
    "bcl": ((3, 5, 7), 1, (3, 7)),
    "bcl-mask-keepdim": ((3, 5, 7), 1, (3, 1, 7)),
    "bchw": ((2, 4, 3, 5), 1, (2, 3, 5)),
    "bcdhw": ((2, 3, 2, 3, 4), 1, (2, 1, 2, 3, 4)),
    "bnc-channels-last": ((3, 7, 5), -1, (3, 7)),
    "bnc-mask-keepdim": ((3, 7, 5), -1, (3, 7, 1)),
    "bc": ((9, 5), 1, (9,)),
    "cb-axis0": ((5, 9), 0, (9,)),
}


def random_mask(shape, gen, p=0.6):
    m = torch.rand(shape, generator=gen) < p
    m.view(-1)[0] = True  # at least one real position
    return m


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_training_output_and_running_stats_come_from_real_rows(layout, gen):
    x_shape, axis, m_shape = layout
    channels = x_shape[axis]
    x = torch.randn(x_shape, generator=gen) * 3 + 2
    mask = random_mask(m_shape, gen)
    bn = MaskedBatchNorm(channels, channel_axis=axis, unbiased_running_var=False)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=gen))
    y = bn(x, mask)
    want, mean, var = compacted_batch_norm(x, mask, axis, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(real_rows(y, mask, axis).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64])
def test_integer_masks_mean_nonzero_is_real(mask_dtype, gen):
    x = torch.randn(3, 4, 6, generator=gen)
    mask = random_mask((3, 6), gen)
    # values other than 1 are real too
    as_int = mask.to(mask_dtype) * (3 if mask_dtype != torch.bool else 1)
    torch.testing.assert_close(
        masked_batch_norm(x, as_int, training=True), masked_batch_norm(x, mask, training=True), rtol=0, atol=0
    )


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
def test_padded_rows_output(padded_output, gen):
    x = torch.randn(2, 3, 5, generator=gen)
    mask = prefix_mask(2, 5, [2, 4])
    y = MaskedBatchNorm(3, padded_output=padded_output)(x, mask)
    stats_y = MaskedBatchNorm(3)(x, mask)
    pad = ~mask[:, None, :].expand_as(x)
    if padded_output == "zero":
        assert torch.equal(y[pad], torch.zeros_like(y[pad]))
    else:
        # padded rows are normalized with the real rows' statistics
        mean = real_rows(x, mask, 1).mean(0)[None, :, None]
        var = real_rows(x, mask, 1).var(0, unbiased=False)[None, :, None]
        torch.testing.assert_close(y[pad], ((x - mean) / torch.sqrt(var + 1e-5)).expand_as(x)[pad])
    torch.testing.assert_close(y[~pad], stats_y[~pad], rtol=0, atol=0)


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf, 1e38], ids=["nan", "inf", "-inf", "huge"])
def test_garbage_in_padded_rows_is_bit_identical_to_zero_padding(garbage, gen):
    x = torch.randn(3, 4, 6, generator=gen)
    mask = prefix_mask(3, 6, [6, 1, 3])
    pad = ~mask[:, None, :].expand_as(x)
    clean = torch.where(pad, 0.0, x).requires_grad_()
    dirty = torch.where(pad, garbage, x).requires_grad_()
    dy = torch.randn(x.shape, generator=gen)
    results = []
    for inp in (clean, dirty):
        bn = MaskedBatchNorm(4)
        y = bn(inp, mask)
        y.backward(dy)
        results.append((y[~pad], bn.running_mean, bn.running_var, inp.grad, bn.weight.grad, bn.bias.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_without_mask_matches_stock_batch_norm(gen):
    x = torch.randn(6, 4, 5, generator=gen) * 2 + 1
    stock = nn.BatchNorm1d(4)
    masked = MaskedBatchNorm(4, unbiased_running_var=True)
    for _ in range(3):
        torch.testing.assert_close(masked(x), stock(x))
    torch.testing.assert_close(masked.running_mean, stock.running_mean)
    torch.testing.assert_close(masked.running_var, stock.running_var)
    masked.eval(), stock.eval()
    torch.testing.assert_close(masked(x), stock(x))


@pytest.mark.parametrize("unbiased", [False, True], ids=["population-var", "unbiased-var"])
def test_running_var_convention(unbiased, gen):
    x = torch.randn(2, 3, 4, generator=gen)
    mask = prefix_mask(2, 4, [3, 2])  # n = 5
    bn = MaskedBatchNorm(3, momentum=1.0, unbiased_running_var=unbiased)
    bn(x, mask)
    var = real_rows(x, mask, 1).var(0, unbiased=unbiased)
    torch.testing.assert_close(bn.running_var, var)


def test_momentum_none_is_a_cumulative_average_over_non_empty_batches(gen):
    bn = MaskedBatchNorm(3, momentum=None)
    means = []
    for lengths in ([4, 2], [0, 0], [1, 3], [5, 5]):
        x = torch.randn(2, 3, 5, generator=gen)
        mask = prefix_mask(2, 5, lengths)
        bn(x, mask)
        if sum(lengths):
            means.append(real_rows(x, mask, 1).mean(0))
    assert bn.num_batches_tracked.item() == 3
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_running_stats_always_uses_batch_stats(mode, gen):
    x = torch.randn(2, 3, 5, generator=gen) + 4
    mask = prefix_mask(2, 5, [5, 2])
    bn = MaskedBatchNorm(3, track_running_stats=False).train(mode == "train")
    assert bn.running_mean is None and bn.num_batches_tracked is None
    assert set(bn.state_dict()) == {"weight", "bias"}
    want, _, _ = compacted_batch_norm(x, mask, 1, bn.eps)
    torch.testing.assert_close(real_rows(bn(x, mask), mask, 1).double(), want, rtol=1e-5, atol=1e-5)


def test_affine_false_creates_no_weights(gen):
    bn = MaskedBatchNorm(3, affine=False)
    assert bn.weight is None and bn.bias is None
    assert list(bn.parameters()) == []
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}
    x = torch.randn(2, 3, 5, generator=gen)
    mask = prefix_mask(2, 5, [3, 5])
    want, _, _ = compacted_batch_norm(x, mask, 1, bn.eps)
    torch.testing.assert_close(real_rows(bn(x, mask), mask, 1).double(), want, rtol=1e-5, atol=1e-5)


def test_bias_false_keeps_only_the_weight(gen):
    bn = MaskedBatchNorm(3, bias=False)
    assert bn.bias is None and bn.weight is not None
    assert set(bn.state_dict()) == {"weight", "running_mean", "running_var", "num_batches_tracked"}
    assert "bias=False" in repr(bn)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 0.5, -1.0]))
    x = torch.randn(2, 3, 5, generator=gen)
    mask = prefix_mask(2, 5, [3, 5])
    want, _, _ = compacted_batch_norm(x, mask, 1, bn.eps, bn.weight)
    torch.testing.assert_close(real_rows(bn(x, mask), mask, 1).double(), want, rtol=1e-5, atol=1e-5)


def test_weight_false_keeps_only_the_bias(gen):
    bn = MaskedBatchNorm(3, weight=False)
    assert bn.weight is None and bn.bias is not None
    assert set(bn.state_dict()) == {"bias", "running_mean", "running_var", "num_batches_tracked"}
    assert "weight=False" in repr(bn)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([2.0, 0.5, -1.0]))
    x = torch.randn(2, 3, 5, generator=gen)
    mask = prefix_mask(2, 5, [3, 5])
    want, _, _ = compacted_batch_norm(x, mask, 1, bn.eps)
    got = real_rows(bn(x, mask), mask, 1).double()
    torch.testing.assert_close(got, want + bn.bias.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("track", [True, False], ids=["running-stats", "no-running-stats"])
def test_empty_mask_in_training_takes_the_inference_path(track, gen):
    bn = MaskedBatchNorm(3, track_running_stats=track)
    if track:
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
            bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(2, 3, 5, generator=gen)
    y = bn(x, torch.zeros(2, 5, dtype=torch.bool))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    mean = bn.running_mean if track else torch.zeros(3)
    var = bn.running_var if track else torch.ones(3)
    torch.testing.assert_close(y, (x - mean[:, None]) / torch.sqrt(var[:, None] + bn.eps))


def test_single_real_row_has_zero_variance(gen):
    x = torch.randn(2, 3, 4, generator=gen)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    bn = MaskedBatchNorm(3, momentum=1.0)
    y = bn(x, mask)
    assert torch.equal(bn.running_var, torch.zeros(3))
    assert torch.equal(bn.running_mean, x[1, :, 2])
    assert torch.equal(y[1, :, 2], torch.zeros(3))


def test_eval_normalizes_with_running_stats_and_updates_nothing(gen):
    bn = MaskedBatchNorm(3, padded_output="zero")
    bn(torch.randn(4, 3, 5, generator=gen) * 2 + 1)
    bn.eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(2, 3, 5, generator=gen)
    mask = prefix_mask(2, 5, [5, 3])
    y = bn(x, mask)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    want = (x - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    torch.testing.assert_close(y, torch.where(mask[:, None, :], want, 0.0))


@pytest.mark.parametrize("ratio", [1e3, 1e6])
def test_float32_variance_stays_accurate_for_large_mean_to_std_ratio(ratio, gen):
    x64 = torch.randn(4, 2, 256, generator=gen, dtype=torch.float64) + ratio
    x = x64.float()
    mask = prefix_mask(4, 256, [256, 100, 7, 200])
    bn = MaskedBatchNorm(2, momentum=1.0, unbiased_running_var=False)
    bn(x, mask)
    _, mean, var = compacted_batch_norm(x.double(), mask, 1, 0.0)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=0)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2e4], ids=["unit", "near-fp16-max"])
def test_half_precision_reduces_in_float32(dtype, scale, gen):
    # squares of 2e4 overflow float16; the float32 reduction must not
    x = (torch.randn(4, 3, 64, generator=gen) * scale).to(dtype)
    mask = prefix_mask(4, 64, [64, 10, 33, 1])
    bn = MaskedBatchNorm(3, momentum=1.0, unbiased_running_var=False)
    y = bn(x, mask)
    assert y.dtype == dtype
    assert bn.running_mean.dtype == bn.running_var.dtype == bn.weight.dtype == torch.float32
    want, mean, var = compacted_batch_norm(x.double(), mask, 1, bn.eps)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=0)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5 * scale)
    out_tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(real_rows(y, mask, 1).double(), want, rtol=out_tol, atol=out_tol)


def test_float64_layer_keeps_float64_state(gen):
    bn = MaskedBatchNorm(3, dtype=torch.float64, unbiased_running_var=False)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    mask = prefix_mask(2, 4, [4, 1])
    y = bn(x, mask)
    assert y.dtype == bn.running_var.dtype == bn.weight.dtype == torch.float64
    want, _, var = compacted_batch_norm(x, mask, 1, bn.eps)
    torch.testing.assert_close(real_rows(y, mask, 1), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu(dtype, gen):
    lin = nn.Linear(6, 6)
    bn = MaskedBatchNorm(6, channel_axis=-1)
    x = torch.randn(3, 5, 6, generator=gen)
    mask = prefix_mask(3, 5, [5, 2, 4])
    with torch.autocast("cpu", dtype=dtype):
        h = lin(x)
        y = bn(h, mask)
    assert h.dtype == y.dtype == dtype
    assert bn.running_mean.dtype == torch.float32
    y.float().sum().backward()
    assert bn.weight.grad.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()
    want, _, _ = compacted_batch_norm(h, mask, -1, bn.eps)
    torch.testing.assert_close(real_rows(y, mask, -1).double(), want, rtol=2e-2, atol=2e-2)


BAD_CALLS = {
    "mask-shape": (
        lambda: (torch.zeros(4, 8, 3), torch.ones(4, 7, dtype=torch.bool)),
        ValueError,
        ["mask shape (4, 7)", "x shape (4, 8, 3)"],
    ),
    "mask-same-rank-not-broadcasting": (
        lambda: (torch.zeros(4, 8, 3), torch.ones(4, 2, 3, dtype=torch.bool)),
        ValueError,
        ["mask shape (4, 2, 3)", "(4, 3)", "(4, 1, 3)"],
    ),
    "float-mask": (lambda: (torch.zeros(4, 8, 3), torch.ones(4, 3)), TypeError, ["float32"]),
    "integer-x": (lambda: (torch.zeros(4, 8, 3, dtype=torch.int32), None), TypeError, ["int32"]),
    "channel-count": (lambda: (torch.zeros(4, 5, 3), None), ValueError, ["8", "5"]),
}


@pytest.mark.parametrize("bad", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_before_any_state_change(bad):
    make, error, mentions = bad
    bn = MaskedBatchNorm(8)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x, mask = make()
    with pytest.raises(error) as info:
        bn(x, mask)
    for text in mentions:
        assert text in str(info.value)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("axis", [3, -4])
def test_channel_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=f"channel_axis {axis} is out of range for x of rank 3"):
        MaskedBatchNorm(8, channel_axis=axis)(torch.zeros(2, 8, 4))


def test_constructor_rejects_unknown_padded_output():
    with pytest.raises(ValueError, match="padded_output"):
        MaskedBatchNorm(3, padded_output="drop")


def test_functional_requires_running_stats_for_inference():
    with pytest.raises(ValueError, match="required when training=False"):
        masked_batch_norm(torch.zeros(2, 3), training=False)
