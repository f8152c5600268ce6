"""``python -m maskbn_conformance why``: the README's "why maskbn" table, from a report's JSON.

One row per spec case that some anchor fails; one column per anchor holding the
reasons of its expected failures in that case (its expectations entries), and
one column for ours: every check of that case across our backends and forms.
The table is measured: it says what the report's run saw, nothing else.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

START, END = "<!-- why-table: start -->", "<!-- why-table: end -->"


def _ours_cell(ours: dict[str, dict], case: str) -> str:
    total: Counter = Counter()
    for result in ours.values():
        for per_case in result["forms"].values():
            total.update(per_case.get(case, {}))
    if not total:
        return "not run"
    ran = total["passed"] + total["failed"] + total["error"] + total["xfailed"] + total["xpassed"]
    if ran == total["passed"]:
        return f"passes ({ran} checks)" if ran else "skipped"
    return f"{ran - total['passed']} of {ran} checks do not pass"


def _anchor_cell(result: dict, case: str) -> str:
    counts = Counter(result["cases"].get(case, {}))
    if not counts:
        return "-"
    if result["reasons"].get(case):
        return "; ".join(result["reasons"][case])
    if counts["passed"]:
        return "passes"
    return "cannot express it (skipped)"


def why_table(payload: dict, case_order: list[str] | None = None) -> str:
    """The markdown table of a report payload (``conformance.json``)."""
    backends = payload["backends"]
    anchors = {n: r for n, r in backends.items() if r.get("anchor")}
    ours = {n: r for n, r in backends.items() if not r.get("anchor") and n != "reference" and not r["error"]}
    if not anchors:
        raise ValueError("the report ran no anchor backend (install anchors/: tox -e report does)")
    failing = {case for r in anchors.values() for case in r["reasons"]}
    order = case_order or sorted(failing)
    rows = [case for case in order if case in failing]
    lines = [
        "| case | " + " | ".join(f"{n}" for n in anchors) + " | maskbn (" + ", ".join(ours) + ") |",
        "|" + "---|" * (len(anchors) + 2),
    ]
    for case in rows:
        cells = [_anchor_cell(r, case) for r in anchors.values()]
        lines.append(f"| `{case}` | " + " | ".join(cells) + f" | {_ours_cell(ours, case)} |")
    return "\n".join(lines)


def write_readme(readme: Path, table: str, source: str) -> None:
    """Replace the text between the why-table markers of ``readme`` with ``table``."""
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    block = f"{START}\n{source}\n\n{table}\n{END}"
    readme.write_text(pattern.sub(lambda _: block, text, count=1))


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())
