"""Running a case's steps on a backend layer and on the float64 reference.

A run produces a Trace: per step, what went in, what came out, and the state
before and after. Invariants only ever look at traces; they never talk to a
backend themselves, except through ``Runs`` (which reruns a case with a variant:
other padding, another mask dtype, no mask, or the framework's stock layer).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import reference as ref
from .adapter import Backend, Gradients, Layer, LayerConfig, Output, ShardedLayer, Unsupported
from .inputs import StepInputs, build_step_inputs, normalize_axis, state_value
from .spec import Case


@dataclass(frozen=True)
class Variant:
    """How a rerun differs from the case as written (the default: not at all)."""

    fill: str | None = None
    mask_dtype: str | None = None
    #: pass no mask argument (the case's mask must be all real)
    drop_mask: bool = False
    #: run the framework's stock batch norm instead of the masked layer
    stock: bool = False
    #: in eval steps, pass this mask pattern instead of the case's
    eval_mask: str | None = None
    #: split the batch over the case's shards and run the synchronized layer
    sharded: bool = False
    #: run with this moving-variance convention instead of the case's (parity
    #: with a stock layer uses the framework's stock convention)
    moving_var: str | None = None
    #: the backend form to run in (None: its default)
    form: str | None = None

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.__dict__.items() if v not in (None, False)]
        return ",".join(parts) or "as written"


AS_WRITTEN = Variant()


@dataclass
class StepRecord:
    index: int
    call: str
    inputs: StepInputs
    state_before: dict[str, np.ndarray]
    state_after: dict[str, np.ndarray]
    output: Output | None = None
    grads: Gradients | None = None
    #: hvp steps: d/dx <d/dx sum(y * dy), v>
    hvp: Output | None = None
    error: BaseException | None = None
    expects_error: dict[str, Any] | None = None
    #: round_trip steps: eval outputs of the layer before and after the trip
    eval_before: Output | None = None
    eval_after: Output | None = None


@dataclass
class Trace:
    backend: str
    case: Case
    dtype: str
    variant: Variant
    config: LayerConfig | None
    steps: list[StepRecord] = field(default_factory=list)
    build_error: BaseException | None = None


@dataclass
class RefStep:
    y: np.ndarray | None
    state_after: dict[str, np.ndarray]
    dx: np.ndarray | None = None
    dgamma: np.ndarray | None = None
    dbeta: np.ndarray | None = None
    hvp: np.ndarray | None = None
    #: per channel: the real elements the batch statistics came from (0: moving stats used)
    n: np.ndarray | None = None
    #: per channel: the batch's population variance over those elements (0 where n is 0)
    batch_var: np.ndarray | None = None


def expand_steps(case: Case) -> list[dict[str, Any]]:
    steps = []
    for step in case.steps:
        for _ in range(step.get("repeat", 1)):
            steps.append(step)
    return steps


def layer_config(case: Case, dtype: str, variant: Variant = AS_WRITTEN) -> LayerConfig:
    x_spec = case.inputs["x"]
    shape = np.asarray(x_spec["literal"]).shape if "literal" in x_spec else tuple(x_spec["shape"])
    axis = case.param("axis")
    channels = case.param("channels")
    if channels is None:
        channels = shape[axis] if -len(shape) <= axis < len(shape) else 1
    return LayerConfig(
        channels=int(channels),
        axis=int(axis),
        rank=len(shape),
        decay=float(case.param("decay")),
        epsilon=float(case.param("epsilon")),
        center=bool(case.param("center")),
        scale=bool(case.param("scale")),
        padded_output=str(case.param("padded_output")),
        dtype=dtype,
        moving_var=variant.moving_var or str(case.param("moving_var")),
        form=variant.form,
    )


def initial_state(case: Case, channels: int) -> dict[str, np.ndarray]:
    state = ref.initial_state(channels)
    for i, (name, value) in enumerate(sorted(case.init.items())):
        state[name] = state_value(value, channels, seed=100 + i)
    return state


def step_inputs(case: Case, step: dict[str, Any], index: int, dtype: str, variant: Variant) -> StepInputs:
    x_spec = dict(case.inputs["x"], **step.get("x", {}))
    mask_spec = dict(case.inputs.get("mask", {"pattern": "all"}), **step.get("mask", {}))
    if variant.drop_mask or variant.stock:
        mask_spec = dict(mask_spec, pattern="absent")
    inputs = build_step_inputs(
        x_spec,
        mask_spec,
        axis=case.param("axis"),
        dtype=dtype,
        fill=variant.fill,
        mask_dtype=variant.mask_dtype,
        backward=step["call"] in ("backward", "hvp"),
        seed_offset=index,
        direction=step["call"] == "hvp",
    )
    if variant.eval_mask and step["call"] == "eval" and inputs.mask is not None:
        # same x (padding included), only the mask argument differs
        other = build_step_inputs(case.inputs["x"], {"pattern": variant.eval_mask}, case.param("axis"), dtype)
        mask = other.mask.reshape(inputs.mask.shape).astype(inputs.mask.dtype)
        inputs = dataclasses.replace(inputs, mask=mask)
    return inputs


def _state_for_layer(state: dict[str, np.ndarray], config: LayerConfig) -> dict[str, np.ndarray]:
    kept = {k: v for k, v in state.items() if (k != "gamma" or config.scale) and (k != "beta" or config.center)}
    store = np.float64 if config.dtype == "float64" else np.float32
    return {k: v.astype(store) for k, v in kept.items()}


def _record_steps(trace: Trace, layer: Any, call: Callable[[Any, StepRecord], Any]) -> None:
    """The step loop of every run: per expanded step, its inputs, the state before
    and after, and what ``call(layer, record)`` returned or raised. ``call`` fills
    the record and returns the layer the next step uses (a round trip replaces
    it). Unsupported propagates: the check becomes a skip."""
    case, dtype, variant = trace.case, trace.dtype, trace.variant
    for index, step in enumerate(expand_steps(case)):
        inputs = step_inputs(case, step, index, dtype, variant)
        before = layer.get_state()
        record = StepRecord(index, step["call"], inputs, before, before, expects_error=step.get("raises"))
        try:
            layer = call(layer, record)
        except Unsupported:
            raise
        except Exception as exc:
            record.error = exc
        record.state_after = layer.get_state()
        trace.steps.append(record)


def run_backend(backend: Backend, case: Case, dtype: str, variant: Variant = AS_WRITTEN) -> Trace:
    config = layer_config(case, dtype, variant)
    trace = Trace(backend=backend.name, case=case, dtype=dtype, variant=variant, config=config)
    try:
        layer = backend.stock_layer(config) if variant.stock else backend.layer(config)
        layer.set_state(_state_for_layer(initial_state(case, config.channels), config))
    except Unsupported:
        raise
    except Exception as exc:
        trace.build_error = exc
        return trace
    with tempfile.TemporaryDirectory(prefix="maskbn-") as tmp:

        def call(layer: Layer, record: StepRecord) -> Layer:
            inputs = record.inputs
            if record.call in ("train", "eval"):
                record.output = layer.forward(inputs.x, inputs.x_dtype, inputs.mask, training=record.call == "train")
            elif record.call == "backward":
                record.output, record.grads = layer.forward_backward(inputs.x, inputs.x_dtype, inputs.mask, inputs.dy)
            elif record.call == "hvp":
                record.hvp = layer.hvp(inputs.x, inputs.x_dtype, inputs.mask, inputs.dy, inputs.v)
            elif record.call == "round_trip":
                record.eval_before = layer.forward(inputs.x, inputs.x_dtype, inputs.mask, training=False)
                layer = layer.round_trip(Path(tmp) / f"step{record.index}")
                record.eval_after = layer.forward(inputs.x, inputs.x_dtype, inputs.mask, training=False)
            return layer

        _record_steps(trace, layer, call)
    return trace


def _split(array: np.ndarray | None, sizes: list[int]) -> list[np.ndarray | None]:
    if array is None:
        return [None] * len(sizes)
    return np.split(array, np.cumsum(sizes)[:-1], axis=0)


def _concat(outputs: list[Output]) -> Output:
    return Output(np.concatenate([o.value for o in outputs], axis=0), outputs[0].dtype)


def run_sharded(backend: Backend, case: Case, dtype: str, variant: Variant) -> Trace:
    """The case with every step's batch split over ``case.raw["shards"]`` (batch
    items per shard) and run on the backend's synchronized layer."""
    config = layer_config(case, dtype, variant)
    sizes = list(case.raw["shards"])
    trace = Trace(backend=backend.name, case=case, dtype=dtype, variant=variant, config=config)
    layer: ShardedLayer = backend.sharded_layer(config, len(sizes))

    def call(layer: ShardedLayer, record: StepRecord) -> ShardedLayer:
        inputs = record.inputs
        xs, masks = _split(inputs.x, sizes), _split(inputs.mask, sizes)
        if record.call in ("train", "eval"):
            record.output = _concat(layer.forward(xs, inputs.x_dtype, masks, record.call == "train"))
        elif record.call == "backward":
            outs, grads = layer.forward_backward(xs, inputs.x_dtype, masks, _split(inputs.dy, sizes))
            record.output = _concat(outs)
            record.grads = Gradients(_concat(grads.xs), grads.gamma, grads.beta)
        else:
            raise ValueError(f"step {record.call!r} cannot run sharded")
        return layer

    try:
        layer.set_state(_state_for_layer(initial_state(case, config.channels), config))
        _record_steps(trace, layer, call)
    finally:
        layer.close()
    return trace


def run_reference(case: Case, dtype: str, trace: Trace) -> list[RefStep]:
    """The float64 oracle on exactly the inputs the backend saw."""
    config = trace.config
    cfg = ref.RefConfig.of(config, normalize_axis(config.axis, config.rank))
    # the reference starts from the state the layer actually holds (rounded to
    # its storage dtype), so only the arithmetic is compared
    state = {k: v.astype(np.float64) for k, v in initial_state(case, config.channels).items()}
    store = np.float64 if config.dtype == "float64" else np.float32
    state = {k: v.astype(store).astype(np.float64) for k, v in state.items()}
    out = []
    for record in trace.steps:
        if record.expects_error is not None or record.call == "round_trip":
            out.append(RefStep(y=None, state_after=dict(state)))
            continue
        training = record.call in ("train", "backward", "hvp")
        if record.call == "hvp":
            inputs = record.inputs
            hvp = ref.hessian_vector_product(inputs.x64, inputs.real, state, cfg, inputs.dy64, inputs.v64)
        y, state, aux = ref.forward(record.inputs.x64, record.inputs.real, state, cfg, training)
        refstep = RefStep(y=y, state_after=dict(state), n=aux["n"], batch_var=aux["batch_var"])
        if record.call == "backward":
            refstep.dx, refstep.dgamma, refstep.dbeta = ref.backward(record.inputs.dy64, aux, cfg)
        if record.call == "hvp":
            refstep.y, refstep.hvp = None, hvp
        out.append(refstep)
    return out
