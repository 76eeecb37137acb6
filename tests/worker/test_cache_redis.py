"""The vector cache against the real Redis Stack server: the lookup script reads what the store
wrote, and every entry that cannot be served (missing, another model or width, a cut vector) is
a miss; a server that has not loaded the script yet (SCRIPT FLUSH) is handled. The worker, the
Python client and the Go client read the shared cases of schemas/testdata/cache_entries.json alike.
"""

import json
import os
import shutil
import socket
import subprocess
import uuid
from typing import Any

import numpy as np
import pytest
import redis.asyncio as redis_asyncio

from producer.cache import CacheReader, connect
from producer.config import ClientConfig
from schemas.cache_layout import vector_key
from schemas.testdata.generate import CACHE_ENTRIES_FILE
from tests.fleet import REPO_ROOT
from worker.cache import VectorCache, drop_cache_prefix, redis_client, redis_login_problem
from worker.config import WorkerConfig
from worker.metrics import WorkerMetrics


async def test_lookup_script_serves_stored_vectors_and_misses_the_rest(redis_url: str) -> None:
    prefix = f"test-cache-{uuid.uuid4().hex[:8]}"
    client = redis_asyncio.Redis.from_url(redis_url)
    metrics = WorkerMetrics()
    cache = VectorCache(client, key_prefix=prefix, model_name="m", ttl_s=60, metrics=metrics)
    try:
        await client.script_flush()  # the first lookup must load the script itself
        rng = np.random.default_rng(7)
        vectors = {f"k{i}": rng.standard_normal(8).astype(np.float32) for i in range(300)}
        await cache.store([(key, vector, 5) for key, vector in vectors.items()], "m")
        assert await client.hget(cache.redis_key("k0", 8), "tokens") == b"5"  # for readers' usage counts
        other_model = cache.redis_key("k1", 8)
        await client.hset(other_model, "model", "another-model")
        cut = cache.redis_key("k2", 8)
        await client.hset(cut, "vector", vectors["k2"].tobytes()[:12])
        wanted = [(key, 8) for key in vectors] + [("never-stored", 8), ("k3", 4)]
        found = await cache.lookup(wanted)
        assert len(found) == len(wanted)
        for (key, dim), vector in zip(wanted, found, strict=True):
            if key in {"k1", "k2", "never-stored"} or dim != 8:
                assert vector is None, key
            else:
                assert vector is not None and np.array_equal(vector, vectors[key]), key
        assert metrics.cache_invalid._value.get() == 2  # k1 and k2: present but not servable
        assert metrics.cache_hits._value.get() == 298  # 300 stored, less k1 and k2
        assert await client.ttl(cache.redis_key("k5", 8)) > 0
    finally:
        await drop_cache_prefix(client, prefix)
        await client.aclose()


# --- one rule for every reader: schemas/testdata/cache_entries.json in a real Redis ---------------

CASES: list[dict[str, Any]] = json.loads(CACHE_ENTRIES_FILE.read_text(encoding="utf-8"))["cases"]


async def write_case(client: redis_asyncio.Redis, key: str, case: dict[str, Any]) -> None:
    """Puts a case at ``key``: its HASH fields, or a key of another type, or nothing."""
    await client.delete(key)
    kind = case["redis_type"]
    if kind == "hash":
        await client.hset(key, mapping={k: bytes.fromhex(v) for k, v in case["fields_hex"].items()})
    elif kind == "string":
        await client.set(key, b"not a hash")
    elif kind == "list":
        await client.rpush(key, b"not", b"a", b"hash")
    elif kind == "set":
        await client.sadd(key, b"not a hash")
    else:
        assert kind == "none", kind


def by_model() -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for case in CASES:
        groups.setdefault((case["model"], case["dim"]), []).append(case)
    return groups


def served_vectors(case: dict[str, Any]) -> np.ndarray | None:
    return np.array(case["vector"], dtype=np.float32) if case["servable"] else None


@pytest.mark.parametrize("scripts", [True, False], ids=["lua", "pipeline"])
async def test_worker_serves_only_servable_entries_and_its_store_repairs_the_rest(
    redis_url: str, scripts: bool
) -> None:
    """Every case of the shared file in one batch per model: NaN, inf, wrong width or length, a
    missing field, another model, a STRING/LIST/SET at the key... each is a miss for that key only
    (the good entries of the same batch are served, no cache error), and the store that follows
    the computation replaces it (a wrong-typed key too), so the next lookup serves it."""
    prefix = f"test-cache-{uuid.uuid4().hex[:8]}"
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        for (model, dim), cases in by_model().items():
            metrics = WorkerMetrics()
            cache = VectorCache(client, key_prefix=prefix, model_name=model, ttl_s=60, metrics=metrics)
            cache._scripts = scripts  # the pipeline is what a cluster, or a server without Lua, gets
            for case in cases:
                await write_case(client, cache.redis_key(case["name"], dim), case)
            found = await cache.lookup([(case["name"], dim) for case in cases])
            for case, vector in zip(cases, found, strict=True):
                expected = served_vectors(case)
                if expected is None:
                    assert vector is None, case["name"]
                else:
                    assert vector is not None and vector.tolist() == expected.tolist(), case["name"]
            assert metrics.cache_errors.labels("lookup")._value.get() == 0 and cache.healthy
            bad = [case for case in cases if not case["servable"]]
            present = [case for case in bad if case["redis_type"] != "none"]
            assert metrics.cache_invalid._value.get() == len(present), model
            computed = {case["name"]: np.full(dim, 0.125, dtype=np.float32) for case in bad}
            await cache.store([(name, vector, 9) for name, vector in computed.items()], model)
            assert metrics.cache_errors.labels("store")._value.get() == 0 and cache.healthy
            again = await cache.lookup([(name, dim) for name in computed])
            for name, vector in zip(computed, again, strict=True):
                assert vector is not None and np.array_equal(vector, computed[name]), name
                assert await client.ttl(cache.redis_key(name, dim)) > 0, name
                assert await client.hget(cache.redis_key(name, dim), "tokens") == b"9", name
    finally:
        await drop_cache_prefix(client, prefix)
        await client.aclose()


@pytest.mark.parametrize("scripts", [True, False], ids=["lua", "pipeline"])
@pytest.mark.parametrize("wrong", ["string", "list"])
async def test_one_wrong_typed_key_does_not_fail_its_batch(redis_url: str, scripts: bool, wrong: str) -> None:
    prefix = f"test-cache-{uuid.uuid4().hex[:8]}"
    client = redis_asyncio.Redis.from_url(redis_url)
    metrics = WorkerMetrics()
    cache = VectorCache(client, key_prefix=prefix, model_name="m", ttl_s=60, metrics=metrics)
    cache._scripts = scripts
    try:
        vectors = {f"k{i}": np.full(8, i, dtype=np.float32) for i in range(50)}
        await cache.store([(key, vector, 1) for key, vector in vectors.items()], "m")
        await write_case(client, cache.redis_key("k25", 8), {"redis_type": wrong})
        found = await cache.lookup([(key, 8) for key in vectors])
        assert [key for key, v in zip(vectors, found, strict=True) if v is None] == ["k25"]
        assert cache.healthy and metrics.cache_errors.labels("lookup")._value.get() == 0
        # A store of the batch (the wrong-typed key among good ones) replaces it and fails nothing.
        await cache.store([(key, vector, 1) for key, vector in vectors.items()], "m")
        assert cache.healthy and metrics.cache_errors.labels("store")._value.get() == 0
        assert await client.type(cache.redis_key("k25", 8)) == b"hash"
        assert all(v is not None for v in await cache.lookup([(key, 8) for key in vectors]))
    finally:
        await drop_cache_prefix(client, prefix)
        await client.aclose()


async def test_python_client_reads_the_shared_cases_like_the_worker(redis_url: str) -> None:
    """The client (and the gateway, which looks up through it) serves exactly the servable cases,
    with their token counts, in one batch per model that holds wrong-typed keys too."""
    prefix = f"test-cache-{uuid.uuid4().hex[:8]}"
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        for (model, dim), cases in by_model().items():
            for case in cases:
                await write_case(client, vector_key(prefix, model, dim, case["name"]), case)
            reader = CacheReader(client, prefix=prefix, model_name=model)
            found = await reader.lookup([case["name"] for case in cases], dim)
            assert reader.errors == 0
            for case, cached in zip(cases, found, strict=True):
                expected = served_vectors(case)
                if expected is None:
                    assert cached is None, case["name"]
                else:
                    assert cached is not None and cached.vector.tolist() == expected.tolist(), case["name"]
                    assert cached.tokens == case["tokens"], case["name"]
    finally:
        await drop_cache_prefix(client, prefix)
        await client.aclose()


def test_go_client_reads_the_shared_cases_like_the_worker(redis_url: str) -> None:
    """producer/go/cache_test.go TestCacheEntriesInRedis: the same cases in this Redis, read by
    the Go client's lookup (one pipeline per model, wrong-typed keys included)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed")
    done = subprocess.run(
        [go, "test", "-count=1", "-v", "-run", "TestCacheEntries", "."],
        cwd=REPO_ROOT / "producer" / "go",
        env={**os.environ, "EMBEDFLEET_TEST_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "--- PASS: TestCacheEntriesInRedis" in done.stdout, done.stdout[-4000:]
    assert "--- PASS: TestCacheEntriesServable" in done.stdout, done.stdout[-4000:]


# --- a cache that cannot be reached: the cluster client's own exception fails open too ------------


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_an_unreachable_cache_fails_open_for_the_worker_and_the_client(scheme: str) -> None:
    """redis-py's cluster client raises RedisClusterUnreachableError, not a RedisError, when no
    node answers: the worker's start check, its cache and the client's reader all treat it as an
    outage (misses, counted), never as a crash."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}/0"
    assert await redis_login_problem(WorkerConfig.from_env({}, redis_url=url)) is None
    metrics = WorkerMetrics()
    cache = VectorCache(
        redis_client(url), key_prefix="p", model_name="m", ttl_s=0, metrics=metrics, retry_after_s=0
    )
    assert not await cache.ping()
    assert await cache.published_fingerprint("m") is None
    assert await cache.lookup([("k", 4)]) == [None]
    await cache.store([("k", np.ones(4, dtype=np.float32), 1)], "m")
    await cache.publish_model("m", {"fingerprint": "f"})
    await cache.close()
    assert {op: metrics.cache_errors.labels(op)._value.get() for op in ("lookup", "store")} == {
        "lookup": 1,
        "store": 1,
    }
    reader = CacheReader(
        connect(ClientConfig.from_env({}, redis_url=url)), prefix="p", model_name="m", retry_after_s=0
    )
    assert await reader.read_contract() is None
    assert await reader.lookup(["k"], 4) == [None]
    assert reader.errors == 2
    await reader.close()
