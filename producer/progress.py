"""The progress line (redrawn in place on a terminal, a plain line now and then elsewhere) and
the pace of sending."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import IO

from producer.client import ClientStats

# Off a terminal (a log, a pipe, CI), a line every few seconds: enough to see a run moving, too few
# to bury what else it prints.
PLAIN_INTERVAL_S = 5.0


class Progress:
    """One progress line on ``stream``: on a terminal redrawn in place (``\\r``) at most every
    ``interval_s``; elsewhere a plain line at most every ``PLAIN_INTERVAL_S`` (``\\r`` would pile up
    in a log as one endless line). ``force`` shows the line now (the final count)."""

    def __init__(
        self,
        stream: IO[str],
        *,
        enabled: bool,
        interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._in_place = enabled and stream.isatty()
        self._interval_s = interval_s if self._in_place else PLAIN_INTERVAL_S
        self._enabled = enabled
        self._clock = clock
        self._started = clock()
        self._shown_at = self._started
        self._last = ""
        self._width = 0

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started

    def rate(self, done: int) -> float:
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self, read: int, done: int, stats: ClientStats) -> str:
        return (
            f"{done}/{read} texts  cached {stats.cached}  computed {stats.computed}  "
            f"failed {stats.failed}  {self.rate(done):,.0f} texts/s"
        )

    def update(self, read: int, done: int, stats: ClientStats, *, force: bool = False) -> None:
        """`embedfleet produce`'s line: texts read and done, cached, computed, failed, rate."""
        if self._due(force):
            self.show(self.line(read, done, stats), force=True)

    def show(self, text: str, *, force: bool = False) -> None:
        """Shows ``text`` if it is time to (or ``force``) and it says something new."""
        if not self._due(force) or text == self._last:
            return
        self._shown_at = self._clock()
        self._last = text
        if self._in_place:
            # Padded over the previous line, which may have been longer.
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """Ends the line in place (what follows starts on a line of its own)."""
        if self._in_place and self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0

    def _due(self, force: bool) -> bool:
        return self._enabled and (force or self._clock() - self._shown_at >= self._interval_s)


class RateLimiter:
    """Spaces out sending so that, from the start, at most ``rate`` texts per second go out."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._started = time.monotonic()
        self._granted = 0

    async def acquire(self, count: int) -> None:
        if not self._rate:
            return
        due = self._started + self._granted / self._rate
        self._granted += count
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
