"""Conformance adapter: runs maskbn_jax (and flax.linen.BatchNorm for parity) for the harness.

Thin by design: NumPy in and out, neutral names translated to Flax's
(gamma -> scale, beta -> bias, moving_mean -> mean, moving_var -> var,
decay -> momentum, which in Flax already *is* the decay), no assertions, and
framework errors propagate unchanged. Calls go through ``jax.jit`` so the
harness exercises the traced path users run (and bad input must fail at trace
time). A float64 layer runs inside ``jax.enable_x64(True)``: JAX has no
float64 otherwise, and the switch stays local to that layer's calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from maskbn_conformance.adapter import Gradients, LayerConfig, Output, Unsupported

from . import serialization
from ._core import init, masked_batch_norm

_TO_FLAX = {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_var": "var"}
_FROM_FLAX = {v: k for k, v in _TO_FLAX.items()}
_PARAM_KEYS = ("scale", "bias")
_X_DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float64": jnp.float64,
    "int32": jnp.int32,
    "int64": jnp.int64,
}


def _flax_available() -> bool:
    try:
        import flax  # noqa: F401
    except ImportError:
        return False
    return True


class _Base:
    """State handling and I/O shared by the masked and the stock layer."""

    def __init__(self, config: LayerConfig):
        if config.dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise Unsupported(f"run dtype {config.dtype} is not a JAX float dtype")
        self.config = config
        self.store_dtype = jnp.float64 if config.dtype == "float64" else jnp.float32
        with self._x64():
            self.params, self.state = init(
                config.channels,
                use_scale=config.scale,
                use_bias=config.center,
                param_dtype=self.store_dtype,
                stats_dtype=self.store_dtype,
            )

    def _x64(self):
        return jax.enable_x64(True) if self.config.dtype == "float64" else contextlib.nullcontext()

    @staticmethod
    def _array(a: np.ndarray, dtype: str):
        return jnp.asarray(np.asarray(a), _X_DTYPES[dtype])

    @staticmethod
    def _out(a) -> Output:
        name = jnp.dtype(a.dtype).name
        host = np.asarray(a.astype(jnp.float64 if name == "float64" else jnp.float32))
        return Output(value=host, dtype=name)

    def _run(self, x, mask, training, params=None):
        """One jitted call: ``(y, new_state)``; ``params`` overrides the layer's (for vjp)."""
        raise NotImplementedError

    def forward(self, x, x_dtype, mask, training):
        with self._x64():
            y, new_state = self._run(self._array(x, x_dtype), mask, training)
            self.state = new_state
            return self._out(y)

    def forward_backward(self, x, x_dtype, mask, dy):
        with self._x64():
            x_j = self._array(x, x_dtype)
            dy_j = self._array(dy, x_dtype)
            y, vjp, new_state = jax.vjp(
                lambda x_, p_: self._run(x_, mask, True, p_), x_j, self.params, has_aux=True
            )
            dx, dparams = vjp(dy_j)
            self.state = new_state
            grads = Gradients(
                x=self._out(dx),
                gamma=np.asarray(dparams["scale"]) if "scale" in dparams else None,
                beta=np.asarray(dparams["bias"]) if "bias" in dparams else None,
            )
            return self._out(y), grads

    def get_state(self):
        merged = {**self.params, **self.state}
        return {_FROM_FLAX[k]: np.asarray(v) for k, v in merged.items()}

    def set_state(self, state):
        with self._x64():
            for neutral, value in state.items():
                key = _TO_FLAX[neutral]
                tree = self.params if key in _PARAM_KEYS else self.state
                if key not in tree:
                    raise KeyError(f"layer has no {neutral} (center/scale off)")
                tree[key] = jnp.asarray(np.asarray(value), tree[key].dtype).reshape(tree[key].shape)

    def round_trip(self, directory: Path):
        """Flax's msgpack (``flax.serialization``) when Flax is installed, else the npz format."""
        config = dataclasses.asdict(self.config)
        with self._x64():
            if _flax_available():
                path = Path(directory) / "layer.msgpack"
                path.write_bytes(serialization.to_bytes(self.params, self.state, config))
                params, state, loaded = serialization.from_bytes(path.read_bytes())
            else:
                path = Path(directory) / "layer.npz"
                serialization.save(path, self.params, self.state, config)
                params, state, loaded = serialization.load(path)
        layer = type(self)(LayerConfig(**loaded))
        layer.params, layer.state = params, state
        return layer


class JaxMaskedLayer(_Base):
    """``maskbn_jax.masked_batch_norm`` under ``jax.jit``."""

    @functools.cached_property
    def _fns(self):
        c = self.config
        kw = {"momentum": c.decay, "epsilon": c.epsilon, "axis": c.axis, "padded_output": c.padded_output}
        return {
            training: jax.jit(functools.partial(masked_batch_norm, training=training, **kw))
            for training in (True, False)
        }

    def _run(self, x, mask, training, params=None):
        mask = None if mask is None else jnp.asarray(mask)
        return self._fns[training](x, mask, self.params if params is None else params, self.state)


class FlaxStockLayer(_Base):
    """``flax.linen.BatchNorm`` with the same config, for parity (no mask).

    ``use_fast_variance=False``: Flax's default E[x^2] - E[x]^2 is what the
    contract forbids, and parity should compare against the accurate stock
    path. ``dtype`` is the run dtype so the output keeps x's dtype (Flax would
    otherwise promote float16 input to float32); a float64 layer keeps float64
    stats (``force_float32_reductions=False``).
    """

    def __init__(self, config: LayerConfig):
        if not _flax_available():
            raise Unsupported("flax is not installed: no stock flax.linen.BatchNorm to compare with")
        super().__init__(config)
        from flax import linen as nn

        self.module = nn.BatchNorm(
            axis=config.axis,
            momentum=config.decay,
            epsilon=config.epsilon,
            dtype=_X_DTYPES[config.dtype],
            param_dtype=self.store_dtype,
            use_bias=config.center,
            use_scale=config.scale,
            use_fast_variance=False,
            force_float32_reductions=config.dtype != "float64",
        )

    @functools.cached_property
    def _fns(self):
        def apply(x, params, state, training):
            variables = {"params": params, "batch_stats": state}
            if not training:
                return self.module.apply(variables, x, use_running_average=True), state
            y, updated = self.module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
            return y, dict(updated["batch_stats"])

        return {t: jax.jit(functools.partial(apply, training=t)) for t in (True, False)}

    def _run(self, x, mask, training, params=None):
        if mask is not None:
            raise Unsupported("the stock flax.linen.BatchNorm is only run without a mask")
        return self._fns[training](x, self.params if params is None else params, self.state)


class JaxBackend:
    """Entry point ``maskbn.backends: jax``."""

    name = "jax"

    def layer(self, config: LayerConfig) -> JaxMaskedLayer:
        return JaxMaskedLayer(config)

    def stock_layer(self, config: LayerConfig) -> FlaxStockLayer:
        return FlaxStockLayer(config)

    def expectations_path(self) -> Path | None:
        return Path(__file__).with_name("conformance_expectations.yaml")
