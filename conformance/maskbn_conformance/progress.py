"""Progress of a long report run, on stderr so the matrix on stdout stays clean.

An interactive terminal gets one bar that redraws in place; anything else (CI
logs, pipes) gets a plain line every ``interval`` seconds, so a log shows the run
is alive without drowning in redraws. Every phase ends with its elapsed time.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_BAR_WIDTH = 30


class Progress:
    """One phase of a run (a backend's spec checks, its fuzz pass) counted in steps."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval: float = 20.0,
        clock=time.perf_counter,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.interval = interval
        self._clock = clock
        self.started = clock()
        self._last_line = self.started
        if not self.interactive:
            self._write(f"{label}: {total} to run\n")

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    def advance(self, current: str = "") -> None:
        """One step finished; ``current`` names it (a case id)."""
        self.done += 1
        now = self._clock()
        if self.interactive:
            filled = _BAR_WIDTH * self.done // max(self.total, 1)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            self._write(f"\r{self.label} [{bar}] {self.done}/{self.total} {self.elapsed:5.0f}s {current[:40]:<40}")
        elif now - self._last_line >= self.interval:
            self._last_line = now
            self._write(f"{self.label}: {self.done}/{self.total} ({self.elapsed:.0f}s) at {current}\n")

    def finish(self, summary: str = "") -> None:
        """The phase's closing line: how many steps and how long they took."""
        end = "\r" + " " * (len(self.label) + _BAR_WIDTH + 60) + "\r" if self.interactive else ""
        tail = f", {summary}" if summary else ""
        self._write(f"{end}{self.label}: {self.done}/{self.total} done in {self.elapsed:.1f}s{tail}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
