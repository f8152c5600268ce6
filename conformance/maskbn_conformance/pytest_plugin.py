"""pytest plugin: every (backend, case, dtype, invariant) is its own test.

``pytest spec --backend torch`` collects ``spec/cases/*.yaml`` into tests named
``torch-half-mask-float16-moving_stats_match_reference``, so ``-k
torch-half-mask`` runs one case. ``spec/schema.json`` collects the spec lint
and, per backend, ``<backend>-installed`` and ``<backend>-expectations-all-used``,
and with ``--maskbn-fuzz-examples N`` / ``--maskbn-fuzz-long-run N`` a bounded
fuzz pass per backend (``<backend>-fuzz-<property>``, the known bugs, the long
run): what ``python -m maskbn_conformance report`` runs and tabulates.
Without ``--backend`` every installed backend runs. Any test that takes a
``maskbn_backend`` argument is parametrized over the same backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import pytest

from .adapter import Unsupported
from .harness import (
    Check,
    CrossCheck,
    LoadedBackend,
    backend_checks,
    cross_checks,
    installed_backends,
    load_backend,
    run_check,
    run_cross_check,
    unused_expectations,
)
from .invariants import CheckFailed, Runs
from .spec import Spec, SpecError

_STATE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("maskbn", "maskbn conformance")
    group.addoption(
        "--backend",
        action="append",
        default=[],
        metavar="NAME",
        help="run the spec against this backend (repeatable; default: every installed backend)",
    )
    group.addoption(
        "--maskbn-fuzz-examples",
        type=int,
        default=0,
        metavar="N",
        help="spec/schema.json also collects a bounded fuzz pass: N derandomized examples per property (0: none)",
    )
    group.addoption(
        "--maskbn-fuzz-long-run",
        type=int,
        default=0,
        metavar="N",
        help="with the bounded fuzz pass, a long run of N training calls per backend (0: none)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATE] = {"backends": None, "runs": Runs(), "spec": {}}
    if config.getoption("--backend"):
        # load named backends before any test module is imported: a backend may
        # need to configure its framework before anything else starts it (TF's
        # logical devices, JAX's host device count for the sharded cases)
        selected_backends(config)


def _state(config: pytest.Config) -> dict:
    return config.stash[_STATE]


def selected_backends(config: pytest.Config) -> list[LoadedBackend]:
    state = _state(config)
    if state["backends"] is None:
        names = config.getoption("--backend") or list(installed_backends())
        state["backends"] = [load_backend(name) for name in dict.fromkeys(names)]
    return state["backends"]


def _spec(config: pytest.Config, root: Path) -> Spec:
    cache = _state(config)["spec"]
    if root not in cache:
        cache[root] = Spec(root)
    return cache[root]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests asking for ``maskbn_backend`` (a LoadedBackend) run once per selected,
    loadable backend, with the backend's name as id (``test_x[torch]``)."""
    if "maskbn_backend" in metafunc.fixturenames:
        usable = usable_backends(metafunc.config)
        metafunc.parametrize("maskbn_backend", usable, ids=[b.name for b in usable])


def usable_backends(config: pytest.Config) -> list[LoadedBackend]:
    """The selected backends that loaded."""
    return [b for b in selected_backends(config) if b.backend is not None]


def _is_spec_root(folder: Path) -> bool:
    return (folder / "schema.json").is_file() and (folder / "cases").is_dir()


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix == ".yaml" and file_path.parent.name == "cases" and _is_spec_root(file_path.parent.parent):
        return SpecFile.from_parent(parent, path=file_path)
    if file_path.name == "schema.json" and _is_spec_root(file_path.parent):
        return SpecRoot.from_parent(parent, path=file_path)
    return None


class SpecFile(pytest.File):
    """One cases/*.yaml file: a test per backend x case x dtype x invariant."""

    def collect(self):
        spec = _spec(self.config, self.path.parent.parent)
        cases = spec.load_file(self.path)  # a malformed file is a collection error naming the field
        for loaded in selected_backends(self.config):
            if loaded.backend is None:
                continue  # reported by <backend>-installed
            for check in backend_checks(spec, loaded, cases):
                yield CheckItem.from_parent(self, name=check.id, check=check, loaded=loaded, spec=spec)


class CheckItem(pytest.Item):
    def __init__(self, *, check: Check, loaded: LoadedBackend, spec: Spec, **kwargs):
        super().__init__(**kwargs)
        self.check = check
        self.loaded = loaded
        self.spec = spec

    def runtest(self) -> None:
        self.outcome = outcome = run_check(self.check, self.loaded, self.spec, _state(self.config)["runs"])
        if outcome.status == "passed":
            return
        if outcome.status == "skipped":
            pytest.skip(outcome.message)
        if outcome.status == "xfailed":
            pytest.xfail(outcome.message)
        pytest.fail(f"[{outcome.status}] {outcome.message}", pytrace=False)

    def reportinfo(self):
        return self.path, None, f"{self.check.id}: {self.check.case.description}"


class SpecRoot(pytest.File):
    """spec/schema.json: the spec lint, and per backend its install and expectations checks."""

    def collect(self):
        spec = _spec(self.config, self.path.parent)
        yield LintItem.from_parent(self, name="spec-lint", spec=spec)
        for loaded in selected_backends(self.config):
            yield InstalledItem.from_parent(self, name=f"{loaded.name}-installed", loaded=loaded)
            if loaded.backend is not None:
                yield ExpectationsUsedItem.from_parent(
                    self, name=f"{loaded.name}-expectations-all-used", loaded=loaded, spec=spec
                )
        usable = {b.name: b for b in selected_backends(self.config) if b.backend is not None}
        # anchors have no portable format to exchange and no fuzz pass: both prove ours
        ours = {name: b for name, b in usable.items() if not b.backend.anchor}
        for check in cross_checks(spec, list(ours)):
            yield CrossItem.from_parent(self, name=check.id, check=check, backends=usable, spec=spec)
        examples = self.config.getoption("--maskbn-fuzz-examples")
        long_run = self.config.getoption("--maskbn-fuzz-long-run")
        if (examples > 0 or long_run > 0) and fuzz_available():
            from . import fuzz

            for loaded in ours.values():
                for prop in fuzz.CHECKS if examples > 0 else ():
                    yield FuzzItem.from_parent(
                        self, name=f"{loaded.name}-fuzz-{prop}", loaded=loaded, spec=spec, prop=prop, size=examples
                    )
                if examples > 0:
                    yield FuzzItem.from_parent(
                        self, name=f"{loaded.name}-fuzz-known-bugs", loaded=loaded, spec=spec, prop=None, size=examples
                    )
                if long_run > 0:
                    yield FuzzItem.from_parent(
                        self, name=f"{loaded.name}-fuzz-long-run", loaded=loaded, spec=spec, prop="long-run",
                        size=long_run,
                    )  # fmt: skip


def fuzz_available() -> bool:
    try:
        import hypothesis  # noqa: F401 - the fuzz extra
    except ImportError:
        return False
    return True


def settle_known_bugs(loaded: LoadedBackend, results: list) -> NoReturn:
    """The outcome of a backend's known fuzz bugs (``fuzz.check_known_bugs``, each still
    falsifying its property): a strict xfail naming them, or a visible skip when there is none."""
    if results:
        pytest.xfail("; ".join(f"{r.prop}: {r.xfail_reason}" for r in results))
    pytest.skip(f"the expectations of {loaded.name} list no known fuzz bug (input: <kind>)")


class FuzzItem(pytest.Item):
    """One part of the bounded fuzz pass on one backend: a property (``size``
    derandomized examples), its known bugs (``prop`` None), or the long run
    (``size`` training calls). ``results`` keeps what each tried and found."""

    def __init__(self, *, loaded: LoadedBackend, spec: Spec, prop: str | None, size: int, **kwargs):
        super().__init__(**kwargs)
        self.loaded, self.spec, self.prop, self.size = loaded, spec, prop, size
        self.results: list = []
        #: known bugs: an entry that no longer fails (a strict xfail that passed)
        self.xpassed: str | None = None

    def runtest(self) -> None:
        import hypothesis.reporting

        from . import fuzz

        # the failure message carries the example and the repro: Hypothesis's own
        # report of it would only repeat it
        with hypothesis.reporting.with_reporter(lambda _message: None):
            if self.prop is None:
                try:
                    self.results = fuzz.check_known_bugs(self.loaded, fuzz.ci_settings(self.size), self.spec)
                except CheckFailed as exc:
                    self.xpassed = str(exc)
                    pytest.fail(f"[xpassed] {exc}", pytrace=False)
                settle_known_bugs(self.loaded, self.results)
            result = fuzz.PropertyResult(self.loaded.name, self.prop)
            self.results = [result]
            try:
                if self.prop == "long-run":
                    fuzz.long_run(self.loaded, self.size, self.spec, result=result)
                else:
                    fuzz.run_property(self.prop, self.loaded, fuzz.ci_settings(self.size), self.spec, result)
            except Unsupported as exc:
                pytest.skip(f"{self.loaded.name} cannot run fuzz {self.prop}: {exc}")
            except CheckFailed as exc:
                result.failure = result.failure or str(exc)
                pytest.fail(str(exc), pytrace=False)
            except Exception:
                result.failure = result.failure or "error"
                raise

    def reportinfo(self):
        return self.path, None, self.name


class CrossItem(pytest.Item):
    """Portable state written by one backend and read by another."""

    def __init__(self, *, check: CrossCheck, backends: dict, spec: Spec, **kwargs):
        super().__init__(**kwargs)
        self.check = check
        self.backends = backends
        self.spec = spec

    def runtest(self) -> None:
        self.outcome = outcome = run_cross_check(self.check, self.backends, self.spec)
        if outcome.status == "skipped":
            pytest.skip(outcome.message)
        if outcome.status != "passed":
            pytest.fail(f"[{outcome.status}] {outcome.message}", pytrace=False)


class LintItem(pytest.Item):
    def __init__(self, *, spec: Spec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec

    def runtest(self) -> None:
        try:
            self.spec.cases  # noqa: B018 - loading runs the schema and the lint
        except SpecError as exc:
            pytest.fail(str(exc), pytrace=False)


class InstalledItem(pytest.Item):
    def __init__(self, *, loaded: LoadedBackend, **kwargs):
        super().__init__(**kwargs)
        self.loaded = loaded

    def runtest(self) -> None:
        if self.loaded.error:
            pytest.fail(self.loaded.error, pytrace=False)


class ExpectationsUsedItem(pytest.Item):
    def __init__(self, *, loaded: LoadedBackend, spec: Spec, **kwargs):
        super().__init__(**kwargs)
        self.loaded = loaded
        self.spec = spec

    def runtest(self) -> None:
        self.dead = dead = unused_expectations(self.loaded, backend_checks(self.spec, self.loaded))
        if dead:
            lines = "\n".join(f"  {e.label()}: {e.reason}" for e in dead)
            pytest.fail(
                f"{self.loaded.name} expectations that match no test (remove or fix them):\n{lines}", pytrace=False
            )
