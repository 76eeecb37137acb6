"""A tiny HTTP endpoint on the event loop: ``/metrics``, ``/healthz`` (live) and ``/readyz`` (ready).

Served by asyncio itself, so a blocked event loop fails the liveness probe, as it should. Ready
means the model is loaded, the consumer group joined (a member that lost its partitions, e.g. to
a session timeout, is not) and Kafka answers; Redis being down only makes the worker degraded (it
computes without the cache), never unready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Histogram

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 8192


class ModelCalls:
    """The model calls running now (``worker.pipeline`` enters ``running`` around each, in its
    inference thread). /healthz fails while one has run longer than ``stall_s``: an inference
    runtime that hangs (seen once: two OpenVINO requests deadlocked) holds its thread in native
    code, which nothing in the process can interrupt, and its partitions would wait for good;
    failing liveness lets the orchestrator restart the worker and the group reassign them. 0
    turns the check off."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}
        self._ids = itertools.count()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            call = next(self._ids)
            self._started[call] = self._clock()
        try:
            yield
        finally:
            with self._lock:
                del self._started[call]

    def longest_running_s(self) -> float:
        """How long the oldest call still running has run (0 when none runs)."""
        now = self._clock()
        with self._lock:
            return max((now - started for started in self._started.values()), default=0.0)

    @property
    def stalled(self) -> bool:
        return self.stall_s > 0 and self.longest_running_s() > self.stall_s


@dataclass
class HealthState:
    """What /healthz and /readyz report: model loaded, Kafka reachable, group joined, cache."""

    model_loaded: bool = False
    group_joined: bool = False
    kafka_reachable: bool = True
    cache_ok: bool = True
    stopping: bool = False
    details: dict[str, str] = field(default_factory=dict)
    model_calls: ModelCalls | None = None

    def liveness(self) -> tuple[bool, bytes]:
        """/healthz: live unless a model call has stalled (``ModelCalls``); a blocked event
        loop cannot answer at all."""
        calls = self.model_calls
        if calls is None or not calls.stalled:
            return True, b'{"live": true}'
        running = calls.longest_running_s()
        log.error(
            "a model call has run for %.0f s (EMBEDFLEET_MODEL_CALL_STALL_S=%g): the inference "
            "runtime looks hung; failing /healthz so that the worker is restarted",
            running,
            calls.stall_s,
        )
        body = {"live": False, "model_call_running_s": round(running, 1), "stall_s": calls.stall_s}
        return False, json.dumps(body).encode()

    @property
    def ready(self) -> bool:
        return self.model_loaded and self.group_joined and self.kafka_reachable and not self.stopping

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "ready": self.ready,
                "model_loaded": self.model_loaded,
                "group_joined": self.group_joined,
                "kafka": "ok" if self.kafka_reachable else "unreachable",
                "cache": "ok" if self.cache_ok else "degraded",
                "stopping": self.stopping,
                **self.details,
            }
        ).encode()


async def watch_event_loop(lag: Histogram, interval_s: float = 0.1) -> None:
    """Observes how late the loop wakes a timer: the time it was blocked (long decoding, a slow
    callback), which would also delay Kafka heartbeats."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        lag.observe(max(0.0, loop.time() - started - interval_s))


def log_task_stacks() -> None:
    """Logs where every task of the loop waits, down its chain of awaits (SIGUSR1 on a worker):
    what a stuck worker is stuck on, without stopping it."""
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    for task in tasks:
        where: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(where) < 12:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                where.append(
                    f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
                )
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        log.warning("task %s waits in %s", task.get_name(), " -> ".join(where) or "(done)")
    log.warning("%d tasks", len(tasks))


class HealthServer:
    """Serves /metrics, /healthz and /readyz on the worker's event loop."""

    def __init__(self, state: HealthState, metrics: Callable[[], bytes], host: str, port: int) -> None:
        self._state = state
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("metrics and health on http://%s:%d/metrics", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        request_line = head[:MAX_REQUEST_BYTES].split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
        if path == "/metrics":
            status, body, kind = 200, self._metrics(), "text/plain; version=0.0.4; charset=utf-8"
        elif path == "/healthz":
            live, body = self._state.liveness()
            status, kind = (200 if live else 503), "application/json"
        elif path == "/readyz":
            status = 200 if self._state.ready else 503
            body, kind = self._state.as_json(), "application/json"
        else:
            status, body, kind = 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
