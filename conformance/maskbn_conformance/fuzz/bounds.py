"""Rounding-error bounds a fuzz example adds to the spec's tolerances: the
conditioning of random data that shared tolerances cannot know."""

from __future__ import annotations

import numpy as np

from .. import reference as ref
from ..invariants import CheckFailed, affine_gradients, assert_close

#: Unit roundoff of the arithmetic a backend runs in: float16 / bfloat16 inputs
#: are reduced and normalized in float32 (the contract), so they share float32's.
UNIT_ROUNDOFF = {"float16": 2.0**-24, "bfloat16": 2.0**-24, "float32": 2.0**-24, "float64": 2.0**-53}
#: largest finite value of each output dtype
MAX_FINITE = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38,
              "float64": 1.7976931348623157e308}  # fmt: skip
#: spacing of each output dtype at zero (its smallest subnormal): the spec's
#: relative tolerances say nothing about outputs this small, so one quantum is
#: added to every absolute allowance
QUANTUM = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 5e-324}
#: the contract's precision promise covers |mean| / std up to this (DESIGN.md section 1)
CONTRACT_RATIO = 1e6


class StepBounds:
    """What a correct float32 (or float64) implementation may differ from the
    float64 reference by in one call, per channel, beyond the spec's shared
    tolerances (which are written for well-conditioned data).

    Notation: u is the unit roundoff of the compute dtype (2^-24: float16 and
    bfloat16 are reduced in float32), n the number of real rows (at most 48
    here), g_n = n u / (1 - n u) the worst-case error factor of recursive
    summation (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
    eq. 4.4), A = max |x| over the real rows, m and v the batch mean and
    population variance, s = 1 / sqrt(v + eps).

    - batch mean: |dm| <= g_n A + u |m| (sum, then one division). For data with
      |mean| >> std this is the float32 ulp of the mean that the issue points
      at: at |mean| / std = 1e6 it is about 0.06 std, so a float32 output can
      only be trusted to ~ g_n * |mean| / std normalized units there.
    - batch variance: the contract promises relative error <= 1e-5 (the spec's
      float32 stats rtol) for |mean| / std <= 1e6; below that std (a few rows
      rounded to nearly equal values) the same absolute error as at the
      boundary is allowed: |dv| <= rtol_stats * max(v, (1e-6 A)^2). With
      n <= 48, g_n < 3e-6 stays below that promise.
    - s: relative error rho = |dv| / (2 (v + eps)) + 3u (add, sqrt, divide).
    - y = gamma (x - m) s + beta, per element:
      |dy| <= |gamma| s (|dm| + 2u (|x| + |m|)) + |gamma| |x - m| s rho
      + 2u (|y| + |beta|) + one quantum of the output dtype at zero.
      The 2u (|x| + |m|) term is the rounding of x - m (or of x * a + b with
      a = gamma s, b = beta - m a: the cancellation error is the same order).
    - inference calls and empty training calls use the layer's own moving
      stats (state before the call, exact): dm = dv = 0.
    - gradients (loss sum(y * dy) over real rows), with xhat's absolute error
      e_x = s (|dm| + 2u (A + |m|)) + max|xhat| rho, S1 = sum |dy|,
      S2 = sum |dy xhat|:
      |d dbeta| <= g_n S1; |d dgamma| <= e_x S1 + (g_n + u) S2;
      |d dx| <= |gamma| s (|d dbeta| + e_x |dgamma| + max|xhat| |d dgamma|) / n
      + 3u |gamma| s (max|dy| + (|dbeta| + max|xhat| |dgamma|) / n)
      + max|dx| rho + one quantum.
    - moving stats (float32 state, updated every training call) are compared
      with the spec's stats tolerance, whose rtol (1e-5) already is the
      contract's relative accuracy; the allowance adds only what that rtol
      cannot see, carried from call to call:
      e <- decay e + (1 - decay) d + 4u (|old| + |batch stat|), with
      d = g_n A for the mean (summation error relative to max |x|, not to a
      mean that may be near 0) and d = rtol_stats (1e-6 A)^2 for the variance
      (the floor above). The rounding term 4u (|old| + |batch stat|) is
      relative to the operands, not to the result: The rounding term is relative to the
      an update written as old + w (batch - old) (torch's lerp, w = 1 - decay rounded to float32)
      rounds w (batch - old), which can be far larger than the new value when
      the two nearly cancel (decay 0.002, old var 100, batch var 0: 6e-6
      absolute on a result of 0.195).

    Each bound is an allowance added per channel to the spec tolerance (whose
    atol stays relative to the whole compared array); it is ~1e-6 relative
    for well-conditioned data and grows only with |mean| / std, so the spec's
    tolerances keep their meaning and are never loosened for everyone.
    """

    def __init__(self, rows, realf, state, cfg: ref.RefConfig, training: bool, dtype: str, stats_rtol: float):
        self.u = u = UNIT_ROUNDOFF[dtype]
        self.quantum = QUANTUM[dtype]
        channels = rows.shape[1]
        self.n = n = int(realf.sum())
        self.gamma = np.abs(state["gamma"]) if cfg.scale else np.ones(channels)
        self.beta = np.abs(state["beta"]) if cfg.center else np.zeros(channels)
        self.g_n = n * u / (1 - n * u)
        if training and n:
            real_rows = rows[realf]
            m, v, _ = ref.batch_moments(rows, realf)
            self.A = np.max(np.abs(real_rows), axis=0)
            self.dm = self.g_n * self.A + u * np.abs(m)
            self.dv = stats_rtol * np.maximum(v, (self.A / CONTRACT_RATIO) ** 2)
            # the parts the spec's stats rtol does not already cover (moving stats check)
            self.stats_extra = {
                "moving_mean": self.g_n * self.A,
                "moving_var": stats_rtol * (self.A / CONTRACT_RATIO) ** 2,
            }
            self.batch = {"moving_mean": m, "moving_var": v}
        else:
            m, v = state["moving_mean"], state["moving_var"]
            self.stats_extra = {"moving_mean": np.zeros(channels), "moving_var": np.zeros(channels)}
            self.A = np.zeros(channels)
            self.dm = np.zeros(channels)
            self.dv = np.zeros(channels)
            self.batch = None
        self.m, self.v = m, v
        self.s = 1.0 / np.sqrt(v + cfg.epsilon)
        self.rho = self.dv / (2 * (v + cfg.epsilon)) + 3 * u

    def output(self, x_rows, y_rows, where) -> np.ndarray:
        """Allowance per channel for the outputs at ``where`` (rows, C)."""
        u = self.u
        with np.errstate(invalid="ignore", over="ignore"):
            ax = np.where(where, np.abs(x_rows), 0).max(axis=0)
            dx = np.where(where, np.abs(x_rows - self.m), 0).max(axis=0)
            ay = np.where(where, np.abs(y_rows), 0).max(axis=0)
        g, s = self.gamma, self.s
        return (
            g * s * (self.dm + 2 * u * (ax + np.abs(self.m)))
            + g * dx * s * self.rho
            + 2 * u * (ay + self.beta)
            + self.quantum
        )

    def gradients(self, xhat_rows, dy_rows, realf, dx_ref, dgamma, dbeta):
        """Allowances per channel for (dx, dgamma, dbeta)."""
        u, n, g, s = self.u, max(self.n, 1), self.gamma, self.s
        xh, dy = xhat_rows[realf], dy_rows[realf]
        s1 = np.abs(dy).sum(axis=0)
        s2 = np.abs(dy * xh).sum(axis=0)
        xh_max = np.abs(xh).max(axis=0) if len(xh) else np.zeros_like(s)
        dy_max = np.abs(dy).max(axis=0) if len(dy) else np.zeros_like(s)
        e_x = s * (self.dm + 2 * u * (self.A + np.abs(self.m))) + xh_max * self.rho
        d_dbeta = self.g_n * s1
        d_dgamma = e_x * s1 + (self.g_n + u) * s2
        d_dx = (
            g * s * (d_dbeta + e_x * np.abs(dgamma) + xh_max * d_dgamma) / n
            + 3 * u * g * s * (dy_max + (np.abs(dbeta) + xh_max * np.abs(dgamma)) / n)
            + np.abs(dx_ref[realf]).max(axis=0, initial=0.0) * self.rho
            + self.quantum
        )
        return d_dx, d_dgamma + self.quantum, d_dbeta + self.quantum


def assert_close_channels(actual, expected, tol, extra, what: str, where=None) -> None:
    """``invariants.assert_close`` of (rows, C) arrays, with an absolute
    allowance ``extra[c]`` added per channel: channel c passes where
    |actual - expected| <= atol * scale + extra[c] + rtol * |expected|, scale
    being the largest |expected| of the whole compared array, as in the spec."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise CheckFailed(f"{what}: shape {actual.shape}, expected {expected.shape}")
    if expected.ndim == 1:
        actual, expected = actual[None, :], expected[None, :]
        where = None if where is None else where[None, :]
    if where is None:
        where = np.ones(expected.shape, dtype=bool)
    if not where.any():
        return
    scale = max(float(np.max(np.abs(expected[where]))), 1e-30)
    for c in range(expected.shape[1]):
        w = where[:, c]
        if not w.any():
            continue
        scale_c = max(float(np.max(np.abs(expected[w, c]))), 1e-30)
        atol_c = (tol.get("atol", 0.0) * scale + float(extra[c])) / scale_c
        assert_close(
            actual[:, c], expected[:, c], {"atol": atol_c, "rtol": tol.get("rtol", 0.0)},
            f"{what}, channel {c} (spec tolerance {tol} + derived allowance {float(extra[c]):.3g})", w,
        )  # fmt: skip


def compare_outputs(record, y_ref, rows, realf, bounds: StepBounds, cfg, tol, dtype: str, label: str) -> None:
    y = ref.to_rows(record.output.value, cfg.axis)
    y_want = ref.to_rows(y_ref, cfg.axis)
    # an expected value beyond half the dtype's range may round to +-Inf: those
    # elements are left out (they only occur in padded rows, and in float16
    # inference with moving stats far from the data)
    fits = np.abs(y_want) <= 0.5 * MAX_FINITE[dtype]
    sets = [("real rows", realf[:, None] & fits)]
    if cfg.padded_output == "normalize":  # "zero": padded_rows_zero checks them exactly
        sets.append(("padded rows", ~realf[:, None] & fits))
    for name, where in sets:
        extra = bounds.output(rows, y_want, where)
        assert_close_channels(y, y_want, tol, extra, f"{label} y, {name}", where)


def compare_stats(got: dict, want: dict, tol, bound: dict, label: str) -> None:
    for key in ("moving_mean", "moving_var"):
        if key not in got:
            raise CheckFailed(f"{label}: the layer has no {key}")
        assert_close_channels(got[key], want[key], tol, bound[key], f"{label} {key}")


def compare_gradients(record, aux, realf, bounds: StepBounds, cfg, tol, label: str) -> None:
    dx_ref, dgamma, dbeta = ref.backward(record.inputs.dy64, aux, cfg)
    dx_want = ref.to_rows(dx_ref, cfg.axis)
    dy_rows = ref.to_rows(record.inputs.dy64, cfg.axis)
    e_dx, e_dgamma, e_dbeta = bounds.gradients(aux["xhat"], dy_rows, realf, dx_want, dgamma, dbeta)
    dx = ref.to_rows(record.grads.x.value, cfg.axis)
    real = np.broadcast_to(realf[:, None], dx_want.shape)
    assert_close_channels(dx, dx_want, tol, e_dx, f"{label} dx, real rows", real)
    extras = {"gamma": e_dgamma, "beta": e_dbeta}
    for name, got, want in affine_gradients(cfg, record.grads, dgamma, dbeta, label):
        assert_close_channels(got, want, tol, extras[name], f"{label} d{name}")
