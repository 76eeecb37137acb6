"""The cache's one rule and its fail-open path with real worker processes:

* an entry the rule refuses (NaN, inf, cut, missing a field, a key of another Redis type) is a miss
  for the Python client and the gateway (which reads through it) as for the worker: the text is
  computed, answered with real numbers, and the worker's store overwrites the entry;
* a worker whose Redis cannot be reached when it starts, single node or cluster URL, starts, gets
  ready and answers from the model, counting cache errors; a single node that comes up later is
  used (stores, then hits) without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as redis_asyncio
from redis.typing import EncodableT

from producer import Client
from schemas.cache_layout import ENTRY_FIELDS, contract_key, servable_entry, vector_key
from schemas.content_hash import content_hash
from tests.fleet import Fleet, FleetIO, GatewayProcess, drop_cache, free_port, running_fleet, start_fleet
from worker.config import WorkerConfig

pytestmark = pytest.mark.stack

MODEL = "all-MiniLM-L6-v2"
DIM = 384


@pytest.fixture(scope="module")
async def fleet(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    log_dir = tmp_path_factory.mktemp("cache-fleet-logs")
    async with running_fleet(kafka_bootstrap, redis_url, model_dir, log_dir, workers=1) as running:
        yield running


def _hash(vector: list[float], model: str = MODEL) -> dict[EncodableT, EncodableT]:
    return {"vector": np.array(vector, dtype="<f4").tobytes(), "model": model, "dim": DIM}


# How each text's entry is spoiled before anyone asks for it.
BAD: dict[str, Callable[[redis_asyncio.Redis, str], Awaitable[object]]] = {
    "nan": lambda r, k: r.hset(k, mapping=_hash([math.nan] * DIM)),
    "inf": lambda r, k: r.hset(k, mapping=_hash([math.inf] + [0.1] * (DIM - 1))),
    "cut": lambda r, k: r.hset(k, mapping=_hash([0.5] * 100)),
    "other_model": lambda r, k: r.hset(k, mapping=_hash([0.5] * DIM, model="another")),
    "string": lambda r, k: r.set(k, b"not a hash"),
    "list": lambda r, k: r.rpush(k, b"not", b"a", b"hash"),
}


async def spoil(fleet: Fleet, redis_url: str, who: str, kinds: tuple[str, ...]) -> dict[str, str]:
    """One text per kind of bad entry, its entry spoiled; returns text -> its Redis key."""
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        fingerprint = await client.hget(contract_key(fleet.cache_prefix, MODEL), "fingerprint")
        assert isinstance(fingerprint, bytes), "the worker published no contract"
        keys = {}
        for kind in kinds:
            text = f"{who} reads a spoiled cache entry ({kind}) {uuid.uuid4().hex}"
            hash_ = content_hash(text, model_fingerprint=fingerprint.decode(), task=None, dimensions=None)
            keys[text] = vector_key(fleet.cache_prefix, MODEL, DIM, hash_)
            await BAD[kind](client, keys[text])
        return keys
    finally:
        await client.aclose()


async def assert_repaired(redis_url: str, keys: dict[str, str]) -> None:
    """The worker's store replaced every spoiled entry with one the rule serves."""
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        for text, key in keys.items():
            assert await client.type(key) == b"hash", text
            entry = servable_entry(await client.hmget(key, list(ENTRY_FIELDS)), model=MODEL, dim=DIM)
            assert entry is not None and entry.tokens, text
    finally:
        await client.aclose()


# Calls of their own: a wrong-typed key must not hide (by failing the whole lookup) what the
# reader does with a bad value.
CALLS = (("nan", "inf", "cut", "other_model"), ("string", "list"))


@pytest.mark.parametrize("kinds", CALLS, ids=["bad_values", "wrong_types"])
async def test_python_client_misses_bad_entries_and_the_worker_repairs_them(
    fleet: Fleet, redis_url: str, kinds: tuple[str, ...]
) -> None:
    keys = await spoil(fleet, redis_url, "the Python client", kinds)
    async with Client(fleet.client_config()) as client:
        vectors = await client.embed(list(keys), timeout=60)
        assert client.stats.cached == 0  # every entry refused, none served
        for text, vector in zip(keys, vectors, strict=True):
            assert vector.shape == (DIM,) and bool(np.isfinite(vector).all()), text
            assert abs(float(np.linalg.norm(vector)) - 1) < 0.05, text
        await assert_repaired(redis_url, keys)
        again = await client.embed(list(keys), timeout=60)
        assert client.stats.cached == len(keys)  # the repaired entries are served
        for first, second in zip(vectors, again, strict=True):
            assert np.array_equal(first, second)


@pytest.fixture(scope="module")
async def gateway(fleet: Fleet) -> GatewayProcess:
    started = fleet.start_gateway()
    await started.wait_ready()
    return started


@pytest.mark.parametrize("kinds", CALLS, ids=["bad_values", "wrong_types"])
async def test_gateway_misses_bad_entries_instead_of_answering_nulls(
    fleet: Fleet, gateway: GatewayProcess, redis_url: str, kinds: tuple[str, ...]
) -> None:
    keys = await spoil(fleet, redis_url, "the gateway", kinds)
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(f"{gateway.url}/v1/embeddings", json={"model": MODEL, "input": list(keys)})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == len(keys)
    for text, item in zip(keys, data, strict=True):
        embedding = item["embedding"]
        assert len(embedding) == DIM and all(isinstance(x, float) and math.isfinite(x) for x in embedding), (
            text
        )
    await assert_repaired(redis_url, keys)


async def _answers_without_redis(fleet: Fleet, texts: list[str]) -> None:
    async with FleetIO(fleet) as io:
        results = await io.wait_for(await io.send_texts(texts), timeout_s=90)
    for text, result in zip(texts, results.values(), strict=True):
        assert "error" not in result or result["error"] is None, (text, result)
        assert len(result["vector"]) == DIM and not result.get("cached"), text


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_worker_starts_and_serves_while_redis_is_unreachable(
    kafka_bootstrap: str, model_dir: Path, tmp_path: Path, scheme: str
) -> None:
    """Nothing listens at the Redis URL (a closed port): the worker starts anyway, is ready with
    the cache degraded, answers from the model and counts the cache's failures."""
    closed = f"{scheme}://127.0.0.1:{free_port()}/0"
    fleet = await start_fleet(kafka_bootstrap, closed, model_dir, tmp_path, workers=1)
    try:
        await _answers_without_redis(fleet, [f"no redis ({scheme}) {i} {uuid.uuid4().hex}" for i in range(5)])
        worker = fleet.workers[0]
        assert worker.alive
        assert worker.metric("embedfleet_cache_errors_total") >= 1
        assert worker.metric("embedfleet_cache_up") == 0
        status, body = worker.http("/readyz")
        assert status == 200 and "degraded" in body, body
    finally:
        fleet.stop_all()
        await fleet.delete_topics()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def forwarder(port: int, redis_url: str) -> AsyncIterator[None]:
    """Redis 'comes back' at ``port``: a TCP forwarder to the real one."""
    target = redis_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, target_port = target.rpartition(":")
    tasks: set[asyncio.Task[None]] = set()

    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(target_port))
        for task in (_pipe(reader, upstream_writer), _pipe(upstream_reader, writer)):
            tasks.add(asyncio.create_task(task))

    server = await asyncio.start_server(connect, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_worker_started_without_redis_uses_it_once_it_comes_back(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    fleet = await start_fleet(kafka_bootstrap, f"redis://127.0.0.1:{port}/0", model_dir, tmp_path, workers=1)
    try:
        await _answers_without_redis(fleet, [f"before redis {i} {uuid.uuid4().hex}" for i in range(5)])
        worker = fleet.workers[0]
        async with forwarder(port, redis_url):
            # The health loop pings every 2 s: the cache is up again without a restart.
            for _ in range(100):
                if worker.metric("embedfleet_cache_up") == 1:
                    break
                await asyncio.sleep(0.2)
            assert worker.metric("embedfleet_cache_up") == 1
            # The contract it could not publish at start is published now (clients need it).
            contracts = redis_asyncio.Redis.from_url(redis_url)
            try:
                for _ in range(50):
                    if await contracts.keys(contract_key(fleet.cache_prefix, "*")):
                        break
                    await asyncio.sleep(0.2)
                assert await contracts.keys(contract_key(fleet.cache_prefix, "*")), "no contract"
            finally:
                await contracts.aclose()
            await asyncio.sleep(1.5)  # past the skip interval of the last failure
            texts = [f"after redis {i} {uuid.uuid4().hex}" for i in range(5)]
            async with FleetIO(fleet) as io:
                first = await io.wait_for(await io.send_texts(texts), timeout_s=90)
                assert not any(r.get("cached") for r in first.values())
                second = await io.wait_for(await io.send_texts(texts), timeout_s=90)
            assert all(r.get("cached") for r in second.values()), second
            for a, b in zip(first.values(), second.values(), strict=True):
                assert a["vector"] == b["vector"]
            assert worker.alive
    finally:
        fleet.stop_all()
        await fleet.delete_topics()
        await drop_cache(redis_url, fleet.cache_prefix)  # the fleet's URL is the closed port


@pytest.mark.parametrize("hot", [True, False], ids=["hot-entries", "hot-entries-off"])
async def test_a_hot_key_is_answered_from_the_workers_memory_while_redis_is_away(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path, hot: bool
) -> None:
    """Hot entries (worker.hits.HotEntries): texts the hit lane found in Redis are answered as
    cache hits, with the same vectors, after Redis went away; a text never seen is computed. With
    hot entries off the same texts are computed again: the hits come from the worker's memory."""
    port = free_port()
    hot_bytes = str(WorkerConfig().hot_cache_bytes) if hot else "0"
    fleet = await start_fleet(
        kafka_bootstrap,
        f"redis://127.0.0.1:{port}/0",
        model_dir,
        tmp_path,
        workers=1,
        EMBEDFLEET_HOT_CACHE_BYTES=hot_bytes,
    )
    texts = [f"hot key {i} {uuid.uuid4().hex}" for i in range(5)]
    try:
        worker = fleet.workers[0]
        async with forwarder(port, redis_url):
            for _ in range(100):  # the health loop pings every 2 s
                if worker.metric("embedfleet_cache_up") == 1:
                    break
                await asyncio.sleep(0.2)
            assert worker.metric("embedfleet_cache_up") == 1
            await asyncio.sleep(1.5)  # past the skip interval of the start's failure
            async with FleetIO(fleet) as io:
                computed = await io.wait_for(await io.send_texts(texts), timeout_s=90)
                found = await io.wait_for(await io.send_texts(texts), timeout_s=90)
            assert not any(r.get("cached") for r in computed.values()), computed
            assert all(r.get("cached") for r in found.values()), found  # from Redis: now hot
        # Redis is away: the forwarder is closed and nothing listens at the worker's Redis URL.
        async with FleetIO(fleet) as io:
            away = await io.wait_for(await io.send_texts(texts), timeout_s=90)
            fresh = await io.wait_for(await io.send_texts([f"never seen {uuid.uuid4().hex}"]), timeout_s=90)
        assert all(r.get("error") is None for r in [*away.values(), *fresh.values()])
        assert not any(r.get("cached") for r in fresh.values())
        hot_hits = worker.metric("embedfleet_hot_cache_hits_total")
        if hot:
            assert all(r.get("cached") for r in away.values()), away
            assert [r["vector"] for r in away.values()] == [r["vector"] for r in found.values()]
            assert hot_hits == len(texts)
        else:
            assert not any(r.get("cached") for r in away.values()), away
            assert hot_hits == 0
        assert worker.alive
    finally:
        fleet.stop_all()
        await fleet.delete_topics()
        await drop_cache(redis_url, fleet.cache_prefix)
