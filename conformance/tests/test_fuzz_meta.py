"""The fuzz properties tested against themselves: the honest reference passes
each one, and each one finds a realistic bug (a broken backend), with a message
that carries the example and a repro that runs.

A property nothing can falsify proves nothing; tolerances so loose that a
one-pass variance or a float16 reduction passes would prove little more.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz extra (pip install 'maskbn-conformance[fuzz]')")

from broken_backends import (  # noqa: E402
    AlwaysFloat32Output,
    BrokenBackend,
    EmptyMaskDividesByZero,
    EvalUpdatesStats,
    IgnoresIntegerMasks,
    IgnoresPaddedOutputZero,
    MultipliesByMask,
    OffsetOutput,
    PaddedRowsGetGradient,
    PlainGradient,
    UnbiasedMovingVar,
    UnmaskedStats,
    UpdatesBeforeValidating,
    VagueErrors,
)
from hypothesis import Phase, given, settings  # noqa: E402

from maskbn_conformance import fuzz  # noqa: E402
from maskbn_conformance import reference as ref  # noqa: E402
from maskbn_conformance.expectations import applicable, load_expectations  # noqa: E402
from maskbn_conformance.fuzz import strategies  # noqa: E402
from maskbn_conformance.harness import LoadedBackend, unused_expectations  # noqa: E402
from maskbn_conformance.invariants import CheckFailed  # noqa: E402
from maskbn_conformance.reference_adapter import ReferenceBackend, ReferenceLayer  # noqa: E402

# enough examples for every bug below to be found, derandomized so the proof is
# stable; no shrinking (the first falsifying input is proof enough, and fast)
SETTINGS = settings(fuzz.ci_settings(60), phases=(Phase.explicit, Phase.generate))


class OnePassVarianceLayer(ReferenceLayer):
    """float32 one-pass variance E[x^2] - E[x]^2 in the moving variance (the contract forbids it)."""

    def _run(self, x, x_dtype, mask, training):
        before = self._full_state()["moving_var"]
        axis, y, aux = super()._run(x, x_dtype, mask, training)
        real_rows = ref.to_rows(x.astype(np.float32), axis)[aux["real"][:, 0]]  # the fuzz masks rows
        if training and len(real_rows):
            mean = real_rows.mean(axis=0, dtype=np.float32)
            var = np.maximum((real_rows * real_rows).mean(axis=0, dtype=np.float32) - mean * mean, 0)
            d = self.config.decay
            self.state["moving_var"] = (d * before + (1 - d) * var.astype(np.float64)).astype(self._store)
        return axis, y, aux


class Float16Statistics(ReferenceLayer):
    """Reduces float16 / bfloat16 input in float16 instead of float32 (the contract: float32)."""

    def _run(self, x, x_dtype, mask, training):
        if x_dtype in ("float16", "bfloat16"):
            x = np.clip(x, -65504, 65504).astype(np.float16)
            axis, real = self._check(x, x_dtype, mask)
            rows = ref.to_rows(x, axis)
            kept = rows[ref.to_rows(real, axis)[:, 0]]
            before = self._full_state()
            out_axis, y, aux = super()._run(x.astype(np.float32), x_dtype, mask, training)
            if training and len(kept):
                with np.errstate(over="ignore", invalid="ignore"):
                    mean = kept.sum(axis=0, dtype=np.float16) / np.float16(len(kept))
                    var = ((kept - mean) ** 2).sum(axis=0, dtype=np.float16) / np.float16(len(kept))
                d = self.config.decay
                self.state["moving_mean"] = (d * before["moving_mean"] + (1 - d) * mean).astype(self._store)
                self.state["moving_var"] = (d * before["moving_var"] + (1 - d) * var).astype(self._store)
            return out_axis, y, aux
        return super()._run(x, x_dtype, mask, training)


class DropsDecayPrecision(ReferenceLayer):
    """Keeps the moving stats in float16 between calls."""

    def _run(self, x, x_dtype, mask, training):
        axis, y, aux = super()._run(x, x_dtype, mask, training)
        self.state = {k: v.astype(np.float16).astype(self._store) for k, v in self.state.items()}
        return axis, y, aux


# (bug, property that must find it)
FOUND = [
    (UnmaskedStats, "differential"),
    (OffsetOutput, "differential"),
    (PlainGradient, "differential"),
    (AlwaysFloat32Output, "differential"),
    (EvalUpdatesStats, "differential"),
    (UnbiasedMovingVar, "differential"),
    (IgnoresPaddedOutputZero, "differential"),
    (PaddedRowsGetGradient, "differential"),
    (IgnoresIntegerMasks, "differential"),
    (EmptyMaskDividesByZero, "differential"),
    (OnePassVarianceLayer, "differential"),
    (Float16Statistics, "differential"),
    (DropsDecayPrecision, "differential"),
    (MultipliesByMask, "garbage"),
    (VagueErrors, "bad-input"),
    (UpdatesBeforeValidating, "bad-input"),
]


def _loaded(bug: type) -> LoadedBackend:
    backend = BrokenBackend(bug)
    return LoadedBackend(backend.name, backend, [])


@pytest.mark.parametrize("prop", list(fuzz.CHECKS))
def test_reference_passes_every_property(prop):
    result = fuzz.run_property(prop, LoadedBackend("reference", ReferenceBackend(), []), SETTINGS)
    assert result.failure is None and result.ran > 0


@pytest.mark.parametrize(("bug", "prop"), FOUND, ids=[f"{bug.__name__}-{prop}" for bug, prop in FOUND])
def test_property_finds_bug(bug, prop):
    loaded = _loaded(bug)
    result = fuzz.PropertyResult(loaded.name, prop)
    with pytest.raises(CheckFailed) as info, hypothesis.reporting.with_reporter(lambda _message: None):
        fuzz.run_property(prop, loaded, SETTINGS, result=result)
    message = str(info.value)
    # the failure names the property, the backend, the example and how to rerun it
    for needed in (f"fuzz property {prop!r} falsified on backend {loaded.name}", "example:", "dtype ",
                   "x shape (", "step 0:", "repro (python", "ex = fuzz.Example(", "as a spec case"):  # fmt: skip
        assert needed in message, (needed, message)
    assert result.failure == message and result.tried >= 1


@pytest.mark.parametrize("bug", [EmptyMaskDividesByZero, UnmaskedStats, DropsDecayPrecision])
def test_long_run_finds_bug(bug):
    loaded = _loaded(bug)
    with pytest.raises(CheckFailed, match=r"(?s)long run.*training call \d+ of 300.*repro"):
        fuzz.long_run(loaded, steps=300)


def test_long_run_passes_on_reference():
    result = fuzz.long_run(LoadedBackend("reference", ReferenceBackend(), []), steps=300)
    assert result.steps == 300 and result.failure is None


@settings(SETTINGS, max_examples=25)
@given(example=fuzz.differential_examples())
def test_examples_are_spec_cases(example):
    """A falsifying example's case can be pasted into spec/cases: it fits the schema."""
    import jsonschema

    spec = fuzz.default_spec()
    family = {"description": "fuzz examples", "cases": [example.case]}
    jsonschema.validate(family, spec.schema)
    assert set(example.case["expect"]) <= set(spec.invariants)


def test_repro_snippet_runs():
    """The repro printed with a failure is Python that rebuilds the inputs and runs the adapter."""
    example = fuzz.Example(
        dtype="float16",
        case={
            "id": "fuzz-differential", "description": "a hand-made example for the repro test",
            "params": {"axis": 1, "decay": 0.5, "epsilon": 0.001},
            "inputs": {"x": {"random": "normal", "mean": [1.0, -2.0], "std": [3.0, 0.5], "shape": [4, 2, 3],
                             "seed": 5, "padding": "zeros"}, "mask": {"dtype": "int8"}},
            "dtypes": ["float16"],
            "steps": [{"call": "backward", "mask": {"pattern": "random", "p": 0.5, "seed": 1}},
                      {"call": "eval", "mask": {"pattern": "none"}, "x": {"seed": 7}}],
            "expect": ["output_matches_reference"],
        },
    )  # fmt: skip
    text = fuzz.repro("reference", "differential", example)
    code = textwrap.dedent(text.split("\n", 1)[1].split("\nas a spec case")[0])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backward (4, 2, 3) float16 ((4, 3), dtype('int8'))" in result.stdout


def test_bad_input_kinds_cover_the_issue():
    assert set(fuzz.BAD_INPUT_KINDS) >= {"mask-shape", "float32-mask", "channels", "int32-x", "axis"}
    shapes = dict(strategies.wrong_mask_shapes((4, 8), (4, 8, 3), 2))
    # never a shape the contract accepts (positions, size-1 channel, broadcastable, x's own shape)
    accepted = [(4, 8), (4, 8, 1), (4, 8, 3), (1, 8, 3), (4, 1, 1), (1, 1, 1)]
    assert not set(accepted) & set(shapes) and (4, 8, 4) in shapes and (32,) in shapes


class AcceptsInt64X(ReferenceLayer):
    """Takes an int64 x as if it were float32 (a cast before the dtype check, say)."""

    def _check(self, x, x_dtype, mask):
        return super()._check(x, "float32" if x_dtype == "int64" else x_dtype, mask)


def _with_known_bug(tmp_path, layer_class: type | None, kind: str = "int64-x") -> LoadedBackend:
    path = tmp_path / "conformance_expectations.yaml"
    entry = {"case": "fuzz-bad-input", "input": kind, "status": "xfail", "reason": "casts int64 x"}
    path.write_text(yaml.safe_dump([entry]))
    backend = ReferenceBackend() if layer_class is None else BrokenBackend(layer_class)
    return LoadedBackend(backend.name, backend, load_expectations(path))


def test_known_bug_is_left_out_and_still_fails(tmp_path):
    loaded = _with_known_bug(tmp_path, AcceptsInt64X)
    with hypothesis.reporting.with_reporter(lambda _message: None):
        [known] = fuzz.check_known_bugs(loaded, SETTINGS)
    assert known.failure and known.xfail_reason == "casts int64 x"
    result = fuzz.run_property("bad-input", loaded, SETTINGS)
    assert result.failure is None and result.excluded == ("int64-x",)
    assert "without the known-bug kinds int64-x" in result.summary()


def test_fixed_known_bug_fails_the_run(tmp_path):
    with pytest.raises(CheckFailed, match=r"no longer reproduces.*remove the entry \{case: fuzz-bad-input, input"):
        fuzz.check_known_bugs(_with_known_bug(tmp_path, None), SETTINGS)


def test_known_bug_names_a_real_kind(tmp_path):
    with pytest.raises(ValueError, match="one of its input kinds"):
        fuzz.check_known_bugs(_with_known_bug(tmp_path, None, kind="no-such-kind"), SETTINGS)


def test_known_bug_entry_matches_no_single_check(tmp_path):
    loaded = _with_known_bug(tmp_path, AcceptsInt64X)
    assert not applicable(loaded.expectations, "fuzz-bad-input", "float32", "raises_clear_error").entries
    assert unused_expectations(loaded, []) == []


def test_input_goes_with_xfail_of_a_fuzz_case(tmp_path):
    path = tmp_path / "conformance_expectations.yaml"
    path.write_text(yaml.safe_dump([{"case": "half-mask", "input": "int64-x", "status": "xfail", "reason": "r"}]))
    with pytest.raises(ValueError, match="'input' \\(a fuzz input kind\\) goes with status xfail"):
        load_expectations(path)


def test_cli_report_prints_reliability_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maskbn_conformance", "--spec", str(fuzz.default_spec().root), "report",
         "--backend", "reference", "--out", str(tmp_path), "--fuzz-examples", "3", "--fuzz-long-run", "30"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| backend | cases tried | inputs tried | long-run calls | failures |" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| reference |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[1]) > 0 and int(cells[2]) >= 9 and cells[3] == "30" and cells[4] == "0"
    payload = json.loads((tmp_path / "conformance.json").read_text())
    reliability = payload["backends"]["reference"]["reliability"]
    assert reliability["failures"] == 0 and reliability["inputs_tried"] >= 9


def test_differential_samples_at_scale_and_runs_in_a_form():
    """In a form, the differential property builds its layers there (a backend wrong only in
    that form is falsified), and at-scale examples hold >= 1e5 real rows."""
    from broken_backends import CompiledFormOffByOne

    from maskbn_conformance.harness import LoadedBackend

    backend = CompiledFormOffByOne()
    loaded = LoadedBackend(backend.name, backend, [])
    few = settings(fuzz.ci_settings(4), report_multiple_bugs=False, phases=(Phase.explicit, Phase.generate))
    fuzz.run_property("differential", loaded, few, form="eager", scale_share=2)
    with pytest.raises(CheckFailed, match="fuzz property 'differential' falsified"):
        fuzz.run_property("differential", loaded, few, form="compiled", scale_share=2)
    example = strategies.scale_example("float32").example()
    lengths = example.case["inputs"]["mask"]["lengths"]
    assert example.case["expect"] == list(fuzz.SCALE_INVARIANTS) and min(lengths) >= 1
    big = [strategies.scale_example("float32").example() for _ in range(20)]
    assert any(sum(e.case["inputs"]["mask"]["lengths"]) >= 100_000 for e in big)
