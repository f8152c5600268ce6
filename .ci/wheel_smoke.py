"""The wheel smoke test (tox -e wheels): what a user's `pip install` of a built wheel gets.

Run from outside the source tree, in an env where the wheels (not the tree) are
installed. For each distribution it checks the wheel's contents (the licence,
py.typed, the metadata licence expression), then runs the README example of each
framework in a fresh interpreter and checks that the package it imported came
from the env's site-packages, not from the source tree.

    python wheel_smoke.py DIST_DIR REPO_ROOT
    python wheel_smoke.py --dry-run DIST_DIR

--dry-run resolves each built wheel next to the newest release of its framework
(`pip index versions`), pinned, so a cap in our metadata shows as
ResolutionImpossible instead of pip quietly picking an older framework. Only
metadata is fetched; nothing is installed. torch is the exception: the newest
torch this machine can install is the CPU wheel in its find-links (PyPI's Linux
torch is a multi-GB CUDA build), so torch is pinned to that.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

# distribution -> (import name, README example names it runs)
DISTRIBUTIONS = {
    "maskbn_conformance": ("maskbn_conformance", []),
    "maskbn_torch": ("maskbn_torch", ["torch"]),
    "maskbn_tf": ("maskbn_tf", ["tf"]),
    "maskbn_jax": ("maskbn_jax", ["jax"]),
}

RUN_EXAMPLE = """
import sys
import sysconfig
from pathlib import Path
import {module}
from maskbn_conformance.readme import readme_example
root = Path(sys.argv[1]).resolve()
where = Path({module}.__file__).resolve()
installed = Path(sysconfig.get_paths()["purelib"]).resolve()
assert installed in where.parents, f"{module} was not imported from the installed wheel: {{where}}"
exec(compile(readme_example(sys.argv[2], root / "README.md"), "README.md example " + sys.argv[2], "exec"), {{}})
print(f"README example {{sys.argv[2]}} ran with {module} from {{where.parent}}")
"""


def check_wheel(wheel: Path, module: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
    missing = [f"{module}/py.typed"] if f"{module}/py.typed" not in names else []
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        missing.append("dist-info/licenses/LICENSE")
    if "License-Expression: Apache-2.0" not in metadata:
        missing.append("License-Expression: Apache-2.0 in METADATA")
    if "Description-Content-Type: text/markdown" not in metadata:
        missing.append("the README as long description")
    if missing:
        sys.exit(f"{wheel.name} lacks: {', '.join(missing)}")
    print(f"{wheel.name}: py.typed, LICENSE, licence expression and README present")


# requirement -> the frameworks pinned to their newest release next to it
DRY_RUNS = {
    "maskbn-torch[conformance]": ["torch"],
    "maskbn-tf[tensorflow,conformance]": ["keras", "tensorflow"],
    "maskbn-jax[flax,conformance]": ["jax", "flax"],
}
LOCAL_NEWEST = {"torch": "2.13.0"}  # the find-links CPU wheel (.ci/constraints.txt)


def newest(package: str) -> str:
    if package in LOCAL_NEWEST:
        return LOCAL_NEWEST[package]
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", package], capture_output=True, text=True, check=True
    ).stdout
    return listing.split("(", 1)[1].split(")", 1)[0]


def dry_run(dist: Path) -> None:
    for requirement, frameworks in DRY_RUNS.items():
        pins = [f"{f}=={newest(f)}" for f in frameworks]
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
        subprocess.run([*command, "--find-links", str(dist), requirement, *pins], check=True)
        print(f"{requirement} resolves next to {', '.join(pins)}")


def main() -> None:
    if sys.argv[1] == "--dry-run":
        dry_run(Path(sys.argv[2]))
        return
    dist, root = Path(sys.argv[1]), Path(sys.argv[2])
    for distribution, (module, examples) in DISTRIBUTIONS.items():
        wheels = sorted(dist.glob(f"{distribution}-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"expected one {distribution} wheel in {dist}, found {[w.name for w in wheels]}")
        check_wheel(wheels[0], module)
        for example in examples:
            subprocess.run([sys.executable, "-c", RUN_EXAMPLE.format(module=module), str(root), example], check=True)


if __name__ == "__main__":
    main()
