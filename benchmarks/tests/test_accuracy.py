"""Smoke tests of the accuracy table (`python -m benchmarks.accuracy`): its output's shape and its
error measure; the accuracy itself is the spec's to check (spec/cases/scale.yaml)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.accuracy import errors, make_batch

ROOT = Path(__file__).resolve().parents[2]


def test_errors_are_in_sigma_and_relative():
    x, mask = make_batch(1e4, 1.0, 4096)
    real = x[mask].astype(np.float64)
    mean, var = real.mean(axis=0), real.var(axis=0)
    assert errors(x, mask, mean, var)["mean_err_sigma"] == 0.0
    shifted = errors(x, mask, mean + 0.5 * np.sqrt(var), var * 1.01)
    assert math.isclose(shifted["mean_err_sigma"], 0.5, rel_tol=1e-9)
    assert math.isclose(shifted["var_rel_err"], 0.01, rel_tol=1e-9)
    assert abs(shifted["rows"] - 4096) < 0.2 * 4096  # lengths jittered +-20 % around half of L


def test_padded_rows_are_zero_and_real_rows_at_the_offset():
    x, mask = make_batch(1e6, 1.0, 4096)
    assert x.dtype == np.float32 and mask.shape == x.shape[:-1]
    assert np.all(x[~mask] == 0.0)
    assert np.allclose(x[mask].astype(np.float64).mean(axis=0), 1e6, atol=0.2)


def test_quick_run_writes_the_table_for_every_installed_framework(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "accuracy.json").read_text())["results"]
    assert set(data) == {"torch", "tf", "jax"}
    assert {p["status"] for p in data.values()} <= {"ok", "not installed"}, data
    ran = {name: p for name, p in data.items() if p["status"] == "ok"}
    assert ran, "no framework installed"
    md = (out / "accuracy.md").read_text()
    for payload in ran.values():
        assert payload["rows"]
        for row in payload["rows"]:
            assert f"| {row['layer']} | {row['form']} |" in md
            assert "error" in row or math.isfinite(row["mean_err_sigma"])
