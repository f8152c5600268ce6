"""``torch-gather``: what a PyTorch user writes for a padded batch today.

The real rows gathered with the boolean mask, torch's ``nn.BatchNorm1d`` on them,
the result scattered back into zeros: ``y = zeros_like(x); y[mask] = bn(x[mask])``.
Padded rows come back 0 whatever the case asks for (the scatter writes only the
real rows), and the moving variance is torch's unbiased one, as the stock layer
stores it. Driven through our torch adapter's ``TorchLayer``, eager only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from maskbn_conformance.adapter import Backend, LayerConfig
from maskbn_torch.conformance_adapter import TorchLayer, _affine, _layer_dtype, _momentum

from . import expectations


class GatherBatchNorm(nn.Module):
    """``nn.BatchNorm1d`` on the real rows of a padded batch, scattered back into zeros."""

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        self.axis = config.axis
        self.bn = nn.BatchNorm1d(
            config.channels,
            eps=config.epsilon,
            momentum=_momentum(config),
            dtype=_layer_dtype(config),
            **_affine(config, bias_switch=False),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.movedim(self.axis, -1)
        if mask is None:
            return self.bn(rows.reshape(-1, rows.shape[-1])).reshape(rows.shape).movedim(-1, self.axis)
        y = torch.zeros_like(rows)
        y[mask] = self.bn(rows[mask])
        return y.movedim(-1, self.axis)


class TorchGatherBackend(Backend):
    """Anchor: gather / ``nn.BatchNorm1d`` / scatter, eager."""

    name = "torch-gather"
    anchor = True
    stock_moving_var = "unbiased"
    forms = ("eager",)

    def layer(self, config: LayerConfig) -> TorchLayer:
        module = GatherBatchNorm(config)
        return TorchLayer(module, module.bn, config.form)

    def expectations_path(self) -> Path | None:
        return expectations(__name__)
