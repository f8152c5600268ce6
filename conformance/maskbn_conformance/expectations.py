"""Per-backend expectations: skips, xfails and tolerance overrides as data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

STATUSES = ("xfail", "skip", "tolerance")


@dataclass(frozen=True)
class Expectation:
    status: str
    reason: str
    case: str = "*"
    dtype: str = "*"
    invariant: str = "*"
    #: the backend form (e.g. compile, xla); "*" matches every form, the default's name only it
    form: str = "*"
    tolerance: tuple[tuple[str, float], ...] = ()
    #: a fuzz input kind (e.g. ``int64-x``) with ``case: fuzz-<property>``: a known
    #: bug of that kind of input. The property runs without it and the kind alone
    #: must still falsify it (a strict xfail); such an entry matches no single check
    input: str | None = None

    def matches(self, case: str, dtype: str, invariant: str, form: str = "") -> bool:
        return (
            self.input is None
            and fnmatchcase(case, self.case)
            and fnmatchcase(dtype, self.dtype)
            and fnmatchcase(invariant, self.invariant)
            and fnmatchcase(form, self.form)
        )

    def label(self) -> str:
        form = "" if self.form == "*" else f", form: {self.form}"
        kind = "" if self.input is None else f", input: {self.input}"
        return f"{{case: {self.case}, dtype: {self.dtype}, invariant: {self.invariant}{form}{kind}, status: {self.status}}}"


def load_expectations(path: Path | None) -> list[Expectation]:
    if path is None or not Path(path).is_file():
        return []
    data = yaml.safe_load(Path(path).read_text()) or []
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a YAML list of entries")
    out = []
    for i, entry in enumerate(data):
        unknown = set(entry) - {"case", "dtype", "invariant", "form", "status", "reason", "tolerance", "input"}
        if unknown:
            raise ValueError(f"{path}: entry {i}: unknown keys {sorted(unknown)}")
        if entry.get("status") not in STATUSES:
            raise ValueError(f"{path}: entry {i}: status must be one of {STATUSES}, got {entry.get('status')!r}")
        if not str(entry.get("reason", "")).strip():
            raise ValueError(f"{path}: entry {i}: every expectation needs a reason")
        if (entry["status"] == "tolerance") != ("tolerance" in entry):
            raise ValueError(f"{path}: entry {i}: 'tolerance' goes with status tolerance, and only there")
        if "input" in entry and (entry["status"] != "xfail" or not str(entry.get("case", "")).startswith("fuzz-")):
            raise ValueError(
                f"{path}: entry {i}: 'input' (a fuzz input kind) goes with status xfail and a case fuzz-<property>"
            )
        out.append(
            Expectation(
                status=entry["status"],
                reason=str(entry["reason"]).strip(),
                case=str(entry.get("case", "*")),
                dtype=str(entry.get("dtype", "*")),
                invariant=str(entry.get("invariant", "*")),
                form=str(entry.get("form", "*")),
                tolerance=tuple(sorted((entry.get("tolerance") or {}).items())),
                input=None if entry.get("input") is None else str(entry["input"]),
            )
        )
    return out


@dataclass(frozen=True)
class Applicable:
    """The entries of a backend's expectations that match one check (its case,
    dtype, invariant and form): whether it is skipped, expected to fail, and
    the one place a tolerance is put together."""

    entries: tuple[Expectation, ...] = ()

    @property
    def skip(self) -> Expectation | None:
        return next((e for e in self.entries if e.status == "skip"), None)

    @property
    def xfail(self) -> Expectation | None:
        return next((e for e in self.entries if e.status == "xfail"), None)

    def tolerance(self, spec_tolerance: Mapping[str, float], case_args: Mapping[str, Any] | None = None) -> dict:
        """The spec's tolerance for the dtype and quantity, then the case's own
        ``atol`` / ``rtol`` (its invariant's arguments), then the backend's
        ``tolerance`` entries, each overriding the one before."""
        tol = dict(spec_tolerance)
        tol.update({k: v for k, v in (case_args or {}).items() if k in ("atol", "rtol")})
        for entry in self.entries:
            if entry.status == "tolerance":
                tol.update(dict(entry.tolerance))
        return tol


def applicable(expectations: list[Expectation], case: str, dtype: str, invariant: str, form: str = "") -> Applicable:
    return Applicable(tuple(e for e in expectations if e.matches(case, dtype, invariant, form)))
