"""The progress line on stderr (rewritten in place on a terminal) and the pace of sending."""

from __future__ import annotations

import asyncio
import time
from typing import IO

from producer.client import ClientStats


class Progress:
    """Progress on stderr for long runs of `embedfleet produce`."""

    def __init__(self, stream: IO[str], *, enabled: bool, interval_s: float = 0.25) -> None:
        self._stream = stream
        self._in_place = enabled and stream.isatty()
        # Off a terminal, \r would pile up in a log: print a plain line now and then instead.
        self._interval_s = interval_s if self._in_place else 10.0
        self._enabled = enabled
        self._started = time.monotonic()
        self._shown_at = self._started
        self._width = 0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def rate(self, done: int) -> float:
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self, read: int, done: int, stats: ClientStats) -> str:
        return (
            f"{done}/{read} texts  cached {stats.cached}  computed {stats.computed}  "
            f"failed {stats.failed}  {self.rate(done):,.0f} texts/s"
        )

    def update(self, read: int, done: int, stats: ClientStats, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self._enabled or (not force and now - self._shown_at < self._interval_s):
            return
        self._shown_at = now
        text = self.line(read, done, stats)
        if self._in_place:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._in_place and self._width:
            self._stream.write("\n")
            self._stream.flush()


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
