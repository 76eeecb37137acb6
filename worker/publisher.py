"""Kafka out: results keyed by content hash, error results, and dead-letter copies.

A batch's outcome becomes ``Outgoing``: record batches per (topic, partition) for results, and one
record each for error results and DLQ copies. Before anything is sent, every reply topic is looked
up in ``ClusterView`` (never creating it): results for a reply topic that does not exist become
``reply_to_unavailable`` errors on the default results topic plus a DLQ copy, and error results
for it go to the default topic. Every send returns a future that resolves when the broker has
acknowledged the records (acks=all, idempotent producer); the pipeline marks a consumed record
done only then, so a commit never covers a result that could still be lost.

Keeping the broker busy: aiokafka sends one produce request per broker at a time and queues one
batch per partition behind it (``send_batch`` waits while that slot is taken). Result batches go
through a lane per (producer, partition): while the lane's first batch waits for the slot, every
later send for that partition, from any batch being delivered, is appended to it, and it is
closed the moment aiokafka takes it. So each produce request carries everything that was pending
for each partition when the one before it completed, and an idle broker gets a batch at once
(``linger_ms`` is 0: a closed batch never lingers anyway). A send's ack resolves only once every
batch carrying its records was handed over and acknowledged, and a transaction commits only
after all its acks (worker.delivery): so no batch of ours is open across a commit, and a
transaction that fails has its producer discarded with whatever of its batches is left.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError, RecordTooLargeError

from schemas import (
    HEADER_DLQ_DROPPED_HEADERS,
    HEADER_DLQ_GENERATED_KEY,
    HEADER_DLQ_NULL_VALUE,
    HEADER_DLQ_REENCODED,
    HEADER_DLQ_TRUNCATED_KEY,
    HEADER_DLQ_TRUNCATED_VALUE,
    ContentType,
    ErrorCode,
    dlq_headers,
    encode_result,
    result_headers,
)
from worker.config import WorkerConfig
from worker.failures import PER_RECORD, AckTimeout, SharedBatchRefused, classify, describe
from worker.jobs import Answer, Headers, Job, Rejection, Source
from worker.kafka_connection import kafka_connection_options
from worker.partitioner import partition_hashes

log = logging.getLogger(__name__)
Ack = asyncio.Future[Any]
# Room left in a DLQ record for Kafka's record and batch framing.
DLQ_FRAMING_BYTES = 1024
MAX_DLQ_KEY_BYTES = 1024
MAX_DLQ_HEADERS = 64
# How long a result batch may wait for its partition's slot in the producer: aiokafka's own bound
# (its default request timeout, which the fleet's producers keep), measured by us (see _submit).
HAND_OVER_TIMEOUT_S = 40.0


def create_producer(
    config: WorkerConfig,
    *,
    transactional_id: str | None = None,
    record_limit: int = 1 << 20,
    for_replies: bool = False,
) -> AIOKafkaProducer:
    """``record_limit``: the smallest max.message.bytes among the topics written to; batches stay
    within it (several dead letters in one batch must not exceed what one may be).
    ``for_replies``: the producer of reply topics (at-least-once), not idempotent so that its
    batches expire after ``reply_timeout_s`` (an idempotent producer retries a batch forever)."""
    options: dict[str, Any] = dict(
        **kafka_connection_options(config),
        acks="all",
        enable_idempotence=not for_replies,
        # Nothing waits while the broker is idle; under load, sends pile up behind the request in
        # flight and go out together (result batches: ResultPublisher's lanes).
        linger_ms=0,
        max_batch_size=max(16 * 1024, min(1024 * 1024, record_limit - DLQ_FRAMING_BYTES)),
        max_request_size=max(config.max_message_bytes * 2, 1 << 20),
    )
    if for_replies:
        options["request_timeout_ms"] = int(config.reply_timeout_s * 1000)
        options["client_id"] = f"{options.get('client_id') or config.worker_id}-replies"
    if transactional_id is not None:
        options["transactional_id"] = transactional_id
        # A killed worker's open transaction holds back read_committed readers (the last stable
        # offset) until the broker aborts it: keep that short. Publishing a batch takes well under it.
        options["transaction_timeout_ms"] = config.transaction_timeout_ms
    return AIOKafkaProducer(**options)


def error_result_key(request_id: str) -> bytes:
    # embed.results is compacted and a compacted topic refuses null keys; an error has no content
    # hash to use, so it is keyed by the requester's id.
    return f"error:{request_id}".encode()


class Part(enum.Enum):
    """What one outgoing record is for its source record."""

    RESULT = "result"
    ERROR_RESULT = "error_result"
    DEAD_LETTER = "dead_letter"


# One outgoing record's identity: the consumed record it answers, and what it is for it.
Piece = tuple[Source, Part]


@dataclass(slots=True)
class Send:
    """Records that go out together: a result batch for one partition, or one single record."""

    topic: str
    partition: int | None  # None: the producer partitions by key (error results, dead letters)
    records: list[tuple[bytes | None, bytes | None, Headers]] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    # A record sent in a batch of its own (Plan.alone), so that a refusal is its own: a result span
    # may share its batches with other sends for its partition.
    alone: bool = False

    @property
    def part(self) -> Part:
        return self.pieces[0][1]


@dataclass(slots=True)
class Plan:
    """What earlier attempts at publishing a batch taught (worker.delivery fills it in): records
    to send one per batch, records whose reply topic refused them, pieces already acknowledged
    or given up."""

    alone: set[Source] = field(default_factory=set)
    unavailable: dict[Source, str] = field(default_factory=dict)  # source -> why
    refused: dict[Source, str] = field(default_factory=dict)  # results topic refused the result
    skip: set[Piece] = field(default_factory=set)


@dataclass(slots=True)
class Outgoing:
    """What one batch publishes, grouped into sends."""

    sends: list[Send] = field(default_factory=list)
    # rejections made here (reply topic gone or refusing), for the caller's counters
    rejected: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sends)


class TopicPartitions(Protocol):
    """What the publisher asks of the cluster (worker.cluster.ClusterView in the worker)."""

    async def partitions_of(self, topics: Iterable[str]) -> dict[str, list[int] | None]: ...
    def quarantined(self, topic: str) -> str | None: ...


class ResultPublisher:
    """Turns a batch's results, error results and dead letters into Kafka records and sends
    them: results keyed by content hash to the results or reply topic, dead letters cut to the
    DLQ topic's record limit."""

    def __init__(
        self,
        cluster: TopicPartitions,
        *,
        results_topic: str,
        dlq_topic: str,
        worker_id: str,
        model: str,
        max_dlq_record_bytes: int,
        max_dlq_header_bytes: int = 16 * 1024,
        hand_over_timeout_s: float = HAND_OVER_TIMEOUT_S,
    ) -> None:
        self._cluster = cluster
        self._results_topic = results_topic
        self._dlq_topic = dlq_topic
        self._worker_id = worker_id
        self._model = model
        self._max_dlq_record = max_dlq_record_bytes
        self._max_headers = max_dlq_header_bytes
        self._sending: weakref.WeakKeyDictionary[AIOKafkaProducer, int] = weakref.WeakKeyDictionary()
        self._added: weakref.WeakKeyDictionary[AIOKafkaProducer, set[str]] = weakref.WeakKeyDictionary()
        self._lanes: weakref.WeakKeyDictionary[AIOKafkaProducer, dict[TopicPartition, _Lane]] = (
            weakref.WeakKeyDictionary()
        )
        self._hand_over_timeout_s = hand_over_timeout_s
        self._base = frozenset(self.base_topics)
        # One list per content type, shared by every result record (aiokafka only reads it).
        self._result_headers = {content_type: result_headers(content_type) for content_type in ContentType}

    @property
    def base_topics(self) -> list[str]:
        """The topics every worker writes to (reply topics come and go)."""
        return [self._results_topic, self._dlq_topic]

    def is_reply_topic(self, topic: str) -> bool:
        return topic not in self._base

    async def prepare(
        self,
        results: Sequence[Answer],
        rejections: Sequence[Rejection],
        plan: Plan | None = None,
    ) -> Outgoing:
        """The records of a batch, with every reply topic checked (one metadata request for all
        of them). Raises KafkaError when the cluster cannot be asked (the caller retries)."""
        plan = plan or Plan()
        outgoing = Outgoing()
        partitions = await self._partitions_of(
            {job.reply_topic for job, _ in results} | {r.reply_topic for r in rejections}
        )
        spans: dict[tuple[str, int], Send] = {}
        keys = [job.key.encode() for job, _ in results]
        # The Java client's key -> partition mapping (murmur2), as every Kafka client computes
        # it, so results for one content hash always land on one partition (compaction needs it).
        for (job, value), key, key_hash in zip(results, keys, partition_hashes(keys), strict=True):
            targets = partitions[job.reply_topic]
            why = plan.unavailable.get(job.source) or self._cluster.quarantined(job.reply_topic)
            refused = plan.refused.get(job.source)
            if targets is None or why is not None or refused is not None:
                gone = (
                    self.results_refused(job, refused)
                    if refused is not None
                    else self.reply_topic_gone(job, why)
                )
                outgoing.rejected.append(gone)
                self._add_rejection(outgoing, gone, plan)
                continue
            if (job.source, Part.RESULT) in plan.skip:
                continue
            partition = targets[key_hash % len(targets)]
            if job.source in plan.alone:
                send = Send(job.reply_topic, partition, alone=True)
                outgoing.sends.append(send)
            else:
                span = spans.get((job.reply_topic, partition))
                if span is None:
                    span = spans[(job.reply_topic, partition)] = Send(job.reply_topic, partition)
                    outgoing.sends.append(span)
                send = span
            send.records.append((key, value, self._result_headers[job.content_type]))
            send.pieces.append((job.source, Part.RESULT))
        for rejection in rejections:
            if (
                partitions[rejection.reply_topic] is None
                or rejection.source in plan.unavailable
                or self._cluster.quarantined(rejection.reply_topic) is not None
            ):
                rejection = _redirect(rejection, self._results_topic)
            self._add_rejection(outgoing, rejection, plan)
        return outgoing

    async def _partitions_of(self, topics: set[str]) -> dict[str, list[int] | None]:
        found = await self._cluster.partitions_of(topics | {self._results_topic})
        if found[self._results_topic] is None:
            raise KafkaError(f"the results topic {self._results_topic} does not exist: create it")
        return found

    def reply_topic_gone(self, job: Job, why: str | None = None) -> Rejection:
        message = (
            f"reply_to topic {job.reply_topic!r} does not exist (deleted, or never "
            "created): the result is dead-lettered"
            if why is None
            else f"reply_to topic {job.reply_topic!r} did not take the result ({why[:300]}): "
            "the result is dead-lettered"
        )
        return job.rejected(ErrorCode.REPLY_TO_UNAVAILABLE, message, reply_topic=self._results_topic)

    def results_refused(self, job: Job, why: str) -> Rejection:
        """The results topic itself refused this result (e.g. larger than its record limit)."""
        message = f"the results topic refused the result ({why[:300]}): the request is dead-lettered"
        return job.rejected(ErrorCode.INTERNAL_ERROR, message, reply_topic=self._results_topic)

    def _add_rejection(self, outgoing: Outgoing, rejection: Rejection, plan: Plan) -> None:
        error = rejection.error
        if error.request_id is not None and (rejection.source, Part.ERROR_RESULT) not in plan.skip:
            result = error.to_result(key=rejection.key, model=self._model)
            outgoing.sends.append(
                Send(
                    rejection.reply_topic,
                    None,
                    [
                        (
                            error_result_key(error.request_id),
                            encode_result(result, rejection.content_type),
                            result_headers(rejection.content_type),
                        )
                    ],
                    [(rejection.source, Part.ERROR_RESULT)],
                )
            )
        if (rejection.source, Part.DEAD_LETTER) not in plan.skip:
            outgoing.sends.append(
                Send(
                    self._dlq_topic,
                    None,
                    [self.dead_letter(rejection)],
                    [(rejection.source, Part.DEAD_LETTER)],
                )
            )

    async def send(self, producer: AIOKafkaProducer, sends: Sequence[Send]) -> list[tuple[Send, Ack]]:
        """Hands every send over (result spans through their partition's lane); returns an ack
        future per send, failed with whatever kept that send from being written (a record too
        large for a batch, a fenced producer), so one send never fails the others.

        aiokafka refreshes metadata only for the topics in its client's topic set, and a refresh
        replaces what it knew: a batch for a topic outside that set (one it found in an earlier
        all-topics answer) waits for a leader it never learns, until its timeout. So every reply
        topic is added to the set before its records are handed over, all at once (one metadata
        request, not one per topic). And aiokafka keeps every topic in that set in its metadata
        requests, which allow auto-creation: a reply topic deleted later would be created again by
        the next refresh. So once no batch is under way (handed over and not yet acknowledged), a
        producer that wrote to a reply topic has its topics reset to the base ones."""
        reply_topics = {s.topic for s in sends} - self._base
        self._sending[producer] = self._sending.get(producer, 0) + 1
        try:
            if reply_topics:
                added = self._added.setdefault(producer, set())
                if not reply_topics <= added:
                    added |= reply_topics
                    await producer.client.set_topics([*self._base, *added])
            acks = self._send(producer, sends)
        except BaseException:
            self._done_sending(producer)
            raise
        if not acks:
            self._done_sending(producer)
        else:
            delivered = asyncio.gather(*(ack for _, ack in acks), return_exceptions=True)
            delivered.add_done_callback(lambda _: self._done_sending(producer))
        return acks

    def _done_sending(self, producer: AIOKafkaProducer) -> None:
        self._sending[producer] -= 1
        if not self._sending[producer] and self._added.get(producer):
            self._added.pop(producer, None)
            producer.client.set_topics(self.base_topics)

    def _send(self, producer: AIOKafkaProducer, sends: Sequence[Send]) -> list[tuple[Send, Ack]]:
        """Hands every send over without one waiting for another; a failure to hand a send over
        (a fenced producer included) is that send's outcome, in its ack."""
        acks: list[tuple[Send, Ack]] = []
        for send in sends:
            if send.partition is None:
                acks.append((send, asyncio.ensure_future(_send_one(producer, send))))
            else:
                acks.append((send, self._enqueue(producer, send)))
        return acks

    def _enqueue(self, producer: AIOKafkaProducer, send: Send) -> Ack:
        """Appends a partition span to its lane (the open batch there, then new ones as they
        fill up; a send that goes alone gets a batch of its own); one future for all the batches
        that carry its records."""
        assert send.partition is not None
        tp = TopicPartition(send.topic, send.partition)
        lanes = self._lanes.setdefault(producer, {})
        lane = lanes.get(tp)
        if lane is None:
            lane = lanes[tp] = _Lane()
            lane.task = asyncio.ensure_future(self._hand_over(producer, tp, lane, lanes))
        last = lane.batches[-1] if lane.batches else None
        batch = last if last is not None and last.open and not send.alone else None
        acks: list[Ack] = []
        for key, value, headers in send.records:
            if batch is None or not batch.append(key, value, headers):
                if batch is not None:
                    batch.open = False  # full
                batch = _Batch(producer.create_batch(), asyncio.get_running_loop().create_future())
                if not batch.append(key, value, headers):
                    too_large = f"a result of {len(value or b'')} bytes does not fit a record batch"
                    return _failed(RecordTooLargeError(too_large))
                lane.batches.append(batch)
            if not acks or acks[-1] is not batch.acked:
                acks.append(batch.acked)
                batch.sends += 1
        if send.alone and batch is not None:
            batch.open = False
        if len(acks) == 1:
            return acks[0]
        return asyncio.ensure_future(_all_of(acks))

    async def _hand_over(
        self, producer: AIOKafkaProducer, tp: TopicPartition, lane: _Lane, lanes: dict[TopicPartition, _Lane]
    ) -> None:
        """Hands a lane's batches to the producer, oldest first, until none is left. The first
        one takes more records until aiokafka takes it (when the partition's queued batch joins
        a produce request); it is closed right then, before aiokafka's sender can see it."""
        try:
            while lane.batches:
                batch = lane.batches[0]
                try:
                    ack = await self._submit(producer, tp, batch.builder)
                except Exception as exc:  # the batch's outcome: its spans' acks fail
                    ack = _failed(exc)
                # Same step as aiokafka queueing it (nothing awaited in between): closed before
                # its sender drains it, so it never lingers and no record joins it after.
                batch.builder.close()
                batch.open = False
                lane.batches.popleft()
                _settle(batch.acked, ack, shared=batch.sends > 1)
        except BaseException as exc:  # cancelled (the loop shutting down), or a bug: no span waits forever
            for batch in lane.batches:
                if isinstance(exc, Exception):
                    batch.acked.set_exception(exc)
                else:
                    batch.acked.cancel()
            raise
        finally:
            del lanes[tp]

    async def _submit(self, producer: AIOKafkaProducer, tp: TopicPartition, builder: Any) -> Ack:
        """``send_batch`` within our own deadline. aiokafka 0.14's add_batch subtracts all the
        time waited so far on each pass of its wait loop, so when the partition's slot is taken
        again before this batch gets it (a single record sent to that partition meanwhile), it
        gives up long before its timeout: such an early KafkaTimeoutError is tried again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._hand_over_timeout_s
        while True:
            try:
                # asyncio.timeout, not wait_for: send_batch must run in this task, so that
                # _hand_over closes the batch in the step in which aiokafka queued it.
                async with asyncio.timeout_at(deadline):
                    ack: Ack = await producer.send_batch(builder, tp.topic, partition=tp.partition)
                    return ack
            except KafkaTimeoutError:
                if loop.time() >= deadline:
                    raise
            except TimeoutError:
                waited = f"{self._hand_over_timeout_s:.0f}s"
                raise KafkaTimeoutError(f"no room for a batch to {tp} within {waited}") from None

    def dead_letter(self, rejection: Rejection) -> tuple[bytes, bytes, Headers]:
        """The DLQ copy: the raw message with the reason in headers, cut to fit the DLQ topic's
        record size limit (and saying so), so that no size can make the copy itself fail."""
        error, raw = rejection.error, rejection.raw
        key, original_headers = raw.key, raw.headers
        value: bytes | None = raw.value
        notes = list(raw.notes)
        if value is None and rejection.request is not None:  # a decoded request's value was released
            value = rejection.reencoded_value()
            notes.append((HEADER_DLQ_REENCODED, b"1"))
        if key is not None and len(key) > MAX_DLQ_KEY_BYTES:
            notes.append((HEADER_DLQ_TRUNCATED_KEY, str(len(key)).encode()))
            key = key[:MAX_DLQ_KEY_BYTES]
        header_bytes = sum(len(k) + len(v) for k, v in original_headers)
        if len(original_headers) > MAX_DLQ_HEADERS or header_bytes > self._max_headers:
            notes.append((HEADER_DLQ_DROPPED_HEADERS, str(len(original_headers)).encode()))
            original_headers = []
        headers = [
            *original_headers,
            *notes,
            *dlq_headers(
                code=error.code,
                reason=error.message,
                source_topic=rejection.source.topic,
                source_partition=rejection.source.partition,
                source_offset=rejection.source.offset,
                worker=self._worker_id,
            ),
        ]
        room = (
            self._max_dlq_record
            - DLQ_FRAMING_BYTES
            - len(key or b"")
            - sum(len(k.encode()) + len(v) + 64 for k, v in headers)
        )  # headers of the note below too
        original_size = (
            raw.original_size
            if raw.original_size is not None and raw.value is not None
            else len(value or b"")
        )
        if value is not None and (len(value) > room or original_size > len(value)):
            headers.append((HEADER_DLQ_TRUNCATED_VALUE, str(original_size).encode()))
            value = value[: max(0, room)]
        # A copy must always be producible: Kafka clients refuse a record with neither key nor
        # value (a tombstone), and a compacted DLQ would refuse a null key. The headers say so,
        # and `embedfleet dlq replay` restores the nulls.
        if value is None:
            value = b""
            headers.append((HEADER_DLQ_NULL_VALUE, b"1"))
        if key is None:
            source = rejection.source
            key = f"dlq:{source.topic}:{source.partition}:{source.offset}".encode()
            headers.append((HEADER_DLQ_GENERATED_KEY, b"1"))
        return key, value, headers


def _redirect(rejection: Rejection, topic: str) -> Rejection:
    return Rejection(
        rejection.source,
        rejection.raw,
        rejection.error,
        topic,
        rejection.content_type,
        key=rejection.key,
        request=rejection.request,
    )


@dataclass(eq=False, slots=True)
class _Batch:
    """One record batch of a lane: takes records while open, then is handed over as it is."""

    builder: Any  # aiokafka's BatchBuilder
    acked: Ack  # the ack of every span with records in it
    open: bool = True
    sends: int = 0  # how many sends have records in it

    def append(self, key: bytes | None, value: bytes | None, headers: Headers) -> bool:
        if not self.open:
            return False
        return self.builder.append(key=key, value=value, timestamp=None, headers=headers) is not None


@dataclass(eq=False, slots=True)
class _Lane:
    """The batches of one (producer, partition) not yet handed over, and the task handing them
    over in order (one waiter per partition in aiokafka's add_batch)."""

    batches: deque[_Batch] = field(default_factory=deque)
    task: asyncio.Future[None] | None = None  # held here: the loop keeps only a weak reference


async def _send_one(producer: AIOKafkaProducer, send: Send) -> Any:
    [(key, value, headers)] = send.records
    return await (await producer.send(send.topic, value=value, key=key, headers=headers))


def _settle(future: Ack, outcome: Ack, *, shared: bool) -> None:
    """Resolves ``future`` as ``outcome`` resolves. A refusal of a batch ``shared`` by several sends
    says so: the record to blame may be another send's (worker.delivery sends each record alone)."""

    def copy(done: Ack) -> None:
        if future.done():
            return
        if done.cancelled():
            future.cancel()
            return
        error = done.exception()
        if error is None:
            future.set_result(done.result())
        elif shared and classify(error) is PER_RECORD:
            refused = SharedBatchRefused(f"a batch of several sends was refused ({describe(error)})")
            refused.__cause__ = error
            future.set_exception(refused)
        else:
            future.set_exception(error)

    outcome.add_done_callback(copy)


def _failed(exc: BaseException) -> Ack:
    future: Ack = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


async def _all_of(futures: list[Ack]) -> Any:
    return (await asyncio.gather(*futures))[-1]


async def acknowledged(
    acks: Sequence[tuple[Send, Ack]], *, timeout_of: Callable[[Send], float | None] = lambda _: None
) -> list[tuple[Send, BaseException | None]]:
    """Waits for every ack, each at most as long as ``timeout_of`` its send says (None: for as
    long as it takes); returns each send with its error (None when acknowledged). An ack that
    does not come in time fails with AckTimeout."""

    async def outcome(send: Send, ack: Ack) -> BaseException | None:
        try:
            await asyncio.wait_for(asyncio.shield(ack), timeout_of(send))
        except TimeoutError:
            if ack.done() and ack.exception() is not None:
                return ack.exception()
            return AckTimeout(f"not acknowledged within {timeout_of(send):.0f}s")
        except Exception as exc:
            return exc
        return None

    outcomes = await asyncio.gather(*(outcome(send, ack) for send, ack in acks))
    return [(send, error) for (send, _), error in zip(acks, outcomes, strict=True)]
