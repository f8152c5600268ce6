"""Run by test_synchronized.py in a fresh process: TensorFlow's logical CPU devices can only be
configured before TensorFlow initializes them, which the test process has already done.

usage: python _sync_worker.py K OUT.npz
With K replicas of a MirroredStrategy (K logical CPU devices), runs one synchronized training
step (forward + backward of sum(y * dy)) on a padded batch split along the batch axis, with
a shard holding no real row, and saves the merged per-replica results next to those of one
unsharded layer on the whole batch. One process per K: collective groups of two sizes
cannot share a process.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

K = int(sys.argv[1])
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * K)

import numpy as np  # noqa: E402

from maskbn_tf import MaskedBatchNormalization  # noqa: E402


def batch():
    rng = np.random.default_rng(7)
    lengths = np.array([10, 7, 0, 0, 2, 9, 1, 5])  # with K = 4, replica 1 holds no real row
    mask = np.arange(10)[None, :] < lengths[:, None]
    x = np.where(mask[..., None], rng.normal(3.0, 2.0, size=(8, 10, 3)), np.nan).astype(np.float32)
    dy = np.where(mask[..., None], rng.normal(size=x.shape), 0.0).astype(np.float32)
    return x, mask, dy


def layer():
    out = MaskedBatchNormalization(momentum=0.5, synchronized=True)
    out.build((None, 10, 3))
    out.gamma.assign([0.5, 2.0, -1.0])
    out.beta.assign([1.0, 0.0, -2.0])
    return out


def train_step(bn, x, mask, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bn(x, training=True, mask=mask)
    dx, dgamma, dbeta = tape.gradient(y, [x, bn.gamma, bn.beta], output_gradients=dy)
    return y, dx, dgamma, dbeta


def sharded(k, x, mask, dy):
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(k)])
    with strategy.scope():
        bn = layer()
    parts = [np.split(a, k) for a in (x, mask, dy)]
    inputs = [
        strategy.experimental_distribute_values_from_function(lambda ctx, p=p: p[ctx.replica_id_in_sync_group])
        for p in parts
    ]
    step = tf.function(lambda *args: strategy.run(lambda *a: train_step(bn, *a), args=args))
    results = step(*inputs)
    y, dx, dgamma, dbeta = ([t.numpy() for t in strategy.experimental_local_results(r)] for r in results)
    return {
        "y": np.concatenate(y),
        "dx": np.concatenate(dx),
        # each replica holds its share of the weight gradients; an optimizer sums them
        "dgamma": np.sum(dgamma, axis=0),
        "dbeta": np.sum(dbeta, axis=0),
        "moving_mean": bn.moving_mean.numpy(),
        "moving_variance": bn.moving_variance.numpy(),
    }


def main(out):
    x, mask, dy = batch()
    bn = layer()
    y, dx, dgamma, dbeta = train_step(bn, tf.constant(x), tf.constant(mask), tf.constant(dy))
    results = {"mask": mask, "unsharded-y": y.numpy(), "unsharded-dx": dx.numpy()}
    results.update({"unsharded-dgamma": dgamma.numpy(), "unsharded-dbeta": dbeta.numpy()})
    results.update(
        {"unsharded-moving_mean": bn.moving_mean.numpy(), "unsharded-moving_variance": bn.moving_variance.numpy()}
    )
    results.update({f"sharded-{name}": value for name, value in sharded(K, x, mask, dy).items()})
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[2])
