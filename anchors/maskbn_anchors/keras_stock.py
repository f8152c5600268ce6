"""``keras-stock``: Keras' own ``BatchNormalization`` called with ``mask=``.

Keras takes the statistics from the masked positions and normalizes every row
with them, padded ones included (our ``padded_output: normalize``); it has no
zero-padding mode and no unbiased moving variance. ``synchronized=True`` is its
sync mode, run on the same MirroredStrategy of logical CPU devices as ours.
Driven through our tf adapter, in the eager form.
"""

from __future__ import annotations

from pathlib import Path

from maskbn_conformance.adapter import LayerConfig, Unsupported
from maskbn_tf.conformance_adapter import TFBackend, TFLayer

from . import expectations


class KerasStockLayer(TFLayer):
    def export_portable(self, directory: Path) -> None:
        raise Unsupported("Keras' BatchNormalization has no framework-neutral format")


class KerasStockBackend(TFBackend):
    """Anchor: ``keras.layers.BatchNormalization()(x, mask=m)``, eager."""

    name = "keras-stock"
    anchor = True

    def __init__(self) -> None:
        super().__init__()
        self.forms = ("eager",)

    def layer(self, config: LayerConfig, synchronized: bool = False) -> KerasStockLayer:
        if config.padded_output != "normalize":
            raise Unsupported(
                "Keras' BatchNormalization normalizes padded rows too: padded_output zero has no spelling"
            )
        if config.moving_var != "population":
            raise Unsupported("Keras' BatchNormalization stores the population variance only")
        return KerasStockLayer(self.stock_layer(config, synchronized).layer, config)

    def process_variants(self) -> dict[str, dict[str, str]]:
        # on TensorFlow only: the stock layer on Keras' other backends would add two processes
        # to the report for a comparison that the "why" table does not make
        return {}

    def import_portable(self, directory: Path) -> KerasStockLayer:
        raise Unsupported("Keras' BatchNormalization has no framework-neutral format")

    def from_stock_checkpoint(self, stock: TFLayer, directory: Path) -> TFLayer:
        raise Unsupported("the anchor is the stock layer: there is no checkpoint to convert")

    def expectations_path(self) -> Path | None:
        return expectations(__name__)
