"""What the linen and nnx modules share: Flax's dtype rules and first-contact checks.

Written against ``jax.numpy`` only (no Flax import), with the meaning of
``flax.nnx.nn.dtypes`` / ``flax.linen.dtypes`` so both modules follow Flax
even where an older Flax lacks a helper.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
import numpy as np


def require_flax(submodule: str):
    """``flax.<submodule>``, or an ImportError that says how to install it."""
    try:
        return importlib.import_module(f"flax.{submodule}")
    except ImportError as exc:
        raise ImportError(
            f"maskbn_jax.{submodule} needs Flax, which is not installed ({exc}): pip install 'maskbn-jax[flax]'"
        ) from exc


def result_dtype(*args: Any, dtype: Any = None) -> Any:
    """Flax's ``canonicalize_dtype``: ``dtype`` when given, else the promoted dtype of the
    non-None ``args``, made inexact (float32) if it is not."""
    if dtype is None:
        dtype = jnp.result_type(*[a for a in args if a is not None])
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"Dtype must be inexact: {dtype}")
    return dtype


def promote_dtype(args: tuple, /, *, dtype: Any = None, inexact: bool = True) -> tuple:
    """``flax.nnx.nn.dtypes.promote_dtype``: every non-None arg cast to one dtype."""
    to = (
        result_dtype(*args, dtype=dtype) if inexact else (dtype or jnp.result_type(*[a for a in args if a is not None]))
    )
    return tuple(None if a is None else jnp.asarray(a, to) for a in args)


def check_use_running_average(value: Any) -> None:
    """Catch the torch-style call ``bn(x, mask)``, whose second positional is ``use_running_average``."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return
    if hasattr(value, "shape") or isinstance(value, (list, tuple)):
        raise TypeError(
            f"the second positional argument of the call is use_running_average (a bool), but an array of "
            f"shape {tuple(np.shape(value))} was passed there: pass the mask by keyword, bn(x, mask=mask)"
        )
    raise TypeError(f"use_running_average must be a bool or None, got {type(value).__name__}")
