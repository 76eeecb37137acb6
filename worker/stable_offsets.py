"""A group's committed offset, read the way KIP-447 made safe for transactions.

An exactly-once worker taking a partition over fences the previous owner (its producer's
InitProducerId ends the open transaction), then reads the committed offset and starts there. The
broker writes the transaction's commit marker into ``__consumer_offsets`` and the group
coordinator applies the pending offsets a moment later: a plain OffsetFetch in that moment
returns the offset from *before* the transaction, and the new owner answers again what the old
one had just committed (duplicates; seen as 207 in a local run of the frozen-zombie test).
OffsetFetch v7 with ``require_stable`` makes the coordinator answer ``UNSTABLE_OFFSET_COMMIT``
until nothing is pending, and the read is retried. aiokafka speaks OffsetFetch up to v3 only,
so the v7 request is declared here with aiokafka's own protocol types.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from aiokafka import TopicPartition
from aiokafka.errors import IncompatibleBrokerVersion, KafkaTimeoutError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

OFFSET_FETCH: Final = 9
UNSTABLE_OFFSET_COMMIT: Final = 88  # not in aiokafka's error table
RETRY_BACKOFF_S: Final = 0.05
STABLE_WAIT_S: Final = 30.0  # a transaction's markers take milliseconds; past this, an outage


class OffsetFetchResponseV7(Response):  # type: ignore[misc]  # aiokafka ships no stubs
    API_KEY = OFFSET_FETCH
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("metadata", CompactString("utf-8")),
                        ("error_code", Int16),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequestV7(RequestStruct):  # type: ignore[misc]
    API_KEY = OFFSET_FETCH
    API_VERSION = 7
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = OffsetFetchResponseV7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


class StableOffsetFetch(Request[OffsetFetchRequestV7]):  # type: ignore[misc]
    """OffsetFetch with ``require_stable``: refused while a transaction's offsets are pending."""

    API_KEY = OFFSET_FETCH

    def __init__(self, group_id: str, tp: TopicPartition) -> None:
        self._group_id = group_id
        self._tp = tp

    def build(self, request_struct_class: type[OffsetFetchRequestV7]) -> OffsetFetchRequestV7:
        return request_struct_class(self._group_id, [(self._tp.topic, [self._tp.partition], {})], True, {})


def committed_of(response: Any, tp: TopicPartition) -> OffsetAndMetadata | int | None:
    """The committed offset of ``tp`` in a v7 response; None when the group has none; the error
    code when the coordinator refused (UNSTABLE_OFFSET_COMMIT: retry)."""
    if response.error_code:
        return int(response.error_code)
    for name, partitions, _ in response.topics:
        for partition, offset, _epoch, metadata, error_code, _ in partitions:
            if name == tp.topic and partition == tp.partition:
                if error_code:
                    return int(error_code)
                return OffsetAndMetadata(offset, metadata or "") if offset >= 0 else None
    return None


async def fetch_stable_offset(
    admin: Any, group_id: str, tp: TopicPartition, *, wait_s: float = STABLE_WAIT_S
) -> OffsetAndMetadata | None:
    """The offset and metadata ``group_id`` committed for ``tp``, once no transaction's offsets
    for it are pending. ``admin`` is a started AIOKafkaAdminClient. A broker older than Kafka 2.5
    (no OffsetFetch v7) is read the plain way. Raises a KafkaError when the coordinator cannot be
    asked, or keeps refusing past ``wait_s``."""
    deadline = time.monotonic() + wait_s
    coordinator = await admin.find_coordinator(group_id)
    while True:
        try:
            response = await admin._send_request(StableOffsetFetch(group_id, tp), coordinator)
        except (IncompatibleBrokerVersion, NotImplementedError):
            # aiokafka found no OffsetFetch version this broker and v7 share: the plain read.
            found: dict[TopicPartition, OffsetAndMetadata] = await admin.list_consumer_group_offsets(
                group_id, coordinator, [tp]
            )
            committed = found.get(tp)
            return committed if committed is not None and committed.offset >= 0 else None
        outcome = committed_of(response, tp)
        if not isinstance(outcome, int):
            return outcome
        error = for_code(outcome)
        if outcome != UNSTABLE_OFFSET_COMMIT:
            if not error.retriable:
                raise error(f"reading the committed offset of {tp} for {group_id}")
            coordinator = await admin.find_coordinator(group_id)  # it may have moved
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"the committed offset of {tp} stayed unstable for {wait_s:.0f}s")
        await asyncio.sleep(RETRY_BACKOFF_S)
