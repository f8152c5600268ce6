"""What the stock layer does with padded batches: the measurements behind the README table "Why maskbn"."""

import keras
import numpy as np
import tensorflow as tf

rng = np.random.default_rng(0)
C = 4
# 1 all-padded batch in training
bn = keras.layers.BatchNormalization(momentum=0.9)
x = rng.normal(3, 2, (8, 16, C)).astype("float32")
m = np.ones((8, 16), bool)
bn(x, mask=m, training=True)
before = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
for _ in range(10):
    y = bn(np.zeros_like(x), mask=np.zeros((8, 16), bool), training=True)
print(
    "keras all-padded x10: moving_mean",
    before[0][:2],
    "->",
    bn.moving_mean.numpy()[:2],
    "var",
    before[1][:2],
    "->",
    bn.moving_variance.numpy()[:2],
    "y finite",
    bool(np.isfinite(np.asarray(y)).all()),
)
# 2 NaN padding grads
bn = keras.layers.BatchNormalization()
x = rng.normal(0, 1, (4, 16, C)).astype("float32")
m = np.zeros((4, 16), bool)
m[:, :10] = True
xn = x.copy()
xn[~m] = np.nan
xt = tf.constant(xn)
with tf.GradientTape() as t:
    t.watch(xt)
    y = bn(xt, mask=m, training=True)
    loss = tf.reduce_sum(tf.where(m[..., None], y, 0.0))
g = t.gradient(loss, xt).numpy()
print(
    "keras NaN padding: real-row grads finite",
    bool(np.isfinite(g[m]).all()),
    "real outputs finite",
    bool(np.isfinite(np.asarray(y)[m]).all()),
    "moving_mean finite",
    bool(np.isfinite(bn.moving_mean.numpy()).all()),
)
# 3 accuracy at large offset
for off in (1e4, 1e5, 1e6):
    n = 2**20
    x = (rng.normal(0, 1, (n, C)) + off).astype("float32")
    m = np.ones((n,), bool)
    m[n // 2 :] = rng.random(n - n // 2) < 0.5
    bn = keras.layers.BatchNormalization(momentum=0.0)
    bn(x, mask=m, training=True)
    xr = x[m].astype(np.float64)
    em = np.abs(bn.moving_mean.numpy() - xr.mean(0)).max()
    ev = np.abs(bn.moving_variance.numpy() / xr.var(0) - 1).max()
    ulp = np.spacing(np.float32(off))
    print(f"keras offset {off:g} n={n}: mean err {em:.3g} ({em / ulp:.1f} ulp), var rel err {ev:.3g}")
# 4 mask shape strictness
bn = keras.layers.BatchNormalization()
x = rng.normal(0, 1, (4, 16, C)).astype("float32")
for shape in [(4,), (16,), (4, 16, C, 1), (2, 16)]:
    try:
        bn(x, mask=np.ones(shape, bool), training=True)
        print("keras mask", shape, "accepted silently")
    except Exception as e:
        print("keras mask", shape, "raises", type(e).__name__, str(e)[:80])
try:
    bn(x, mask=np.ones((4, 16), np.float32) * 0.5, training=True)
    print("keras float mask 0.5 accepted silently")
except Exception as e:
    print("keras float mask raises", type(e).__name__)
