"""The analytic backward: gradcheck in float64, parity with autograd of compacted BN, padded rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_helpers import prefix_mask, real_rows

from maskbn_torch import MaskedBatchNorm, masked_batch_norm


def _single_real():
    m = torch.zeros(2, 3, dtype=torch.bool)
    m[0, 1] = True
    return m


GRADCHECK_CASES = {
    # name: (x shape, channel axis, mask or None, training, padded_output, n params: 2 weight+bias, 1 weight, 0)
    "train-padded-rows": ((3, 2, 4), 1, prefix_mask(3, 4, [4, 1, 2]), True, "normalize", 2),
    "train-padded-zero": ((3, 2, 4), 1, prefix_mask(3, 4, [3, 0, 2]), True, "zero", 2),
    "train-channels-last": ((2, 5, 3), -1, prefix_mask(2, 5, [2, 4]), True, "normalize", 2),
    "train-bchw": (
        (2, 2, 2, 3),
        1,
        torch.tensor([[[1, 0, 1], [1, 1, 0]], [[0, 0, 1], [0, 0, 0]]]),
        True,
        "zero",
        2,
    ),
    "train-no-mask": ((4, 3), 1, None, True, "normalize", 2),
    "train-no-affine": ((3, 2, 4), 1, prefix_mask(3, 4, [4, 1, 2]), True, "normalize", 0),
    "train-weight-only": ((3, 2, 4), 1, prefix_mask(3, 4, [4, 1, 2]), True, "zero", 1),
    "eval-weight-only": ((3, 2, 4), 1, prefix_mask(3, 4, [4, 1, 2]), False, "normalize", 1),
    "train-empty-mask": ((2, 2, 3), 1, torch.zeros(2, 3, dtype=torch.bool), True, "normalize", 2),
    "train-empty-mask-zero": ((2, 2, 3), 1, torch.zeros(2, 3, dtype=torch.bool), True, "zero", 2),
    "train-single-real-row": ((2, 2, 3), 1, _single_real(), True, "normalize", 2),
    "eval-padded-rows": ((3, 2, 4), 1, prefix_mask(3, 4, [4, 1, 2]), False, "normalize", 2),
    "eval-padded-zero": ((3, 2, 4), 1, prefix_mask(3, 4, [4, 1, 2]), False, "zero", 2),
}


def _case_function(case, gen):
    """(f, inputs) of one GRADCHECK_CASES entry, float64."""
    shape, axis, mask, training, padded_output, n_params = case
    channels = shape[axis]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    weight = (torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(channels, generator=gen, dtype=torch.float64).requires_grad_()
    running_mean = torch.randn(channels, generator=gen, dtype=torch.float64)
    running_var = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    keep = None if mask is None else (mask != 0).unsqueeze(axis)

    def f(x, *params):
        y = masked_batch_norm(
            x,
            mask,
            running_mean.clone(),  # fresh buffers: every evaluation sees the same state
            running_var.clone(),
            *params,
            training=training,
            channel_axis=axis,
            padded_output=padded_output,
        )
        # padded output rows are constants by contract, which finite differences cannot
        # see; in "normalize" mode check the real rows (padded rows: the test below)
        return y if keep is None or padded_output == "zero" else torch.where(keep, y, 0.0)

    return f, (x, weight, bias)[: 1 + n_params]


@pytest.mark.parametrize("case", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
def test_gradcheck_reverse_and_forward_mode_float64(case, gen):
    f, inputs = _case_function(case, gen)
    assert torch.autograd.gradcheck(
        f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, check_forward_ad=True, check_backward_ad=True
    )


@pytest.mark.parametrize("case", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
def test_gradgradcheck_float64(case, gen):
    # second derivatives through the backward (double backward, Hessian-vector products)
    f, inputs = _case_function(case, gen)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_equals_stock_batch_norm_without_mask(training, gen):
    x = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    results = []
    for layer in (MaskedBatchNorm(3, dtype=torch.float64), nn.BatchNorm1d(3, dtype=torch.float64)):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            layer.running_var.fill_(2.0)
        layer.train(training)
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((layer(xi) * dy).sum(), xi, create_graph=True)
        # a Hessian-vector product, for x and for the weight
        hx, hw = torch.autograd.grad((gx * v).sum(), (xi, layer.weight), allow_unused=True)
        results.append((gx, hx, torch.zeros(3, dtype=torch.float64) if hw is None else hw))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_torch_func_hvp_and_jvp_match_compacted_batch_norm(gen):
    x = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    mask = prefix_mask(3, 5, [5, 2, 3])
    t = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def loss(x):
        y = masked_batch_norm(x, mask, training=True)
        return (torch.where(mask.unsqueeze(1), y, 0.0) ** 3).sum()

    def compacted_loss(rows):
        return (nn.functional.batch_norm(rows, None, None, training=True) ** 3).sum()

    rows, t_rows = real_rows(x, mask, 1), real_rows(t, mask, 1)
    # Hessian-vector product, forward over reverse; padded positions of t must not matter
    t_padded = torch.where(mask.unsqueeze(1), t, 1e3)
    _, hvp = torch.func.jvp(torch.func.grad(loss), (x,), (t_padded,))
    _, want_hvp = torch.func.jvp(torch.func.grad(compacted_loss), (rows,), (t_rows,))
    torch.testing.assert_close(real_rows(hvp, mask, 1), want_hvp)
    padded = ~mask.unsqueeze(1).expand_as(x)
    assert torch.equal(hvp[padded], torch.zeros_like(hvp[padded]))
    assert torch.func.hessian(loss)(x).shape == x.shape * 2
    _, tangent = torch.func.jvp(loss, (x,), (t,))
    _, want_tangent = torch.func.jvp(compacted_loss, (rows,), (t_rows,))
    torch.testing.assert_close(tangent, want_tangent)


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_padded_output_rows_send_no_gradient_anywhere(padded_output, training, gen):
    bn = MaskedBatchNorm(3, padded_output=padded_output).train(training)
    x = torch.randn(2, 3, 5, generator=gen).requires_grad_()
    mask = prefix_mask(2, 5, [3, 1])
    y = bn(x, mask)
    pad = ~mask[:, None, :].expand_as(x)
    # a loss over padded outputs only: nothing may receive gradient
    (y * pad * torch.randn(x.shape, generator=gen)).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(bn.weight.grad, torch.zeros(3)) and torch.equal(bn.bias.grad, torch.zeros(3))


@pytest.mark.parametrize("axis", [1, -1], ids=["channels-first", "channels-last"])
def test_gradients_equal_stock_batch_norm_on_compacted_rows(axis, gen):
    x = torch.randn(4, 6, 6, generator=gen) * 2 + 3
    mask = prefix_mask(4, 6, [6, 2, 0, 5])
    dy = torch.randn(x.shape, generator=gen)
    bn = MaskedBatchNorm(6, channel_axis=axis)
    stock = nn.BatchNorm1d(6)
    with torch.no_grad():
        for layer in (bn, stock):
            layer.weight.copy_(torch.linspace(0.5, 2.0, 6))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    xm = x.clone().requires_grad_()
    bn(xm, mask).backward(dy)
    rows = real_rows(x, mask, axis).requires_grad_()
    stock(rows).backward(real_rows(dy, mask, axis))
    torch.testing.assert_close(real_rows(xm.grad, mask, axis), rows.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.weight.grad, stock.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, stock.bias.grad, rtol=1e-5, atol=1e-5)
    pad = ~mask.unsqueeze(axis).expand_as(x)
    assert torch.equal(xm.grad[pad], torch.zeros_like(xm.grad[pad]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype, gen):
    x = torch.randn(3, 4, 16, generator=gen) * 4 + 1
    mask = prefix_mask(3, 16, [16, 5, 9])
    dy = torch.randn(x.shape, generator=gen)
    grads = {}
    for dt in (dtype, torch.float64):
        bn = MaskedBatchNorm(4, dtype=torch.float64 if dt == torch.float64 else None)
        xi = x.to(dtype).to(dt).requires_grad_()  # the same rounded input for both
        bn(xi, mask).backward(dy.to(dtype).to(dt))
        grads[dt] = (xi.grad, bn.weight.grad, bn.bias.grad)
    assert grads[dtype][0].dtype == dtype and grads[dtype][1].dtype == torch.float32
    tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(grads[dtype], grads[torch.float64]):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saved_for_backward_is_close_to_native_batch_norm(gen):
    x = torch.randn(8, 16, 256, generator=gen).requires_grad_()
    mask = prefix_mask(8, 256, [256, 100, 7, 200, 1, 0, 30, 90])
    native = _saved_bytes(lambda: nn.BatchNorm1d(16)(x))
    masked = _saved_bytes(lambda: MaskedBatchNorm(16)(x, mask))
    # x itself plus the 1-byte-per-position bool mask and per-channel vectors
    assert masked <= native + mask.numel() + 64 * 16
