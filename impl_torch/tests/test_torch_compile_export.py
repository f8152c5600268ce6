"""torch.compile (fullgraph) and torch.export: same numbers as eager, no data-dependent graph breaks.

Compilation is slow on CPU, so these cases are few and small; the aot_eager backend
exercises dynamo + AOTAutograd (which trace the custom autograd.Function), and one
case goes through inductor for real codegen.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch_helpers import prefix_mask

from maskbn_torch import MaskedBatchNorm


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(module, x, mask, dy):
    x = x.clone().requires_grad_()
    y = module(x, mask)
    y.backward(dy)
    return y.detach(), x.grad


def _assert_same_state(a, b):
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=key)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager_without_recompiling_for_an_empty_mask(backend, gen):
    eager = MaskedBatchNorm(4, channel_axis=-1, padded_output="zero")
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend, dynamic=False)
    x = torch.randn(3, 6, 4, generator=gen) * 2 + 1
    dy = torch.randn(x.shape, generator=gen)
    masks = [prefix_mask(3, 6, [6, 2, 4]), torch.zeros(3, 6, dtype=torch.bool), prefix_mask(3, 6, [1, 0, 5])]
    for i, mask in enumerate(masks):
        # the empty mask must take the where-selected path inside the same graph
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = _step(compiled, x, mask, dy)
        want = _step(eager, x, mask, dy)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    assert compiled_module.num_batches_tracked.item() == 2
    _assert_same_state(compiled_module, eager)
    compiled_module.eval(), eager.eval()
    torch.testing.assert_close(compiled(x, masks[0]), eager(x, masks[0]))


def test_compile_momentum_none_and_half_precision(gen):
    eager = MaskedBatchNorm(3, momentum=None)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for lengths in ([5, 2], [0, 0], [3, 3]):
        x = torch.randn(2, 3, 5, generator=gen).to(torch.bfloat16)
        mask = prefix_mask(2, 5, lengths)
        torch.testing.assert_close(compiled(x, mask), eager(x, mask))
    _assert_same_state(compiled_module, eager)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_matches_eager_and_carries_the_running_stat_update(training, gen):
    layer = MaskedBatchNorm(4, channel_axis=-1).train(training)
    layer(torch.randn(3, 6, 4, generator=gen) + 2, prefix_mask(3, 6, [6, 1, 3]))  # non-trivial stats
    x = torch.randn(3, 6, 4, generator=gen)
    mask = prefix_mask(3, 6, [6, 2, 4])
    exported = torch.export.export(copy.deepcopy(layer), (x, mask)).module()
    for inputs in ((x, mask), (x, torch.zeros_like(mask)), (x * 3, mask)):
        torch.testing.assert_close(exported(*inputs), layer(*inputs))
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_export_with_a_dynamic_batch_and_length(training, with_mask, gen):
    layer = MaskedBatchNorm(4, channel_axis=-1).train(training)
    batch, length = torch.export.Dim("batch", min=2), torch.export.Dim("length", min=2)
    example_mask = prefix_mask(3, 6, [6, 2, 4]) if with_mask else None
    program = torch.export.export(
        copy.deepcopy(layer),
        (torch.randn(3, 6, 4, generator=gen), example_mask),
        dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length} if with_mask else None),
    )
    exported = program.module()
    x = torch.randn(5, 9, 4, generator=gen)
    mask = prefix_mask(5, 9, [9, 1, 0, 4, 7]) if with_mask else None
    torch.testing.assert_close(exported(x, mask), layer(x, mask))
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
def test_compiled_garbage_padding_changes_no_real_bit(padded_output, gen):
    # the compiled path masks with masked_fill instead of the eager bit-AND: it must
    # isolate NaN/Inf padding just as bit-for-bit
    x = torch.randn(3, 6, 4, generator=gen) * 2 + 1
    dy = torch.randn(x.shape, generator=gen)
    mask = prefix_mask(3, 6, [6, 2, 0])
    real = mask[..., None].expand_as(x)
    dy = torch.where(real, dy, 0.0)
    runs = []
    for fill in (0.0, float("nan"), float("inf")):
        module = MaskedBatchNorm(4, channel_axis=-1, padded_output=padded_output)
        compiled = torch.compile(module, fullgraph=True, backend="inductor", dynamic=False)
        y, dx = _step(compiled, torch.where(real, x, fill), mask, dy)
        runs.append((y[real], dx, module.running_mean, module.running_var, module.weight.grad, module.bias.grad))
    for garbage in runs[1:]:
        for got, want in zip(garbage, runs[0]):
            assert torch.equal(got, want)
