"""Rounding float64 data to a run dtype, NumPy only (NumPy has no bfloat16)."""

from __future__ import annotations

import numpy as np


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round ``x`` to the nearest value of ``dtype`` and return it as float64.

    The backend and the float64 reference both see these rounded values, so a
    comparison measures the backend's arithmetic, not the input quantization.
    """
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x.copy()
    if dtype == "float32":
        with np.errstate(over="ignore"):
            return x.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float32).astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        return _round_bfloat16(x).astype(np.float64)
    raise ValueError(f"unknown float dtype {dtype!r}")


def _round_bfloat16(x: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32: round the low 16 bits to nearest
    # even, leaving NaN alone (the carry could turn a NaN into Inf).
    with np.errstate(over="ignore"):
        f = np.ascontiguousarray(x.astype(np.float32))
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), f, out)


def carrier(x64: np.ndarray, dtype: str) -> np.ndarray:
    """The array handed to an adapter for a float run dtype: float64 for a
    float64 run, else float32 holding values exact in ``dtype``."""
    if dtype == "float64":
        return np.ascontiguousarray(x64, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(x64, dtype=np.float32)
