"""The framework-neutral portable format: a layer trained in torch loads in Keras or JAX, and back.

A folder with ``maskbn.json`` (config in the spec's neutral terms: ``decay``, not torch's
``momentum``) and ``maskbn.npz`` (``moving_mean``, ``moving_var`` as the population variance,
and ``gamma`` / ``beta`` where they exist; float32, or float64 for a float64 layer). The
format is defined in the maskbn spec (spec/README.md, "Portable state").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .modules import MaskedBatchNorm

__all__ = ["PORTABLE_FORMAT", "load_portable", "save_portable"]

PORTABLE_FORMAT = "maskbn-portable"
_VERSION = 1
_STATE = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}


def save_portable(layer: MaskedBatchNorm, directory: str | os.PathLike) -> None:
    """Write ``layer``'s config and state into ``directory`` in the portable format.

    Raises ValueError for what the format cannot express: ``momentum=None`` (a cumulative
    average has no fixed decay), ``track_running_stats=False`` (no moving stats) and
    ``unbiased_running_var=True`` (the format stores the population variance).
    """
    if layer.momentum is None:
        raise ValueError("momentum=None (cumulative average) has no decay to write in the portable format")
    if not layer.track_running_stats:
        raise ValueError("a layer with track_running_stats=False has no moving stats to write")
    if layer.unbiased_running_var:
        raise ValueError("the portable format stores the population variance; this layer stores the unbiased one")
    config = {
        "format": PORTABLE_FORMAT,
        "version": _VERSION,
        "channels": layer.num_features,
        "axis": layer.channel_axis,
        "decay": 1.0 - layer.momentum,
        "epsilon": layer.eps,
        "center": layer.bias is not None,
        "scale": layer.weight is not None,
        "padded_output": layer.padded_output,
    }
    state = {}
    for neutral, name in _STATE.items():
        tensor = getattr(layer, name)
        if tensor is not None:
            state[neutral] = tensor.detach().cpu().numpy()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "maskbn.json").write_text(json.dumps(config, indent=2))
    np.savez(directory / "maskbn.npz", **state)


def load_portable(directory: str | os.PathLike, device: torch.device | str | None = None) -> MaskedBatchNorm:
    """A :class:`MaskedBatchNorm` holding the config and state saved in ``directory``.

    The layer is float64 when the saved state is, float32 otherwise. A bias without a
    weight (``center=True, scale=False``) has no torch spelling and raises ValueError.
    """
    directory = Path(directory)
    config = json.loads((directory / "maskbn.json").read_text())
    if config.get("format") != PORTABLE_FORMAT or config.get("version") != _VERSION:
        raise ValueError(f"{directory / 'maskbn.json'} is not a version {_VERSION} {PORTABLE_FORMAT} file")
    if config["center"] and not config["scale"]:
        raise ValueError("center=True with scale=False (a bias without a weight) has no MaskedBatchNorm spelling")
    with np.load(directory / "maskbn.npz") as saved:
        state = {key: saved[key] for key in saved.files}
    dtype = torch.float64 if state["moving_mean"].dtype == np.float64 else torch.float32
    layer = MaskedBatchNorm(
        config["channels"],
        eps=config["epsilon"],
        momentum=1.0 - config["decay"],
        affine=config["scale"] or config["center"],
        channel_axis=config["axis"],
        padded_output=config["padded_output"],
        device=device,
        dtype=dtype,
        bias=config["center"],
        weight=config["scale"],
    )
    with torch.no_grad():
        for neutral, name in _STATE.items():
            target = getattr(layer, name)
            if (neutral in state) != (target is not None):
                raise ValueError(f"{directory / 'maskbn.npz'}: {neutral} does not match center/scale in the config")
            if target is not None:
                target.copy_(torch.from_numpy(state[neutral]))
    return layer
