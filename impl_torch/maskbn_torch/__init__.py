"""Masked batch normalization for PyTorch: batch statistics from the real rows of a padded batch.

>>> import torch
>>> from maskbn_torch import MaskedBatchNorm
>>> bn = MaskedBatchNorm(8, channel_axis=-1)
>>> y = bn(torch.randn(4, 16, 8), mask=torch.arange(16).expand(4, 16) < 10)
"""

from . import functional
from .errors import ChannelMismatchError
from .functional import masked_batch_norm
from .modules import MaskedBatchNorm, convert_batchnorm
from .portable import load_portable, save_portable
from .scope import bind_mask_scope, checkpoint_context_fn, mask_scope

__all__ = [
    "ChannelMismatchError",
    "MaskedBatchNorm",
    "bind_mask_scope",
    "checkpoint_context_fn",
    "convert_batchnorm",
    "functional",
    "load_portable",
    "mask_scope",
    "masked_batch_norm",
    "save_portable",
]
__version__ = "0.1.0"
