"""The vector cache against the real Redis Stack server: the lookup script reads what the store
wrote, and every entry that cannot be served (missing, another model or width, a cut vector) is
a miss; a server that has not loaded the script yet (SCRIPT FLUSH) is handled."""

import uuid

import numpy as np
import redis.asyncio as redis_asyncio

from worker.cache import VectorCache, drop_cache_prefix
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
