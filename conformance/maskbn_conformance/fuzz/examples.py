"""A fuzz example: a synthetic spec case (the ``spec/cases`` format) and a run dtype."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..adapter import LayerConfig
from ..inputs import StepInputs
from ..runner import (
    AS_WRITTEN,
    _state_for_layer,
    expand_steps,
    initial_state,
    layer_config,
    step_inputs,
)
from ..spec import Case, Spec, find_spec_root


@dataclass(frozen=True)
class Example:
    """One fuzz input: a spec case (``spec/README.md`` format) and a run dtype.

    ``repr`` is valid Python, so Hypothesis's "Falsifying example" line and the
    repro snippet rebuild it exactly. ``fill`` is the garbage of the garbage
    property (None elsewhere).
    """

    dtype: str
    case: dict
    fill: str | None = None

    def spec_case(self) -> Case:
        """The example's case, built as the spec's files build theirs."""
        return Case.from_raw(self.case, Path("<fuzz>"))

    def config(self) -> LayerConfig:
        return layer_config(self.spec_case(), self.dtype)

    def initial_state(self) -> dict[str, np.ndarray]:
        """The state the layer starts from (neutral names, storage dtype)."""
        config = self.config()
        return _state_for_layer(initial_state(self.spec_case(), config.channels), config)

    def arrays(self) -> Iterator[tuple[str, StepInputs]]:
        """(call, inputs) per step, built by the runner exactly as the check does."""
        case = self.spec_case()
        for index, step in enumerate(expand_steps(case)):
            yield step["call"], step_inputs(case, step, index, self.dtype, AS_WRITTEN)

    def describe(self) -> str:
        """One line per fact a reader needs: dtype, shape, axis, masks, seeds."""
        c = self.case
        x = c["inputs"]["x"]
        params = ", ".join(f"{k}={v}" for k, v in c.get("params", {}).items())
        lines = [f"dtype {self.dtype}, x shape {tuple(x['shape'])}, {params or 'default params'}"]
        if self.fill:
            lines.append(f"padding garbage: {self.fill}")
        if c.get("init"):
            lines.append(f"init: {c['init']}")
        lines.append(f"x: {_brief(x)}; mask: {_brief(c['inputs'].get('mask', {'pattern': 'all'}))}")
        for i, step in enumerate(c["steps"]):
            extra = {k: v for k, v in step.items() if k != "call"}
            lines.append(f"step {i}: {step['call']} {_brief(extra) if extra else ''}".rstrip())
        return "\n".join(lines)

    def as_yaml(self) -> str:
        return yaml.safe_dump([self.case], default_flow_style=None, sort_keys=False, width=110).rstrip()


def _brief(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def significant(value: float, digits: int = 3) -> float:
    """A short float, so examples read well (the value used is this one)."""
    return float(f"{float(value):.{digits}g}")


_SPEC: Spec | None = None


def default_spec() -> Spec:
    global _SPEC
    if _SPEC is None:
        _SPEC = Spec(find_spec_root(Path(__file__).resolve().parent))
    return _SPEC
