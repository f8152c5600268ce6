"""JAX competitors: maskbn_jax vs flax.linen.BatchNorm (with and without its mask argument),
gather/BN/scatter and x * a + b; every one under jax.jit."""

from __future__ import annotations

from importlib.metadata import version

import jax
import jax.numpy as jnp

import maskbn_jax
from benchmarks.common import NotApplicable, Step

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MOMENTUM, EPSILON = 0.99, 1e-5  # flax.linen.BatchNorm's defaults, used by every competitor


class Backend:
    memory_method = (
        "XLA buffer assignment of the jitted training step (compiled.memory_analysis()): "
        "temp + output bytes, arguments excluded"
    )

    def __init__(self) -> None:
        try:
            from flax import linen
        except ImportError:  # maskbn_jax works without flax; the competitors need it
            linen = None
        self.linen = linen

    def info(self) -> dict:
        dev = jax.devices()[0]
        info = {"jax": jax.__version__, "maskbn_jax": version("maskbn-jax"), "device": f"{dev.platform}: {dev}"}
        if self.linen is not None:
            info["flax"] = version("flax")
        return info

    def teardown_group(self) -> None:
        jax.clear_caches()

    def setup_group(self, spec: dict, dtype: str, mode: str, form: str, x_np, g_np) -> dict:
        dt = _DTYPES[dtype]
        shape = tuple(spec["shape"])
        rank = len(shape)
        axis = spec["channel_axis"] % rank
        channels = shape[axis]
        train = mode == "train"
        bshape = tuple(channels if i == axis else 1 for i in range(rank))

        x = jnp.asarray(x_np).astype(dt)
        g = jnp.asarray(g_np).astype(dt)
        params, state = maskbn_jax.init(channels)

        def step(forward):
            """forward(x, m, params, state) -> (y, new_state), as a training step (fwd + vjp of x
            and params, new state) or as inference (y)."""
            if not train:
                return lambda x, m, p, s, g: forward(x, m, p, s)[0]

            def fn(x, m, p, s, g):
                _y, vjp, new_state = jax.vjp(lambda x, p: forward(x, m, p, s), x, p, has_aux=True)
                return vjp(g), new_state

            return fn

        def ours(x, m, p, s):
            return maskbn_jax.masked_batch_norm(
                x, m, p, s, training=train, momentum=MOMENTUM, epsilon=EPSILON, axis=axis
            )

        def floor(x, m, p, s):
            # in float32, as every batch norm here computes, returning x's dtype
            y = x.astype(jnp.float32) * p["scale"].reshape(bshape) + p["bias"].reshape(bshape)
            return y.astype(x.dtype), s

        fns = {"ours": step(ours), "floor": step(floor)}
        no_flax = NotApplicable("flax is not installed")
        out: dict = {"native": no_flax, "masked": no_flax, "gather_scatter": no_flax}
        if self.linen is not None:
            linen = self.linen

            def flax_bn(ax):
                return linen.BatchNorm(
                    use_running_average=not train, axis=ax, momentum=MOMENTUM, epsilon=EPSILON, dtype=dt
                )

            bn, bn_last = flax_bn(axis), flax_bn(-1)

            def apply(module, x, p, s, **kw):
                y, upd = module.apply({"params": p, "batch_stats": s}, x, mutable=["batch_stats"], **kw)
                return y, upd["batch_stats"]

            def native(x, m, p, s):
                return apply(bn, x, p, s)

            def masked(x, m, p, s):
                return apply(bn, x, p, s, mask=jnp.expand_dims(m, axis))

            def gs_forward(x, idx, p, s):
                xt = jnp.moveaxis(x, axis, -1)
                xf = xt.reshape(-1, channels)
                yr, s = apply(bn_last, xf[idx], p, s)
                y = jnp.zeros_like(xf).at[idx].set(yr.astype(xf.dtype)).reshape(xt.shape)
                return jnp.moveaxis(y, -1, axis), s

            fns.update(native=step(native), masked=step(masked))
            gs_core = step(gs_forward)  # the idx array takes the mask's place

        cache: dict = {}

        def compiled(key, fn, args):
            # compiled on first use (so the first call's time includes the compile), once per group
            if key not in cache:
                cache[key] = jax.jit(fn).lower(*args).compile()
            return cache[key]

        def factory(impl):
            def make(mask_np):
                m = jnp.asarray(mask_np)
                if impl == "gather_scatter":
                    # the real-row count is data-dependent: found outside jit, each count compiles once
                    key = ("gather_scatter", int(mask_np.sum()))

                    def run():
                        idx = jnp.nonzero(m.reshape(-1))[0]
                        args = (x, idx, params, state, g)
                        jax.block_until_ready(compiled(key, gs_core, args)(*args))

                else:
                    key, args = impl, (x, m, params, state, g)

                    def run():
                        jax.block_until_ready(compiled(key, fns[impl], args)(*args))

                def peak():
                    if key not in cache:
                        run()
                    ma = cache[key].memory_analysis()
                    return None if ma is None else int(ma.temp_size_in_bytes + ma.output_size_in_bytes)

                return Step(run, peak)

            return make

        if form != "compiled":
            raise ValueError(f"the JAX benchmarks time jax.jit only, not {form!r}")
        out.update({impl: factory(impl) for impl in fns})
        if self.linen is not None:
            out["gather_scatter"] = factory("gather_scatter")
        return out
