"""The conformance-harness adapter for maskbn_tf: NumPy in, NumPy out, no assertions.

Keras and TensorFlow are imported when the backend is instantiated, not when
this module is, so listing the installed backends stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from maskbn_conformance.adapter import (
    AdapterLayer,
    Backend,
    Gradients,
    LayerConfig,
    ReplicatedLayer,
    ShardedGradients,
    Unsupported,
)

# neutral state names -> Keras weight names
_WEIGHT_NAMES = {"gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean", "moving_var": "moving_variance"}

# The run dtype is the dtype of x. Keras expresses "float32 state, low-precision compute"
# as a mixed policy, so a float16 run is a mixed_float16 layer (Keras would otherwise
# autocast the float16 input up to the layer's float32 compute dtype).
_POLICIES = {
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "float32": "float32",
    "float64": "float64",
}


# Logical CPU devices for the sharded (synchronized) cases: TensorFlow only lets them be
# configured before its runtime starts, so the backend does it when it is created.
SHARD_DEVICES = 8


def configure_shard_devices() -> bool:
    """Split the CPU into SHARD_DEVICES logical devices, if TensorFlow's runtime has not
    started yet (then sharded cases report Unsupported with the reason). True if done."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) >= SHARD_DEVICES:
        return True
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * SHARD_DEVICES)
    except RuntimeError:
        return False
    return True


def _keras():
    # TensorFlow unless KERAS_BACKEND says otherwise: the layer runs on Keras' jax and torch
    # backends too (tox keras-jax / keras-torch), in the eager form only
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        # TensorFlow loaded before torch in one process can segfault: where both are
        # installed (the report env runs every backend in one process), torch goes first
        import torch  # noqa: F401
    import keras

    return keras


def _on_tensorflow() -> bool:
    return _keras().config.backend() == "tensorflow"


def _forms() -> tuple[str, ...]:
    # tf.function and XLA are TensorFlow's forms; elsewhere Keras calls the layer eagerly
    return FORMS if _on_tensorflow() else FORMS[:1]


def _keras_kwargs(config: LayerConfig, synchronized: bool) -> dict:
    """The keywords Keras' BatchNormalization and ours share, for a config."""
    return {"axis": config.axis, "momentum": config.decay, "epsilon": config.epsilon, "center": config.center,
            "scale": config.scale, "synchronized": synchronized, "dtype": _POLICIES[config.dtype]}  # fmt: skip


def _moving_var_knob(config: LayerConfig) -> dict[str, bool]:
    # Keras' own default is the population variance: only the other convention is spelled out
    return {"unbiased_moving_variance": True} if config.moving_var == "unbiased" else {}


#: the forms the adapter runs a layer in: eager (default), tf.function, tf.function(jit_compile=True)
FORMS = ("eager", "function", "xla")


class TFLayer(AdapterLayer):
    """One Keras layer (masked, or stock BatchNormalization for parity) behind the adapter protocol.

    In the ``function`` and ``xla`` forms each call (forward, or forward and
    backward together, as a training step runs) is one tf.function, traced per
    input signature like a user's train step."""

    weight_names = _WEIGHT_NAMES

    def __init__(self, layer, config: LayerConfig):
        form = config.form or FORMS[0]
        if form not in _forms():
            raise Unsupported(f"the tf backend runs a layer in the forms {_forms()}, not {form!r}")
        if _on_tensorflow():
            import tensorflow as tf

            self._tf = tf
        self._keras = _keras()
        self.layer = layer
        self.config = config
        self._graphs: dict = {}

    def _in_form(self, name: str, fn):
        """``fn`` as the form runs it: itself (eager), or a tf.function kept per name."""
        form = self.config.form or FORMS[0]
        if form == "eager":
            return fn
        if name not in self._graphs:
            self._graphs[name] = self._tf.function(fn, jit_compile=form == "xla", reduce_retracing=False)
        return self._graphs[name]

    def _tensor(self, array: np.ndarray, dtype: str):
        ops = self._keras.ops
        array = np.asarray(array)
        if not self._keras.backend.is_float_dtype(dtype):
            return array  # a bad-input case: as NumPy, as with `_mask`, so its dtype reaches the layer
        # the array's own dtype first: Keras' torch backend would otherwise read float64 as floatx
        return ops.cast(ops.convert_to_tensor(array, dtype=array.dtype.name), dtype)

    def _mask(self, mask: np.ndarray | None):
        # keeps the NumPy dtype (bool, int8, uint8, int32, int64). A float mask (a bad-input
        # case) stays NumPy, as a user may pass it: as a tensor, JAX without x64 would already
        # have made float64 float32 before the layer could name the dtype it was given
        if mask is None:
            return None
        mask = np.asarray(mask)
        if np.issubdtype(mask.dtype, np.floating):
            return mask
        return self._keras.ops.convert_to_tensor(mask)

    def _dtype_name(self, tensor) -> str:
        return self._keras.backend.standardize_dtype(tensor.dtype)

    def _host(self, tensor, dtype: str) -> np.ndarray:
        return np.array(self._keras.ops.convert_to_numpy(self._keras.ops.cast(tensor, dtype)))

    def _call(self, x, mask, training):
        if mask is None:
            return self.layer(x, training=training)
        return self.layer(x, training=training, mask=mask)

    def forward(self, x, x_dtype, mask, training):
        mask_t = self._mask(mask)
        if mask_t is None:
            call = self._in_form(f"forward-{training}", lambda x_: self._call(x_, None, training))
            return self._output(call(self._tensor(x, x_dtype)))
        call = self._in_form(f"forward-{training}-masked", lambda x_, m: self._call(x_, m, training))
        return self._output(call(self._tensor(x, x_dtype), mask_t))

    def _step(self, x_t, dy_t, mask_t):
        weights = [w for w in (self.layer.gamma, self.layer.beta) if w is not None]
        with self._tf.GradientTape() as tape:
            tape.watch(x_t)
            y = self._call(x_t, mask_t, True)
        # the vector-Jacobian product with dy is the gradient of sum(y * dy)
        # ZERO: a zero-size batch uses no weight; its gradient is zeros of the weight's shape
        zero = self._tf.UnconnectedGradients.ZERO
        sources = [x_t, *(w.value for w in weights)]  # tf.Variables: ZERO reads a TF dtype
        return (y, *tape.gradient(y, sources, output_gradients=dy_t, unconnected_gradients=zero))

    def forward_backward(self, x, x_dtype, mask, dy):
        args = [self._tensor(x, x_dtype), self._tensor(dy, x_dtype)]
        mask_t = self._mask(mask)
        if not _on_tensorflow():
            from maskbn_tf.autodiff import training_vjp

            kwargs = {} if mask_t is None else {"mask": mask_t}
            y, dx, weight_grads = training_vjp(self.layer, *args, **kwargs)
            weight_grads = [self._keras.ops.convert_to_numpy(g) for g in weight_grads]
        elif mask_t is None:
            y, dx, *weight_grads = self._in_form("step", lambda x_, dy_: self._step(x_, dy_, None))(*args)
        else:
            y, dx, *weight_grads = self._in_form("step-masked", self._step)(*args, mask_t)
        grads = iter(weight_grads)
        dgamma = np.asarray(next(grads)) if self.config.scale else None
        dbeta = np.asarray(next(grads)) if self.config.center else None
        return self._output(y), Gradients(x=self._output(dx), gamma=dgamma, beta=dbeta)

    def hvp(self, x, x_dtype, mask, dy, v):
        if not _on_tensorflow():
            raise Unsupported("the second-order cases use nested tf.GradientTape: TensorFlow backend only")
        x_t = self._tensor(x, x_dtype)
        mask_t = self._mask(mask)
        with self._tf.GradientTape() as outer:
            outer.watch(x_t)
            with self._tf.GradientTape() as inner:
                inner.watch(x_t)
                y = self._call(x_t, mask_t, True)
            grad = inner.gradient(y, x_t, output_gradients=self._tensor(dy, x_dtype))
        product = outer.gradient(grad, x_t, output_gradients=self._tensor(v, x_dtype))
        # None: the first gradient does not depend on x at all (detached); report it as the zeros it means
        return self._output(self._tf.zeros_like(x_t) if product is None else product)

    def _read_weight(self, name: str) -> np.ndarray | None:
        variable = getattr(self.layer, name)
        return None if variable is None else np.array(self._keras.ops.convert_to_numpy(variable))

    def _write_weight(self, name: str, value: np.ndarray) -> None:
        variable = getattr(self.layer, name)
        if variable is not None:
            variable.assign(np.asarray(value, dtype=variable.dtype))

    def round_trip(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "layer.keras"
        self._keras.saving.save_model(self.layer, path)
        return TFLayer(self._keras.saving.load_model(path), self.config)  # same form

    def export_portable(self, directory: Path) -> None:
        from maskbn_tf import save_portable

        save_portable(self.layer, directory)


def _config_of(layer, rank: int, dtype: str) -> LayerConfig:
    return LayerConfig(
        channels=int(layer.moving_mean.shape[0]),
        axis=layer.axis,
        rank=rank,
        decay=layer.momentum,
        epsilon=layer.epsilon,
        center=layer.center,
        scale=layer.scale,
        padded_output=layer.padded_output,
        dtype=dtype,
        # a layer from before the knob existed stores the population variance
        moving_var="unbiased" if getattr(layer, "unbiased_moving_variance", False) else "population",
    )


class TFShardedLayer(ReplicatedLayer):
    """One synchronized layer replicated over a MirroredStrategy of logical CPU devices."""

    def __init__(self, backend: TFBackend, config: LayerConfig, num_shards: int):
        import tensorflow as tf

        devices = tf.config.list_logical_devices("CPU")
        if len(devices) < num_shards:
            raise Unsupported(
                f"{num_shards} shards need {num_shards} logical CPU devices; TensorFlow has {len(devices)} "
                "(it was started before the tf backend could configure them)"
            )
        self._tf = tf
        # Reduction through one device rather than collective ops: collective groups of
        # different sizes (one strategy per shard count) cannot share a process.
        self.strategy = tf.distribute.MirroredStrategy(
            [d.name for d in devices[:num_shards]], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
        with self.strategy.scope():
            self.one = backend.layer(config, synchronized=True)

    def _distribute(self, values):
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: values[ctx.replica_id_in_sync_group]
        )

    def _run(self, replica_fn, *values):
        per_replica = [self._distribute(v) for v in values]
        results = self._tf.function(lambda *args: self.strategy.run(replica_fn, args=args))(*per_replica)
        return [self.strategy.experimental_local_results(r) for r in results]

    def forward(self, xs, x_dtype, masks, training):
        one = self.one
        x_t = [one._tensor(x, x_dtype) for x in xs]
        if masks[0] is None:
            (ys,) = self._run(lambda x: (one._call(x, None, training),), x_t)
        else:
            (ys,) = self._run(lambda x, m: (one._call(x, m, training),), x_t, [one._mask(m) for m in masks])
        return [one._output(y) for y in ys]

    def forward_backward(self, xs, x_dtype, masks, dys):
        one, tf = self.one, self._tf
        weights = [w for w in (one.layer.gamma, one.layer.beta) if w is not None]

        def step(x, dy, m=None):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = one._call(x, m, True)
            return (y, *tape.gradient(y, [x, *weights], output_gradients=dy))

        values = [[one._tensor(x, x_dtype) for x in xs], [one._tensor(dy, x_dtype) for dy in dys]]
        if masks[0] is not None:
            values.append([one._mask(m) for m in masks])
        ys, dxs, *weight_grads = self._run(step, *values)
        per_weight = iter(weight_grads)
        dgammas = next(per_weight) if one.config.scale else [None] * len(dxs)
        dbetas = next(per_weight) if one.config.center else [None] * len(dxs)
        replicas = [
            Gradients(one._output(dx), None if g is None else g.numpy(), None if b is None else b.numpy())
            for dx, g, b in zip(dxs, dgammas, dbetas, strict=True)
        ]
        return [one._output(y) for y in ys], ShardedGradients.of_replicas(replicas)


class TFBackend(Backend):
    """maskbn_tf.MaskedBatchNormalization (Keras 3 on TensorFlow) for the conformance harness."""

    name = "tf"
    stock_moving_var = "population"
    #: Keras' eager call with the state read back costs 17.6 ms here (2-core CI machine,
    #: quiet; 27 ms beside another env), so 10 000 calls took 271 s of CI's fuzz folder.
    #: 3 000 calls still take each batch kind 1 000 times, and the float32 error bound of
    #: the moving average (decay 0.99) is at its steady state after about 700 calls.
    long_run_steps = 3_000
    fuzz_example_scale = 4

    def __init__(self):
        self._keras = _keras()
        self.forms = _forms()
        if _on_tensorflow():
            configure_shard_devices()

    def _build(self, layer, config: LayerConfig):
        # Keras builds from a shape; only the channel axis needs a size. An out-of-range axis
        # raises here, in build, like it would on a first call.
        shape = [None] * config.rank
        if -config.rank <= config.axis < config.rank:
            shape[config.axis] = config.channels
        layer.build(tuple(shape))
        return TFLayer(layer, config)

    def _check_dtype(self, config: LayerConfig) -> None:
        backend = self._keras.config.backend()
        if config.dtype == "float64" and backend == "jax":
            import jax

            if not jax.config.jax_enable_x64:
                raise Unsupported("JAX without jax_enable_x64 has no float64: Keras-JAX computes it in float32")
        if config.dtype == "float64" and backend == "torch":
            # measured: a float64 keras.layers.BatchNormalization on Keras-torch is 1e-6 off a
            # float64 reference, ours 4e-8: not float64 precision, so these cases cannot hold there
            raise Unsupported("Keras' torch backend does not reach float64 precision (stock BN: 1e-6 off)")

    def layer(self, config: LayerConfig, synchronized: bool = False) -> TFLayer:
        self._check_dtype(config)
        from maskbn_tf import MaskedBatchNormalization

        layer = MaskedBatchNormalization(
            padded_output=config.padded_output, **_keras_kwargs(config, synchronized), **_moving_var_knob(config)
        )
        return self._build(layer, config)

    def sharded_layer(self, config: LayerConfig, num_shards: int) -> TFShardedLayer:
        if not _on_tensorflow():
            raise Unsupported(
                f"synchronized=True merges through tf.distribute: TensorFlow backend only (Keras runs on "
                f"{self._keras.config.backend()})"
            )
        return TFShardedLayer(self, config, num_shards)

    def import_portable(self, directory: Path) -> TFLayer:
        from maskbn_tf import load_portable

        layer = load_portable(directory)
        dtype = self._keras.backend.standardize_dtype(layer.moving_mean.dtype)
        return TFLayer(layer, _config_of(layer, rank=len(layer.get_build_config()["input_shape"]), dtype=dtype))

    def from_stock_checkpoint(self, stock: TFLayer, directory: Path) -> TFLayer:
        """Keras' usual checkpoint is a model's ``.weights.h5``: save a model holding the stock
        layer, then load it into the same model holding the masked layer."""
        from maskbn_tf import load_stock_weights

        keras, config = self._keras, stock.config
        axis = config.axis % config.rank
        if axis == 0:
            raise Unsupported("a Keras model's first axis is its batch axis, so it cannot be the channel axis")
        shape = [None] * (config.rank - 1)
        shape[axis - 1] = config.channels

        def model_of(layer):
            inputs = keras.Input(shape=tuple(shape))
            return keras.Model(inputs, layer(inputs))

        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "stock.weights.h5"
        model_of(stock.layer).save_weights(path)
        masked = self.layer(config)
        load_stock_weights(model_of(masked.layer), path)
        return masked

    def stock_layer(self, config: LayerConfig, synchronized: bool = False) -> TFLayer:
        self._check_dtype(config)
        layer = self._keras.layers.BatchNormalization(**_keras_kwargs(config, synchronized))
        return self._build(layer, config)

    def process_variants(self) -> dict[str, dict[str, str]]:
        """The layer on Keras' JAX and torch backends, where those frameworks are installed
        (Keras fixes its backend per process; from TensorFlow only, so a child adds none)."""
        if not _on_tensorflow():
            return {}
        return {f"keras-{b}": {"KERAS_BACKEND": b} for b in ("jax", "torch") if importlib.util.find_spec(b)}

    def expectations_path(self) -> Path | None:
        return Path(__file__).with_name("conformance_expectations.yaml")
