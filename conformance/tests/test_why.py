"""The README's "why maskbn" table comes from a report's JSON: anchors' reasons beside ours."""

from __future__ import annotations

import pytest

from maskbn_conformance import why
from maskbn_conformance.report import _cell


def _payload() -> dict:
    ours = {"passed": 3}
    return {
        "backends": {
            "torch": {"anchor": False, "error": None, "cases": {"a": ours, "b": ours},
                      "forms": {"torch": {"a": ours, "b": ours}}, "reasons": {}},
            "torch-gather": {"anchor": True, "error": None, "cases": {"a": {"xfailed": 2, "passed": 1}, "b": {"passed": 3}},
                             "forms": {}, "reasons": {"a": ["raises on one real row"]}},
        }
    }  # fmt: skip


def test_rows_are_the_cases_an_anchor_fails_with_its_reasons():
    table = why.why_table(_payload(), ["a", "b"])
    lines = table.splitlines()
    assert lines[0] == "| case | torch-gather | maskbn (torch) |"
    assert lines[2] == "| `a` | raises on one real row | passes (3 checks) |"
    assert len(lines) == 3  # case b: the anchor passes it, so it is no reason to switch


def test_ours_failing_is_shown_not_hidden():
    payload = _payload()
    payload["backends"]["torch"]["forms"]["torch"]["a"] = {"passed": 2, "failed": 1}
    assert "1 of 3 checks do not pass" in why.why_table(payload, ["a", "b"])


def test_a_report_without_anchors_is_refused():
    payload = _payload()
    del payload["backends"]["torch-gather"]
    with pytest.raises(ValueError, match="no anchor"):
        why.why_table(payload)


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{why.START}\nold\n{why.END}\noutro\n")
    why.write_readme(readme, "| t |", "From x.")
    assert readme.read_text() == f"intro\n{why.START}\nFrom x.\n\n| t |\n{why.END}\noutro\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        why.write_readme(readme, "| t |", "From x.")


@pytest.mark.parametrize(
    "counter, anchor, cell",
    [
        ({"passed": 2, "xfailed": 1}, False, "pass 2/3 (1 xfailed)"),
        ({"passed": 2, "xfailed": 1}, True, "fails 1/3"),
        ({"skipped": 4}, True, "skipped 4/4"),
        ({"passed": 1, "xpassed": 1}, True, "FAIL 1/2"),
    ],
)
def test_matrix_cells_say_what_an_anchor_gets_wrong(counter, anchor, cell):
    from collections import Counter

    assert _cell(Counter(counter), anchor) == cell
