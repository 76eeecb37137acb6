"""Kafka in: the group consumer's fetch loop, from a fetched record to a job in the batcher.

    fetch -> own partitions only -> track offsets and bytes -> decode (inline or in the decode
    thread) -> batcher; getmany failing on a record it cannot unpack -> worker.salvage -> DLQ

The intake owns which partitions this worker processes right now: a partition the group assigns
is held (paused) until its take is done (exactly-once: its previous owner fenced), then, between
two fetches, moved to its committed offset and owned (``position_taken``), so no fetch straddles a
take and no record is read from a stale position. It applies backpressure (above
``max_in_flight`` uncommitted records or ``max_in_flight_bytes`` every partition is paused, which
does not trigger a rebalance, and resumed below half of both) and reports the consumer lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from worker.batcher import MicroBatcher
from worker.cluster import ClusterView
from worker.config import WorkerConfig
from worker.decoder import RequestDecoder
from worker.failures import FATAL, TRANSIENT, WorkerFatal, classify, describe
from worker.hits import HitLane
from worker.jobs import Answer, Job, Rejection
from worker.kafka_connection import kafka_connection_options
from worker.metrics import WorkerMetrics
from worker.offsets import ConsumedOffsets
from worker.records import DEFAULT_MAX_EXPANDED_BYTES
from worker.salvage import salvage

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
FETCH_MAX_RECORDS = 500
# What a record costs in memory beyond its bytes: token ids, the vector, the encoded result.
RECORD_OVERHEAD_BYTES = 16 * 1024
# Fetches this small are tokenized on the event loop (well under a millisecond); larger ones in
# the decode thread, so long texts never stall heartbeats.
INLINE_DECODE_RECORDS = 16
INLINE_DECODE_BYTES = 16 * 1024
# Reading (codec, limits, content hash: no tokenizer) costs ~10 us per short request and ~4 ms for
# 256 KB of non-ASCII text, so a whole fetch up to this size is read on the loop. The hop to the
# decode thread costs more than it saves there: under load the loop and that thread take turns
# holding the GIL for up to its 5 ms switch interval, and the hits of the fetch wait for it.
INLINE_READ_BYTES = 256 * 1024


# Publishes cache hits answered at intake (the runtime's WorkerRuntime.answer); done once they
# are acknowledged (or failed: the runtime handles that).
Publish = Callable[[list[Answer]], "asyncio.Future[None]"]
# Hits that may be unacknowledged when the next fetch is taken: two full fetches' worth, as
# bench/relay.py's --depth 2 on a backlog, while small fetches at moderate rates never wait (a
# bound in fetches held them back: requests waited in the client's buffer). Without a bound the
# loop answers hits faster than the producer takes them: work piles up (300 MB of records in
# flight on a 100k backlog) and every hit costs twice the CPU.
HITS_AHEAD = 2 * FETCH_MAX_RECORDS


def _no_answer(answered: list[Answer]) -> asyncio.Future[None]:
    raise RuntimeError("the hit lane answered requests, but nothing publishes them")


def create_consumer(config: WorkerConfig, *, read_committed: bool) -> AIOKafkaConsumer:
    """The group consumer: manual commits only (offsets are committed after results are
    acknowledged). ``read_committed``: skip requests of aborted transactions (what exactly-once
    delivery needs)."""
    return AIOKafkaConsumer(
        **kafka_connection_options(config),
        group_id=config.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Room for the largest message plus slack (a bigger one still arrives: the broker always
        # returns at least one batch), and one fetch a fraction of the in-flight byte budget, since
        # fetched records wait in the client until they are taken.
        max_partition_fetch_bytes=max(config.max_message_bytes + (64 << 10), 1 << 20),
        fetch_max_bytes=max(
            config.max_message_bytes + (64 << 10), min(50 << 20, config.max_in_flight_bytes // 8)
        ),
        max_poll_interval_ms=300_000,
        session_timeout_ms=10_000,
        # How long the group waits for this member to rejoin: a revoke finishes the running
        # batches first (seconds), which must never get the member thrown out of the group.
        rebalance_timeout_ms=60_000,
        heartbeat_interval_ms=1_000,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )


def max_expanded_bytes(config: WorkerConfig) -> int:
    """How far one fetched record batch may expand when decompressed (a legitimate batch holds
    many messages of at most max_message_bytes; a decompression bomb is stopped here)."""
    return max(DEFAULT_MAX_EXPANDED_BYTES, 8 * config.max_message_bytes)


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_in_flight: int
    max_in_flight_bytes: int
    max_message_bytes: int
    max_expanded_bytes: int
    isolation_level: int  # worker.cluster.READ_COMMITTED or READ_UNCOMMITTED

    @classmethod
    def of(cls, config: WorkerConfig, isolation_level: int) -> IntakeLimits:
        return cls(
            config.max_in_flight,
            config.max_in_flight_bytes,
            config.max_message_bytes,
            max_expanded_bytes(config),
            isolation_level,
        )


class KafkaIntake:
    """The fetch loop and everything between a fetched record and the batcher."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        decoder: RequestDecoder,
        batcher: MicroBatcher[Job | Rejection],
        offsets: ConsumedOffsets,
        cluster: ClusterView,
        group_id: str,
        metrics: WorkerMetrics,
        decode_executor: Executor,
        limits: IntakeLimits,
        hits: HitLane | None = None,
    ) -> None:
        self._consumer = consumer
        self._hits = hits  # None: every job goes to the batcher (no cache, or exactly-once)
        self._answer: Publish = _no_answer
        # Hits being published (the publication, how many), oldest first; their count.
        self._answering: deque[tuple[asyncio.Future[None], int]] = deque()
        self._answering_hits = 0
        self._decoder = decoder
        self._batcher = batcher
        self._offsets = offsets
        self._cluster = cluster
        self._group_id = group_id
        self._metrics = metrics
        self._decode_executor = decode_executor
        self._limits = limits
        self._owned: set[TopicPartition] = set()  # partitions this worker may process right now
        self._releases = 0  # times partitions left _owned: a take that saw none checks no item
        # Taken (fenced, for exactly-once) but not yet positioned: the fetch loop moves each to its
        # committed offset between two fetches, then owns and resumes it (see position_taken).
        self._to_position: set[TopicPartition] = set()
        self._rebalances = 0  # rebalance callbacks begun (revokes and assigns)
        self._paused = False
        self._fetch_allowed = asyncio.Event()  # cleared while a revoke finishes in-flight work
        self._fetch_allowed.set()
        self._handed_over = asyncio.Event()  # cleared while a fetch's records are being taken
        self._handed_over.set()

    # --- what the runtime tells it -------------------------------------------------------------

    @property
    def owned(self) -> frozenset[TopicPartition]:
        return frozenset(self._owned)

    @property
    def waiting_for_position(self) -> frozenset[TopicPartition]:
        return frozenset(self._to_position)

    @property
    def fetch_held(self) -> bool:
        return not self._fetch_allowed.is_set()

    def rebalance_begins(self) -> None:
        """A revoke or an assign has begun: a positioning under way may apply to an old assignment."""
        self._rebalances += 1

    @contextlib.asynccontextmanager
    async def fetching_held(self) -> Any:
        """No fetch starts while the caller (a revoke) finishes the revoked partitions' work, and
        the fetch being taken (decoded off the loop) is in the batcher before the caller goes on.
        Its records are earlier than nothing the revoke keeps: were they added after the revoke
        dropped the queued ones, a batch could commit past the dropped records (exactly-once:
        lost once the next owner starts at that commit)."""
        self._fetch_allowed.clear()
        try:
            await self._handed_over.wait()
            yield
        finally:
            self._fetch_allowed.set()

    def hold(self, partitions: Sequence[TopicPartition]) -> None:
        """Newly assigned partitions: paused until taken (aiokafka already fetches them)."""
        with contextlib.suppress(Exception):
            self._consumer.pause(*partitions)

    def taken(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions taken (exactly-once: their previous owner fenced): positioned and owned at
        the next round of the fetch loop."""
        self._to_position |= set(partitions)

    def assignment_began(self) -> None:
        """aiokafka resumes fetching every partition of a new assignment: so does backpressure."""
        self._paused = False

    def release(self, partitions: Sequence[TopicPartition]) -> None:
        """Revoked partitions: no longer processed."""
        self._owned -= set(partitions)
        self._releases += 1
        self._to_position -= set(partitions)

    def lose(self, partitions: set[TopicPartition]) -> None:
        """Partitions another worker owns now (fenced): paused until the group hands them out."""
        self._owned -= partitions
        self._releases += 1
        with contextlib.suppress(Exception):
            self._consumer.pause(*[tp for tp in partitions if tp in self._consumer.assignment()])

    # --- the fetch loop ------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event, answer: Publish = _no_answer) -> None:
        """Fetches until ``stopping`` is set; ``answer`` publishes what the hit lane answered.
        Raises WorkerFatal when the failure policy says so (the worker's own credentials or
        configuration)."""
        self._answer = answer
        while not stopping.is_set():
            await self._fetch_allowed.wait()
            self._apply_backpressure()
            if self._to_position:
                await self.position_taken()
            fetch = asyncio.ensure_future(
                self._consumer.getmany(timeout_ms=100, max_records=FETCH_MAX_RECORDS)
            )
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetch
                return
            try:
                fetched = fetch.result()
            except Exception as exc:
                disposition = classify(exc)  # worker.failures: the one policy
                if disposition is FATAL:  # the worker's own credentials or configuration
                    raise WorkerFatal(f"fetching failed: {describe(exc)}") from exc
                if disposition is TRANSIENT:
                    # An outage: count it, back off, retry; nothing was tracked, so nothing is
                    # lost (the records are fetched again).
                    self._metrics.fetch_errors.inc()
                    log.warning("fetch failed (%s); retrying in 1s", describe(exc))
                    await asyncio.sleep(1.0)
                    continue
                # Per-record: raised while aiokafka unpacked a record (see worker.salvage).
                await self._salvage(exc)
                continue
            await self.take(self.owned_records(fetched))
            self._observe_lag(fetched)

    def owned_records(
        self, fetched: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]
    ) -> list[ConsumerRecord[Any, Any]]:
        """The fetched records of the partitions this worker owns. Others are dropped, and nothing
        is lost by it: a partition no longer assigned is read by its new owner from the committed
        offset, and one being taken (aiokafka fetches a new assignment before the rebalance
        callback has fenced the previous owner, from a position that may be stale by then) is
        positioned at its committed offset by position_taken before it is owned."""
        return [record for tp, batch in fetched.items() if tp in self._owned for record in batch]

    async def position_taken(self) -> None:
        """Moves each taken partition to its committed offset, then owns and resumes it. Runs in
        the fetch loop between two fetches, so no fetch straddles the move: every record fetched
        from then on comes from the committed offset on. A rebalance during the move (its awaits)
        leaves the partition to the next round: the move may have applied to the old assignment."""
        for tp in sorted(self._to_position, key=lambda tp: (tp.topic, tp.partition)):
            if tp not in self._consumer.assignment():  # revoked meanwhile
                self._to_position.discard(tp)
                continue
            rebalances = self._rebalances
            try:
                # A stable read: right after the previous owner's transaction ended, a plain one
                # can still answer the offset from before it (worker.stable_offsets).
                committed = await self._cluster.committed_offset(self._group_id, tp)
                if rebalances != self._rebalances:
                    return
                if committed is None:
                    await self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, committed.offset)
                if rebalances != self._rebalances:
                    return
            except IllegalStateError:  # no longer assigned: a rebalance is under way
                return
            except KafkaError as exc:
                log.warning("could not read the committed offset of %s (%s); retrying", tp, exc)
                await asyncio.sleep(1.0)
                return
            self._to_position.discard(tp)
            self._owned.add(tp)
            if not self._paused:
                self._consumer.resume(tp)

    async def take(self, records: list[ConsumerRecord[Any, Any]], extra: Sequence[Rejection] = ()) -> None:
        """Tracks, decodes and hands over fetched records (and rejections made by salvage): cache
        hits to the hit lane's answer (published at once), the rest to the batcher."""
        if not records and not extra:
            return
        self._handed_over.clear()
        try:
            await self._take(records, extra)
        finally:
            self._handed_over.set()

    async def _take(self, records: list[ConsumerRecord[Any, Any]], extra: Sequence[Rejection]) -> None:
        releases = self._releases
        value_bytes = 0
        tp: TopicPartition | None = None
        unowned = any(rejection.source[:2] not in self._owned for rejection in extra)
        for record in records:  # grouped by partition: one TopicPartition per group
            if tp is None or record.partition != tp.partition or record.topic != tp.topic:
                tp = TopicPartition(record.topic, record.partition)
                unowned = unowned or tp not in self._owned
            value_size = len(record.value or b"")
            value_bytes += value_size
            size = value_size + len(record.key or b"") + RECORD_OVERHEAD_BYTES
            if record.headers:
                size += sum(len(k) + len(v or b"") for k, v in record.headers)
            self._offsets.track(tp, record.offset, size)
        self._offsets.observe()
        inline = value_bytes <= INLINE_READ_BYTES
        items = [*await self._off_loop(inline, self._decoder.read, records), *extra]
        jobs = [item for item in items if isinstance(item, Job)]
        if self._hits is not None and jobs:
            split = await self._hits.split(jobs)
            # A rebalance may have run during any await here: the items of partitions no longer
            # owned are dropped (their next owner, maybe this worker again, reads them from the
            # committed offset). Kept, a stale item would let a commit pass records the revoke
            # dropped.
            hits = (
                split.answered
                if self._releases == releases and not unowned
                else [(job, result) for job, result in split.answered if self._owns(job)]
            )
            if hits:
                self._answering.append((self._answer(hits), len(hits)))
                self._answering_hits += len(hits)
                await self._hits_acknowledged(HITS_AHEAD)
            if split.answered:
                rest = {id(job) for job in split.rest}  # the same objects: no hashing of sources
                items = [item for item in items if not isinstance(item, Job) or id(item) in rest]
            jobs = split.rest
        tokenized: Iterator[Job | Rejection] = iter(())
        if jobs:
            inline = (
                len(jobs) <= INLINE_DECODE_RECORDS
                and value_bytes <= INLINE_DECODE_BYTES
                # A long input is tokenized whole and again per window: never on the loop.
                and all(job.request.long == "truncate" for job in jobs)
            )
            tokenized = iter(await self._off_loop(inline, self._decoder.tokenize, jobs))
        # Rejections travel in the batches too, so every record is answered in fetch order.
        check = unowned or self._releases != releases  # else every item is of an owned partition
        for item in items:
            if isinstance(item, Job):
                item = next(tokenized)
            if not check or self._owns(item):
                self._batcher.add(item, item.batch_tokens if isinstance(item, Job) else 1)

    async def _hits_acknowledged(self, ahead: int) -> None:
        """Waits until at most ``ahead`` hits are still being published."""
        answering = self._answering
        while answering and (answering[0][0].done() or self._answering_hits > ahead):
            published, count = answering.popleft()
            await asyncio.wait([published])  # its failure is the runtime's to handle
            self._answering_hits -= count

    async def _off_loop(
        self, inline: bool, work: Callable[[Sequence[T]], list[R]], items: Sequence[T]
    ) -> list[R]:
        """``work(items)``: here when ``inline`` (a few small records at low load: cheaper than the
        hop to the decode thread and back, which waits for the GIL while the loop is busy), else in
        the decode thread, so long texts never stall heartbeats."""
        if inline:
            return work(items)
        return await asyncio.get_running_loop().run_in_executor(self._decode_executor, work, items)

    def _owns(self, item: Job | Rejection) -> bool:
        return item.source[:2] in self._owned  # (topic, partition): equal to its TopicPartition

    async def _salvage(self, error: Exception) -> None:
        """getmany failed on a record it cannot unpack: find every such record, hand over the good
        records around them and a rejection for each, and move past them (worker.salvage)."""
        log.warning("the Kafka client could not unpack a fetched record (%s); locating it", describe(error))

        async def position_of(tp: TopicPartition) -> int | None:
            return self._offsets.position(tp)

        try:
            found = await salvage(
                self._consumer,
                self._cluster,
                [tp for tp in self._consumer.assignment() if tp in self._owned],
                position_of,
                max_bytes=self._limits.max_message_bytes + (64 << 10),
                isolation_level=self._limits.isolation_level,
                max_expanded_bytes=self._limits.max_expanded_bytes,
            )
        except Exception as exc:  # never fatal: the next fetch fails the same way and we try again
            log.warning(
                "could not locate the unreadable record yet (%s); retrying in 1s",
                describe(exc),
                exc_info=not isinstance(exc, KafkaError),
            )
            await asyncio.sleep(1.0)
            return
        if not found.unreadable:
            log.warning("no unreadable record found; fetching again in 1s")
            await asyncio.sleep(1.0)
            return
        rejections = []
        for unreadable in found.unreadable:
            self._metrics.unreadable_records.inc()
            self._offsets.track(
                unreadable.tp, unreadable.offset, RECORD_OVERHEAD_BYTES, next_offset=unreadable.next_offset
            )
            rejections.append(self._decoder.reject_unreadable(unreadable))
        await self.take(found.records, rejections)

    def _apply_backpressure(self) -> None:
        count, size = self._offsets.in_flight, self._offsets.in_flight_bytes
        limits = self._limits
        assignment = self._consumer.assignment()
        if not self._paused and (count >= limits.max_in_flight or size >= limits.max_in_flight_bytes):
            self._consumer.pause(*assignment)
            self._paused = True
        elif self._paused and count < limits.max_in_flight // 2 and size < limits.max_in_flight_bytes // 2:
            self._consumer.resume(*[tp for tp in assignment if tp in self._owned])
            self._paused = False
        self._metrics.paused.set(len(self._consumer.paused()))

    def _observe_lag(self, fetched: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        """Lag per partition fetched from: its high watermark minus one past the last record read
        (a fetch holds each partition's records in offset order)."""
        for tp, records in fetched.items():
            highwater = self._consumer.highwater(tp) if records and tp in self._owned else None
            if highwater is not None:
                lag = max(0, highwater - records[-1].offset - 1)
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
