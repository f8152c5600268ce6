"""The named invariants. One function each, registered under its spec name.

An invariant receives a Context and raises CheckFailed with a message naming
the step, the quantity, the worst element, its diff and the tolerance. The
closed list of names lives in spec/invariants.yaml; the lint and a meta test
keep the two in step.
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
from .adapter import Backend
from .expectations import Applicable
from .runner import AS_WRITTEN, RefStep, Trace, Variant, expand_steps, run_backend, run_reference, run_sharded
from .spec import Case, Spec

GARBAGE_FILLS = ("nan", "inf", "-inf", "huge", "random-bits")
INTEGER_MASK_DTYPES = ("int8", "uint8", "int32", "int64")


class CheckFailed(AssertionError):
    """An invariant does not hold; the message says where and by how much."""


class Runs:
    """Runs of (backend, case, dtype, variant), each computed once per session."""

    def __init__(self) -> None:
        self._traces: dict[tuple, Trace | BaseException] = {}
        self._refs: dict[tuple, list[RefStep]] = {}

    #: runs of this many (backend, case, dtype) groups are kept; checks of one case
    #: run one after another, and a case at scale holds arrays of hundreds of MB
    KEEP_GROUPS = 2

    @staticmethod
    def _group(key: tuple) -> tuple:
        return (*key[:3], key[3].form)

    def _evict(self, group: tuple) -> None:
        groups = list(dict.fromkeys(self._group(k) for k in self._traces))
        if group in groups:
            return
        for old in groups[: max(len(groups) - self.KEEP_GROUPS + 1, 0)]:
            for store in (self._traces, self._refs):
                for key in [k for k in store if self._group(k) == old]:
                    del store[key]

    def trace(self, backend: Backend, case: Case, dtype: str, variant: Variant) -> Trace:
        key = (backend.name, case.id, dtype, variant)
        if key not in self._traces:
            self._evict(self._group(key))
            try:
                run = (
                    run_sharded(backend, case, dtype, variant)
                    if variant.sharded
                    else run_backend(backend, case, dtype, variant)
                )
                self._traces[key] = run
            except Exception as exc:
                self._traces[key] = exc
        found = self._traces[key]
        if isinstance(found, BaseException):
            raise found
        return found

    def reference(self, trace: Trace) -> list[RefStep]:
        key = (trace.backend, trace.case.id, trace.dtype, trace.variant)
        if key not in self._refs:
            self._refs[key] = run_reference(trace.case, trace.dtype, trace)
        return self._refs[key]


@dataclass
class Context:
    backend: Backend
    case: Case
    dtype: str
    spec: Spec
    runs: Runs
    args: dict[str, Any] = field(default_factory=dict)
    #: the backend's expectations entries for this check (tolerance overrides)
    expected: Applicable = field(default_factory=Applicable)
    #: the backend form every run of this check uses (None: the default)
    form: str | None = None

    def variant(self, variant: Variant = AS_WRITTEN) -> Variant:
        """``variant`` in this check's form."""
        return dataclasses.replace(variant, form=self.form)

    def trace(self, variant: Variant = AS_WRITTEN, allow_errors: bool = False) -> Trace:
        trace = self.runs.trace(self.backend, self.case, self.dtype, self.variant(variant))
        if allow_errors:
            return trace
        if trace.build_error is not None:
            raise CheckFailed(f"building the layer raised {_describe(trace.build_error)}")
        for record in trace.steps:
            if record.error is not None and record.expects_error is None:
                raise CheckFailed(
                    f"step {record.index} ({record.call}, variant {variant.label()}) raised {_describe(record.error)}"
                )
            if record.error is None and record.expects_error is not None:
                raise CheckFailed(
                    f"step {record.index} ({record.call}) should raise "
                    f"{record.expects_error.get('type')} but returned normally"
                )
        return trace

    def reference(self, trace: Trace) -> list[RefStep]:
        return self.runs.reference(trace)

    def tol(self, quantity: str) -> dict[str, float]:
        return self.expected.tolerance(self.spec.tolerances[self.dtype][quantity], self.args)


INVARIANTS: dict[str, Callable[[Context], None]] = {}


def invariant(fn: Callable[[Context], None]) -> Callable[[Context], None]:
    INVARIANTS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------- comparisons


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def assert_close(
    actual,
    expected,
    tol: dict[str, float],
    what: str,
    where: np.ndarray | None = None,
    *,
    magnitude: float = 0.0,
) -> None:
    """|actual - expected| <= atol * scale + rtol * |expected|, elementwise.

    ``scale`` is the largest magnitude in ``expected``, or ``magnitude`` where that is
    larger (at least 1e-30), so atol is relative to the array: a case with tiny or huge
    magnitudes keeps the same meaning. ``magnitude`` is the size of the values a result
    was computed from where that bounds its rounding (a mean near 0 of values of size 1).
    ``where`` restricts the comparison to some elements.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise CheckFailed(f"{what}: shape {actual.shape}, expected {expected.shape}")
    if where is None:
        where = np.ones(expected.shape, dtype=bool)
    if not where.any():
        return
    a, e = actual[where], expected[where]
    scale = max(float(np.max(np.abs(e))), magnitude, 1e-30)
    allowed = tol.get("atol", 0.0) * scale + tol.get("rtol", 0.0) * np.abs(e)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - e)
    bad = ~(diff <= allowed)  # NaN in actual counts as bad
    if bad.any():
        flat = np.flatnonzero(where)
        excess = np.where(np.isnan(diff), np.inf, diff - allowed)
        worst = int(np.argmax(excess))
        index = np.unravel_index(flat[worst], expected.shape)
        raise CheckFailed(
            f"{what}: {int(bad.sum())} of {a.size} elements out of tolerance; worst at index "
            f"{tuple(int(i) for i in index)}: got {a[worst]!r}, expected {e[worst]!r}, "
            f"diff {diff[worst]:.3g} > allowed {allowed[worst]:.3g} "
            f"(atol {tol.get('atol', 0.0):g} x scale {scale:.3g} + rtol {tol.get('rtol', 0.0):g} x |expected|)"
        )


def assert_identical(actual, expected, what: str, where: np.ndarray | None = None) -> None:
    """Bit-for-bit equality (NaN equal to NaN of the same bits)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise CheckFailed(f"{what}: {actual.dtype}{actual.shape} vs {expected.dtype}{expected.shape}")
    if where is None:
        where = np.ones(expected.shape, dtype=bool)
    a, e = np.ascontiguousarray(actual[where]), np.ascontiguousarray(expected[where])
    if a.size == 0:
        return  # nothing selected (e.g. the real rows of a call without one): reshape(0, -1) would raise
    same = a.view(np.uint8).reshape(a.size, -1) == e.view(np.uint8).reshape(e.size, -1)
    differ = ~same.all(axis=1)
    if differ.any():
        flat = np.flatnonzero(where)
        worst = int(np.argmax(differ))
        index = np.unravel_index(flat[worst], expected.shape)
        raise CheckFailed(
            f"{what}: {int(differ.sum())} of {a.size} elements not bit-identical; first at index "
            f"{tuple(int(i) for i in index)}: {a[worst]!r} vs {e[worst]!r}"
        )


def assert_same_state(after: dict, before: dict, label: str) -> None:
    """The same state keys, every array bit-for-bit."""
    if sorted(after) != sorted(before):
        raise CheckFailed(f"{label}: state keys changed {sorted(before)} -> {sorted(after)}")
    for key in before:
        assert_identical(after[key], before[key], f"{label}: {key}")


def _expand(real: np.ndarray, like: np.ndarray, trace: Trace) -> np.ndarray:
    """The real elements (already x's shape) as a selector for ``like``."""
    return np.broadcast_to(real, like.shape)


def _output_steps(trace: Trace):
    return [r for r in trace.steps if r.output is not None]


# ----------------------------------------------------------------- invariants


@invariant
def output_matches_reference(ctx: Context) -> None:
    """Every output equals the float64 reference wherever the reference is finite."""
    trace = ctx.trace()
    refs = ctx.reference(trace)
    for record, expected in zip(trace.steps, refs):
        if record.output is None or expected.y is None:
            continue
        finite = np.isfinite(expected.y)
        assert_close(
            record.output.value, expected.y, ctx.tol("output"), f"step {record.index} ({record.call}) y", finite
        )


@invariant
def output_dtype_matches_input(ctx: Context) -> None:
    """Outputs and input gradients come back in the input's dtype."""
    trace = ctx.trace()
    for record in _output_steps(trace):
        if record.output.dtype != record.inputs.x_dtype:
            raise CheckFailed(f"step {record.index}: y is {record.output.dtype}, x was {record.inputs.x_dtype}")
        if record.grads is not None and record.grads.x.dtype != record.inputs.x_dtype:
            raise CheckFailed(f"step {record.index}: dx is {record.grads.x.dtype}, x was {record.inputs.x_dtype}")


@invariant
def moving_stats_match_reference(ctx: Context) -> None:
    """After every step the moving mean and variance equal the reference's."""
    trace = ctx.trace()
    spread = 0.0  # the largest real-row std of a channel in the batches so far
    for record, expected in zip(trace.steps, ctx.reference(trace)):
        if record.call in ("train", "backward") and expected.batch_var is not None:
            spread = max(spread, float(np.sqrt(np.max(expected.batch_var, initial=0.0))))
        for key in ("moving_mean", "moving_var"):
            if key not in record.state_after:
                raise CheckFailed(f"step {record.index}: the layer has no {key}")
            assert_close(
                record.state_after[key],
                expected.state_after[key],
                ctx.tol("stats"),
                f"step {record.index} ({record.call}) {key}",
                # a float32 mean rounds relative to the values summed, not to itself: a mean
                # of 0.003 over values of std 1 is only as exact as those values' rounding
                magnitude=spread if key == "moving_mean" else 0.0,
            )


@invariant
def real_rows_match_standalone_bn(ctx: Context) -> None:
    """Real output rows equal textbook batch norm run on the real rows alone
    (per channel, over that channel's real elements)."""
    trace = ctx.trace()
    config = trace.config
    checked = 0
    for record in _output_steps(trace):
        if record.call not in ("train", "backward") or not record.inputs.real.any():
            continue
        axis = config.axis % record.inputs.x64.ndim
        real = ref.to_rows(record.inputs.real, axis)
        rows, got = ref.to_rows(record.inputs.x64, axis), ref.to_rows(record.output.value, axis)
        state = record.state_before
        gamma = state["gamma"].astype(np.float64) if config.scale else np.ones(config.channels)
        beta = state["beta"].astype(np.float64) if config.center else np.zeros(config.channels)
        for c in np.flatnonzero(real.any(axis=0)):
            column = real[:, c]
            expected = ref.standalone_batch_norm(
                rows[column, c : c + 1], gamma[c : c + 1], beta[c : c + 1], config.epsilon
            )
            assert_close(
                got[column, c : c + 1], expected, ctx.tol("output"),
                f"step {record.index} ({record.call}) real rows of y, channel {c}",
            )  # fmt: skip
        checked += 1
    if not checked:
        raise CheckFailed("no training step with a real row: this invariant has nothing to check here")


@invariant
def state_unchanged(ctx: Context) -> None:
    """Eval calls, empty-mask training calls and calls that raise leave the state bit-for-bit."""
    trace = ctx.trace(allow_errors=True)
    if trace.build_error is not None and any(r.get("raises") for r in ctx.case.steps):
        return  # the layer was never built: there is no state to change
    chosen = ctx.args.get("steps")
    for record in trace.steps:
        if chosen is not None:
            if record.index not in chosen:
                continue
        elif not (record.call == "eval" or record.expects_error or not record.inputs.real.any()):
            continue
        if record.error is not None and record.expects_error is None:
            raise CheckFailed(f"step {record.index} ({record.call}) raised {_describe(record.error)}")
        assert_same_state(record.state_after, record.state_before, f"step {record.index} ({record.call})")


@invariant
def outputs_finite(ctx: Context) -> None:
    """Every output element is finite (padded rows too, where their input is finite)."""
    trace = ctx.trace()
    for record in _output_steps(trace):
        y = record.output.value
        x_finite = np.isfinite(record.inputs.x64)
        where = _expand(record.inputs.real, y, trace) | x_finite
        if not np.isfinite(y[where]).all():
            index = np.unravel_index(np.flatnonzero(where & ~np.isfinite(y))[0], y.shape)
            raise CheckFailed(f"step {record.index} ({record.call}): y{tuple(map(int, index))} = {y[index]!r}")


@invariant
def padded_rows_zero(ctx: Context) -> None:
    """With padded_output zero, every padded output element is exactly 0."""
    trace = ctx.trace()
    for record in _output_steps(trace):
        y = record.output.value
        padded = ~_expand(record.inputs.real, y, trace)
        if (y[padded] != 0).any():
            index = np.unravel_index(np.flatnonzero(padded & (y != 0))[0], y.shape)
            raise CheckFailed(f"step {record.index}: padded y{tuple(map(int, index))} = {y[index]!r}, not 0")


def _backward_steps(trace: Trace):
    steps = [r for r in trace.steps if r.grads is not None]
    if not steps:
        raise CheckFailed("the case has no backward step")
    return steps


def affine_gradients(config, grads, dgamma, dbeta, label: str):
    """(name, got, want) for each affine weight the layer has; a gradient returned
    for a weight the config removes, or missing for one it keeps, fails."""
    pairs = []
    for name, present, got, want in (
        ("gamma", config.scale, grads.gamma, dgamma),
        ("beta", config.center, grads.beta, dbeta),
    ):
        if not present:
            if got is not None:
                raise CheckFailed(f"{label}: d{name} returned but the layer has no {name}")
            continue
        if got is None:
            raise CheckFailed(f"{label}: no d{name} returned")
        pairs.append((name, got, want))
    return pairs


@invariant
def gradients_match_reference(ctx: Context) -> None:
    """d/dx, d/dgamma and d/dbeta of a loss over real rows equal the reference's."""
    trace = ctx.trace()
    refs = ctx.reference(trace)
    config = trace.config
    tol = ctx.tol("grad")
    for record in _backward_steps(trace):
        expected = refs[record.index]
        label = f"step {record.index} (backward)"
        assert_close(record.grads.x.value, expected.dx, tol, f"{label} dx")
        for name, got, want in affine_gradients(config, record.grads, expected.dgamma, expected.dbeta, label):
            assert_close(got, want, tol, f"{label} d{name}")


@invariant
def second_derivatives_match_reference(ctx: Context) -> None:
    """The Hessian-vector product d/dx <d/dx sum(y * dy), v> of a training call
    equals the float64 reference's, and is exactly 0 on padded elements."""
    trace = ctx.trace()
    refs = ctx.reference(trace)
    steps = [r for r in trace.steps if r.hvp is not None]
    if not steps:
        raise CheckFailed("the case has no hvp step")
    for record in steps:
        got = record.hvp.value
        label = f"step {record.index} (hvp)"
        if record.hvp.dtype != record.inputs.x_dtype:
            raise CheckFailed(f"{label}: the product is {record.hvp.dtype}, x was {record.inputs.x_dtype}")
        assert_close(got, refs[record.index].hvp, ctx.tol("hvp"), f"{label} d/dx <grad, v>")
        padded = ~_expand(record.inputs.real, got, trace)
        if (got[padded] != 0).any():
            index = np.unravel_index(np.flatnonzero(padded & (got != 0))[0], got.shape)
            raise CheckFailed(f"{label}: padded element {tuple(map(int, index))} = {got[index]!r}, not 0")


@invariant
def padded_rows_zero_gradient(ctx: Context) -> None:
    """d loss / d x is exactly 0 on every padded position."""
    trace = ctx.trace()
    for record in _backward_steps(trace):
        dx = record.grads.x.value
        padded = ~_expand(record.inputs.real, dx, trace)
        if (dx[padded] != 0).any():
            index = np.unravel_index(np.flatnonzero(padded & (dx != 0))[0], dx.shape)
            raise CheckFailed(f"step {record.index}: padded dx{tuple(map(int, index))} = {dx[index]!r}, not 0")


@invariant
def affine_gradients_nonzero(ctx: Context) -> None:
    """gamma and beta get finite, non-zero gradients from the real rows."""
    trace = ctx.trace()
    for record in _backward_steps(trace):
        if not record.inputs.real.any():
            continue
        for name, grad in (("gamma", record.grads.gamma), ("beta", record.grads.beta)):
            if grad is None:
                continue
            if not np.isfinite(grad).all() or not np.any(grad != 0):
                raise CheckFailed(f"step {record.index}: d{name} = {grad!r}")


def _assert_runs_identical(base: Trace, other: Trace, label: str, real_only: bool = True) -> None:
    for a, b in zip(base.steps, other.steps):
        if (a.error is None) != (b.error is None):
            raise CheckFailed(f"{label}, step {a.index}: one run raised, the other did not: {a.error or b.error}")
        where = None
        if a.output is not None:
            where = _expand(a.inputs.real, a.output.value, base) if real_only else None
            assert_identical(b.output.value, a.output.value, f"{label}, step {a.index} real rows of y", where)
        for key in a.state_after:
            assert_identical(b.state_after[key], a.state_after[key], f"{label}, step {a.index} {key}")
        if a.grads is not None:
            assert_identical(b.grads.x.value, a.grads.x.value, f"{label}, step {a.index} real rows of dx", where)
            for name in ("gamma", "beta"):
                ga, gb = getattr(a.grads, name), getattr(b.grads, name)
                if ga is not None:
                    assert_identical(gb, ga, f"{label}, step {a.index} d{name}")


@invariant
def garbage_padding_isolated(ctx: Context) -> None:
    """NaN, Inf, 1e38 or random bits in padded rows change no real output, stat or gradient bit."""
    base = ctx.trace()
    if ctx.case.inputs["x"].get("padding", "zeros") != "zeros":
        raise CheckFailed("garbage_padding_isolated needs a case padded with zeros to compare against")
    for fill in ctx.args.get("fills", GARBAGE_FILLS):
        other = ctx.trace(Variant(fill=fill))
        _assert_runs_identical(base, other, f"padding {fill} vs zeros")


@invariant
def mask_dtypes_agree(ctx: Context) -> None:
    """An integer mask (int8, uint8, int32, int64) gives bit-for-bit the bool mask's results."""
    base = ctx.trace()
    for dtype in ctx.args.get("dtypes", INTEGER_MASK_DTYPES):
        _assert_runs_identical(base, ctx.trace(Variant(mask_dtype=dtype)), f"{dtype} mask vs bool", real_only=False)


def _assert_runs_close(ctx: Context, base: Trace, other: Trace, label: str, steps, stats: tuple[str, ...]) -> None:
    for a, b in zip(base.steps, other.steps):
        if a.call not in steps:
            continue
        if a.output is not None:
            assert_close(b.output.value, a.output.value, ctx.tol("output"), f"{label}, step {a.index} ({a.call}) y")
        for key in stats:
            assert_close(b.state_after[key], a.state_after[key], ctx.tol("stats"), f"{label}, step {a.index} {key}")
        if a.grads is not None:
            tol = ctx.tol("grad")
            assert_close(b.grads.x.value, a.grads.x.value, tol, f"{label}, step {a.index} dx")
            for name in ("gamma", "beta"):
                ga, gb = getattr(a.grads, name), getattr(b.grads, name)
                if ga is not None:
                    assert_close(gb, ga, tol, f"{label}, step {a.index} d{name}")


def _require_all_real(trace: Trace, name: str) -> None:
    if not all(r.inputs.real.all() for r in trace.steps):
        raise CheckFailed(f"{name} needs a case whose mask is all real")


@invariant
def all_true_mask_equals_no_mask(ctx: Context) -> None:
    """An all-true mask gives the results of calling with no mask."""
    base = ctx.trace()
    _require_all_real(base, "all_true_mask_equals_no_mask")
    _assert_runs_close(
        ctx, base, ctx.trace(Variant(drop_mask=True)), "no mask vs all-true mask",
        ("train", "eval", "backward"), ("moving_mean", "moving_var"),
    )  # fmt: skip


def _stock_pair(ctx: Context, name: str) -> tuple[Trace, Trace]:
    """The masked layer and the stock one, both in the framework's stock
    moving-variance convention (the masked layer has it as a knob)."""
    convention = ctx.backend.stock_moving_var
    base = ctx.trace(Variant(moving_var=convention))
    _require_all_real(base, name)
    return base, ctx.trace(Variant(stock=True, moving_var=convention))


@invariant
def matches_stock_batch_norm(ctx: Context) -> None:
    """Without padding, training outputs, gradients and moving mean equal the framework's stock BN."""
    base, stock = _stock_pair(ctx, "matches_stock_batch_norm")
    _assert_runs_close(ctx, base, stock, "stock BN vs masked", ("train", "backward"), ("moving_mean",))


@invariant
def matches_stock_moving_var(ctx: Context) -> None:
    """Without padding, moving variance and eval outputs equal the framework's stock BN
    (in its convention: the masked layer set to it)."""
    base, stock = _stock_pair(ctx, "matches_stock_moving_var")
    _assert_runs_close(ctx, base, stock, "stock BN vs masked", ("train", "eval", "backward"), ("moving_var",))


@invariant
def eval_ignores_mask(ctx: Context) -> None:
    """In inference the mask changes nothing (padded_output normalize)."""
    base = ctx.trace()
    other = ctx.trace(Variant(eval_mask="all"))
    checked = False
    for a, b in zip(base.steps, other.steps):
        if a.call == "eval":
            assert_close(
                b.output.value, a.output.value, ctx.tol("output"), f"step {a.index} y, all-real mask vs case mask"
            )
            checked = True
    if not checked:
        raise CheckFailed("the case has no eval step")


@invariant
def sharded_equals_unsharded(ctx: Context) -> None:
    """Split over the case's shards (uneven masks, empty shards), the synchronized
    layer gives the unsharded outputs, moving stats and gradients."""
    if "shards" not in ctx.case.raw:
        raise CheckFailed("sharded_equals_unsharded needs a case with a shard layout (shards: [...])")
    base = ctx.trace()
    sharded = ctx.trace(Variant(sharded=True))
    _assert_runs_close(
        ctx, base, sharded, f"{len(ctx.case.raw['shards'])} shards vs one batch",
        ("train", "eval", "backward"), ("moving_mean", "moving_var"),
    )  # fmt: skip


@invariant
def weights_follow_config(ctx: Context) -> None:
    """gamma exists iff scale, beta iff center; state is float32 (float64 layers: float64) and finite."""
    trace = ctx.trace()
    config = trace.config
    store = "float64" if config.dtype == "float64" else "float32"
    state = trace.steps[-1].state_after if trace.steps else {}
    wanted = (
        {"moving_mean", "moving_var"} | ({"gamma"} if config.scale else set()) | ({"beta"} if config.center else set())
    )
    if set(state) != wanted:
        raise CheckFailed(
            f"state holds {sorted(state)}, expected {sorted(wanted)} for center={config.center}, scale={config.scale}"
        )
    for key, value in state.items():
        if value.dtype.name != store:
            raise CheckFailed(f"{key} is stored as {value.dtype.name}, expected {store}")
        if value.shape != (config.channels,):
            raise CheckFailed(f"{key} has shape {value.shape}, expected ({config.channels},)")
        if not np.isfinite(value).all():
            raise CheckFailed(f"{key} is not finite: {value!r}")


@invariant
def round_trip_preserves_layer(ctx: Context) -> None:
    """Saving and loading keeps every state bit and gives bit-identical outputs."""
    trace = ctx.trace()
    trips = [r for r in trace.steps if r.call == "round_trip"]
    if not trips:
        raise CheckFailed("the case has no round_trip step")
    for record in trips:
        assert_same_state(record.state_after, record.state_before, f"step {record.index}, after loading")
        assert_identical(record.eval_after.value, record.eval_before.value, f"step {record.index} eval y after loading")


def _trained_layer(ctx: Context, layer):
    """``layer`` after the case's train steps (masks passed unless it is a stock layer)."""
    from .runner import _state_for_layer, initial_state, step_inputs

    config = layer_config_of(ctx)
    layer.set_state(_state_for_layer(initial_state(ctx.case, config.channels), config))
    last = None
    for index, step in enumerate(expand_steps(ctx.case)):
        if step["call"] != "train":
            continue
        last = step_inputs(ctx.case, step, index, ctx.dtype, ctx.variant())
        layer.forward(last.x, last.x_dtype, last.mask, training=True)
    if last is None:
        raise CheckFailed("the case has no train step to build state with")
    return layer, last


def layer_config_of(ctx: Context, variant: Variant = AS_WRITTEN):
    from .runner import layer_config

    return layer_config(ctx.case, ctx.dtype, ctx.variant(variant))


def _assert_same_layer(ctx: Context, a, b, inputs, label: str, exact: bool) -> None:
    state_a = a.get_state()
    # another framework may hand back its own float type: the bits compared are a's dtype's
    state_b = {k: v.astype(state_a[k].dtype) if k in state_a else v for k, v in b.get_state().items()}
    assert_same_state(state_b, state_a, label)
    ya = a.forward(inputs.x, inputs.x_dtype, inputs.mask, training=False).value
    yb = b.forward(inputs.x, inputs.x_dtype, inputs.mask, training=False).value
    if exact:
        assert_identical(yb, ya, f"{label}: eval y")
    else:
        assert_close(yb, ya, ctx.tol("output"), f"{label}: eval y")
    # one more training call on both: the loaded layer must have kept the
    # moving-variance convention (and decay), not only the numbers
    a.forward(inputs.x, inputs.x_dtype, inputs.mask, training=True)
    b.forward(inputs.x, inputs.x_dtype, inputs.mask, training=True)
    state_a, state_b = a.get_state(), b.get_state()
    for key in ("moving_mean", "moving_var"):
        assert_close(state_b[key], state_a[key], ctx.tol("stats"), f"{label}: {key} after one more training call")


@invariant
def portable_round_trip(ctx: Context) -> None:
    """Exported to the neutral portable format and imported back, a trained layer keeps every state bit and output."""
    layer, inputs = _trained_layer(ctx, ctx.backend.layer(layer_config_of(ctx)))
    with tempfile.TemporaryDirectory(prefix="maskbn-portable-") as tmp:
        layer.export_portable(Path(tmp))
        loaded = ctx.backend.import_portable(Path(tmp))
    _assert_same_layer(ctx, layer, loaded, inputs, "portable export then import", exact=True)


@invariant
def loads_stock_checkpoint(ctx: Context) -> None:
    """A trained stock batch norm's usual checkpoint loads into the masked layer: same state, same eval outputs."""
    config = layer_config_of(ctx, Variant(moving_var=ctx.backend.stock_moving_var))
    stock, inputs = _trained_layer(ctx, ctx.backend.stock_layer(config))
    if inputs.mask is not None:
        raise CheckFailed("loads_stock_checkpoint needs a case without a mask (the stock layer takes none)")
    with tempfile.TemporaryDirectory(prefix="maskbn-stock-") as tmp:
        masked = ctx.backend.from_stock_checkpoint(stock, Path(tmp))
    _assert_same_layer(ctx, stock, masked, inputs, "stock checkpoint into the masked layer", exact=False)


def cross_portable(ctx: Context, target: Backend) -> None:
    """A layer trained in ctx.backend, exported, imported by ``target``: same state bits, same eval outputs."""
    layer, inputs = _trained_layer(ctx, ctx.backend.layer(layer_config_of(ctx)))
    with tempfile.TemporaryDirectory(prefix="maskbn-portable-") as tmp:
        layer.export_portable(Path(tmp))
        loaded = target.import_portable(Path(tmp))
    _assert_same_layer(ctx, layer, loaded, inputs, f"{ctx.backend.name} -> {target.name}", exact=False)


@invariant
def raises_clear_error(ctx: Context) -> None:
    """Bad input raises the declared error type with a message naming what was wrong."""
    trace = ctx.trace(allow_errors=True)
    expected_steps = [(i, step) for i, step in enumerate(expand_steps(ctx.case)) if step.get("raises")]
    if not expected_steps:
        raise CheckFailed("the case declares no step that raises")
    for index, step in expected_steps:
        want = step["raises"]
        if trace.build_error is not None:
            error = trace.build_error
        elif index < len(trace.steps):
            error = trace.steps[index].error
        else:
            error = None
        if error is None:
            raise CheckFailed(f"step {index} ({step['call']}) should raise {want['type']} but returned normally")
        names = {cls.__name__ for cls in type(error).__mro__}
        if want["type"] not in names:
            raise CheckFailed(f"step {index} raised {_describe(error)}; expected a {want['type']}")
        message = str(error).lower()
        missing = [m for m in want.get("mentions", []) if str(m).lower() not in message]
        if missing:
            raise CheckFailed(f"step {index}: the {want['type']} message does not mention {missing}: {error}")


def _scale_bounds(ctx: Context, trace: Trace):
    """Per training step with real rows: (record, reference step, mean bound,
    variance bound), the contract's accuracy at scale (spec/tolerances.yaml,
    ``scale``): the mean within ``mean_ulps`` float32 ulps of the exact mean (plus
    ``mean_sigma`` standard deviations), the variance within ``var_rtol``
    relative plus the square of the mean bound (what a mean off by that much
    adds to a variance centred on it)."""
    if ctx.case.param("decay") != 0:
        raise CheckFailed("accuracy at scale reads the batch stats from the moving stats: the case needs decay 0")
    tol = ctx.spec.tolerances[ctx.dtype]["scale"]
    refs = ctx.reference(trace)
    out = []
    for record, expected in zip(trace.steps, refs):
        if record.call not in ("train", "backward") or expected.n is None or not (expected.n > 0).any():
            continue
        mean, var = expected.state_after["moving_mean"], expected.state_after["moving_var"]
        ulp = np.spacing(np.abs(mean).astype(np.float32)).astype(np.float64)
        mean_bound = tol["mean_ulps"] * ulp + tol["mean_sigma"] * np.sqrt(var)
        var_bound = tol["var_rtol"] * var + mean_bound**2
        out.append((record, expected, mean_bound, var_bound))
    if not out:
        raise CheckFailed("the case has no training step with a real row")
    return out


@invariant
def statistics_accurate_at_scale(ctx: Context) -> None:
    """Batch mean within about one float32 ulp of the exact mean, variance within 1e-5 relative, at any size and offset."""
    trace = ctx.trace()
    for record, expected, mean_bound, var_bound in _scale_bounds(ctx, trace):
        active = expected.n > 0
        for key, bound in (("moving_mean", mean_bound), ("moving_var", var_bound)):
            got = record.state_after[key].astype(np.float64)
            want = expected.state_after[key]
            err = np.abs(got - want)
            bad = active & ~(err <= bound)
            if bad.any():
                c = int(np.flatnonzero(bad)[0])
                sigma = np.sqrt(expected.state_after["moving_var"][c])
                ulp = np.spacing(np.float32(abs(expected.state_after["moving_mean"][c])))
                raise CheckFailed(
                    f"step {record.index} ({record.call}) {key}[{c}] over {int(expected.n[c])} real rows: got "
                    f"{got[c]!r}, exact {want[c]!r}, off by {err[c]:.3g} > allowed {bound[c]:.3g} "
                    f"({err[c] / ulp:.3g} float32 ulps of the mean, {err[c] / max(sigma, 1e-300):.3g} sigma)"
                )


@invariant
def outputs_accurate_at_scale(ctx: Context) -> None:
    """Real outputs of training calls within what the allowed mean and variance errors propagate to, plus output rounding."""
    trace = ctx.trace()
    config = trace.config
    for record, expected, mean_bound, var_bound in _scale_bounds(ctx, trace):
        if record.output is None:
            continue
        axis = config.axis % record.inputs.x64.ndim
        state = record.state_before
        gamma = np.abs(state["gamma"].astype(np.float64)) if config.scale else np.ones(config.channels)
        var = expected.state_after["moving_var"]
        inv_std = 1.0 / np.sqrt(var + config.epsilon)
        want = ref.to_rows(expected.y, axis)
        xhat = np.abs(want - (state["beta"].astype(np.float64) if config.center else 0.0)) / np.maximum(gamma, 1e-30)
        # y = gamma (x - m) / sqrt(v + eps) + beta: dm moves y by gamma dm / std,
        # dv by gamma |xhat| dv / (2 (v + eps))
        propagated = gamma * (mean_bound * inv_std + xhat * var_bound * inv_std**2 / 2)
        tol = ctx.tol("output")
        real = ref.to_rows(record.inputs.real, axis)
        got = ref.to_rows(record.output.value, axis)
        scale = max(float(np.max(np.abs(want[real]))), 1e-30)
        allowed = propagated + tol["atol"] * scale + tol["rtol"] * np.abs(want)
        with np.errstate(invalid="ignore"):
            err = np.abs(got - want)
        bad = real & ~(err <= allowed)
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[np.argmax((err - allowed)[bad])])
            raise CheckFailed(
                f"step {record.index} ({record.call}) real row {r}, channel {c}: y = {got[r, c]!r}, exact "
                f"{want[r, c]!r}, off by {err[r, c]:.3g} > allowed {allowed[r, c]:.3g} "
                f"({int(bad.sum())} of {int(real.sum())} real elements out; propagated part {propagated[r, c]:.3g})"
            )


@invariant
def moving_stats_recover_distribution(ctx: Context) -> None:
    """With decay 0 the moving stats recover the real rows' known mean and variance (unmasked stats would not)."""
    trace = ctx.trace()
    state = trace.steps[-1].state_after
    want_mean = np.asarray(ctx.args["mean"], dtype=np.float64)
    want_var = np.asarray(ctx.args["var"], dtype=np.float64)
    rtol = float(ctx.args.get("rtol", 0.05))
    # the case must be one where ignoring the mask would fail, else it proves nothing
    last = trace.steps[-1].inputs
    rows = ref.to_rows(last.x64, trace.config.axis % last.x64.ndim)
    naive_mean, naive_var = rows.mean(axis=0), rows.var(axis=0)
    if np.allclose(naive_mean, want_mean, rtol=rtol, atol=rtol * np.sqrt(want_var)) and np.allclose(
        naive_var, want_var, rtol=rtol
    ):
        raise CheckFailed("this case is too weak: the unmasked statistics also recover the distribution")
    # the mean is judged in units of the distribution's std: rtol * sigma
    mean_error = np.abs(state["moving_mean"].astype(np.float64) - want_mean)
    allowed = rtol * np.sqrt(want_var)
    if not (mean_error <= allowed).all():
        worst = int(np.argmax(mean_error - allowed))
        raise CheckFailed(
            f"moving_mean[{worst}] = {state['moving_mean'][worst]!r}, the distribution's mean is "
            f"{np.broadcast_to(want_mean, mean_error.shape)[worst]!r}: off by {mean_error[worst]:.3g} > "
            f"{np.broadcast_to(allowed, mean_error.shape)[worst]:.3g} (rtol x std)"
        )
    assert_close(
        state["moving_var"],
        np.broadcast_to(want_var, state["moving_var"].shape),
        {"rtol": rtol},
        "moving_var vs the distribution's variance",
    )
