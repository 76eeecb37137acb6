"""A blocking face of ``Client`` for scripts: the client lives on a private event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from producer.client import Client
from producer.config import ClientConfig
from producer.errors import Vector
from schemas import LongInputs


class SyncClient:
    """``with SyncClient() as client: vectors = client.embed(texts)``."""

    def __init__(self, config: ClientConfig | None = None, **overrides: Any) -> None:
        self._runner = asyncio.Runner()
        self._config = config
        self._overrides = overrides
        self._client: Client | None = None

    def __enter__(self) -> SyncClient:
        # The client is built on the runner's loop: its futures and tasks belong to that loop.
        self._client = self._runner.run(self._open())
        return self

    async def _open(self) -> Client:
        client = Client(self._config, **self._overrides)
        await client.start()
        return client

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._client is not None:
                self._runner.run(self._client.close())
        finally:
            self._client = None
            self._runner.close()

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("use SyncClient in a with block")
        return self._client

    def embed(
        self,
        texts: Sequence[str],
        *,
        task: str | None = None,
        dimensions: int | None = None,
        timeout: float = 30.0,
        long: LongInputs = "truncate",
        overlap: int | None = None,
    ) -> list[Vector]:
        return self._runner.run(
            self.client.embed(
                texts, task=task, dimensions=dimensions, timeout=timeout, long=long, overlap=overlap
            )
        )


def embed_sync(
    texts: Sequence[str],
    *,
    task: str | None = None,
    dimensions: int | None = None,
    timeout: float = 30.0,
    config: ClientConfig | None = None,
    long: LongInputs = "truncate",
    overlap: int | None = None,
    **overrides: Any,
) -> list[Vector]:
    """One-shot: start a client, embed, close it (a client per call: use SyncClient for many calls)."""
    with SyncClient(config, **overrides) as client:
        return client.embed(
            texts, task=task, dimensions=dimensions, timeout=timeout, long=long, overlap=overlap
        )
