"""Loading and linting the spec: cases/*.yaml, schema.json, invariants.yaml, tolerances.yaml."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

MAX_DESCRIPTION = 100
DEFAULT_PARAMS = {
    "decay": 0.9,
    "epsilon": 1e-3,
    "center": True,
    "scale": True,
    "padded_output": "normalize",
    "axis": -1,
    "moving_var": "population",
}


class SpecError(ValueError):
    """A spec file that does not satisfy the schema or the lint rules."""


@dataclass(frozen=True)
class Case:
    id: str
    description: str
    file: Path
    params: dict[str, Any]
    init: dict[str, Any]
    inputs: dict[str, Any]
    dtypes: tuple[str, ...]
    steps: tuple[dict[str, Any], ...]
    #: invariant name -> its arguments (possibly empty)
    expect: dict[str, dict[str, Any]]
    raw: dict[str, Any] = field(repr=False, compare=False)

    def param(self, name: str) -> Any:
        return self.params.get(name, DEFAULT_PARAMS.get(name))

    @classmethod
    def from_raw(cls, raw: dict[str, Any], file: Path) -> Case:
        """A Case from one case mapping as the schema has validated it: a case
        file's entry, or a fuzz example's generated case."""
        return cls(
            id=raw["id"],
            description=raw["description"],
            file=file,
            params=dict(raw.get("params", {})),
            init=dict(raw.get("init", {})),
            inputs=dict(raw["inputs"]),
            dtypes=tuple(raw["dtypes"]),
            steps=tuple(raw["steps"]),
            expect=_expectations(raw["expect"]),
            raw=raw,
        )


@dataclass
class Spec:
    root: Path

    @cached_property
    def schema(self) -> dict:
        return json.loads((self.root / "schema.json").read_text())

    @cached_property
    def invariants(self) -> dict[str, str]:
        """Invariant name -> its one-line meaning."""
        return yaml.safe_load((self.root / "invariants.yaml").read_text())

    @cached_property
    def tolerances(self) -> dict[str, dict[str, dict[str, float]]]:
        """dtype -> quantity -> {atol, rtol}."""
        return yaml.safe_load((self.root / "tolerances.yaml").read_text())

    def case_files(self) -> list[Path]:
        return sorted((self.root / "cases").glob("*.yaml"))

    def load_file(self, path: Path) -> list[Case]:
        """Validate one file and return its cases; SpecError names file, case id and field."""
        import jsonschema

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SpecError(f"{path.name}: not valid YAML: {exc}") from exc
        validator = jsonschema.Draft202012Validator(self.schema)
        errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
        if errors:
            raise SpecError("\n".join(_describe_schema_error(path, data, e) for e in errors))
        return [Case.from_raw(raw, path) for raw in data["cases"]]

    @cached_property
    def cases(self) -> list[Case]:
        cases: list[Case] = []
        problems: list[str] = []
        for path in self.case_files():
            try:
                cases.extend(self.load_file(path))
            except SpecError as exc:
                problems.append(str(exc))
        problems.extend(self._lint(cases))
        if problems:
            raise SpecError("\n".join(problems))
        return cases

    def _lint(self, cases: list[Case]) -> list[str]:
        problems = []
        seen: dict[str, Path] = {}
        for case in cases:
            where = f"{case.file.name}: case {case.id!r}"
            if case.id in seen:
                problems.append(f"{where}: id already used in {seen[case.id].name}")
            seen.setdefault(case.id, case.file)
            for name in case.expect:
                if name not in self.invariants:
                    problems.append(f"{where}: field expect: unknown invariant {name!r}")
            if len(case.description) > MAX_DESCRIPTION:
                problems.append(
                    f"{where}: field description: {len(case.description)} characters, at most {MAX_DESCRIPTION}"
                )
            shards = case.raw.get("shards")
            batch = _batch_size(case)
            if shards is not None and batch is not None and sum(shards) != batch:
                problems.append(f"{where}: field shards: {shards} sums to {sum(shards)}, the batch has {batch} items")
            for dtype in case.dtypes:
                if dtype not in self.tolerances:
                    problems.append(f"{where}: field dtypes: no tolerances for {dtype!r}")
        return problems

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.id == case_id:
                return case
        raise KeyError(f"no case {case_id!r} in {self.root}")


def _batch_size(case: Case) -> int | None:
    x = case.inputs["x"]
    if "shape" in x:
        return int(x["shape"][0])
    return len(x["literal"]) if "literal" in x else None


def _expectations(items: list) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if isinstance(item, str):
            out[item] = {}
        else:
            ((name, args),) = item.items()
            out[name] = dict(args or {})
    return out


def _describe_schema_error(path: Path, data: Any, error) -> str:
    location = list(error.absolute_path)
    case_id = None
    if len(location) >= 2 and location[0] == "cases" and isinstance(location[1], int):
        try:
            case_id = data["cases"][location[1]].get("id")
        except (AttributeError, IndexError, KeyError, TypeError):
            case_id = None
        field_path = ".".join(str(p) for p in location[2:]) or "(the case itself)"
        who = f"case {case_id!r}" if case_id else f"case #{location[1]}"
        return f"{path.name}: {who}: field {field_path}: {error.message}"
    field_path = ".".join(str(p) for p in location) or "(top level)"
    return f"{path.name}: field {field_path}: {error.message}"


def find_spec_root(start: Path | None = None) -> Path:
    """The spec folder: $MASKBN_SPEC, else the nearest ``spec/`` holding a
    schema.json above the working directory or above this package."""
    env = os.environ.get("MASKBN_SPEC")
    if env:
        return Path(env).resolve()
    starts = [start or Path.cwd(), Path(__file__).resolve().parent]
    for origin in starts:
        for folder in (origin, *origin.parents):
            candidate = folder / "spec"
            if (candidate / "schema.json").is_file():
                return candidate.resolve()
    raise FileNotFoundError(
        "cannot find the spec folder (spec/schema.json): run from the maskbn checkout or set MASKBN_SPEC"
    )
