"""`MaskedBatchNormalization`: a Keras 3 batch norm whose batch statistics come from real rows only.

The layer does the bookkeeping (validation, variables, moving averages, batch
renormalization's corrections); the maths lives in `maskbn_tf.ops`, written with
`keras.ops` and one `keras.ops.custom_gradient`, so the layer runs on every Keras
backend, traces under `tf.function`, compiles under XLA and has no Python branch on a
tensor value (the empty-mask fallback is a `where`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import constraints, initializers, ops, regularizers

from maskbn_tf import ops as masked_ops

PADDED_OUTPUTS = ("normalize", "zero")
RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _dtype_name(dtype) -> str:
    return keras.backend.standardize_dtype(dtype)


def _is_mask_dtype(name: str) -> bool:
    return name == "bool" or keras.backend.is_int_dtype(name)


def _check_mask_dtype(mask) -> None:
    """TypeError for a mask that is neither bool nor integer (a float mask is ambiguous)."""
    name = _dtype_name(mask.dtype)
    if not _is_mask_dtype(name):
        raise _unsupported_mask_dtype(name)


def _unsupported_mask_dtype(name: str) -> TypeError:
    return TypeError(
        f"mask dtype {name} is not supported: pass a bool or integer mask (non-zero means a real "
        "row), e.g. `mask > 0` (a list: `np.asarray(mask) > 0`) or `mask.astype(bool)`; a float "
        "mask is rejected because its rounding would decide which rows count"
    )


def _check_x_dtype(dtype) -> None:
    name = _dtype_name(dtype)
    if not keras.backend.is_float_dtype(name):
        raise TypeError(f"x dtype {name} is not a floating dtype: MaskedBatchNormalization needs float input")


def _as_mask_tensor(mask):
    """A Python list / NumPy mask as a tensor, its dtype checked first (a tensor passes through)."""
    if isinstance(mask, (list, tuple, np.ndarray, bool, int)):
        array = np.asarray(mask)
        if array.dtype == object:
            raise TypeError(f"mask {type(mask).__name__} is ragged or not numeric: pass a bool array")
        if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)):
            raise _unsupported_mask_dtype(str(array.dtype))
        return ops.convert_to_tensor(array)
    return mask


def _read(variable):
    """The variable's current value as a tensor (never the variable itself)."""
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        # tf.custom_gradient rejects a function that reads variables unless its grad_fn takes
        # `variables`; handing it the read value keeps gamma/beta plain inputs.
        return tf.identity(variable.value)
    return ops.convert_to_tensor(variable)


def _clone_initializer(initializer):
    """A fresh copy (a new seed for seeded initializers), as Keras' own layer does."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def _check_renorm_clipping(renorm_clipping) -> dict:
    clipping = dict(renorm_clipping or {})
    if set(clipping) - set(RENORM_CLIPPING_KEYS):
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {renorm_clipping}. "
            f"Supported values: {list(RENORM_CLIPPING_KEYS)}."
        )
    rmax, rmin, dmax = (clipping.get(k) for k in RENORM_CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            f"rmax should be greater than rmin in the `renorm_clipping` argument. Received: rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}.")
    return clipping


@keras.saving.register_keras_serializable(package="maskbn")
class MaskedBatchNormalization(keras.layers.Layer):
    """Batch normalization whose batch statistics come only from the real rows of a padded batch.

    A drop-in for `keras.layers.BatchNormalization` in pipelines that pad to a
    static shape (sparse-conv cells, variable-length sequences, point clouds):
    padded rows do not drag the mean toward the padding value nor shrink the
    variance.

    Training call with n_c >= 1 real positions in channel c: mean and population
    variance over them (one pass shifted by a real value of the channel, reduced in
    float32 even for float16/bfloat16 input: accurate for |mean|/std up to 1e6 and
    millions of rows), every row normalized with them, and
    ``moving = momentum * moving + (1 - momentum) * batch``. A channel with no real
    position is normalized with the moving statistics, which it keeps. Inference
    call: normalized with the moving statistics.

    Padded rows are constants for autodiff: no gradient reaches ``x``, ``gamma``,
    ``beta`` or the statistics through them, and NaN/Inf garbage in them never
    touches real outputs, moving statistics or gradients.

    Args:
        axis: the channel axis of the input (the axis that is *not* reduced).
        momentum: decay of the moving statistics, as in `keras.layers.BatchNormalization`.
        epsilon: added to the variance before the reciprocal square root.
        center: learn an offset ``beta``; no ``beta`` weight exists when False.
        scale: learn a scale ``gamma``; no ``gamma`` weight exists when False.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer: initializers of the four weights.
        beta_regularizer, gamma_regularizer: optional regularizers.
        beta_constraint, gamma_constraint: optional constraints.
        renorm, renorm_clipping, renorm_momentum: batch renormalization, with the
            meaning of `keras.layers.BatchNormalization` (r and d from the masked
            batch statistics, clipped, constants for autodiff; ``moving_stddev``,
            ``renorm_mean`` and ``renorm_stddev`` variables).
        synchronized: in training under a `tf.distribute` strategy with several
            replicas, merge the per-replica (count, sums about a shared shift)
            with an all-reduce, so every replica normalizes with the statistics of
            the whole global batch (replicas without any real row included); the
            backward pass all-reduces its sums too. TensorFlow backend only.
        padded_output: ``"normalize"`` (padded rows are normalized like real
            ones, as a stock batch norm would) or ``"zero"`` (padded rows of the
            output are exactly 0).
        unbiased_moving_variance: store n/(n-1) x the batch variance in the moving
            variance (PyTorch's convention; n = 1 stores the variance as is) instead
            of the population variance (Keras' convention, the default).
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``...).

    Call arguments:
        inputs: a float tensor with a channel axis.
        training: batch statistics and moving-average updates when True (and the
            layer is trainable); moving statistics otherwise.
        mask: bool or integer (tensor, NumPy array or list), non-zero for real
            positions: shaped as ``inputs`` without the channel axis; or, as Keras
            hands masks on, of rank(inputs) - 1 covering the leading axes; or of
            ``inputs``' rank, broadcastable to it (a mask that varies along the
            channel axis gives per-channel counts). Where a rank(inputs) - 1 shape
            fits both readings, "without the channel axis" wins. Propagated Keras
            masks (`Masking`, `Embedding(mask_zero=True)`) arrive here
            automatically and are handed on unchanged. ``None``: every position is real.

    Weights are named and ordered as in `keras.layers.BatchNormalization`
    (gamma, beta, moving_mean, moving_variance, then with renorm moving_stddev,
    renorm_mean, renorm_stddev), so ``layer.set_weights(stock_bn.get_weights())``
    works. Under the ``mixed_float16`` / ``mixed_bfloat16`` policies the variables
    stay float32 and the output has the compute dtype.
    """

    # what build() creates; None before (Keras variables are untyped: Any)
    channels: int | None
    gamma: Any
    beta: Any
    moving_mean: Any
    moving_variance: Any
    moving_stddev: Any

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        padded_output="normalize",
        unbiased_moving_variance=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if synchronized and keras.config.backend() != "tensorflow":
            raise ValueError(
                "MaskedBatchNormalization(synchronized=True) merges statistics through tf.distribute and "
                f"needs the TensorFlow backend; Keras runs on {keras.config.backend()!r}"
            )
        if padded_output not in PADDED_OUTPUTS:
            raise ValueError(f"padded_output must be one of {PADDED_OUTPUTS}, got {padded_output!r}")
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        # as Keras: the argument is kept as given (None stays None in the config)
        self.renorm_clipping = renorm_clipping
        self._clipping = _check_renorm_clipping(renorm_clipping) if self.renorm else {}
        self.renorm_momentum = renorm_momentum
        self.synchronized = bool(synchronized)
        self.padded_output = padded_output
        self.unbiased_moving_variance = bool(unbiased_moving_variance)
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.channels = None

    # -- construction ------------------------------------------------------------------------

    def _channel_axis(self, shape) -> int:
        rank = len(shape)
        if not -rank <= self.axis < rank:
            raise ValueError(f"axis {self.axis} is out of range for an input of rank {rank} (shape {tuple(shape)})")
        return self.axis % rank

    def build(self, input_shape):
        """Create gamma, beta, moving_mean, moving_variance (and the renorm variables) for ``input_shape``."""
        input_shape = tuple(input_shape)
        channels = input_shape[self._channel_axis(input_shape)]
        if channels is None:
            raise ValueError(
                f"the channel axis {self.axis} of input shape {input_shape} must be known to build the layer"
            )
        self.channels = int(channels)
        shape = (self.channels,)

        # autocast=False: the weights stay in the variable dtype (float32 under mixed precision).
        def state(name, initializer):
            return self.add_weight(shape=shape, name=name, initializer=initializer, trainable=False, autocast=False)

        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = state("moving_mean", self.moving_mean_initializer)
        self.moving_variance = state("moving_variance", self.moving_variance_initializer)
        if self.renorm:
            # As Keras: the stddevs start as the square root of the variance initializer.
            def stddev_initializer(shape, dtype=None):
                return ops.sqrt(_clone_initializer(self.moving_variance_initializer)(shape, dtype=dtype))

            self.moving_stddev = state("moving_stddev", stddev_initializer)
            self.renorm_mean = state("renorm_mean", _clone_initializer(self.moving_mean_initializer))
            self.renorm_stddev = state("renorm_stddev", stddev_initializer)

    # -- calling -----------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        # Keras autocasts float arguments (a mask included) to the compute dtype before `call`
        # sees them, and JAX without x64 turns NumPy int64/float64 into 32 bits: check the mask
        # and a NumPy x first so the error names the dtype the caller passed.
        inputs = args[0] if args else kwargs.get("inputs")
        if isinstance(inputs, np.ndarray):
            _check_x_dtype(inputs.dtype)
        if "mask" in kwargs:
            mask = kwargs["mask"] = _as_mask_tensor(kwargs["mask"])
        elif len(args) > 2:
            mask = _as_mask_tensor(args[2])
            args = (*args[:2], mask, *args[3:])
        else:
            mask = None
        if mask is not None and hasattr(mask, "dtype"):
            _check_mask_dtype(mask)
        return super().__call__(*args, **kwargs)

    def _validate(self, inputs, mask):
        """Every check runs before any state changes; returns (channel axis, bool mask or None)."""
        _check_x_dtype(inputs.dtype)
        x_shape = tuple(inputs.shape)
        axis = self._channel_axis(x_shape)
        if x_shape[axis] is not None and x_shape[axis] != self.channels:
            raise ValueError(
                f"x shape {x_shape} has {x_shape[axis]} channels on axis {self.axis}, "
                f"but the layer was built for {self.channels} channels"
            )
        if mask is None:
            return axis, None
        mask = _as_mask_tensor(mask)
        _check_mask_dtype(mask)
        return axis, masked_ops.broadcast_mask(mask, x_shape, axis)

    def call(self, inputs, training=None, mask=None):
        axis, m = self._validate(inputs, mask)
        out_dtype = inputs.dtype
        # float16/bfloat16 are reduced and normalized in float32; a float64 input stays float64.
        cdt = "float64" if _dtype_name(out_dtype) == "float64" else "float32"
        if 0 in tuple(inputs.shape):
            # a zero-size batch: an empty output, nothing updated (as stock PyTorch)
            return ops.cast(inputs, out_dtype)
        x = ops.cast(inputs, cdt)
        rank = len(x.shape)
        bshape = [self.channels if i == axis else 1 for i in range(rank)]

        def per_channel(v):
            return masked_ops.reshape(ops.cast(v, cdt), bshape)

        moving_mean = per_channel(self.moving_mean)
        moving_var = per_channel(self.moving_variance)
        params = {
            "gamma": _read(self.gamma) if self.scale else None,
            "beta": _read(self.beta) if self.center else None,
        }
        normalize = dict(axis=axis, epsilon=self.epsilon, zero_padded=self.padded_output == "zero")

        if not (bool(training) and self.trainable):
            y = masked_ops.masked_normalize(
                x, m, moving_mean, ops.zeros_like(moving_mean), moving_var, params, **normalize
            )
            return ops.cast(y, out_dtype)

        # Identity on one device; a cross-replica sum under a synchronized strategy.
        replica_sum = self._replica_sum()
        moments = masked_ops.masked_moments(x, m, axis, fallback_shift=moving_mean, replica_sum=replica_sum)
        count = moments.count
        has_rows = ops.greater(count, 0.0)
        # The custom gradient already accounts for the statistics' dependence on x.
        shift, delta, batch_var = (ops.stop_gradient(t) for t in (moments.shift, moments.delta, moments.variance))
        batch_mean = shift + delta
        # A channel without a real position: the moving statistics (shift is its moving mean there).
        delta = ops.where(has_rows, delta, 0.0)
        var = ops.where(has_rows, batch_var, moving_var)
        renorm = self._renorm_corrections(batch_mean, batch_var, has_rows, cdt) if self.renorm else None
        y = masked_ops.masked_normalize(
            x,
            m,
            shift,
            delta,
            var,
            params,
            count=count,
            # constants to the custom gradient, which accounts for x itself
            centered=ops.stop_gradient(moments.centered),
            centered_real=ops.stop_gradient(moments.centered_real),
            renorm=renorm,
            replica_sum=replica_sum,
            **normalize,
        )
        # Shape validation ran above, so a call that raises never reaches these updates.
        self._update_moving_statistics(batch_mean, batch_var, count, has_rows, cdt)
        return ops.cast(y, out_dtype)

    def _renorm_corrections(self, mean, variance, has_rows, cdt):
        """Batch renormalization's (r, d), as Keras computes them, from the masked batch statistics."""
        stddev = ops.sqrt(variance + self.epsilon)
        shape = masked_ops.shape_of(mean)
        renorm_mean = masked_ops.reshape(ops.cast(self.renorm_mean, cdt), shape)
        renorm_stddev = ops.maximum(
            masked_ops.reshape(ops.cast(self.renorm_stddev, cdt), shape), ops.cast(np.sqrt(self.epsilon), cdt)
        )
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        rmin, rmax, dmax = (self._clipping.get(k) for k in ("rmin", "rmax", "dmax"))
        if rmin is not None:
            r = ops.maximum(r, rmin)
        if rmax is not None:
            r = ops.minimum(r, rmax)
        if dmax is not None:
            d = ops.clip(d, -dmax, dmax)
        # a channel without real rows is normalized with the moving statistics: no correction
        return ops.where(has_rows, r, 1.0), ops.where(has_rows, d, 0.0)

    def _update_moving_statistics(self, batch_mean, batch_var, count, has_rows, cdt):
        if self.unbiased_moving_variance:
            # n / (n - 1), and 1 for n = 1 (interface decision 1)
            batch_var = batch_var * count / ops.maximum(count - 1.0, 1.0)
        updates = []
        if self.renorm:
            stddev = ops.sqrt(batch_var + self.epsilon)
            updates += [
                (self.renorm_mean, batch_mean, self.renorm_momentum),
                (self.renorm_stddev, stddev, self.renorm_momentum),
            ]
        updates.append((self.moving_mean, batch_mean, self.momentum))
        if self.renorm:
            updates.append((self.moving_stddev, stddev, self.momentum))
        else:
            updates.append((self.moving_variance, batch_var, self.momentum))
        for variable, batch, momentum in updates:
            self._assign_moving(variable, batch, momentum, has_rows, cdt)
        if self.renorm:
            # As Keras: the moving variance follows the moving stddev (ReLU against rounding).
            stddev = ops.cast(self.moving_stddev, cdt)
            self.moving_variance.assign(ops.cast(ops.relu(stddev * stddev - self.epsilon), self.moving_variance.dtype))

    def _assign_moving(self, variable, batch, momentum, has_rows, cdt):
        moving = masked_ops.reshape(ops.cast(variable, cdt), masked_ops.shape_of(batch))
        new = ops.where(has_rows, moving * momentum + batch * (1.0 - momentum), moving)
        variable.assign(ops.cast(masked_ops.reshape(new, (self.channels,)), variable.dtype))

    def _replica_sum(self):
        """f(*tensors) -> the tensors summed over the replicas that share the batch statistics.

        `maskbn_tf.ops.local_sum` unless ``synchronized`` and inside a replica context with
        more than one replica. The tensors go through a single all-reduce, packed flat.
        """
        if not self.synchronized:
            return masked_ops.local_sum
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return masked_ops.local_sum

        def summed(*tensors):
            flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
            flat = context.all_reduce(tf.distribute.ReduceOp.SUM, flat)
            sizes = [int(np.prod(t.shape)) for t in tensors]
            return tuple(tf.reshape(part, tf.shape(t)) for part, t in zip(tf.split(flat, sizes), tensors))

        return summed

    def compute_mask(self, inputs, mask=None):
        """Hand the incoming Keras mask on unchanged."""
        return mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": initializers.serialize(self.beta_initializer),
                "gamma_initializer": initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
                "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
                "beta_regularizer": regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(self.gamma_constraint),
                "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping,
                "renorm_momentum": self.renorm_momentum,
                "synchronized": self.synchronized,
                "padded_output": self.padded_output,
                "unbiased_moving_variance": self.unbiased_moving_variance,
            }
        )
        return config
