"""Property-based and long-run tests of any backend, through the adapter protocol.

Every backend, present or future, gets these for free: they only speak the
adapter protocol (``maskbn_conformance.adapter``) and reuse the harness's
machinery. A fuzz example is a synthetic spec case (the ``spec/cases`` format)
plus a run dtype, so inputs are built by ``runner``/``inputs`` exactly as for
the spec (x generated in float64, rounded to the run dtype with
``dtypes.round_to``, both the backend and the float64 reference seeing the
rounded values), traces come from ``runner.run_backend`` and comparisons go
through ``invariants.assert_close`` / ``assert_identical`` and the named
invariants themselves.

Properties (``PROPERTIES``):

- ``differential``: random rank 2..5, channel axis, masks (empty, one real row,
  all real, random, prefixes), decay, epsilon, per-channel offsets up to 1e6
  and scales 1e-6..1e4, float32/float16/bfloat16, several train / eval /
  backward calls in a row: outputs, moving stats and gradients against the
  float64 reference within the spec's tolerances plus the rounding bounds
  derived in ``_StepBounds`` (conditioning the shared tolerances cannot know).
- ``garbage``: NaN, +-Inf, 1e38, denormals or random bit patterns in the padded
  rows give bit-identical real outputs, moving stats and real-row gradients as
  zero padding (``invariants.garbage_padding_isolated``).
- ``bad-input``: wrong mask shapes and ranks, float masks, masks over the
  channel axis, a channel count the layer was not built for, integer x, a
  a channel axis out of range: a ValueError / TypeError whose
  message names the offending shape or dtype, and the layer's state
  bit-identical afterwards (``raises_clear_error``, ``state_unchanged``).
- ``long_run``: thousands of training calls alternating empty, single-row and
  huge-offset batches keep the moving stats finite and within the reference's
  tolerance (not Hypothesis-driven: one long deterministic sequence).

A failure names the property, backend, the example (dtype, shape, axis, masks,
seeds) and carries a repro: a Python snippet that rebuilds the inputs and calls
the adapter step by step, and the example as a spec case to pin it.

The pytest wrappers live in ``conformance/fuzz``; the CLI report runs a bounded
pass (``python -m maskbn_conformance report --fuzz-examples N``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from . import reference as ref
from .adapter import Backend, LayerConfig, Unsupported
from .expectations import applicable
from .harness import LoadedBackend, judge
from .inputs import StepInputs
from .invariants import INVARIANTS, CheckFailed, Context, Runs, affine_gradients, assert_close
from .runner import (
    AS_WRITTEN,
    _state_for_layer,
    expand_steps,
    initial_state,
    layer_config,
    run_reference,
    step_inputs,
)
from .spec import Case, Spec, find_spec_root

FUZZ_DTYPES = ("float32", "float16", "bfloat16")
#: garbage the padded rows may hold (``inputs.PADDING_FILLS`` plus random bits)
GARBAGE = ("nan", "inf", "-inf", "huge", "denormal", "random-bits")

#: Unit roundoff of the arithmetic a backend runs in: float16 / bfloat16 inputs
#: are reduced and normalized in float32 (the contract), so they share float32's.
UNIT_ROUNDOFF = {"float16": 2.0**-24, "bfloat16": 2.0**-24, "float32": 2.0**-24, "float64": 2.0**-53}
#: largest finite value of each output dtype
MAX_FINITE = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38,
              "float64": 1.7976931348623157e308}  # fmt: skip
#: spacing of each output dtype at zero (its smallest subnormal): the spec's
#: relative tolerances say nothing about outputs this small, so one quantum is
#: added to every absolute allowance
QUANTUM = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 5e-324}
#: the contract's precision promise covers |mean| / std up to this (DESIGN.md section 1)
CONTRACT_RATIO = 1e6
#: the largest |offset| drawn per dtype: 1e6 as the issue asks, and for float16
#: well inside its range (65504) with room for offset + 6 standard deviations
MAX_OFFSET = {"float16": 4.0e4, "bfloat16": 1.0e6, "float32": 1.0e6, "float64": 1.0e6}
MAX_SCALE = {"float16": 2.0e3, "bfloat16": 1.0e4, "float32": 1.0e4, "float64": 1.0e4}

#: Fuzz shapes come from this small set: JAX compiles once per (layer, shape,
#: mask dtype), so a few shapes keep compiled code reusable. Every axis can be
#: the channel axis; at most 48 positions per channel, so the worst-case
#: summation bound n*u stays below the contract's 1e-5 (see _StepBounds).
SHAPES = {
    2: ((12, 3), (5, 1), (3, 8)),
    3: ((4, 6, 3), (2, 5, 2), (3, 1, 4)),
    4: ((2, 3, 4, 2), (3, 2, 2, 3)),
    5: ((2, 2, 3, 2, 2), (1, 3, 2, 2, 3)),
}
MASK_DTYPES = ("bool", "int8", "uint8", "int32", "int64")

#: At-scale examples (contract 1a, issue 12): batches of 8k and 131k positions,
#: channels last and first, checked by the spec's at-scale invariants (the
#: n * u bounds of _StepBounds are for small batches). The larger one draws
#: per-item lengths of at least 12 500, so it holds >= 1e5 real rows.
SCALE_LAYOUTS = (((4, 4096, 2), -1), ((8, 2, 16384), 1))
#: at-scale offsets per dtype (float16 tops out at 65504) and stds
SCALE_OFFSETS = {"float16": (1.0e3, 3.0e4), "bfloat16": (1.0e4, 1.0e6), "float32": (1.0e4, 1.0e6)}
SCALE_STDS = (1.0, 1.0e-2, 100.0)
#: one example in this many is at scale in the default form; in a compiled or
#: graph form (few examples, each compiled afresh) one in FORM_SCALE_SHARE
SCALE_SHARE = 8
FORM_SCALE_SHARE = 2


def long_run_steps(backend: Backend) -> int:
    """The long run's training calls: the backend's ``long_run_steps`` (10 000
    unless it says otherwise; measured on the 2-core CI machine: torch 0.7 ms,
    JAX 1.2 ms, Keras 3 on TensorFlow 7-12 ms per call and state read), or
    MASKBN_FUZZ_LONG_RUN_STEPS for every backend. The number run is printed."""
    env = os.environ.get("MASKBN_FUZZ_LONG_RUN_STEPS")
    return int(env) if env else backend.long_run_steps


# ------------------------------------------------------------------ examples


@dataclass(frozen=True)
class Example:
    """One fuzz input: a spec case (``spec/README.md`` format) and a run dtype.

    ``repr`` is valid Python, so Hypothesis's "Falsifying example" line and the
    repro snippet rebuild it exactly. ``fill`` is the garbage of the garbage
    property (None elsewhere).
    """

    dtype: str
    case: dict
    fill: str | None = None

    def spec_case(self) -> Case:
        return make_case(self.case)

    def config(self) -> LayerConfig:
        return layer_config(self.spec_case(), self.dtype)

    def initial_state(self) -> dict[str, np.ndarray]:
        """The state the layer starts from (neutral names, storage dtype)."""
        config = self.config()
        return _state_for_layer(initial_state(self.spec_case(), config.channels), config)

    def arrays(self) -> Iterator[tuple[str, StepInputs]]:
        """(call, inputs) per step, built by the runner exactly as the check does."""
        case = self.spec_case()
        for index, step in enumerate(expand_steps(case)):
            yield step["call"], step_inputs(case, step, index, self.dtype, AS_WRITTEN)

    def describe(self) -> str:
        """One line per fact a reader needs: dtype, shape, axis, masks, seeds."""
        c = self.case
        x = c["inputs"]["x"]
        params = ", ".join(f"{k}={v}" for k, v in c.get("params", {}).items())
        lines = [f"dtype {self.dtype}, x shape {tuple(x['shape'])}, {params or 'default params'}"]
        if self.fill:
            lines.append(f"padding garbage: {self.fill}")
        if c.get("init"):
            lines.append(f"init: {c['init']}")
        lines.append(f"x: {_brief(x)}; mask: {_brief(c['inputs'].get('mask', {'pattern': 'all'}))}")
        for i, step in enumerate(c["steps"]):
            extra = {k: v for k, v in step.items() if k != "call"}
            lines.append(f"step {i}: {step['call']} {_brief(extra) if extra else ''}".rstrip())
        return "\n".join(lines)

    def as_yaml(self) -> str:
        return yaml.safe_dump([self.case], default_flow_style=None, sort_keys=False, width=110).rstrip()


def _brief(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def make_case(raw: dict) -> Case:
    """A Case from one in-memory case dict (as Spec.load_file builds them)."""
    expect: dict[str, dict] = {}
    for item in raw["expect"]:
        if isinstance(item, str):
            expect[item] = {}
        else:
            ((name, args),) = item.items()
            expect[name] = dict(args or {})
    return Case(
        id=raw["id"],
        description=raw["description"],
        file=Path("<fuzz>"),
        params=dict(raw.get("params", {})),
        init=dict(raw.get("init", {})),
        inputs=dict(raw["inputs"]),
        dtypes=tuple(raw["dtypes"]),
        steps=tuple(raw["steps"]),
        expect=expect,
        raw=raw,
    )


def _sig(value: float, digits: int = 3) -> float:
    """A short float, so examples read well (the value used is this one)."""
    return float(f"{float(value):.{digits}g}")


# ---------------------------------------------------------------- strategies


@st.composite
def _distribution(draw, channels: int, dtype: str) -> dict[str, list[float]]:
    """Per-channel mean and std: scales log-uniform in 1e-6..1e4, offsets up to
    1e6 with |offset| / scale <= 1e6 (the range the contract's precision promise
    covers), everything inside the dtype's finite range."""
    means, stds = [], []
    for _ in range(channels):
        scale = min(10.0 ** draw(st.floats(-6, 4)), MAX_SCALE[dtype])
        kind = draw(st.sampled_from(("centred", "offset", "huge")))
        if kind == "centred":
            ratio = 0.0
        elif kind == "offset":
            ratio = 10.0 ** draw(st.floats(-2, 3))
        else:
            ratio = 10.0 ** draw(st.floats(3, 6))
        offset = min(ratio * scale, MAX_OFFSET[dtype]) * draw(st.sampled_from((1.0, -1.0)))
        means.append(_sig(offset))
        stds.append(_sig(scale))
    return {"mean": means, "std": stds}


@st.composite
def _mask(draw, mask_shape: tuple[int, ...]) -> dict[str, Any]:
    positions = int(np.prod(mask_shape))
    pattern = draw(st.sampled_from(("random", "all", "none", "single", "prefix", "half")))
    if pattern == "random":
        return {"pattern": "random", "p": draw(st.sampled_from((0.5, 0.1, 0.3, 0.7, 0.9))),
                "seed": draw(st.integers(0, 2**16))}  # fmt: skip
    if pattern == "single":
        return {"pattern": "single", "index": draw(st.integers(0, positions - 1))}
    if pattern == "prefix":
        per_item = int(np.prod(mask_shape[1:])) if len(mask_shape) > 1 else 1
        lengths = draw(st.lists(st.integers(0, per_item), min_size=mask_shape[0], max_size=mask_shape[0]))
        return {"pattern": "prefix", "lengths": lengths}
    return {"pattern": pattern}


@st.composite
def _layout(draw) -> tuple[tuple[int, ...], int, int]:
    """(shape, axis as the layer gets it, normalized axis)."""
    rank = draw(st.integers(2, 5))
    shape = draw(st.sampled_from(SHAPES[rank]))
    pos = draw(st.integers(0, rank - 1))
    axis = draw(st.sampled_from((pos - rank, pos)))  # negative and positive spellings
    return shape, axis, pos


@st.composite
def _scale_example(draw, dtype: str) -> Example:
    """One training call on a large batch at a large offset, decay 0, uneven per-item lengths."""
    shape, axis = draw(st.sampled_from(SCALE_LAYOUTS))
    pos = axis % len(shape)
    mask_shape = tuple(s for i, s in enumerate(shape) if i != pos)
    per_item = int(np.prod(mask_shape[1:]))
    floor = 12_500 if per_item > 12_500 else 1
    lengths = draw(st.lists(st.integers(floor, per_item), min_size=shape[0], max_size=shape[0]))
    offset = draw(st.sampled_from(SCALE_OFFSETS[dtype])) * draw(st.sampled_from((1.0, -1.0)))
    x = {"random": "normal", "mean": offset, "std": draw(st.sampled_from(SCALE_STDS)), "shape": list(shape),
         "seed": draw(st.integers(0, 2**16))}  # fmt: skip
    case = {
        "id": "fuzz-differential-at-scale",
        "description": "a Hypothesis example of the fuzz property differential, at scale",
        "params": {"axis": axis, "decay": 0.0},
        "inputs": {"x": x, "mask": {"pattern": "prefix", "lengths": lengths}},
        "dtypes": [dtype],
        "steps": [{"call": "train"}],
        "expect": list(SCALE_INVARIANTS),
    }
    return Example(dtype=dtype, case=case)


#: the spec's at-scale invariants, which judge the at-scale examples
SCALE_INVARIANTS = ("statistics_accurate_at_scale", "outputs_accurate_at_scale")


@st.composite
def differential_examples(draw, garbage: bool = False, scale_share: int = SCALE_SHARE) -> Example:
    """A random layer and 1-4 calls in a row (``garbage``: zero padding and a
    garbage fill to compare it with); one example in ``scale_share`` (not for
    garbage) is a large batch at a large offset instead."""
    dtype = draw(st.sampled_from(FUZZ_DTYPES))
    if not garbage and draw(st.integers(0, scale_share - 1)) == 0:
        return draw(_scale_example(dtype))
    shape, axis, pos = draw(_layout())
    channels = shape[pos]
    mask_shape = tuple(s for i, s in enumerate(shape) if i != pos)
    params = {
        "axis": axis,
        "decay": draw(st.sampled_from((0.9, 0.0, 0.5, 0.99, 0.999, 1.0)) | st.floats(0, 1).map(_sig)),
        "epsilon": _sig(10.0 ** draw(st.floats(-6, 0))),
        "padded_output": draw(st.sampled_from(("normalize", "zero"))),
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
    }
    dist = draw(_distribution(channels, dtype))
    init: dict[str, Any] = {}
    if draw(st.booleans()):
        init["gamma"] = [_sig(draw(st.floats(0.1, 3)) * draw(st.sampled_from((1, -1)))) for _ in range(channels)]
        init["beta"] = [_sig(draw(st.floats(-3, 3))) for _ in range(channels)]
    if draw(st.booleans()):
        # moving stats near the data, so inference calls on a fresh layer are sane
        init["moving_mean"] = list(dist["mean"])
        init["moving_var"] = [_sig(max(s * s * draw(st.floats(0.5, 2)), 1e-30)) for s in dist["std"]]
    mask_common: dict[str, Any] = {"dtype": draw(st.sampled_from(MASK_DTYPES))}
    if draw(st.integers(0, 3)) == 0:
        mask_common["channel_dim"] = "keep"
    padding = "zeros" if garbage else draw(st.sampled_from(("zeros", "keep")))
    x = {"random": "normal", **dist, "shape": list(shape), "seed": draw(st.integers(0, 2**16)), "padding": padding}

    steps = []
    calls = ("train", "backward", "eval") if not garbage else ("backward", "train", "eval")
    for index in range(draw(st.integers(1, 4))):
        step: dict[str, Any] = {"call": draw(st.sampled_from(calls))}
        mask = draw(_mask(mask_shape))
        if garbage and index == 0 and mask["pattern"] in ("all",):
            mask = {"pattern": "random", "p": 0.5, "seed": 1}  # garbage needs somewhere to go
        step["mask"] = mask
        if index:
            step["x"] = {"seed": draw(st.integers(0, 2**16))}
            if draw(st.integers(0, 2)) == 0:  # a batch from another distribution (huge offset after small...)
                step["x"].update(draw(_distribution(channels, dtype)))
        steps.append(step)
    expect = ["output_matches_reference", "moving_stats_match_reference"]
    if any(s["call"] == "backward" for s in steps):
        expect.append("gradients_match_reference")
    if garbage:
        expect = ["garbage_padding_isolated"]
    case = {
        "id": "fuzz-garbage" if garbage else "fuzz-differential",
        "description": "a Hypothesis example of the fuzz property " + ("garbage" if garbage else "differential"),
        "params": params,
        **({"init": init} if init else {}),
        "inputs": {"x": x, "mask": mask_common},
        "dtypes": [dtype],
        "steps": steps,
        "expect": expect,
    }
    fill = draw(st.sampled_from(GARBAGE)) if garbage else None
    return Example(dtype=dtype, case=case, fill=fill)


def garbage_examples() -> st.SearchStrategy[Example]:
    return differential_examples(garbage=True)


def _wrong_mask_shapes(squeezed: tuple[int, ...], full: tuple[int, ...], pos: int) -> list[tuple[tuple[int, ...], str]]:
    """Mask shapes the contract refuses (the reference's reading, ref.mask_elements, raises)."""
    out = []
    for i, s in enumerate(squeezed):
        out.append((squeezed[:i] + (s + 1,) + squeezed[i + 1 :], f"dim {i} one too large"))
        if s > 1:
            out.append((squeezed[:i] + (s - 1,) + squeezed[i + 1 :], f"dim {i} one too small"))
            out.append((squeezed[:i] + (1,) + squeezed[i + 1 :], f"dim {i} broadcast (size 1)"))
        if len(squeezed) > 1:  # not down to 0-d: np.ascontiguousarray (runner, adapters) makes that (1,)
            out.append((squeezed[:i] + squeezed[i + 1 :], f"dim {i} dropped (rank {len(squeezed) - 1})"))
    out.append((squeezed + (2,), "a trailing extra dim"))
    out.append(((3,) + squeezed, "a leading extra dim"))
    if len(squeezed) > 1:
        out.append(((int(np.prod(squeezed)),), "flattened"))
        if squeezed[::-1] != squeezed:
            out.append((squeezed[::-1], "transposed"))
    if full[pos] > 1:
        out.append((full[:pos] + (full[pos] + 1,) + full[pos + 1 :], "x's shape but one more channel"))
    seen, kept = set(), []
    for shape, why in out:
        if shape not in seen and not _mask_fits(shape, full, pos):
            seen.add(shape)
            kept.append((shape, why))
    return kept


def _mask_fits(shape: tuple[int, ...], full: tuple[int, ...], pos: int) -> bool:
    try:
        ref.mask_elements(np.ones(shape, dtype=bool), full, pos)
    except ValueError:
        return False
    return True


def _shape_str(shape) -> str:
    return str(tuple(int(s) for s in shape))


#: the kinds of bad input ``bad_input_examples`` draws from
# (a zero-size x is valid input, contract 1a: an empty output, state unchanged)
BAD_INPUT_KINDS = ("mask-shape", "float32-mask", "float16-mask", "float64-mask", "channels", "int32-x", "int64-x",
                   "axis")  # fmt: skip


@st.composite
def bad_input_examples(draw, kinds: tuple[str, ...] | None = None) -> Example:
    """A valid call, a bad one (which must raise naming the problem and change
    nothing), then a valid inference call on the same layer. ``kinds`` limits
    the kinds of bad input (default: every one of BAD_INPUT_KINDS)."""
    dtype = draw(st.sampled_from(FUZZ_DTYPES))
    shape, axis, pos = draw(_layout())
    channels = shape[pos]
    squeezed = tuple(s for i, s in enumerate(shape) if i != pos)
    params: dict[str, Any] = {"axis": axis, "decay": 0.5}
    x = {"random": "normal", "mean": 1.0, "std": 2.0, "shape": list(shape), "seed": draw(st.integers(0, 2**16))}
    good = {"call": draw(st.sampled_from(("train", "backward"))), "mask": {"pattern": "random", "p": 0.5, "seed": 3}}
    bad_call = draw(st.sampled_from(("train", "eval", "backward")))
    kind = draw(st.sampled_from(kinds or BAD_INPUT_KINDS))
    mask_dtype = draw(st.sampled_from(MASK_DTYPES))
    if kind == "mask-shape":
        wrong, why = draw(st.sampled_from(_wrong_mask_shapes(squeezed, shape, pos)))
        bad = {"mask": {"shape": list(wrong), "dtype": mask_dtype}}
        raises = {"type": "ValueError", "mentions": ["mask", _shape_str(wrong)]}
        note = f"mask shape {_shape_str(wrong)} for x shape {_shape_str(shape)}, channel axis {axis}: {why}"
    elif kind.endswith("-mask"):
        fdtype = kind.removesuffix("-mask")
        bad = {"mask": {"pattern": "random", "p": 0.5, "seed": 4, "dtype": fdtype}}
        raises = {"type": "TypeError", "mentions": ["mask", fdtype]}
        note = f"a {fdtype} mask"
    elif kind == "channels":
        other = draw(st.sampled_from([c for c in (1, 2, 4, 5, 6, 7, 9) if c != channels]))
        wrong = tuple(other if i == pos else s for i, s in enumerate(shape))
        bad = {"x": {"shape": list(wrong)}, "mask": {"pattern": "all"}}
        raises = {"type": "ValueError", "mentions": [str(channels), str(other)]}
        note = f"x of shape {_shape_str(wrong)} ({other} channels) into a layer built for {channels}"
    elif kind in ("int32-x", "int64-x"):
        # no framework differentiates with respect to an integer tensor (torch
        # refuses requires_grad before the layer sees it): forward calls only
        bad_call = draw(st.sampled_from(("train", "eval")))
        idtype = kind.removesuffix("-x")
        bad = {"x": {"dtype": idtype}}
        raises = {"type": "TypeError", "mentions": [idtype]}
        note = f"an {idtype} x"
    else:
        rank = len(shape)
        wrong_axis = draw(st.sampled_from((rank, rank + 1, -rank - 1)))
        params = {"axis": wrong_axis, "channels": channels, "decay": 0.5}
        raises = {"type": "ValueError", "mentions": ["axis", str(wrong_axis)]}
        note = f"channel axis {wrong_axis} for x of rank {rank}"
        case = {
            "id": "fuzz-bad-input",
            "description": f"bad input: {note}",
            "params": params,
            "inputs": {"x": x, "mask": {"pattern": "all"}},
            "dtypes": [dtype],
            "steps": [{"call": bad_call, "raises": raises}],
            "expect": ["raises_clear_error", "state_unchanged"],
        }
        return Example(dtype=dtype, case=case)
    steps = [good, {"call": bad_call, **bad, "raises": raises}, {"call": "eval", "mask": {"pattern": "half"}}]
    case = {
        "id": "fuzz-bad-input",
        "description": f"bad input: {note}",
        "params": params,
        "inputs": {"x": x, "mask": {"pattern": "random", "p": 0.5, "seed": 2, "dtype": mask_dtype}},
        "dtypes": [dtype],
        "steps": steps,
        "expect": ["raises_clear_error", "state_unchanged"],
    }
    return Example(dtype=dtype, case=case)


# ------------------------------------------------- expectations, layer reuse


class _Checks:
    """Named checks of one example, honouring the backend's expectations file
    (``status: skip`` skips the check, ``xfail`` tolerates its failure,
    ``tolerance`` overrides the spec's tolerance) for the fuzz case id
    (``fuzz-differential``...), the dtype and the invariant the check stands for."""

    def __init__(self, loaded: LoadedBackend, case_id: str, dtype: str, spec: Spec, report: PropertyResult | None):
        self.loaded, self.case_id, self.dtype, self.spec, self.report = loaded, case_id, dtype, spec, report

    def _expected(self, invariant: str):
        return applicable(self.loaded.expectations, self.case_id, self.dtype, invariant)

    def tol(self, quantity: str, invariant: str) -> dict[str, float]:
        return self._expected(invariant).tolerance(self.spec.tolerances[self.dtype][quantity])

    def run(self, invariant: str, check: Callable[[], None]) -> None:
        """The check under the harness's ``judge``; a failure or crash raises what
        the check raised (Hypothesis shrinks it), skips and xfails are counted."""
        expected = self._expected(invariant)
        outcome = judge(expected, check, self.loaded.name)
        if outcome.error is not None:
            raise outcome.error
        entry = {"skipped": expected.skip, "xfailed": expected.xfail}.get(outcome.status)
        if entry is not None and self.report is not None:
            self.report.expected[f"{outcome.status} {invariant}: {entry.reason}"] += 1


class PooledBackend:
    """A backend whose ``layer(config)`` hands out one layer per config, reset to
    its freshly built state. JAX compiles per layer instance and input shape
    (1-2 s for a train + eval + backward set), so reusing layers across
    examples with the same config and shape is what keeps a JAX fuzz pass within
    budget; the reset covers every state entry the protocol knows."""

    def __init__(self, backend: Backend):
        self._backend = backend
        self.name = backend.name
        self._pool: dict[LayerConfig, tuple[Any, dict[str, np.ndarray]]] = {}

    def layer(self, config: LayerConfig):
        if config not in self._pool:
            layer = self._backend.layer(config)
            self._pool[config] = (layer, layer.get_state())
        layer, fresh = self._pool[config]
        layer.set_state(fresh)
        return layer

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


class InForm:
    """A backend whose layers (masked and stock) run in one of its forms."""

    def __init__(self, backend: Backend, form: str):
        if form not in backend.forms:
            raise Unsupported(f"backend {backend.name} has no form {form!r} (its forms: {backend.forms})")
        self._backend = backend
        self.form = form

    def layer(self, config: LayerConfig):
        return self._backend.layer(dataclasses.replace(config, form=self.form))

    def stock_layer(self, config: LayerConfig):
        return self._backend.stock_layer(dataclasses.replace(config, form=self.form))

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


_FORMS: dict[tuple[int, str], InForm] = {}


def in_form(loaded: LoadedBackend, form: str) -> LoadedBackend:
    """``loaded`` with its backend building every layer in ``form`` (one wrapper per
    backend and form, so the layer pool is kept across examples)."""
    key = (id(loaded.backend), form)
    if key not in _FORMS or _FORMS[key]._backend is not loaded.backend:
        _FORMS[key] = InForm(loaded.backend, form)
    return dataclasses.replace(loaded, backend=_FORMS[key])


_POOLS: dict[int, PooledBackend] = {}


def pooled(backend: Backend) -> PooledBackend:
    if isinstance(backend, PooledBackend):
        return backend
    key = id(backend)
    if key not in _POOLS or _POOLS[key]._backend is not backend:
        _POOLS[key] = PooledBackend(backend)
    return _POOLS[key]


_SPEC: Spec | None = None


def default_spec() -> Spec:
    global _SPEC
    if _SPEC is None:
        _SPEC = Spec(find_spec_root(Path(__file__).resolve().parent))
    return _SPEC


def _context(backend: Backend, example: Example, spec: Spec) -> Context:
    return Context(backend=backend, case=example.spec_case(), dtype=example.dtype, spec=spec, runs=Runs())


# ------------------------------------------------------ derived error bounds


class _StepBounds:
    """What a correct float32 (or float64) implementation may differ from the
    float64 reference by in one call, per channel, beyond the spec's shared
    tolerances (which are written for well-conditioned data).

    Notation: u is the unit roundoff of the compute dtype (2^-24: float16 and
    bfloat16 are reduced in float32), n the number of real rows (at most 48
    here), g_n = n u / (1 - n u) the worst-case error factor of recursive
    summation (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
    eq. 4.4), A = max |x| over the real rows, m and v the batch mean and
    population variance, s = 1 / sqrt(v + eps).

    - batch mean: |dm| <= g_n A + u |m| (sum, then one division). For data with
      |mean| >> std this is the float32 ulp of the mean that the issue points
      at: at |mean| / std = 1e6 it is about 0.06 std, so a float32 output can
      only be trusted to ~ g_n * |mean| / std normalized units there.
    - batch variance: the contract promises relative error <= 1e-5 (the spec's
      float32 stats rtol) for |mean| / std <= 1e6; below that std (a few rows
      rounded to nearly equal values) the same absolute error as at the
      boundary is allowed: |dv| <= rtol_stats * max(v, (1e-6 A)^2). With
      n <= 48, g_n < 3e-6 stays below that promise.
    - s: relative error rho = |dv| / (2 (v + eps)) + 3u (add, sqrt, divide).
    - y = gamma (x - m) s + beta, per element:
      |dy| <= |gamma| s (|dm| + 2u (|x| + |m|)) + |gamma| |x - m| s rho
      + 2u (|y| + |beta|) + one quantum of the output dtype at zero.
      The 2u (|x| + |m|) term is the rounding of x - m (or of x * a + b with
      a = gamma s, b = beta - m a: the cancellation error is the same order).
    - inference calls and empty training calls use the layer's own moving
      stats (state before the call, exact): dm = dv = 0.
    - gradients (loss sum(y * dy) over real rows), with xhat's absolute error
      e_x = s (|dm| + 2u (A + |m|)) + max|xhat| rho, S1 = sum |dy|,
      S2 = sum |dy xhat|:
      |d dbeta| <= g_n S1; |d dgamma| <= e_x S1 + (g_n + u) S2;
      |d dx| <= |gamma| s (|d dbeta| + e_x |dgamma| + max|xhat| |d dgamma|) / n
      + 3u |gamma| s (max|dy| + (|dbeta| + max|xhat| |dgamma|) / n)
      + max|dx| rho + one quantum.
    - moving stats (float32 state, updated every training call) are compared
      with the spec's stats tolerance, whose rtol (1e-5) already is the
      contract's relative accuracy; the allowance adds only what that rtol
      cannot see, carried from call to call:
      e <- decay e + (1 - decay) d + 4u (|old| + |batch stat|), with
      d = g_n A for the mean (summation error relative to max |x|, not to a
      mean that may be near 0) and d = rtol_stats (1e-6 A)^2 for the variance
      (the floor above). The rounding term 4u (|old| + |batch stat|) is
      relative to the operands, not to the result: The rounding term is relative to the
      an update written as old + w (batch - old) (torch's lerp, w = 1 - decay rounded to float32)
      rounds w (batch - old), which can be far larger than the new value when
      the two nearly cancel (decay 0.002, old var 100, batch var 0: 6e-6
      absolute on a result of 0.195).

    Each bound is an allowance added per channel to the spec tolerance (whose
    atol stays relative to the whole compared array); it is ~1e-6 relative
    for well-conditioned data and grows only with |mean| / std, so the spec's
    tolerances keep their meaning and are never loosened for everyone.
    """

    def __init__(self, rows, realf, state, cfg: ref.RefConfig, training: bool, dtype: str, stats_rtol: float):
        self.u = u = UNIT_ROUNDOFF[dtype]
        self.quantum = QUANTUM[dtype]
        channels = rows.shape[1]
        self.n = n = int(realf.sum())
        self.gamma = np.abs(state["gamma"]) if cfg.scale else np.ones(channels)
        self.beta = np.abs(state["beta"]) if cfg.center else np.zeros(channels)
        self.g_n = n * u / (1 - n * u)
        if training and n:
            real_rows = rows[realf]
            m, v, _ = ref.batch_moments(rows, realf)
            self.A = np.max(np.abs(real_rows), axis=0)
            self.dm = self.g_n * self.A + u * np.abs(m)
            self.dv = stats_rtol * np.maximum(v, (self.A / CONTRACT_RATIO) ** 2)
            # the parts the spec's stats rtol does not already cover (moving stats check)
            self.stats_extra = {
                "moving_mean": self.g_n * self.A,
                "moving_var": stats_rtol * (self.A / CONTRACT_RATIO) ** 2,
            }
            self.batch = {"moving_mean": m, "moving_var": v}
        else:
            m, v = state["moving_mean"], state["moving_var"]
            self.stats_extra = {"moving_mean": np.zeros(channels), "moving_var": np.zeros(channels)}
            self.A = np.zeros(channels)
            self.dm = np.zeros(channels)
            self.dv = np.zeros(channels)
            self.batch = None
        self.m, self.v = m, v
        self.s = 1.0 / np.sqrt(v + cfg.epsilon)
        self.rho = self.dv / (2 * (v + cfg.epsilon)) + 3 * u

    def output(self, x_rows, y_rows, where) -> np.ndarray:
        """Allowance per channel for the outputs at ``where`` (rows, C)."""
        u = self.u
        with np.errstate(invalid="ignore", over="ignore"):
            ax = np.where(where, np.abs(x_rows), 0).max(axis=0)
            dx = np.where(where, np.abs(x_rows - self.m), 0).max(axis=0)
            ay = np.where(where, np.abs(y_rows), 0).max(axis=0)
        g, s = self.gamma, self.s
        return (
            g * s * (self.dm + 2 * u * (ax + np.abs(self.m)))
            + g * dx * s * self.rho
            + 2 * u * (ay + self.beta)
            + self.quantum
        )

    def gradients(self, xhat_rows, dy_rows, realf, dx_ref, dgamma, dbeta):
        """Allowances per channel for (dx, dgamma, dbeta)."""
        u, n, g, s = self.u, max(self.n, 1), self.gamma, self.s
        xh, dy = xhat_rows[realf], dy_rows[realf]
        s1 = np.abs(dy).sum(axis=0)
        s2 = np.abs(dy * xh).sum(axis=0)
        xh_max = np.abs(xh).max(axis=0) if len(xh) else np.zeros_like(s)
        dy_max = np.abs(dy).max(axis=0) if len(dy) else np.zeros_like(s)
        e_x = s * (self.dm + 2 * u * (self.A + np.abs(self.m))) + xh_max * self.rho
        d_dbeta = self.g_n * s1
        d_dgamma = e_x * s1 + (self.g_n + u) * s2
        d_dx = (
            g * s * (d_dbeta + e_x * np.abs(dgamma) + xh_max * d_dgamma) / n
            + 3 * u * g * s * (dy_max + (np.abs(dbeta) + xh_max * np.abs(dgamma)) / n)
            + np.abs(dx_ref[realf]).max(axis=0, initial=0.0) * self.rho
            + self.quantum
        )
        return d_dx, d_dgamma + self.quantum, d_dbeta + self.quantum


def assert_close_channels(actual, expected, tol, extra, what: str, where=None) -> None:
    """``invariants.assert_close`` of (rows, C) arrays, with an absolute
    allowance ``extra[c]`` added per channel: channel c passes where
    |actual - expected| <= atol * scale + extra[c] + rtol * |expected|, scale
    being the largest |expected| of the whole compared array, as in the spec."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise CheckFailed(f"{what}: shape {actual.shape}, expected {expected.shape}")
    if expected.ndim == 1:
        actual, expected = actual[None, :], expected[None, :]
        where = None if where is None else where[None, :]
    if where is None:
        where = np.ones(expected.shape, dtype=bool)
    if not where.any():
        return
    scale = max(float(np.max(np.abs(expected[where]))), 1e-30)
    for c in range(expected.shape[1]):
        w = where[:, c]
        if not w.any():
            continue
        scale_c = max(float(np.max(np.abs(expected[w, c]))), 1e-30)
        atol_c = (tol.get("atol", 0.0) * scale + float(extra[c])) / scale_c
        assert_close(
            actual[:, c], expected[:, c], {"atol": atol_c, "rtol": tol.get("rtol", 0.0)},
            f"{what}, channel {c} (spec tolerance {tol} + derived allowance {float(extra[c]):.3g})", w,
        )  # fmt: skip


# --------------------------------------------------------------- properties


def _compare_outputs(record, y_ref, rows, realf, bounds: _StepBounds, cfg, tol, dtype: str, label: str) -> None:
    y = ref.to_rows(record.output.value, cfg.axis)
    y_want = ref.to_rows(y_ref, cfg.axis)
    # an expected value beyond half the dtype's range may round to +-Inf: those
    # elements are left out (they only occur in padded rows, and in float16
    # inference with moving stats far from the data)
    fits = np.abs(y_want) <= 0.5 * MAX_FINITE[dtype]
    sets = [("real rows", realf[:, None] & fits)]
    if cfg.padded_output == "normalize":  # "zero": padded_rows_zero checks them exactly
        sets.append(("padded rows", ~realf[:, None] & fits))
    for name, where in sets:
        extra = bounds.output(rows, y_want, where)
        assert_close_channels(y, y_want, tol, extra, f"{label} y, {name}", where)


def _compare_stats(got: dict, want: dict, tol, bound: dict, label: str) -> None:
    for key in ("moving_mean", "moving_var"):
        if key not in got:
            raise CheckFailed(f"{label}: the layer has no {key}")
        assert_close_channels(got[key], want[key], tol, bound[key], f"{label} {key}")


def _compare_gradients(record, aux, realf, bounds: _StepBounds, cfg, tol, label: str) -> None:
    dx_ref, dgamma, dbeta = ref.backward(record.inputs.dy64, aux, cfg)
    dx_want = ref.to_rows(dx_ref, cfg.axis)
    dy_rows = ref.to_rows(record.inputs.dy64, cfg.axis)
    e_dx, e_dgamma, e_dbeta = bounds.gradients(aux["xhat"], dy_rows, realf, dx_want, dgamma, dbeta)
    dx = ref.to_rows(record.grads.x.value, cfg.axis)
    real = np.broadcast_to(realf[:, None], dx_want.shape)
    assert_close_channels(dx, dx_want, tol, e_dx, f"{label} dx, real rows", real)
    extras = {"gamma": e_dgamma, "beta": e_dbeta}
    for name, got, want in affine_gradients(cfg, record.grads, dgamma, dbeta, label):
        assert_close_channels(got, want, tol, extras[name], f"{label} d{name}")


def check_differential(loaded: LoadedBackend, example: Example, spec: Spec | None = None, report=None) -> None:
    """Outputs, moving stats and gradients of every call against the float64
    reference; dtypes, padded-row rules and untouched state by the harness's
    own invariants."""
    spec = spec or default_spec()
    ctx = _context(pooled(loaded.backend), example, spec)
    checks = _Checks(loaded, "fuzz-differential", example.dtype, spec, report)
    if set(SCALE_INVARIANTS) <= set(example.case["expect"]):
        for name in SCALE_INVARIANTS:
            checks.run(name, partial(INVARIANTS[name], ctx))
        return
    trace = ctx.trace()  # CheckFailed if a valid call raised; Unsupported propagates
    chain = run_reference(ctx.case, example.dtype, trace)  # the float64 run of the same calls
    dtype = example.dtype
    channels = trace.config.channels
    stats_tol = checks.tol("stats", "moving_stats_match_reference")
    out_tol = checks.tol("output", "output_matches_reference")
    grad_tol = checks.tol("grad", "gradients_match_reference")
    err = {"moving_mean": np.zeros(channels), "moving_var": np.zeros(channels)}
    for record, want in zip(trace.steps, chain):
        inputs = record.inputs
        rank = inputs.x64.ndim
        cfg = ref.RefConfig.of(trace.config, trace.config.axis % rank)
        training = record.call in ("train", "backward")
        before = ref.full_state(record.state_before, channels)
        rows = ref.to_rows(inputs.x64, cfg.axis)
        realf = ref.to_rows(inputs.real, cfg.axis)[:, 0]  # the fuzz masks whole rows
        # expected output of this call from the layer's own state before it:
        # the moving stats are judged separately, against the chained reference
        y_ref, _, aux = ref.forward(inputs.x64, inputs.real, before, cfg, training)
        bounds = _StepBounds(rows, realf, before, cfg, training, dtype, stats_tol["rtol"])
        label = f"step {record.index} ({record.call}, {int(realf.sum())} real rows)"

        checks.run(
            "output_matches_reference",
            partial(_compare_outputs, record, y_ref, rows, realf, bounds, cfg, out_tol, dtype, label),
        )
        if bounds.batch is not None:
            for key in err:
                err[key] = (
                    cfg.decay * err[key]
                    + (1 - cfg.decay) * bounds.stats_extra[key]
                    + 4 * bounds.u * (np.abs(before[key]) + np.abs(bounds.batch[key]))
                )
        checks.run(
            "moving_stats_match_reference",
            partial(_compare_stats, record.state_after, want.state_after, stats_tol, dict(err), label),
        )
        if record.grads is not None:
            checks.run(
                "gradients_match_reference",
                partial(_compare_gradients, record, aux, realf, bounds, cfg, grad_tol, label),
            )

    # the structural invariants, exactly as the spec runs them
    checks.run("output_dtype_matches_input", lambda: INVARIANTS["output_dtype_matches_input"](ctx))
    checks.run("state_unchanged", lambda: INVARIANTS["state_unchanged"](ctx))
    if any(r.grads is not None for r in trace.steps):
        checks.run("padded_rows_zero_gradient", lambda: INVARIANTS["padded_rows_zero_gradient"](ctx))
    if trace.config.padded_output == "zero":
        checks.run("padded_rows_zero", lambda: INVARIANTS["padded_rows_zero"](ctx))


def check_garbage(loaded: LoadedBackend, example: Example, spec: Spec | None = None, report=None) -> None:
    """Garbage in the padded rows vs zeros: real outputs, every state bit and
    real-row gradients bit-identical (``garbage_padding_isolated``)."""
    spec = spec or default_spec()
    ctx = _context(pooled(loaded.backend), example, spec)
    ctx.args = {"fills": [example.fill]}
    checks = _Checks(loaded, "fuzz-garbage", example.dtype, spec, report)
    checks.run("garbage_padding_isolated", lambda: INVARIANTS["garbage_padding_isolated"](ctx))


def check_bad_input(loaded: LoadedBackend, example: Example, spec: Spec | None = None, report=None) -> None:
    """The bad call raises the declared error naming the problem; no call
    changes the state; the layer still works afterwards. A fresh layer per
    example: a bad first call must not poison a pooled layer."""
    spec = spec or default_spec()
    ctx = _context(loaded.backend, example, spec)
    checks = _Checks(loaded, "fuzz-bad-input", example.dtype, spec, report)
    checks.run("raises_clear_error", lambda: INVARIANTS["raises_clear_error"](ctx))
    checks.run("state_unchanged", lambda: INVARIANTS["state_unchanged"](ctx))
    trace = ctx.trace(allow_errors=True)
    for record in trace.steps:
        if record.expects_error is None and record.error is not None:
            raise CheckFailed(f"step {record.index} ({record.call}) is valid but raised {record.error!r}")


# ------------------------------------------------------------------- running


@dataclass
class PropertyResult:
    """What one property run tried and found."""

    backend: str
    prop: str
    #: examples executed (generation and, after a failure, shrinking)
    tried: int = 0
    #: examples the backend could not run (Unsupported), by reason
    unsupported: Counter = field(default_factory=Counter)
    #: checks skipped or xfailed by the backend's expectations, by reason
    expected: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    #: the falsifying example's failure and repro (None: none found)
    failure: str | None = None
    #: long run: training calls made
    steps: int = 0
    #: kinds of input left out as the backend's known bugs
    excluded: tuple[str, ...] = ()
    #: known-bug runs: the reason their failure is expected
    xfail_reason: str | None = None

    @property
    def ran(self) -> int:
        return self.tried - sum(self.unsupported.values())

    def summary(self) -> str:
        if self.prop == "long-run":
            text = f"{self.backend} long-run: {self.steps} training calls in {self.seconds:.1f}s"
        else:
            text = f"{self.backend} {self.prop}: {self.tried} inputs tried in {self.seconds:.1f}s"
        if self.unsupported:
            text += f", {sum(self.unsupported.values())} unsupported (" + "; ".join(self.unsupported) + ")"
        if self.excluded:
            text += f", without the known-bug kinds {', '.join(self.excluded)}"
        if self.expected:
            text += ", per expectations: " + "; ".join(f"{n}x {r}" for r, n in self.expected.items())
        if self.xfail_reason:
            return text + (", still falsified (xfail)" if self.failure else ", NO LONGER FAILS (xpass)")
        return text + (", FALSIFIED" if self.failure else ", no failure")


def known_bugs(loaded: LoadedBackend, prop: str) -> dict[str, str]:
    """kind -> reason: the backend's known bugs of one property, from its
    expectations file (``{case: fuzz-<property>, input: <kind>, status: xfail,
    reason: ...}``). The property runs without those kinds on that backend (the
    summary says so), and each kind alone must still falsify it: a strict xfail
    (``check_known_bugs``), so a fix shows up as a failure asking to remove the entry."""
    return {e.input: e.reason for e in loaded.expectations if e.input is not None and e.case == f"fuzz-{prop}"}


def _check_known_bug_entries(loaded: LoadedBackend) -> None:
    for e in loaded.expectations:
        if e.input is None:
            continue
        prop = e.case.removeprefix("fuzz-")
        if prop != "bad-input" or e.input not in BAD_INPUT_KINDS:
            raise ValueError(
                f"{loaded.name} expectations: {e.label()}: known bugs name the bad-input property and one of "
                f"its input kinds {BAD_INPUT_KINDS} (case fuzz-bad-input)"
            )


CHECKS: dict[str, tuple[Callable[..., st.SearchStrategy[Example]], Callable[..., None]]] = {
    "differential": (differential_examples, check_differential),
    "garbage": (garbage_examples, check_garbage),
    "bad-input": (bad_input_examples, check_bad_input),
}
PROPERTIES = (*CHECKS, "long-run")


def repro(backend: str, prop: str, example: Example) -> str:
    """A Python snippet rebuilding the example's inputs and calling the adapter."""
    fn = CHECKS[prop][1].__name__
    return f"""repro (python, in an env where backend {backend!r} is installed):
    import numpy as np
    from maskbn_conformance import fuzz
    from maskbn_conformance.harness import load_backend
    ex = fuzz.{example!r}
    loaded = load_backend({backend!r})
    layer = loaded.backend.layer(ex.config())        # {_layer_words(example)}
    layer.set_state(ex.initial_state())
    for call, inp in ex.arrays():                    # seeded: x = mean + std * N(0, 1), rounded to the dtype
        print(call, inp.x.shape, inp.x_dtype, None if inp.mask is None else (inp.mask.shape, inp.mask.dtype))
        if call == "backward":
            out, grads = layer.forward_backward(inp.x, inp.x_dtype, inp.mask, inp.dy)
        else:
            out = layer.forward(inp.x, inp.x_dtype, inp.mask, training=call == "train")
        print(out.dtype, out.value.ravel()[:6], layer.get_state())
    {f"fuzz.{fn}(loaded, ex)":<48} # the failing check itself
as a spec case (to pin it in spec/cases/*.yaml):
{example.as_yaml()}"""


def _layer_words(example: Example) -> str:
    c = example.config()
    return f"channels {c.channels}, axis {c.axis}, rank {c.rank}, dtype {c.dtype}"


def failure_message(backend: str, prop: str, example: Example, exc: BaseException) -> str:
    return (
        f"fuzz property {prop!r} falsified on backend {backend}:\n{exc}\n"
        f"example:\n  {example.describe().replace(chr(10), chr(10) + '  ')}\n{repro(backend, prop, example)}"
    )


def ci_settings(max_examples: int) -> settings:
    """The CI profile's settings (conformance/fuzz/conftest.py's "ci"), built on
    Hypothesis's own defaults, whatever profile another conftest loaded."""
    return settings(
        settings.get_profile("default"),
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


def run_property(
    prop: str,
    loaded: LoadedBackend,
    hypothesis_settings: settings | None = None,
    spec: Spec | None = None,
    result: PropertyResult | None = None,
    kinds: tuple[str, ...] | None = None,
    form: str | None = None,
    scale_share: int | None = None,
) -> PropertyResult:
    """Run one Hypothesis property on a backend.

    ``hypothesis_settings`` defaults to the active profile. A falsified property
    raises CheckFailed (Hypothesis printed the falsifying example first), its
    message carrying the failure, the example and a repro; ``result`` (pass one
    to read it after a raise) counts the inputs tried. Raises Unsupported if the
    backend could run none. ``kinds`` (bad-input only) chooses the kinds of
    input; by default every kind but the backend's known bugs. ``form`` runs
    every layer in that form of the backend (torch compile, Keras xla, ...);
    ``scale_share`` (differential only) makes one example in that many an
    at-scale one.
    """
    strategy, check = CHECKS[prop]
    if form is not None:
        loaded = in_form(loaded, form)
    if scale_share is not None:
        strategy = partial(strategy, scale_share=scale_share)
    result = result or PropertyResult(loaded.name, prop)
    spec = spec or default_spec()
    strategy_args = {}
    if prop == "bad-input":
        if kinds is None:
            excluded = known_bugs(loaded, prop)
            kinds = tuple(k for k in BAD_INPUT_KINDS if k not in excluded)
            result.excluded = tuple(excluded)
        strategy_args["kinds"] = kinds

    def fuzz_property(example: Example) -> None:
        result.tried += 1
        try:
            check(loaded, example, spec, result)
        except Unsupported as exc:
            result.unsupported[str(exc)] += 1
            reject()
        except CheckFailed as exc:
            message = failure_message(loaded.name, prop, example, exc)
            result.failure = message
            raise CheckFailed(message) from None

    fuzz_property.__name__ = f"fuzz_{prop.replace('-', '_')}"
    test = given(example=strategy(**strategy_args))(fuzz_property)
    if hypothesis_settings is not None:
        test = hypothesis_settings(test)
    started = time.perf_counter()
    try:
        test()
    except Unsatisfiable:
        if result.tried and result.ran == 0:
            raise Unsupported(f"backend {loaded.name} ran none of {result.tried} inputs: "
                              + "; ".join(result.unsupported)) from None  # fmt: skip
        raise
    finally:
        result.seconds = time.perf_counter() - started
    if result.tried and result.ran == 0:
        raise Unsupported(f"backend {loaded.name} ran none of {result.tried} inputs: " + "; ".join(result.unsupported))
    return result


def check_known_bugs(
    loaded: LoadedBackend, hypothesis_settings: settings | None = None, spec: Spec | None = None
) -> list[PropertyResult]:
    """Each of the backend's known bugs (``known_bugs``) run alone: every one must
    still be falsified. Returns their results (``failure`` set, ``xfail_reason``
    the entry's reason); raises CheckFailed for an entry that no longer fails."""
    _check_known_bug_entries(loaded)
    # the first falsifying input is proof enough: no shrinking (minutes on JAX)
    quick = settings(hypothesis_settings or settings(), phases=(Phase.explicit, Phase.generate))
    results = []
    for prop in CHECKS:
        for kind, reason in known_bugs(loaded, prop).items():
            results.append(_run_known_bug(loaded, prop, kind, reason, quick, spec))
    return results


def _run_known_bug(
    loaded: LoadedBackend, prop: str, kind: str, reason: str, quick: settings, spec: Spec | None
) -> PropertyResult:
    result = PropertyResult(loaded.name, f"{prop} [{kind}] (known bug)")
    result.xfail_reason = reason
    try:
        run_property(prop, loaded, quick, spec, result, kinds=(kind,))
    except CheckFailed:
        return result
    raise CheckFailed(
        f"known bug ({loaded.name}, {prop}, {kind}) no longer reproduces in {result.tried} inputs: remove the "
        f"entry {{case: fuzz-{prop}, input: {kind}}} from {loaded.name}'s conformance_expectations.yaml "
        f"(reason was: {reason})"
    )


# ------------------------------------------------------------------ long run


LONG_RUN_SHAPE = (2, 6, 3)
#: the huge-offset batch: |mean| / std = 1e6 on channels 0 and 1 (the contract's limit)
LONG_RUN_HUGE = (np.array([1.0e6, -2.0e5, 3.0]), np.array([1.0, 0.2, 1.0e-3]))
LONG_RUN_DECAY = 0.99


def long_run(loaded: LoadedBackend, steps: int | None = None, spec: Spec | None = None, seed: int = 0,
             result: PropertyResult | None = None) -> PropertyResult:  # fmt: skip
    """``steps`` float32 training calls cycling through an empty batch, a batch
    with one real row and a huge-offset batch, on a (2, 6, 3) channels-last
    layer with decay 0.99: after every call the moving stats must be finite and
    match the float64 reference run alongside (spec stats tolerance plus the
    accumulated float32 rounding of the moving average, see _StepBounds), and
    the outputs must be finite."""
    spec = spec or default_spec()
    steps = long_run_steps(loaded.backend) if steps is None else steps
    result = result or PropertyResult(loaded.name, "long-run")
    dtype = "float32"
    checks = _Checks(loaded, "fuzz-long-run", dtype, spec, result)
    stats_tol = checks.tol("stats", "moving_stats_match_reference")
    channels = LONG_RUN_SHAPE[-1]
    config = LayerConfig(channels, -1, 3, LONG_RUN_DECAY, 1e-3, True, True, "normalize", dtype)
    cfg = ref.RefConfig(2, config.decay, config.epsilon, True, True, "normalize")
    layer = loaded.backend.layer(config)
    state = {k: v.astype(np.float32).astype(np.float64) for k, v in ref.initial_state(channels).items()}
    layer.set_state({k: v.astype(np.float32) for k, v in state.items()})
    err = {"moving_mean": np.zeros(channels), "moving_var": np.zeros(channels)}
    rng = np.random.default_rng(seed)
    mask_shape = LONG_RUN_SHAPE[:-1]
    u = UNIT_ROUNDOFF[dtype]
    started = time.perf_counter()
    kinds = ("empty", "single-row", "huge-offset")
    try:
        for step in range(steps):
            kind = kinds[step % 3]
            z = rng.standard_normal(LONG_RUN_SHAPE)
            real = np.zeros(mask_shape, dtype=bool)
            if kind == "empty":
                x = z
            elif kind == "single-row":
                real.reshape(-1)[rng.integers(real.size)] = True
                x = 5.0 + 2.0 * z
            else:
                real = rng.random(mask_shape) < 0.5
                real.reshape(-1)[rng.integers(real.size)] = True
                x = LONG_RUN_HUGE[0] + LONG_RUN_HUGE[1] * z
            x32 = x.astype(np.float32)
            x64 = x32.astype(np.float64)
            out = layer.forward(x32, dtype, real, training=True)
            result.steps = step + 1
            rows, realf = ref.to_rows(x64, 2), real.reshape(-1)
            bounds = _StepBounds(rows, realf, state, cfg, True, dtype, stats_tol["rtol"])
            _, new_state, _ = ref.forward(x64, real, state, cfg, True)
            if bounds.batch is not None:
                for key in err:
                    err[key] = (
                        cfg.decay * err[key] + (1 - cfg.decay) * bounds.stats_extra[key]
                        + 4 * u * (np.abs(state[key]) + np.abs(bounds.batch[key]))
                    )  # fmt: skip
            state = new_state
            got = layer.get_state()
            label = f"long run, training call {step} of {steps} ({kind} batch, {int(realf.sum())} real rows)"
            if not np.isfinite(out.value).all():
                index = tuple(int(i) for i in np.argwhere(~np.isfinite(out.value))[0])
                raise CheckFailed(f"{label}: y{index} = {out.value[index]!r} is not finite")
            for key in ("moving_mean", "moving_var"):
                if not np.isfinite(got[key]).all():
                    raise CheckFailed(f"{label}: {key} is not finite: {got[key]!r}")

            checks.run("moving_stats_match_reference", partial(_compare_stats, got, state, stats_tol, dict(err), label))
    except CheckFailed as exc:
        result.failure = (
            f"fuzz long run falsified on backend {loaded.name}:\n{exc}\n"
            f"repro (python): from maskbn_conformance import fuzz; from maskbn_conformance.harness import "
            f"load_backend; fuzz.long_run(load_backend({loaded.name!r}), steps={steps}, seed={seed})"
        )
        raise CheckFailed(result.failure) from None
    finally:
        result.seconds = time.perf_counter() - started
    return result
