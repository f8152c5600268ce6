"""The NumPy float64 reference as a backend, so the harness can test itself.

It validates input like a real backend (the bad-input cases run against it
too), keeps its state in float64 and returns outputs rounded to the run dtype.
It is also the template for a new backend's adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import reference as ref
from .adapter import Backend, Gradients, Layer, LayerConfig, Output, ShardedGradients, ShardedLayer
from .dtypes import round_to

_FLOATS = {"float16", "bfloat16", "float32", "float64"}


class ReferenceLayer(Layer):
    def __init__(self, config: LayerConfig):
        self.config = config
        self._store = np.float64 if config.dtype == "float64" else np.float32
        c = config.channels
        self.state = {"moving_mean": np.zeros(c, self._store), "moving_var": np.ones(c, self._store)}
        if config.scale:
            self.state["gamma"] = np.ones(c, self._store)
        if config.center:
            self.state["beta"] = np.zeros(c, self._store)

    # -- validation, as every backend must do it, before touching state
    def _check(self, x: np.ndarray, x_dtype: str, mask: np.ndarray | None) -> tuple[int, np.ndarray]:
        """(channel axis, the real elements as a bool array of x's shape)."""
        if x_dtype not in _FLOATS:
            raise TypeError(f"x must be a floating tensor, got dtype {x_dtype}")
        rank = x.ndim
        if not -rank <= self.config.axis < rank:
            raise ValueError(f"channel axis {self.config.axis} is out of range for x of shape {tuple(x.shape)}")
        axis = self.config.axis % rank
        if x.shape[axis] != self.config.channels:
            raise ValueError(
                f"x has {x.shape[axis]} channels on axis {axis} (shape {tuple(x.shape)}), "
                f"the layer was built for {self.config.channels}"
            )
        if mask is None:
            return axis, np.ones(x.shape, dtype=bool)
        if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
            raise TypeError(
                f"mask must be bool or integer, got dtype {mask.dtype.name}: "
                "make a bool mask first, e.g. mask > 0 or mask.astype(bool)"
            )
        return axis, ref.mask_elements(mask, x.shape, axis)

    def _cfg(self, axis: int) -> ref.RefConfig:
        return ref.RefConfig.of(self.config, axis)

    def _full_state(self) -> dict[str, np.ndarray]:
        return ref.full_state(self.state, self.config.channels)

    def _run(self, x, x_dtype, mask, training):
        axis, real = self._check(x, x_dtype, mask)
        y, new_state, aux = ref.forward(x.astype(np.float64), real, self._full_state(), self._cfg(axis), training)
        self.state = {k: new_state[k].astype(self._store) for k in self.state}
        return axis, y, aux

    def forward(self, x, x_dtype, mask, training):
        _, y, _ = self._run(x, x_dtype, mask, training)
        return Output(round_to(y, x_dtype), x_dtype)

    def forward_backward(self, x, x_dtype, mask, dy):
        axis, y, aux = self._run(x, x_dtype, mask, True)
        dx, dgamma, dbeta = ref.backward(dy.astype(np.float64), aux, self._cfg(axis))
        grads = Gradients(
            x=Output(round_to(dx, x_dtype), x_dtype),
            gamma=dgamma.astype(self._store) if self.config.scale else None,
            beta=dbeta.astype(self._store) if self.config.center else None,
        )
        return Output(round_to(y, x_dtype), x_dtype), grads

    def hvp(self, x, x_dtype, mask, dy, v):
        axis, real = self._check(x, x_dtype, mask)
        args = (x.astype(np.float64), real, self._full_state(), self._cfg(axis))
        product = ref.hessian_vector_product(*args, dy.astype(np.float64), v.astype(np.float64))
        self._run(x, x_dtype, mask, True)
        return Output(round_to(product, x_dtype), x_dtype)

    def get_state(self):
        return {k: v.copy() for k, v in self.state.items()}

    def set_state(self, state):
        for key, value in state.items():
            if key in self.state:
                self.state[key] = np.asarray(value, dtype=self._store).copy()

    def export_portable(self, directory: Path) -> None:
        c = self.config
        config = {"channels": c.channels, "axis": c.axis, "decay": c.decay, "epsilon": c.epsilon,
                  "center": c.center, "scale": c.scale, "padded_output": c.padded_output,
                  "moving_var": c.moving_var}  # fmt: skip
        write_portable(directory, config, self.state)

    def round_trip(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.__dict__))
        np.savez(directory / "state.npz", **self.state)
        loaded = ReferenceLayer(LayerConfig(**json.loads((directory / "config.json").read_text())))
        with np.load(directory / "state.npz") as saved:
            loaded.set_state(dict(saved))
        return loaded


def merge_moments(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan's parallel merge of per-shard, per-channel (n, mean, M2 = centered sum of squares).

    Count-weighted and exact: shards (or channels) with n = 0 contribute
    nothing. This is what a backend's collective must compute (an all-reduce of
    n and sum, then of the squares centered on the global mean, gives the same).
    """
    n, mean, m2 = parts[0]
    for n_b, mean_b, m2_b in parts[1:]:
        total = n + n_b
        share = np.where(total > 0, n_b / np.maximum(total, 1), 0.0)
        delta = mean_b - mean
        mean = mean + delta * share
        m2 = m2 + m2_b + delta**2 * n * share
        n = total
    return n, mean, m2


class ReferenceShardedLayer(ShardedLayer):
    """k replicas sharing statistics through an explicit (n, mean, M2) merge.

    Each shard computes only its own moments; the merged moments replace the
    batch statistics, so this is the reference for synchronized batch norm
    rather than a disguised single-device run.
    """

    def __init__(self, config: LayerConfig, num_shards: int):
        self.config = config
        self.num_shards = num_shards
        self.replica = ReferenceLayer(config)

    def _merged(self, xs, x_dtype, masks):
        parts, checked = [], []
        for x, mask in zip(xs, masks, strict=True):
            axis, real = self.replica._check(x, x_dtype, mask)
            mean, var, n = ref.batch_moments(ref.to_rows(x.astype(np.float64), axis), ref.to_rows(real, axis))
            parts.append((n, mean, var * n))
            checked.append((axis, real))
        n, mean, m2 = merge_moments(parts)
        return checked, n, mean, m2 / np.maximum(n, 1)

    def _run(self, xs, x_dtype, masks, training):
        checked, n, mean, var = self._merged(xs, x_dtype, masks)
        active = (n > 0) & training
        full = self.replica._full_state()
        d = self.config.decay
        stored = ref.stored_variance(var, n, self.config.moving_var)
        self.replica.set_state({
            "moving_mean": np.where(active, d * full["moving_mean"] + (1 - d) * mean, full["moving_mean"]),
            "moving_var": np.where(active, d * full["moving_var"] + (1 - d) * stored, full["moving_var"]),
        })  # fmt: skip
        # normalize each shard with the merged stats: an inference call with them as "moving" stats
        state = dict(
            full,
            moving_mean=np.where(active, mean, full["moving_mean"]),
            moving_var=np.where(active, var, full["moving_var"]),
        )
        results = []
        for x, (axis, real) in zip(xs, checked, strict=True):
            y, _, aux = ref.forward(x.astype(np.float64), real, state, self.replica._cfg(axis), False)
            aux["n"] = np.where(active, n, 0)
            results.append((axis, y, aux))
        return results

    def forward(self, xs, x_dtype, masks, training):
        return [Output(round_to(y, x_dtype), x_dtype) for _, y, _ in self._run(xs, x_dtype, masks, training)]

    def forward_backward(self, xs, x_dtype, masks, dys):
        results = self._run(xs, x_dtype, masks, True)
        cfgs = [self.replica._cfg(axis) for axis, _, _ in results]
        # each shard's sums of dy and dy * xhat over its real elements, summed over shards
        local = [ref.backward(dy.astype(np.float64), aux, cfg) for (_, _, aux), dy, cfg in zip(results, dys, cfgs)]
        dgamma = sum(g for _, g, _ in local)
        dbeta = sum(b for _, _, b in local)
        outs, dxs = [], []
        for (axis, y, aux), dy in zip(results, dys, strict=True):
            n = np.maximum(aux["n"], 1)
            dy_real = np.where(aux["real"], ref.to_rows(dy.astype(np.float64), axis), 0.0)
            xhat = np.where(aux["real"], aux["xhat"], 0.0)
            dx_rows = (aux["gamma"] * aux["inv_std"]) * (dy_real - dbeta / n - xhat * dgamma / n)
            dx_rows = np.where(aux["real"] & (aux["n"] > 0), dx_rows, 0.0)
            dxs.append(Output(round_to(ref.from_rows(dx_rows, dy.shape, axis), x_dtype), x_dtype))
            outs.append(Output(round_to(y, x_dtype), x_dtype))
        store = self.replica._store
        grads = ShardedGradients(
            xs=dxs,
            gamma=dgamma.astype(store) if self.config.scale else None,
            beta=dbeta.astype(store) if self.config.center else None,
        )
        return outs, grads

    def get_state(self):
        return self.replica.get_state()

    def set_state(self, state):
        self.replica.set_state(state)


PORTABLE_FORMAT = "maskbn-portable"


def write_portable(directory: Path, config: dict, state: dict[str, np.ndarray]) -> None:
    """The neutral format of spec/README.md ("Portable state"), written with NumPy only."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "maskbn.json").write_text(json.dumps({"format": PORTABLE_FORMAT, "version": 1, **config}, indent=2))
    np.savez(directory / "maskbn.npz", **state)


def read_portable(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    config = json.loads((directory / "maskbn.json").read_text())
    if config.pop("format", None) != PORTABLE_FORMAT or config.pop("version", None) != 1:
        raise ValueError(f"{directory / 'maskbn.json'} is not a version 1 {PORTABLE_FORMAT} file")
    with np.load(directory / "maskbn.npz") as saved:
        return config, dict(saved)


class ReferenceBackend(Backend):
    """The float64 oracle, run through the adapter protocol."""

    name = "reference"
    stock_moving_var = "population"
    forms = ("numpy",)
    fuzz_example_scale = 3

    def layer(self, config: LayerConfig) -> ReferenceLayer:
        return ReferenceLayer(config)

    def stock_layer(self, config: LayerConfig) -> ReferenceLayer:
        # unmasked batch norm is the masked one with every row real, and the
        # harness only calls a stock layer without a mask
        return ReferenceLayer(config)

    def import_portable(self, directory: Path) -> ReferenceLayer:
        config, state = read_portable(directory)
        dtype = "float64" if state["moving_mean"].dtype == np.float64 else "float32"
        layer = ReferenceLayer(LayerConfig(rank=0, dtype=dtype, **config))
        layer.set_state(state)
        return layer

    def from_stock_checkpoint(self, stock: ReferenceLayer, directory: Path) -> ReferenceLayer:
        # the reference's "usual checkpoint" is its npz of state
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / "stock.npz", **stock.state)
        layer = ReferenceLayer(stock.config)
        with np.load(directory / "stock.npz") as saved:
            layer.set_state(dict(saved))
        return layer

    def sharded_layer(self, config: LayerConfig, num_shards: int) -> ReferenceShardedLayer:
        return ReferenceShardedLayer(config, num_shards)
