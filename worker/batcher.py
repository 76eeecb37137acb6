"""The micro-batcher: coalesces jobs into batches by time window, padded-token budget and size.

A batch closes when the first of these happens:

* the window ends (it starts with the batch's first job: a lone job waits at most one window);
* the next job would push the batch's padded cost (longest job's tokens x number of jobs, what
  the model really computes after padding, as TEI's ``max_batch_tokens`` counts) past the budget;
* the batch holds ``max_size`` jobs;
* the model is idle (``model_idle``): waiting only helps while the model is busy, since a batch
  grows in the meantime at no cost to anyone. With nothing to wait behind, the open batch goes at
  once, so cache hits at low load never wait out the window (continuous batching, as TEI's queue
  does: the next batch is cut as soon as the backend is free).

The window is checked when the pipeline asks for a batch, which it does only when it has room for
one: while the model is busy the open batch keeps growing up to the budget or the size cap, so
batches grow with the load (fewer fixed costs per batch, as continuous batching does) and at low
load nothing waits longer than the window. The consumer bounds the jobs in flight (it pauses
partitions). The batcher knows nothing
of Kafka, Redis or the model: it moves opaque items with a token count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Batch(Generic[T]):
    """Items cut together, with the token count of each (padding is planned from it)."""

    items: list[T] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    opened_at: float = 0.0
    longest: int = 0  # max(tokens), kept as items are added: add() stays O(1)

    def __len__(self) -> int:
        return len(self.items)

    def append(self, item: T, tokens: int) -> None:
        self.items.append(item)
        self.tokens.append(tokens)
        self.longest = max(self.longest, tokens)

    @property
    def padded_tokens(self) -> int:
        return self.longest * len(self.tokens)

    def padded_tokens_with(self, tokens: int) -> int:
        return max(self.longest, tokens) * (len(self.tokens) + 1)


class MicroBatcher(Generic[T]):
    """Coalesces items into batches: a batch is cut when its time window ends, when one more
    item would pass the token budget, or at the size limit."""

    def __init__(
        self,
        *,
        window_s: float,
        token_budget: int,
        max_size: int,
        clock: Callable[[], float] = time.monotonic,
        model_idle: Callable[[], bool] = lambda: False,
    ) -> None:
        if token_budget <= 0 or max_size <= 0 or window_s < 0:
            raise ValueError("token_budget and max_size must be > 0, window_s >= 0")
        self.window_s = window_s
        self.token_budget = token_budget
        self.max_size = max_size
        self._clock = clock
        self._model_idle = model_idle
        self._open: Batch[T] = Batch()
        self._closed: deque[Batch[T]] = deque()
        self._changed = asyncio.Event()

    def add(self, item: T, tokens: int) -> None:
        """Adds a job; ``tokens`` is its length in model tokens (after truncation)."""
        tokens = max(1, tokens)
        # A job too big for the budget on its own still runs, alone (never starved, never dropped).
        if self._open.items and self._open.padded_tokens_with(tokens) > self.token_budget:
            self._close_open()
        if not self._open.items:
            self._open.opened_at = self._clock()
        self._open.append(item, tokens)
        if len(self._open) >= self.max_size or self._open.padded_tokens >= self.token_budget:
            self._close_open()
        self._changed.set()

    def _close_open(self) -> None:
        self._closed.append(self._open)
        self._open = Batch()

    @property
    def pending(self) -> int:
        """Jobs held by the batcher, open and closed batches together."""
        return len(self._open) + sum(len(b) for b in self._closed)

    def flush(self) -> list[Batch[T]]:
        """Closes the open batch now and hands back every batch still held (for shutdown)."""
        if self._open.items:
            self._close_open()
        batches = list(self._closed)
        self._closed.clear()
        return batches

    def discard(self, predicate: Callable[[T], bool]) -> list[T]:
        """Removes the jobs matching ``predicate`` from every batch not yet handed out (a revoked
        partition's jobs: their offsets stay uncommitted, so the new owner gets them)."""
        removed: list[T] = []
        for batch in [self._open, *self._closed]:
            kept = [
                (item, tokens)
                for item, tokens in zip(batch.items, batch.tokens, strict=True)
                if not predicate(item)
            ]
            removed.extend(item for item in batch.items if predicate(item))
            batch.items = [item for item, _ in kept]
            batch.tokens = [tokens for _, tokens in kept]
            batch.longest = max(batch.tokens, default=0)
        self._closed = deque(b for b in self._closed if b.items)
        return removed

    def wake(self) -> None:
        """Something ``model_idle`` reads has changed: look at the open batch again."""
        self._changed.set()

    def poll(self) -> Batch[T] | None:
        """The next closed batch, closing the open one first if its window has ended or the model
        is idle."""
        if (
            not self._closed
            and self._open.items
            and (self._clock() - self._open.opened_at >= self.window_s or self._model_idle())
        ):
            self._close_open()
        return self._closed.popleft() if self._closed else None

    async def next_batch(self) -> Batch[T]:
        """Waits for the next batch to close."""
        while True:
            batch = self.poll()
            if batch is not None:
                return batch
            self._changed.clear()
            if self._open.items:
                remaining = self._open.opened_at + self.window_s - self._clock()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=max(remaining, 0.0))
            else:
                await self._changed.wait()
