"""The harness tested against itself: the reference passes every check, every
invariant catches a realistic bug, and the lint rejects malformed specs with a
message naming file, case and field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from broken_backends import (
    AlwaysAffine,
    AlwaysFloat32Output,
    AmbiguousMaskAsLeading,
    AveragesShardMeans,
    BrokenBackend,
    DetachedSecondOrder,
    EmptyMaskDividesByZero,
    EvalUpdatesStats,
    EvalUsesBatchStats,
    IgnoresIntegerMasks,
    IgnoresPaddedOutputZero,
    LossyPortableExport,
    LossyRoundTrip,
    MeanOffAtTheSpreadBound,
    MultipliesByMask,
    NaiveFloat32Mean,
    NoMaskUsesOtherEpsilon,
    OffsetOutput,
    OneCountForAllChannels,
    PaddedRowsGetGradient,
    PlainGradient,
    PopulationMovingVar,
    PortableForgetsMovingVar,
    StockCheckpointLosesMovingVar,
    UnbiasedMovingVar,
    UnmaskedStats,
    UpdatesBeforeValidating,
    VagueErrors,
    ZeroAffineGradients,
)

from maskbn_conformance.expectations import load_expectations
from maskbn_conformance.harness import Check, LoadedBackend, checks_for, run_check, unused_expectations
from maskbn_conformance.invariants import INVARIANTS, Runs
from maskbn_conformance.reference_adapter import ReferenceBackend
from maskbn_conformance.spec import Spec, SpecError, find_spec_root

SPEC = Spec(find_spec_root(Path(__file__).parent))

# (bug, case, dtype, invariant that must catch it)
CAUGHT = [
    (MultipliesByMask, "garbage-padding-isolated", "float32", "garbage_padding_isolated"),
    (MultipliesByMask, "nan-padding-matches-reference", "float32", "moving_stats_match_reference"),
    (UnmaskedStats, "half-mask", "float32", "moving_stats_match_reference"),
    (UnmaskedStats, "half-mask", "float32", "real_rows_match_standalone_bn"),
    (UnmaskedStats, "heterogeneous-distribution", "float32", "moving_stats_recover_distribution"),
    (EvalUpdatesStats, "eval-uses-moving-stats-only", "float32", "state_unchanged"),
    (OffsetOutput, "half-mask", "float32", "output_matches_reference"),
    (OffsetOutput, "no-mask-matches-stock-bn", "float32", "matches_stock_batch_norm"),
    (AlwaysFloat32Output, "half-mask", "float16", "output_dtype_matches_input"),
    (EmptyMaskDividesByZero, "empty-mask-training", "float32", "outputs_finite"),
    (IgnoresPaddedOutputZero, "zero-padded-output", "float32", "padded_rows_zero"),
    (PlainGradient, "gradient-flow-half-mask", "float32", "gradients_match_reference"),
    (PaddedRowsGetGradient, "gradient-flow-half-mask", "float32", "padded_rows_zero_gradient"),
    (ZeroAffineGradients, "gradient-flow-half-mask", "float32", "affine_gradients_nonzero"),
    (IgnoresIntegerMasks, "bool-and-int-masks-agree", "float32", "mask_dtypes_agree"),
    (NoMaskUsesOtherEpsilon, "all-true-mask-equals-no-mask", "float32", "all_true_mask_equals_no_mask"),
    (UnbiasedMovingVar, "no-mask-matches-stock-bn", "float32", "matches_stock_moving_var"),
    (PopulationMovingVar, "unbiased-moving-var", "float32", "moving_stats_match_reference"),
    (MeanOffAtTheSpreadBound, "rank-5-channels-first", "float32", "moving_stats_match_reference"),
    (AmbiguousMaskAsLeading, "ambiguous-mask-reads-positions", "float32", "moving_stats_match_reference"),
    (OneCountForAllChannels, "keras-mask-channels-first", "float32", "moving_stats_match_reference"),
    (DetachedSecondOrder, "hvp-half-mask", "float32", "second_derivatives_match_reference"),
    (NaiveFloat32Mean, "scale-262k-rows-offset-1e6", "float32", "statistics_accurate_at_scale"),
    (NaiveFloat32Mean, "scale-262k-rows-offset-1e6", "float32", "outputs_accurate_at_scale"),
    (PortableForgetsMovingVar, "portable-unbiased-moving-var", "float32", "portable_round_trip"),
    (EvalUsesBatchStats, "eval-after-training", "float32", "eval_ignores_mask"),
    (AlwaysAffine, "no-affine", "float32", "weights_follow_config"),
    (LossyRoundTrip, "round-trip-after-training", "float32", "round_trip_preserves_layer"),
    (VagueErrors, "mask-wrong-shape", "float32", "raises_clear_error"),
    (UpdatesBeforeValidating, "mask-wrong-shape", "float32", "state_unchanged"),
    (AveragesShardMeans, "sharded-4-one-empty", "float32", "sharded_equals_unsharded"),
    (LossyPortableExport, "portable-after-training", "float32", "portable_round_trip"),
    (StockCheckpointLosesMovingVar, "stock-checkpoint-loads", "float32", "loads_stock_checkpoint"),
]


def _broken(bug: type):
    """A bug is a layer class (wrapped in BrokenBackend) or a whole backend class."""
    return bug() if issubclass(bug, ReferenceBackend) else BrokenBackend(bug)


def _outcome(backend, case_id: str, dtype: str, invariant: str, expectations=()):
    loaded = LoadedBackend(backend.name, backend, list(expectations))
    return run_check(Check(backend.name, SPEC.case(case_id), dtype, invariant), loaded, SPEC, Runs())


@pytest.mark.parametrize(
    ("bug", "case_id", "dtype", "invariant"),
    CAUGHT,
    ids=[f"{bug.__name__}-{case}-{inv}" for bug, case, _, inv in CAUGHT],
)
def test_invariant_catches_bug(bug, case_id, dtype, invariant):
    # the honest reference passes this very check, so the failure is the bug's
    assert _outcome(ReferenceBackend(), case_id, dtype, invariant).status == "passed"
    outcome = _outcome(_broken(bug), case_id, dtype, invariant)
    assert outcome.status == "failed", outcome
    # the failure names everything needed to act on it
    for needed in (f"broken-{bug.__name__}", case_id, dtype, invariant, "repro: pytest"):
        assert needed in outcome.message


def test_every_invariant_is_proven_fallible():
    assert {inv for *_, inv in CAUGHT} == set(INVARIANTS)


def test_invariant_list_matches_implementations():
    assert sorted(SPEC.invariants) == sorted(INVARIANTS)


@pytest.mark.parametrize("check", checks_for(SPEC, "reference"), ids=lambda c: c.id)
def test_reference_passes_every_check(check):
    backend = ReferenceBackend()
    outcome = run_check(check, LoadedBackend("reference", backend, []), SPEC, _SHARED_RUNS)
    assert outcome.status == "passed", outcome.message


_SHARED_RUNS = Runs()


def test_spec_covers_enough_cases():
    assert len(SPEC.cases) >= 40
    assert len({c.id for c in SPEC.cases}) == len(SPEC.cases)


# ------------------------------------------------------------------ the lint


def _spec_copy(tmp_path: Path, cases_yaml: str) -> Spec:
    root = tmp_path / "spec"
    (root / "cases").mkdir(parents=True)
    for name in ("schema.json", "invariants.yaml", "tolerances.yaml"):
        (root / name).write_text((SPEC.root / name).read_text())
    (root / "cases" / "family.yaml").write_text(textwrap.dedent(cases_yaml))
    return Spec(root)


GOOD_CASE = """
  - id: {id}
    description: {description}
    inputs:
      x: {{random: normal, shape: [4, 8, 3], seed: 1}}
      mask: {{pattern: half}}
    dtypes: [float32]
    steps: [{{call: train}}]
    expect: [{invariant}]
"""


def _family(*cases: str) -> str:
    return "description: a test family\ncases:\n" + "".join(cases)


def test_lint_accepts_a_good_case(tmp_path):
    spec = _spec_copy(
        tmp_path, _family(GOOD_CASE.format(id="ok-case", description="a good case", invariant="outputs_finite"))
    )
    assert [c.id for c in spec.cases] == ["ok-case"]


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ({"dtypes": ["float8"]}, ["family.yaml", "'bad-case'", "field dtypes.0"]),
        ({"steps": [{"call": "jump"}]}, ["family.yaml", "'bad-case'", "field steps.0.call"]),
        ({"params": {"decay": 1.5}}, ["family.yaml", "'bad-case'", "field params.decay"]),
        ({"inputs": {"x": {"random": "normal"}}}, ["family.yaml", "'bad-case'", "field inputs.x"]),
        ({"surprise": 1}, ["family.yaml", "'bad-case'", "surprise"]),
        ({"id": "Bad_Case"}, ["family.yaml", "field id"]),
    ],
    ids=["unknown-dtype", "unknown-step", "decay-out-of-range", "generator-without-shape", "unknown-field", "bad-id"],
)
def test_schema_rejects_malformed_case_naming_file_case_and_field(tmp_path, mutation, expected):
    case = yaml.safe_load(GOOD_CASE.format(id="bad-case", description="a malformed case", invariant="outputs_finite"))[
        0
    ]
    case.update(mutation)
    spec = _spec_copy(tmp_path, yaml.safe_dump({"description": "a test family", "cases": [case]}))
    with pytest.raises(SpecError) as info:
        spec.cases  # noqa: B018
    for needle in expected:
        assert needle in str(info.value)


@pytest.mark.parametrize(
    ("cases", "expected"),
    [
        (
            [("twin", "first twin", "outputs_finite"), ("twin", "second twin", "outputs_finite")],
            "case 'twin': id already used",
        ),
        ([("odd", "names a made-up check", "looks_fine")], "case 'odd': field expect: unknown invariant 'looks_fine'"),
        ([("wordy", "x" * 101, "outputs_finite")], "case 'wordy': field description: 101 characters, at most 100"),
    ],
    ids=["duplicate-id", "unknown-invariant", "long-description"],
)
def test_lint_rules(tmp_path, cases, expected):
    text = _family(*(GOOD_CASE.format(id=i, description=d, invariant=inv) for i, d, inv in cases))
    with pytest.raises(SpecError, match=expected.replace("(", r"\(")):
        _spec_copy(tmp_path, text).cases  # noqa: B018


# ---------------------------------------------------------- expectations


def _expectations(tmp_path: Path, entries: list[dict]):
    path = tmp_path / "expectations.yaml"
    path.write_text(yaml.safe_dump(entries))
    return load_expectations(path)


def test_xfail_that_passes_is_reported(tmp_path):
    entries = _expectations(
        tmp_path, [{"case": "half-mask", "invariant": "outputs_finite", "status": "xfail", "reason": "thought broken"}]
    )
    outcome = _outcome(ReferenceBackend(), "half-mask", "float32", "outputs_finite", entries)
    assert outcome.status == "xpassed" and "remove the entry" in outcome.message


def test_xfail_that_fails_is_expected(tmp_path):
    entries = _expectations(
        tmp_path, [{"case": "half-mask", "invariant": "output_matches_reference", "status": "xfail", "reason": "known"}]
    )
    assert (
        _outcome(BrokenBackend(OffsetOutput), "half-mask", "float32", "output_matches_reference", entries).status
        == "xfailed"
    )


def test_skip_carries_its_reason(tmp_path):
    entries = _expectations(
        tmp_path, [{"case": "half-mask", "dtype": "bfloat16", "status": "skip", "reason": "no bf16 here"}]
    )
    outcome = _outcome(ReferenceBackend(), "half-mask", "bfloat16", "outputs_finite", entries)
    assert outcome.status == "skipped" and "no bf16 here" in outcome.message


def test_tolerance_override_applies(tmp_path):
    entries = _expectations(
        tmp_path,
        [
            {
                "case": "half-mask",
                "invariant": "output_matches_reference",
                "status": "tolerance",
                "reason": "r",
                "tolerance": {"atol": 0.1},
            }
        ],
    )
    assert (
        _outcome(BrokenBackend(OffsetOutput), "half-mask", "float32", "output_matches_reference", entries).status
        == "passed"
    )


def test_unused_expectation_is_found(tmp_path):
    entries = _expectations(tmp_path, [{"case": "no-such-case", "status": "skip", "reason": "stale"}])
    loaded = LoadedBackend("reference", ReferenceBackend(), entries)
    assert unused_expectations(loaded, checks_for(SPEC, "reference")) == entries


@pytest.mark.parametrize(
    "entry",
    [
        {"case": "x", "status": "skip"},
        {"case": "x", "status": "maybe", "reason": "r"},
        {"status": "xfail", "reason": "r", "tolerance": {}},
    ],
    ids=["no-reason", "unknown-status", "tolerance-on-xfail"],
)
def test_malformed_expectation_rejected(tmp_path, entry):
    with pytest.raises(ValueError, match="entry 0"):
        _expectations(tmp_path, [entry])


# ------------------------------------------------------ plugin and CLI


def test_pytest_plugin_ids_select_one_case():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(SPEC.root), "--backend", "reference", "-q", "--collect-only",
         "-k", "reference-half-mask-float16", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=SPEC.root.parent, check=False,
    )  # fmt: skip
    ids = [line.split("::")[-1] for line in result.stdout.splitlines() if "::" in line]
    assert ids and all(i.startswith("reference-half-mask-float16-") for i in ids), result.stdout
    assert len(ids) == len(SPEC.case("half-mask").expect)


def test_cli_help_explains_itself():
    result = subprocess.run(
        [sys.executable, "-m", "maskbn_conformance", "--help"], capture_output=True, text=True, check=True
    )
    for word in ("lint", "report", "run", "list", "maskbn.backends"):
        assert word in result.stdout


def test_cli_report_writes_matrix(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maskbn_conformance", "--spec", str(SPEC.root), "report", "--backend", "reference", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| `half-mask` | pass" in (tmp_path / "conformance.md").read_text()
    assert '"failed"' not in (tmp_path / "conformance.json").read_text()


def test_cli_report_fails_on_a_missing_backend(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maskbn_conformance", "--spec", str(SPEC.root), "report", "--backend", "nonexistent"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "backend 'nonexistent' is not installed" in result.stdout


def test_report_fails_when_pytest_stops_early(monkeypatch, capsys):
    """A pytest that stops (usage or internal error, interrupt) leaves no verdict: the report fails."""
    from maskbn_conformance import report

    monkeypatch.setattr(report.pytest, "main", lambda *args, **kwargs: pytest.ExitCode.USAGE_ERROR)
    assert report.run_report(SPEC, SPEC.cases, ["reference"], fuzz_examples=0, fuzz_long_run=0) == 1
    assert "pytest stopped (USAGE_ERROR): the report is incomplete" in capsys.readouterr().out


def test_form_axis_gives_each_form_its_own_ids():
    from broken_backends import CompiledFormOffByOne

    backend = CompiledFormOffByOne()
    loaded = LoadedBackend(backend.name, backend, [])
    checks = [
        c for c in checks_for(SPEC, backend.name, forms=backend.forms) if c.invariant == "output_matches_reference"
    ]
    default = [c for c in checks if c.form is None and c.case.id == "half-mask"]
    compiled = [c for c in checks if c.form == "compiled" and c.case.id == "half-mask"]
    assert default and compiled, "half-mask runs in every form"
    assert compiled[0].id.startswith(f"{backend.name}-compiled-half-mask-")
    assert default[0].id.startswith(f"{backend.name}-half-mask-")  # the default form's ids do not change
    # only cases marked every_form get the other forms
    assert {c.case.id for c in checks if c.form} == {c.id for c in SPEC.cases if c.raw.get("every_form")} & {
        c.case.id for c in checks
    }
    assert run_check(default[0], loaded, SPEC, Runs()).status == "passed"
    outcome = run_check(compiled[0], loaded, SPEC, Runs())
    assert outcome.status == "failed" and "compiled-half-mask" in outcome.message


def test_expectations_can_name_a_form(tmp_path):
    from broken_backends import CompiledFormOffByOne

    path = tmp_path / "expectations.yaml"
    path.write_text(
        "- {case: half-mask, invariant: output_matches_reference, form: compiled, status: xfail, reason: broken}\n"
    )
    backend = CompiledFormOffByOne()
    loaded = LoadedBackend(backend.name, backend, load_expectations(path))
    checks = [c for c in checks_for(SPEC, backend.name, forms=backend.forms) if c.case.id == "half-mask"]
    by_form = {c.form: c for c in checks if c.invariant == "output_matches_reference" and c.dtype == "float32"}
    assert run_check(by_form["compiled"], loaded, SPEC, Runs()).status == "xfailed"
    assert run_check(by_form[None], loaded, SPEC, Runs()).status == "passed"


def test_process_variants_join_the_report_as_columns(monkeypatch, tmp_path, capsys):
    """A backend's process variant (Keras on another backend) is a child report of that backend
    alone, under the variant's environment; its columns join the matrix and the JSON after the
    backend's own. The child imports the class unpatched, so it adds no variant of its own."""
    from maskbn_conformance import report
    from maskbn_conformance.reference_adapter import ReferenceBackend

    variants = {"again": {"MASKBN_VARIANT_TEST": "1"}, "twice": {"MASKBN_VARIANT_TEST": "2"}}
    monkeypatch.setattr(ReferenceBackend, "process_variants", lambda self: variants)
    assert report.run_report(SPEC, SPEC.cases, ["reference"], str(tmp_path), fuzz_examples=0, fuzz_long_run=0) == 0
    out, err = capsys.readouterr()
    assert "reference-again: backend reference in a process of its own (MASKBN_VARIANT_TEST=1)" in err
    assert "| case | reference | reference-again | reference-twice |" in out
    backends = json.loads((tmp_path / "conformance.json").read_text())["backends"]
    assert list(backends) == ["reference", "reference-again", "reference-twice"]
    assert backends["reference-again"]["cases"] == backends["reference"]["cases"]
    assert backends["reference-again"]["cases"]["half-mask"]["passed"] > 0


def test_a_process_variant_without_results_fails_the_report(monkeypatch):
    from maskbn_conformance import report

    collector = report.Collector()
    collector.names = ["reference"]
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    report._run_variant(collector, SPEC, "reference", "broken", {}, [])
    assert collector.names == ["reference", "reference-broken"]
    assert "exited 1 with no results" in collector.results["reference-broken"].error
    assert collector.totals["error"] == 1


def test_a_process_variant_has_no_portable_row_or_column():
    """The portable checks run between the backends of the report's own process."""
    from collections import Counter

    from maskbn_conformance import report

    collector = report.Collector()
    collector.names = ["reference", "reference-again", "other"]
    collector.variants = {"reference": ["reference-again"]}
    passed = {"half-mask": Counter(passed=1)}
    collector.results = {n: report.BackendResults(columns={n: passed}) for n in collector.names}
    collector.cross = {("reference", "other"): Counter(passed=3), ("other", "reference"): Counter(passed=3)}
    portable = report._matrix(collector, [SPEC.case("half-mask")]).split("Portable state")[1]
    assert "| from \\ to | reference | other |" in portable
    assert "reference-again" not in portable
