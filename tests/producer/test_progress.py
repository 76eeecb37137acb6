"""The progress line of `embedfleet produce` and the demo: redrawn in place on a terminal, plain
lines every few seconds elsewhere (a log or a pipe would get one endless line of carriage returns)."""

from __future__ import annotations

import io

from producer.client import ClientStats
from producer.progress import PLAIN_INTERVAL_S, Progress
from tests.fakes import FakeClock


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_line_is_redrawn_in_place() -> None:
    stream, clock = _Terminal(), FakeClock()
    progress = Progress(stream, enabled=True, clock=clock)
    progress.show("results 10/300", force=True)
    clock.now += 0.125
    progress.show("results 20/300")  # sooner than the interval: not drawn
    clock.now += 0.25
    progress.show("results 9/30")  # shorter: padded over the longer line
    clock.now += 0.25
    progress.show("results 9/30")  # nothing new: not drawn again
    progress.finish()
    assert stream.getvalue() == "\rresults 10/300\rresults 9/30  \n"


def test_off_a_terminal_a_plain_line_every_few_seconds() -> None:
    assert 1 <= PLAIN_INTERVAL_S <= 10
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(stream, enabled=True, clock=clock)
    steps = int(2.5 * PLAIN_INTERVAL_S / 0.25)  # updates every 0.25 s for 2.5 intervals
    for done in range(1, steps + 1):
        clock.now += 0.25
        progress.show(f"results {done}/{steps}")
    progress.show(f"results {steps}/{steps}", force=True)  # the final count, once
    progress.finish()
    every = int(PLAIN_INTERVAL_S / 0.25)
    assert (
        stream.getvalue()
        == f"results {every}/{steps}\nresults {2 * every}/{steps}\nresults {steps}/{steps}\n"
    )


def test_produce_line_forced_at_the_end_and_nothing_when_disabled() -> None:
    stream, clock = _Terminal(), FakeClock()
    progress = Progress(stream, enabled=True, clock=clock)
    clock.now += 2.0
    progress.update(10, 4, ClientStats(cached=1, computed=3), force=True)
    progress.finish()
    assert stream.getvalue() == "\r4/10 texts  cached 1  computed 3  failed 0  2 texts/s\n"
    quiet = _Terminal()
    disabled = Progress(quiet, enabled=False, clock=clock)
    disabled.update(10, 4, ClientStats(), force=True)
    disabled.show("x", force=True)
    disabled.finish()
    assert quiet.getvalue() == ""
