"""Delivery: how a batch's results, error results and dead letters reach Kafka, and how that ties
to offsets. One object, chosen when the worker is wired; nothing else asks which guarantee is on.

* ``AtLeastOnce``: one idempotent producer; a batch is sent and every ack awaited, retrying through
  broker outages; its ``commit`` (called by the worker's commit loop) then commits offsets up to
  the acknowledged records.
  A crash between ack and commit redelivers (duplicates, never losses).
* ``ExactlyOnce``: one transactional producer per input partition, with a transactional id of that
  partition (the way Kafka Streams fenced zombies before KIP-447). A batch's results for a
  partition and that partition's offsets commit in one transaction. A worker taking a partition
  over starts its producer, which fences the previous owner's producer and ends its open
  transaction; only then does the worker read the committed offset; a zombie (a paused or expelled worker
  that wakes up) is fenced on its next transaction and gives the partition up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, InvalidProducerEpoch, KafkaError, ProducerFenced

from schemas import EmbedResult
from worker.jobs import Job, Rejection
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.publisher import Ack, Outgoing, acknowledged

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 5.0
# One transaction attempt (begin, send, offsets, commit) normally takes milliseconds.
TRANSACTION_ATTEMPT_TIMEOUT_S = 30.0
CLEANUP_TIMEOUT_S = 5.0
# A partition given up after a fence that the group still assigns to this worker this long after:
# the fence was this worker's own expired transaction, not a new owner (who would have revoked it).
RECLAIM_AFTER_S = 25.0
FENCED = (ProducerFenced, InvalidProducerEpoch)


@dataclass(slots=True)
class BatchWork:
    """One batch's outcome, ready to publish."""

    items: Sequence[Job | Rejection]  # every record of the batch (their offsets)
    results: list[tuple[Job, EmbedResult]]
    rejections: list[Rejection]


@dataclass(slots=True)
class Delivered:
    rejected: list[Rejection] = field(default_factory=list)  # made while publishing (reply topic gone)
    lost: set[TopicPartition] = field(default_factory=set)  # not published: no longer this worker's


class BatchPublisher(Protocol):
    """Turns a batch's outcome into records and sends them (worker.publisher.ResultPublisher)."""

    async def prepare(
        self, results: list[tuple[Job, EmbedResult]], rejections: list[Rejection]
    ) -> Outgoing: ...
    async def send(self, producer: AIOKafkaProducer, outgoing: Outgoing) -> list[tuple[str, Ack]]: ...


class KnownTopics(Protocol):
    def forget(self, topic: str) -> None: ...


class Delivery(Protocol):
    """How a batch's outcome reaches Kafka and how that ties to offsets: the worker hands each
    batch to ``deliver`` in the order batches were cut, calls ``commit`` after batches finish,
    and ``assigned`` / ``revoked`` on rebalances (``reclaimable``: partitions to take back)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def assigned(self, partitions: list[TopicPartition]) -> set[TopicPartition]: ...
    async def revoked(self, partitions: list[TopicPartition]) -> None: ...
    async def deliver(self, sequence: int, work: BatchWork) -> Delivered: ...
    async def commit(self) -> None: ...
    def reclaimable(self, assigned: set[TopicPartition]) -> list[TopicPartition]: ...


def _backoff(attempt: int) -> float:
    return float(min(MAX_BACKOFF_S, 0.25 * 2**attempt))


def _source(item: Job | Rejection) -> TopicPartition:
    return TopicPartition(item.source.topic, item.source.partition)


class AtLeastOnce:
    """One idempotent producer; a batch is sent until every record is acknowledged, then its
    offsets become committable."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        publisher: BatchPublisher,
        cluster: KnownTopics,
        metrics: WorkerMetrics,
        *,
        consumer: AIOKafkaConsumer,
        offsets: OffsetTracker[TopicPartition],
    ) -> None:
        self._producer = producer
        self._publisher = publisher
        self._cluster = cluster
        self._metrics = metrics
        self._consumer = consumer
        self._offsets = offsets
        self._commit_lock = asyncio.Lock()

    async def commit(self) -> None:
        """Commits each assigned partition up to its first record not yet answered (results are
        acknowledged before their records count as answered)."""
        async with self._commit_lock:
            assignment = self._consumer.assignment()
            offsets = {tp: o for tp, o in self._offsets.committable().items() if tp in assignment}
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                # The group is rebalancing or the broker is away: the new owner re-reads from the
                # last commit (duplicates, never losses); the next commit carries the progress.
                self._metrics.commits.labels("failed").inc()
                log.warning("offset commit failed (%s); will retry with the next batch", exc)
                return
            self._offsets.mark_committed(offsets)
            self._metrics.commits.labels("ok").inc()

    async def start(self) -> None:
        await self._producer.start()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._producer.stop()

    async def assigned(self, partitions: list[TopicPartition]) -> set[TopicPartition]:
        return set()

    async def revoked(self, partitions: list[TopicPartition]) -> None:
        return None

    def reclaimable(self, assigned: set[TopicPartition]) -> list[TopicPartition]:
        return []

    async def deliver(self, sequence: int, work: BatchWork) -> Delivered:
        """Sends the batch and waits for every ack; on any failure (a broker outage, a reply topic
        deleted meanwhile) sends it again until it is acknowledged (duplicates, never losses)."""
        attempt = 0
        while True:
            try:
                outgoing = await self._publisher.prepare(work.results, work.rejections)
                failed = await acknowledged(await self._publisher.send(self._producer, outgoing))
                if not failed:
                    return Delivered(rejected=outgoing.rejected)
                error: BaseException = failed[0][1]
                for topic, _ in failed:
                    self._cluster.forget(topic)
            except KafkaError as exc:
                error = exc
            attempt += 1
            self._metrics.publish_retries.inc()
            log.warning(
                "publishing a batch failed (%s: %s); sending it again in %.1fs (attempt %d)",
                type(error).__name__,
                error,
                _backoff(attempt),
                attempt + 1,
            )
            await asyncio.sleep(_backoff(attempt))


@dataclass(slots=True)
class _Part:
    results: list[tuple[Job, EmbedResult]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    next_offset: int = 0


@dataclass(eq=False, slots=True)
class _Ownership:
    """One stretch of owning a partition, from taking it to losing it. Work started under one
    ownership never touches the producer of a later one (the partition may come back to this
    worker while an old transaction is still being retried)."""

    producer: AIOKafkaProducer | None  # None while a failed transaction waits for a fresh producer


class ExactlyOnce:
    """A transactional producer per input partition; each batch's part for a partition and that
    partition's offsets commit in one transaction."""

    def __init__(
        self,
        *,
        consumer: AIOKafkaConsumer,
        new_producer: Callable[[str], AIOKafkaProducer],
        publisher: BatchPublisher,
        cluster: KnownTopics,
        metrics: WorkerMetrics,
        group_id: str,
        hold: Callable[[BatchWork], float] | None = None,
    ) -> None:
        self._consumer = consumer
        self._hold = hold  # fault injection (tests): seconds to keep a batch's transaction open
        self._new_producer = new_producer
        self._publisher = publisher
        self._cluster = cluster
        self._metrics = metrics
        self._group_id = group_id
        self._owned: dict[TopicPartition, _Ownership] = {}
        self._lost_at: dict[TopicPartition, float] = {}
        # Batches publish in the order they were cut, so a partition's offsets only move forward.
        self._turn = asyncio.Condition()
        self._next_sequence = 0

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"embedfleet-{self._group_id}-{tp.topic}-{tp.partition}"

    async def start(self) -> None:
        return None

    async def commit(self) -> None:
        return None  # each batch's offsets were committed inside its transaction

    async def close(self) -> None:
        await self._stop_producers(list(self._owned))

    async def assigned(self, partitions: list[TopicPartition]) -> set[TopicPartition]:
        """Fences the previous owners: once this returns, their open transactions have ended and
        the committed offsets are final (the worker then reads them and positions each partition
        there). Returns the partitions it could not take."""
        failed: set[TopicPartition] = set()
        results = await asyncio.gather(*(self._take(tp) for tp in partitions), return_exceptions=True)
        for tp, outcome in zip(partitions, results, strict=True):
            if isinstance(outcome, BaseException):
                log.warning("could not take partition %s over (%s): retrying later", tp, outcome)
                failed.add(tp)
                self._lost_at[tp] = time.monotonic() - RECLAIM_AFTER_S + MAX_BACKOFF_S
        return failed

    async def _take(self, tp: TopicPartition) -> None:
        await self._stop_producers([tp])
        producer = self._new_producer(self.transactional_id(tp))
        try:
            await asyncio.wait_for(self._fence(producer), TRANSACTION_ATTEMPT_TIMEOUT_S)
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._owned[tp] = _Ownership(producer)
        self._lost_at.pop(tp, None)

    @staticmethod
    async def _fence(producer: AIOKafkaProducer) -> None:
        """Starts ``producer`` and waits until its InitProducerId has gone through: the epoch is
        bumped and the previous owner's transaction has ended (committed or aborted, its offsets
        written). ``start()`` alone returns before that; beginning a transaction waits for it,
        and aborting the empty transaction sends nothing."""
        await producer.start()
        await producer.begin_transaction()
        await producer.abort_transaction()

    async def revoked(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._lost_at.pop(tp, None)
        await self._stop_producers(partitions)

    def reclaimable(self, assigned: set[TopicPartition]) -> list[TopicPartition]:
        now = time.monotonic()
        return [tp for tp, at in self._lost_at.items() if tp in assigned and now - at > RECLAIM_AFTER_S]

    async def _stop_producers(self, partitions: list[TopicPartition]) -> None:
        owned = [self._owned.pop(tp, None) for tp in partitions]
        for producer in [o.producer for o in owned if o is not None and o.producer is not None]:
            with contextlib.suppress(Exception):
                await producer.stop()

    async def deliver(self, sequence: int, work: BatchWork) -> Delivered:
        parts: dict[TopicPartition, _Part] = defaultdict(_Part)
        for item in work.items:
            part = parts[_source(item)]
            part.next_offset = max(part.next_offset, item.source.offset + 1)
        for job, result in work.results:
            parts[_source(job)].results.append((job, result))
        for rejection in work.rejections:
            parts[_source(rejection)].rejections.append(rejection)
        async with self._turn:
            await self._turn.wait_for(lambda: self._next_sequence == sequence)
            hold_s = self._hold(work) if self._hold is not None else 0.0
            try:
                outcomes = await asyncio.gather(
                    *(self._transaction(tp, part, hold_s) for tp, part in parts.items())
                )
            finally:
                self._next_sequence = sequence + 1
                self._turn.notify_all()
        delivered = Delivered()
        for tp, outcome in zip(parts, outcomes, strict=True):
            if outcome is None:
                delivered.lost.add(tp)
            else:
                delivered.rejected.extend(outcome)
        return delivered

    async def _transaction(
        self, tp: TopicPartition, part: _Part, hold_s: float = 0.0
    ) -> list[Rejection] | None:
        """Publishes one partition's part of a batch with its offsets in one transaction; None when
        the partition is no longer this worker's (revoked, or fenced by a new owner)."""
        ownership = self._owned.get(tp)
        attempt = 0
        while True:
            if ownership is None or self._owned.get(tp) is not ownership:
                return None  # revoked (or fenced) since the batch was cut
            producer = ownership.producer
            if producer is None:  # the last transaction failed: a fresh producer ends it first
                producer = await self._restart(tp, ownership)
                if producer is None:
                    attempt += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
                if await self._committed_past(tp, part.next_offset):
                    return []  # it had committed after all (only the answer was lost)
            try:
                # A transaction that hangs (a coordinator that never answers) would hold back every
                # later batch: past the limit it counts as failed, is aborted and retried.
                rejected = await asyncio.wait_for(
                    self._publish(producer, tp, part, hold_s), TRANSACTION_ATTEMPT_TIMEOUT_S + hold_s
                )
                self._metrics.commits.labels("ok").inc()
                return rejected
            except FENCED as exc:
                log.warning(
                    "partition %s: this worker's producer was fenced (%s): another worker "
                    "owns it now; giving it up",
                    tp,
                    type(exc).__name__,
                )
                self._metrics.fenced_partitions.inc()
                if self._owned.get(tp) is ownership:
                    self._lost_at[tp] = time.monotonic()
                    await self._stop_producers([tp])
                return None
            except (KafkaError, TimeoutError) as exc:
                attempt += 1
                self._metrics.commits.labels("failed").inc()
                self._metrics.publish_retries.inc()
                log.warning(
                    "transaction for %s failed (%s: %s); retrying in %.1fs",
                    tp,
                    type(exc).__name__,
                    exc,
                    _backoff(attempt),
                )
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.abort_transaction(), CLEANUP_TIMEOUT_S)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), CLEANUP_TIMEOUT_S)
                if ownership.producer is producer:
                    ownership.producer = None
                await asyncio.sleep(_backoff(attempt))

    async def _publish(
        self, producer: AIOKafkaProducer, tp: TopicPartition, part: _Part, hold_s: float
    ) -> list[Rejection]:
        """One transaction: the part's results and dead letters, its offsets, then the commit."""
        await producer.begin_transaction()
        outgoing = await self._publisher.prepare(part.results, part.rejections)
        acks = await self._publisher.send(producer, outgoing)
        await producer.send_offsets_to_transaction({tp: part.next_offset}, self._group_id)
        if hold_s:
            log.warning("holding the open transaction of %s for %.0fs (fault injection)", tp, hold_s)
            await asyncio.sleep(hold_s)
        await producer.commit_transaction()
        failed = await acknowledged(acks)
        if failed:
            raise failed[0][1]
        return outgoing.rejected

    async def _restart(self, tp: TopicPartition, ownership: _Ownership) -> AIOKafkaProducer | None:
        """A fresh producer for ``tp`` (starting it completes or aborts the failed transaction),
        or None when the cluster cannot be reached yet or the partition was lost meanwhile."""
        producer = self._new_producer(self.transactional_id(tp))
        try:
            await asyncio.wait_for(self._fence(producer), TRANSACTION_ATTEMPT_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            log.warning("cannot restart the producer of %s yet (%s)", tp, type(exc).__name__)
            with contextlib.suppress(Exception):
                await producer.stop()
            return None
        if self._owned.get(tp) is not ownership:  # revoked meanwhile
            with contextlib.suppress(Exception):
                await producer.stop()
            return None
        ownership.producer = producer
        return producer

    async def _committed_past(self, tp: TopicPartition, next_offset: int) -> bool:
        try:
            committed = await self._consumer.committed(tp)
        except KafkaError:
            return False
        return committed is not None and committed >= next_offset
