"""Runs in a subprocess with 4 host CPU devices (XLA_FLAGS set by test_sharded.py) and
prints, as JSON, the max abs difference of each sharded computation from the unsharded one.

Shards are deliberately uneven: one full, one partial, one empty, one with a single real row.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from maskbn_jax import masked_batch_norm
from maskbn_jax._core import _masked_batch_norm

SHARDS = 4
CORE_KW = {"momentum": 0.8, "epsilon": 1e-3, "axis": -1, "axis_index_groups": None}


def build():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(3.0, 2.0, (SHARDS * 2, 6, 3)), jnp.float32)
    m = np.zeros((SHARDS * 2, 6), bool)
    m[0:2] = True  # shard 0: full
    m[2:4, :4] = True  # shard 1: partial
    # shard 2 (rows 4:6): empty
    m[7, 2] = True  # shard 3: a single real position
    params = {
        "scale": jnp.asarray(rng.normal(1.0, 0.3, 3), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
    }
    state = {"mean": jnp.asarray(rng.normal(size=3), jnp.float32), "var": jnp.asarray(rng.uniform(1, 2, 3))}
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=3), jnp.float32)
    return x, m, params, state, dy, w


def diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main():
    assert len(jax.devices()) == SHARDS, jax.devices()
    # Auto axis: shard_map places replicated/unsharded inputs itself (Explicit would demand pre-sharded ones)
    mesh = jax.make_mesh((SHARDS,), ("data",), axis_types=(AxisType.Auto,))
    x, m, params, state, dy, w = build()
    results = {}

    for two_pass in (False, True):
        tag = "two-pass" if two_pass else "single-pass"
        core = functools.partial(_masked_batch_norm, training=True, padded_output="normalize", two_pass=two_pass)
        sharded = jax.shard_map(
            functools.partial(core, axis_name="data", **CORE_KW),
            mesh=mesh,
            in_specs=(P("data"), P("data"), P(), P()),
            out_specs=(P("data"), P()),
        )
        plain = functools.partial(core, axis_name=None, **CORE_KW)

        def loss(fn, x, params, mask=m):
            y, new = fn(x, mask, params, state)
            return jnp.sum(jnp.where(mask[..., None], y * dy, 0)) + jnp.dot(new["mean"] + new["var"], w)

        y_s, new_s = jax.jit(sharded)(x, m, params, state)
        y_p, new_p = plain(x, m, params, state)
        results[f"{tag}-output"] = diff(y_s, y_p)
        results[f"{tag}-moving-stats"] = diff(new_s, new_p)
        g_s = jax.jit(jax.grad(functools.partial(loss, sharded), (0, 1)))(x, params)
        g_p = jax.grad(functools.partial(loss, plain), (0, 1))(x, params)
        results[f"{tag}-grad-x"] = diff(g_s[0], g_p[0])
        results[f"{tag}-grad-params"] = diff(g_s[1], g_p[1])
        results[f"{tag}-grad-x-padded-max"] = float(jnp.max(jnp.abs(g_s[0][~m])))
        # no mask at all: every position real on every shard
        y_s, new_s = jax.jit(sharded)(x, None, params, state)
        y_p, new_p = plain(x, None, params, state)
        results[f"{tag}-no-mask-output"] = diff(y_s, y_p)
        results[f"{tag}-no-mask-moving-stats"] = diff(new_s, new_p)
        empty = np.zeros_like(m)
        _, new_empty = jax.jit(sharded)(x, empty, params, state)
        results[f"{tag}-all-shards-empty-keeps-state"] = diff(new_empty, state)

    # pmap (the older mapped-axis API): same statistics; the two formulations' gradients agree
    shards = lambda a: a.reshape((SHARDS, -1) + a.shape[1:])  # noqa: E731
    pmapped = {}
    for two_pass in (False, True):
        core = functools.partial(
            _masked_batch_norm,
            training=True,
            padded_output="normalize",
            two_pass=two_pass,
            axis_name="data",
            **CORE_KW,
        )

        def local_loss(x, m, dy, params, core=core):
            y, new = core(x, m, params, state)
            return jnp.sum(jnp.where(m[..., None], y * dy, 0)) + jnp.dot(new["mean"] + new["var"], w), new

        run = jax.pmap(jax.grad(local_loss, (0, 3), has_aux=True), axis_name="data", in_axes=(0, 0, 0, None))
        pmapped[two_pass] = run(shards(x), shards(jnp.asarray(m)), shards(dy), params)
    (g_c, new_c), (g_a, new_a) = pmapped[False], pmapped[True]
    _, new_p = masked_batch_norm(x, m, params, state, training=True, momentum=0.8, epsilon=1e-3)
    first_device = functools.partial(jax.tree.map, lambda a: a[0])
    results["pmap-moving-stats"] = max(diff(first_device(new_c), new_p), diff(first_device(new_a), new_p))
    results["pmap-single-vs-two-pass-grads"] = diff(g_c, g_a)

    # the Flax linen module passes axis_name through the same merge
    try:
        from maskbn_jax.linen import MaskedBatchNorm
    except ImportError:
        pass
    else:
        layer = MaskedBatchNorm(use_running_average=False, momentum=0.8, epsilon=1e-3, axis_name="data")
        variables = {"params": params, "batch_stats": state}
        apply = jax.shard_map(
            lambda x, m: layer.apply(variables, x, mask=m, mutable=["batch_stats"]),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=(P("data"), P()),
        )
        y_l, upd = jax.jit(apply)(x, m)
        y_p, new_p = masked_batch_norm(x, m, params, state, training=True, momentum=0.8, epsilon=1e-3)
        results["linen-output"] = diff(y_l, y_p)
        results["linen-moving-stats"] = diff(dict(upd["batch_stats"]), new_p)

    print(json.dumps(results))


if __name__ == "__main__":
    main()
