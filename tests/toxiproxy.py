"""A small client of Toxiproxy's HTTP API (the local stack's fault proxy, `stack.py` service
``toxiproxy``): the proxies' addresses, and toxics added and removed by name.

The stack creates two proxies: ``kafka`` (in front of the single broker's PROXIED listener, which
advertises the proxy's port, so a client that bootstraps through it stays behind it) and ``redis``.
A toxic acts on one direction of every connection of a proxy: ``downstream`` is what the server
sends back (responses), ``upstream`` what the client sends; ``toxicity`` is the share of
connections it applies to.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

Stream = Literal["upstream", "downstream"]
ToxicType = Literal["latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data"]


class ToxiproxyError(RuntimeError):
    """The API refused a call (the message has its status and error text)."""


def default_api() -> str:
    return f"http://127.0.0.1:{os.environ.get('EMBEDFLEET_TOXIPROXY_PORT') or 8474}"


def default_log() -> Path:
    """The stack's Toxiproxy log (as stack.py places it: $EMBEDFLEET_STACK_DIR, else
    $EMBEDFLEET_HOME/stack, else this checkout's .state/stack)."""
    home = os.environ.get("EMBEDFLEET_HOME") or str(Path(__file__).resolve().parents[1] / ".state")
    state = os.environ.get("EMBEDFLEET_STACK_DIR") or str(Path(home) / "stack")
    return Path(state) / "logs" / "toxiproxy.log"


@dataclass
class AcceptedConnections:
    """Connections Toxiproxy accepted per proxy from the moment this was made: its log has one
    "Accepted client" line per connection (at the stack's LOG_LEVEL info). A client that loses
    its connection to a reset and reconnects shows up here, even when it retries silently."""

    path: Path = field(default_factory=default_log)
    offset: int = 0

    def __post_init__(self) -> None:
        if not self.path.exists():
            raise ToxiproxyError(f"no Toxiproxy log at {self.path}: is the stack's toxiproxy running?")
        self.offset = self.path.stat().st_size

    def count(self) -> Counter[str]:
        found: Counter[str] = Counter()
        with self.path.open("rb") as log:
            log.seek(self.offset)
            for line in log:
                if b"Accepted client" not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line still being written
                if entry.get("message") == "Accepted client":
                    found[str(entry.get("name"))] += 1
        return found


@dataclass(frozen=True)
class Proxy:
    name: str
    listen: str  # host:port that clients connect to
    upstream: str  # host:port the proxy forwards to
    enabled: bool
    toxics: tuple[str, ...]  # names of the toxics in place


class Toxiproxy:
    def __init__(self, api: str | None = None, timeout_s: float = 5.0) -> None:
        self.api = api or default_api()
        self.timeout_s = timeout_s

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with httpx.AsyncClient(base_url=self.api, timeout=self.timeout_s) as client:
            response = await client.request(method, path, json=body)
        if response.status_code >= 400:
            raise ToxiproxyError(f"{method} {path}: {response.status_code} {response.text.strip()}")
        return response.json() if response.content else None

    async def version(self) -> str:
        async with httpx.AsyncClient(base_url=self.api, timeout=self.timeout_s) as client:
            response = await client.get("/version")
        response.raise_for_status()
        return response.text.strip()

    async def proxies(self) -> dict[str, Proxy]:
        return {
            name: Proxy(
                name,
                str(p["listen"]),
                str(p["upstream"]),
                bool(p["enabled"]),
                tuple(str(t["name"]) for t in p.get("toxics") or ()),
            )
            for name, p in (await self._call("GET", "/proxies")).items()
        }

    async def address(self, proxy: str) -> str:
        """Where clients connect to reach the service through ``proxy`` (host:port)."""
        found = (await self.proxies()).get(proxy)
        if found is None:
            raise ToxiproxyError(f"toxiproxy has no proxy {proxy!r}: run `embedfleet stack up`")
        return found.listen

    async def add(
        self,
        proxy: str,
        kind: ToxicType,
        attributes: Mapping[str, float],
        *,
        stream: Stream = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
    ) -> str:
        """Adds a toxic (e.g. ``add("redis", "latency", {"latency": 300})``); returns its name."""
        name = name or f"{kind}-{stream}-{uuid.uuid4().hex[:6]}"
        body = {
            "name": name,
            "type": kind,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": dict(attributes),
        }
        await self._call("POST", f"/proxies/{proxy}/toxics", body)
        return name

    async def remove(self, proxy: str, name: str) -> None:
        await self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")

    async def reset(self) -> None:
        """Every proxy enabled, every toxic removed."""
        await self._call("POST", "/reset")

    @asynccontextmanager
    async def toxic(
        self,
        proxy: str,
        kind: ToxicType,
        *,
        stream: Stream = "downstream",
        toxicity: float = 1.0,
        **attributes: int | float,
    ) -> AsyncIterator[str]:
        """A toxic for the duration of a ``async with`` block (removed even when it fails)."""
        name = await self.add(proxy, kind, attributes, stream=stream, toxicity=toxicity)
        try:
            yield name
        finally:
            await self.remove(proxy, name)
