"""``flax-stock``: Flax's own ``linen.BatchNorm`` called with ``mask=``, default arguments.

Flax's mask has the input's shape (it marks elements, not rows), so the
adapter gives it the channel axis, as a user would (``mask[..., None]``). Its
defaults stand, ``use_fast_variance=True`` (E[x^2] - E[x]^2) included; only
``dtype`` is the run dtype, so the output keeps x's dtype as ours does. Flax
normalizes every row, padded ones too (our ``padded_output: normalize``).
Driven through our jax adapter, under ``jax.jit``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from maskbn_conformance.adapter import Backend, LayerConfig, Unsupported
from maskbn_jax.conformance_adapter import FlaxStockLayer, request_shard_devices

from . import expectations


class FlaxMaskedLayer(FlaxStockLayer):
    def __init__(self, config: LayerConfig):
        if config.padded_output != "normalize":
            raise Unsupported("Flax's BatchNorm normalizes padded rows too: padded_output zero has no spelling")
        if config.moving_var != "population":
            raise Unsupported("Flax's BatchNorm stores the population variance only")
        super().__init__(config)

    def _numerics(self, config: LayerConfig) -> dict:
        return {}  # Flax's defaults: use_fast_variance=True, float32 reductions

    @functools.cached_property
    def _fns(self):
        def apply(x, mask, params, state, training):
            variables = {"params": params, "batch_stats": state}
            if not training:
                return self.module.apply(variables, x, use_running_average=True, mask=mask), state
            y, updated = self.module.apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
            return y, dict(updated["batch_stats"])

        return {t: jax.jit(functools.partial(apply, training=t)) for t in (True, False)}

    def _run(self, x, mask, training, params=None):
        if mask is not None and np.ndim(mask) == np.ndim(x) - 1:
            # Flax's mask marks elements: the row mask gains the channel axis, as a user writes it
            mask = np.expand_dims(mask, self.config.axis % np.ndim(x))
        return self._fns[training](x, mask, self.params if params is None else params, self.state)


class FlaxStockBackend(Backend):
    """Anchor: ``flax.linen.BatchNorm()(x, mask=m[..., None])``."""

    name = "flax-stock"
    anchor = True
    forms = ("jit",)

    def __init__(self) -> None:
        request_shard_devices()

    def layer(self, config: LayerConfig) -> FlaxMaskedLayer:
        return FlaxMaskedLayer(config)

    def expectations_path(self) -> Path | None:
        return expectations(__name__)
