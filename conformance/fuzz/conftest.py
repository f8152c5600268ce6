"""Hypothesis profiles for the fuzz properties, and a summary of what they tried.

HYPOTHESIS_PROFILE selects the profile (tox sets "ci"; default "ci"):

- ci: derandomized (the same inputs every run, on every backend), a bounded
  number of examples per property so each backend's fuzz folder stays within
  about 3 minutes on 2 slow cores, no deadline (TensorFlow eager calls and JAX
  compilation are slow and uneven), the reproduction blob printed on failure.
- dev: random, ten times the examples, failures saved to .hypothesis/.

A profile's max_examples is scaled per backend by EXAMPLE_SCALE, because one
example costs about 1 ms on torch and 1-2 s on JAX (which compiles per layer
and shape); the summary at the end prints the inputs each property tried.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from maskbn_conformance.fuzz import ci_settings

#: examples per property in the ci profile, before EXAMPLE_SCALE
CI_EXAMPLES = 30
#: per-backend multiplier of the profile's max_examples (unknown backends: 1),
#: chosen from measured per-example costs so that each backend's fuzz folder
#: takes about 1-3 minutes on the 2-core CI machine (conformance/fuzz/README.md)
EXAMPLE_SCALE = {"reference": 3, "torch": 8, "tf": 2, "jax": 1}

settings.register_profile("ci", ci_settings(CI_EXAMPLES))
settings.register_profile(
    "dev",
    max_examples=10 * CI_EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_RESULTS: list = []


@pytest.fixture
def fuzz_results() -> list:
    """Every PropertyResult of the session, for the terminal summary."""
    return _RESULTS


@pytest.fixture
def fuzz_settings(maskbn_backend) -> settings:
    """The active profile with max_examples scaled for this backend."""
    base = settings()
    return settings(base, max_examples=max(1, round(base.max_examples * EXAMPLE_SCALE.get(maskbn_backend.name, 1))))


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS:
        return
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    terminalreporter.section(
        f"maskbn fuzz (Hypothesis profile {profile!r}: {settings().max_examples} examples per property, "
        f"scaled per backend by {EXAMPLE_SCALE})"
    )
    for result in _RESULTS:
        terminalreporter.write_line(result.summary())
