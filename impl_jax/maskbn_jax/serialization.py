"""Saving and loading a layer: params, moving stats and (optionally) its config.

Two formats:

* ``save`` / ``load``: a plain ``.npz`` (NumPy only, no pickle), keys
  ``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``
  and ``config`` (a JSON string).
* ``to_bytes`` / ``from_bytes``: Flax's msgpack (``flax.serialization``), a
  dict ``{"params", "batch_stats", "config"}`` laid out like Flax linen
  variables, so ``{"params": p, "batch_stats": s}`` from a stock
  ``flax.linen.BatchNorm`` checkpoint loads unchanged. Needs Flax.

Arrays keep their dtype (float32, or float64 for a float64 layer).

``save_portable`` / ``load_portable`` write and read the framework-neutral
portable folder every maskbn backend shares (spec/README.md, "Portable state"),
so a layer trained with PyTorch or Keras loads here, and back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import jax.numpy as jnp
import numpy as np

_GROUPS = ("params", "batch_stats")


def _check_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    config = dict(config or {})
    try:
        json.dumps(config)
    except TypeError as exc:
        raise TypeError(f"config must hold JSON-compatible values only: {exc}") from None
    return config


def save(
    file: str | os.PathLike | IO[bytes],
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
) -> None:
    """Write ``params``, ``state`` and an optional JSON-able ``config`` to an ``.npz``."""
    # Any: numpy's stubs read **arrays against savez's keyword-only allow_pickle
    arrays: dict[str, Any] = {f"params/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update({f"batch_stats/{k}": np.asarray(v) for k, v in state.items()})
    arrays["config"] = np.array(json.dumps(_check_config(config)))
    np.savez(file, **arrays)


def load(file: str | os.PathLike | IO[bytes]) -> tuple[dict, dict, dict]:
    """Read ``(params, state, config)`` written by :func:`save`; arrays come back as jax arrays."""
    out: dict[str, dict] = {g: {} for g in _GROUPS}
    with np.load(file, allow_pickle=False) as data:
        config = json.loads(str(data["config"])) if "config" in data.files else {}
        for key in data.files:
            group, _, name = key.partition("/")
            if group in out:
                out[group][name] = jnp.asarray(data[key])
    return out["params"], out["batch_stats"], config


def to_bytes(params: Mapping[str, Any], state: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> bytes:
    """Serialize with ``flax.serialization.msgpack_serialize`` (requires Flax)."""
    from flax import serialization

    tree = {
        "params": {k: np.asarray(v) for k, v in params.items()},
        "batch_stats": {k: np.asarray(v) for k, v in state.items()},
        "config": _check_config(config),
    }
    return serialization.msgpack_serialize(tree)


def from_bytes(data: bytes) -> tuple[dict, dict, dict]:
    """Inverse of :func:`to_bytes`: ``(params, state, config)``."""
    from flax import serialization

    tree = serialization.msgpack_restore(data)
    params = {k: jnp.asarray(v) for k, v in tree.get("params", {}).items()}
    state = {k: jnp.asarray(v) for k, v in tree["batch_stats"].items()}
    return params, state, dict(tree.get("config", {}))


# -- the framework-neutral portable format (spec/README.md, "Portable state") --------------------------------

PORTABLE_FORMAT = "maskbn-portable"
_PORTABLE_VERSION = 1
_MOVING_VAR = ("population", "unbiased")
_TO_NEUTRAL = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_var"}


def save_portable(
    directory: str | os.PathLike,
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    *,
    momentum: float,
    epsilon: float,
    axis: int = -1,
    padded_output: str = "normalize",
    unbiased_var: bool = False,
) -> None:
    """Write a layer into ``directory`` in the portable format shared by every maskbn backend.

    ``maskbn.json`` holds the config in neutral terms (``decay`` is Flax's
    ``momentum``; ``center``/``scale`` are whether ``bias``/``scale`` exist) and
    ``maskbn.npz`` the arrays under neutral names (``gamma``, ``beta``,
    ``moving_mean``, ``moving_var``), in their own dtype. ``moving_var`` in the
    config records the moving variance's convention: ``"population"``, or
    ``"unbiased"`` for a layer run with ``unbiased_var=True``.
    """
    channels = int(np.shape(state["mean"])[0])
    config = {
        "format": PORTABLE_FORMAT,
        "version": _PORTABLE_VERSION,
        "channels": channels,
        "axis": int(axis),
        "decay": float(momentum),
        "epsilon": float(epsilon),
        "center": "bias" in params,
        "scale": "scale" in params,
        "padded_output": padded_output,
        "moving_var": "unbiased" if unbiased_var else "population",
    }
    arrays: dict[str, Any] = {_TO_NEUTRAL[k]: np.asarray(v) for tree in (params, state) for k, v in tree.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "maskbn.json").write_text(json.dumps(config, indent=2))
    np.savez(directory / "maskbn.npz", **arrays)


def load_portable(directory: str | os.PathLike) -> tuple[dict, dict, dict]:
    """Read a portable folder written by any maskbn backend.

    Returns ``(params, state, config)`` with ``config`` holding the keyword
    arguments of :func:`maskbn_jax.masked_batch_norm` (``momentum``,
    ``epsilon``, ``axis``, ``padded_output``, ``unbiased_var``: the file's
    moving-variance convention, population when the file does not say).
    float64 state stays float64 only under ``jax_enable_x64``.
    """
    directory = Path(directory)
    config = json.loads((directory / "maskbn.json").read_text())
    if config.get("format") != PORTABLE_FORMAT or config.get("version") != _PORTABLE_VERSION:
        raise ValueError(f"{directory / 'maskbn.json'} is not a version {_PORTABLE_VERSION} {PORTABLE_FORMAT} file")
    moving_var = config.get("moving_var", "population")
    if moving_var not in _MOVING_VAR:
        raise ValueError(f"{directory / 'maskbn.json'}: moving_var must be one of {_MOVING_VAR}, got {moving_var!r}")
    with np.load(directory / "maskbn.npz", allow_pickle=False) as saved:
        arrays = {key: saved[key] for key in saved.files}
    params: dict[str, jnp.ndarray] = {}
    state: dict[str, jnp.ndarray] = {}
    for name, neutral in _TO_NEUTRAL.items():
        wanted = {"scale": config["scale"], "bias": config["center"]}.get(name, True)
        if (neutral in arrays) != wanted:
            raise ValueError(f"{directory / 'maskbn.npz'}: {neutral} does not match center/scale in the config")
        if wanted:
            value = arrays[neutral]
            if value.shape != (config["channels"],):
                raise ValueError(
                    f"{directory / 'maskbn.npz'}: {neutral} has shape {value.shape}, expected ({config['channels']},)"
                )
            (params if name in ("scale", "bias") else state)[name] = jnp.asarray(value)
    kwargs = {
        "momentum": config["decay"],
        "epsilon": config["epsilon"],
        "axis": config["axis"],
        "padded_output": config["padded_output"],
        "unbiased_var": moving_var == "unbiased",
    }
    return params, state, kwargs
