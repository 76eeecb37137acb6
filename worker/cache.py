"""The Redis vector cache: exact lookups by content hash, one round trip per batch.

Entries are Redis HASHes ``{prefix}:{model}:{dim}:{content hash}`` with the vector as float32
bytes (little-endian) plus ``model`` and ``dim``, so a RediSearch HNSW index per model and
dimension (created when the server has the search module) can answer kNN queries over everything
the fleet has embedded. A similarity lookup cannot serve the cache itself: you would need the
vector to find the vector.

A batch's lookups are one Lua script call (``LOOKUP_SCRIPT``: an HMGET per key, one flat reply):
a pipeline of one HMGET per key cost about 3x as much client CPU (a command to pack and a reply to
parse per key), the largest part of a cache hit's cost. A server that refuses scripts (scripting
off, or an ACL without EVAL) gets the pipeline instead.

Whether an entry is served is ``schemas.cache_layout.servable_entry``'s call, the same rule as
every client's: anything else is a miss, computed and overwritten by the store. A key of another
Redis type is a miss for that key only (the script reads each key under ``pcall``, the pipeline
keeps per-command errors) and the store replaces it.

The cache fails open: an error or timeout makes every key of that batch a miss (the model
computes it), is counted, and the cache is skipped for ``retry_after_s`` so a dead Redis costs
one timeout per interval rather than one per batch. It recovers by itself. A Redis that cannot be
reached when the worker starts, single node or cluster, is the same path.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from schemas.cache_layout import (
    DIM_FIELD,
    ENTRY_FIELDS,
    MODEL_FIELD,
    TOKENS_FIELD,
    VECTOR_FIELD,
    CacheEntry,
    cluster_node_url,
    cluster_startup_nodes,
    contract_key,
    index_name,
    servable_entries,
    vector_key_prefix,
)
from worker.config import WorkerConfig
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)
# What a failing cache raises: redis-py's errors, sockets, timeouts, and its cluster client's own
# (RedisClusterException is not a RedisError: "no node reachable" at start is one). All fail open.
CACHE_FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)
# KEYS: the entries; ARGV: the fields to read. Returns {the fields of every key, flat, in order;
# the positions (1-based) of keys of another type}. pcall: one such key must not fail the batch.
LOOKUP_SCRIPT = """
local out = {}
local wrong = {}
local n = 0
for i, key in ipairs(KEYS) do
  local values = redis.pcall('HMGET', key, unpack(ARGV))
  if values.err then
    wrong[#wrong + 1] = i
    values = {}
  end
  for j = 1, #ARGV do
    n = n + 1
    out[n] = values[j] or false
  end
end
return {out, wrong}
"""
# Redis names scripts by their SHA-1 (an identifier, not a security measure).
LOOKUP_SCRIPT_SHA = hashlib.sha1(LOOKUP_SCRIPT.encode(), usedforsecurity=False).hexdigest()
LOOKUP_FIELDS = ENTRY_FIELDS


def _wrong_type(reply: object) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def wrong_type_replies(replies: Sequence[object]) -> set[int]:
    """The positions of a pipeline's replies (run with ``raise_on_error=False``) that are a key of
    another type; any other error is the batch's (raised: the cache fails open)."""
    wrong = set()
    for i, reply in enumerate(replies):
        if _wrong_type(reply):
            wrong.add(i)
        elif isinstance(reply, Exception):
            raise reply
    return wrong


CacheClient = redis.Redis | RedisCluster


def redis_client(
    url: str, *, username: str = "", password: str = "", timeout_s: float = 0.25, ssl_ca_certs: str = ""
) -> CacheClient:
    """A client for the cache; credentials come from the config (the environment), never the URL log.
    A ``redis+cluster://`` URL gets redis-py's cluster client (it discovers the nodes and slots
    from the one named, and follows failovers)."""
    kwargs: dict[str, object] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if ssl_ca_certs:
        kwargs["ssl_ca_certs"] = ssl_ca_certs
    node_url = cluster_node_url(url)
    if node_url is not None:
        nodes = [ClusterNode(host, port) for host, port in cluster_startup_nodes(url)]
        # One retry (it follows a MOVED or a refreshed slot map after a failover), then fail open:
        # the default retries with backoff for seconds while a master is down.
        return RedisCluster.from_url(node_url, startup_nodes=nodes, retry=Retry(NoBackoff(), 1), **kwargs)
    kwargs.update({"health_check_interval": 10, "retry_on_timeout": False})
    return redis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]


async def drop_cache_prefix(client: CacheClient, prefix: str) -> int:
    """Drops every vector index and key written under a cache key prefix (tests, benchmarks, and
    starting afresh after a model change); returns how many keys went."""
    dropped = 0
    if not isinstance(client, RedisCluster):  # a cluster has no index (see VectorCache.ensure_index)
        for index in await client.execute_command("FT._LIST"):  # type: ignore[no-untyped-call]
            name = index.decode() if isinstance(index, bytes) else str(index)
            if name.startswith(f"{prefix}-"):
                await client.execute_command("FT.DROPINDEX", name, "DD")  # type: ignore[no-untyped-call]
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        if isinstance(client, RedisCluster):  # keys of many slots: one pipeline, a batch per node
            pipe = client.pipeline()
            for key in chunk:
                pipe.delete(key)
            dropped += sum(await pipe.execute())
        else:
            dropped += await client.delete(*chunk)
    return dropped


async def redis_login_problem(config: WorkerConfig) -> str | None:
    """Why Redis refuses this worker's credentials, or None (also when Redis is merely down or
    slow: then the cache fails open as usual)."""
    if not config.redis_url:
        return None
    client = redis_client(
        config.redis_url,
        username=config.redis_username,
        password=config.redis_password,
        timeout_s=max(config.redis_timeout_s, 2.0),
        ssl_ca_certs=config.redis_ssl_cafile,
    )
    user = config.redis_username or "default"
    try:
        await client.ping()
    except AuthenticationError as exc:
        return (
            f"redis authentication failed for user {user!r} ({exc}): check "
            "EMBEDFLEET_REDIS_USERNAME and EMBEDFLEET_REDIS_PASSWORD"
        )
    except ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            return (
                f"redis refused user {user!r} ({exc}): check EMBEDFLEET_REDIS_USERNAME, "
                "EMBEDFLEET_REDIS_PASSWORD and the user's ACL"
            )
    except CACHE_FAILURES:
        pass  # down or slow (or a cluster with no node reachable): not a credentials problem
    finally:
        await client.aclose()
    return None


def _refuses_scripts(error: ResponseError) -> bool:
    """Scripting disabled, renamed away, or not allowed to this user."""
    message = str(error).lower()
    return "unknown command" in message or message.startswith("noperm") or "no permissions" in message


class VectorCache:
    """The Redis vector cache: HASHes keyed by content hash, an HNSW index per width; fails
    open (a Redis outage means misses, retried a second later)."""

    def __init__(
        self,
        client: CacheClient | None,
        *,
        key_prefix: str,
        model_name: str,
        ttl_s: int,
        metrics: WorkerMetrics,
        retry_after_s: float = 1.0,
    ) -> None:
        self._client = client
        self.healthy = True  # False while Redis fails (the cache is skipped: degraded, not down)
        self._key_prefix = key_prefix
        self._model_name = model_name
        self._vector_key_prefixes: dict[int, str] = {}
        self._ttl_s = ttl_s
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self._skip_until = 0.0
        self._indexed_dims: set[int] = set()
        # False once the server refuses scripts (lookups pipeline HMGETs); never on a cluster: a
        # script may only touch keys of one slot, and redis-py's cluster pipeline sends one batch
        # per node, in parallel.
        self._scripts = not isinstance(client, RedisCluster)
        self._clustered = isinstance(client, RedisCluster)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def redis_key(self, key: str, dim: int) -> str:
        """``vector_key`` (schemas.cache_layout), its prefix per width worked out once."""
        prefix = self._vector_key_prefixes.get(dim)
        if prefix is None:
            prefix = self._vector_key_prefixes[dim] = vector_key_prefix(
                self._key_prefix, self._model_name, dim
            )
        return prefix + key

    def index_name(self, dim: int) -> str:
        return index_name(self._key_prefix, self._model_name, dim)

    def _available(self) -> bool:
        return self._client is not None and time.monotonic() >= self._skip_until

    def _up(self) -> None:
        self.healthy = True
        self._skip_until = 0.0  # it answered: no reason to keep computing without it
        self._metrics.cache_up.set(1)

    def _failed(self, operation: str, exc: Exception) -> None:
        self._metrics.cache_errors.labels(operation).inc()
        self.healthy = False
        self._metrics.cache_up.set(0)
        if time.monotonic() >= self._skip_until:
            log.warning(
                "redis %s failed (%s: %s); computing without the cache for %.1fs",
                operation,
                type(exc).__name__,
                exc,
                self._retry_after_s,
            )
        self._skip_until = time.monotonic() + self._retry_after_s

    async def lookup(
        self, keys: Sequence[tuple[str, int]], *, count_lookups: bool = True
    ) -> list[np.ndarray | None]:
        """Vectors for (content hash, dim) pairs; None for a miss, or for every key when Redis fails.
        ``count_lookups=False``: these keys were counted as looked up already (by the hit lane,
        worker.hits), so the hit rate counts each request's key once; hits are counted."""
        entries = await self.lookup_entries(keys, count_lookups=count_lookups)
        return [None if entry is None else entry.vector for entry in entries]

    async def lookup_entries(
        self, keys: Sequence[tuple[str, int]], *, count_lookups: bool = True, count_hits: bool = True
    ) -> list[CacheEntry | None]:
        """Entries (vector and token count) for (content hash, dim) pairs, as ``lookup``."""
        if not keys or not self._available():
            return [None] * len(keys)
        names = [self.redis_key(key, dim) for key, dim in keys]
        try:
            raw, wrong = await self._read_entries(names)
        except CACHE_FAILURES as exc:
            self._failed("lookup", exc)
            return [None] * len(keys)
        self._up()
        found = servable_entries(raw, model=self._model_name, dims=[dim for _, dim in keys])
        invalid = sum(
            1
            for i, (entry, fields) in enumerate(zip(found, raw, strict=True))
            if entry is None and (i in wrong or any(value is not None for value in fields))
        )
        if invalid:  # there, but not servable: the store overwrites it
            self._metrics.cache_invalid.inc(invalid)
        if count_lookups:
            self._metrics.cache_lookups.inc(len(keys))
        if count_hits:
            self._metrics.cache_hits.inc(sum(v is not None for v in found))
        return found

    async def _read_entries(self, names: list[str]) -> tuple[list[list[bytes | None]], set[int]]:
        """The ``LOOKUP_FIELDS`` of each entry (all None for a key of another type) and the
        positions of keys of another type, in one round trip."""
        assert self._client is not None
        width = len(LOOKUP_FIELDS)
        if self._scripts:
            try:
                try:
                    reply = await self._client.evalsha(LOOKUP_SCRIPT_SHA, len(names), *names, *LOOKUP_FIELDS)
                except NoScriptError:  # first call on this server (or after SCRIPT FLUSH): load it
                    reply = await self._client.eval(LOOKUP_SCRIPT, len(names), *names, *LOOKUP_FIELDS)
            except ResponseError as exc:
                if not _refuses_scripts(exc):
                    raise
                log.warning("redis refuses Lua scripts (%s); looking up with pipelined HMGETs", exc)
                self._scripts = False
            else:
                flat, wrong_positions = reply
                entries = [flat[i : i + width] for i in range(0, len(flat), width)]
                return entries, {int(position) - 1 for position in wrong_positions}
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, list(LOOKUP_FIELDS))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        wrong = wrong_type_replies(replies)
        return [[None] * width if i in wrong else reply for i, reply in enumerate(replies)], wrong

    async def store(self, entries: Sequence[tuple[str, np.ndarray, int]], model: str) -> None:
        """Writes (content hash, vector, tokens) entries in one pipelined round trip (idempotent:
        same key, same vector); the token count lets readers report usage without a tokenizer."""
        if not entries or not self._available():
            return
        assert self._client is not None
        dims = {int(v.shape[0]) for _, v, _ in entries}
        for dim in dims - self._indexed_dims:
            await self.ensure_index(dim)
        writes = [
            (self.redis_key(key, int(vector.shape[0])), vector, tokens) for key, vector, tokens in entries
        ]
        try:
            replaced = await self._write(writes, model, replace=False)
            if replaced:
                # Keys of another type refused the HSET: delete and write them (rare, so the
                # common store stays one HSET per key).
                await self._write([writes[i] for i in sorted(replaced)], model, replace=True)
                log.info("replaced %d cache keys of another redis type", len(replaced))
        except CACHE_FAILURES as exc:
            self._failed("store", exc)

    async def _write(
        self, writes: Sequence[tuple[str, np.ndarray, int]], model: str, *, replace: bool
    ) -> set[int]:
        """One pipeline of HSETs (after a DEL each when ``replace``); the positions of the keys
        that held another type."""
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        for name, vector, tokens in writes:
            if replace:
                pipe.delete(name)
            pipe.hset(
                name,
                mapping={
                    VECTOR_FIELD: vector.astype("<f4").tobytes(),
                    MODEL_FIELD: model,
                    DIM_FIELD: int(vector.shape[0]),
                    TOKENS_FIELD: tokens,
                },
            )
            if self._ttl_s > 0:
                pipe.expire(name, self._ttl_s)
        per_write = (2 if replace else 1) + (1 if self._ttl_s > 0 else 0)
        hset = 1 if replace else 0  # the HSET's place among a write's commands
        wrong = wrong_type_replies(await pipe.execute(raise_on_error=False))
        return {i // per_write for i in wrong if i % per_write == hset}

    async def ensure_index(self, dim: int) -> bool:
        """Creates the HNSW index of one dimension if the server supports it; False when it cannot."""
        if self._clustered:
            # The open-source RediSearch indexes one node's keys only: no kNN index on a cluster.
            if dim not in self._indexed_dims:
                log.info("redis cluster: caching without a vector index (RediSearch is per node)")
                self._indexed_dims.add(dim)
            return False
        if not self._available():
            return False
        assert self._client is not None
        try:
            await self._client.execute_command(
                "FT.CREATE",
                self.index_name(dim),
                "ON",
                "HASH",
                "PREFIX",
                "1",
                vector_key_prefix(self._key_prefix, self._model_name, dim),
                "SCHEMA",
                VECTOR_FIELD,
                "VECTOR",
                "HNSW",
                "6",
                "TYPE",
                "FLOAT32",
                "DIM",
                str(dim),
                "DISTANCE_METRIC",
                "COSINE",
                "model",
                "TAG",
            )
        except ResponseError as exc:
            message = str(exc).lower()
            if "already exists" in message:
                pass
            elif "unknown command" in message:
                log.info("redis has no search module: caching without a vector index")
            else:
                log.warning("could not create the vector index %s: %s", self.index_name(dim), exc)
        except CACHE_FAILURES as exc:
            self._failed("index", exc)
            return False
        self._indexed_dims.add(dim)
        return True

    async def published_fingerprint(self, name: str) -> str | None:
        """The serving fingerprint the fleet has published for model ``name`` (None: none yet, or
        Redis cannot say)."""
        if not self._available():
            return None
        assert self._client is not None
        try:
            value = await self._client.hget(contract_key(self._key_prefix, name), "fingerprint")
        except CACHE_FAILURES as exc:
            self._failed("read_contract", exc)
            return None
        return value.decode() if isinstance(value, bytes) else value

    async def publish_model(self, name: str, fields: dict[str, str]) -> bool:
        """Writes the served model's contract (fingerprint, dim, tasks...) to
        ``{prefix}:models:{name}``, so clients can compute content hashes and use the cache.
        False when it could not be written (the caller tries again later)."""
        if not self._available():
            return False
        assert self._client is not None
        try:
            await self._client.hset(contract_key(self._key_prefix, name), mapping=fields)  # type: ignore[arg-type]
        except CACHE_FAILURES as exc:
            self._failed("publish_model", exc)
            return False
        return True

    async def ping(self) -> bool:
        if self._client is None:
            return False
        try:
            await self._client.ping()
        except CACHE_FAILURES:
            self.healthy = False
            self._metrics.cache_up.set(0)
            return False
        self._up()
        return True

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
