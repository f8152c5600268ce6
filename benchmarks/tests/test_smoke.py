"""Smoke tests of the benchmark runner: `pytest benchmarks/tests` (any venv with one framework).

They check the shape of the outputs only; timings are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.config import make_mask
from benchmarks.report import headline, markdown, ratio, worst

ROOT = Path(__file__).resolve().parents[2]
RATIO_COLUMNS = ("ours/native", "ours/masked", "ours/gather-scatter", "ours/x*a+b")


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


def test_quick_run_writes_ratio_table_and_json(tmp_path):
    proc, out = _bench(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    md = (out / "results.md").read_text()
    for column in RATIO_COLUMNS:
        assert column in md
    data = json.loads((out / "results.json").read_text())
    assert set(data["backends"]) == {"torch", "tf", "jax"}
    # every backend is reported, installed or not
    statuses = {name: p["status"] for name, p in data["backends"].items()}
    assert set(statuses.values()) <= {"ok", "not installed"}, statuses
    for name, status in statuses.items():
        assert f"**{name}**" in md
        if status == "not installed":
            assert data["backends"][name]["reason"]
    ran = [p for p in data["backends"].values() if p["status"] == "ok"]
    assert ran, "no backend is installed in this interpreter"
    for payload in ran:
        assert payload["rows"]
        for row in payload["rows"]:
            assert "median_ms" in row["impls"]["ours"], row
            assert "median_ms" in row["impls"]["native"], row
            assert ratio(row, "native") > 0
    assert len(data["headline"]) == 3 * 2
    # the report can be rendered again from the saved JSON alone
    (out / "results.md").unlink()
    again = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--render", "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ours/native" in (out / "results.md").read_text()


def test_a_broken_worker_is_reported_not_dropped(tmp_path):
    proc, out = _bench(tmp_path, "--quick", "--backends", "jax", "--python", "jax=" + sys.executable + "-missing")
    assert proc.returncode == 1
    data = json.loads((out / "results.json").read_text())
    assert data["backends"]["jax"]["status"] == "failed"
    assert "failed" in (out / "results.md").read_text()


def test_unknown_backend_is_refused(tmp_path):
    proc, _ = _bench(tmp_path, "--backends", "mxnet")
    assert proc.returncode == 2
    assert "unknown backend" in proc.stderr


@pytest.mark.parametrize("padding", [0.0, 0.5, 0.9])
def test_mask_padding_fraction(padding):
    mask = make_mask([16, 4096, 64], -1, padding, seed=0)
    assert mask.shape == (16, 4096) and mask.dtype == np.bool_
    assert abs((1 - mask.mean()) - padding) < 0.05
    first = make_mask([32, 64, 32, 32], 1, padding, seed=0)
    assert first.shape == (32, 32, 32)


def test_report_verdicts_from_a_synthetic_result():
    cfg = {
        "quick": False,
        "shapes": [{"id": "s", "shape": [2, 4, 3], "channel_axis": -1, "label": "(2, 4, 3) C-last"}],
        "dtypes": ["float32"],
        "paddings": [0.5],
        "modes": ["train", "infer"],
        "forms": {"torch": ["compiled"]},
        "min_repeats": 3,
        "max_repeats": 5,
        "headline": {"shape": "s", "dtype": "float32", "padding": 0.5, "form": "compiled"},
    }

    def row(mode, ours, native):
        impls = {
            "ours": {"median_ms": ours, "peak_mb": 2.0},
            "native": {"median_ms": native, "peak_mb": 1.0},
            "masked": {"na": "none"},
            "gather_scatter": {"median_ms": 4.0 * ours},
            "floor": {"median_ms": ours / 1.5},
        }
        base = {"shape": "s", "dtype": "float32", "form": "compiled", "padding": 0.5, "repeats": 3}
        return {**base, "mode": mode, "impls": impls}

    results = {"torch": {"status": "ok", "rows": [row("train", 1.5, 1.0), row("infer", 1.0, 1.0)]}}
    assert "Summary: worst same-form ratio" in markdown(
        results, cfg, {"date": "today", "machine": "here", "elapsed_s": 1.0}
    )
    entries = {e["mode"]: e for e in headline(results, cfg)}
    train = entries["train"]["ratios"]
    assert train["native"]["verdict"] == "MISS" and train["native"]["ratio"] == 1.5
    assert train["gather_scatter"]["verdict"] == "pass"
    assert train["floor"]["verdict"] == "pass"
    assert train["masked"]["ratio"] is None and train["masked"]["note"] == "none"
    assert entries["infer"]["ratios"]["native"]["verdict"] == "pass"
    md = markdown(results, cfg, {"date": "today", "machine": "here", "elapsed_s": 1.0})
    assert "**MISS**" in md and "**pass**" in md
    for column in RATIO_COLUMNS:
        assert column in md


def test_summary_takes_the_worst_row_each_target_applies_to():
    shape = {"id": "s", "shape": [2, 4, 3], "channel_axis": -1, "label": "(2, 4, 3) C-last"}
    cfg = {"shapes": [shape], "modes": ["train", "infer"], "forms": {"jax": ["compiled"]}}

    def row(padding, ours, native, gs, peak_ours=1.0):
        impls = {
            "ours": {"median_ms": ours, "peak_mb": peak_ours},
            "native": {"median_ms": native, "peak_mb": 1.0},
            "gather_scatter": {"median_ms": gs},
            "floor": {"median_ms": 1.0},
        }
        return {
            "shape": "s",
            "dtype": "float32",
            "form": "compiled",
            "mode": "train",
            "padding": padding,
            "impls": impls,
        }

    # the 90 % row is the worst against gather-scatter, but that target stops at 50 % padding
    rows = [row(0.0, 1.0, 1.0, 2.0), row(0.5, 1.3, 1.0, 1.2, peak_ours=1.5), row(0.9, 1.1, 1.0, 0.5)]
    (entry,) = worst({"jax": {"status": "ok", "rows": rows}}, cfg)
    assert entry["ratios"]["native"]["ratio"] == 1.3 and entry["ratios"]["native"]["verdict"] == "MISS"
    assert entry["ratios"]["native"]["at"] == "(2, 4, 3) C-last float32 50 %"
    gs = entry["ratios"]["gather_scatter"]
    assert gs["ratio"] == round(1.3 / 1.2, 4) and gs["verdict"] == "MISS" and gs["of"] == 2
    assert entry["ratios"]["floor"]["ratio"] == 1.3 and entry["ratios"]["floor"]["verdict"] == "pass"
    # memory: native 1 MB + the mask (8 bools) allowed; ours 1.5 MB misses
    assert entry["memory"]["verdict"] == "MISS" and entry["memory"]["excess_mb"] > 0.49


def test_a_reduced_grid_with_an_unknown_shape_is_refused(tmp_path):
    proc, _ = _bench(tmp_path, "--shapes", "1x2x3")
    assert proc.returncode == 2
    assert "unknown shape" in proc.stderr
