"""`MaskedBatchNormalization`: a Keras 3 batch norm whose batch statistics come from real rows only.

The maths is written with `keras.ops` and one `keras.ops.custom_gradient`, so the
layer traces under `tf.function`, compiles under XLA (`jit_compile=True`) and has
no Python branch on a tensor value (the empty-mask fallback is a `where`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import constraints, initializers, ops, regularizers

PADDED_OUTPUTS = ("normalize", "zero")


def _dtype_name(dtype) -> str:
    return keras.backend.standardize_dtype(dtype)


def _is_mask_dtype(name: str) -> bool:
    return name == "bool" or keras.backend.is_int_dtype(name)


def _check_mask_dtype(mask) -> None:
    """TypeError for a mask that is neither bool nor integer (a float mask is ambiguous)."""
    name = _dtype_name(mask.dtype)
    if not _is_mask_dtype(name):
        raise TypeError(
            f"mask dtype {name} is not supported: pass a bool or integer mask (non-zero means a real "
            "row); a float mask is rejected because its rounding would decide which rows count"
        )


def _read(variable):
    """The variable's current value as a tensor (never the variable itself)."""
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        # tf.custom_gradient rejects a function that reads variables unless its grad_fn takes
        # `variables`; handing it the read value keeps gamma/beta plain inputs.
        return tf.identity(variable.value)
    return ops.convert_to_tensor(variable)


def _in_xla() -> bool:
    """True while tracing for XLA (`tf.function(jit_compile=True)`, or inside such a function).

    Decides only how a reduction's operand is spelled, never a value: XLA:CPU hands a sum
    whose operand ends in a select to its fast reduction kernel, and a sum of a product to
    a reduce-window tree about twice as slow, so under XLA the masked products are summed
    as ``where(m, a * b, 0)``; elsewhere that select would be one more pass over the tensor.
    """
    if keras.config.backend() != "tensorflow":
        return False
    import tensorflow as tf

    if tf.executing_eagerly():
        return False
    try:  # a private TF module: without it, the plain spelling (correct, slower under XLA)
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return False


def _dims_fit(shape, expected) -> bool:
    # None (unknown while tracing) fits anything; the runtime broadcast catches the rest.
    return len(shape) == len(expected) and all(a is None or b is None or a == b for a, b in zip(shape, expected))


@keras.saving.register_keras_serializable(package="maskbn")
class MaskedBatchNormalization(keras.layers.Layer):
    """Batch normalization whose batch statistics come only from the real rows of a padded batch.

    A drop-in for `keras.layers.BatchNormalization` in pipelines that pad to a
    static shape (sparse-conv cells, variable-length sequences, point clouds):
    padded rows do not drag the mean toward the padding value nor shrink the
    variance.

    Training call with n >= 1 real positions: per channel, mean and population
    variance over the real positions (corrected two-pass, reduced in float32
    even for float16/bfloat16 input), every row normalized with them, and
    ``moving = momentum * moving + (1 - momentum) * batch``. Training call with
    no real position: normalized with the moving statistics, nothing updated.
    Inference call: normalized with the moving statistics.

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
        synchronized: in training under a `tf.distribute` strategy with several
            replicas, merge the per-replica (count, sum, centred sum of squares)
            with an all-reduce, so every replica normalizes with the statistics of
            the whole global batch (replicas without any real row included); the
            backward pass all-reduces its sums too. TensorFlow backend only.
        padded_output: ``"normalize"`` (padded rows are normalized like real
            ones, as a stock batch norm would) or ``"zero"`` (padded rows of the
            output are exactly 0).
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``...).

    Call arguments:
        inputs: a float tensor with a channel axis.
        training: batch statistics and moving-average updates when True (and the
            layer is trainable); moving statistics otherwise.
        mask: bool or integer tensor, non-zero for real positions, shaped as
            ``inputs`` without the channel axis, or as ``inputs`` with a size-1
            channel axis. Propagated Keras masks (`Masking`,
            `Embedding(mask_zero=True)`) arrive here automatically and are
            handed on unchanged. ``None`` means every position is real.

    Weights are named and ordered as in `keras.layers.BatchNormalization`
    (gamma, beta, moving_mean, moving_variance), so
    ``layer.set_weights(stock_bn.get_weights())`` works. Under the
    ``mixed_float16`` / ``mixed_bfloat16`` policies the variables stay float32
    and the output has the compute dtype.
    """

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
        synchronized=False,
        padded_output="normalize",
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
        self.synchronized = bool(synchronized)
        self.padded_output = padded_output
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
        """Create gamma, beta, moving_mean, moving_variance (in that order) for ``input_shape``."""
        input_shape = tuple(input_shape)
        channels = input_shape[self._channel_axis(input_shape)]
        if channels is None:
            raise ValueError(
                f"the channel axis {self.axis} of input shape {input_shape} must be known to build the layer"
            )
        self.channels = int(channels)
        shape = (self.channels,)
        # autocast=False: the weights stay in the variable dtype (float32 under mixed precision).
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
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )

    # -- calling -----------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        # Keras autocasts float arguments (a mask included) to the compute dtype before `call`
        # sees them; check the mask first so the error names the dtype the caller passed.
        mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
        if mask is not None and hasattr(mask, "dtype"):
            _check_mask_dtype(mask)
        return super().__call__(*args, **kwargs)

    def _validate(self, inputs, mask):
        """Every check runs before any state changes; returns (channel axis, bool mask or None)."""
        x_dtype = _dtype_name(inputs.dtype)
        if not keras.backend.is_float_dtype(x_dtype):
            raise TypeError(f"x dtype {x_dtype} is not a floating dtype: MaskedBatchNormalization needs float input")
        x_shape = tuple(inputs.shape)
        if 0 in x_shape:
            # (a size known only at run time cannot be checked here: such a batch has no real
            # row and takes the empty-mask path)
            raise ValueError(f"x shape {x_shape} is empty: batch normalization needs at least one position")
        axis = self._channel_axis(x_shape)
        if x_shape[axis] is not None and x_shape[axis] != self.channels:
            raise ValueError(
                f"x shape {x_shape} has {x_shape[axis]} channels on axis {self.axis}, "
                f"but the layer was built for {self.channels} channels"
            )
        if mask is None:
            return axis, None
        _check_mask_dtype(mask)
        m_shape = tuple(mask.shape)
        without_channel = x_shape[:axis] + x_shape[axis + 1 :]
        unit_channel = x_shape[:axis] + (1,) + x_shape[axis + 1 :]
        if _dims_fit(m_shape, without_channel):
            mask = ops.expand_dims(mask, axis)
        elif not _dims_fit(m_shape, unit_channel):
            raise ValueError(
                f"mask shape {m_shape} does not fit x shape {x_shape}: expected {without_channel} "
                f"(x without its channel axis {self.axis}) or {unit_channel} (a size-1 channel axis)"
            )
        mask = mask if _dtype_name(mask.dtype) == "bool" else ops.not_equal(mask, 0)
        return axis, mask

    def call(self, inputs, training=None, mask=None):
        axis, m = self._validate(inputs, mask)
        out_dtype = inputs.dtype
        # float16/bfloat16 are reduced and normalized in float32; a float64 input stays float64.
        cdt = "float64" if _dtype_name(out_dtype) == "float64" else "float32"
        x = ops.cast(inputs, cdt)
        rank = len(x.shape)
        red = tuple(i for i in range(rank) if i != axis)
        bshape = [1] * rank
        bshape[axis] = self.channels

        def per_channel(v):
            return ops.reshape(ops.cast(v, cdt), bshape)

        def real_or(a, b):
            return a if m is None else ops.where(m, a, b)

        moving_mean = per_channel(self.moving_mean)
        moving_var = per_channel(self.moving_variance)
        use_batch = bool(training) and self.trainable

        if use_batch:
            # Identity on one device; a cross-replica sum under a synchronized strategy.
            replica_sum = self._replica_sum()
            if m is None:
                n = 1
                for i in red:
                    n = n * ops.shape(x)[i]
                n = ops.cast(n, cdt)
            else:
                n = ops.cast(ops.sum(ops.cast(m, "int32")), cdt)
            xs = real_or(x, 0.0)
            xla_selects = m is not None and _in_xla()
            n, total = replica_sum(n, ops.sum(xs, axis=red, keepdims=True))
            n_safe = ops.maximum(n, 1.0)
            has_rows = ops.greater(n, 0.0)
            batch_mean = total / n_safe
            # corrected two-pass: the centred sum corrects the rounding of the mean, so the
            # variance keeps its relative accuracy for |mean| / std up to 1e6.
            d = real_or(xs - batch_mean, 0.0)
            # Under XLA, real_or(d * d, 0): the same values (d is 0 on padded rows), reduced by
            # XLA:CPU's fast kernel instead of its reduce-window tree (see _in_xla).
            dd = real_or(d * d, 0.0) if xla_selects else d * d
            sum_sq = ops.sum(dd, axis=red, keepdims=True)
            sum_sq, sum_d = replica_sum(sum_sq, ops.sum(d, axis=red, keepdims=True))
            batch_var = sum_sq / n_safe - ops.square(sum_d / n_safe)
            batch_var = ops.maximum(batch_var, 0.0)
            # The custom gradient below already accounts for the statistics' dependence on x.
            batch_mean = ops.stop_gradient(batch_mean)
            batch_var = ops.stop_gradient(batch_var)
            # Empty mask: fall back to the moving statistics, as a select (traceable, jit-safe).
            mean = ops.where(has_rows, batch_mean, moving_mean)
            var = ops.where(has_rows, batch_var, moving_var)
        else:
            n_safe = has_rows = None
            mean, var = moving_mean, moving_var
            replica_sum = None

        y = self._normalize(x, m, red, mean, var, per_channel, n_safe, replica_sum)

        if use_batch:
            # Shape validation ran above, so a call that raises never reaches these updates.
            self._update_moving(self.moving_mean, moving_mean, batch_mean, has_rows)
            self._update_moving(self.moving_variance, moving_var, batch_var, has_rows)
        return ops.cast(y, out_dtype)

    def _update_moving(self, variable, moving, batch, has_rows):
        new = moving * self.momentum + batch * (1.0 - self.momentum)
        new = ops.where(has_rows, new, moving)
        variable.assign(ops.cast(ops.reshape(new, (self.channels,)), variable.dtype))

    def _replica_sum(self):
        """f(*tensors) -> the tensors summed over the replicas that share the batch statistics.

        The identity unless ``synchronized`` and inside a replica context with more
        than one replica. The tensors go through a single all-reduce, packed flat.
        """

        def local(*tensors):
            return tensors

        if not self.synchronized:
            return local
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return local

        def summed(*tensors):
            flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
            flat = context.all_reduce(tf.distribute.ReduceOp.SUM, flat)
            sizes = [int(np.prod(t.shape)) for t in tensors]
            return tuple(tf.reshape(part, tf.shape(t)) for part, t in zip(tf.split(flat, sizes), tensors))

        return summed

    def _normalize(self, x, m, red, mean, var, per_channel, n_safe, replica_sum):
        """y = gamma * (x - mean) * rsqrt(var + eps) + beta with the masked-BN gradient.

        ``n_safe`` / ``replica_sum`` are None when ``mean`` / ``var`` are the
        moving statistics (constants); otherwise ``mean`` / ``var`` are the batch
        statistics of the real rows (of every replica, through ``replica_sum``)
        and the backward pass includes their dependence on x.
        """
        r = ops.rsqrt(var + self.epsilon)
        params = []
        if self.scale:
            params.append(_read(self.gamma))
        if self.center:
            params.append(_read(self.beta))
        zero_padded = self.padded_output == "zero"
        scale, center = self.scale, self.center
        xla_selects = m is not None and _in_xla()

        def real_or(a, b):
            return a if m is None else ops.where(m, a, b)

        @ops.custom_gradient
        def normalize(x, *params):
            gamma = per_channel(params[0]) if scale else None
            beta = per_channel(params[-1]) if center else None
            factor = r if gamma is None else gamma * r
            # (x - mean) first: folding mean into an offset would cancel catastrophically
            # when |mean| >> std.
            y = (x - mean) * factor
            if beta is not None:
                y = y + beta
            if zero_padded:
                y = real_or(y, 0.0)

            def grad(*args, upstream=None):
                dy = args[0] if upstream is None else upstream
                dy = ops.cast(dy, x.dtype)
                # Padded rows are constants: their dy never counts, and xhat is computed on
                # where(m, x, 0) so NaN/Inf garbage cannot reach any product (0 * NaN = NaN).
                dy_real = real_or(dy, 0.0)
                xhat = (real_or(x, 0.0) - mean) * r
                s1 = ops.sum(dy_real, axis=red, keepdims=True)
                # Under XLA, the same values spelled as a select (dy_real is 0 on padded rows).
                dy_xhat = real_or(dy * xhat, 0.0) if xla_selects else dy_real * xhat
                s2 = ops.sum(dy_xhat, axis=red, keepdims=True)
                g = dy_real
                if n_safe is not None:
                    # Batch statistics depend on every real row (of every replica: the sums are
                    # merged like the forward's). With no real row, dy_real, s1 and s2 are all
                    # 0, so this term is 0 and the gradient is all zeros.
                    all_s1, all_s2 = replica_sum(s1, s2)
                    g = dy_real - (all_s1 + xhat * all_s2) / n_safe
                dx = real_or(factor * g, 0.0)
                # gamma/beta get this replica's share; the optimizer sums the replicas' gradients.
                grads = [dx]
                if scale:
                    grads.append(ops.cast(ops.reshape(s2, params[0].shape), params[0].dtype))
                if center:
                    grads.append(ops.cast(ops.reshape(s1, params[-1].shape), params[-1].dtype))
                return tuple(grads)

            return y, grad

        return normalize(x, *params)

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
                "synchronized": self.synchronized,
                "padded_output": self.padded_output,
            }
        )
        return config
