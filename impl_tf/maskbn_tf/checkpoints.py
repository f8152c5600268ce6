"""Moving state in and out of `MaskedBatchNormalization`: the framework-neutral portable
format shared by every maskbn backend, and Keras checkpoints of stock batch norm models."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import keras
import numpy as np

from maskbn_tf.layer import MaskedBatchNormalization

PORTABLE_FORMAT = "maskbn-portable"
PORTABLE_VERSION = 1
# neutral state names (the portable npz) -> Keras weight attributes
_STATE = {"gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean", "moving_var": "moving_variance"}


def save_portable(layer, directory) -> None:
    """Write ``layer``'s config and state in the maskbn portable format into ``directory``.

    ``maskbn.json`` holds the config in neutral terms (``decay`` is Keras'
    ``momentum``; ``moving_var`` the convention of the stored moving variance,
    "population" or "unbiased") and ``maskbn.npz`` the state in the variables' dtype. Any maskbn backend loads it. A built
    `keras.layers.BatchNormalization` is accepted too (its padded output is
    "normalize"), which turns a stock layer's state into a portable one.
    """
    if not isinstance(layer, (MaskedBatchNormalization, keras.layers.BatchNormalization)):
        raise TypeError(
            f"save_portable takes a MaskedBatchNormalization or BatchNormalization, got {type(layer).__name__}"
        )
    if not layer.built:
        raise ValueError(f"layer {layer.name!r} is not built yet: it has no state to save")
    if getattr(layer, "renorm", False):
        raise ValueError(
            f"layer {layer.name!r} uses renorm: batch renormalization's state (moving_stddev, renorm_mean, "
            "renorm_stddev) is Keras-only and has no portable form; save the model as .keras instead"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": PORTABLE_FORMAT,
        "version": PORTABLE_VERSION,
        "channels": int(layer.moving_mean.shape[0]),
        "axis": int(layer.axis),
        "decay": float(layer.momentum),
        "epsilon": float(layer.epsilon),
        "center": bool(layer.center),
        "scale": bool(layer.scale),
        "padded_output": getattr(layer, "padded_output", "normalize"),
        # the moving-variance convention (interface decision 1); a stock layer's is population
        "moving_var": "unbiased" if getattr(layer, "unbiased_moving_variance", False) else "population",
    }
    state = {
        neutral: keras.ops.convert_to_numpy(getattr(layer, name))
        for neutral, name in _STATE.items()
        if getattr(layer, name) is not None
    }
    (directory / "maskbn.json").write_text(json.dumps(config, indent=2))
    np.savez(directory / "maskbn.npz", **state)


def load_portable(directory, **kwargs) -> MaskedBatchNormalization:
    """A built `MaskedBatchNormalization` holding the config and state saved in ``directory``.

    ``kwargs`` go to the layer's constructor (``name``, ``dtype``, ...). A file whose
    state is float64 gives a ``dtype="float64"`` layer unless ``dtype`` says otherwise.
    """
    directory = Path(directory)
    config = json.loads((directory / "maskbn.json").read_text())
    if config.get("format") != PORTABLE_FORMAT or config.get("version") != PORTABLE_VERSION:
        raise ValueError(f"{directory / 'maskbn.json'} is not a version {PORTABLE_VERSION} {PORTABLE_FORMAT} file")
    moving_var = config.get("moving_var", "population")  # absent: population
    if moving_var not in ("population", "unbiased"):
        raise ValueError(
            f"{directory / 'maskbn.json'}: moving_var must be 'population' or 'unbiased', got {moving_var!r}"
        )
    with np.load(directory / "maskbn.npz") as saved:
        state = dict(saved)
    if state["moving_mean"].dtype == np.float64:
        kwargs.setdefault("dtype", "float64")
    layer = MaskedBatchNormalization(
        axis=config["axis"],
        momentum=config["decay"],
        epsilon=config["epsilon"],
        center=config["center"],
        scale=config["scale"],
        padded_output=config["padded_output"],
        unbiased_moving_variance=moving_var == "unbiased",
        **kwargs,
    )
    axis, channels = config["axis"], config["channels"]
    # Keras builds from a shape; only the channel axis needs a size
    shape = [None] * max(2, axis + 1 if axis >= 0 else -axis)
    shape[axis] = channels
    layer.build(tuple(shape))
    for neutral, name in _STATE.items():
        variable = getattr(layer, name)
        if (variable is None) != (neutral not in state):
            raise ValueError(
                f"{directory / 'maskbn.npz'}: {neutral!r} is {'missing' if variable is not None else 'present'} "
                f"but the config says center={config['center']}, scale={config['scale']}"
            )
        if variable is not None:
            variable.assign(state[neutral].astype(variable.dtype))
    return layer


def _stock_has_renorm() -> bool:
    return "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters


def load_stock_weights(model: keras.Model, filepath) -> None:
    """Load a ``.weights.h5`` checkpoint saved by the same architecture built with
    `keras.layers.BatchNormalization` into ``model``, which has `MaskedBatchNormalization`
    in its place.

    ``model.load_weights`` cannot do this: Keras keys the layers of a weights file by
    their class name, so a stock ``batch_normalization`` entry never reaches a
    ``masked_batch_normalization`` layer. This clones ``model`` with stock layers in
    place of the masked ones, loads the checkpoint there, and copies the weights over
    (same names and order, so they map one to one). ``model`` must be a Functional or
    Sequential model, as for `keras.models.clone_model`.
    """

    def stock_twin(layer):
        if isinstance(layer, MaskedBatchNormalization):
            config = layer.get_config()
            for knob in ("padded_output", "unbiased_moving_variance"):
                config.pop(knob)
            if not _stock_has_renorm():
                # Keras before renorm came back: its checkpoints hold no renorm weights
                if config["renorm"]:
                    raise ValueError(
                        f"layer {layer.name!r} has renorm=True, but keras {keras.__version__}'s "
                        "BatchNormalization has no renorm, so no stock checkpoint of it exists to load"
                    )
                for knob in ("renorm", "renorm_clipping", "renorm_momentum"):
                    config.pop(knob)
            return keras.layers.BatchNormalization.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    twin = keras.models.clone_model(model, clone_function=stock_twin, recursive=True)
    twin.load_weights(filepath)
    model.set_weights(twin.get_weights())
