"""``MaskedBatchNorm``: a drop-in ``nn.BatchNorm{1,2,3}d`` whose statistics skip padded rows."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ChannelMismatchError
from .functional import PADDED_OUTPUTS, masked_batch_norm
from .scope import remember_layer_path, scoped_mask

__all__ = ["MaskedBatchNorm", "convert_batchnorm"]


class MaskedBatchNorm(nn.Module):
    """Batch normalization whose batch statistics come only from the real positions of a padded batch.

    A drop-in for ``nn.BatchNorm1d/2d/3d`` (``channel_axis=1``, any rank) or, with
    ``channel_axis=-1``, for channels-last features such as ``(B, N, C)`` point clouds.
    ``forward(x, mask)`` takes a bool or integer ``mask`` (non-zero = real) of x's
    shape without the channel axis, or with the channel axis of size 1; ``mask=None``
    treats every position as real and behaves as stock batch norm.

    Args:
        num_features: the number of channels C.
        eps: added to the variance before the square root.
        momentum: PyTorch's convention, the weight of the new batch:
            ``running = (1 - momentum) * running + momentum * batch``; None gives a
            cumulative average over the batches seen, as ``nn.BatchNorm``.
        affine: create ``weight`` (gamma, ones) and ``bias`` (beta, zeros).
        bias: keyword-only, as ``nn.LayerNorm(bias=...)``: with ``affine=True``,
            ``bias=False`` creates the weight only (the contract's ``center=False``).
        weight: keyword-only, the mirror switch: with ``affine=True``, ``weight=False``
            creates the bias only (the contract's ``scale=False``).
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``
            and normalize with them in eval mode; False creates no running stats and always
            uses batch statistics, as ``nn.BatchNorm``. Setting the attribute to False on a
            built layer freezes its running stats (training uses batch statistics and
            updates nothing; eval still normalizes with the frozen stats), as ``nn.BatchNorm``.
        channel_axis: the channel axis of the input.
        padded_output: ``"normalize"`` (padded rows normalized like real ones) or
            ``"zero"`` (padded rows of the output are exactly 0).
        process_group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``)
            whose replicas share batch statistics in training mode, as ``nn.SyncBatchNorm``
            but count-weighted over the real rows: k shards with uneven masks, empty ones
            included, normalize with the statistics of the unsharded batch. Every replica
            must call forward (and backward) together. None: no synchronization.
        device, dtype: factory kwargs for the parameters and buffers. A float64 layer keeps
            float64 state and reduces in float64; otherwise state is float32 and float16 /
            bfloat16 inputs are reduced in float32.
        unbiased_running_var: keyword-only. By default ``running_var`` holds the unbiased
            ``n / (n - 1) * var`` of the real rows (``n / max(n - 1, 1)`` for one real row),
            torch's stock convention, so a stock model converted to this layer keeps training
            as it did. False stores the population variance (the convention of Keras and
            Flax). Normalization always uses the population variance.

    State-dict names are those of ``nn.BatchNorm`` (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so a stock batch norm's state dict loads
    unchanged. A training call with no real position normalizes with the running stats,
    updates nothing (``num_batches_tracked`` included) and gives zero gradients. A
    zero-size x (a dimension of size 0) gives an empty output of x's shape and dtype and
    updates nothing.

    Errors follow ``nn.BatchNorm`` where it has them: a channel count that does not match
    (of x, or of a replaced weight/bias/running buffer) raises :class:`ChannelMismatchError`,
    both a ValueError and a RuntimeError; ``eps <= 0`` raises ValueError at the first
    forward that normalizes with batch statistics (``eps < 0`` at any forward).
    """

    _version = 2  # as nn.BatchNorm: version 2 added num_batches_tracked

    # None where the configuration creates no such parameter or buffer
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_axis: int = 1,
        padded_output: str = "normalize",
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        weight: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        super().__init__()
        if padded_output not in PADDED_OUTPUTS:
            raise ValueError(f"padded_output must be one of {PADDED_OUTPUTS}, got {padded_output!r}")
        if not isinstance(channel_axis, int):
            raise TypeError(f"channel_axis must be an int, got {type(channel_axis).__name__}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.channel_axis = channel_axis
        self.padded_output = padded_output
        self.process_group = process_group
        self.unbiased_running_var = unbiased_running_var
        if affine and weight:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running var 1, counter 0 (as ``nn.BatchNorm``)."""
        if not self.track_running_stats:  # as nn.BatchNorm: frozen stats stay
            return
        for buffer, value in ((self.running_mean, 0), (self.running_var, 1), (self.num_batches_tracked, 0)):
            if buffer is not None:
                buffer.fill_(value)

    def reset_parameters(self) -> None:
        """Reset the running stats, and weight to 1 / bias to 0 (as ``nn.BatchNorm``)."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``x``; batch statistics from the positions where ``mask`` is non-zero.

        The rules of ``nn.BatchNorm``: batch statistics in training mode, and in eval mode
        when there are no running stats; running stats are updated only in training mode
        while ``track_running_stats`` is set; eval mode with running stats normalizes with
        them and updates nothing.
        """
        if isinstance(x, Tensor) and x.dim() >= 1:
            rank = x.dim()
            if -rank <= self.channel_axis < rank and x.shape[self.channel_axis] != self.num_features:
                raise ChannelMismatchError(
                    f"expected {self.num_features} channels at axis {self.channel_axis}, got "
                    f"{int(x.shape[self.channel_axis])} (x shape {tuple(int(s) for s in x.shape)})"
                )
        if mask is None:  # inside a mask_scope, the scoped mask that fits x (scope.py)
            mask = scoped_mask(self, x, self.channel_axis)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # as nn.BatchNorm: the buffers are passed where they are updated (training while
        # tracked) or read (eval); the counter only where it is updated
        updates = self.training and self.track_running_stats
        pass_buffers = updates or not self.training
        return masked_batch_norm(
            x,
            mask,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            training=use_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            channel_axis=self.channel_axis,
            padded_output=self.padded_output,
            num_batches_tracked=self.num_batches_tracked if updates else None,
            unbiased_running_var=self.unbiased_running_var,
            # as nn.SyncBatchNorm: synchronize in training mode only, where every replica
            # runs the same steps (eval loops may differ in length across replicas)
            process_group=self.process_group if self.training else None,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            + ("bias=False, " if self.affine and self.bias is None else "")
            + ("weight=False, " if self.affine and self.weight is None else "")
            + f"track_running_stats={self.track_running_stats}, channel_axis={self.channel_axis}, "
            f"padded_output={self.padded_output!r}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # as nn.BatchNorm: a state dict without num_batches_tracked (saved before it existed,
        # or a partial dict loaded with strict=False) keeps the current count; a counter
        # still on the meta device has no value to keep and becomes 0
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            current = self.num_batches_tracked
            keep = current is not None and current.device.type != "meta"
            state_dict[key] = current if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# the common base of BatchNorm1d/2d/3d, their Lazy variants and SyncBatchNorm (what
# nn.SyncBatchNorm.convert_sync_batchnorm matches too)
_STOCK_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


def convert_batchnorm(
    module: nn.Module,
    *,
    padded_output: str = "normalize",
    unbiased_running_var: bool = True,
) -> nn.Module:
    """Replace every batch norm in ``module`` by a :class:`MaskedBatchNorm`, in place.

    Matches ``nn.BatchNorm1d/2d/3d`` (lazy ones once initialized) and ``nn.SyncBatchNorm``.
    The new layer has the same configuration and train/eval mode and holds the very same
    weight/bias Parameters and running-stat buffers, so optimizers stay valid; a batch
    norm shared by several parents becomes one masked layer shared by the same parents.

    Returns the module itself, or the new layer when ``module`` is a batch norm itself.
    The converted layers take the mask as ``forward(x, mask)``; called without a mask they
    compute what the stock layer computed, up to rounding (the running var keeps torch's
    unbiased convention unless ``unbiased_running_var=False``, see :class:`MaskedBatchNorm`).

    An unmodified model's ``forward`` passes no mask: run it inside
    :func:`maskbn_torch.mask_scope`, which hands every converted layer the scoped mask that
    fits its input (one mask per resolution, e.g. points and pooled items)::

        convert_batchnorm(model)  # e.g. Conv1d/Linear + BatchNorm1d blocks in nn.Sequentials
        with mask_scope(point_mask, point_mask.any(dim=1)):  # (B, N) and (B,)
            loss = criterion(model(points), labels)
        loss.backward()
        stock_model.load_state_dict(model.state_dict())  # an unconverted copy loads the weights

    (the whole path, with compile and checkpointing: ``impl_torch/README.md``).

    An ``nn.SyncBatchNorm`` becomes a synchronized ``MaskedBatchNorm`` over the same
    process group; its ``process_group=None`` means the default group, which must then be
    initialized (``torch.distributed.init_process_group``) before converting.
    """
    # validate every batch norm first, so a refusal leaves the model untouched
    found = [(name, m) for name, m in module.named_modules(remove_duplicate=False) if isinstance(m, _STOCK_BATCHNORMS)]
    for _, bn in found:
        _check_convertible(bn)
    if isinstance(module, _STOCK_BATCHNORMS):
        return _converted(module, padded_output, unbiased_running_var)
    converted: dict[int, MaskedBatchNorm] = {}
    for name, bn in found:
        if id(bn) not in converted:
            converted[id(bn)] = _converted(bn, padded_output, unbiased_running_var)
            remember_layer_path(converted[id(bn)], name)
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child_name, converted[id(bn)])
    return module


def _check_convertible(bn: nn.Module) -> None:
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(f"cannot convert an uninitialized lazy batch norm ({type(bn).__name__}); run it first")
    if isinstance(bn, nn.SyncBatchNorm) and bn.process_group is None and not _distributed_ready():
        raise ValueError(
            "cannot convert an nn.SyncBatchNorm with process_group=None before torch.distributed is "
            "initialized: its default group would be lost; initialize it first or pass a group"
        )


def _distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _sync_group(bn: nn.Module) -> Any:
    if not isinstance(bn, nn.SyncBatchNorm):
        return None
    return bn.process_group if bn.process_group is not None else dist.group.WORLD


def _converted(bn: nn.modules.batchnorm._BatchNorm, padded_output: str, unbiased_running_var: bool) -> MaskedBatchNorm:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = MaskedBatchNorm(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        channel_axis=1,
        padded_output=padded_output,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
        unbiased_running_var=unbiased_running_var,
        process_group=_sync_group(bn),
    )
    # share the very Parameter and buffer objects (as nn.SyncBatchNorm.convert_sync_batchnorm
    # does), so an optimizer built before the conversion keeps updating the live weights
    # (torch declares none of them on _BatchNorm: each is a Parameter, a Tensor or None)
    if bn.affine:
        new.weight = cast(nn.Parameter | None, bn.weight)
        new.bias = cast(nn.Parameter | None, bn.bias)
    if bn.track_running_stats and bn.running_mean is not None:
        new.running_mean = cast(Tensor, bn.running_mean)
        new.running_var = cast(Tensor, bn.running_var)
        new.num_batches_tracked = cast(Tensor | None, bn.num_batches_tracked)
    new.train(bn.training)
    return new
