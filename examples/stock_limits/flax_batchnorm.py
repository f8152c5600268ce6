"""What the stock layer does with padded batches: the measurements behind the README table "Why maskbn"."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

rng = np.random.default_rng(0)
C = 4
bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
x = jnp.asarray(rng.normal(3, 2, (8, 16, C)).astype("float32"))
m = jnp.ones((8, 16, 1), bool)
v = bn.init(jax.random.key(0), x, mask=m)
_, upd = bn.apply(v, x, mask=m, mutable=["batch_stats"])
v = {"params": v["params"], **upd}
_, upd = bn.apply(v, jnp.zeros_like(x), mask=jnp.zeros((8, 16, 1), bool), mutable=["batch_stats"])
v2 = {"params": v["params"], **upd}
print(
    "flax all-padded batch: moving mean",
    np.asarray(v2["batch_stats"]["mean"])[:2],
    "var",
    np.asarray(v2["batch_stats"]["var"])[:2],
)
y, upd = bn.apply(v2, x, mask=m, mutable=["batch_stats"])
print(
    "flax next real batch: moving mean",
    np.asarray(upd["batch_stats"]["mean"])[:2],
    "eval output finite",
    bool(
        np.isfinite(np.asarray(nn.BatchNorm(use_running_average=True).apply({"params": v["params"], **upd}, x))).all()
    ),
)
# NaN padding
mm = np.zeros((4, 16, 1), bool)
mm[:, :10] = True
xn = rng.normal(0, 1, (4, 16, C)).astype("float32")
xn[~mm[..., 0]] = np.nan
v = bn.init(jax.random.key(0), xn, mask=mm)


def loss(x):
    y, _ = bn.apply(v, x, mask=mm, mutable=["batch_stats"])
    return jnp.sum(jnp.where(mm, y, 0.0))


g = np.asarray(jax.grad(loss)(jnp.asarray(xn)))
y, upd = bn.apply(v, xn, mask=mm, mutable=["batch_stats"])
print(
    "flax NaN padding: real-row grads finite",
    bool(np.isfinite(g[mm[..., 0]]).all()),
    "real outputs finite",
    bool(np.isfinite(np.asarray(y)[mm[..., 0]]).all()),
    "moving mean finite",
    bool(np.isfinite(np.asarray(upd["batch_stats"]["mean"])).all()),
)
# offsets
for fast in (True, False):
    for off in (1e4, 1e5, 1e6):
        n = 2**20
        x = (rng.normal(0, 1, (n, C)) + off).astype("float32")
        m = np.ones((n, 1), bool)
        m[n // 2 :, 0] = rng.random(n - n // 2) < 0.5
        b = nn.BatchNorm(use_running_average=False, momentum=0.0, use_fast_variance=fast)
        vv = b.init(jax.random.key(0), x, mask=m)
        _, upd = b.apply(vv, x, mask=m, mutable=["batch_stats"])
        xr = x[m[:, 0]].astype(np.float64)
        em = np.abs(np.asarray(upd["batch_stats"]["mean"]) - xr.mean(0)).max()
        ev = np.abs(np.asarray(upd["batch_stats"]["var"]) / xr.var(0) - 1).max()
        print(
            f"flax fast_variance={fast} offset {off:g}: mean err {em:.3g} ({em / np.spacing(np.float32(off)):.1f} ulp), var rel err {ev:.3g}"
        )
# float mask
try:
    b = nn.BatchNorm(use_running_average=False)
    vv = b.init(jax.random.key(0), x[:64], mask=np.full((64, 1), 0.5, np.float32))
    print("flax float mask accepted silently")
except Exception as e:
    print("flax float mask raises", type(e).__name__, str(e)[:100])
