"""``python -m maskbn_conformance report``: pytest runs every check, this reads the results.

The report is not a runner of its own: it runs pytest over the spec folder (the
plugin in ``pytest_plugin`` collects every spec check, the cross-backend
portable checks and, asked for, a bounded fuzz pass per backend) with
:class:`Collector` as one more plugin. The collector orders the items as the
report reads them (per backend its spec checks, then the portable checks, then
per backend its fuzz pass), shows progress per backend and phase, and keeps
each item's outcome; :func:`run_report` turns them into the case x backend
matrix, the reliability table and the JSON. A backend's process variants
(``Backend.process_variants``: Keras on its JAX and torch backends) are child
reports of that backend alone, whose JSON joins the matrix as further columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import pytest_plugin as plugin
from .harness import BAD_STATUSES as BAD
from .harness import Outcome
from .progress import Progress
from .spec import Case, Spec


@dataclass
class BackendResults:
    """What the report knows of one backend once pytest is done."""

    error: str | None = None
    #: not ours: what a user already has, shown beside ours (Backend.anchor)
    anchor: bool = False
    #: case id -> the reasons of its expected failures (expectation entries), in order
    reasons: dict[str, list[str]] = field(default_factory=dict)
    #: backend or backend-form column -> case id -> statuses
    columns: dict[str, dict[str, Counter]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float | None = None
    #: the fuzz pass: what its items tried (one summary line each), failures and known bugs
    fuzz_summaries: list[str] = field(default_factory=list)
    fuzz_inputs: int = 0
    long_run_steps: int = 0
    fuzz_failures: int = 0
    known_bugs: int = 0
    fuzz_seconds: float | None = None
    fuzz_ran: bool = False

    @classmethod
    def from_payload(cls, entry: dict, name: str, alias: str) -> BackendResults:
        """Backend ``name``'s results in a report's JSON, as the columns of ``alias``
        (a process variant of it: ``tf`` -> ``tf-keras-jax``)."""
        reliability = entry["reliability"]
        columns = {
            alias + column.removeprefix(name): {cid: Counter(c) for cid, c in per_case.items()}
            for column, per_case in entry["forms"].items()
        }
        return cls(
            error=entry["error"],
            anchor=entry["anchor"],
            reasons=entry["reasons"],
            columns=columns,
            problems=[f"({alias}) {p}" for p in entry["problems"]],
            seconds=entry["seconds"],
            fuzz_summaries=reliability["fuzz"],
            fuzz_inputs=reliability["inputs_tried"] or 0,
            long_run_steps=reliability["long_run_steps"] or 0,
            fuzz_failures=reliability["fuzz_failures"],
            known_bugs=reliability["known_bugs"] or 0,
            fuzz_seconds=entry["fuzz_seconds"],
            fuzz_ran=reliability["inputs_tried"] is not None,
        )


def _phase(item: pytest.Item, order: dict[str, int]) -> tuple[int, int, int]:
    """The report's reading order: per backend its spec checks (then its
    expectations check), every portable check, then per backend its fuzz pass."""
    if isinstance(item, plugin.CheckItem):
        return (1, order.get(item.loaded.name, 0), 0)
    if isinstance(item, plugin.ExpectationsUsedItem):
        return (1, order.get(item.loaded.name, 0), 1)
    if isinstance(item, plugin.CrossItem):
        return (2, 0, 0)
    if isinstance(item, plugin.FuzzItem):
        return (3, order.get(item.loaded.name, 0), 0)
    return (0, 0, 0)


def _group(item: pytest.Item) -> tuple[str, str] | None:
    """The progress phase an item counts in: (label, backend)."""
    if isinstance(item, (plugin.CheckItem, plugin.ExpectationsUsedItem)):
        return (f"{item.loaded.name} spec checks", item.loaded.name)
    if isinstance(item, plugin.CrossItem):
        return ("portable state across backends", "")
    if isinstance(item, plugin.FuzzItem):
        return (f"{item.loaded.name} fuzz pass", item.loaded.name)
    return None


class Collector:
    """The report's pytest plugin: ordering, progress, and every item's outcome."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.names: list[str] = []
        self.loaded: list = []
        #: backend name -> the columns its process variants added (Backend.process_variants)
        self.variants: dict[str, list[str]] = {}
        self.results: dict[str, BackendResults] = {}
        self.cross: dict[tuple[str, str], Counter] = {}
        self.totals: Counter = Counter()
        self.collection_errors: list[str] = []
        self._items: dict[str, pytest.Item] = {}
        self._sizes: Counter = Counter()
        self._progress: Progress | None = None
        self._progress_group: tuple[str, str] | None = None

    # ------------------------------------------------------------ pytest hooks

    def pytest_collection_modifyitems(self, session, config, items) -> None:
        # ours first, then the anchors
        backends = sorted(plugin.selected_backends(config), key=_is_anchor)
        self.loaded = backends
        self.names = [b.name for b in backends]
        self.results = {b.name: BackendResults(error=b.error, anchor=_is_anchor(b)) for b in backends}
        order = {name: i for i, name in enumerate(self.names)}
        items.sort(key=lambda item: _phase(item, order))
        self._items = {item.nodeid: item for item in items}
        self._sizes = Counter(g for g in map(_group, items) if g is not None)

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.collection_errors.append(f"collecting {report.nodeid or 'the spec'} failed:\n{report.longrepr}")

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        group = _group(self._items[nodeid]) if nodeid in self._items else None
        if group is not None and group != self._progress_group:
            self._finish_progress()
            self._progress_group = group
            self._progress = Progress(group[0], self._sizes[group])

    def pytest_runtest_logreport(self, report) -> None:
        item = self._items.get(report.nodeid)
        if item is None:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self._record(item, report)
        if report.when == "teardown" and self._progress is not None:
            self._progress.advance(item.check.case.id if isinstance(item, plugin.CheckItem) else item.name)

    def pytest_sessionfinish(self, session) -> None:
        self._finish_progress()

    # --------------------------------------------------------------- results

    def _finish_progress(self) -> None:
        if self._progress is None:
            return
        self._progress.finish()
        label, name = self._progress_group or ("", "")
        if name in self.results:
            if label.endswith("spec checks"):
                self.results[name].seconds = round(self._progress.elapsed, 1)
            else:
                self.results[name].fuzz_seconds = round(self._progress.elapsed, 1)
        self._progress = self._progress_group = None

    @staticmethod
    def _fallback(report) -> Outcome:
        """The outcome of an item that stopped before keeping its own (a crash in setup)."""
        return Outcome("error", str(report.longrepr))

    def _record(self, item: pytest.Item, report) -> None:
        if isinstance(item, plugin.CheckItem):
            self._record_check(item, getattr(item, "outcome", None) or self._fallback(report))
        elif isinstance(item, plugin.ExpectationsUsedItem):
            results = self.results[item.loaded.name]
            for entry in getattr(item, "dead", []):
                results.problems.append(
                    f"FAILED {item.loaded.name}-expectations-all-used: {entry.label()} matches no test"
                )
                results.columns.setdefault(item.loaded.name, {}).setdefault("(expectations)", Counter())["failed"] += 1
                self.totals["failed"] += 1
        elif isinstance(item, plugin.InstalledItem):
            if item.loaded.error:
                self.results[item.loaded.name].problems.append(item.loaded.error)
                self.totals["error"] += 1
        elif isinstance(item, plugin.CrossItem):
            outcome = getattr(item, "outcome", None) or self._fallback(report)
            self.cross.setdefault((item.check.source, item.check.target), Counter())[outcome.status] += 1
            self.totals[outcome.status] += 1
            if outcome.status != "passed":
                self.results[item.check.source].problems.append(
                    f"{outcome.status.upper()} {item.check.id}\n  " + outcome.message.replace("\n", "\n  ")
                )
        elif isinstance(item, plugin.FuzzItem):
            self._record_fuzz(item, report)

    def _record_check(self, item: plugin.CheckItem, outcome: Outcome) -> None:
        check = item.check
        results = self.results[check.backend]
        results.columns.setdefault(check.backend, {})
        results.columns.setdefault(check.column, {}).setdefault(check.case.id, Counter())[outcome.status] += 1
        self.totals[outcome.status] += 1
        if outcome.reason and outcome.reason not in results.reasons.setdefault(check.case.id, []):
            results.reasons[check.case.id].append(outcome.reason)
        if outcome.status in BAD or (self.verbose and outcome.status != "passed"):
            results.problems.append(f"{outcome.status.upper()} {check.id}\n  " + outcome.message.replace("\n", "\n  "))
        elif outcome.status in ("skipped", "xfailed"):
            results.problems.append(f"{outcome.status} {check.id}: {outcome.message.splitlines()[0][:200]}")

    def _record_fuzz(self, item: plugin.FuzzItem, report) -> None:
        name = item.loaded.name
        results = self.results[name]
        results.fuzz_ran = True
        results.fuzz_summaries.extend(r.summary() for r in item.results)
        results.fuzz_inputs += sum(r.tried for r in item.results)
        results.long_run_steps += sum(r.steps for r in item.results)
        what = "known bug" if item.prop is None else item.prop
        if item.prop is None:
            results.known_bugs += len(item.results)
            if item.xpassed is not None:
                results.problems.append(f"XPASSED {name} fuzz known bug\n  {item.xpassed}")
                results.fuzz_failures += 1
                self.totals["failed"] += 1
            for result in item.results:
                results.problems.append(f"xfailed {name} fuzz {result.prop}: {result.xfail_reason}")
        elif report.skipped:
            results.problems.append(f"skipped {name} fuzz {what}: {_skip_reason(report)}")
        elif report.failed:
            failure = item.results[0].failure if item.results else None
            kind = "FAILED" if failure and failure != "error" else "ERROR"
            text = failure if kind == "FAILED" else str(report.longrepr)
            results.problems.append(f"{kind} {name} fuzz {what}\n  " + str(text).replace("\n", "\n  "))
            results.fuzz_failures += 1
            self.totals["failed"] += 1


def _is_anchor(loaded) -> bool:
    return loaded.backend is not None and loaded.backend.anchor


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


# ------------------------------------------------------------------ rendering


def _cell(counter: Counter | None, anchor: bool = False) -> str:
    """A case's checks in one column. An anchor's expected failures are what it
    gets wrong, so its cell says ``fails``; ours says ``xfailed``."""
    if not counter:
        return "-"
    total = sum(counter.values())
    bad = sum(counter[s] for s in BAD)
    if bad:
        return f"FAIL {bad}/{total}"
    if counter["skipped"] == total:
        return f"skipped {total}/{total}"
    if anchor and counter["xfailed"]:
        skipped = f" ({counter['skipped']} skipped)" if counter["skipped"] else ""
        return f"fails {counter['xfailed']}/{total}{skipped}"
    extra = ", ".join(f"{counter[s]} {s}" for s in ("skipped", "xfailed") if counter[s])
    return f"pass {counter['passed']}/{total}" + (f" ({extra})" if extra else "")


def _counters(result: BackendResults) -> list[Counter]:
    """Every case's counter in every form column of one backend."""
    return [c for per_case in result.columns.values() for c in per_case.values()]


def _cases_tried(result: BackendResults) -> int:
    """Spec checks that ran in any form (skips were not tried)."""
    return sum(sum(v for k, v in c.items() if k != "skipped") for c in _counters(result))


def _failures(result: BackendResults) -> int:
    spec_bad = sum(sum(c[s] for s in BAD) for c in _counters(result))
    return spec_bad + result.fuzz_failures + (1 if result.error else 0)


def _matrix(collector: Collector, cases: list[Case]) -> str:
    names, results = collector.names, collector.results
    # one column per backend and form: torch, torch-compile, tf, tf-function, tf-xla, ...
    columns: dict[str, dict[str, Counter]] = {}
    anchors: dict[str, bool] = {}
    for n in names:
        for column, per_case in (results[n].columns or {n: {}}).items():
            columns[column], anchors[column] = per_case, results[n].anchor
    header = [f"{c} (anchor)" if anchors[c] else c for c in columns]
    lines = ["| case | " + " | ".join(header) + " |", "|" + "---|" * (len(columns) + 1)]
    for case in cases:
        cells = [_cell(per_case.get(case.id), anchors[column]) for column, per_case in columns.items()]
        lines.append(f"| `{case.id}` | " + " | ".join(cells) + " |")
    summary_cells = []
    for n in names:
        if results[n].error:
            summary_cells.append("NOT LOADED")
            continue
        for per_case in (results[n].columns or {n: {}}).values():
            c: Counter = Counter()
            for counter in per_case.values():
                c.update(counter)
            summary_cells.append(_cell(c, results[n].anchor))
    lines.append("| **all** | " + " | ".join(summary_cells) + " |")
    # the portable checks run in this process: a process variant's column has none
    children = {alias for aliases in collector.variants.values() for alias in aliases}
    usable = [n for n in names if not results[n].error and not results[n].anchor and n not in children]
    if collector.cross:
        lines += ["", "Portable state (rows export, columns import):", "", "| from \\ to | " + " | ".join(usable) + " |",
                  "|" + "---|" * (len(usable) + 1)]  # fmt: skip
        for a in usable:
            cells = [_cell(collector.cross.get((a, b))) if a != b else "" for b in usable]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _reliability(collector: Collector, note: str, fuzz_examples: int, fuzz_long_run: int) -> str:
    """Per backend: spec checks tried, fuzz inputs tried, failures."""
    lines = [
        f"Reliability (cases: spec checks run; inputs: fuzz inputs tried, {fuzz_examples} examples per "
        f"property, derandomized, plus {fuzz_long_run} long-run training calls):",
        "",
        "| backend | cases tried | inputs tried | long-run calls | failures | known bugs (xfail) |",
        "|---|---|---|---|---|---|",
    ]
    for n in collector.names:
        r = collector.results[n]
        if r.anchor:
            continue  # an anchor's failures are its expectations: see the matrix and the "why" table
        fuzzed = r.fuzz_ran
        lines.append(
            f"| {n} | {_cases_tried(r)} | {r.fuzz_inputs if fuzzed else '-'} | "
            f"{r.long_run_steps if fuzzed else '-'} | {_failures(r)} | {r.known_bugs if fuzzed else '-'} |"
        )
    if note:
        lines += ["", note]
    for n in collector.names:
        r = collector.results[n]
        if r.fuzz_ran:
            lines += ["", f"fuzz {n} ({r.fuzz_seconds}s):"] + [f"  {x}" for x in r.fuzz_summaries]
    return "\n".join(lines)


def _payload(collector: Collector) -> dict:
    backends = {}
    for n in collector.names:
        r = collector.results[n]
        default = r.columns.get(n, {})
        backends[n] = {
            "anchor": r.anchor,
            "error": r.error,
            "seconds": r.seconds,
            "fuzz_seconds": r.fuzz_seconds,
            "cases": {cid: dict(counter) for cid, counter in default.items()},
            "forms": {column: {cid: dict(c) for cid, c in per_case.items()} for column, per_case in r.columns.items()},
            "problems": r.problems,
            "reasons": r.reasons,
            "reliability": {
                "cases_tried": _cases_tried(r),
                "inputs_tried": r.fuzz_inputs if r.fuzz_ran else None,
                "long_run_steps": r.long_run_steps if r.fuzz_ran else None,
                "failures": _failures(r),
                "fuzz_failures": r.fuzz_failures,
                "known_bugs": r.known_bugs if r.fuzz_ran else None,
                "fuzz": r.fuzz_summaries,
            },
        }
    return {"backends": backends, "totals": dict(collector.totals)}


def _run_variant(
    collector: Collector, spec: Spec, name: str, suffix: str, env: dict[str, str], args: list[str]
) -> None:
    """Backend ``name`` in a child report under ``env``; its results join as ``<name>-<suffix>``,
    after ``name``'s own columns and its earlier variants. A child that leaves no JSON is an
    error of that column."""
    alias = f"{name}-{suffix}"
    settings = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"{alias}: backend {name} in a process of its own ({settings})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "maskbn_conformance", "--spec", str(spec.root), "report",
                   "--backend", name, "--out", out, *args]  # fmt: skip
        # the child's matrix is this report's columns: its stdout is not shown, its progress (stderr) is
        done = subprocess.run(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, check=False)
        path = Path(out) / "conformance.json"
        if path.is_file():
            payload = json.loads(path.read_text())
            results = BackendResults.from_payload(payload["backends"][name], name, alias)
            collector.totals.update(payload["totals"])
        else:
            results = BackendResults(error=f"the child report ({settings}) exited {done.returncode} with no results")
            collector.totals["error"] += 1
    collector.variants.setdefault(name, []).append(alias)
    collector.names.insert(collector.names.index(name) + len(collector.variants[name]), alias)
    collector.results[alias] = results


def run_report(
    spec: Spec,
    cases: list[Case],
    backends: list[str],
    out: str | None = None,
    verbose: bool = False,
    fuzz_examples: int = 5,
    fuzz_long_run: int = 300,
) -> int:
    """Run the report through pytest and print it; 1 if anything failed."""
    started = time.perf_counter()
    collector = Collector(verbose)
    # the report prints everything itself (no terminal reporter), and an ini file
    # around the spec folder must not add options that reporter would own
    argv = [str(spec.root), "-p", "no:terminal", "-p", "no:cacheprovider", "-s", "-o", "addopts=",
            "--rootdir", str(spec.root),
            "--maskbn-fuzz-examples", str(fuzz_examples), "--maskbn-fuzz-long-run", str(fuzz_long_run),
            *(f"--backend={name}" for name in backends)]  # fmt: skip
    note = ""
    if (fuzz_examples > 0 or fuzz_long_run > 0) and not plugin.fuzz_available():
        note = "fuzz pass not run: hypothesis is not installed (pip install 'maskbn-conformance[fuzz]')"
    code = pytest.main(argv, plugins=[collector])
    if code in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR):
        # pytest stopped before running everything: what was collected is no verdict
        collector.collection_errors.append(f"pytest stopped ({pytest.ExitCode(code).name}): the report is incomplete")
    for loaded in [b for b in collector.loaded if b.backend is not None]:
        for suffix, env in loaded.backend.process_variants().items():
            _run_variant(collector, spec, loaded.name, suffix, env,
                         ["--fuzz-examples", str(fuzz_examples), "--fuzz-long-run", str(fuzz_long_run)]
                         + (["-v"] if verbose else []))  # fmt: skip

    matrix = _matrix(collector, cases)
    reliability = _reliability(collector, note, fuzz_examples, fuzz_long_run)
    problems = collector.collection_errors + [p for n in collector.names for p in collector.results[n].problems]
    totals = collector.totals
    print(matrix)
    print("\n" + reliability)
    if problems:
        print("\nnot passing (reasons):")
        for p in problems:
            print("  " + p.replace("\n", "\n  "))
    elapsed = time.perf_counter() - started
    closing = ", ".join(f"{totals[s]} {s}" for s in ("passed", "failed", "skipped", "xfailed", "xpassed", "error"))
    print(f"\nconformance: {closing} in {elapsed:.1f}s")
    bad = sum(totals[s] for s in BAD) + len(collector.collection_errors)
    # the plain closing line CI reads
    print(f"{totals['passed'] + totals['xfailed']} passed, {bad} failed, {totals['skipped']} skipped")

    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        md = ["# maskbn conformance matrix", "", f"spec: {len(cases)} cases; backends: {', '.join(collector.names)}",
              "", matrix, "", reliability]  # fmt: skip
        if problems:
            md += ["", "## Not passing", "", "```", *problems, "```"]
        (folder / "conformance.md").write_text("\n".join(md) + "\n")
        (folder / "conformance.json").write_text(json.dumps(_payload(collector), indent=2) + "\n")
        print(f"wrote {folder / 'conformance.md'} and {folder / 'conformance.json'}")
    return 1 if bad else 0
