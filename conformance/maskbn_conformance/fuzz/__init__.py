"""Property-based and long-run tests of any backend, through the adapter protocol.

Every backend, present or future, gets these for free: they only speak the
adapter protocol (``maskbn_conformance.adapter``) and reuse the harness's
machinery. A fuzz example is a synthetic spec case (the ``spec/cases`` format)
plus a run dtype, so inputs are built by ``runner``/``inputs`` exactly as for
the spec (x generated in float64, rounded to the run dtype with
``dtypes.round_to``, both the backend and the float64 reference seeing the
rounded values), traces come from ``runner.run_backend`` and comparisons go
through ``invariants.assert_close`` / ``assert_identical`` and the named
invariants themselves.

Properties (``PROPERTIES``):

- ``differential``: random rank 2..5, channel axis, masks (empty, one real row,
  all real, random, prefixes), decay, epsilon, per-channel offsets up to 1e6
  and scales 1e-6..1e4, float32/float16/bfloat16, several train / eval /
  backward calls in a row: outputs, moving stats and gradients against the
  float64 reference within the spec's tolerances plus the rounding bounds
  derived in ``StepBounds`` (conditioning the shared tolerances cannot know).
- ``garbage``: NaN, +-Inf, 1e38, denormals or random bit patterns in the padded
  rows give bit-identical real outputs, moving stats and real-row gradients as
  zero padding (``invariants.garbage_padding_isolated``).
- ``bad-input``: wrong mask shapes and ranks, float masks, masks over the
  channel axis, a channel count the layer was not built for, integer x, a
  a channel axis out of range: a ValueError / TypeError whose
  message names the offending shape or dtype, and the layer's state
  bit-identical afterwards (``raises_clear_error``, ``state_unchanged``).
- ``long_run``: thousands of training calls alternating empty, single-row and
  huge-offset batches keep the moving stats finite and within the reference's
  tolerance (not Hypothesis-driven: one long deterministic sequence).

A failure names the property, backend, the example (dtype, shape, axis, masks,
seeds) and carries a repro: a Python snippet that rebuilds the inputs and calls
the adapter step by step, and the example as a spec case to pin it.

The pytest wrappers live in ``conformance/fuzz``; the CLI report runs a bounded
pass (``python -m maskbn_conformance report --fuzz-examples N``).

Modules: ``examples`` (the example model), ``strategies`` (Hypothesis),
``bounds`` (derived rounding bounds), ``properties`` (the checks and their
runner, known bugs), ``longrun``. This package re-exports what the test
wrappers, the CLI and a failure's repro snippet use.
"""

from .examples import Example, default_spec
from .longrun import long_run, long_run_steps
from .properties import (
    CHECKS,
    PROPERTIES,
    PropertyResult,
    check_bad_input,
    check_differential,
    check_garbage,
    check_known_bugs,
    ci_settings,
    known_bugs,
    pooled,
    repro,
    run_property,
)
from .strategies import (
    BAD_INPUT_KINDS,
    FORM_SCALE_SHARE,
    FUZZ_DTYPES,
    SCALE_INVARIANTS,
    SCALE_SHARE,
    SHAPES,
    bad_input_examples,
    differential_examples,
    garbage_examples,
)

__all__ = [
    "BAD_INPUT_KINDS",
    "CHECKS",
    "FORM_SCALE_SHARE",
    "FUZZ_DTYPES",
    "PROPERTIES",
    "SCALE_INVARIANTS",
    "SCALE_SHARE",
    "SHAPES",
    "Example",
    "PropertyResult",
    "bad_input_examples",
    "check_bad_input",
    "check_differential",
    "check_garbage",
    "check_known_bugs",
    "ci_settings",
    "default_spec",
    "differential_examples",
    "garbage_examples",
    "known_bugs",
    "long_run",
    "long_run_steps",
    "pooled",
    "repro",
    "run_property",
]
