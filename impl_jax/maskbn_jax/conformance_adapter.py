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

import abc
import contextlib
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from maskbn_conformance.adapter import (
    AdapterLayer,
    Backend,
    Gradients,
    LayerConfig,
    Output,
    ReplicatedLayer,
    ShardedGradients,
    Unsupported,
)

from . import serialization
from ._core import _validate, init, masked_batch_norm

_TO_FLAX = {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_var": "var"}
_FROM_FLAX = {v: k for k, v in _TO_FLAX.items()}
_PARAM_KEYS = ("scale", "bias")
#: CPU devices asked for before JAX's runtime starts, so sharded cases get one device per shard
SHARD_DEVICES = 8
_X_DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float64": jnp.float64,
    "int32": jnp.int32,
    "int64": jnp.int64,
}


def _core_kwargs(config: LayerConfig) -> dict:
    """masked_batch_norm's keywords for a config (JAX's default variance is the
    population one: only the other convention is spelled out)."""
    kw = {"momentum": config.decay, "epsilon": config.epsilon, "axis": config.axis,
          "padded_output": config.padded_output}  # fmt: skip
    if config.moving_var == "unbiased":
        kw["unbiased_var"] = True
    return kw


def _flax_available() -> bool:
    try:
        import flax  # noqa: F401
    except ImportError:
        return False
    return True


_JITTED: dict[tuple, dict[bool, Callable]] = {}


def _jitted(key: tuple, build: Callable[[], dict[bool, Callable]]) -> dict[bool, Callable]:
    """The jitted (training, inference) pair for ``key``, built on first use: jax.jit caches
    compilations per function object, so layers of one config share one."""
    if key not in _JITTED:
        _JITTED[key] = build()
    return _JITTED[key]


class _Base(AdapterLayer, abc.ABC):
    """State handling and I/O shared by the masked and the stock layer."""

    weight_names = _TO_FLAX

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
    def _array(a: np.ndarray, dtype: str) -> np.ndarray:
        # a NumPy array in the named dtype (ml_dtypes for bfloat16): the layer checks what it is
        # given, and an int64 x stays int64 even where JAX (without x64) could not hold it
        return np.asarray(a).astype(_X_DTYPES[dtype])

    def _dtype_name(self, tensor) -> str:
        return jnp.dtype(tensor.dtype).name

    def _host(self, tensor, dtype: str) -> np.ndarray:
        return np.array(tensor.astype(dtype))

    @abc.abstractmethod
    def _body(self, training: bool, axis_name: str | None = None):
        """The pure call ``(x, mask, params, state) -> (y, new_state)``; with ``axis_name``
        the statistics merge across that mapped axis (run under shard_map)."""

    @property
    def _fns(self):
        # one jitted pair per layer type and config, shared by every layer of them: a new
        # jax.jit per layer compiled again for each (the spec builds many layers of one config)
        return _jitted((type(self), self.config), lambda: {t: jax.jit(self._body(t)) for t in (True, False)})

    def _call(self, x, mask, training, params=None):
        return self._fns[training](x, mask, self.params if params is None else params, self.state)

    @abc.abstractmethod
    def _run(self, x, mask, training, params=None):
        """One jitted call: ``(y, new_state)``; ``params`` overrides the layer's (for vjp)."""

    def forward(self, x, x_dtype, mask, training):
        with self._x64():
            y, new_state = self._run(self._array(x, x_dtype), mask, training)
            self.state = new_state
            return self._output(y)

    def forward_backward(self, x, x_dtype, mask, dy):
        with self._x64():
            x_j = self._array(x, x_dtype)
            dy_j = self._array(dy, x_dtype)
            y, vjp, new_state = jax.vjp(lambda x_, p_: self._run(x_, mask, True, p_), x_j, self.params, has_aux=True)
            dx, dparams = vjp(dy_j)
            self.state = new_state
            grads = Gradients(
                x=self._output(dx),
                gamma=np.asarray(dparams["scale"]) if "scale" in dparams else None,
                beta=np.asarray(dparams["bias"]) if "bias" in dparams else None,
            )
            return self._output(y), grads

    def hvp(self, x, x_dtype, mask, dy, v):
        with self._x64():
            x_j, dy_j, v_j = (self._array(a, x_dtype) for a in (x, dy, v))

            def gradient(x_):
                _, vjp, _ = jax.vjp(lambda a: self._run(a, mask, True), x_, has_aux=True)
                return vjp(dy_j)[0]

            # reverse over reverse: the gradient of <grad_x, v>
            product = jax.grad(lambda x_: jnp.sum(gradient(x_) * v_j))(x_j)
            _, self.state = self._run(x_j, mask, True)
            return self._output(product)

    def _tree(self, name: str) -> dict:
        return self.params if name in _PARAM_KEYS else self.state

    def _read_weight(self, name: str) -> np.ndarray | None:
        value = self._tree(name).get(name)
        return None if value is None else np.asarray(value)

    def _write_weight(self, name: str, value: np.ndarray) -> None:
        tree = self._tree(name)
        if name not in tree:
            raise KeyError(f"layer has no {_FROM_FLAX[name]} (center/scale off)")
        tree[name] = jnp.asarray(value, tree[name].dtype).reshape(tree[name].shape)

    def set_state(self, state):
        with self._x64():  # a float64 layer's state stays float64
            super().set_state(state)

    def round_trip(self, directory: Path):
        """Flax's msgpack (``flax.serialization``) when Flax is installed, else the npz format."""
        config = dataclasses.asdict(self.config)
        Path(directory).mkdir(parents=True, exist_ok=True)
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

    def _body(self, training: bool, axis_name: str | None = None):
        kw = _core_kwargs(self.config)
        return functools.partial(masked_batch_norm, training=training, axis_name=axis_name, **kw)

    def _run(self, x, mask, training, params=None):
        c = self.config
        # check the inputs as given before jit canonicalizes them (int64 -> int32, float64 -> float32
        # without x64), as an eager call of masked_batch_norm would; nothing has changed if this raises
        _validate(x, mask, self.params if params is None else params, self.state, c.axis, c.padded_output, training)
        return self._call(x, mask, training, params)

    def export_portable(self, directory: Path) -> None:
        c = self.config
        serialization.save_portable(
            directory, self.params, self.state, momentum=c.decay, epsilon=c.epsilon, axis=c.axis,
            padded_output=c.padded_output, **({"unbiased_var": True} if c.moving_var == "unbiased" else {}),
        )  # fmt: skip


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
            **self._numerics(config),
        )

    def _numerics(self, config: LayerConfig) -> dict:
        """Flax's variance and reduction options: the accurate ones, for parity."""
        return {"use_fast_variance": False, "force_float32_reductions": config.dtype != "float64"}

    def _flax_mask(self, x, mask):
        """The mask as Flax takes it (None for parity, where the stock layer runs unmasked)."""
        return mask

    def _body(self, training: bool, axis_name: str | None = None):
        module = self.module if axis_name is None else self.module.clone(axis_name=axis_name)

        def apply(x, mask, params, state):
            variables = {"params": params, "batch_stats": state}
            mask = self._flax_mask(x, mask)
            if not training:
                return module.apply(variables, x, use_running_average=True, mask=mask), state
            y, updated = module.apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
            return y, dict(updated["batch_stats"])

        return apply

    def _run(self, x, mask, training, params=None):
        if mask is not None:
            raise Unsupported("the stock flax.linen.BatchNorm is only run without a mask")
        return self._call(x, mask, training, params)


def request_shard_devices() -> bool:
    """Ask JAX for ``SHARD_DEVICES`` CPU devices (one per shard of the sharded cases).

    JAX creates its devices when its runtime starts, so this only works before
    the first JAX computation (as TF's logical devices); returns whether the
    devices are there. When they are not, sharded cases report Unsupported with
    the reason.
    """
    try:
        if jax.config.jax_num_cpu_devices < SHARD_DEVICES:
            jax.config.update("jax_num_cpu_devices", SHARD_DEVICES)
    except RuntimeError:
        pass  # the runtime already started
    return len(jax.devices("cpu")) >= SHARD_DEVICES


class JaxShardedLayer(ReplicatedLayer):
    """One layer replicated over ``num_shards`` CPU devices with ``jax.shard_map``; the
    statistics merge across the mapped axis ``"shards"`` (ours: ``masked_batch_norm(...,
    axis_name=)``, two psums; a Flax module: its own ``axis_name``).

    shard_map needs equal shards, so uneven ones are padded to the largest with
    all-padded batch items (mask False, x 0): masked statistics ignore them by
    construction, as they do any static-shape padding, and their rows are cut
    from the outputs and gradients.
    """

    def __init__(self, config: LayerConfig, num_shards: int, layer_type: type[_Base] = JaxMaskedLayer):
        devices = jax.devices("cpu")
        if len(devices) < num_shards:
            raise Unsupported(
                f"{num_shards} shards need {num_shards} CPU devices; JAX has {len(devices)} (its runtime "
                f"started before the jax backend could ask for {SHARD_DEVICES} via jax_num_cpu_devices)"
            )
        if config.axis % config.rank == 0:
            raise Unsupported("shards split axis 0, which is this layer's channel axis")
        self.config = config
        self.one = layer_type(config)
        self.mesh = jax.make_mesh((num_shards,), ("shards",), axis_types=(AxisType.Auto,), devices=devices[:num_shards])

    @property
    def _fns(self):
        def build(training):
            sharded = jax.shard_map(
                self.one._body(training, axis_name="shards"),
                mesh=self.mesh,
                in_specs=(P("shards"), P("shards"), P(), P()),
                out_specs=(P("shards"), P()),
            )
            return jax.jit(sharded)

        key = (type(self.one), self.config, len(self.mesh.devices))
        return _jitted(key, lambda: {training: build(training) for training in (True, False)})

    def _stack(self, arrays, fill_mask: bool):
        """Pad every shard to the largest along axis 0 and concatenate; also returns the sizes."""
        sizes = [len(a) for a in arrays]
        width = max(sizes)
        padded = []
        for a in arrays:
            pad = np.zeros((width - len(a),) + a.shape[1:], a.dtype)
            padded.append(np.concatenate([a, pad]) if fill_mask or pad.size else a)
        return np.concatenate(padded), sizes, width

    def _inputs(self, xs, x_dtype, masks):
        axis = self.config.axis % xs[0].ndim
        full = [
            np.ones(x.shape[:axis] + x.shape[axis + 1 :], bool) if m is None else np.asarray(m)
            for x, m in zip(xs, masks, strict=True)
        ]
        x, sizes, width = self._stack([np.asarray(x) for x in xs], False)
        mask, _, _ = self._stack(full, True)
        return self.one._array(x, x_dtype), jnp.asarray(mask), sizes, width

    def _split(self, y, sizes, width) -> list[Output]:
        return [self.one._output(y[k * width : k * width + n]) for k, n in enumerate(sizes)]

    def forward(self, xs, x_dtype, masks, training):
        with self.one._x64():
            x, mask, sizes, width = self._inputs(xs, x_dtype, masks)
            y, self.one.state = self._fns[training](x, mask, self.one.params, self.one.state)
            return self._split(y, sizes, width)

    def forward_backward(self, xs, x_dtype, masks, dys):
        with self.one._x64():
            x, mask, sizes, width = self._inputs(xs, x_dtype, masks)
            dy, _, _ = self._stack([np.asarray(d) for d in dys], False)
            fn = self._fns[True]
            y, vjp, new_state = jax.vjp(
                lambda x_, p_: fn(x_, mask, p_, self.one.state), x, self.one.params, has_aux=True
            )
            dx, dparams = vjp(self.one._array(dy, x_dtype))
            self.one.state = new_state
            grads = ShardedGradients(
                xs=self._split(dx, sizes, width),
                gamma=np.asarray(dparams["scale"]) if "scale" in dparams else None,
                beta=np.asarray(dparams["bias"]) if "bias" in dparams else None,
            )
            return self._split(y, sizes, width), grads


class JaxBackend(Backend):
    """Entry point ``maskbn.backends: jax``."""

    name = "jax"
    stock_moving_var = "population"
    #: every call goes through jax.jit: JAX's one form (no eager form users run)
    forms = ("jit",)
    fuzz_example_scale = 1.5

    def __init__(self):
        request_shard_devices()

    def layer(self, config: LayerConfig) -> JaxMaskedLayer:
        return JaxMaskedLayer(config)

    def stock_layer(self, config: LayerConfig) -> FlaxStockLayer:
        return FlaxStockLayer(config)

    def sharded_layer(self, config: LayerConfig, num_shards: int) -> JaxShardedLayer:
        return JaxShardedLayer(config, num_shards)

    def import_portable(self, directory: Path) -> JaxMaskedLayer:
        # read under x64 so a float64 layer stays float64; float32 arrays are unaffected
        with jax.enable_x64(True):
            params, state, kw = serialization.load_portable(directory)
        dtype = "float64" if state["mean"].dtype == jnp.float64 else "float32"
        axis = kw["axis"]
        config = LayerConfig(
            channels=int(state["mean"].shape[0]),
            axis=axis,
            # a JAX layer takes any rank; this is the smallest that has the channel axis
            rank=axis + 1 if axis >= 0 else -axis,
            decay=kw["momentum"],
            epsilon=kw["epsilon"],
            center="bias" in params,
            scale="scale" in params,
            padded_output=kw["padded_output"],
            dtype=dtype,
            # a file without the key holds the population variance
            moving_var="unbiased" if kw.get("unbiased_var", False) else "population",
        )
        layer = JaxMaskedLayer(config)
        layer.params, layer.state = params, state
        return layer

    def from_stock_checkpoint(self, stock: FlaxStockLayer, directory: Path) -> JaxMaskedLayer:
        """Flax's usual checkpoint: the stock module's variables through
        ``flax.serialization``, restored into the variables of a model holding
        ``maskbn_jax.linen.BatchNorm`` (same class name, same variable paths)."""
        from flax import serialization as flax_serialization

        from .linen import BatchNorm

        c = stock.config
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "batchnorm.msgpack"
        with stock._x64():
            path.write_bytes(flax_serialization.to_bytes({"params": stock.params, "batch_stats": stock.state}))
            module = BatchNorm(
                axis=c.axis, momentum=c.decay, epsilon=c.epsilon, use_bias=c.center, use_scale=c.scale,
                param_dtype=stock.store_dtype, padded_output=c.padded_output,
            )  # fmt: skip
            shape = [1] * c.rank
            shape[c.axis] = c.channels
            target = module.init(jax.random.key(0), jnp.zeros(shape, stock.store_dtype), use_running_average=True)
            restored = flax_serialization.from_bytes(target, path.read_bytes())
        layer = JaxMaskedLayer(c)
        layer.params, layer.state = dict(restored["params"]), dict(restored["batch_stats"])
        return layer

    def expectations_path(self) -> Path | None:
        return Path(__file__).with_name("conformance_expectations.yaml")
