"""The framework-neutral portable format: a layer trained in torch loads in Keras or JAX, and back.

A folder with ``maskbn.json`` (config in the spec's neutral terms: ``decay``, not torch's
``momentum``; ``moving_var``: ``"population"`` or ``"unbiased"``, the convention of the stored
variance, absent meaning population) and ``maskbn.npz`` (``moving_mean``, ``moving_var``, and
``gamma`` / ``beta`` where they exist; float32, or float64 for a float64 layer). The format is
defined in the maskbn spec (spec/README.md, "Portable state").
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
#: the config's ``moving_var`` value for each ``unbiased_running_var``
_MOVING_VAR = {False: "population", True: "unbiased"}
_STATE = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}


def save_portable(layer: MaskedBatchNorm, directory: str | os.PathLike) -> None:
    """Write ``layer``'s config and state into ``directory`` in the portable format.

    The running variance is written as stored, its convention recorded as ``moving_var``.
    Raises ValueError for what the format cannot express: ``momentum=None`` (a cumulative
    average has no fixed decay) and ``track_running_stats=False`` (no moving stats).
    """
    if layer.momentum is None:
        raise ValueError("momentum=None (cumulative average) has no decay to write in the portable format")
    if not layer.track_running_stats:
        raise ValueError("a layer with track_running_stats=False has no moving stats to write")
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
        "moving_var": _MOVING_VAR[bool(layer.unbiased_running_var)],
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

    The layer is float64 when the saved state is, float32 otherwise, and keeps the file's
    running-variance convention (``unbiased_running_var`` from ``moving_var``). A bias
    without a weight (``center=True, scale=False``) has no torch spelling and raises ValueError.
    """
    directory = Path(directory)
    config = json.loads((directory / "maskbn.json").read_text())
    if config.get("format") != PORTABLE_FORMAT or config.get("version") != _VERSION:
        raise ValueError(f"{directory / 'maskbn.json'} is not a version {_VERSION} {PORTABLE_FORMAT} file")
    if config["center"] and not config["scale"]:
        raise ValueError("center=True with scale=False (a bias without a weight) has no MaskedBatchNorm spelling")
    moving_var = config.get("moving_var", "population")
    if moving_var not in _MOVING_VAR.values():
        raise ValueError(
            f"{directory / 'maskbn.json'}: moving_var must be one of {tuple(_MOVING_VAR.values())}, got {moving_var!r}"
        )
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
        unbiased_running_var=moving_var == "unbiased",
    )
    with torch.no_grad():
        for neutral, name in _STATE.items():
            target = getattr(layer, name)
            if (neutral in state) != (target is not None):
                raise ValueError(f"{directory / 'maskbn.npz'}: {neutral} does not match center/scale in the config")
            if target is not None:
                target.copy_(torch.from_numpy(state[neutral]))
    return layer
