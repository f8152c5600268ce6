"""torch's own BatchNorm1d/2d/3d ModuleInfos, run from the installed torch against MaskedBatchNorm.

``torch.testing._internal.common_modules`` ships the inputs and error inputs that torch's
``test/test_modules.py`` feeds every module. Here each ModuleInfo input builds our class
with the stock constructor arguments (forward without a mask, or with an all-real one)
and goes through the checks test_modules.py makes (forward, factory kwargs, pickle,
non-contiguous inputs, gradcheck, gradgradcheck, memory format, train/eval, meta-device
construction, error inputs), compared with the stock module holding the same weights
where a comparison makes sense. Expected differences: ``expected_differences.yaml``.
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch import nn
from torch._subclasses.meta_utils import assert_metadata_eq
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

from maskbn_torch import MaskedBatchNorm

BATCH_NORM_INFOS = [info for info in module_db if info.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]
MODES = {"train": True, "eval": False}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _inputs(info, dtype=torch.float32, requires_grad=False, training=True):
    # the inputs are random (torch's global generator): seed for reproducible cases
    torch.manual_seed(0)
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


CASES = [
    pytest.param(info, index, id=f"{info.name}-{module_input.desc or 'default'}")
    for info in BATCH_NORM_INFOS
    for index, module_input in enumerate(_inputs(info))
]
ERROR_CASES = [
    pytest.param(info, index, id=f"{info.name}-error{index}-{error.module_error_input.constructor_input.kwargs}")
    for info in BATCH_NORM_INFOS
    for index, error in enumerate(info.module_error_inputs_func(info, "cpu", torch.float32, False, True))
]


def _module_input(info, index, dtype, requires_grad, training):
    return _inputs(info, dtype, requires_grad, training)[index]


def _x(module_input):
    (x,) = module_input.forward_input.args
    return x


def _build(stock_cls, module_input, dtype, training):
    """(ours, stock) from the ModuleInput's constructor args, holding the same non-trivial state."""
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    stock = stock_cls(*args, **kwargs).to(dtype).train(training)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if stock.weight is not None:
            stock.weight.copy_(torch.rand(stock.num_features, generator=gen, dtype=dtype) + 0.5)
        if stock.bias is not None:
            stock.bias.copy_(torch.randn(stock.num_features, generator=gen, dtype=dtype))
        if stock.running_mean is not None:
            stock.running_mean.copy_(torch.randn(stock.num_features, generator=gen, dtype=dtype))
            stock.running_var.copy_(torch.rand(stock.num_features, generator=gen, dtype=dtype) + 0.5)
            stock.num_batches_tracked.fill_(3)  # so momentum=None's cumulative average has a history
    ours = MaskedBatchNorm(*args, **kwargs).to(dtype).train(training)
    ours.load_state_dict(stock.state_dict())
    return ours, stock


def _pair(info, index, dtype, training, requires_grad=False):
    module_input = _module_input(info, index, dtype, requires_grad, training)
    ours, stock = _build(info.module_cls, module_input, dtype, training)
    return module_input, ours, stock


def _all_real_mask(x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
    return torch.ones(x.shape[:channel_axis] + x.shape[channel_axis + 1 :], dtype=torch.bool)


def _assert_same_state(ours: nn.Module, stock: nn.Module) -> None:
    theirs = stock.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[key], msg=lambda m, key=key: f"{key}: {m}")


def _assert_parameters_and_buffers_are(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.device == device, f"{name} is on {tensor.device}, not {device}"
        if tensor.dtype.is_floating_point:
            assert tensor.dtype == dtype, f"{name} is {tensor.dtype}, not {dtype}"


@pytest.mark.parametrize("mask", ["no-mask", "all-real-mask"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_forward_matches_stock(info, index, training, dtype, mask):
    module_input, ours, stock = _pair(info, index, dtype, training)
    x = _x(module_input)
    kwargs = {"mask": _all_real_mask(x)} if mask == "all-real-mask" else {}
    for _ in range(2):  # two steps: the running stats' update rule, not only its first step
        torch.testing.assert_close(ours(x, **kwargs), stock(x))
        _assert_same_state(ours, stock)
    # as test_modules.py: a dtype cast by method keeps every parameter and buffer in that dtype
    cast = {torch.float32: "float", torch.float64: "double"}[dtype]
    getattr(ours, cast)()
    ours(x, **kwargs)
    _assert_parameters_and_buffers_are(ours, torch.device("cpu"), dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_factory_kwargs_and_repr(info, index, dtype):
    module_input = _module_input(info, index, dtype, False, True)
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    ours = MaskedBatchNorm(*args, **kwargs, device="cpu", dtype=dtype)
    _assert_parameters_and_buffers_are(ours, torch.device("cpu"), dtype)
    if ours.num_batches_tracked is not None:
        assert ours.num_batches_tracked.dtype == torch.long
    assert repr(ours).startswith("MaskedBatchNorm(") and str(ours) == repr(ours)


@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_pickle(info, index, training):
    module_input, ours, _ = _pair(info, index, torch.float32, training)
    x = _x(module_input)
    output = ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copied = torch.load(buffer, weights_only=False)  # a whole pickled module, as test_modules.py loads it
    torch.testing.assert_close(copied(x), output)


@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_non_contiguous_input_and_grad(info, index, training):
    module_input, ours, _ = _pair(info, index, torch.float32, training, requires_grad=True)
    x = _x(module_input)
    out = ours(x)
    grad_out = torch.randn_like(out)
    want_x_grad, *want_param_grads = torch.autograd.grad(out, (x, *ours.parameters()), grad_out)

    def non_contiguous(t: torch.Tensor) -> torch.Tensor:
        # as test_modules.py: every other element of a doubled last dim
        return torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2].requires_grad_(t.requires_grad)

    for inp, g in [
        (non_contiguous(x), grad_out),
        (x, non_contiguous(grad_out)),
        (non_contiguous(x), non_contiguous(grad_out)),
    ]:
        out = ours(inp)
        torch.testing.assert_close(out, ours(x))
        x_grad, *param_grads = torch.autograd.grad(out, (inp, *ours.parameters()), g)
        torch.testing.assert_close(x_grad, want_x_grad, atol=1e-4, rtol=0)
        torch.testing.assert_close(param_grads, want_param_grads)


def _check_gradients(info, index, training, check) -> None:
    """test_modules.py's gradient check: the total derivative, then each parameter's alone."""
    module_input, ours, _ = _pair(info, index, torch.float64, training, requires_grad=True)
    x = _x(module_input)
    params = tuple(ours.parameters())

    def fn(x, *params):
        return ours(x)

    assert check(fn, (x, *params))
    for p in params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        assert check(fn, (x, *params))
        p.requires_grad_(False)


@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_gradcheck(info, index, training):
    # the first-order values alone; the vmap-over-backward part test_modules.py adds is next
    _check_gradients(info, index, training, functools.partial(gradcheck, check_batched_grad=False))


@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_batched_gradcheck(info, index, training):
    # as test_modules.py (torch's gradcheck wrapper checks batched grads by default): the
    # backward must also run under vmap, as torch.func.jacrev and jacobian(vectorize=True) use it
    _check_gradients(info, index, training, gradcheck)


@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_gradgradcheck(info, index, training):
    assert info.supports_gradgrad  # stock batch norm has second derivatives: so must we
    _check_gradients(info, index, training, gradgradcheck)


@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_memory_format(info, index, training):
    module_input, ours, _ = _pair(info, index, torch.float32, training, requires_grad=True)
    x = _x(module_input)
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    want_out = ours(x)
    grad_out = torch.rand_like(want_out)
    want_grads = torch.autograd.grad(want_out, (x, *ours.parameters()), grad_out) if training else None
    for input_format in [torch.contiguous_format, formats.get(x.dim(), torch.contiguous_format)]:
        inp = x.detach().clone().to(memory_format=input_format).requires_grad_()
        for module_format in [torch.preserve_format, torch.contiguous_format, input_format]:
            ours.to(memory_format=module_format)
            out = ours(inp)
            torch.testing.assert_close(out, want_out)
            assert out.is_contiguous(memory_format=input_format)
            if training:
                grads = torch.autograd.grad(out, (inp, *ours.parameters()), torch.empty_like(out).copy_(grad_out))
                torch.testing.assert_close(grads, want_grads)
                assert grads[0].is_contiguous(memory_format=input_format)


@pytest.mark.parametrize(("info", "index"), CASES)
def test_train_and_eval_differ_as_the_module_info_says(info, index):
    module_input, ours, _ = _pair(info, index, torch.float32, True)
    del ours.training
    # the forward reads `training`, as stock's does (ModuleInfo: train_and_eval_differ=True)
    assert info.train_and_eval_differ
    with pytest.raises(AttributeError, match="'training'"):
        ours(_x(module_input))


@pytest.mark.parametrize(("info", "index"), CASES)
def test_meta_device_construction_matches_cpu(info, index):
    module_input = _module_input(info, index, torch.float32, False, True)
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    on_cpu = MaskedBatchNorm(*args, **kwargs)
    with torch.device("meta"):
        on_meta = MaskedBatchNorm(*args, **kwargs)
    pairs = [*zip(on_meta.parameters(), on_cpu.parameters()), *zip(on_meta.buffers(), on_cpu.buffers())]
    assert len(pairs) == len(list(on_cpu.parameters())) + len(list(on_cpu.buffers()))
    for meta, cpu in pairs:
        assert meta.is_meta

        def assert_equal(a, b, msg=None):
            assert a == b, msg

        assert_metadata_eq(assert_equal, meta, cpu)


@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), CASES)
def test_state_dict_round_trip_with_stock(info, index, training):
    module_input, ours, stock = _pair(info, index, torch.float32, training)
    x = _x(module_input)
    stock(x)  # a step, so the state is the stock layer's own
    fresh = copy.deepcopy(ours)
    fresh.load_state_dict(stock.state_dict())  # strict: the very same keys
    _assert_same_state(fresh, stock)
    fresh.eval(), stock.eval()
    torch.testing.assert_close(fresh(x), stock(x))
    fresh.train(training)
    fresh(x)
    back = copy.deepcopy(stock)
    back.load_state_dict(fresh.state_dict())  # and back into the stock class
    _assert_same_state(fresh, back)


@pytest.mark.parametrize("training", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(("info", "index"), ERROR_CASES)
def test_error_inputs(info, index, training):
    error = info.module_error_inputs_func(info, "cpu", torch.float32, False, training)[index]
    module_input = error.module_error_input
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error.error_type, match=error.error_regex):
            MaskedBatchNorm(*args, **kwargs)
        return
    ours = MaskedBatchNorm(*args, **kwargs)
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    with pytest.raises(error.error_type, match=error.error_regex):
        ours(*module_input.forward_input.args, **module_input.forward_input.kwargs)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a call that raised"


def test_every_batch_norm_module_info_is_covered():
    # the installed torch defines what runs: fail loudly if its batch-norm ModuleInfos go away
    assert sorted(info.name for info in BATCH_NORM_INFOS) == ["nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"]
    assert len(CASES) >= 20 and len(ERROR_CASES) >= 6
