"""Hypothesis profiles for the fuzz properties, and a summary of what they tried.

HYPOTHESIS_PROFILE selects the profile (tox sets "ci"; default "ci"):

- ci: derandomized (the same inputs every run, on every backend), a bounded
  number of examples per property so each backend's fuzz folder stays within
  about 3 minutes on 2 slow cores, no deadline (TensorFlow eager calls and JAX
  compilation are slow and uneven), the reproduction blob printed on failure.
- dev: random, ten times the examples, failures saved to .hypothesis/.

The profiles are passed to the properties explicitly and kept out of
Hypothesis's global registry: tox runs this folder in one session with
impl_torch/tests, whose conftest registers and loads its own "ci" / "dev", and
neither suite may change the other's settings.

A profile's max_examples is scaled by the backend's ``fuzz_example_scale`` (an
adapter attribute), because one example costs about 1 ms on torch and 0.3-1.5 s
on JAX (which compiles per layer and shape); the summary at the end prints the
inputs each property tried.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from maskbn_conformance.fuzz import ci_settings

#: examples per property in the ci profile, before the backend's fuzz_example_scale
CI_EXAMPLES = 30
#: examples of the differential property in each non-default form (torch compile,
#: Keras function and xla): every example compiles afresh (seconds each on 2 cores),
#: so few, and half of them at scale (fuzz.FORM_SCALE_SHARE), where compiled forms lose accuracy
FORM_EXAMPLES = 6
PROFILES = {
    "ci": ci_settings(CI_EXAMPLES),
    "dev": settings(
        settings.get_profile("default"),
        max_examples=10 * CI_EXAMPLES,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    ),
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in PROFILES:
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={PROFILE!r}: conformance/fuzz knows the profiles {sorted(PROFILES)}")

_RESULTS: list = []


@pytest.fixture
def fuzz_results() -> list:
    """Every PropertyResult of the session, for the terminal summary."""
    return _RESULTS


@pytest.fixture
def fuzz_settings(maskbn_backend) -> settings:
    """The selected profile with max_examples scaled for this backend."""
    base = PROFILES[PROFILE]
    return settings(base, max_examples=max(1, round(base.max_examples * maskbn_backend.backend.fuzz_example_scale)))


def pytest_terminal_summary(terminalreporter, config) -> None:
    if not _RESULTS:
        return
    from maskbn_conformance.pytest_plugin import usable_backends

    scales = {b.name: b.backend.fuzz_example_scale for b in usable_backends(config)}
    terminalreporter.section(
        f"maskbn fuzz (profile {PROFILE!r}: {PROFILES[PROFILE].max_examples} examples per property, "
        f"scaled per backend by its fuzz_example_scale: {scales})"
    )
    for result in _RESULTS:
        terminalreporter.write_line(result.summary())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``maskbn_backend_form``: (LoadedBackend, form) for every non-default form of
    every selected backend, ids like ``torch-compile``."""
    if "maskbn_backend_form" in metafunc.fixturenames:
        from maskbn_conformance.pytest_plugin import usable_backends

        pairs = [(b, form) for b in usable_backends(metafunc.config) for form in b.backend.forms[1:]]
        metafunc.parametrize("maskbn_backend_form", pairs, ids=[f"{b.name}-{form}" for b, form in pairs])


@pytest.fixture
def form_settings() -> settings:
    """The selected profile with FORM_EXAMPLES examples (ten times as many in dev)."""
    return settings(PROFILES[PROFILE], max_examples=FORM_EXAMPLES * (10 if PROFILE == "dev" else 1))
