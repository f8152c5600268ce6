"""The functional's contract-1a behaviours: zero-size batches, eps, the running-var convention, mask forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_helpers import compacted_batch_norm, prefix_mask, real_rows

from maskbn_torch import MaskedBatchNorm, masked_batch_norm


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 3, 0), (4, 0, 5)], ids=["no-items", "no-length", "no-channels"])
def test_zero_size_batch_gives_an_empty_output_and_changes_no_state(shape, training):
    channels = shape[1]
    bn = MaskedBatchNorm(channels).train(training)
    bn(torch.randn(2, channels, 5), prefix_mask(2, 5, [5, 3]))  # non-trivial state
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(shape, dtype=torch.bfloat16).requires_grad_()
    y = bn(x, torch.ones(shape[0], shape[2], dtype=torch.bool))
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    if channels:
        stock = nn.BatchNorm1d(channels).train(training)
        assert stock(torch.randn(shape)).shape == y.shape


@pytest.mark.parametrize(
    ("eps", "training"), [(0.0, True), (-1.0, True), (-1.0, False), (float("nan"), False)], ids=str
)
def test_eps_must_be_positive_as_stock(eps, training):
    bn = MaskedBatchNorm(3, eps=eps).train(training)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=rf"eps must be positive .*, got {eps!r}"):
        bn(torch.randn(2, 3, 4))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_eps_zero_is_accepted_in_inference_as_stock(gen):
    x = torch.randn(2, 3, 4, generator=gen)
    bn, stock = MaskedBatchNorm(3, eps=0.0).eval(), nn.BatchNorm1d(3, eps=0.0).eval()
    torch.testing.assert_close(bn(x), stock(x))


@pytest.mark.parametrize("lengths", [[5, 3], [1, 0]], ids=["n8", "n1"])
def test_functional_running_var_defaults_to_torch_unbiased_convention(lengths, gen):
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    mask = prefix_mask(2, 5, lengths)
    _, _, var = compacted_batch_norm(x, mask, 1, 1e-5)
    n = sum(lengths)
    for kwargs, factor in (({}, n / max(n - 1, 1)), ({"unbiased_running_var": False}, 1.0)):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        masked_batch_norm(x, mask, rm, rv, training=True, momentum=1.0, **kwargs)
        torch.testing.assert_close(rv, var * factor)
    if n > 1:  # stock batch norm on the compacted rows stores the same
        stock = nn.BatchNorm1d(3, momentum=1.0, dtype=torch.float64)
        stock(real_rows(x, mask, 1))
        rv = torch.ones(3, dtype=torch.float64)
        masked_batch_norm(x, mask, torch.zeros(3, dtype=torch.float64), rv, training=True, momentum=1.0)
        torch.testing.assert_close(rv, stock.running_var)


def test_keras_leading_axes_mask_broadcasts_over_the_last_axis(gen):
    # channel axis 1 of a (B, C, L) input; a (B, C) mask is x.shape[:-1], not x without the channel axis
    x = torch.randn(4, 3, 6, generator=gen)
    keras_mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    got = masked_batch_norm(x, keras_mask, training=True)
    want = masked_batch_norm(x, keras_mask.unsqueeze(-1).expand(4, 3, 6), training=True)
    torch.testing.assert_close(got, want)


def test_ambiguous_rank_minus_one_mask_reads_as_x_without_the_channel_axis(gen):
    # x (B, C, L) with B == C: a (B, L) mask fits both readings only when L == C too
    x = torch.randn(3, 3, 3, generator=gen)
    mask = prefix_mask(3, 3, [3, 1, 2])
    got = masked_batch_norm(x, mask, training=True, channel_axis=1)
    want = masked_batch_norm(x, mask.unsqueeze(1), training=True, channel_axis=1)
    assert torch.equal(got, want)


def test_mask_varying_along_channels_gives_per_channel_statistics(gen):
    x = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64) * 3 + 1
    per_channel = torch.rand(4, 3, 6, generator=gen) > 0.5
    per_channel[:, 2] = False  # a channel without real positions keeps its stats
    rm, rv = torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    y = masked_batch_norm(x, per_channel, rm, rv, training=True, momentum=1.0, unbiased_running_var=False)
    for c in range(2):
        rows = x[:, c][per_channel[:, c]]
        mean, var = rows.mean(), rows.var(unbiased=False)
        torch.testing.assert_close(rm[c], mean)
        torch.testing.assert_close(rv[c], var)
        torch.testing.assert_close(y[:, c][per_channel[:, c]], (rows - mean) / torch.sqrt(var + 1e-5))
    assert rm[2] == 0.5 and rv[2] == 2.0
    torch.testing.assert_close(y[:, 2], (x[:, 2] - 0.5) / torch.sqrt(torch.tensor(2.0 + 1e-5, dtype=torch.float64)))


def test_float_mask_error_says_how_to_make_a_bool_mask():
    with pytest.raises(TypeError, match="mask > 0"):
        masked_batch_norm(torch.randn(2, 3, 4), torch.ones(2, 4), training=True)
