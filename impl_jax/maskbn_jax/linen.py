"""``flax.linen`` module: a drop-in replacement for ``nn.BatchNorm`` with masked statistics.

Same attributes, variables (``params``: ``scale``, ``bias``; ``batch_stats``:
``mean``, ``var``) and call signature
(``__call__(x, use_running_average=None, *, mask=None)``) as
``flax.linen.BatchNorm``, so swapping it in is a one-line change and existing
``batch_stats`` checkpoints load unchanged. Requires Flax
(``pip install 'maskbn-jax[flax]'``).
"""

from __future__ import annotations

import typing as tp

import jax.numpy as jnp

from ._core import channel_axis, channel_mismatch, flax_mask, masked_batch_norm
from ._flax_dialect import check_use_running_average, require_flax, result_dtype

if tp.TYPE_CHECKING:
    from flax import linen as nn
else:  # at run time, an ImportError that names the [flax] extra
    nn = require_flax("linen")

__all__ = ["BatchNorm", "MaskedBatchNorm"]


class MaskedBatchNorm(nn.Module):
    """Batch norm over the real (``mask != 0``) rows only; ``flax.linen.BatchNorm`` conventions.

    Attributes:
      use_running_average: True normalizes with the moving stats (eval);
        merged with the call argument as in ``nn.BatchNorm``.
      axis: the channel axis.
      momentum: decay of the moving stats (0.99).
      epsilon: added to the variance.
      dtype: the output dtype, as in ``nn.BatchNorm``; None infers it from x
        and the params (a bfloat16 x with float32 params gives float32).
        Statistics and arithmetic run in at least float32.
      param_dtype: dtype of ``scale``/``bias``.
      force_float32_reductions: as in ``nn.BatchNorm``, the dtype of the
        ``batch_stats``: True (default) float32 (float64 when ``param_dtype``
        is float64), False ``param_dtype``. The reductions themselves always
        run in at least float32 (the contract's accuracy needs it).
      use_bias, use_scale: create ``bias`` / ``scale``.
      bias_init, scale_init: initializers (zeros, ones).
      axis_name, axis_index_groups: merge the statistics over a mapped axis
        (``shard_map``/``pmap``) with count weights; not used while
        initializing, as in ``nn.BatchNorm``.
      padded_output: ``"normalize"`` or ``"zero"`` (padded rows of y exactly 0).
      unbiased_var: store ``n / (n - 1)`` times the batch variance in ``var``
        (PyTorch's convention); False (default) stores the population
        variance, as ``nn.BatchNorm``.
      use_fast_variance: accepted so ``nn.BatchNorm`` arguments carry over; the
        variance is always the accurate shifted one (never E[x^2] - E[x]^2).

    As in ``nn.BatchNorm``, the moving stats are not updated during ``init``.
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: tp.Any = None
    param_dtype: tp.Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: tp.Callable = nn.initializers.zeros
    scale_init: tp.Callable = nn.initializers.ones
    axis_name: tp.Any = None
    axis_index_groups: tp.Any = None
    padded_output: str = "normalize"
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_var: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalize ``x``; with ``use_running_average=False`` update ``batch_stats``
        (make the collection mutable) from the real rows.

        ``mask``: bool/int, non-zero = real, of any shape Flax's BatchNorm takes
        (broadcastable to x) and those of :func:`maskbn_jax.masked_batch_norm`;
        None means every row is real.
        """
        check_use_running_average(use_running_average)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        axis = channel_axis(x.shape, self.axis)
        shape = (x.shape[axis],)
        stats_dtype = (
            jnp.promote_types(self.param_dtype, jnp.float32) if self.force_float32_reductions else self.param_dtype
        )
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), shape)
        state = {"mean": ra_mean.value, "var": ra_var.value}
        if state["mean"].shape != shape:
            # the contract's message, before Flax's own param shape check fires
            raise channel_mismatch(x.shape, axis, "batch_stats['mean']", state["mean"].shape)
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, shape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, shape, self.param_dtype)
        initializing = self.is_initializing()
        y, new = masked_batch_norm(
            x,
            flax_mask(mask, x.shape, axis),
            params,
            state,
            training=not use_running_average,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=axis,
            padded_output=self.padded_output,
            unbiased_var=self.unbiased_var,
            dtype=result_dtype(x, *params.values(), dtype=self.dtype),
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
        )
        if not use_running_average and not initializing:
            ra_mean.value = new["mean"]
            ra_var.value = new["var"]
        return y


class BatchNorm(MaskedBatchNorm):
    """:class:`MaskedBatchNorm` under Flax's class name.

    linen names unnamed submodules after their class (``BatchNorm_0``), so a
    model that swaps ``nn.BatchNorm`` for this class keeps its variable paths
    and loads its existing checkpoints unchanged.
    """
