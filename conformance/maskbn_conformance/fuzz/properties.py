"""The fuzz properties (differential, garbage, bad-input) and their runner: each
example's checks go through the harness's expectations (``judge``)."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from .. import reference as ref
from ..adapter import Backend, LayerConfig, Unsupported
from ..expectations import applicable
from ..harness import LoadedBackend, judge
from ..invariants import INVARIANTS, CheckFailed, Context, Runs
from ..runner import run_reference
from ..spec import Spec
from .bounds import StepBounds, compare_gradients, compare_outputs, compare_stats
from .examples import Example, default_spec
from .strategies import BAD_INPUT_KINDS, SCALE_INVARIANTS, bad_input_examples, differential_examples, garbage_examples


class ExampleChecks:
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


def _context(backend: Backend, example: Example, spec: Spec) -> Context:
    return Context(backend=backend, case=example.spec_case(), dtype=example.dtype, spec=spec, runs=Runs())


def check_differential(loaded: LoadedBackend, example: Example, spec: Spec | None = None, report=None) -> None:
    """Outputs, moving stats and gradients of every call against the float64
    reference; dtypes, padded-row rules and untouched state by the harness's
    own invariants."""
    spec = spec or default_spec()
    ctx = _context(pooled(loaded.backend), example, spec)
    checks = ExampleChecks(loaded, "fuzz-differential", example.dtype, spec, report)
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
        bounds = StepBounds(rows, realf, before, cfg, training, dtype, stats_tol["rtol"])
        label = f"step {record.index} ({record.call}, {int(realf.sum())} real rows)"

        checks.run(
            "output_matches_reference",
            partial(compare_outputs, record, y_ref, rows, realf, bounds, cfg, out_tol, dtype, label),
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
            partial(compare_stats, record.state_after, want.state_after, stats_tol, dict(err), label),
        )
        if record.grads is not None:
            checks.run(
                "gradients_match_reference",
                partial(compare_gradients, record, aux, realf, bounds, cfg, grad_tol, label),
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
    checks = ExampleChecks(loaded, "fuzz-garbage", example.dtype, spec, report)
    checks.run("garbage_padding_isolated", lambda: INVARIANTS["garbage_padding_isolated"](ctx))


def check_bad_input(loaded: LoadedBackend, example: Example, spec: Spec | None = None, report=None) -> None:
    """The bad call raises the declared error naming the problem; no call
    changes the state; the layer still works afterwards. A fresh layer per
    example: a bad first call must not poison a pooled layer."""
    spec = spec or default_spec()
    ctx = _context(loaded.backend, example, spec)
    checks = ExampleChecks(loaded, "fuzz-bad-input", example.dtype, spec, report)
    checks.run("raises_clear_error", lambda: INVARIANTS["raises_clear_error"](ctx))
    checks.run("state_unchanged", lambda: INVARIANTS["state_unchanged"](ctx))
    trace = ctx.trace(allow_errors=True)
    for record in trace.steps:
        if record.expects_error is None and record.error is not None:
            raise CheckFailed(f"step {record.index} ({record.call}) is valid but raised {record.error!r}")


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
