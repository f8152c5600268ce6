"""Keras 3 / TensorFlow competitors: maskbn_tf vs keras BatchNormalization (with and without its
mask argument), gather/BN/scatter and x * a + b; eager, tf.function and tf.function(jit_compile=True)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from importlib.metadata import version

import keras
import tensorflow as tf

import maskbn_tf
from benchmarks.common import NotApplicable, Step

tf.get_logger().setLevel("ERROR")  # per-group tf.functions retrace on purpose; no warning for each

_DTYPES = {"float32": (tf.float32, "float32"), "bfloat16": (tf.bfloat16, "mixed_bfloat16")}


class Backend:
    memory_method = (
        "n/a: TensorFlow tracks allocations only on GPU devices "
        "(tf.config.experimental.get_memory_info('CPU:0') returns zeros)"
    )

    def __init__(self) -> None:
        if keras.config.backend() != "tensorflow":
            raise ImportError(
                f"maskbn_tf is benchmarked on the TensorFlow backend; KERAS_BACKEND={keras.config.backend()}"
            )

    def info(self) -> dict:
        return {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "maskbn_tf": version("maskbn-tf"),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count(),
            "device": "cpu",
        }

    def teardown_group(self) -> None:
        keras.backend.clear_session()

    def setup_group(self, spec: dict, dtype: str, mode: str, form: str, x_np, g_np) -> dict:
        dt, policy = _DTYPES[dtype]
        shape = tuple(spec["shape"])
        rank = len(shape)
        axis = spec["channel_axis"] % rank
        channels = shape[axis]
        channels_last = axis == rank - 1
        train = mode == "train"
        jit = form == "compiled"
        bshape = [channels if i == axis else 1 for i in range(rank)]
        to_last = [i for i in range(rank) if i != axis] + [axis]
        from_last = [to_last.index(i) for i in range(rank)]

        x = tf.cast(tf.constant(x_np), dt)
        g = tf.cast(tf.constant(g_np), dt)

        def built(layer, in_shape):
            layer.build(in_shape)
            return layer

        ours = built(maskbn_tf.MaskedBatchNormalization(axis=axis, dtype=policy), shape)
        native = built(keras.layers.BatchNormalization(axis=axis, dtype=policy), shape)
        masked = built(keras.layers.BatchNormalization(axis=axis, dtype=policy), shape)
        gs_bn = built(keras.layers.BatchNormalization(axis=-1, dtype=policy), (None, channels))
        # the floor computes in float32, as every batch norm here does, and returns x's dtype
        fw = tf.Variable(tf.ones([channels]))
        fb = tf.Variable(tf.zeros([channels]))

        def floor(x, m):
            return tf.cast(tf.cast(x, tf.float32) * tf.reshape(fw, bshape) + tf.reshape(fb, bshape), x.dtype)

        def fwd(forward, variables):
            """forward(x, m) -> y, as a training step (fwd + grads of x and variables) or inference."""
            if not train:
                return forward

            def step(x, m):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = forward(x, m)
                return tape.gradient(y, [x, *variables], output_gradients=g)

            return step

        def gs_forward(x, idx):
            xt = x if channels_last else tf.transpose(x, to_last)
            xf = tf.reshape(xt, [-1, channels])
            yr = gs_bn(tf.gather_nd(xf, idx), training=train)
            y = tf.reshape(tf.scatter_nd(idx, tf.cast(yr, xf.dtype), tf.shape(xf, out_type=idx.dtype)), tf.shape(xt))
            return y if channels_last else tf.transpose(y, from_last)

        fns = {
            "ours": fwd(lambda x, m: ours(x, training=train, mask=m), ours.trainable_variables),
            "native": fwd(lambda x, m: native(x, training=train), native.trainable_variables),
            "masked": fwd(lambda x, m: masked(x, training=train, mask=m), masked.trainable_variables),
            "floor": fwd(floor, [fw, fb]),
        }

        def compile_(f):
            if form == "eager":  # Keras op by op, as a custom loop without tf.function or run_eagerly=True
                return f
            return tf.function(f, jit_compile=True) if jit else tf.function(f)

        fns = {k: compile_(f) for k, f in fns.items()}
        if jit:
            # XLA needs static shapes: the real rows are found outside, each count compiles once
            gs_core = compile_(fwd(gs_forward, gs_bn.trainable_variables))

            def gs_fn(x, m):
                return gs_core(x, tf.where(tf.reshape(m, [-1])))

        else:
            gs_fn = compile_(fwd(lambda x, m: gs_forward(x, tf.where(tf.reshape(m, [-1]))), gs_bn.trainable_variables))
        fns["gather_scatter"] = gs_fn

        def factory(fn):
            def make(mask_np):
                m = tf.constant(mask_np)

                def run():
                    fn(x, m)  # eager TF execution is synchronous: the results are computed on return

                return Step(run)

            return make

        out = {impl: factory(fn) for impl, fn in fns.items()}
        if not channels_last:
            out["masked"] = NotApplicable(
                "keras BatchNormalization(mask=) expands the mask on the last axis: channels-last only"
            )
        return out
