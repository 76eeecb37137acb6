"""Results in, futures out: one background task reads the reply topic and resolves waiting requests by id."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer

from schemas import EmbedResult, ResultDecodeError, decode_result

log = logging.getLogger(__name__)


class ReplyRouter:
    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._pending: dict[str, asyncio.Future[EmbedResult]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.undecodable = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedfleet-replies")

    def expect(self, request_id: str) -> asyncio.Future[EmbedResult]:
        """A future for the result of ``request_id``; register it before producing the request."""
        if self._failure is not None:
            raise RuntimeError(f"the reply reader has stopped: {self._failure}") from self._failure
        future: asyncio.Future[EmbedResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        return future

    def forget(self, request_ids: list[str]) -> None:
        """Stop waiting for these ids (after a timeout); a late result is then dropped."""
        for request_id in request_ids:
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.cancel()

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
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(exc)
            self._pending.clear()

    def _dispatch(self, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        if value is None:
            return
        try:
            result = decode_result(value, headers)
        except ResultDecodeError:
            self.undecodable += 1
            return
        # On the shared topic most results belong to other clients: their ids are not ours.
        future = self._pending.pop(result.id, None) if result.id is not None else None
        if future is not None and not future.done():
            future.set_result(result)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.forget(list(self._pending))
