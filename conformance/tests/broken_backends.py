"""Deliberately wrong masked batch norms, each with one realistic bug.

The meta tests run them through the harness to prove every invariant can
fail: a check that nothing can fail proves nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from maskbn_conformance import reference as ref
from maskbn_conformance.adapter import Gradients, LayerConfig, Output
from maskbn_conformance.dtypes import round_to
from maskbn_conformance.reference_adapter import ReferenceBackend, ReferenceLayer, ReferenceShardedLayer


class MultipliesByMask(ReferenceLayer):
    """Masks with x * mask: NaN * 0 = NaN leaks from padded rows into the sums."""

    def _run(self, x, x_dtype, mask, training):
        axis, real = self._check(x, x_dtype, mask)
        with np.errstate(invalid="ignore", over="ignore"):
            masked = x.astype(np.float64) * real
            # 0 for finite padding, NaN as soon as one padded value is NaN or Inf
            poison = (ref.to_rows(masked, axis) * 0.0).sum(axis=0)
        axis, y, aux = super()._run(x, x_dtype, mask, training)
        if training:
            self.state["moving_mean"] = (self.state["moving_mean"] + poison).astype(self._store)
        return axis, y + poison.reshape(_channel_view(x, axis)), aux


class UnmaskedStats(ReferenceLayer):
    """Ignores the mask for the statistics: padding zeros drag the mean."""

    def _run(self, x, x_dtype, mask, training):
        axis, real = self._check(x, x_dtype, mask)
        every = np.ones_like(real)
        y, new_state, aux = ref.forward(x.astype(np.float64), every, self._full_state(), self._cfg(axis), training)
        self.state = {k: new_state[k].astype(self._store) for k in self.state}
        return axis, y, aux


class MeanOffAtTheSpreadBound(ReferenceLayer):
    """Moves the moving mean by 3 x the stats tolerance at its loosest (1e-7 of the
    batch's spread, plus 1e-5 relative): the spread term must still catch it."""

    def _run(self, x, x_dtype, mask, training):
        axis, real = self._check(x, x_dtype, mask)
        out = super()._run(x, x_dtype, mask, training)
        if training and real.any():
            _, var, _ = ref.batch_moments(ref.to_rows(x.astype(np.float64), axis), ref.to_rows(real, axis))
            mean = self.state["moving_mean"].astype(np.float64)
            self.state["moving_mean"] = (mean + 3e-7 * np.sqrt(var.max()) + 3e-5 * np.abs(mean)).astype(self._store)
        return out


class EvalUpdatesStats(ReferenceLayer):
    """Updates the moving stats in inference too."""

    def forward(self, x, x_dtype, mask, training):
        return super().forward(x, x_dtype, mask, True)


class OffsetOutput(ReferenceLayer):
    """Adds 1e-2 to every output: plainly wrong numbers."""

    def forward(self, x, x_dtype, mask, training):
        out = super().forward(x, x_dtype, mask, training)
        return Output(round_to(out.value + 1e-2, x_dtype), x_dtype)

    def forward_backward(self, x, x_dtype, mask, dy):
        out, grads = super().forward_backward(x, x_dtype, mask, dy)
        return Output(round_to(out.value + 1e-2, x_dtype), x_dtype), grads


class AlwaysFloat32Output(ReferenceLayer):
    """Returns float32 whatever the input dtype."""

    def forward(self, x, x_dtype, mask, training):
        return Output(super().forward(x, x_dtype, mask, training).value, "float32")


class EmptyMaskDividesByZero(ReferenceLayer):
    """Computes sum / n with n = 0 on an empty mask and normalizes with NaN."""

    def _run(self, x, x_dtype, mask, training):
        axis, real = self._check(x, x_dtype, mask)
        if training and not real.any():
            nan = np.full(self.config.channels, np.nan)
            state = dict(self._full_state(), moving_mean=nan, moving_var=nan)
            y, _, aux = ref.forward(x.astype(np.float64), real, state, self._cfg(axis), False)
            return axis, y, aux
        return super()._run(x, x_dtype, mask, training)


class IgnoresPaddedOutputZero(ReferenceLayer):
    """Forgets padded_output='zero'."""

    def _cfg(self, axis):
        return dataclasses.replace(super()._cfg(axis), padded_output="normalize")


class PlainGradient(ReferenceLayer):
    """Backward of y = gamma * xhat + beta with the stats held constant (misses the mean/var terms)."""

    def forward_backward(self, x, x_dtype, mask, dy):
        out, grads = super().forward_backward(x, x_dtype, mask, dy)
        axis, real = self._check(x, x_dtype, mask)
        _, var, _ = ref.batch_moments(ref.to_rows(x.astype(np.float64), axis), ref.to_rows(real, axis))
        gamma = self._full_state()["gamma"]
        dx = dy.astype(np.float64) * np.reshape(gamma / np.sqrt(var + self.config.epsilon), _channel_view(x, axis))
        return out, Gradients(Output(round_to(dx, x_dtype), x_dtype), grads.gamma, grads.beta)


class PaddedRowsGetGradient(ReferenceLayer):
    """Sends gradient gamma * inv_std to padded rows regardless of dy."""

    def forward_backward(self, x, x_dtype, mask, dy):
        out, grads = super().forward_backward(x, x_dtype, mask, dy)
        _, real = self._check(x, x_dtype, mask)
        padded = ~real
        dx = np.where(padded, 1.0, grads.x.value)
        return out, Gradients(Output(round_to(dx, x_dtype), x_dtype), grads.gamma, grads.beta)


class ZeroAffineGradients(ReferenceLayer):
    """Detaches gamma and beta: their gradients are zero."""

    def forward_backward(self, x, x_dtype, mask, dy):
        out, grads = super().forward_backward(x, x_dtype, mask, dy)
        zero = lambda g: None if g is None else np.zeros_like(g)  # noqa: E731
        return out, Gradients(grads.x, zero(grads.gamma), zero(grads.beta))


class IgnoresIntegerMasks(ReferenceLayer):
    """Only honours bool masks; an integer mask is treated as all real."""

    def _check(self, x, x_dtype, mask):
        if mask is not None and mask.dtype != np.bool_:
            mask = np.ones_like(mask)
        return super()._check(x, x_dtype, mask)


class NoMaskUsesOtherEpsilon(ReferenceLayer):
    """Takes a different code path without a mask, with epsilon forgotten."""

    def _cfg(self, axis):
        cfg = super()._cfg(axis)
        return dataclasses.replace(cfg, epsilon=1e-1) if self._no_mask else cfg

    def _check(self, x, x_dtype, mask):
        self._no_mask = mask is None
        return super()._check(x, x_dtype, mask)


class UnbiasedMovingVar(ReferenceLayer):
    """Stores the unbiased n/(n - 1) variance in moving_var whatever the config says."""

    def _cfg(self, axis):
        return dataclasses.replace(super()._cfg(axis), moving_var="unbiased")


class PopulationMovingVar(ReferenceLayer):
    """Stores the population variance whatever the config says (the knob ignored)."""

    def _cfg(self, axis):
        return dataclasses.replace(super()._cfg(axis), moving_var="population")


class EvalUsesBatchStats(ReferenceLayer):
    """Normalizes inference calls with the batch's masked stats."""

    def forward(self, x, x_dtype, mask, training):
        if training:
            return super().forward(x, x_dtype, mask, training)
        saved = self.get_state()
        out = super().forward(x, x_dtype, mask, True)
        self.set_state(saved)
        return out


class AlwaysAffine(ReferenceLayer):
    """Creates gamma and beta even when scale / center are off."""

    def __init__(self, config: LayerConfig):
        super().__init__(config)
        self.state.setdefault("gamma", np.ones(config.channels, self._store))
        self.state.setdefault("beta", np.zeros(config.channels, self._store))


class LossyRoundTrip(ReferenceLayer):
    """Saves its state as float16."""

    def round_trip(self, directory: Path):
        loaded = super().round_trip(directory)
        loaded.set_state({k: v.astype(np.float16) for k, v in self.state.items()})
        return loaded


class VagueErrors(ReferenceLayer):
    """Raises the right type but says nothing useful."""

    def _check(self, x, x_dtype, mask):
        try:
            return super()._check(x, x_dtype, mask)
        except (TypeError, ValueError) as exc:
            raise type(exc)("bad input") from None


class UpdatesBeforeValidating(ReferenceLayer):
    """Moves the stats toward zero before it finds out the input is bad."""

    def _check(self, x, x_dtype, mask):
        self.state["moving_mean"] = self.state["moving_mean"] * 0.5
        return super()._check(x, x_dtype, mask)


class AveragesShardMeans(ReferenceShardedLayer):
    """Merges shards with a plain mean of their means and variances (pmean):
    biased as soon as shards hold different numbers of real rows."""

    def _merged(self, xs, x_dtype, masks):
        checked, n, _, _ = super()._merged(xs, x_dtype, masks)
        means, variances = [], []
        for x, (axis, real) in zip(xs, checked, strict=True):
            rows = ref.to_rows(x.astype(np.float64), axis)[ref.to_rows(real, axis)[:, 0]]
            means.append(rows.mean(axis=0) if len(rows) else np.zeros(self.config.channels))
            variances.append(rows.var(axis=0) if len(rows) else np.zeros(self.config.channels))
        return checked, n, np.mean(means, axis=0), np.mean(variances, axis=0)


def _channel_view(x: np.ndarray, axis: int) -> list[int]:
    view = [1] * x.ndim
    view[axis] = x.shape[axis]
    return view


class LossyPortableExport(ReferenceLayer):
    """Writes gamma rounded to float16 into the portable file."""

    def export_portable(self, directory: Path) -> None:
        saved = self.state
        self.state = dict(saved, gamma=saved["gamma"].astype(np.float16).astype(self._store))
        try:
            super().export_portable(directory)
        finally:
            self.state = saved


class BrokenBackend(ReferenceBackend):
    """A backend whose masked (or synchronized) layer is one of the classes above."""

    def __init__(self, layer_class: type):
        sharded = issubclass(layer_class, ReferenceShardedLayer)
        self.layer_class = ReferenceLayer if sharded else layer_class
        self.sharded_class = layer_class if sharded else ReferenceShardedLayer
        self.name = f"broken-{layer_class.__name__}"

    def sharded_layer(self, config, num_shards):
        return self.sharded_class(config, num_shards)

    def layer(self, config):
        return self.layer_class(config)


class StockCheckpointLosesMovingVar(ReferenceBackend):
    """Loads a stock checkpoint but forgets the moving variance (a renamed key, say)."""

    name = "broken-StockCheckpointLosesMovingVar"

    def from_stock_checkpoint(self, stock, directory):
        layer = super().from_stock_checkpoint(stock, directory)
        layer.set_state({"moving_var": np.ones(layer.config.channels)})
        return layer


class PortableForgetsMovingVar(ReferenceBackend):
    """Imports the portable format but ignores its moving_var key (always population)."""

    name = "broken-PortableForgetsMovingVar"

    def import_portable(self, directory):
        layer = super().import_portable(directory)
        loaded = ReferenceLayer(dataclasses.replace(layer.config, moving_var="population"))
        loaded.set_state(layer.state)
        return loaded


class AmbiguousMaskAsLeading(ReferenceLayer):
    """Reads a rank(x)-1 mask that fits both readings as Keras's leading axes (the rule: positions)."""

    def _check(self, x, x_dtype, mask):
        axis, real = super()._check(x, x_dtype, mask)
        if mask is not None and mask.ndim == x.ndim - 1 and mask.shape == x.shape[:-1]:
            real = np.broadcast_to(np.expand_dims(mask != 0, -1), x.shape)
        return axis, real


class OneCountForAllChannels(ReferenceLayer):
    """Counts a position as real if any channel is: a per-channel mask collapses to per position."""

    def _check(self, x, x_dtype, mask):
        axis, real = super()._check(x, x_dtype, mask)
        return axis, np.broadcast_to(real.any(axis=axis, keepdims=True), x.shape)


class DetachedSecondOrder(ReferenceLayer):
    """Double backward through a detached first gradient: the Hessian-vector product is 0."""

    def hvp(self, x, x_dtype, mask, dy, v):
        out = super().hvp(x, x_dtype, mask, dy, v)
        return Output(np.zeros_like(out.value), x_dtype)


class NaiveFloat32Mean(ReferenceLayer):
    """Sums the real rows in float32, one row after another, and divides by n: fine for
    small batches, off by many ulps (and sigmas) for 1e5 rows around 1e6."""

    def _run(self, x, x_dtype, mask, training):
        axis, real = self._check(x, x_dtype, mask)
        rows, real_rows = ref.to_rows(x.astype(np.float32), axis), ref.to_rows(real, axis)
        n = real_rows.sum(axis=0)
        total = np.zeros(rows.shape[1], np.float32)
        for block in np.array_split(np.where(real_rows, rows, np.float32(0)), max(len(rows) // 4096, 1)):
            # numpy sums along axis 0 row after row (no pairwise tree): the naive float32 sum
            total = total + np.add.reduce(block, axis=0, dtype=np.float32)
        mean = (total / np.maximum(n, 1).astype(np.float32)).astype(np.float64)
        state = self._full_state()
        y, new_state, aux = ref.forward(x.astype(np.float64), real, state, self._cfg(axis), training)
        if training:
            d = self.config.decay
            new_state["moving_mean"] = np.where(n > 0, d * state["moving_mean"] + (1 - d) * mean, state["moving_mean"])
            shifted = dict(state, moving_mean=new_state["moving_mean"], moving_var=new_state["moving_var"])
            cfg = dataclasses.replace(self._cfg(axis), decay=1.0)
            y, _, aux = ref.forward(x.astype(np.float64), real, shifted, cfg, False)
        self.state = {k: new_state[k].astype(self._store) for k in self.state}
        return axis, y, aux


class CompiledFormOffByOne(ReferenceBackend):
    """Right in its default form, wrong (outputs +1e-2) in its second, "compiled" form:
    the form axis must show that on its own ids."""

    name = "broken-CompiledFormOffByOne"
    forms = ("eager", "compiled")

    def layer(self, config):
        return OffsetOutput(config) if config.form == "compiled" else ReferenceLayer(config)
