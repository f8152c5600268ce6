"""Turning a case's input descriptions into arrays (seeded, deterministic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference as ref
from .dtypes import carrier, round_to

PADDING_FILLS = {
    "zeros": 0.0,
    "nan": np.nan,
    "inf": np.inf,
    "-inf": -np.inf,
    "huge": 1e38,
    "denormal": 1e-40,
}
MASK_DTYPES = ("bool", "int8", "uint8", "int32", "int64", "float32")


@dataclass(frozen=True)
class StepInputs:
    """Everything one step feeds the layer, for a backend and for the reference."""

    #: float64 values after rounding to the run dtype (what the reference sees)
    x64: np.ndarray
    #: what the adapter receives and its dtype name
    x: np.ndarray
    x_dtype: str
    #: what the adapter receives as mask (None: no mask argument)
    mask: np.ndarray | None
    #: bool, x's shape: the real elements (the mask as the contract reads it)
    real: np.ndarray
    #: cotangent for backward steps (zero on padded rows), as carrier and float64
    dy: np.ndarray | None
    dy64: np.ndarray | None
    #: hvp steps: the direction v (seeded normal everywhere, padded elements too)
    v: np.ndarray | None = None
    v64: np.ndarray | None = None


def normalize_axis(axis: int, rank: int) -> int:
    return axis % rank


def make_x(spec: dict[str, Any], axis: int) -> np.ndarray:
    """The unpadded float64 data a spec generator describes."""
    if "literal" in spec:
        return np.asarray(spec["literal"], dtype=np.float64)
    shape = tuple(spec["shape"])
    rng = np.random.default_rng(spec.get("seed", 0))
    ax = normalize_axis(axis, len(shape))

    def per_channel(value):
        value = np.asarray(value, dtype=np.float64)
        if value.ndim == 0:
            return value
        view = [1] * len(shape)
        view[ax] = shape[ax]
        return value.reshape(view)

    if "constant" in spec:
        return np.broadcast_to(per_channel(spec["constant"]), shape).astype(np.float64)
    kind = spec["random"]
    if kind == "normal":
        z = rng.standard_normal(shape)
        return per_channel(spec.get("mean", 0.0)) + per_channel(spec.get("std", 1.0)) * z
    if kind == "uniform":
        return rng.uniform(spec.get("low", 0.0), spec.get("high", 1.0), shape)
    raise ValueError(f"unknown generator {kind!r}")


def make_real(spec: dict[str, Any], mask_shape: tuple[int, ...]) -> np.ndarray | None:
    """The bool real-position array a mask spec describes (None for ``absent``)."""
    pattern = spec.get("pattern", "all")
    if pattern == "absent":
        return None
    if pattern == "all":
        return np.ones(mask_shape, dtype=bool)
    if pattern == "none":
        return np.zeros(mask_shape, dtype=bool)
    if pattern == "explicit":
        return np.asarray(spec["values"]) != 0
    if pattern == "random":
        rng = np.random.default_rng(spec.get("seed", 0))
        return rng.random(mask_shape) < spec.get("p", 0.5)
    batch = mask_shape[0]
    per_item = int(np.prod(mask_shape[1:], dtype=np.int64))
    flat = np.zeros((batch, max(per_item, 1)), dtype=bool)
    if pattern == "half":
        if len(mask_shape) == 1:
            return np.arange(batch) < (batch + 1) // 2
        flat[:, : (per_item + 1) // 2] = True
    elif pattern == "prefix":
        lengths = spec["lengths"]
        if len(lengths) != batch:
            raise ValueError(f"prefix lengths {lengths} do not match batch size {batch}")
        for item, length in enumerate(lengths):
            flat[item, :length] = True
    elif pattern == "single":
        real = np.zeros(mask_shape, dtype=bool)
        real.reshape(-1)[spec.get("index", 0)] = True
        return real
    else:
        raise ValueError(f"unknown mask pattern {pattern!r}")
    return flat.reshape(mask_shape)


def mask_shape_of(spec: dict[str, Any], x_shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """The shape of the mask array a mask spec generates: x's shape without the
    channel axis by default, ``x.shape[:-1]`` for ``form: leading`` (Keras), or
    the ``broadcast`` shape (same rank as x, size 1 where it broadcasts)."""
    if "broadcast" in spec:
        return tuple(spec["broadcast"])
    if spec.get("form") == "leading":
        return tuple(x_shape[:-1])
    return tuple(s for i, s in enumerate(x_shape) if i != axis)


def mask_for_adapter(spec: dict[str, Any], generated: np.ndarray | None, axis: int, rank: int) -> np.ndarray | None:
    """The mask array as the case says to pass it (dtype, channel dim, shape)."""
    if generated is None:
        return None
    if "shape" in spec:
        # bad-input cases: a mask of a shape that does not fit x
        mask = np.ones(tuple(spec["shape"]), dtype=bool)
    else:
        mask = generated
        if spec.get("channel_dim") == "keep":
            mask = np.expand_dims(mask, normalize_axis(axis, rank))
    dtype = spec.get("dtype", "bool")
    return np.ascontiguousarray(mask.astype(dtype))


def real_of(
    mask: np.ndarray | None, generated: np.ndarray | None, x_shape: tuple[int, ...], axis: int | None
) -> np.ndarray:
    """The real elements (x's shape) of a mask as passed. A mask that cannot fit
    (bad-input cases) keeps the generated pattern's meaning, so the steps
    before the bad call see an ordinary mask."""
    everything = np.ones(x_shape, dtype=bool)
    if generated is None or axis is None:
        return everything if generated is None or generated.shape != x_shape else generated
    try:
        return ref.mask_elements(mask, x_shape, axis)
    except ValueError:
        return ref.real_elements(generated, x_shape, axis) if generated.ndim == len(x_shape) - 1 else everything


def fill_padding(x: np.ndarray, real: np.ndarray, fill: str, axis: int, seed: int = 0) -> np.ndarray:
    """x with its padded positions overwritten (float64 in, float64 out)."""
    if fill == "keep":
        return x.copy()
    padded = ~real
    out = x.copy()
    if fill == "random-bits":
        rng = np.random.default_rng(seed + 1)
        bits = rng.integers(0, 2**32, size=x.shape, dtype=np.uint64).astype(np.uint32)
        with np.errstate(invalid="ignore"):  # NaN bit patterns are the point
            garbage = bits.view(np.float32).astype(np.float64)
        out[padded] = garbage[padded]
    else:
        out[padded] = PADDING_FILLS[fill]
    return out


def build_step_inputs(
    x_spec: dict[str, Any],
    mask_spec: dict[str, Any],
    axis: int,
    dtype: str,
    fill: str | None = None,
    mask_dtype: str | None = None,
    backward: bool = False,
    seed_offset: int = 0,
    direction: bool = False,
) -> StepInputs:
    """All arrays for one step. ``fill`` / ``mask_dtype`` override the spec
    (used by invariants that rerun a case with other padding or mask dtypes)."""
    x = make_x(x_spec, axis)
    rank = x.ndim
    ax = normalize_axis(axis, rank) if -rank <= axis < rank else None
    mask_shape = mask_shape_of(mask_spec, x.shape, ax)
    generated = make_real(mask_spec, mask_shape)
    if generated is not None and generated.shape != mask_shape:
        raise ValueError(f"explicit mask of shape {generated.shape} does not fit x shape {x.shape}")
    mask_spec = dict(mask_spec, dtype=mask_dtype) if mask_dtype else mask_spec
    mask = mask_for_adapter(mask_spec, generated, axis, rank)
    real = real_of(mask, generated, x.shape, ax)
    fill = fill or x_spec.get("padding", "zeros")
    x = fill_padding(x, real, fill, axis, seed=x_spec.get("seed", 0))

    x_dtype = x_spec.get("dtype", dtype)
    if x_dtype in ("int32", "int64"):
        x64 = np.round(x)
        x_carrier = x64.astype(x_dtype)
    else:
        x64 = round_to(x, dtype)
        x_carrier = carrier(x64, dtype)

    dy = dy64 = None
    if backward:
        rng = np.random.default_rng(1000 + seed_offset + x_spec.get("seed", 0))
        g = rng.standard_normal(x.shape)
        g = np.where(real, g, 0.0)
        dy64 = round_to(g, dtype)
        dy = carrier(dy64, dtype)
    v = v64 = None
    if direction:
        rng = np.random.default_rng(2000 + seed_offset + x_spec.get("seed", 0))
        v64 = round_to(rng.standard_normal(x.shape), dtype)
        v = carrier(v64, dtype)
    return StepInputs(x64=x64, x=x_carrier, x_dtype=x_dtype, mask=mask, real=real, dy=dy, dy64=dy64, v=v, v64=v64)


def state_value(value: Any, channels: int, seed: int) -> np.ndarray:
    """A per-channel initial state value: scalar, list, or generator dict."""
    if isinstance(value, dict):
        return make_x(dict(value, shape=[channels], seed=value.get("seed", seed)), axis=0)
    arr = np.asarray(value, dtype=np.float64)
    return np.broadcast_to(arr, (channels,)).astype(np.float64)
