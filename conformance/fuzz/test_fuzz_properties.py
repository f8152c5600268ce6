"""Property-based and long-run tests of the selected backend(s), through the adapter.

Thin wrappers: the logic is in maskbn_conformance.fuzz (the CLI report runs it
too). ``pytest conformance/fuzz --backend torch`` gives ``test_differential[torch]``
and so on; a falsified property prints Hypothesis's falsifying example, the
failure (step, quantity, worst element, tolerance) and a repro snippet.
"""

from __future__ import annotations

import pytest

from maskbn_conformance import fuzz
from maskbn_conformance.adapter import Unsupported
from maskbn_conformance.pytest_plugin import settle_known_bugs


def _property(prop: str, loaded, hypothesis_settings, fuzz_results: list, **options) -> None:
    result = fuzz.PropertyResult(loaded.name, prop)
    fuzz_results.append(result)
    try:
        fuzz.run_property(prop, loaded, hypothesis_settings, result=result, **options)
    except Unsupported as exc:
        pytest.skip(str(exc))
    print(result.summary())


def test_differential(maskbn_backend, fuzz_settings, fuzz_results):
    """Outputs, moving stats and gradients of random layers and call sequences vs the float64 reference."""
    _property("differential", maskbn_backend, fuzz_settings, fuzz_results)


def test_differential_in_form(maskbn_backend_form, form_settings, fuzz_results):
    """The differential property in each further form the adapter runs (compiled, graph), half at scale."""
    loaded, form = maskbn_backend_form
    _property("differential", loaded, form_settings, fuzz_results, form=form, scale_share=fuzz.FORM_SCALE_SHARE)


def test_garbage(maskbn_backend, fuzz_settings, fuzz_results):
    """NaN, Inf, 1e38, denormals or random bits in padded rows change no real output, stat or gradient bit."""
    _property("garbage", maskbn_backend, fuzz_settings, fuzz_results)


def test_bad_input(maskbn_backend, fuzz_settings, fuzz_results):
    """Wrong masks, channel counts, dtypes, empty batches and axes raise a clear error and change nothing."""
    _property("bad-input", maskbn_backend, fuzz_settings, fuzz_results)


def test_long_run(maskbn_backend, fuzz_results):
    """Thousands of training calls (empty, single-row, huge-offset batches) keep the moving stats finite and right."""
    result = fuzz.PropertyResult(maskbn_backend.name, "long-run")
    fuzz_results.append(result)
    try:
        fuzz.long_run(maskbn_backend, result=result)
    except Unsupported as exc:
        pytest.skip(str(exc))
    print(result.summary())


def test_known_bugs(maskbn_backend, fuzz_settings, fuzz_results):
    """Strict xfail: every known bug in the backend's expectations (``input: <kind>``) must still falsify its property
    (a fix makes this test fail, asking to remove the entry); a visible skip when there is none."""
    results = fuzz.check_known_bugs(maskbn_backend, fuzz_settings)
    fuzz_results.extend(results)
    settle_known_bugs(maskbn_backend, results)
