"""The batch-norm behaviours torch's test/test_nn.py checks, which torch does not ship.

Written here from what those tests establish about ``nn.BatchNorm`` (nothing copied);
each test names the upstream test it follows. MaskedBatchNorm runs without a mask (or
with the mask the case is about) and is held to the stock behaviour, mostly by running
the stock layer beside it. Expected differences: ``expected_differences.yaml``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn import functional as F
from torch.testing._internal.common_nn import _test_module_empty_input
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

from maskbn_torch import ChannelMismatchError, MaskedBatchNorm, masked_batch_norm

STOCK = {nn.BatchNorm1d: (4, 3, 5), nn.BatchNorm2d: (4, 3, 5, 5), nn.BatchNorm3d: (4, 3, 2, 5, 5)}


class _Asserts:
    """The assertion method torch's shipped test helper calls on its test case."""

    def assertEqual(self, actual, expected):
        torch.testing.assert_close(actual, expected)


def _twins(stock_cls, *args, **kwargs):
    """A stock layer and a MaskedBatchNorm with its state (weights drawn, not 1 and 0)."""
    stock = stock_cls(*args, **kwargs)
    if stock.weight is not None:
        with torch.no_grad():
            stock.weight.uniform_(0.5, 1.5)
            stock.bias.uniform_(-1, 1)
    ours = MaskedBatchNorm(*args, **kwargs)
    ours.load_state_dict(stock.state_dict())
    return ours, stock


# test_batchnorm_buffer_update_when_stats_are_not_tracked
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_clearing_track_running_stats_on_a_built_layer_freezes_the_buffers(mode, gen):
    ours, stock = _twins(nn.BatchNorm1d, 4)
    warm = torch.randn(32, 4, generator=gen) * 3 + 2
    ours(warm), stock(warm)  # running stats that are not the initial ones
    for layer in (ours, stock):
        layer.track_running_stats = False
        layer.train(mode == "train")
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    x = torch.rand(32, 4, generator=gen)
    # train: batch statistics, nothing updated; eval: the frozen running stats
    torch.testing.assert_close(ours(x), stock(x))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
        torch.testing.assert_close(value, stock.state_dict()[key])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_running_stats_both_modes_use_batch_statistics(mode, gen):
    ours, stock = _twins(nn.BatchNorm1d, 4, track_running_stats=False)
    assert ours.running_mean is ours.running_var is ours.num_batches_tracked is None
    ours.train(mode == "train"), stock.train(mode == "train")
    x = torch.randn(6, 4, generator=gen) + 3
    torch.testing.assert_close(ours(x), stock(x))


# test_batchnorm_load_state_dict
def test_loading_a_dict_without_num_batches_tracked_keeps_the_count():
    bn = MaskedBatchNorm(3)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(0))
    bn.num_batches_tracked = torch.tensor(10)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    bn.load_state_dict(OrderedDict(), strict=False)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))


def test_loading_into_a_meta_layer_without_num_batches_tracked_gives_a_real_zero():
    with torch.device("meta"):
        bn = MaskedBatchNorm(3)
    assert bn.num_batches_tracked.device.type == "meta"
    bn.load_state_dict(OrderedDict(), assign=True, strict=False)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(0))


# test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_as_input
@pytest.mark.parametrize("size", [9, 11])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_a_wrong_size_buffer_or_parameter_raises_what_stock_code_catches(name, size):
    bn = MaskedBatchNorm(10).eval() if name.startswith("running") else MaskedBatchNorm(10)
    replacement = torch.rand(size)
    if name in ("weight", "bias"):
        replacement = nn.Parameter(replacement)
    setattr(bn, name, replacement)
    x = torch.rand(2, 10)
    message = f"x shape (2, 10) has 10 channels at axis 1, but {name} has shape ({size},)"
    with pytest.raises(RuntimeError) as caught:  # stock raises RuntimeError
        bn(x)
    assert str(caught.value) == message
    with pytest.raises(ValueError, match="has 10 channels"):  # maskbn's contract: a ValueError
        bn(x)
    assert isinstance(caught.value, ChannelMismatchError)


@pytest.mark.parametrize("size", [9, 11])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_the_functional_core_raises_the_same_for_a_wrong_size_argument(name, size):
    args = {"running_mean": torch.rand(10), "running_var": torch.rand(10), name: torch.rand(size)}
    with pytest.raises(RuntimeError, match=f"but {name} has shape \\({size},\\)"):
        masked_batch_norm(torch.rand(2, 10), **args)


def test_a_wrong_channel_count_of_x_raises_what_stock_code_catches():
    stock, ours = nn.BatchNorm1d(3), MaskedBatchNorm(3)
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError):
        stock(x)
    with pytest.raises(RuntimeError, match=r"expected 3 channels at axis 1, got 5 \(x shape \(4, 5\)\)"):
        ours(x)


# test_batchnorm_raises_error_if_less_than_one_value_per_channel (an expected difference)
def test_one_value_per_channel_in_training_raises_like_stock():
    with pytest.raises(ValueError):
        MaskedBatchNorm(10)(torch.rand(10)[None, :, None])


def test_one_real_row_per_channel_is_valid_training_input():
    # what the masked layer does instead: a padded batch often has one real row
    bn = MaskedBatchNorm(3, momentum=0.1)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.tensor([[5.0, 6.0, 7.0], [0.0, 0.0, 0.0]])
    y = bn(x, mask=torch.tensor([True, False]))
    torch.testing.assert_close(y[0], bn.bias.detach())  # x - mean = 0 on the real row
    torch.testing.assert_close(bn.running_mean, 0.1 * x[0])
    torch.testing.assert_close(bn.running_var, torch.full((3,), 0.9))  # var 0, factor n / max(n - 1, 1) = 1


# test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad
@pytest.mark.parametrize("duals", [(0,), (1,), (1, 2), (0, 1), (0, 1, 2)], ids=lambda d: "dual" + "".join(map(str, d)))
def test_forward_mode_ad_through_the_input_but_not_the_running_stats(duals, gen):
    primals = (torch.randn(3, 2, 5, generator=gen), torch.randn(2, generator=gen), torch.rand(2, generator=gen) + 0.5)
    tangents = tuple(torch.rand(p.shape, generator=gen) for p in primals)

    def run(fn):
        with fwAD.dual_level():
            args = [fwAD.make_dual(p, t) if i in duals else p for i, (p, t) in enumerate(zip(primals, tangents))]
            return fwAD.unpack_dual(fn(*args)).tangent

    def ours(x, mean, var):
        return masked_batch_norm(x, None, mean, var, training=False)

    def stock(x, mean, var):
        return F.batch_norm(x, mean, var, training=False)

    if 0 in duals and (1 in duals or 2 in duals):
        with pytest.raises(RuntimeError, match=r"running_mean|running_var|running stats"):
            run(ours)
    elif 0 in duals:
        torch.testing.assert_close(run(ours), run(stock))
    else:
        assert run(ours) is None  # no tangent reaches the output through the running stats alone


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


# test_batchnorm_nhwc_cpu
@pytest.mark.parametrize(
    ("dtype", "mixed"),
    [
        (torch.float32, False),
        (torch.bfloat16, False),
        (torch.bfloat16, True),
        (torch.float16, False),
        (torch.float16, True),
    ],
    ids=["float32", "bfloat16", "bfloat16-input-float32-layer", "float16", "float16-input-float32-layer"],
)
@pytest.mark.parametrize(
    "shape",
    [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1), (4, 8, 2, 10, 10), (4, 1, 2, 9, 9), (4, 9, 1, 1, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_channels_last_input_gives_channels_last_output_and_the_same_numbers(shape, dtype, mixed, gen):
    x = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    bn = MaskedBatchNorm(shape[1]).to(torch.float32 if mixed else dtype)
    with torch.no_grad():
        bn.weight.uniform_(0, 1, generator=gen), bn.bias.uniform_(0, 1, generator=gen)
    ref = copy.deepcopy(bn)
    inp, ref_inp = _channels_last(x.clone()).requires_grad_(), x.clone().requires_grad_()
    out, ref_out = bn(inp), ref(ref_inp)
    out.backward(_channels_last(grad)), ref_out.backward(grad)
    assert out.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    assert ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(inp.grad, ref_inp.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad)


# test_batchnorm_half_overflow: 65536 values per channel, so a float16 sum of squares would overflow
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["float16-layer", "float32-layer"])
def test_float16_input_does_not_overflow(param_dtype, layout, gen):
    x = torch.randn(4, 8, 128, 128, generator=gen).half()
    if layout == "channels-last":
        x = _channels_last(x)
    x.requires_grad_()
    bn = MaskedBatchNorm(8).to(param_dtype)
    out = bn(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = MaskedBatchNorm(8)
    ref.load_state_dict(copy.deepcopy(bn).float().state_dict())
    ref_out = ref(ref_x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out)
    if param_dtype != torch.float16:
        grad = torch.rand(out.shape, generator=gen).half()
        out.backward(grad), ref_out.backward(grad.clone())
        assert torch.isfinite(x.grad).all()
        torch.testing.assert_close(x.grad, ref_x.grad)


# test_batchnorm_non_contig_cpu
def test_a_permuted_input_in_eval_mode_matches_the_contiguous_one():
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = MaskedBatchNorm(2).eval()
    with torch.no_grad():
        bn.weight.uniform_(), bn.bias.uniform_()
    out = bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, bn(x.contiguous()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_permuted_low_precision_input_with_a_float32_layer(dtype):
    x = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
    bn = MaskedBatchNorm(2).eval()
    torch.testing.assert_close(bn(x).float(), copy.deepcopy(bn)(x.float()), atol=0.05, rtol=0.05)


# test_BatchNorm_empty, through torch's shipped helper
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_size_batch(mode):
    bn = MaskedBatchNorm(3).train(mode == "train")
    x = torch.randn(0, 3, 2, 2, dtype=torch.double)
    _test_module_empty_input(_Asserts(), bn, x)
    torch.testing.assert_close(bn.running_mean, torch.zeros(3))
    torch.testing.assert_close(bn.running_var, torch.ones(3))
    torch.testing.assert_close(bn.weight.grad, torch.zeros(3))
    torch.testing.assert_close(bn.bias.grad, torch.zeros(3))
    assert bn.num_batches_tracked.item() == 0  # maskbn: a batch with no real row is not counted


def test_zero_size_batch_keeps_dtype_and_layout_and_still_checks_the_mask():
    bn = MaskedBatchNorm(4, channel_axis=-1)
    x = torch.randn(2, 0, 4).half()
    y = bn(x, torch.ones(2, 0, dtype=torch.bool))
    assert y.shape == x.shape and y.dtype == torch.float16
    with pytest.raises(ValueError, match="mask shape"):
        bn(x, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"bool mask|integer dtype"):
        bn(x, torch.ones(2, 0))
    with pytest.raises(RuntimeError, match="expected 4 channels"):
        bn(torch.randn(0, 5))


# _test_batchnorm_grad (first and second order of the functional form, train and eval)
@pytest.mark.parametrize("order", ["first", "second"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_functional_gradients_with_running_stats(training, order):
    bs, channels, length = 4, 5, 6
    x = torch.arange(bs * channels * length, dtype=torch.double).view(bs, channels, length).requires_grad_()
    weight = torch.arange(1, channels + 1, dtype=torch.double).requires_grad_()
    bias = torch.arange(channels, dtype=torch.double).requires_grad_()
    running_mean = 1 - torch.arange(channels, dtype=torch.double)
    running_var = 2 * torch.arange(channels, dtype=torch.double)

    def fn(x, weight, bias):
        return masked_batch_norm(x, None, running_mean, running_var, weight, bias, training, 0.1, 0.0001)

    # batched (vmap) gradients are the ModuleInfo tests' subject (test_batched_gradcheck)
    check = {"first": gradcheck, "second": gradgradcheck}[order]
    assert check(fn, (x, weight, bias), check_batched_grad=False)


# _test_batchnorm_eval
@pytest.mark.parametrize("ndim", [2, 3])
def test_eval_mode_is_repeatable(ndim, gen):
    bn = MaskedBatchNorm(3).eval()
    x = torch.rand([3] * ndim, generator=gen, requires_grad=True)
    grad = torch.rand([3] * ndim, generator=gen)
    first = bn(x)
    (first_grad,) = torch.autograd.grad(first, x, grad)
    second = bn(x)
    (second_grad,) = torch.autograd.grad(second, x, grad)
    assert torch.equal(first, second) and torch.equal(first_grad, second_grad)


def test_without_running_stats_eval_equals_train(gen):
    bn = MaskedBatchNorm(3, track_running_stats=False)
    x = torch.rand(4, 3, generator=gen, requires_grad=True)
    grad = torch.rand(4, 3, generator=gen)
    train_out = bn(x)
    (train_grad,) = torch.autograd.grad(train_out, x, grad)
    bn.eval()
    eval_out = bn(x)
    (eval_grad,) = torch.autograd.grad(eval_out, x, grad)
    torch.testing.assert_close(eval_out, train_out)
    torch.testing.assert_close(eval_grad, train_grad)


# _test_batchnorm_affine
@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_with_unit_weight_and_zero_bias_equals_no_affine(ndim, gen):
    plain, affine = MaskedBatchNorm(3, affine=False), MaskedBatchNorm(3, affine=True)
    x = torch.rand([3] * ndim, generator=gen, requires_grad=True)
    outs, grads = [], []
    for bn in (affine, plain):
        out = bn(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out, x, torch.ones_like(out))[0])
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])


# _test_batchnorm_simple_average
def test_momentum_none_averages_the_batches_and_reset_restarts_it(gen):
    bn = MaskedBatchNorm(3, momentum=None)
    zeros, ones = torch.zeros(3), torch.ones(3)
    first, second = torch.rand(4, 3, generator=gen), torch.rand(4, 3, generator=gen)
    stats = []
    for batch in (first, second):
        out = bn(batch)
        stats.append((out, bn.running_mean.clone(), bn.running_var.clone()))
        assert not torch.equal(bn.running_mean, zeros) and not torch.equal(bn.running_var, ones)
        bn.reset_running_stats()
        assert torch.equal(bn.running_mean, zeros) and torch.equal(bn.running_var, ones)
        assert bn.num_batches_tracked.item() == 0
    torch.testing.assert_close(bn(first), stats[0][0])
    torch.testing.assert_close(bn(second), stats[1][0])
    torch.testing.assert_close(bn.running_mean, (stats[0][1] + stats[1][1]) / 2)
    torch.testing.assert_close(bn.running_var, (stats[0][2] + stats[1][2]) / 2)


# _test_batchnorm_update_stats
def test_training_updates_the_stats_and_counter_and_eval_does_not(gen):
    bn = MaskedBatchNorm(3)
    x = torch.rand(4, 3, generator=gen)
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    bn(x)
    assert not torch.equal(mean, bn.running_mean) and not torch.equal(var, bn.running_var)
    assert torch.equal(count + 1, bn.num_batches_tracked)
    bn.eval()
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    bn(x)
    assert torch.equal(mean, bn.running_mean) and torch.equal(var, bn.running_var)
    assert torch.equal(count, bn.num_batches_tracked)


# eps: F.batch_norm refuses eps <= 0 with batch statistics and eps < 0 always
@pytest.mark.parametrize(
    ("eps", "mode", "track", "refused"),
    [
        (0.0, "train", True, True),
        (-1.0, "train", True, True),
        (0.0, "eval", False, True),  # no running stats: batch statistics
        (-1.0, "eval", True, True),
        (0.0, "eval", True, False),  # running stats: eps = 0 is fine
    ],
    ids=["zero-train", "negative-train", "zero-eval-batch-stats", "negative-eval", "zero-eval-running-stats"],
)
def test_eps_is_checked_when_it_is_used_as_stock_does(eps, mode, track, refused, gen):
    x = torch.rand(4, 3, generator=gen)
    for cls in (nn.BatchNorm1d, MaskedBatchNorm):
        bn = cls(3, eps=eps, track_running_stats=track).train(mode == "train")
        if refused:
            with pytest.raises(ValueError, match=r"eps must be (positive|non-negative)"):
                bn(x)
        else:
            assert torch.isfinite(bn(x)).all()


def test_stock_keyword_spellings_build_the_same_layer():
    stock = nn.BatchNorm2d(num_features=3, eps=1e-3, momentum=0.2, affine=True, track_running_stats=True, bias=False)
    ours = MaskedBatchNorm(num_features=3, eps=1e-3, momentum=0.2, affine=True, track_running_stats=True, bias=False)
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (1e-3, 0.2, True, True)


@pytest.mark.parametrize(("stock_cls", "shape"), STOCK.items(), ids=[cls.__name__ for cls in STOCK])
def test_a_stock_layer_of_each_rank_converts_losslessly(stock_cls, shape, gen):
    ours, stock = _twins(stock_cls, 3)
    x = torch.randn(shape, generator=gen)
    for layer in (ours, stock):
        layer(x)
        layer.eval()
    torch.testing.assert_close(ours(x), stock(x))
    torch.testing.assert_close(ours.running_var, stock.running_var)
