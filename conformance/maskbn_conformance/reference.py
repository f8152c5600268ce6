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
    #: "population" or "unbiased" (what a training call stores as moving_var)
    moving_var: str = "population"

    @classmethod
    def of(cls, config, axis: int) -> RefConfig:
        """From a LayerConfig (or anything with its knobs), with the channel axis
        already resolved to a non-negative index for the input at hand."""
        return cls(
            axis, config.decay, config.epsilon, config.center, config.scale, config.padded_output,
            getattr(config, "moving_var", "population"),
        )  # fmt: skip


def to_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """(..., C at axis, ...) -> (rows, C)."""
    moved = np.moveaxis(x, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved_shape = list(np.moveaxis(np.empty(shape, dtype=np.int8), axis, -1).shape)
    return np.moveaxis(rows.reshape(moved_shape), -1, axis)


def real_elements(real: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Which elements of an x of ``shape`` are real, as a bool array of that shape.

    ``real`` is either a per-position mask (x's shape without the channel axis,
    the same for every channel) or any array of x's rank that broadcasts to it
    (per element: the real positions may differ between channels).
    """
    real = np.asarray(real, dtype=bool)
    if real.ndim == len(shape) - 1:
        real = np.expand_dims(real, axis)
    return np.broadcast_to(real, shape)


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Same rank, each dim 1 or target's."""
    return len(shape) == len(target) and all(m in (1, t) for m, t in zip(shape, target))


def mask_elements(mask: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """The contract's reading of a mask for an x of ``shape`` (channel axis
    ``axis``, resolved): a bool array of x's shape, or ValueError.

    Accepted (spec/README.md, "Mask shape"): (a) x's shape without the channel
    axis; (b) Keras's reading: rank(x) - 1 dims that broadcast to x.shape[:-1]
    (size 1 or x's), broadcast over the last axis too; (c) any array of x's
    rank that broadcasts to x. Where (a) and (b) both fit (channel axis not
    last, equal sizes), reading (a) wins.
    """
    mask = np.asarray(mask)
    shape = tuple(shape)
    squeezed = shape[:axis] + shape[axis + 1 :]
    if mask.ndim == len(shape) - 1:
        if mask.shape == squeezed:
            return real_elements(mask != 0, shape, axis)
        if _broadcasts(mask.shape, shape[:-1]):
            return np.broadcast_to(np.expand_dims(mask != 0, -1), shape)
    elif _broadcasts(mask.shape, shape):
        return np.broadcast_to(mask != 0, shape)
    keras = f", {shape[:-1]} or a broadcast of it (over the leading axes)"
    raise ValueError(
        f"mask shape {tuple(mask.shape)} does not fit x shape {shape}: expected {squeezed}{keras} "
        f"or a shape of rank {len(shape)} that broadcasts to {shape}"
    )


def batch_moments(rows: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel: mean and population variance over that channel's real rows,
    and their count n_c (float64, two-pass). ``real`` is (rows,) or (rows, C).

    The sums run over differences from the channel's first real value, so an
    offset of 1e6 costs the float64 sum nothing; channels with n_c = 0 get 0.
    """
    real = np.broadcast_to(real[:, None] if real.ndim == 1 else real, rows.shape)
    n = real.sum(axis=0)
    if rows.shape[0] == 0:
        return np.zeros(rows.shape[1]), np.zeros(rows.shape[1]), n
    count = np.maximum(n, 1)
    first = np.argmax(real, axis=0)
    shift = np.where(n > 0, rows[first, np.arange(rows.shape[1])], 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = shift + np.where(real, rows - shift, 0.0).sum(axis=0) / count
        var = np.where(real, rows - mean, 0.0) ** 2
    return mean, var.sum(axis=0) / count, n


def stored_variance(var: np.ndarray, n: np.ndarray, convention: str) -> np.ndarray:
    """The batch variance a training call blends into moving_var: the population
    variance, or the unbiased n / (n - 1) times it (factor 1 for n = 1)."""
    if convention == "population":
        return var
    if convention == "unbiased":
        return var * n / np.maximum(n - 1, 1)
    raise ValueError(f"unknown moving_var convention {convention!r}")


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
    """One call. ``real`` says which elements are real (see real_elements).

    Statistics are per channel over that channel's real elements; a channel
    with none (n_c = 0) keeps its moving stats and is normalized with them,
    as every channel is in inference. Returns (y, new_state, aux) where aux
    carries what the backward needs.
    """
    rows = to_rows(x, cfg.axis)
    real_rows = to_rows(real_elements(real, x.shape, cfg.axis), cfg.axis)
    channels = rows.shape[1]
    gamma = state["gamma"] if cfg.scale else np.ones(channels)
    beta = state["beta"] if cfg.center else np.zeros(channels)
    new_state = {k: v.copy() for k, v in state.items()}

    batch_mean, batch_var, n = batch_moments(rows, real_rows)
    active = (n > 0) & training
    mean = np.where(active, batch_mean, state["moving_mean"])
    var = np.where(active, batch_var, state["moving_var"])
    blend = cfg.decay * state["moving_mean"] + (1 - cfg.decay) * batch_mean
    new_state["moving_mean"] = np.where(active, blend, state["moving_mean"])
    stored = stored_variance(batch_var, n, cfg.moving_var)
    blend = cfg.decay * state["moving_var"] + (1 - cfg.decay) * stored
    new_state["moving_var"] = np.where(active, blend, state["moving_var"])

    inv_std = 1.0 / np.sqrt(var + cfg.epsilon)
    with np.errstate(invalid="ignore", over="ignore"):
        xhat = (rows - mean) * inv_std
        y_rows = gamma * xhat + beta
    if cfg.padded_output == "zero":
        y_rows[~real_rows] = 0.0
    aux = {
        "xhat": xhat, "inv_std": inv_std, "gamma": gamma, "real": real_rows,
        "n": np.where(active, n, 0), "batch_var": np.where(active, batch_var, 0.0),
    }  # fmt: skip
    return from_rows(y_rows, x.shape, cfg.axis), new_state, aux


def backward(dy: np.ndarray, aux: dict, cfg: RefConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of sum(y * dy) for a training call: (dx, dgamma, dbeta).

    Padded output elements are constants (spec/README.md), so only real
    elements send gradient, and dx is 0 on padded ones; a channel normalized
    with its moving stats (n_c = 0) has no real element, so it gets 0 too.
    """
    dy_rows = to_rows(dy, cfg.axis)
    real, n = aux["real"], aux["n"]
    with np.errstate(invalid="ignore", over="ignore"):
        dy_real = np.where(real, dy_rows, 0.0)
        xhat_real = np.where(real, aux["xhat"], 0.0)
    dbeta = dy_real.sum(axis=0)
    dgamma = (dy_real * xhat_real).sum(axis=0)
    count = np.maximum(n, 1)
    dx_rows = (aux["gamma"] * aux["inv_std"]) * (dy_real - dbeta / count - xhat_real * dgamma / count)
    dx_rows = np.where(real & (n > 0), dx_rows, 0.0)
    dgamma, dbeta = np.where(n > 0, dgamma, 0.0), np.where(n > 0, dbeta, 0.0)
    return from_rows(dx_rows, dy.shape, cfg.axis), dgamma, dbeta


def hessian_vector_product(
    x: np.ndarray, real: np.ndarray, state: dict[str, np.ndarray], cfg: RefConfig, dy: np.ndarray, v: np.ndarray
) -> np.ndarray:
    """d/dx <d/dx sum(y * dy), v> of a training call, in float64.

    The gradient of a scalar loss has the (symmetric) Hessian as Jacobian, so
    this is the directional derivative of the analytic gradient along v: central
    differences at h and h/2 with one Richardson step (error O(h^4), h a
    thousandth of the real data's spread), independent of any backend's
    second-order code.
    """
    real_x = to_rows(x, cfg.axis)[to_rows(real_elements(real, x.shape, cfg.axis), cfg.axis)]
    spread = float(np.std(real_x)) if real_x.size > 1 else 0.0
    h = 1e-3 * (spread if spread > 0 else 1.0) / max(float(np.max(np.abs(v))), 1e-30)

    def gradient(t: float) -> np.ndarray:
        _, _, aux = forward(x + t * v, real, state, cfg, True)
        return backward(dy, aux, cfg)[0]

    def central(step: float) -> np.ndarray:
        return (gradient(step) - gradient(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


def standalone_batch_norm(real_rows: np.ndarray, gamma: np.ndarray, beta: np.ndarray, epsilon: float) -> np.ndarray:
    """Textbook batch norm of an unpadded (rows, C) batch: the independent
    check that the masked result on real rows is plain BN of those rows."""
    mean = np.mean(real_rows, axis=0)
    var = np.var(real_rows, axis=0)
    return gamma * (real_rows - mean) / np.sqrt(var + epsilon) + beta
