"""Cross-device statistics (axis_name) under shard_map and pmap, with 4 host CPU devices.

JAX fixes its device count when its runtime starts, so the checks run in a
subprocess (sharded_worker.py) started with XLA_FLAGS asking for 4 CPU
devices; this file asserts on the differences it reports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: check name -> max abs difference allowed against the unsharded computation (float32; sums in
#: another order), or 0 where the result must be exact
CHECKS = {
    **{
        f"{path}-{what}": tol
        for path in ("single-pass", "two-pass")
        for what, tol in (
            ("output", 2e-6),
            ("moving-stats", 1e-6),
            ("grad-x", 2e-6),
            ("grad-params", 5e-6),
            ("grad-x-padded-max", 0.0),
            ("all-shards-empty-keeps-state", 0.0),
            ("no-mask-output", 2e-6),
            ("no-mask-moving-stats", 1e-6),
        )
    },
    "pmap-moving-stats": 1e-6,
    "pmap-single-vs-two-pass-grads": 5e-6,
    "linen-output": 2e-6,
    "linen-moving-stats": 1e-6,
}


@pytest.fixture(scope="module")
def sharded_results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    worker = Path(__file__).with_name("sharded_worker.py")
    done = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_worker_reports_every_check(sharded_results):
    optional = {"linen-output", "linen-moving-stats"} if importlib.util.find_spec("flax") is None else set()
    assert set(CHECKS) - optional <= set(sharded_results) <= set(CHECKS)


@pytest.mark.parametrize("check", list(CHECKS))
def test_sharded_matches_unsharded(sharded_results, check):
    if check.startswith("linen") and check not in sharded_results:
        pytest.skip("flax is not installed")
    assert sharded_results[check] <= CHECKS[check], f"{check}: {sharded_results[check]} > {CHECKS[check]}"
