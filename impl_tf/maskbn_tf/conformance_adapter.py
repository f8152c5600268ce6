"""The conformance-harness adapter for maskbn_tf: NumPy in, NumPy out, no assertions.

Keras and TensorFlow are imported when the backend is instantiated, not when
this module is, so listing the installed backends stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from maskbn_conformance.adapter import Gradients, LayerConfig, Output

# neutral state names -> Keras weight names
_WEIGHT_NAMES = {"gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean", "moving_var": "moving_variance"}

# The run dtype is the dtype of x. Keras expresses "float32 state, low-precision compute"
# as a mixed policy, so a float16 run is a mixed_float16 layer (Keras would otherwise
# autocast the float16 input up to the layer's float32 compute dtype).
_POLICIES = {
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "float32": "float32",
    "float64": "float64",
}


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    if keras.config.backend() != "tensorflow":
        raise RuntimeError(
            f"the 'tf' maskbn backend needs KERAS_BACKEND=tensorflow, but Keras runs on {keras.config.backend()!r}"
        )
    return keras


class TFLayer:
    """One Keras layer (masked, or stock BatchNormalization for parity) behind the adapter protocol."""

    def __init__(self, layer, config: LayerConfig):
        import tensorflow as tf

        self._tf = tf
        self._keras = _keras()
        self.layer = layer
        self.config = config

    def _tensor(self, array: np.ndarray, dtype: str):
        return self._tf.cast(self._tf.constant(np.asarray(array)), dtype)

    def _mask(self, mask: np.ndarray | None):
        # keeps the NumPy dtype (bool, int8, uint8, int32, int64, or float on purpose)
        return None if mask is None else self._tf.constant(np.asarray(mask))

    def _output(self, tensor) -> Output:
        name = self._keras.backend.standardize_dtype(tensor.dtype)
        wide = "float64" if name == "float64" else "float32"
        return Output(self._tf.cast(tensor, wide).numpy(), name)

    def _call(self, x, mask, training):
        if mask is None:
            return self.layer(x, training=training)
        return self.layer(x, training=training, mask=mask)

    def forward(self, x, x_dtype, mask, training):
        return self._output(self._call(self._tensor(x, x_dtype), self._mask(mask), training))

    def forward_backward(self, x, x_dtype, mask, dy):
        x_t = self._tensor(x, x_dtype)
        mask_t = self._mask(mask)
        weights = [self.layer.gamma if self.config.scale else None, self.layer.beta if self.config.center else None]
        with self._tf.GradientTape() as tape:
            tape.watch(x_t)
            y = self._call(x_t, mask_t, True)
        # the vector-Jacobian product with dy is the gradient of sum(y * dy)
        sources = [x_t] + [w for w in weights if w is not None]
        grads = iter(tape.gradient(y, sources, output_gradients=self._tensor(dy, x_dtype)))
        dx = self._output(next(grads))
        dgamma, dbeta = (None if w is None else np.asarray(next(grads).numpy()) for w in weights)
        return self._output(y), Gradients(x=dx, gamma=dgamma, beta=dbeta)

    def get_state(self):
        state = {}
        for neutral, name in _WEIGHT_NAMES.items():
            variable = getattr(self.layer, name)
            if variable is not None:
                state[neutral] = np.array(variable.numpy())
        return state

    def set_state(self, state):
        for neutral, value in state.items():
            variable = getattr(self.layer, _WEIGHT_NAMES[neutral])
            if variable is not None:
                variable.assign(np.asarray(value, dtype=variable.dtype))

    def round_trip(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "layer.keras"
        self._keras.saving.save_model(self.layer, path)
        return TFLayer(self._keras.saving.load_model(path), self.config)


class TFBackend:
    """maskbn_tf.MaskedBatchNormalization (Keras 3 on TensorFlow) for the conformance harness."""

    name = "tf"

    def __init__(self):
        self._keras = _keras()

    def _build(self, layer, config: LayerConfig):
        # Keras builds from a shape; only the channel axis needs a size. An out-of-range axis
        # raises here, in build, like it would on a first call.
        shape = [None] * config.rank
        if -config.rank <= config.axis < config.rank:
            shape[config.axis] = config.channels
        layer.build(tuple(shape))
        return TFLayer(layer, config)

    def layer(self, config: LayerConfig) -> TFLayer:
        from maskbn_tf import MaskedBatchNormalization

        layer = MaskedBatchNormalization(
            axis=config.axis,
            momentum=config.decay,
            epsilon=config.epsilon,
            center=config.center,
            scale=config.scale,
            padded_output=config.padded_output,
            dtype=_POLICIES[config.dtype],
        )
        return self._build(layer, config)

    def stock_layer(self, config: LayerConfig) -> TFLayer:
        layer = self._keras.layers.BatchNormalization(
            axis=config.axis,
            momentum=config.decay,
            epsilon=config.epsilon,
            center=config.center,
            scale=config.scale,
            dtype=_POLICIES[config.dtype],
        )
        return self._build(layer, config)

    def expectations_path(self) -> Path | None:
        return Path(__file__).with_name("conformance_expectations.yaml")
