"""The long run: thousands of float32 training calls cycling through an empty, a
one-row and a huge-offset batch against the float64 reference."""

from __future__ import annotations

import os
import time
from functools import partial

import numpy as np

from .. import reference as ref
from ..adapter import Backend, LayerConfig
from ..harness import LoadedBackend
from ..invariants import CheckFailed
from ..spec import Spec
from .bounds import UNIT_ROUNDOFF, StepBounds, compare_stats
from .examples import default_spec
from .properties import ExampleChecks, PropertyResult


def long_run_steps(backend: Backend) -> int:
    """The long run's training calls: the backend's ``long_run_steps`` (10 000
    unless it says otherwise; measured on the 2-core CI machine: torch 0.7 ms,
    JAX 1.2 ms, Keras 3 on TensorFlow 7-12 ms per call and state read), or
    MASKBN_FUZZ_LONG_RUN_STEPS for every backend. The number run is printed."""
    env = os.environ.get("MASKBN_FUZZ_LONG_RUN_STEPS")
    return int(env) if env else backend.long_run_steps


LONG_RUN_SHAPE = (2, 6, 3)
#: the huge-offset batch: |mean| / std = 1e6 on channels 0 and 1 (the contract's limit)
LONG_RUN_HUGE = (np.array([1.0e6, -2.0e5, 3.0]), np.array([1.0, 0.2, 1.0e-3]))
LONG_RUN_DECAY = 0.99


def long_run(loaded: LoadedBackend, steps: int | None = None, spec: Spec | None = None, seed: int = 0,
             result: PropertyResult | None = None) -> PropertyResult:  # fmt: skip
    """``steps`` float32 training calls cycling through an empty batch, a batch
    with one real row and a huge-offset batch, on a (2, 6, 3) channels-last
    layer with decay 0.99: after every call the moving stats must be finite and
    match the float64 reference run alongside (spec stats tolerance plus the
    accumulated float32 rounding of the moving average, see StepBounds), and
    the outputs must be finite."""
    spec = spec or default_spec()
    steps = long_run_steps(loaded.backend) if steps is None else steps
    result = result or PropertyResult(loaded.name, "long-run")
    dtype = "float32"
    checks = ExampleChecks(loaded, "fuzz-long-run", dtype, spec, result)
    stats_tol = checks.tol("stats", "moving_stats_match_reference")
    channels = LONG_RUN_SHAPE[-1]
    config = LayerConfig(channels, -1, 3, LONG_RUN_DECAY, 1e-3, True, True, "normalize", dtype)
    cfg = ref.RefConfig(2, config.decay, config.epsilon, True, True, "normalize")
    layer = loaded.backend.layer(config)
    state = {k: v.astype(np.float32).astype(np.float64) for k, v in ref.initial_state(channels).items()}
    layer.set_state({k: v.astype(np.float32) for k, v in state.items()})
    err = {"moving_mean": np.zeros(channels), "moving_var": np.zeros(channels)}
    rng = np.random.default_rng(seed)
    mask_shape = LONG_RUN_SHAPE[:-1]
    u = UNIT_ROUNDOFF[dtype]
    started = time.perf_counter()
    kinds = ("empty", "single-row", "huge-offset")
    try:
        for step in range(steps):
            kind = kinds[step % 3]
            z = rng.standard_normal(LONG_RUN_SHAPE)
            real = np.zeros(mask_shape, dtype=bool)
            if kind == "empty":
                x = z
            elif kind == "single-row":
                real.reshape(-1)[rng.integers(real.size)] = True
                x = 5.0 + 2.0 * z
            else:
                real = rng.random(mask_shape) < 0.5
                real.reshape(-1)[rng.integers(real.size)] = True
                x = LONG_RUN_HUGE[0] + LONG_RUN_HUGE[1] * z
            x32 = x.astype(np.float32)
            x64 = x32.astype(np.float64)
            out = layer.forward(x32, dtype, real, training=True)
            result.steps = step + 1
            rows, realf = ref.to_rows(x64, 2), real.reshape(-1)
            bounds = StepBounds(rows, realf, state, cfg, True, dtype, stats_tol["rtol"])
            _, new_state, _ = ref.forward(x64, real, state, cfg, True)
            if bounds.batch is not None:
                for key in err:
                    err[key] = (
                        cfg.decay * err[key] + (1 - cfg.decay) * bounds.stats_extra[key]
                        + 4 * u * (np.abs(state[key]) + np.abs(bounds.batch[key]))
                    )  # fmt: skip
            state = new_state
            got = layer.get_state()
            label = f"long run, training call {step} of {steps} ({kind} batch, {int(realf.sum())} real rows)"
            if not np.isfinite(out.value).all():
                index = tuple(int(i) for i in np.argwhere(~np.isfinite(out.value))[0])
                raise CheckFailed(f"{label}: y{index} = {out.value[index]!r} is not finite")
            for key in ("moving_mean", "moving_var"):
                if not np.isfinite(got[key]).all():
                    raise CheckFailed(f"{label}: {key} is not finite: {got[key]!r}")

            checks.run("moving_stats_match_reference", partial(compare_stats, got, state, stats_tol, dict(err), label))
    except CheckFailed as exc:
        result.failure = (
            f"fuzz long run falsified on backend {loaded.name}:\n{exc}\n"
            f"repro (python): from maskbn_conformance import fuzz; from maskbn_conformance.harness import "
            f"load_backend; fuzz.long_run(load_backend({loaded.name!r}), steps={steps}, seed={seed})"
        )
        raise CheckFailed(result.failure) from None
    finally:
        result.seconds = time.perf_counter() - started
    return result
