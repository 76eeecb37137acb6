"""Kafka out: results keyed by content hash, error results, and dead-letter copies.

A batch's outcome becomes ``Outgoing``: record batches per (topic, partition) for results, and one
record each for error results and DLQ copies. Before anything is sent, every reply topic is looked
up in ``ClusterView`` (never creating it): results for a reply topic that does not exist become
``reply_to_unavailable`` errors on the default results topic plus a DLQ copy, and error results
for it go to the default topic. Every send returns a future that resolves when the broker has
acknowledged the records (acks=all, idempotent producer); the pipeline marks a consumed record
done only then, so a commit never covers a result that could still be lost.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas import (
    HEADER_DLQ_DROPPED_HEADERS,
    HEADER_DLQ_REENCODED,
    HEADER_DLQ_TRUNCATED_KEY,
    HEADER_DLQ_TRUNCATED_VALUE,
    EmbedResult,
    ErrorCode,
    RequestError,
    dlq_headers,
    encode_result,
    result_headers,
)
from worker.config import WorkerConfig
from worker.jobs import Headers, Job, Rejection
from worker.kafka_options import kafka_connection_options
from worker.partitioner import partition_hashes

log = logging.getLogger(__name__)
Ack = asyncio.Future[Any]
# Room left in a DLQ record for Kafka's record and batch framing.
DLQ_FRAMING_BYTES = 1024
MAX_DLQ_KEY_BYTES = 1024
MAX_DLQ_HEADERS = 64


def create_producer(
    config: WorkerConfig, *, transactional_id: str | None = None, record_limit: int = 1 << 20
) -> AIOKafkaProducer:
    """``record_limit``: the smallest max.message.bytes among the topics written to; batches stay
    within it (several dead letters in one batch must not exceed what one may be)."""
    options: dict[str, Any] = dict(
        **kafka_connection_options(config),
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        max_batch_size=max(16 * 1024, min(1024 * 1024, record_limit - DLQ_FRAMING_BYTES)),
        max_request_size=max(config.max_message_bytes * 2, 1 << 20),
    )
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


@dataclass(slots=True)
class Outgoing:
    """What one batch publishes, grouped into sends."""

    # (topic, partition) -> records, for results (one record batch per partition)
    results: dict[tuple[str, int], list[tuple[bytes, bytes, Headers]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # single records: (topic, key, value, headers) for error results and dead letters
    singles: list[tuple[str, bytes | None, bytes | None, Headers]] = field(default_factory=list)
    # rejections made here (reply topic gone), for the caller's counters
    rejected: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.results) + len(self.singles)


class TopicPartitions(Protocol):
    """What the publisher asks of the cluster (worker.cluster.ClusterView in the worker)."""

    async def partitions_for(self, topic: str) -> list[int] | None: ...


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
    ) -> None:
        self._cluster = cluster
        self._results_topic = results_topic
        self._dlq_topic = dlq_topic
        self._worker_id = worker_id
        self._model = model
        self._max_dlq_record = max_dlq_record_bytes
        self._max_headers = max_dlq_header_bytes
        self._sending: weakref.WeakKeyDictionary[AIOKafkaProducer, int] = weakref.WeakKeyDictionary()
        self._wrote_reply_topics: weakref.WeakSet[AIOKafkaProducer] = weakref.WeakSet()
        self._base = frozenset(self.base_topics)

    @property
    def base_topics(self) -> list[str]:
        """The topics every worker writes to (reply topics come and go)."""
        return [self._results_topic, self._dlq_topic]

    async def prepare(
        self, results: Sequence[tuple[Job, EmbedResult]], rejections: Sequence[Rejection]
    ) -> Outgoing:
        """The records of a batch, with every reply topic checked. Raises KafkaError when the
        cluster cannot be asked (the caller retries)."""
        outgoing = Outgoing()
        partitions = await self._partitions_of(
            {job.reply_topic for job, _ in results} | {r.reply_topic for r in rejections}
        )
        keys = [job.key.encode() for job, _ in results]
        # The Java client's key -> partition mapping (murmur2), as every Kafka client computes
        # it, so results for one content hash always land on one partition (compaction needs it).
        for (job, result), key, key_hash in zip(results, keys, partition_hashes(keys), strict=True):
            targets = partitions[job.reply_topic]
            if targets is None:
                gone = self.reply_topic_gone(job)
                outgoing.rejected.append(gone)
                self._add_rejection(outgoing, gone)
                continue
            partition = targets[key_hash % len(targets)]
            outgoing.results[(job.reply_topic, partition)].append(
                (key, encode_result(result, job.content_type), result_headers(job.content_type))
            )
        for rejection in rejections:
            if partitions[rejection.reply_topic] is None:
                rejection = _redirect(rejection, self._results_topic)
            self._add_rejection(outgoing, rejection)
        return outgoing

    async def _partitions_of(self, topics: set[str]) -> dict[str, list[int] | None]:
        found: dict[str, list[int] | None] = {}
        for topic in topics:
            found[topic] = await self._cluster.partitions_for(topic)
            if found[topic] is None and topic == self._results_topic:
                raise KafkaError(f"the results topic {topic} does not exist: create it")
        return found

    def reply_topic_gone(self, job: Job) -> Rejection:
        error = RequestError(
            ErrorCode.REPLY_TO_UNAVAILABLE,
            f"reply_to topic {job.reply_topic!r} does not exist (deleted, or never "
            "created): the result is dead-lettered",
            job.request.id,
            request=job.request,
        )
        return Rejection(
            job.source,
            job.raw,
            error,
            self._results_topic,
            job.content_type,
            key=job.key,
            request=job.request,
        )

    def _add_rejection(self, outgoing: Outgoing, rejection: Rejection) -> None:
        error = rejection.error
        if error.request_id is not None:
            result = error.to_result(key=rejection.key, model=self._model)
            outgoing.singles.append(
                (
                    rejection.reply_topic,
                    error_result_key(error.request_id),
                    encode_result(result, rejection.content_type),
                    result_headers(rejection.content_type),
                )
            )
        key, value, headers = self.dead_letter(rejection)
        outgoing.singles.append((self._dlq_topic, key, value, headers))

    async def send(self, producer: AIOKafkaProducer, outgoing: Outgoing) -> list[tuple[str, Ack]]:
        """Hands every record to the producer; returns (topic, ack future) per send.

        aiokafka refreshes metadata only for the topics in its client's topic set, and a refresh
        replaces what it knew: a batch for a topic outside that set (one it found in an earlier
        all-topics answer) waits for a leader it never learns, until its timeout (40 s). So every
        reply topic is added to the set before its records are handed over. And aiokafka keeps
        every topic in that set in its metadata requests, which allow auto-creation: a reply topic
        deleted later would be created again by the next refresh. So once no batch is under way
        (handed over and not yet acknowledged), a producer that wrote to a reply topic has its
        topics reset to the base ones (sends to the base topics alone leave it as it is)."""
        reply_topics = {topic for topic, _ in outgoing.results} | {single[0] for single in outgoing.singles}
        reply_topics -= self._base
        self._sending[producer] = self._sending.get(producer, 0) + 1
        try:
            if reply_topics:
                self._wrote_reply_topics.add(producer)
                for topic in reply_topics:
                    await producer.client.add_topic(topic)
            acks = await self._send(producer, outgoing)
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
        if not self._sending[producer] and producer in self._wrote_reply_topics:
            self._wrote_reply_topics.discard(producer)
            producer.client.set_topics(self.base_topics)

    async def _send(self, producer: AIOKafkaProducer, outgoing: Outgoing) -> list[tuple[str, Ack]]:
        acks: list[tuple[str, Ack]] = []
        for (topic, partition), records in outgoing.results.items():
            batch = producer.create_batch()
            for key, value, headers in records:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    acks.append((topic, await producer.send_batch(batch, topic, partition=partition)))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            acks.append((topic, await producer.send_batch(batch, topic, partition=partition)))
        for topic, single_key, single_value, headers in outgoing.singles:
            acks.append(
                (topic, await producer.send(topic, value=single_value, key=single_key, headers=headers))
            )
        return acks

    def dead_letter(self, rejection: Rejection) -> tuple[bytes | None, bytes | None, Headers]:
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


async def acknowledged(acks: list[tuple[str, Ack]]) -> list[tuple[str, BaseException]]:
    """Waits for every ack; returns the failed ones (topic, error)."""
    outcomes = await asyncio.gather(*(ack for _, ack in acks), return_exceptions=True)
    return [
        (topic, outcome)
        for (topic, _), outcome in zip(acks, outcomes, strict=True)
        if isinstance(outcome, BaseException)
    ]
