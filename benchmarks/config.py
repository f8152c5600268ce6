"""The benchmark grid, the targets and the input data (NumPy only: the parent never imports a framework)."""

from __future__ import annotations

import math

import numpy as np

BACKENDS = ("torch", "tf", "jax")

#: what each backend calls its distribution / framework (for "not installed" messages)
BACKEND_LABELS = {
    "torch": "PyTorch (maskbn_torch)",
    "tf": "Keras 3 / TensorFlow (maskbn_tf)",
    "jax": "JAX (maskbn_jax)",
}

#: competitors, in table order; "ours" is the masked batch norm of this repo
IMPLS = ("ours", "native", "masked", "gather_scatter", "floor")
IMPL_LABELS = {
    "ours": "ours (masked BN)",
    "native": "native BN (unmasked)",
    "masked": "existing masked option",
    "gather_scatter": "gather / native BN / scatter",
    "floor": "x * a + b",
}
#: what each competitor is, per backend (for the README and the JSON)
IMPL_DETAILS = {
    "torch": {
        "ours": "maskbn_torch.MaskedBatchNorm(C, channel_axis=...)(x, mask)",
        "native": "nn.BatchNorm1d on x.reshape(-1, C) (channels-last) / nn.BatchNorm2d (channels-first)",
        "masked": None,  # PyTorch has no masked batch norm
        "gather_scatter": "idx = mask.flatten().nonzero() (eager); index_select -> F.batch_norm -> zeros.index_copy",
        "floor": "torch.addcmul(bias, x, weight) in float32, cast to x dtype (autograd for fwd+bwd)",
    },
    "tf": {
        "ours": "maskbn_tf.MaskedBatchNormalization(axis=...)(x, training=..., mask=m)",
        "native": "keras.layers.BatchNormalization(axis=...)(x, training=...)",
        "masked": "keras.layers.BatchNormalization(axis=-1)(x, training=..., mask=m) (channels-last only)",
        "gather_scatter": "tf.where(mask) -> tf.gather -> BatchNormalization -> tf.scatter_nd",
        "floor": "x * a + b in float32, cast to x dtype (GradientTape for fwd+bwd)",
    },
    "jax": {
        "ours": "maskbn_jax.masked_batch_norm(x, mask, params, state, training=..., axis=...)",
        "native": "flax.linen.BatchNorm(axis=...)",
        "masked": "flax.linen.BatchNorm(axis=...)(x, mask=expand_dims(m, axis))",
        "gather_scatter": "jnp.nonzero(mask) (host) -> jit(x[idx] -> flax BatchNorm -> zeros.at[idx].set)",
        "floor": "x * scale + bias in float32, cast to x dtype (jax.vjp for fwd+bwd)",
    },
}

#: the forms timed per backend: key -> label. "compiled" is the form the targets are about.
FORMS = {
    "torch": {"eager": "eager", "compiled": "torch.compile"},
    "tf": {"eager": "eager", "graph": "tf.function", "compiled": "tf.function(jit_compile=True)"},
    "jax": {"compiled": "jax.jit"},
}

SHAPES = [
    {"id": "16x4096x64", "shape": [16, 4096, 64], "channel_axis": -1, "label": "(16, 4096, 64) C-last"},
    {"id": "64x1024x128", "shape": [64, 1024, 128], "channel_axis": -1, "label": "(64, 1024, 128) C-last"},
    {"id": "32x64x32x32", "shape": [32, 64, 32, 32], "channel_axis": 1, "label": "(32, 64, 32, 32) C-first"},
]
QUICK_SHAPES = [
    {"id": "4x64x8", "shape": [4, 64, 8], "channel_axis": -1, "label": "(4, 64, 8) C-last"},
    {"id": "2x8x4x4", "shape": [2, 8, 4, 4], "channel_axis": 1, "label": "(2, 8, 4, 4) C-first"},
]

DTYPES = ["float32", "bfloat16"]
PADDINGS = [0.0, 0.5, 0.9]
MODES = ["train", "infer"]
MODE_LABELS = {"train": "training fwd+bwd", "infer": "inference fwd"}

#: the issue's targets (issue 13; contract 1a "Speed is part of the contract"): ours / competitor
#: <= bound, in the same form, on EVERY grid row whose padding is at most max_padding
TARGETS = [
    {"competitor": "native", "mode": "train", "bound": 1.25, "max_padding": 1.0},
    {"competitor": "native", "mode": "infer", "bound": 1.10, "max_padding": 1.0},
    {"competitor": "gather_scatter", "mode": "train", "bound": 1.0, "max_padding": 0.5},
    {"competitor": "gather_scatter", "mode": "infer", "bound": 1.0, "max_padding": 0.5},
    {"competitor": "floor", "mode": "train", "bound": 1.6, "max_padding": 1.0},
]
#: peak memory of a training step: ours <= native + one mask-sized buffer (bool, 1 byte per position)
MEMORY_TARGET = "ours <= native + one mask-sized buffer"
HEADLINE = {"shape": "16x4096x64", "dtype": "float32", "padding": 0.5, "form": "compiled"}


def target_for(impl: str, mode: str, padding: float | None = None) -> float | None:
    """The bound on ours / ``impl`` for a row of ``mode`` at ``padding`` (None: any padding), or None."""
    for t in TARGETS:
        if t["competitor"] == impl and t["mode"] == mode:
            if padding is None or padding <= t["max_padding"] + 1e-9:
                return t["bound"]
    return None


def mask_mb(shape: list[int], channel_axis: int) -> float:
    """The size of one bool mask of ``shape`` without the channel axis, in MiB."""
    axis = channel_axis % len(shape)
    return math.prod(s for i, s in enumerate(shape) if i != axis) / 2**20


def make_config(
    quick: bool = False,
    torch_compile: bool | None = None,
    budget_s: float | None = None,
    torch_compile_bf16: bool = False,
    headline_only: bool = False,
    shapes: list[str] | None = None,
    dtypes: list[str] | None = None,
    paddings: list[float] | None = None,
) -> dict:
    """The configuration handed to every worker (JSON-serializable).

    ``budget_s`` is the steady-state timing budget per backend: the number of timed rounds
    of each group is chosen from the warm-up times so that the backend's groups fit it,
    between ``min_repeats`` and ``max_repeats`` (compile time is not part of it).
    ``shapes`` (ids), ``dtypes`` and ``paddings`` reduce the full grid to a subset.
    """
    if torch_compile is None:
        torch_compile = not quick
    forms = {b: list(f) for b, f in FORMS.items()}
    if not torch_compile:
        forms["torch"] = [f for f in forms["torch"] if f != "compiled"]
    # torch.compile costs 5-30 s per graph on this 2-core machine (two graphs per training step, one
    # per competitor, shape and dtype): bfloat16 is compiled only on request
    compiled_dtypes = {"torch": DTYPES if torch_compile_bf16 else ["float32"]}
    if quick:
        return {
            "quick": True,
            "shapes": QUICK_SHAPES,
            "dtypes": ["float32"],
            "paddings": [0.0, 0.5],
            "modes": MODES,
            "forms": forms,
            "compiled_dtypes": compiled_dtypes,
            "warmup": 1,
            "min_repeats": 1,
            "max_repeats": 2,
            "budget_s": 1.0 if budget_s is None else budget_s,
            "memory": True,
            "seed": 0,
            "headline": {**HEADLINE, "shape": QUICK_SHAPES[0]["id"]},
        }
    cfg = {
        "quick": False,
        "shapes": SHAPES,
        "dtypes": DTYPES,
        "paddings": PADDINGS,
        "modes": MODES,
        "forms": forms,
        "compiled_dtypes": compiled_dtypes,
        "warmup": 2,
        "min_repeats": 3,
        "max_repeats": 15,
        "budget_s": 90.0 if budget_s is None else budget_s,
        "memory": True,
        "seed": 0,
        "headline": HEADLINE,
    }
    if shapes is not None:
        unknown = sorted(set(shapes) - {s["id"] for s in SHAPES})
        if unknown:
            raise ValueError(f"unknown shape id(s) {unknown}; choose from {[s['id'] for s in SHAPES]}")
        cfg["shapes"] = [s for s in SHAPES if s["id"] in shapes]
    if dtypes is not None:
        unknown = sorted(set(dtypes) - set(DTYPES))
        if unknown:
            raise ValueError(f"unknown dtype(s) {unknown}; choose from {DTYPES}")
        cfg["dtypes"] = [d for d in DTYPES if d in dtypes]
    if paddings is not None:
        cfg["paddings"] = sorted(paddings)
    if any(x is not None for x in (shapes, dtypes, paddings)):
        cfg["reduced"] = True
    if headline_only:
        cfg.update(
            headline_only=True,
            shapes=[s for s in SHAPES if s["id"] == HEADLINE["shape"]],
            dtypes=[HEADLINE["dtype"]],
            paddings=[HEADLINE["padding"]],
            min_repeats=7,
            max_repeats=31,
        )
    return cfg


def make_mask(shape: list[int], channel_axis: int, padding: float, seed: int) -> np.ndarray:
    """A bool mask of ``shape`` without the channel axis: per batch element a prefix of real
    positions (variable-length sequences / point clouds padded at the end), lengths jittered
    by +-20 % around ``(1 - padding) * L`` so that samples differ."""
    axis = channel_axis % len(shape)
    rest = [s for i, s in enumerate(shape) if i != axis]
    batch, length = rest[0], math.prod(rest[1:])
    rng = np.random.default_rng(seed + 1)
    jitter = rng.uniform(-0.2, 0.2, size=batch)
    lengths = np.clip(np.rint((1.0 - padding) * length * (1.0 + jitter)), 0, length).astype(np.int64)
    if padding == 0.0:
        lengths[:] = length
    positions = np.arange(length)[None, :]
    return (positions < lengths[:, None]).reshape(rest)


def make_data(shape: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (normal, mean 1, std 2) and the output cotangent ``g`` (standard normal), float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32) * 2.0 + 1.0
    g = rng.standard_normal(shape, dtype=np.float32)
    return x, g
