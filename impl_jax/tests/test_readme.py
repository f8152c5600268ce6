"""Every Python block of impl_jax/README.md runs as written (the top-level README's
jax example is test_readme_example.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["functional", "flax", "saving"][: len(BLOCKS)])
def test_readme_block_runs(index, monkeypatch, tmp_path):
    if "flax" in BLOCKS[index].lower():  # the Flax examples, and to_bytes (Flax msgpack)
        pytest.importorskip("flax")
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"{README}:block{index}", "exec"), {"__name__": "readme_example"})
