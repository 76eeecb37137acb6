"""Results in, futures out: one background task reads the reply topic and resolves waiting requests by id.

An id alone proves nothing: anyone who may write the reply topic can send a result with it. A
waiting request therefore names what it expects (the content hash, when the client could compute
it, and the vector width), and a result that does not match is counted and ignored: the request
keeps waiting for the real one (or its timeout).

No record stops the reader. A value that is not a result is counted (``undecodable``) and skipped.
A record that aiokafka cannot even unpack (a header name that is not UTF-8, a corrupt batch) makes
``getmany()`` raise without saying where, after it has already moved the partitions it drained
in that call (their records are lost with the exception), and it fails again on every later
fetch. So the reader keeps its own position per partition (one past the last record it handled),
puts every partition back there, reads each one alone, one record at a time up to the record that
fails, and moves one offset past it (``unreadable``, with a log line). Only those records are lost.
Any other failure (the broker, the topic) fails the waiting requests at once, reports the reader
as down (``problem``) and restarts it after a backoff; a reader task that dies anyway is restarted
by ``check()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CorruptRecordException, KafkaError, RecordTooLargeError, UnsupportedCodecError

from producer.kafka import ServiceUnavailable
from schemas import EmbedResult, ResultDecodeError, decode_result

log = logging.getLogger(__name__)
# Marks a record a reply topic's owner writes to show it is alive (see producer.gateway.reaper);
# readers skip it.
HEARTBEAT_HEADER = "embedfleet-heartbeat"
# The Kafka errors that mean "a record in this fetch cannot be unpacked"; every other KafkaError is
# about the broker or the topic, and anything that is not a KafkaError comes from unpacking.
RECORD_ERRORS = (CorruptRecordException, UnsupportedCodecError, RecordTooLargeError)
# Reading one partition alone after a failed fetch: how long to wait for its records, and at most
# how many records to read one by one before giving the partition back to the normal loop.
PROBE_WAIT_MS = 2000
PROBE_RECORDS = 100_000
RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 5.0
BACKOFF_RESET_S = 60.0


@dataclass(frozen=True, slots=True)
class Expected:
    """What a result must carry to answer a request (None: not known, not checked)."""

    key: str | None = None
    dim: int | None = None

    def problem(self, result: EmbedResult) -> str | None:
        """Why ``result`` cannot be the answer, or None when it can."""
        if result.error is not None:
            # Validation errors carry no key; an error can only cost the requester a retry.
            if result.key is not None and self.key is not None and result.key != self.key:
                return f"error result for key {result.key[:12]}, not {self.key[:12]}"
            return None
        if self.key is not None and result.key != self.key:
            return f"result for key {str(result.key)[:12]}, not {self.key[:12]}"
        if self.dim is not None and result.dim != self.dim:
            return f"result of width {result.dim}, not {self.dim}"
        return None


def is_record_error(exc: BaseException) -> bool:
    """Whether ``getmany()`` raised ``exc`` because a fetched record cannot be unpacked."""
    return isinstance(exc, RECORD_ERRORS) or not isinstance(exc, KafkaError)


class ReplyRouter:
    """Reads the reply topic and resolves each waiting request by id (checking key and width).

    ``positions``: where each partition of the consumer starts; the router keeps them up to date so
    that it can put the partitions back after a fetch that failed on an unreadable record.
    """

    def __init__(
        self, consumer: AIOKafkaConsumer, positions: Mapping[TopicPartition, int] | None = None
    ) -> None:
        self._consumer = consumer
        self._positions: dict[Any, int] = dict(positions or {})
        self._pending: dict[str, tuple[asyncio.Future[EmbedResult], Expected]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._stopped = False
        self.undecodable = 0  # records read that are not results (or that the reader failed on)
        self.unreadable = 0  # records aiokafka could not unpack, skipped
        self.mismatched = 0  # results with a waiting id but the wrong key or width
        self.restarts = 0  # times the reader failed and started again

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedfleet-replies")

    @property
    def problem(self) -> str | None:
        """Why results cannot be read now (None: they can)."""
        if self._task is None or self._stopped:
            return None  # not started yet (requests may register first) or stopped on purpose
        if self._task.done():
            return "the reply reader has stopped"
        if self._failure is not None:
            return f"the reply reader has stopped: {self._failure!r}; restarting"
        return None

    def check(self) -> str | None:
        """``problem``, after starting again a reader task that died (reported this once)."""
        task = self._task
        if task is None or not task.done() or self._stopped:
            return self.problem
        death = None if task.cancelled() else task.exception()
        problem = f"the reply reader has stopped: {death!r}" if death else "the reply reader was cancelled"
        log.error("%s; starting it again", problem)
        self.restarts += 1
        self._fail_pending(ServiceUnavailable(problem))
        with contextlib.suppress(Exception):  # best effort: the reader re-reads from there
            self._put_back()
        self.start()
        return problem

    def expect(self, request_id: str, expected: Expected = Expected()) -> asyncio.Future[EmbedResult]:
        """A future for the result of ``request_id`` that matches ``expected``; register it before
        producing the request."""
        problem = self.check()
        if problem is not None:
            raise ServiceUnavailable(problem) from self._failure
        future: asyncio.Future[EmbedResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, expected)
        return future

    def forget(self, request_ids: list[str]) -> None:
        """Stop waiting for these ids (after a timeout); a late result is then dropped."""
        for request_id in request_ids:
            waiting = self._pending.pop(request_id, None)
            if waiting is not None and not waiting[0].done():
                waiting[0].cancel()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # --- the reader ----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = RESTART_BACKOFF_S
        while True:
            started = loop.time()
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if loop.time() - started > BACKOFF_RESET_S:
                    backoff = RESTART_BACKOFF_S  # it ran well for a while: a new failure, not a streak
                # Waiting callers learn at once (503 at the gateway) instead of at their timeout.
                log.error("the reply reader failed (%r); restarting it in %.1fs", exc, backoff)
                self._failure = exc
                self.restarts += 1
                self._fail_pending(ServiceUnavailable(f"the reply reader failed: {exc!r}"))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_RESTART_BACKOFF_S)
                try:
                    self._put_back()
                except Exception as seek_exc:  # e.g. a partition no longer assigned
                    log.warning("could not put the reply partitions back: %r", seek_exc)
                self._failure = None

    async def _read(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=10_000)
            except Exception as exc:
                if not is_record_error(exc):
                    raise
                try:
                    skipped = await self._skip_unreadable()
                except Exception as probe_exc:
                    log.warning("could not find the unreadable reply record: %r", probe_exc)
                    raise exc from probe_exc
                if not skipped:
                    raise
                continue
            for tp, records in batches.items():
                self._deliver(tp, records)

    def _deliver(self, tp: Any, records: Sequence[Any]) -> None:
        for record in records:
            self._dispatch(record.value, record.headers)
        if records and tp in self._positions:
            self._positions[tp] = records[-1].offset + 1

    def _put_back(self) -> None:
        """Every partition back to one past the last record handled (a failed ``getmany`` may
        have moved partitions whose records it then lost)."""
        for tp, position in self._positions.items():
            self._consumer.seek(tp, position)

    async def _skip_unreadable(self) -> bool:
        """After ``getmany`` raised on a record: reads each partition with records left alone, up
        to the record that fails, and moves past that record. False when none failed again."""
        self._put_back()
        consumer = self._consumer
        skipped = False
        for tp in sorted(consumer.assignment(), key=lambda p: (p.topic, p.partition)):
            position = self._positions.get(tp)
            highwater = consumer.highwater(tp)
            if position is not None and highwater is not None and position >= highwater:
                continue  # nothing fetched past what was handled: not this partition
            skipped |= await self._probe(tp)
        return skipped

    async def _probe(self, tp: TopicPartition) -> bool:
        """Reads ``tp`` alone; when it fails, again one record at a time (each is handled) up to
        the record aiokafka fails on, and moves one past it. False when no record failed."""
        consumer = self._consumer
        try:
            batch = await consumer.getmany(tp, timeout_ms=PROBE_WAIT_MS, max_records=10_000)
        except Exception as exc:
            if not is_record_error(exc):
                raise
        else:
            self._deliver(tp, batch.get(tp, []))
            return False
        # The failed read left the position where it started; the bad record is within one fetch.
        for _ in range(PROBE_RECORDS):
            try:
                batch = await consumer.getmany(tp, timeout_ms=PROBE_WAIT_MS, max_records=1)
            except Exception as exc:
                if not is_record_error(exc):
                    raise
                offset = await consumer.position(tp)
                consumer.seek(tp, offset + 1)
                self._positions[tp] = offset + 1
                self.unreadable += 1
                log.warning(
                    "skipped a record on the reply topic that cannot be read: %s offset %d (%s: %s)",
                    tp,
                    offset,
                    type(exc).__name__,
                    exc,
                )
                return True
            records = batch.get(tp, [])
            if not records:
                return False
            self._deliver(tp, records)
        return False

    def _dispatch(self, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> None:
        try:
            self._resolve(value, headers)
        except Exception as exc:  # a record that trips the reader is skipped, never fatal
            self.undecodable += 1
            log.warning("skipped a reply record the reader failed on: %r", exc)

    def _resolve(self, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> None:
        if value is None or (headers and any(name == HEARTBEAT_HEADER for name, _ in headers)):
            return
        try:
            result = decode_result(value, headers)
        except ResultDecodeError:
            self.undecodable += 1
            return
        # On the shared topic most results belong to other clients: their ids are not ours.
        waiting = self._pending.get(result.id) if result.id is not None else None
        if waiting is None:
            return
        future, expected = waiting
        problem = expected.problem(result)
        if problem is not None:
            self.mismatched += 1
            log.debug("ignoring a result for request %s: %s", result.id, problem)
            return
        del self._pending[result.id]  # type: ignore[arg-type]
        if not future.done():
            future.set_result(result)

    def _fail_pending(self, exc: BaseException) -> None:
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.forget(list(self._pending))
