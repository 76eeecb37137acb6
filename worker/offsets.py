"""Which offsets may be committed: the lowest offset per partition whose result is not yet acknowledged.

Every consumed record is tracked when it arrives and marked done when everything it caused (its
result, or its error result and dead-letter copy) has been acknowledged by Kafka. Batches may
finish out of order, and records may be tracked out of order (salvage hands over the culprits of
a record batch and the good records around them separately); the committable offset of a
partition is always the lowest offset still pending, so a commit never covers a record whose
result could still be lost (tests/worker/test_offsets.py checks it over generated interleavings).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Hashable)


@dataclass(slots=True)
class _PartitionState:
    generation: int  # a new one each time the partition is tracked afresh (after a forget)
    pending: dict[int, int] = field(default_factory=dict)  # offset -> bytes it holds
    # Every pending offset (and some done ones, dropped lazily): its smallest is the lowest
    # offset still pending, whatever order offsets were tracked in.
    heap: list[int] = field(default_factory=list)
    next_offset: int = -1  # one past the highest offset seen
    committed: int = -1  # the last offset handed out for commit

    def lowest_pending(self) -> int | None:
        while self.heap and self.heap[0] not in self.pending:
            heapq.heappop(self.heap)
        return self.heap[0] if self.heap else None


class OffsetTracker(Generic[P]):
    """Per partition, the records not yet answered and the bytes they hold; what may be committed."""

    def __init__(self) -> None:
        self._partitions: dict[P, _PartitionState] = {}
        self._bytes = 0
        self._generations = itertools.count(1)

    def track(self, partition: P, offset: int, size: int = 0, next_offset: int | None = None) -> None:
        """A record arrived; ``size`` is what it holds in memory until done; ``next_offset`` is
        where the partition continues after it (past a skipped unreadable batch)."""
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _PartitionState(next(self._generations))
        self._bytes += size - state.pending.get(offset, 0)
        if offset not in state.pending:
            heapq.heappush(state.heap, offset)
        state.pending[offset] = size
        state.next_offset = max(state.next_offset, offset + 1, next_offset or 0)

    def done(self, partition: P, offset: int) -> None:
        state = self._partitions.get(partition)
        if state is not None:  # the partition may have been revoked meanwhile
            self._bytes -= state.pending.pop(offset, 0)

    def generation(self, partition: P) -> int | None:
        """Which stretch of owning ``partition`` its tracked records belong to: it changes when
        the partition is forgotten (revoked, fenced) and tracked again. A batch cut under one
        generation must not be answered for, nor its offsets committed, under another: the new
        owner reads those records again from the committed offset. None when not tracked."""
        state = self._partitions.get(partition)
        return state.generation if state is not None else None

    def position(self, partition: P) -> int | None:
        """One past the last offset tracked (where fetching continues), or None."""
        state = self._partitions.get(partition)
        return state.next_offset if state is not None and state.next_offset >= 0 else None

    @property
    def in_flight(self) -> int:
        return sum(len(s.pending) for s in self._partitions.values())

    @property
    def in_flight_bytes(self) -> int:
        return self._bytes

    def in_flight_of(self, partitions: Iterable[P]) -> int:
        return sum(len(self._partitions[p].pending) for p in partitions if p in self._partitions)

    def committable(self) -> dict[P, int]:
        """Offsets to commit (Kafka's 'next offset to read') that moved since the last call."""
        offsets: dict[P, int] = {}
        for partition, state in self._partitions.items():
            lowest = state.lowest_pending()
            target = lowest if lowest is not None else state.next_offset
            if target > state.committed:
                offsets[partition] = target
        return offsets

    def commit_point(self, partition: P, answering: Iterable[int]) -> int | None:
        """Exactly-once: the offset a transaction that answers the records ``answering`` of
        ``partition`` may commit with them. It stops at the lowest other record still pending,
        whatever batch holds it (a cache hit answered at once may be past a miss still in the
        model): a later owner starts there, so nothing below it may be unanswered. None when the
        partition is not tracked (revoked)."""
        state = self._partitions.get(partition)
        if state is None:
            return None
        these = set(answering)
        others = [offset for offset in state.pending if offset not in these]
        return min(others) if others else state.next_offset

    def mark_committed(self, offsets: dict[P, int]) -> None:
        for partition, offset in offsets.items():
            state = self._partitions.get(partition)
            if state is not None:
                state.committed = max(state.committed, offset)

    def forget(self, partitions: Iterable[P]) -> None:
        """Drops revoked partitions: their uncommitted records will be redelivered to the new owner."""
        for partition in partitions:
            state = self._partitions.pop(partition, None)
            if state is not None:
                self._bytes -= sum(state.pending.values())


class Committer(Protocol):
    """What the offsets room asks of the group consumer (aiokafka's AIOKafkaConsumer has it)."""

    def assignment(self) -> set[TopicPartition]: ...
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...


class ConsumedOffsets(OffsetTracker[TopicPartition]):
    """The one room for a worker's offsets, from take to commit: the intake tracks each consumed
    record, the runtime marks it done once everything it caused is acknowledged, and ``commit``
    (at-least-once) commits each assigned partition up to its first record not yet done. In
    exactly-once mode (``commits=False``) offsets go into each batch's transaction instead
    (worker.delivery), and ``commit`` only updates the gauges."""

    def __init__(self, consumer: Committer, metrics: WorkerMetrics, *, commits: bool = True) -> None:
        super().__init__()
        self._consumer = consumer
        self._metrics = metrics
        self._commits = commits
        self._lock = asyncio.Lock()

    def observe(self) -> None:
        self._metrics.in_flight.set(self.in_flight)
        self._metrics.in_flight_bytes.set(self.in_flight_bytes)

    async def commit(self) -> None:
        self.observe()
        if not self._commits:
            return
        async with self._lock:
            assignment = self._consumer.assignment()
            offsets = {tp: o for tp, o in self.committable().items() if tp in assignment}
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:  # CommitFailedError included: transient (worker.failures)
                # The group is rebalancing or the broker is away: the new owner re-reads from the
                # last commit (duplicates, never losses); the next commit carries the progress.
                self._metrics.commits.labels("failed").inc()
                log.warning("offset commit failed (%s); will retry with the next batch", exc)
                return
            self.mark_committed(offsets)
            self._metrics.commits.labels("ok").inc()
