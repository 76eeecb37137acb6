"""Redis, read-only: the model contract the workers publish and the vectors they cache.

Where things are is ``schemas.cache_layout`` (the workers follow the same module), and so is the one
rule for serving an entry (``servable_entry``): an entry the workers would not serve is a miss here
too, and the worker that computes the text overwrites it. A key of another Redis type is a miss for
that key only. Every read fails open: on an error or a timeout (a cluster with no node reachable
too) the call carries on as if the cache were empty, and Redis is skipped for ``retry_after_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from producer.config import ClientConfig
from schemas.cache_layout import (
    ENTRY_FIELDS,
    CacheEntry,
    ModelContract,
    cluster_node_url,
    cluster_startup_nodes,
    contract_key,
    servable_entry,
    vector_key,
)

__all__ = ["CacheReader", "CachedVector", "ModelContract", "connect"]

log = logging.getLogger(__name__)
# RedisClusterException is not a RedisError: a cluster client with no node reachable raises it.
_FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)
# A cached vector and its token count (None in entries written before workers stored it).
CachedVector = CacheEntry


CacheClient = redis.Redis | RedisCluster


def connect(config: ClientConfig) -> CacheClient | None:
    """The cache's client: redis-py's cluster client for a ``redis+cluster://`` URL (a pipeline is
    then one batch per node), else a plain one."""
    if not config.redis_url:
        return None
    kwargs: dict[str, object] = {
        "socket_timeout": config.redis_timeout_s,
        "socket_connect_timeout": config.redis_timeout_s,
    }
    if config.redis_username:
        kwargs["username"] = config.redis_username
    if config.redis_password:
        kwargs["password"] = config.redis_password
    if config.redis_ssl_cafile:
        kwargs["ssl_ca_certs"] = config.redis_ssl_cafile
    node_url = cluster_node_url(config.redis_url)
    if node_url is not None:
        nodes = [ClusterNode(host, port) for host, port in cluster_startup_nodes(config.redis_url)]
        # One retry (it follows a MOVED or a refreshed slot map after a failover), then fail open:
        # the default retries with backoff for seconds while a master is down.
        return RedisCluster.from_url(node_url, startup_nodes=nodes, retry=Retry(NoBackoff(), 1), **kwargs)
    kwargs.update(
        {
            "retry_on_timeout": False,
            # A pooled connection the server closed while idle is retried once on a fresh one
            # instead of failing the lookup (and skipping the cache for retry_after_s).
            "health_check_interval": 10,
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [RedisConnectionError],
        }
    )
    return redis.Redis.from_url(config.redis_url, **kwargs)  # type: ignore[arg-type]


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN MATCH pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _wrong_type(reply: Exception) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


class CacheReader:
    """Reads the workers' Redis cache (model contract and vectors), failing open."""

    def __init__(
        self, client: CacheClient | None, *, prefix: str, model_name: str, retry_after_s: float = 5.0
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._model_name = model_name
        self._retry_after_s = retry_after_s
        self._skip_until = 0.0
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _available(self) -> bool:
        return self._client is not None and time.monotonic() >= self._skip_until

    def _failed(self, operation: str, exc: Exception) -> None:
        self.errors += 1
        if time.monotonic() >= self._skip_until:
            log.warning(
                "redis %s failed (%s: %s); going on without the cache for %.0fs",
                operation,
                type(exc).__name__,
                exc,
                self._retry_after_s,
            )
        self._skip_until = time.monotonic() + self._retry_after_s

    async def read_contract(self, model: str | None = None) -> ModelContract | None:
        """The published contract of ``model`` (default: the client's model)."""
        if not self._available():
            return None
        assert self._client is not None
        name = model or self._model_name
        try:
            fields = await self._client.hgetall(contract_key(self._prefix, name))
        except _FAILURES as exc:
            self._failed("contract read", exc)
            return None
        contract = ModelContract.from_redis_fields(fields)
        return None if contract is None else dataclasses.replace(contract, name=name)

    async def published_models(self) -> list[str] | None:
        """The names of every model whose contract is published under the prefix, sorted; None
        when Redis cannot be read (fail open: the caller keeps what it knew)."""
        if not self._available():
            return None
        assert self._client is not None
        head = contract_key(self._prefix, "")
        names: set[str] = set()
        try:
            async for key in self._client.scan_iter(match=_glob_escape(head) + "*", count=1000):
                text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
                if text.startswith(head) and len(text) > len(head):
                    names.add(text[len(head) :])
        except _FAILURES as exc:
            self._failed("contract scan", exc)
            return None
        return sorted(names)

    async def lookup(
        self, keys: Sequence[str], dim: int, model: str | None = None
    ) -> list[CachedVector | None]:
        """Cached vectors (and their token counts) for content hashes, in one pipelined round
        trip; None = miss."""
        if not keys or not self._available():
            return [None] * len(keys)
        assert self._client is not None
        name = model or self._model_name
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(vector_key(self._prefix, name, dim, key), list(ENTRY_FIELDS))
        try:
            # Per-command errors kept: a key of another type must not fail the others.
            raw: list[Any] = await pipe.execute(raise_on_error=False)
            for reply in raw:
                if isinstance(reply, Exception) and not _wrong_type(reply):
                    raise reply
        except _FAILURES as exc:
            self._failed("lookup", exc)
            return [None] * len(keys)
        return [
            None if isinstance(fields, Exception) else servable_entry(fields, model=name, dim=dim)
            for fields in raw
        ]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
