"""Results in, futures out: one background task reads the reply topic and resolves waiting requests by id.

An id alone proves nothing: anyone who may write the reply topic can send a result with it. A
waiting request therefore names what it expects (the content hash, when the client could compute
it, and the vector width), and a result that does not match is counted and ignored: the request
keeps waiting for the real one (or its timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer

from schemas import EmbedResult, ResultDecodeError, decode_result

log = logging.getLogger(__name__)
# Marks a record a reply topic's owner writes to show it is alive (see producer.gateway.reaper);
# readers skip it.
HEARTBEAT_HEADER = "embedfleet-heartbeat"


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


class ReplyRouter:
    """Reads the reply topic and resolves each waiting request by id (checking key and width)."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._pending: dict[str, tuple[asyncio.Future[EmbedResult], Expected]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.undecodable = 0
        self.mismatched = 0  # results with a waiting id but the wrong key or width

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedfleet-replies")

    def expect(self, request_id: str, expected: Expected = Expected()) -> asyncio.Future[EmbedResult]:
        """A future for the result of ``request_id`` that matches ``expected``; register it before
        producing the request."""
        if self._failure is not None:
            raise RuntimeError(f"the reply reader has stopped: {self._failure}") from self._failure
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

    async def _run(self) -> None:
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=10_000)
                for records in batches.values():
                    for record in records:
                        self._dispatch(record.value, record.headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Waiting callers learn at once instead of at their timeout.
            log.error("the reply reader failed: %s", exc)
            self._failure = exc
            for future, _ in self._pending.values():
                if not future.done():
                    future.set_exception(exc)
            self._pending.clear()

    def _dispatch(self, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
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

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.forget(list(self._pending))
