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
from .adapter import Gradients, LayerConfig, Output
from .dtypes import round_to

_FLOATS = {"float16", "bfloat16", "float32", "float64"}


class ReferenceLayer:
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
        squeezed = tuple(s for i, s in enumerate(x.shape) if i != axis)
        if mask is None:
            return axis, np.ones(squeezed, dtype=bool)
        if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
            raise TypeError(f"mask must be bool or integer, got dtype {mask.dtype.name}")
        keepdim = tuple(1 if i == axis else s for i, s in enumerate(x.shape))
        if mask.shape == keepdim and mask.shape != squeezed:
            mask = mask.reshape(squeezed)
        if mask.shape != squeezed:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not fit x shape {tuple(x.shape)}: "
                f"expected {squeezed} or {keepdim}"
            )
        return axis, mask != 0

    def _cfg(self, axis: int) -> ref.RefConfig:
        c = self.config
        return ref.RefConfig(axis, c.decay, c.epsilon, c.center, c.scale, c.padded_output)

    def _full_state(self) -> dict[str, np.ndarray]:
        state = ref.initial_state(self.config.channels)
        state.update({k: v.astype(np.float64) for k, v in self.state.items()})
        return state

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

    def get_state(self):
        return {k: v.copy() for k, v in self.state.items()}

    def set_state(self, state):
        for key, value in state.items():
            if key in self.state:
                self.state[key] = np.asarray(value, dtype=self._store).copy()

    def round_trip(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.__dict__))
        np.savez(directory / "state.npz", **self.state)
        loaded = ReferenceLayer(LayerConfig(**json.loads((directory / "config.json").read_text())))
        with np.load(directory / "state.npz") as saved:
            loaded.set_state(dict(saved))
        return loaded


class ReferenceBackend:
    """The float64 oracle, run through the adapter protocol."""

    name = "reference"

    def layer(self, config: LayerConfig) -> ReferenceLayer:
        return ReferenceLayer(config)

    def stock_layer(self, config: LayerConfig) -> ReferenceLayer:
        # unmasked batch norm is the masked one with every row real, and the
        # harness only calls a stock layer without a mask
        return ReferenceLayer(config)

    def expectations_path(self) -> Path | None:
        return None
