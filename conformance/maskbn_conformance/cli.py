"""``python -m maskbn_conformance``: lint the spec, run it, and report the matrix.

lint                 validate every case file against the schema and the lint rules
report               pytest over the spec folder on every installed backend (every
                     case, the portable checks, a bounded fuzz pass); print the
                     case x backend matrix and a reliability summary (cases
                     tried, inputs tried, failures), and write them as Markdown
                     and JSON (maskbn_conformance.report)
run                  run one case (or a few) on one backend and print every check
list                 list cases, invariants and installed backends
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .harness import backend_checks, installed_backends, load_backend, run_check
from .invariants import Runs
from .spec import Spec, SpecError, find_spec_root


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


def cmd_report(args) -> int:
    spec = _spec(args)
    cases = _linted_cases(spec)
    if cases is None:
        return 1
    from .report import run_report  # imports pytest

    return run_report(spec, cases, args.backend, args.out, args.verbose, args.fuzz_examples, args.fuzz_long_run)


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
        bad += outcome.is_bad
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


def cmd_why(args) -> int:
    from . import why

    spec = _spec(args)
    table = why.why_table(why.load(args.json), [case.id for case in spec.cases])
    if args.readme:
        why.write_readme(Path(args.readme), table, f"From `{args.json}` by `python -m maskbn_conformance why`.")
        print(f"wrote the why table into {args.readme}")
    else:
        print(table)
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
    why = sub.add_parser("why", help="the README's 'why maskbn' table (anchors vs ours) from a report's JSON")
    why.add_argument("json", nargs="?", default="reports/conformance.json", help="the report's conformance.json")
    why.add_argument("--readme", help="write the table between the why-table markers of this file")
    args = parser.parse_args(argv)
    return {"lint": cmd_lint, "report": cmd_report, "run": cmd_run, "list": cmd_list, "why": cmd_why}[args.command](
        args
    )


if __name__ == "__main__":
    sys.exit(main())
