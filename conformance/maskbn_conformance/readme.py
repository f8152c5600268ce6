"""The README's per-framework examples, so each backend's tests can run them as written."""

from __future__ import annotations

import re
from pathlib import Path

from .spec import find_spec_root

_BLOCK = re.compile(r"<!-- example: (\w+) -->\n```python\n(.*?)```", re.S)


def readme_example(name: str, readme: Path | None = None) -> str:
    """The code of the block marked ``<!-- example: NAME -->`` in the top-level README."""
    readme = readme or find_spec_root(Path(__file__).parent).parent / "README.md"
    blocks = dict(_BLOCK.findall(readme.read_text()))
    if name not in blocks:
        raise KeyError(f"README.md has no example marked {name!r} (found: {sorted(blocks)})")
    return blocks[name]
