"""``flax-stock``: Flax's own ``linen.BatchNorm`` called with ``mask=``, default arguments.

Flax's mask has the input's shape (it marks elements, not rows), so the
adapter gives it the channel axis, as a user would (``mask[..., None]``). Its
defaults stand, ``use_fast_variance=True`` (E[x^2] - E[x]^2) included; only
``dtype`` is the run dtype, so the output keeps x's dtype as ours does. Flax
normalizes every row, padded ones too (our ``padded_output: normalize``).
Driven through our jax adapter, under ``jax.jit``; its sync mode, ``axis_name``,
under ``jax.shard_map`` on the forced CPU devices ours use.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from maskbn_conformance.adapter import Backend, LayerConfig, Unsupported
from maskbn_jax.conformance_adapter import FlaxStockLayer, JaxShardedLayer, request_shard_devices

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

    def _flax_mask(self, x, mask):
        if mask is not None and mask.ndim == x.ndim - 1:
            # Flax's mask marks elements: the row mask gains the channel axis, as a user writes it
            mask = jnp.expand_dims(mask, self.config.axis % x.ndim)
        return mask

    def _run(self, x, mask, training, params=None):
        return self._call(x, mask, training, params)


class FlaxStockBackend(Backend):
    """Anchor: ``flax.linen.BatchNorm()(x, mask=m[..., None])``."""

    name = "flax-stock"
    anchor = True
    forms = ("jit",)

    def __init__(self) -> None:
        request_shard_devices()

    def layer(self, config: LayerConfig) -> FlaxMaskedLayer:
        return FlaxMaskedLayer(config)

    def sharded_layer(self, config: LayerConfig, num_shards: int) -> JaxShardedLayer:
        """``BatchNorm(axis_name=...)`` under ``shard_map``, Flax's sync mode, on the devices ours use."""
        return JaxShardedLayer(config, num_shards, FlaxMaskedLayer)

    def expectations_path(self) -> Path | None:
        return expectations(__name__)
