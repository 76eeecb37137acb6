"""Slow clients cannot hold connections: a deadline for a request's headers.

uvicorn times out only idle keep-alive connections: a connection that never sends anything, or
sends its headers one byte at a time, is held for ever (each byte even cancels the keep-alive
timer). This protocol, uvicorn's own httptools protocol plus one timer, closes a connection whose
request headers are not complete ``read_timeout_s`` after it opened (or after the first byte of a
later request on a keep-alive connection), with a 408 when part of a request had arrived, and
answers 431 to headers that grow past ``max_header_bytes`` (httptools has no limit of its own).
The body has its own deadline in the app (``producer.gateway.app``), where it is read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from producer.gateway.metrics import GatewayMetrics
from producer.gateway.openai_api import ApiError

# Request line plus headers; h11's default limit is 16 KiB, browsers send a few KiB.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and size limit (see the module)."""

    read_timeout_s: float = 10.0
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    metrics: GatewayMetrics | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # bytes received while waiting for a request's headers

    def _awaiting_headers(self) -> bool:
        # uvicorn creates a request's cycle when its headers are complete; a finished cycle stays
        # until the next request's headers complete.
        cycle = self.cycle
        return cycle is None or cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.read_timeout_s, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # also bounds a connection that never sends a byte

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():
            self._header_bytes += len(data)
            self._arm()  # a keep-alive connection starts its next request
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not self._awaiting_headers():
            self._disarm()
            self._header_bytes = 0
        elif self._header_bytes > self.max_header_bytes:
            self._refuse(
                431,
                f"the request headers are over {self.max_header_bytes} bytes",
                "request_header_fields_too_large",
                "header_too_large",
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers():
            return
        if self._header_bytes:
            self._refuse(
                408,
                f"the request headers did not arrive within {self.read_timeout_s:g}s "
                "(EMBEDFLEET_GATEWAY_READ_TIMEOUT_S)",
                "request_timeout",
                "header_timeout",
            )
        else:
            self._count("idle")
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str, reason: str) -> None:
        """Answers ``status`` in OpenAI's error shape and closes the connection."""
        self._disarm()
        self._count(reason)
        body = ApiError(status, message, code=code).body()
        phrase = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, phrase, len(body), body)
        )
        self.transport.close()

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.slow_connections.labels(reason).inc()


def header_deadline_protocol(
    read_timeout_s: float,
    metrics: GatewayMetrics | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> type[HeaderDeadlineProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these settings."""
    return type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {"read_timeout_s": read_timeout_s, "max_header_bytes": max_header_bytes, "metrics": metrics},
    )
