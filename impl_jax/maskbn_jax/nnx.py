"""``flax.nnx`` module: a drop-in replacement for ``nnx.BatchNorm`` with masked statistics.

Same constructor arguments, variables (``scale``, ``bias`` as ``nnx.Param``;
``mean``, ``var`` as ``nnx.BatchStat``) and call signature
(``__call__(x, use_running_average=None, *, mask=None)``) as
``flax.nnx.BatchNorm``, so swapping it in is a one-line change and
``model.train()`` / ``model.eval()`` / ``nnx.view`` keep working. Requires Flax
(``pip install 'maskbn-jax[flax]'``).
"""

from __future__ import annotations

import inspect
import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp

from ._core import PADDED_OUTPUTS, channel_axis, flax_mask, masked_batch_norm
from ._flax_dialect import check_use_running_average, promote_dtype, require_flax, result_dtype

if tp.TYPE_CHECKING:
    from flax import nnx
else:  # at run time, an ImportError that names the [flax] extra
    nnx = require_flax("nnx")

__all__ = ["MaskedBatchNorm"]

# nnx.view's protocol, as the installed Flax speaks it: older releases (0.12.4) pass
# every keyword and count those set_view returns as unused; newer ones read
# set_view's signature and pass only the keywords it names
_VIEW_RETURNS_UNUSED = any(
    p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(nnx.BatchNorm.set_view).parameters.values()
)


class MaskedBatchNorm(nnx.Module):
    """Batch norm over the real (``mask != 0``) rows only; ``flax.nnx.BatchNorm`` conventions.

    Args:
      num_features: number of channels.
      use_running_average: True normalizes with the moving stats (eval);
        overridden by the call argument. ``train()``/``eval()`` set it.
      axis: the channel axis.
      momentum: decay of the moving stats (Flax convention, 0.99).
      epsilon: added to the variance.
      dtype: as in ``nnx.BatchNorm``: the dtype ``promote_dtype`` casts x, the
        moving stats and the params to, and the output dtype; None infers it
        from them (a bfloat16 x with float32 params gives float32).
        Statistics are always reduced in at least float32.
      param_dtype: dtype of ``scale``/``bias``; the moving stats are float32, or
        float64 when ``param_dtype`` is float64.
      promote_dtype: as in ``nnx.BatchNorm``: called as
        ``promote_dtype((x, mean, var, scale, bias), dtype=dtype)`` and
        returning them cast; the default casts all to one dtype.
      use_bias, use_scale: create ``bias`` / ``scale`` (None otherwise).
      bias_init, scale_init: initializers (zeros, ones).
      axis_name, axis_index_groups: merge the statistics over a mapped axis
        (``shard_map``/``pmap``) with count weights.
      padded_output: ``"normalize"`` or ``"zero"`` (padded rows of y exactly 0).
      unbiased_var: store ``n / (n - 1)`` times the batch variance in ``var``
        (PyTorch's convention); False (default) stores the population
        variance, as ``nnx.BatchNorm``.
      use_fast_variance: accepted so ``nnx.BatchNorm`` arguments carry over;
        the variance is always the accurate shifted one (never E[x^2] - E[x]^2).
      rngs: ``nnx.Rngs`` for the initializers; may be omitted with the default
        (constant) initializers.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param`` variables
        (e.g. sharding), as in ``nnx.BatchNorm``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: tp.Any = None,
        param_dtype: tp.Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: tp.Callable = nnx.initializers.zeros_init(),
        scale_init: tp.Callable = nnx.initializers.ones_init(),
        axis_name: tp.Any = None,
        axis_index_groups: tp.Any = None,
        padded_output: str = "normalize",
        use_fast_variance: bool = True,
        promote_dtype: tp.Callable = promote_dtype,
        unbiased_var: bool = False,
        rngs: nnx.Rngs | None = None,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        if padded_output not in PADDED_OUTPUTS:
            raise ValueError(f"padded_output must be one of {PADDED_OUTPUTS}, got {padded_output!r}")
        shape = (num_features,)
        stats_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros(shape, stats_dtype))
        self.var = nnx.BatchStat(jnp.ones(shape, stats_dtype))

        def key():
            # the default initializers are constants and ignore the key
            return rngs.params() if rngs is not None else jax.random.key(0)

        self.scale = nnx.Param(scale_init(key(), shape, param_dtype), **scale_metadata) if use_scale else nnx.data(None)
        self.bias = nnx.Param(bias_init(key(), shape, param_dtype), **bias_metadata) if use_bias else nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.padded_output = padded_output
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.unbiased_var = unbiased_var

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalize ``x``; in training mode update ``mean``/``var`` from the real rows.

        ``mask``: bool/int, non-zero = real, of any shape Flax's BatchNorm takes
        (broadcastable to x) and those of :func:`maskbn_jax.masked_batch_norm`;
        None means every row is real.
        """
        check_use_running_average(use_running_average)
        use_running_average = use_running_average if use_running_average is not None else self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "No use_running_average given: pass it to the constructor or the call, or use train()/eval()"
            )
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        stored = {"mean": self.mean[...], "var": self.var[...]}
        x, mean, var, scale, bias = self.promote_dtype(
            (x, stored["mean"], stored["var"], scale, bias), dtype=self.dtype
        )
        out_dtype = result_dtype(x, scale, bias, dtype=self.dtype)
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        x = jnp.asarray(x)
        axis = channel_axis(x.shape, self.axis)
        y, new = masked_batch_norm(
            x,
            flax_mask(mask, x.shape, axis),
            params,
            # as nnx.BatchNorm: eval normalizes with the promoted stats, training updates the stored ones
            {"mean": mean, "var": var} if use_running_average else stored,
            training=not use_running_average,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=axis,
            padded_output=self.padded_output,
            unbiased_var=self.unbiased_var,
            dtype=out_dtype,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        if not use_running_average:
            # the moving stats are state, not part of what a loss differentiates
            self.mean[...] = jax.lax.stop_gradient(new["mean"])
            self.var[...] = jax.lax.stop_gradient(new["var"])
        return y

    if _VIEW_RETURNS_UNUSED:

        def set_view(self, use_running_average: bool | None = None, **unused) -> dict:
            """Used by ``nnx.view``, as for ``nnx.BatchNorm``: returns the keywords it did not use."""
            if use_running_average is not None:
                self.use_running_average = use_running_average
            return unused

    else:

        def set_view(self, use_running_average: bool | None = None):  # type: ignore[misc]
            """Used by ``nnx.view``, as for ``nnx.BatchNorm``."""
            if use_running_average is not None:
                self.use_running_average = use_running_average
