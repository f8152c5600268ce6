"""pytest plugin: every (backend, case, dtype, invariant) is its own test.

``pytest spec --backend torch`` collects ``spec/cases/*.yaml`` into tests named
``torch-half-mask-float16-moving_stats_match_reference``, so ``-k
torch-half-mask`` runs one case. ``spec/schema.json`` collects the spec lint
and, per backend, ``<backend>-installed`` and ``<backend>-expectations-all-used``.
Without ``--backend`` every installed backend runs. Any test that takes a
``maskbn_backend`` argument is parametrized over the same backends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
from .invariants import Runs
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


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATE] = {"backends": None, "runs": Runs(), "spec": {}}
    if config.getoption("--backend"):
        # load named backends before any test module is imported: a backend may
        # need to configure its framework before anything else starts it (TF's
        # logical devices, JAX's host device count for the sharded cases)
        _backends(config)


def _state(config: pytest.Config) -> dict:
    return config.stash[_STATE]


def _backends(config: pytest.Config) -> list[LoadedBackend]:
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
    return [b for b in _backends(config) if b.backend is not None]


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
        for loaded in _backends(self.config):
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
        outcome = run_check(self.check, self.loaded, self.spec, _state(self.config)["runs"])
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
        for loaded in _backends(self.config):
            yield InstalledItem.from_parent(self, name=f"{loaded.name}-installed", loaded=loaded)
            if loaded.backend is not None:
                yield ExpectationsUsedItem.from_parent(
                    self, name=f"{loaded.name}-expectations-all-used", loaded=loaded, spec=spec
                )
        usable = {b.name: b for b in _backends(self.config) if b.backend is not None}
        for check in cross_checks(spec, list(usable)):
            yield CrossItem.from_parent(self, name=check.id, check=check, backends=usable, spec=spec)


class CrossItem(pytest.Item):
    """Portable state written by one backend and read by another."""

    def __init__(self, *, check: CrossCheck, backends: dict, spec: Spec, **kwargs):
        super().__init__(**kwargs)
        self.check = check
        self.backends = backends
        self.spec = spec

    def runtest(self) -> None:
        outcome = run_cross_check(self.check, self.backends, self.spec)
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
        dead = unused_expectations(self.loaded, backend_checks(self.spec, self.loaded))
        if dead:
            lines = "\n".join(f"  {e.label()}: {e.reason}" for e in dead)
            pytest.fail(
                f"{self.loaded.name} expectations that match no test (remove or fix them):\n{lines}", pytrace=False
            )
