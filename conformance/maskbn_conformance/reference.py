"""The oracle: masked batch norm in float64 NumPy, written for clarity.

Everything here follows docs/DESIGN.md section 1 and spec/README.md.
Arrays arrive with the channel axis where the layer has it; internally they are
flattened to rows of C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RefConfig:
    axis: int
    decay: float
    epsilon: float
    center: bool
    scale: bool
    padded_output: str

    @classmethod
    def of(cls, config, axis: int) -> RefConfig:
        """From a LayerConfig (or anything with its knobs), with the channel axis
        already resolved to a non-negative index for the input at hand."""
        return cls(axis, config.decay, config.epsilon, config.center, config.scale, config.padded_output)


def to_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """(..., C at axis, ...) -> (rows, C)."""
    moved = np.moveaxis(x, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved_shape = list(np.moveaxis(np.empty(shape, dtype=np.int8), axis, -1).shape)
    return np.moveaxis(rows.reshape(moved_shape), -1, axis)


def batch_moments(rows: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and population variance over the real rows (two-pass, float64)."""
    real_rows = rows[real]
    n = real_rows.shape[0]
    if n == 0:
        return np.zeros(rows.shape[1]), np.zeros(rows.shape[1]), 0
    mean = real_rows.mean(axis=0)
    var = ((real_rows - mean) ** 2).mean(axis=0)
    return mean, var, n


def initial_state(channels: int) -> dict[str, np.ndarray]:
    return {
        "gamma": np.ones(channels),
        "beta": np.zeros(channels),
        "moving_mean": np.zeros(channels),
        "moving_var": np.ones(channels),
    }


def full_state(state: dict[str, np.ndarray], channels: int) -> dict[str, np.ndarray]:
    """``state`` in float64 with the weights a layer lacks (center/scale off)
    filled in as their neutral values, so forward() can always read all four."""
    full = initial_state(channels)
    full.update({k: np.asarray(v, dtype=np.float64) for k, v in state.items()})
    return full


def forward(
    x: np.ndarray, real: np.ndarray, state: dict[str, np.ndarray], cfg: RefConfig, training: bool
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """One call. ``real`` is a bool array of x's shape without the channel axis.

    Returns (y, new_state, aux) where aux carries what the backward needs.
    """
    rows = to_rows(x, cfg.axis)
    real_flat = real.reshape(-1)
    channels = rows.shape[1]
    gamma = state["gamma"] if cfg.scale else np.ones(channels)
    beta = state["beta"] if cfg.center else np.zeros(channels)
    new_state = {k: v.copy() for k, v in state.items()}

    mean, var, n = batch_moments(rows, real_flat)
    if not training or n == 0:
        mean, var = state["moving_mean"], state["moving_var"]
    else:
        new_state["moving_mean"] = cfg.decay * state["moving_mean"] + (1 - cfg.decay) * mean
        new_state["moving_var"] = cfg.decay * state["moving_var"] + (1 - cfg.decay) * var

    inv_std = 1.0 / np.sqrt(var + cfg.epsilon)
    with np.errstate(invalid="ignore", over="ignore"):
        xhat = (rows - mean) * inv_std
        y_rows = gamma * xhat + beta
    if cfg.padded_output == "zero":
        y_rows[~real_flat] = 0.0
    aux = {"xhat": xhat, "inv_std": inv_std, "gamma": gamma, "real": real_flat, "n": n if training else 0}
    return from_rows(y_rows, x.shape, cfg.axis), new_state, aux


def backward(dy: np.ndarray, aux: dict, cfg: RefConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of sum(y * dy) for a training call: (dx, dgamma, dbeta).

    Padded output rows are constants (spec/README.md), so only real rows send
    gradient, and dx is 0 on padded rows.
    """
    dy_rows = to_rows(dy, cfg.axis)
    real, n = aux["real"], aux["n"]
    dx_rows = np.zeros_like(dy_rows)
    channels = dy_rows.shape[1]
    if n == 0:
        return from_rows(dx_rows, dy.shape, cfg.axis), np.zeros(channels), np.zeros(channels)
    dy_real = dy_rows[real]
    xhat_real = aux["xhat"][real]
    dbeta = dy_real.sum(axis=0)
    dgamma = (dy_real * xhat_real).sum(axis=0)
    dx_rows[real] = (aux["gamma"] * aux["inv_std"]) * (dy_real - dbeta / n - xhat_real * dgamma / n)
    return from_rows(dx_rows, dy.shape, cfg.axis), dgamma, dbeta


def standalone_batch_norm(real_rows: np.ndarray, gamma: np.ndarray, beta: np.ndarray, epsilon: float) -> np.ndarray:
    """Textbook batch norm of an unpadded (rows, C) batch: the independent
    check that the masked result on real rows is plain BN of those rows."""
    mean = np.mean(real_rows, axis=0)
    var = np.var(real_rows, axis=0)
    return gamma * (real_rows - mean) / np.sqrt(var + epsilon) + beta
