"""What the pytest plugin and the CLI share: backend discovery, the list of
checks, and running one check to an outcome."""

from __future__ import annotations

import shlex
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from .adapter import ENTRY_POINT_GROUP, Backend, Unsupported
from .expectations import Applicable, Expectation, applicable, load_expectations
from .invariants import INVARIANTS, CheckFailed, Context, Runs, cross_portable
from .spec import Case, Spec


def installed_backends() -> dict[str, object]:
    """name -> entry point, by name. An adapter whose framework must load before or
    after another's in one process sees to that itself, where it imports it."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return dict(sorted(found.items()))


@dataclass
class LoadedBackend:
    name: str
    backend: Backend | None
    expectations: list[Expectation]
    error: str | None = None


def load_backend(name: str) -> LoadedBackend:
    """Import a backend by entry-point name; a missing or broken one is reported, not hidden."""
    eps = installed_backends()
    if name not in eps:
        return LoadedBackend(
            name, None, [], error=f"backend {name!r} is not installed (installed: {', '.join(eps) or 'none'})"
        )
    try:
        backend = eps[name].load()()
        expectations = load_expectations(backend.expectations_path())
    except Exception as exc:
        return LoadedBackend(name, None, [], error=f"loading backend {name!r} failed: {type(exc).__name__}: {exc}")
    return LoadedBackend(name, backend, expectations)


@dataclass(frozen=True)
class Check:
    backend: str
    case: Case
    dtype: str
    invariant: str
    #: a non-default form of the backend (None: its default form)
    form: str | None = None

    @property
    def column(self) -> str:
        """The backend and form, as the report's column and the id's prefix."""
        return self.backend if self.form is None else f"{self.backend}-{self.form}"

    @property
    def id(self) -> str:
        return f"{self.column}-{self.case.id}-{self.dtype}-{self.invariant}"

    def repro(self) -> str:
        return (
            f"pytest {shlex.quote(str(self.case.file))} --backend {self.backend} "
            f"-k {shlex.quote(self.id)}   # or: python -m maskbn_conformance run "
            f"--backend {self.backend} --case {self.case.id} --dtype {self.dtype}"
        )


def checks_for(spec: Spec, backend: str, cases: list[Case] | None = None, forms: tuple[str, ...] = ()) -> list[Check]:
    """Every check of ``cases`` on ``backend``: each case in the default form, and
    the cases marked ``every_form`` again in each further form of ``forms``
    (a backend's forms, default first)."""
    cases = spec.cases if cases is None else cases
    extra = [None] + list(forms[1:])
    return [
        Check(backend, case, dtype, name, form)
        for form in extra
        for case in cases
        if form is None or case.raw.get("every_form", False)
        for dtype in case.dtypes
        for name in case.expect
    ]


def backend_checks(spec: Spec, loaded: LoadedBackend, cases: list[Case] | None = None) -> list[Check]:
    """checks_for with the forms the loaded backend declares."""
    return checks_for(spec, loaded.name, cases, tuple(loaded.backend.forms))


#: the outcomes that fail a run
BAD_STATUSES = ("failed", "error", "xpassed")


@dataclass
class Outcome:
    #: passed | failed | error | skipped | xfailed | xpassed
    status: str
    message: str = ""
    #: failed or error: what the check raised
    error: BaseException | None = field(default=None, compare=False, repr=False)
    #: xfailed: the expectation entry's one-line reason (the message adds what failed)
    reason: str = ""

    @property
    def is_bad(self) -> bool:
        """Fails a run: a failure, a crash, or an xfail that passes."""
        return self.status in BAD_STATUSES


def judge(expected: Applicable, run: Callable[[], None], source: str) -> Outcome:
    """Run one check under the backend's expectations: a skip entry skips it, an
    xfail entry turns its failure (or crash) into ``xfailed`` and its success
    into ``xpassed``. ``source`` names whose expectations they are. Unsupported
    propagates: the caller knows what a check it cannot run means."""
    skip, xfail = expected.skip, expected.xfail
    if skip is not None:
        return Outcome("skipped", f"{source} expectations: {skip.reason}")
    try:
        run()
    except Unsupported:
        raise
    except CheckFailed as exc:
        if xfail is not None:
            return Outcome("xfailed", f"{xfail.reason} ({exc})", reason=xfail.reason)
        return Outcome("failed", str(exc), exc)
    except Exception as exc:
        if xfail is not None:
            return Outcome("xfailed", f"{xfail.reason} (crashed)", reason=xfail.reason)
        return Outcome("error", traceback.format_exc(), exc)
    if xfail is not None:
        return Outcome("xpassed", f"expected to fail ({xfail.reason}) but passes: remove the entry {xfail.label()}")
    return Outcome("passed")


def run_check(check: Check, loaded: LoadedBackend, spec: Spec, runs: Runs) -> Outcome:
    """Run one check and apply the backend's expectations to the result."""
    default = loaded.backend.forms[0]
    expected = applicable(loaded.expectations, check.case.id, check.dtype, check.invariant, check.form or default)
    ctx = Context(
        backend=loaded.backend,
        case=check.case,
        dtype=check.dtype,
        spec=spec,
        runs=runs,
        args=check.case.expect[check.invariant],
        expected=expected,
        form=check.form,
    )
    try:
        outcome = judge(expected, lambda: INVARIANTS[check.invariant](ctx), loaded.name)
    except Unsupported as exc:
        return Outcome("skipped", f"{loaded.name} cannot run this: {exc}")
    if outcome.status in ("failed", "error"):
        return Outcome(outcome.status, failure_message(check, outcome.message), outcome.error)
    return outcome


def failure_message(check: Check, detail: str) -> str:
    return (
        f"backend {check.backend}, case {check.case.id} ({check.case.description}), dtype {check.dtype}, "
        f"invariant {check.invariant}\n{detail}\nrepro: {check.repro()}"
    )


def unused_expectations(loaded: LoadedBackend, checks: list[Check]) -> list[Expectation]:
    """Entries that match none of ``checks`` (known fuzz bugs, ``input: <kind>``, are
    the fuzz suite's: its test_known_bugs proves each still fails)."""
    return [
        e
        for e in loaded.expectations
        if e.input is None
        and not any(
            e.matches(c.case.id, c.dtype, c.invariant, c.form or loaded.backend.forms[0])
            for c in checks
            if c.backend == loaded.name
        )
    ]


@dataclass(frozen=True)
class CrossCheck:
    """A layer trained in ``source``, exported to the portable format, imported by ``target``."""

    source: str
    target: str
    case: Case

    @property
    def id(self) -> str:
        return f"portable-{self.source}-to-{self.target}-{self.case.id}"

    def repro(self) -> str:
        return f"pytest spec/schema.json --backend {self.source} --backend {self.target} -k {shlex.quote(self.id)}"


def cross_checks(spec: Spec, names: list[str]) -> list[CrossCheck]:
    """Every ordered pair of distinct backends, on every case that expects portable_round_trip."""
    cases = [c for c in spec.cases if "portable_round_trip" in c.expect]
    return [CrossCheck(a, b, c) for a in names for b in names if a != b for c in cases]


def run_cross_check(check: CrossCheck, backends: dict[str, LoadedBackend], spec: Spec) -> Outcome:
    source, target = backends[check.source], backends[check.target]
    if source.backend is None or target.backend is None:
        return Outcome("error", source.error or target.error or "")
    ctx = Context(backend=source.backend, case=check.case, dtype="float32", spec=spec, runs=Runs())
    try:
        cross_portable(ctx, target.backend)
    except Unsupported as exc:
        return Outcome("skipped", f"cannot run this direction: {exc}")
    except CheckFailed as exc:
        return Outcome("failed", f"{check.id}: {check.case.description}\n{exc}\nrepro: {check.repro()}")
    except Exception:
        return Outcome("error", f"{check.id}\n{traceback.format_exc()}\nrepro: {check.repro()}")
    return Outcome("passed")
