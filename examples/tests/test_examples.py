"""Each example trains a few steps in its backend's env and prints both accuracies.

A few steps prove the script runs as a user runs it (a fresh process, its own
folder on sys.path), not that it learns: the full runs' accuracies are in the README.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent
# (script, the implementation it needs, its framework): the framework env that has both runs it
SCRIPTS = [
    ("torch_pointcloud.py", "maskbn_torch", "torch"),
    ("keras_pointcloud.py", "maskbn_tf", "keras"),
    ("flax_pointcloud.py", "maskbn_jax", "flax"),
]
ACCURACY = re.compile(r"eval accuracy (\d\.\d{3})")


@pytest.mark.parametrize(("script", "package", "framework"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_example_trains_and_reports_both_accuracies(script, package, framework):
    pytest.importorskip(package, reason=f"{package} is not installed in this env")
    pytest.importorskip(framework, reason=f"{framework} is not installed in this env")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--steps", "3"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracies = [float(a) for a in ACCURACY.findall(done.stdout)]
    assert len(accuracies) == 2, done.stdout
    assert all(0.0 <= a <= 1.0 for a in accuracies), done.stdout
