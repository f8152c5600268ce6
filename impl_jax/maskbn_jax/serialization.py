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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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
    arrays = {f"params/{k}": np.asarray(v) for k, v in params.items()}
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


def to_bytes(
    params: Mapping[str, Any], state: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> bytes:
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
