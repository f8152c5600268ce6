"""What the backend modules and the worker share."""

from __future__ import annotations


class NotApplicable:
    """A competitor that does not exist for this backend / layout, with the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Step:
    """One iteration of one competitor: ``run()`` (returns once the results are computed) and
    ``peak_bytes()`` (the peak memory of one call, or None where the framework cannot say)."""

    def __init__(self, run, peak=None) -> None:
        self.run = run
        self._peak = peak

    def peak_bytes(self) -> int | None:
        return None if self._peak is None else self._peak()
