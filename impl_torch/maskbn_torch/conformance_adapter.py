"""The conformance-harness adapter for maskbn_torch: NumPy in, NumPy out, nothing asserted.

Translations: the spec's ``decay`` is torch's ``1 - momentum``; ``gamma``/``beta``/
``moving_mean``/``moving_var`` are ``weight``/``bias``/``running_mean``/``running_var``;
``center``/``scale`` are torch's ``affine`` flag plus the ``bias`` switch that
``nn.LayerNorm`` also has (a bias without a weight has no torch spelling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskbn_conformance.adapter import AdapterLayer, Backend, Gradients, LayerConfig, Output, Unsupported

from .conformance_sharded import TorchShardedLayer
from .modules import MaskedBatchNorm
from .portable import load_portable, save_portable

_STATE_NAMES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_var": "running_var",
}


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _affine(config: LayerConfig, *, bias_switch: bool) -> dict[str, bool]:
    if config.scale == config.center:
        return {"affine": config.scale}
    if not bias_switch:
        raise Unsupported("torch's stock nn.BatchNorm has gamma and beta together or neither (affine)")
    return {"affine": True, "bias": config.center, "weight": config.scale}


def _momentum(config: LayerConfig) -> float:
    return 1.0 - config.decay


def _layer_dtype(config: LayerConfig) -> torch.dtype | None:
    # float16/bfloat16 runs keep float32 state (the contract); a float64 run gets a float64 layer
    return torch.float64 if config.dtype == "float64" else None


class _StockBatchNorm(nn.Module):
    """torch's own nn.BatchNorm{1,2,3}d, with the channel axis moved to 1 and back."""

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        classes = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
        if config.rank not in classes:
            raise Unsupported(f"torch has no stock batch norm for rank-{config.rank} inputs")
        self.axis = config.axis
        self.bn = classes[config.rank](
            config.channels,
            eps=config.epsilon,
            momentum=_momentum(config),
            dtype=_layer_dtype(config),
            **_affine(config, bias_switch=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.movedim(self.axis, 1)).movedim(1, self.axis)


#: the forms the adapter runs a module in: eager (default) and torch.compile
FORMS = ("eager", "compile")


def _compiled(module: nn.Module) -> nn.Module:
    # Every new layer, shape, dtype and train/eval mode is a recompile of the same
    # forward; past dynamo's default limit (8) it would silently run eager, so the
    # limit goes up: a check in the compile form must run compiled code.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4096)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 65536)
    return torch.compile(module, dynamic=False)


class TorchLayer(AdapterLayer):
    """One module (masked or stock) driven through the adapter protocol."""

    weight_names = _STATE_NAMES

    def __init__(self, module: nn.Module, params: nn.Module, form: str | None = None) -> None:
        if (form or FORMS[0]) not in FORMS:
            raise Unsupported(f"torch runs a layer in the forms {FORMS}, not {form!r}")
        self.module = module
        #: the module holding weight/bias/running_* (the inner nn.BatchNorm for stock)
        self.params = params
        self.form = form
        #: what a call goes through: the module itself, or its torch.compile wrapper
        self.callable = _compiled(module) if form == "compile" else module

    def _call(self, x: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
        if mask is None:
            return self.callable(x)
        return self.callable(x, torch.from_numpy(np.ascontiguousarray(mask)))

    def forward(self, x: np.ndarray, x_dtype: str, mask: np.ndarray | None, training: bool) -> Output:
        self.module.train(training)
        with torch.no_grad():
            y = self._call(torch.from_numpy(np.ascontiguousarray(x)).to(_torch_dtype(x_dtype)), mask)
        return self._output(y)

    def forward_backward(
        self, x: np.ndarray, x_dtype: str, mask: np.ndarray | None, dy: np.ndarray
    ) -> tuple[Output, Gradients]:
        self.module.train(True)
        dtype = _torch_dtype(x_dtype)
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(dtype).requires_grad_(True)
        for p in self.params.parameters():
            p.grad = None
        y = self._call(xt, mask)
        # the gradient of sum(y * dy) is dy itself
        y.backward(torch.from_numpy(np.ascontiguousarray(dy)).to(dtype))
        weight, bias = self.params.weight, self.params.bias
        grads = Gradients(
            x=self._output(xt.grad),
            gamma=None if weight is None else self._output(weight.grad).value,
            beta=None if bias is None else self._output(bias.grad).value,
        )
        return self._output(y), grads

    def hvp(self, x: np.ndarray, x_dtype: str, mask: np.ndarray | None, dy: np.ndarray, v: np.ndarray) -> Output:
        self.module.train(True)
        dtype = _torch_dtype(x_dtype)
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(dtype).requires_grad_(True)
        y = self._call(xt, mask)
        # double backward: the first gradient keeps its graph, the second differentiates it along v
        (grad,) = torch.autograd.grad(y, xt, torch.from_numpy(np.ascontiguousarray(dy)).to(dtype), create_graph=True)
        (product,) = torch.autograd.grad(grad, xt, torch.from_numpy(np.ascontiguousarray(v)).to(dtype))
        return self._output(product)

    def _read_weight(self, name: str) -> np.ndarray | None:
        t = getattr(self.params, name)
        return None if t is None else t.detach().cpu().numpy().copy()

    def _write_weight(self, name: str, value: np.ndarray) -> None:
        with torch.no_grad():
            getattr(self.params, name).copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def _dtype_name(self, tensor: torch.Tensor) -> str:
        return str(tensor.dtype).removeprefix("torch.")

    def _host(self, tensor: torch.Tensor, dtype: str) -> np.ndarray:
        return tensor.detach().cpu().to(_torch_dtype(dtype)).numpy().copy()

    def round_trip(self, directory: Path) -> TorchLayer:
        # the whole module through torch.save, loaded back with the safe weights_only
        # unpickler (the class allowlisted), as a user would ship a model holding it
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "layer.pt"
        torch.save(self.module, path)
        allowed = [type(self.module), type(self.params)]
        with torch.serialization.safe_globals(allowed):
            module = torch.load(path, weights_only=True)
        # a wrapper of torch's BatchNorm (the stock layer, an anchor) keeps it as ``bn``
        params = module.bn if isinstance(self.params, nn.modules.batchnorm._BatchNorm) else module
        return TorchLayer(module, params, self.form)

    def export_portable(self, directory: Path) -> None:
        if not isinstance(self.module, MaskedBatchNorm):
            raise Unsupported("only the masked layer writes the portable format")
        save_portable(self.module, directory)


def masked_module(config: LayerConfig, process_group: Any = None) -> MaskedBatchNorm:
    """The MaskedBatchNorm a LayerConfig describes."""
    return MaskedBatchNorm(
        config.channels,
        eps=config.epsilon,
        momentum=_momentum(config),
        channel_axis=config.axis,
        padded_output=config.padded_output,
        process_group=process_group,
        dtype=_layer_dtype(config),
        unbiased_running_var=config.moving_var == "unbiased",
        **_affine(config, bias_switch=True),
    )


def torch_layer(module: MaskedBatchNorm, form: str | None = None) -> TorchLayer:
    return TorchLayer(module, module, form)


def synchronized_replica(config: LayerConfig, process_group: Any) -> TorchLayer:
    """One replica of the sharded layer, built in its worker process."""
    return torch_layer(masked_module(config, process_group=process_group))


class TorchBackend(Backend):
    """maskbn_torch for the conformance harness."""

    name = "torch"
    stock_moving_var = "unbiased"
    forms = FORMS
    fuzz_example_scale = 20

    def layer(self, config: LayerConfig) -> TorchLayer:
        return torch_layer(masked_module(config), config.form)

    def sharded_layer(self, config: LayerConfig, num_shards: int) -> TorchShardedLayer:
        # fail here, not in k worker processes, for what torch cannot build at all
        masked_module(config)
        return TorchShardedLayer(synchronized_replica, config, num_shards)

    def stock_layer(self, config: LayerConfig) -> TorchLayer:
        module = _StockBatchNorm(config)
        return TorchLayer(module, module.bn, config.form)

    def import_portable(self, directory: Path) -> TorchLayer:
        return torch_layer(load_portable(directory))

    def from_stock_checkpoint(self, stock: TorchLayer, directory: Path) -> TorchLayer:
        # torch's usual checkpoint: the stock layer's state_dict through torch.save,
        # loaded (weights_only) into a masked layer built with the same configuration
        bn = stock.params
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "batchnorm.pt"
        torch.save(bn.state_dict(), path)
        module = MaskedBatchNorm(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            channel_axis=stock.module.axis,
            dtype=bn.running_mean.dtype,
            # what the stock layer's running_var holds, and what it would go on storing
            unbiased_running_var=True,
        )
        module.load_state_dict(torch.load(path, weights_only=True))
        return torch_layer(module, stock.form)

    def expectations_path(self) -> Path | None:
        return Path(__file__).with_name("conformance_expectations.yaml")
