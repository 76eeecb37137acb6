"""Kafka out: results keyed by content hash, error results, and dead-letter copies.

Every send returns a future that resolves when the broker has acknowledged the record
(acks=all, idempotent producer); the pipeline marks a consumed record done only then, so a
commit never covers a result that could still be lost.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from schemas import EmbedResult, dlq_headers, encode_result, result_headers
from worker.config import WorkerConfig
from worker.jobs import Headers, Job, Rejection
from worker.kafka_options import kafka_connection_options

Ack = asyncio.Future[Any]


def create_producer(config: WorkerConfig) -> AIOKafkaProducer:
    options: dict[str, Any] = dict(
        **kafka_connection_options(config),
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        max_batch_size=1024 * 1024,
        max_request_size=max(config.max_message_bytes * 2, 1 << 20),
    )
    if config.guarantee == "exactly-once":
        # A stable id per worker lets the broker fence a zombie of the same worker after a restart.
        options["transactional_id"] = f"embedfleet-{config.group_id}-{config.worker_id}"
    return AIOKafkaProducer(**options)


def error_result_key(request_id: str) -> bytes:
    # embed.results is compacted and a compacted topic refuses null keys; an error has no content
    # hash to use, so it is keyed by the requester's id.
    return f"error:{request_id}".encode()


class ResultPublisher:
    def __init__(self, producer: AIOKafkaProducer, *, dlq_topic: str, worker_id: str,
                 max_dlq_value_bytes: int, max_dlq_header_bytes: int = 16 * 1024) -> None:
        self._producer = producer
        self._dlq_topic = dlq_topic
        self._worker_id = worker_id
        self._max_value = max_dlq_value_bytes
        self._max_headers = max_dlq_header_bytes
        self._partition_lists: dict[str, list[int]] = {}

    async def send_results(self, results: Sequence[tuple[Job, EmbedResult]]) -> list[Ack]:
        """Sends a batch's results as one record batch per partition: one future per record batch
        instead of one per record, which is most of a cache hit's cost in aiokafka."""
        by_partition: dict[tuple[str, int], list[tuple[bytes, bytes, Headers]]] = defaultdict(list)
        for job, result in results:
            key = job.key.encode()
            partitions = await self._partitions(job.reply_topic)
            partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
            by_partition[(job.reply_topic, partition)].append(
                (key, encode_result(result, job.content_type), result_headers(job.content_type)))
        acks: list[Ack] = []
        for (topic, partition), records in by_partition.items():
            batch = self._producer.create_batch()
            for key, value, headers in records:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    acks.append(await self._producer.send_batch(batch, topic, partition=partition))
                    batch = self._producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            acks.append(await self._producer.send_batch(batch, topic, partition=partition))
        return acks

    async def _partitions(self, topic: str) -> list[int]:
        # The Java client's key -> partition mapping (murmur2), as every Kafka client computes it,
        # so results for one content hash always land on one partition (compaction needs that).
        known = self._partition_lists.get(topic)
        if known is None:
            known = sorted(await self._producer.partitions_for(topic))
            self._partition_lists[topic] = known
        return known

    async def send_rejection(self, rejection: Rejection, *, model: str) -> list[Ack]:
        """The error result (when the requester's id is known) and the raw message to the DLQ."""
        acks: list[Ack] = []
        error = rejection.error
        if error.request_id is not None:
            result = error.to_result(key=rejection.key, model=model)
            acks.append(await self._producer.send(
                rejection.reply_topic, encode_result(result, rejection.content_type),
                key=error_result_key(error.request_id), headers=result_headers(rejection.content_type)))
        key, value, headers = self._dead_letter(rejection)
        acks.append(await self._producer.send(self._dlq_topic, value=value, key=key, headers=headers))
        return acks

    def _dead_letter(self, rejection: Rejection) -> tuple[bytes | None, bytes | None, Headers]:
        """The DLQ copy: the raw message with the reason in headers. A message too large to
        re-publish is cut, and says so, so that a hostile size cannot block the partition."""
        error, raw = rejection.error, rejection.raw
        value, key, original_headers = raw.value, raw.key, raw.headers
        notes: Headers = []
        if value is not None and len(value) > self._max_value:
            notes.append(("dlq-truncated-value", str(len(value)).encode()))
            value = value[: self._max_value]
        if key is not None and len(key) > 1024:
            notes.append(("dlq-truncated-key", str(len(key)).encode()))
            key = key[:1024]
        if sum(len(k) + len(v) for k, v in original_headers) > self._max_headers:
            notes.append(("dlq-dropped-headers", str(len(original_headers)).encode()))
            original_headers = []
        headers = [*original_headers, *notes, *dlq_headers(
            code=error.code, reason=error.message, source_topic=rejection.source.topic,
            source_partition=rejection.source.partition, source_offset=rejection.source.offset,
            worker=self._worker_id)]
        return key, value, headers
