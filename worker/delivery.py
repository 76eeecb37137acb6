"""Delivery: how a batch's results, error results and dead letters reach Kafka, and how that ties
to offsets. One object, chosen when the worker is wired; nothing else asks which guarantee is on.

* ``AtLeastOnce``: one idempotent producer; a batch is sent and every ack awaited, retrying through
  broker outages; the offsets room (worker.offsets) then commits offsets up to the acknowledged
  records.
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
import enum
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from worker.errors import WorkerError
from worker.failures import (
    FATAL,
    PER_RECORD,
    AckTimeout,
    SharedBatchRefused,
    WorkerFatal,
    classify,
    describe,
    discard_producer,
    needs_new_producer,
)
from worker.jobs import Answer, Job, Rejection, Source
from worker.metrics import WorkerMetrics
from worker.publisher import Ack, Outgoing, Part, Plan, Send, acknowledged

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 5.0
# One transaction attempt (begin, send, offsets, commit) normally takes milliseconds.
TRANSACTION_ATTEMPT_TIMEOUT_S = 30.0
CLEANUP_TIMEOUT_S = 5.0
# A partition given up after a fence that the group still assigns to this worker this long after:
# the fence was this worker's own expired transaction, not a new owner (who would have revoked it).
RECLAIM_AFTER_S = 25.0
FENCED = (ProducerFenced, InvalidProducerEpoch)
# A dead letter that cannot be written is retried this many times, then counted and given up.
DLQ_WRITE_ATTEMPTS = 5


@dataclass(slots=True)
class BatchWork:
    """One batch's outcome, ready to publish."""

    items: Sequence[Job | Rejection]  # every record of the batch (their offsets)
    results: list[Answer]
    rejections: list[Rejection]
    # The offsets room's generation of each partition when the batch was cut (see
    # worker.offsets.OffsetTracker.generation); empty where nothing is tracked (unit tests).
    generations: Mapping[TopicPartition, int | None] = field(default_factory=dict)


@dataclass(slots=True)
class Delivered:
    rejected: list[Rejection] = field(default_factory=list)  # made while publishing (reply topic gone)
    lost: set[TopicPartition] = field(default_factory=set)  # not published: no longer this worker's
    # not published: cut before the partition was revoked and taken again; read again from the
    # committed offset under the new ownership, which keeps the partition
    stale: set[TopicPartition] = field(default_factory=set)


class BatchPublisher(Protocol):
    """Turns a batch's outcome into records and sends them (worker.publisher.ResultPublisher)."""

    async def prepare(
        self, results: list[Answer], rejections: list[Rejection], plan: Plan | None = None
    ) -> Outgoing: ...
    async def send(self, producer: AIOKafkaProducer, sends: Sequence[Send]) -> list[tuple[Send, Ack]]: ...
    def is_reply_topic(self, topic: str) -> bool: ...


class KnownTopics(Protocol):
    def forget(self, topic: str) -> None: ...
    def quarantine(self, topic: str, why: str) -> None: ...
    async def probe(self, timeout_s: float = 5.0) -> bool: ...
    async def vet_for_transactions(self, topics: Iterable[str]) -> None: ...


class TransactionCluster(KnownTopics, Protocol):
    async def committed_offset(self, group_id: str, tp: TopicPartition) -> OffsetAndMetadata | None: ...


class PendingOffsets(Protocol):
    """The offsets room as exactly-once uses it (worker.offsets.ConsumedOffsets)."""

    def commit_point(self, partition: TopicPartition, answering: Iterable[int]) -> int | None: ...
    def done(self, partition: TopicPartition, offset: int) -> None: ...
    def generation(self, partition: TopicPartition) -> int | None: ...


class FailedSends:
    """What a failed send teaches the next attempt at a batch, by the failure policy
    (worker.failures): a send of several records refused per record, or one refused in a batch it
    shared with other sends, is split into records sent alone; a single record a reply topic
    refuses, or that it does not acknowledge within ``reply_timeout_s``, is answered
    reply_to_unavailable on the default results topic; a result the results topic itself refuses
    becomes an error result; a dead letter that cannot be written is retried a few times, then
    counted and given up; an outage of the fleet's own topics is waited out."""

    def __init__(
        self, publisher: BatchPublisher, cluster: KnownTopics, metrics: WorkerMetrics, reply_timeout_s: float
    ) -> None:
        self._publisher = publisher
        self._cluster = cluster
        self._metrics = metrics
        self.reply_timeout_s = reply_timeout_s

    def timeout_of(self, send: Send) -> float | None:
        return self.reply_timeout_s if self._publisher.is_reply_topic(send.topic) else None

    async def learn(
        self,
        outcomes: list[tuple[Send, BaseException | None]],
        plan: Plan,
        *,
        started: float,
        dlq_attempts: dict[Source, int],
        keep_acknowledged: bool,
    ) -> bool:
        """Updates ``plan`` from the outcomes; True when something must be sent again. Raises
        WorkerFatal or the producer's fence when the policy says fatal. ``keep_acknowledged``:
        acknowledged pieces are never sent again (at-least-once; a transaction resends them all).
        A reply topic is blamed for a timeout only while the cluster answers: in an outage every
        send waits, and the requests keep their reply topics."""
        again = False
        reachable: bool | None = None
        for send, error in outcomes:
            if error is None:
                continue
            again = True
            self._cluster.forget(send.topic)
            disposition = classify(error)
            why = describe(error)
            self._metrics.publish_failures.labels(disposition.value).inc()
            if disposition is FATAL:
                if isinstance(error, FENCED):
                    raise error
                raise WorkerFatal(f"writing to {send.topic} failed: {why}") from error
            sources = [source for source, _ in send.pieces]
            if send.part is Part.DEAD_LETTER:
                [source] = sources
                dlq_attempts[source] = dlq_attempts.get(source, 0) + 1
                if disposition is PER_RECORD or dlq_attempts[source] >= DLQ_WRITE_ATTEMPTS:
                    plan.skip.update(send.pieces)
                    self._metrics.dlq_write_failures.inc()
                    log.error(
                        "could not write the dead letter of %s/%d@%d (%s); giving it up",
                        source.topic,
                        source.partition,
                        source.offset,
                        why,
                    )
            elif disposition is PER_RECORD and (len(sources) > 1 or isinstance(error, SharedBatchRefused)):
                plan.alone.update(sources)  # find the record that is refused
            elif self._publisher.is_reply_topic(send.topic):
                timed_out = (
                    isinstance(error, AckTimeout) or time.monotonic() - started >= self.reply_timeout_s
                )
                if timed_out and disposition is not PER_RECORD and reachable is None:
                    reachable = (
                        any(e is None and not self._publisher.is_reply_topic(s.topic) for s, e in outcomes)
                        or await self._cluster.probe()
                    )
                if disposition is PER_RECORD or (timed_out and reachable):
                    for source in sources:
                        plan.unavailable[source] = why
                    if disposition is not PER_RECORD:
                        self._cluster.quarantine(send.topic, why)
                    log.warning("reply topic %s did not take %d record(s): %s", send.topic, len(sources), why)
            elif disposition is PER_RECORD:
                [source] = sources
                if send.part is Part.RESULT:
                    plan.refused[source] = why
                else:  # an error result the results topic refuses: its dead letter still goes
                    plan.skip.update(send.pieces)
                    log.error("the results topic refused an error result (%s); dead letter only", why)
        if again and keep_acknowledged:  # only another attempt needs to know what is done
            for send, error in outcomes:
                if error is None:
                    plan.skip.update(send.pieces)
        return again


class Delivery(Protocol):
    """How a batch's outcome reaches Kafka: the runtime hands each batch to ``deliver`` in the
    order batches were cut, and ``assigned`` / ``revoked`` on rebalances (``reclaimable``:
    partitions to take back). Offsets are the offsets room's (worker.offsets.ConsumedOffsets):
    it commits them after at-least-once deliveries; exactly-once commits them in each
    transaction."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def assigned(self, partitions: list[TopicPartition]) -> set[TopicPartition]: ...
    async def revoked(self, partitions: list[TopicPartition]) -> None: ...
    async def deliver(self, sequence: int, work: BatchWork) -> Delivered: ...
    def reclaimable(self, assigned: set[TopicPartition]) -> list[TopicPartition]: ...


def _backoff(attempt: int) -> float:
    return float(min(MAX_BACKOFF_S, 0.25 * 2**attempt))


def _source(item: Job | Rejection) -> TopicPartition:
    return TopicPartition(item.source.topic, item.source.partition)


class AtLeastOnce:
    """One idempotent producer for the fleet's own topics, and one for reply topics whose batches
    expire (``reply_timeout_s``): an idempotent producer never gives a batch up, so a reply topic
    that never acknowledges would hold its sends, and the worker's shutdown, forever. A batch's
    records are sent until each is acknowledged or answered otherwise by the failure policy;
    then its offsets become committable. A producer whose sequence state the broker lost (after
    an outage) is replaced by a fresh one from ``new_producer(for_replies)``."""

    def __init__(
        self,
        new_producer: Callable[[bool], AIOKafkaProducer],
        publisher: BatchPublisher,
        cluster: KnownTopics,
        metrics: WorkerMetrics,
        *,
        reply_timeout_s: float = 10.0,
    ) -> None:
        self._new_producer = new_producer
        # for reply topics? -> the producer in use
        self._producers = {False: new_producer(False), True: new_producer(True)}
        self._stale: set[bool] = set()  # producers to replace before their next send
        self._renewing = asyncio.Lock()
        self._publisher = publisher
        self._cluster = cluster
        self._metrics = metrics
        self._failed_sends = FailedSends(publisher, cluster, metrics, reply_timeout_s)

    async def start(self) -> None:
        for producer in self._producers.values():
            await producer.start()

    async def close(self) -> None:
        for producer in self._producers.values():
            await discard_producer(producer, CLEANUP_TIMEOUT_S)

    async def _producer(self, for_replies: bool) -> AIOKafkaProducer:
        """The producer to send with, replaced first when it was marked stale. Raises a
        KafkaError while a fresh one cannot start (an outage: the caller backs off)."""
        if for_replies in self._stale:
            async with self._renewing:
                if for_replies in self._stale:
                    await discard_producer(self._producers[for_replies], CLEANUP_TIMEOUT_S)
                    fresh = self._new_producer(for_replies)
                    try:
                        await fresh.start()
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await fresh.stop()
                        raise
                    self._producers[for_replies] = fresh
                    self._stale.discard(for_replies)
                    self._metrics.producers_replaced.inc()
                    log.warning("a fresh producer took over%s", " for reply topics" if for_replies else "")
        return self._producers[for_replies]

    def _mark_stale(
        self, outcomes: list[tuple[Send, BaseException | None]], used: dict[bool, AIOKafkaProducer]
    ) -> None:
        for send, error in outcomes:
            if not needs_new_producer(error):
                continue
            for_replies = self._publisher.is_reply_topic(send.topic)
            # Only the producer this attempt used: another batch may have replaced it already.
            if for_replies in used and self._producers[for_replies] is used[for_replies]:
                if for_replies not in self._stale:
                    log.warning("the broker lost a producer's sequence state (%s): replacing it", error)
                self._stale.add(for_replies)

    async def assigned(self, partitions: list[TopicPartition]) -> set[TopicPartition]:
        return set()

    async def revoked(self, partitions: list[TopicPartition]) -> None:
        return None

    def reclaimable(self, assigned: set[TopicPartition]) -> list[TopicPartition]:
        return []

    async def deliver(self, sequence: int, work: BatchWork) -> Delivered:
        """Sends the batch and waits for every ack; what failed is sent again as the failure
        policy says (worker.failures): only the failed records, never the whole batch again."""
        plan = Plan()
        rejected: dict[Source, Rejection] = {}
        dlq_attempts: dict[Source, int] = {}
        started = time.monotonic()
        attempt = 0
        while True:
            error: BaseException | None = None
            try:
                outgoing = await self._publisher.prepare(work.results, work.rejections, plan)
                rejected.update((r.source, r) for r in outgoing.rejected)
                if not outgoing.sends:
                    return Delivered(rejected=list(rejected.values()))
                own = [s for s in outgoing.sends if not self._publisher.is_reply_topic(s.topic)]
                replies = [s for s in outgoing.sends if self._publisher.is_reply_topic(s.topic)]
                used: dict[bool, AIOKafkaProducer] = {}
                acks = []
                for for_replies, sends in ((False, own), (True, replies)):
                    if sends:
                        used[for_replies] = await self._producer(for_replies)
                        acks += await self._publisher.send(used[for_replies], sends)
                outcomes = await acknowledged(acks, timeout_of=self._failed_sends.timeout_of)
                self._mark_stale(outcomes, used)
                if not await self._failed_sends.learn(
                    outcomes, plan, started=started, dlq_attempts=dlq_attempts, keep_acknowledged=True
                ):
                    return Delivered(rejected=list(rejected.values()))
                error = next(e for _, e in outcomes if e is not None)
                if all(classify(e) is PER_RECORD for _, e in outcomes if e is not None):
                    continue  # nothing to wait for: the refused records are answered otherwise
            except KafkaError as exc:  # the cluster could not be asked (metadata): an outage
                if classify(exc) is FATAL:
                    raise WorkerFatal(f"publishing failed: {describe(exc)}") from exc
                error = exc
            attempt += 1
            self._metrics.publish_retries.inc()
            log.warning(
                "publishing a batch failed (%s); sending what is left again in %.1fs (attempt %d)",
                describe(error),
                _backoff(attempt),
                attempt + 1,
            )
            await asyncio.sleep(_backoff(attempt))


class _Redo(WorkerError):
    """A send of a transaction failed: abort it and publish again as the plan now says."""

    def __init__(self, why: str, *, per_record: bool) -> None:
        super().__init__(why)
        self.per_record = per_record  # nothing to wait for: send again at once


class _Stale(enum.Enum):
    STALE = "stale"


STALE: Final = _Stale.STALE


@dataclass(slots=True)
class _Part:
    results: list[Answer] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # every record of the batch in the partition


@dataclass(eq=False, slots=True)
class _Ownership:
    """One stretch of owning a partition, from taking it to losing it. Work started under one
    ownership never touches the producer of a later one (the partition may come back to this
    worker while an old transaction is still being retried)."""

    producer: AIOKafkaProducer | None  # None while a failed transaction waits for a fresh producer


class ExactlyOnce:
    """A transactional producer per input partition; each batch's part for a partition and that
    partition's offsets commit in one transaction. The offset a transaction commits stops at the
    partition's lowest record still pending in any other batch (``offsets.commit_point``), and is
    marked with the attempt's token, so a commit whose answer was lost is recognised exactly."""

    def __init__(
        self,
        *,
        offsets: PendingOffsets,
        new_producer: Callable[[str], AIOKafkaProducer],
        publisher: BatchPublisher,
        cluster: TransactionCluster,
        metrics: WorkerMetrics,
        group_id: str,
        hold: Callable[[BatchWork], float] | None = None,
        reply_timeout_s: float = 10.0,
    ) -> None:
        self._failed_sends = FailedSends(publisher, cluster, metrics, reply_timeout_s)
        self._offsets = offsets
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
        producers = [o.producer for o in owned if o is not None and o.producer is not None]
        # Concurrently and bounded: a producer stuck on a batch nobody acknowledges must not make
        # a revoke outlast the group's rebalance timeout.
        await asyncio.gather(*(discard_producer(p, CLEANUP_TIMEOUT_S) for p in producers))

    async def deliver(self, sequence: int, work: BatchWork) -> Delivered:
        parts: dict[TopicPartition, _Part] = defaultdict(_Part)
        for item in work.items:
            parts[_source(item)].offsets.append(item.source.offset)
        for job, result in work.results:
            parts[_source(job)].results.append((job, result))
        for rejection in work.rejections:
            parts[_source(rejection)].rejections.append(rejection)
        async with self._turn:
            await self._turn.wait_for(lambda: self._next_sequence == sequence)
            hold_s = self._hold(work) if self._hold is not None else 0.0
            try:
                outcomes = await asyncio.gather(
                    *(
                        self._transaction(tp, part, work.generations.get(tp), hold_s)
                        for tp, part in parts.items()
                    )
                )
            finally:
                self._next_sequence = sequence + 1
                self._turn.notify_all()
        delivered = Delivered()
        for tp, outcome in zip(parts, outcomes, strict=True):
            if outcome is STALE:
                delivered.stale.add(tp)
            elif outcome is None:
                delivered.lost.add(tp)
            else:
                delivered.rejected.extend(outcome)
        return delivered

    async def _transaction(
        self, tp: TopicPartition, part: _Part, generation: int | None, hold_s: float = 0.0
    ) -> list[Rejection] | _Stale | None:
        """Publishes one partition's part of a batch with its offsets in one transaction; None when
        the partition is no longer this worker's (revoked, or fenced by a new owner); STALE when
        it was cut under an earlier ownership (the partition was revoked and taken back since:
        committed under the new one, its offset could move the group's position backwards or
        past records in flight)."""
        ownership = self._owned.get(tp)
        attempt = 0
        plan = Plan()  # what failed attempts taught: records to answer otherwise, or alone
        dlq_attempts: dict[Source, int] = {}
        started = time.monotonic()
        token: str | None = None  # the offsets metadata of the last attempt that may have committed
        while True:
            if self._offsets.generation(tp) != generation:
                return STALE
            if ownership is None or self._owned.get(tp) is not ownership:
                return None  # revoked (or fenced) since the batch was cut
            producer = ownership.producer
            if producer is None:  # the last transaction failed: a fresh producer ends it first
                producer = await self._restart(tp, ownership)
                if producer is None:
                    attempt += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
                if token is not None and await self._committed_by(tp, token):
                    self._answered(tp, part)
                    return []  # it had committed after all (only the answer was lost)
            token = uuid.uuid4().hex
            try:
                # A transaction that hangs (a coordinator that never answers) would hold back every
                # later batch: past the limit it counts as failed, is aborted and retried.
                rejected = await asyncio.wait_for(
                    self._publish(producer, tp, part, hold_s, plan, started, dlq_attempts, token),
                    TRANSACTION_ATTEMPT_TIMEOUT_S + hold_s,
                )
                self._metrics.commits.labels("ok").inc()
                self._answered(tp, part)
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
            except (KafkaError, TimeoutError, _Redo) as exc:
                if classify(exc) is FATAL and not isinstance(exc, _Redo):
                    raise WorkerFatal(f"a transaction for {tp} failed: {describe(exc)}") from exc
                redo = isinstance(exc, _Redo) and exc.per_record
                if not redo:
                    attempt += 1
                    self._metrics.commits.labels("failed").inc()
                    self._metrics.publish_retries.inc()
                log.warning(
                    "transaction for %s failed (%s); %s",
                    tp,
                    describe(exc),
                    "sending it again without the refused records"
                    if redo
                    else f"retrying in {_backoff(attempt):.1f}s",
                )
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.abort_transaction(), CLEANUP_TIMEOUT_S)
                await discard_producer(producer, CLEANUP_TIMEOUT_S)
                if ownership.producer is producer:
                    ownership.producer = None
                if not redo:
                    await asyncio.sleep(_backoff(attempt))

    async def _publish(
        self,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        part: _Part,
        hold_s: float,
        plan: Plan,
        started: float,
        dlq_attempts: dict[Source, int],
        token: str,
    ) -> list[Rejection]:
        """One transaction: the part's results and dead letters, its offsets, then the commit.
        Every send is acknowledged (reply topics within their bound) before the offsets go in; a
        send that failed aborts the transaction, and the next one answers its records as the
        failure policy says (a failed produce leaves a transaction abortable only)."""
        replies = {j.reply_topic for j, _ in part.results} | {r.reply_topic for r in part.rejections}
        # Only reply topics: the fleet's own topics are the operator's, not a requester's choice.
        await self._cluster.vet_for_transactions(t for t in replies if self._publisher.is_reply_topic(t))
        await producer.begin_transaction()
        outgoing = await self._publisher.prepare(part.results, part.rejections, plan)
        acks = await self._publisher.send(producer, outgoing.sends)
        outcomes = await acknowledged(acks, timeout_of=self._failed_sends.timeout_of)
        if await self._failed_sends.learn(
            outcomes, plan, started=started, dlq_attempts=dlq_attempts, keep_acknowledged=False
        ):
            errors = [e for _, e in outcomes if e is not None]
            raise _Redo(describe(errors[0]), per_record=all(classify(e) is PER_RECORD for e in errors))
        # Not simply past this part: a record of the partition still pending in another batch (a
        # miss in the model while its neighbours were answered from the cache) would be skipped
        # by the next owner if this commit covered it.
        point = self._offsets.commit_point(tp, part.offsets)
        commit_at = point if point is not None else max(part.offsets) + 1
        if commit_at <= max(part.offsets):
            log.warning(
                "partition %s: the transaction of offsets %d-%d commits offset %d only: an earlier "
                "record is still pending",
                tp,
                min(part.offsets),
                max(part.offsets),
                commit_at,
            )
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(commit_at, token)}, self._group_id)
        if hold_s:
            log.warning("holding the open transaction of %s for %.0fs (fault injection)", tp, hold_s)
            await asyncio.sleep(hold_s)
        await producer.commit_transaction()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "committed %s: records %d-%d (%d), offset %d, token %s",
                tp,
                min(part.offsets),
                max(part.offsets),
                len(part.offsets),
                commit_at,
                token,
            )
        return outgoing.rejected

    async def _restart(self, tp: TopicPartition, ownership: _Ownership) -> AIOKafkaProducer | None:
        """A fresh producer for ``tp`` (starting it completes or aborts the failed transaction),
        or None when the cluster cannot be reached yet or the partition was lost meanwhile."""
        producer = self._new_producer(self.transactional_id(tp))
        try:
            await asyncio.wait_for(self._fence(producer), TRANSACTION_ATTEMPT_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            log.warning("cannot restart the producer of %s yet (%s)", tp, type(exc).__name__)
            await discard_producer(producer, CLEANUP_TIMEOUT_S)
            return None
        if self._owned.get(tp) is not ownership:  # revoked meanwhile
            with contextlib.suppress(Exception):
                await producer.stop()
            return None
        ownership.producer = producer
        return producer

    def _answered(self, tp: TopicPartition, part: _Part) -> None:
        """The part's records are committed: later transactions of the partition may pass them.
        Marked here, before the next batch's transaction computes its commit point."""
        for offset in part.offsets:
            self._offsets.done(tp, offset)

    async def _committed_by(self, tp: TopicPartition, token: str) -> bool:
        """Whether the transaction marked ``token`` committed. Its offset alone cannot tell: it
        need not move past the previous commit (see commit_point). A cluster that cannot be
        asked counts as not committed: the batch is published again."""
        try:
            committed = await self._cluster.committed_offset(self._group_id, tp)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("cannot read the committed offset of %s (%s)", tp, describe(exc))
            return False
        return committed is not None and committed.metadata == token
