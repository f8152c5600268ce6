"""maskbn_jax: masked batch normalization for JAX.

Batch statistics come only from the real (mask != 0) rows of a padded batch.
The functional core (:func:`masked_batch_norm`, :func:`init`) needs only JAX;
the Flax modules live in :mod:`maskbn_jax.nnx` and :mod:`maskbn_jax.linen` and
import Flax on first use, so this package works without Flax installed.
"""

from __future__ import annotations

import importlib

from ._core import PADDED_OUTPUTS, init, masked_batch_norm
from .serialization import load, load_portable, save, save_portable

__all__ = ["PADDED_OUTPUTS", "init", "load", "load_portable", "masked_batch_norm", "save", "save_portable"]
__version__ = "0.1.0"

_LAZY_SUBMODULES = ("nnx", "linen")


def __getattr__(name: str):
    # Flax is optional: the module wrappers are imported only when asked for
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
