"""Getting past records that aiokafka cannot unpack, without losing the good ones around them.

When ``getmany()`` raises while unpacking (a header name that is not UTF-8, a corrupt or
undecompressable batch), aiokafka does not say which partition or offset; it has already moved
the positions of partitions drained earlier in the same call (their records are lost with the
exception), and it fails again on every later fetch of that record batch, from any position
inside it (it unpacks a batch from its first record). So, in one pass:

1. every assigned partition is put back where the pipeline's own bookkeeping says it was (one past
   the last record handed over, else the committed offset);
2. each is fetched raw from there and read with ``worker.records``; every record (or batch) that
   aiokafka would fail on is found, up to the end of the last record batch that holds one;
3. the good records up to there are handed over as if ``getmany`` had returned them, each culprit
   is handed over as ``Unreadable`` (it becomes a DLQ entry and, where its id can be read, an error
   result), and the partition is moved past that batch, so aiokafka never unpacks it again.

Each record batch is read once, whichever of its records are unreadable: salvage is linear in
the fetched bytes and always moves the partition forward when it finds a culprit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from worker.cluster import READ_COMMITTED, ClusterView
from worker.records import DEFAULT_MAX_EXPANDED_BYTES, RawBatch, RawRecord, read_batches

log = logging.getLogger(__name__)
CREATE_TIME = 0


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record (or a whole batch) the Kafka client cannot unpack."""

    tp: TopicPartition
    offset: int
    next_offset: int  # where the partition continues after it
    timestamp_ms: int
    reason: str
    record: RawRecord | None  # None when the whole batch is unreadable
    batch: bytes | None = None  # then: the batch as fetched (still compressed)
    too_large: bool = False  # the batch expands past the limit


@dataclass(slots=True)
class Salvaged:
    records: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)


@dataclass(slots=True)
class Scan:
    """One partition's fetched bytes, read: the good records and the culprits, in offset order,
    up to ``resume_at`` (where the consumer continues); ``resume_at`` is None when every record
    reads (nothing is handed over then: the consumer fetches it again as usual)."""

    records: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    resume_at: int | None = None


PositionOf = Callable[[TopicPartition], Awaitable[int | None]]


async def salvage(
    consumer: AIOKafkaConsumer,
    cluster: ClusterView,
    partitions: Iterable[TopicPartition],
    position_of: PositionOf,
    *,
    max_bytes: int,
    isolation_level: int,
    max_expanded_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
) -> Salvaged:
    """Restores the positions of ``partitions`` and reads past every unreadable record of each
    (see the module docstring). ``position_of`` gives where the pipeline stands on a partition
    (None: unknown, start from the committed offset)."""
    found = Salvaged()
    for tp in sorted(partitions, key=lambda p: (p.topic, p.partition)):
        position = await position_of(tp)
        if position is None:
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
                position = await consumer.position(tp)
            else:
                position = committed
        consumer.seek(tp, position)
        try:
            fetched = await cluster.fetch_raw(tp, position, max_bytes, isolation_level)
        except (KafkaError, OSError) as exc:
            log.warning("raw fetch of %s at %d failed: %s", tp, position, exc)
            continue
        # In a thread: a batch may be a decompression bomb, which takes a bounded but noticeable
        # time to find out (up to the expansion limit), and the event loop must keep heartbeating.
        scanned = await asyncio.to_thread(
            scan,
            tp,
            fetched.records,
            position,
            fetched.aborted_transactions,
            read_committed=isolation_level == READ_COMMITTED,
            max_expanded_bytes=max_expanded_bytes,
        )
        if scanned.resume_at is None:
            continue  # this partition reads fine: the consumer fetches it again from `position`
        found.records.extend(scanned.records)
        found.unreadable.extend(scanned.unreadable)
        consumer.seek(tp, scanned.resume_at)
        log.warning(
            "partition %s: %d unreadable record(s) from offset %d (%s); %d good records handed "
            "over with them, continuing at %d",
            tp,
            len(scanned.unreadable),
            scanned.unreadable[0].offset,
            scanned.unreadable[0].reason,
            len(scanned.records),
            scanned.resume_at,
        )
    return found


def scan(
    tp: TopicPartition,
    data: bytes,
    position: int,
    aborted: list[tuple[int, int]],
    *,
    read_committed: bool,
    max_expanded_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
) -> Scan:
    """Reads the fetched ``data`` from ``position`` in one pass: every record aiokafka cannot
    unpack, and the good records around them, up to the end of the last record batch holding a
    culprit. Aborted transactions and control batches are skipped the way aiokafka skips them."""
    result = Scan()
    # Records of the batches read so far; handed over only up to the last batch with a culprit.
    pending: list[ConsumerRecord[bytes, bytes]] = []
    pending_aborts = sorted(aborted, key=lambda a: a[1])
    aborted_producers: set[int] = set()
    for batch in read_batches(data, max_expanded_bytes):
        if batch.next_offset <= position:
            continue
        if read_committed and batch.transactional:
            while pending_aborts and pending_aborts[0][1] <= batch.base_offset:
                aborted_producers.add(pending_aborts.pop(0)[0])
            if batch.control:
                aborted_producers.discard(batch.producer_id)
                continue
            if batch.producer_id in aborted_producers:
                continue
        if batch.control:
            continue
        if batch.problem is not None:
            result.records.extend(pending)
            pending = []
            result.unreadable.append(_unreadable_batch(tp, batch, position))
            result.resume_at = batch.next_offset
            continue
        culprit = False
        for record in batch.records:
            if record.offset < position:
                continue
            reason = record.unreadable_reason()
            if reason is not None:
                if not culprit:
                    result.records.extend(pending)
                    pending = []
                    culprit = True
                result.unreadable.append(
                    Unreadable(tp, record.offset, record.offset + 1, record.timestamp_ms, reason, record)
                )
            elif culprit:
                result.records.append(_consumer_record(tp, record))
            else:
                pending.append(_consumer_record(tp, record))
        if culprit:
            result.resume_at = batch.next_offset
    if result.unreadable:
        # The last culprit's place: the pipeline's position moves past its whole batch.
        last = result.unreadable[-1]
        result.unreadable[-1] = Unreadable(
            last.tp,
            last.offset,
            max(last.next_offset, result.resume_at or 0),
            last.timestamp_ms,
            last.reason,
            last.record,
            batch=last.batch,
            too_large=last.too_large,
        )
    return result


def _unreadable_batch(tp: TopicPartition, batch: RawBatch, position: int) -> Unreadable:
    first = max(batch.base_offset, position)
    return Unreadable(
        tp,
        first,
        batch.next_offset,
        0,
        f"{batch.problem}: offsets {first}-{batch.next_offset - 1}",
        None,
        batch=batch.raw,
        too_large=batch.too_large,
    )


def _consumer_record(tp: TopicPartition, record: RawRecord) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=record.offset,
        timestamp=record.timestamp_ms,
        timestamp_type=CREATE_TIME,
        key=record.key,
        value=record.value,
        checksum=None,
        serialized_key_size=len(record.key) if record.key is not None else -1,
        serialized_value_size=len(record.value) if record.value is not None else -1,
        headers=tuple(record.text_headers()),
    )
