"""The report's progress output: a redrawn bar on a terminal, periodic lines elsewhere."""

import io

import pytest

from maskbn_conformance.progress import Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def test_non_interactive_prints_a_line_per_interval_and_the_elapsed_time(clock):
    out = io.StringIO()
    progress = Progress("torch spec checks", 4, stream=out, interactive=False, interval=10.0, clock=clock)
    for case, seconds in [("a", 2.0), ("b", 9.0), ("c", 1.0), ("d", 3.0)]:
        clock.now += seconds
        progress.advance(case)
    progress.finish()
    assert out.getvalue().splitlines() == [
        "torch spec checks: 4 to run",
        "torch spec checks: 2/4 (11s) at b",
        "torch spec checks: 4/4 done in 15.0s",
    ]


def test_interactive_redraws_one_bar_in_place(clock):
    out = io.StringIO()
    progress = Progress("jax spec checks", 2, stream=out, interactive=True, clock=clock)
    progress.advance("half-mask")
    clock.now += 4.0
    progress.advance("empty-mask")
    progress.finish()
    text = out.getvalue()
    assert "\n" not in text.rstrip("\n"), "a terminal gets one redrawn line, not a scroll of them"
    assert "[" + "#" * 15 + "-" * 15 + "] 1/2" in text
    assert "[" + "#" * 30 + "] 2/2" in text
    assert text.endswith("jax spec checks: 2/2 done in 4.0s\n")


def test_a_stream_that_is_not_a_terminal_gets_lines(clock):
    out = io.StringIO()  # isatty() is False
    Progress("tf spec checks", 1, stream=out, clock=clock).finish()
    assert out.getvalue() == "tf spec checks: 1 to run\ntf spec checks: 0/1 done in 0.0s\n"
