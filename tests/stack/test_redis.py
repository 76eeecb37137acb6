"""The local Redis Stack server has working vector search (RediSearch HNSW)."""

from __future__ import annotations

import uuid

import numpy as np
import redis.asyncio as redis
from redis.commands.search.field import VectorField
from redis.commands.search.index_definition import IndexDefinition, IndexType
from redis.commands.search.query import Query


async def test_hnsw_knn_finds_the_exact_neighbour_first(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    index = f"idx-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((1000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    try:
        await client.ft(index).create_index(
            [VectorField("vector", "HNSW", {"TYPE": "FLOAT32", "DIM": 384, "DISTANCE_METRIC": "COSINE"})],
            definition=IndexDefinition(prefix=[prefix], index_type=IndexType.HASH),  # type: ignore[no-untyped-call]
        )
        pipe = client.pipeline(transaction=False)
        for i, vector in enumerate(vectors):
            pipe.hset(f"{prefix}{i}", mapping={"vector": vector.tobytes()})
        await pipe.execute()

        for target in (0, 417, 999):
            probe = vectors[target] + 0.01 * rng.standard_normal(384).astype(np.float32)
            query = (
                Query("*=>[KNN 5 @vector $probe AS distance]")
                .sort_by("distance")
                .return_fields("distance")
                .dialect(2)
            )
            result = await client.ft(index).search(query, {"probe": probe.astype(np.float32).tobytes()})
            assert len(result.docs) == 5
            assert result.docs[0].id == f"{prefix}{target}"
            distances = [float(d.distance) for d in result.docs]
            assert distances == sorted(distances)
    finally:
        await client.ft(index).dropindex(delete_documents=True)
        await client.aclose()
