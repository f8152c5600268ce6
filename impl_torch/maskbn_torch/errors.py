"""Error types shared by the functional core and the module."""

from __future__ import annotations

__all__ = ["ChannelMismatchError"]


class ChannelMismatchError(ValueError, RuntimeError):
    """A channel count that does not match: x against the layer, or a weight/bias/running buffer against x.

    Both a ValueError (maskbn's contract: bad input is a ValueError) and a RuntimeError
    (what stock ``nn.BatchNorm`` raises for the same mistake), so code written for either
    catches it.
    """
