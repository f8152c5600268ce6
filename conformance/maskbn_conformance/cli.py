"""``python -m maskbn_conformance``: lint the spec, run it, and report the matrix.

lint                 validate every case file against the schema and the lint rules
report               run every case on every installed backend; print the
                     case x backend matrix and write it as Markdown and JSON,
                     then a bounded fuzz pass (maskbn_conformance.fuzz) and a
                     reliability summary: cases tried, inputs tried, failures
run                  run one case (or a few) on one backend and print every check
list                 list cases, invariants and installed backends
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from .harness import (
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
from .progress import Progress
from .spec import Spec, SpecError, find_spec_root

STATUSES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
_BAD = ("failed", "error", "xpassed")


def _spec(args) -> Spec:
    return Spec(Path(args.spec).resolve() if args.spec else find_spec_root())


def _linted_cases(spec: Spec):
    """The spec's cases, or None after printing why the lint rejects them."""
    try:
        return spec.cases
    except SpecError as exc:
        print(f"spec lint failed ({spec.root}):\n{exc}", file=sys.stderr)
        return None


def cmd_lint(args) -> int:
    spec = _spec(args)
    cases = _linted_cases(spec)
    if cases is None:
        return 1
    files = len(spec.case_files())
    print(f"spec ok: {len(cases)} cases in {files} files, {len(spec.invariants)} invariants ({spec.root})")
    return 0


def _backends(names: list[str]) -> list[LoadedBackend]:
    return [load_backend(name) for name in (names or list(installed_backends()))]


def _run_backend(spec: Spec, loaded: LoadedBackend, cases, verbose: bool) -> dict:
    """Every check of ``cases`` on one backend, in each of its forms: {"columns":
    {backend or backend-form: {case id: Counter}}, "cases": the default form's},
    plus problem lines."""
    runs = Runs()
    columns: dict[str, dict[str, Counter]] = {loaded.name: {}}
    problems: list[str] = []
    checks = list(backend_checks(spec, loaded, cases))
    progress = Progress(f"{loaded.name} spec checks", len(checks))
    for check in checks:
        outcome = run_check(check, loaded, spec, runs)
        progress.advance(check.case.id)
        columns.setdefault(check.column, {}).setdefault(check.case.id, Counter())[outcome.status] += 1
        if outcome.status in _BAD or (verbose and outcome.status != "passed"):
            problems.append(f"{outcome.status.upper()} {check.id}\n  " + outcome.message.replace("\n", "\n  "))
        elif outcome.status in ("skipped", "xfailed"):
            problems.append(f"{outcome.status} {check.id}: {outcome.message.splitlines()[0][:200]}")
    progress.finish()
    per_case = columns[loaded.name]
    for entry in unused_expectations(loaded, backend_checks(spec, loaded)):
        problems.append(f"FAILED {loaded.name}-expectations-all-used: {entry.label()} matches no test")
        per_case.setdefault("(expectations)", Counter())["failed"] += 1
    return {"cases": per_case, "columns": columns, "problems": problems}


def _fuzz_backend(loaded: LoadedBackend, spec: Spec, examples: int, long_run_steps: int) -> dict:
    """A bounded, derandomized pass of every fuzz property on one backend.

    Hypothesis (the ``fuzz`` extra) is imported here only, so lint and the
    rest of the CLI work without it."""
    import hypothesis.reporting

    from . import fuzz
    from .adapter import Unsupported
    from .invariants import CheckFailed

    results: list = []
    problems: list[str] = []
    hyp_settings = fuzz.ci_settings(examples)

    def attempt(result, run) -> None:
        results.append(result)
        try:
            # the failure message carries the example and the repro: Hypothesis's
            # own report of it would only repeat it
            with hypothesis.reporting.with_reporter(lambda _message: None):
                run()
        except Unsupported as exc:
            problems.append(f"skipped {loaded.name} fuzz {result.prop}: {exc}")
        except CheckFailed as exc:
            problems.append(f"FAILED {loaded.name} fuzz {result.prop}\n  " + str(exc).replace("\n", "\n  "))
            result.failure = result.failure or str(exc)
        except Exception:
            problems.append(
                f"ERROR {loaded.name} fuzz {result.prop}\n  " + traceback.format_exc().replace("\n", "\n  ")
            )
            result.failure = result.failure or "error"

    progress = Progress(f"{loaded.name} fuzz properties", len(fuzz.CHECKS))
    for prop in fuzz.CHECKS:
        result = fuzz.PropertyResult(loaded.name, prop)
        attempt(result, lambda prop=prop, result=result: fuzz.run_property(prop, loaded, hyp_settings, spec, result))
        progress.advance(str(prop))
    progress.finish()
    known: list = []
    try:
        with hypothesis.reporting.with_reporter(lambda _message: None):
            known = fuzz.check_known_bugs(loaded, hyp_settings, spec)
    except CheckFailed as exc:
        problems.append(f"XPASSED {loaded.name} fuzz known bug\n  {exc}")
    for result in known:
        problems.append(f"xfailed {loaded.name} fuzz {result.prop}: {result.xfail_reason}")
    if long_run_steps > 0:
        result = fuzz.PropertyResult(loaded.name, "long-run")
        attempt(result, lambda: fuzz.long_run(loaded, long_run_steps, spec, result=result))
    return {
        "inputs": sum(r.tried for r in results) + sum(r.tried for r in known),
        "long_run_steps": sum(r.steps for r in results),
        "failures": sum(1 for r in results if r.failure) + sum(p.startswith("XPASSED") for p in problems),
        "known_bugs": len(known),
        "summaries": [r.summary() for r in results + known],
        "problems": problems,
    }


def _cell(counter: Counter | None) -> str:
    if not counter:
        return "-"
    total = sum(counter.values())
    bad = sum(counter[s] for s in _BAD)
    if bad:
        return f"FAIL {bad}/{total}"
    extra = ", ".join(f"{counter[s]} {s}" for s in ("skipped", "xfailed") if counter[s])
    return f"pass {counter['passed']}/{total}" + (f" ({extra})" if extra else "")


def cmd_report(args) -> int:
    spec = _spec(args)
    cases = _linted_cases(spec)
    if cases is None:
        return 1
    backends = _backends(args.backend)
    results: dict[str, dict] = {}
    totals: Counter = Counter()
    started = time.perf_counter()
    for loaded in backends:
        if loaded.backend is None:
            results[loaded.name] = {"error": loaded.error, "cases": {}, "problems": [loaded.error]}
            totals["error"] += 1
            continue
        t0 = time.perf_counter()
        results[loaded.name] = _run_backend(spec, loaded, cases, args.verbose)
        results[loaded.name]["seconds"] = round(time.perf_counter() - t0, 1)
        for column in results[loaded.name]["columns"].values():
            for counter in column.values():
                totals.update(counter)

    # portable state across backends: rows export, columns import
    usable = {b.name: b for b in backends if b.backend is not None}
    cross: dict[tuple[str, str], Counter] = {}
    for check in cross_checks(spec, list(usable)):
        outcome = run_cross_check(check, usable, spec)
        cross.setdefault((check.source, check.target), Counter())[outcome.status] += 1
        totals[outcome.status] += 1
        if outcome.status != "passed":
            results[check.source]["problems"].append(
                f"{outcome.status.upper()} {check.id}\n  " + outcome.message.replace("\n", "\n  ")
            )

    # a bounded fuzz pass per backend (Hypothesis, derandomized): inputs the spec never wrote down
    fuzz: dict[str, dict] = {}
    fuzz_note = ""
    if args.fuzz_examples > 0 or args.fuzz_long_run > 0:
        try:
            import hypothesis  # noqa: F401 - only to say clearly when the extra is missing
        except ImportError:
            fuzz_note = "fuzz pass not run: hypothesis is not installed (pip install 'maskbn-conformance[fuzz]')"
        else:
            for name, loaded in usable.items():
                t0 = time.perf_counter()
                fuzz[name] = _fuzz_backend(loaded, spec, args.fuzz_examples, args.fuzz_long_run)
                fuzz[name]["seconds"] = round(time.perf_counter() - t0, 1)
                results[name]["problems"].extend(fuzz[name]["problems"])
                if fuzz[name]["failures"]:
                    totals["failed"] += fuzz[name]["failures"]

    names = [b.name for b in backends]
    # one column per backend and form: torch, torch-compile, tf, tf-function, tf-xla, ...
    columns = {}
    for n in names:
        columns.update(results[n].get("columns") or {n: {}})
    header = "| case | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for case in cases:
        cells = [_cell(per_case.get(case.id)) for per_case in columns.values()]
        lines.append(f"| `{case.id}` | " + " | ".join(cells) + " |")
    summary_cells = []
    for n in names:
        if results[n].get("error"):
            summary_cells.append("NOT LOADED")
            continue
        for per_case in results[n]["columns"].values():
            c = Counter()
            for counter in per_case.values():
                c.update(counter)
            summary_cells.append(_cell(c))
    lines.append("| **all** | " + " | ".join(summary_cells) + " |")
    if cross:
        lines += ["", "Portable state (rows export, columns import):", "", "| from \\ to | " + " | ".join(usable) + " |",
                  "|" + "---|" * (len(usable) + 1)]  # fmt: skip
        for a in usable:
            lines.append(f"| {a} | " + " | ".join(_cell(cross.get((a, b))) if a != b else "" for b in usable) + " |")
    matrix = "\n".join(lines)
    reliability = _reliability(names, results, fuzz, fuzz_note, args)

    problems = [p for n in names for p in results[n]["problems"]]
    print(matrix)
    print("\n" + reliability)
    if problems:
        print("\nnot passing (reasons):")
        for p in problems:
            print("  " + p.replace("\n", "\n  "))
    elapsed = time.perf_counter() - started
    closing = ", ".join(f"{totals[s]} {s}" for s in ("passed", "failed", "skipped", "xfailed", "xpassed", "error"))
    print(f"\nconformance: {closing} in {elapsed:.1f}s")
    # the plain closing line CI reads
    print(
        f"{totals['passed'] + totals['xfailed']} passed, {sum(totals[s] for s in _BAD)} failed, {totals['skipped']} skipped"
    )

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        md = ["# maskbn conformance matrix", "", f"spec: {len(cases)} cases; backends: {', '.join(names)}", "", matrix,
              "", reliability]  # fmt: skip
        if problems:
            md += ["", "## Not passing", "", "```", *problems, "```"]
        (out / "conformance.md").write_text("\n".join(md) + "\n")
        payload = {
            "backends": {
                n: {
                    "error": results[n].get("error"),
                    "seconds": results[n].get("seconds"),
                    "cases": {cid: dict(counter) for cid, counter in results[n]["cases"].items()},
                    "forms": {
                        column: {cid: dict(counter) for cid, counter in per_case.items()}
                        for column, per_case in results[n].get("columns", {}).items()
                    },
                    "problems": results[n]["problems"],
                    "reliability": {
                        "cases_tried": _cases_tried(results[n]),
                        "inputs_tried": fuzz[n]["inputs"] if n in fuzz else None,
                        "long_run_steps": fuzz[n]["long_run_steps"] if n in fuzz else None,
                        "failures": _failures(results[n], fuzz.get(n)),
                        "known_bugs": fuzz[n]["known_bugs"] if n in fuzz else None,
                        "fuzz": fuzz[n]["summaries"] if n in fuzz else [],
                    },
                }
                for n in names
            },
            "totals": dict(totals),
        }
        (out / "conformance.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out / 'conformance.md'} and {out / 'conformance.json'}")
    return 1 if any(totals[s] for s in _BAD) else 0


def _counters(result: dict) -> list[Counter]:
    """Every case's counter in every form column of one backend."""
    return [c for per_case in result.get("columns", {}).values() for c in per_case.values()]


def _cases_tried(result: dict) -> int:
    """Spec checks that ran in any form (skips were not tried)."""
    return sum(sum(v for k, v in c.items() if k != "skipped") for c in _counters(result))


def _failures(result: dict, fuzz: dict | None) -> int:
    spec_bad = sum(sum(c[s] for s in _BAD) for c in _counters(result))
    return spec_bad + (fuzz["failures"] if fuzz else 0) + (1 if result.get("error") else 0)


def _reliability(names: list[str], results: dict, fuzz: dict, note: str, args) -> str:
    """Per backend: spec checks tried, fuzz inputs tried, failures."""
    lines = [
        f"Reliability (cases: spec checks run; inputs: fuzz inputs tried, {args.fuzz_examples} examples per "
        f"property, derandomized, plus {args.fuzz_long_run} long-run training calls):",
        "",
        "| backend | cases tried | inputs tried | long-run calls | failures | known bugs (xfail) |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        f = fuzz.get(n)
        lines.append(
            f"| {n} | {_cases_tried(results[n])} | {f['inputs'] if f else '-'} | "
            f"{f['long_run_steps'] if f else '-'} | {_failures(results[n], f)} | {f['known_bugs'] if f else '-'} |"
        )
    if note:
        lines += ["", note]
    for n in names:
        if n in fuzz:
            lines += ["", f"fuzz {n} ({fuzz[n]['seconds']}s):"] + [f"  {s}" for s in fuzz[n]["summaries"]]
    return "\n".join(lines)


def cmd_run(args) -> int:
    spec = _spec(args)
    loaded = load_backend(args.backend)
    if loaded.backend is None:
        print(loaded.error, file=sys.stderr)
        return 2
    cases = [spec.case(cid) for cid in args.case] if args.case else spec.cases
    runs = Runs()
    bad = 0
    for check in backend_checks(spec, loaded, cases):
        if args.dtype and check.dtype not in args.dtype:
            continue
        if args.invariant and check.invariant not in args.invariant:
            continue
        outcome = run_check(check, loaded, spec, runs)
        bad += outcome.status in _BAD
        print(f"{outcome.status:8} {check.id}")
        if outcome.message:
            print("         " + outcome.message.replace("\n", "\n         "))
    return 1 if bad else 0


def cmd_list(args) -> int:
    spec = _spec(args)
    print("backends installed:", ", ".join(installed_backends()) or "none")
    print(f"\ninvariants ({len(spec.invariants)}):")
    for name, meaning in spec.invariants.items():
        print(f"  {name}: {meaning}")
    print(f"\ncases ({len(spec.cases)}):")
    for case in spec.cases:
        print(f"  {case.id:40} {case.file.name:22} {case.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maskbn_conformance",
        description="The maskbn conformance harness: one YAML spec of masked batch norm behaviour, "
        "run against every installed backend (entry-point group maskbn.backends).",
    )
    parser.add_argument("--spec", help="the spec folder (default: $MASKBN_SPEC or the nearest ./spec)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lint", help="validate spec/cases/*.yaml against spec/schema.json and the lint rules")
    report = sub.add_parser("report", help="run every case on every backend and print the case x backend matrix")
    report.add_argument("--backend", action="append", default=[], help="only these backends (repeatable)")
    report.add_argument("--out", help="also write conformance.md and conformance.json here")
    report.add_argument("-v", "--verbose", action="store_true", help="print every non-passing check in full")
    report.add_argument(
        "--fuzz-examples", type=int, default=5, metavar="N",
        help="Hypothesis examples per fuzz property and backend (derandomized; 0: no fuzz pass; default 5)",
    )  # fmt: skip
    report.add_argument(
        "--fuzz-long-run", type=int, default=300, metavar="N",
        help="training calls of the fuzz long run per backend (0: none; default 300; CI runs 10000)",
    )  # fmt: skip
    run = sub.add_parser("run", help="run some cases on one backend and print each check")
    run.add_argument("--backend", required=True)
    run.add_argument("--case", action="append", default=[], help="case id (repeatable; default: all)")
    run.add_argument("--dtype", action="append", default=[], help="only these dtypes")
    run.add_argument("--invariant", action="append", default=[], help="only these invariants")
    sub.add_parser("list", help="list cases, invariants and installed backends")
    args = parser.parse_args(argv)
    return {"lint": cmd_lint, "report": cmd_report, "run": cmd_run, "list": cmd_list}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
