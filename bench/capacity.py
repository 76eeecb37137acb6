"""The numbers behind the README's capacity plan: what one cached vector costs Redis, what one
result costs Kafka, and the plan for a monthly workload, with the arithmetic printed.

    python bench/capacity.py                       # needs the local stack's Redis (make stack-up)
    python bench/capacity.py --redis-url redis+cluster://127.0.0.1:7000/0

Measured here: Redis bytes per cached vector (``MEMORY USAGE`` of the entries the workers write,
at 384 and 768 dimensions, and the server's used_memory growth, which includes the HNSW index);
Kafka bytes per result (a record batch of 256 results as the workers build it: JSON floats,
JSON base64, msgpack, uncompressed and with lz4/zstd). The per-core rates come from `make bench`
on this machine (given as options; see the README's Benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import uuid
from pathlib import Path

import numpy as np
from aiokafka.record.default_records import DefaultRecordBatchBuilder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import ContentType, EmbedResult, content_hash, encode_result
from worker.cache import VectorCache, drop_cache_prefix, redis_client
from worker.metrics import WorkerMetrics

SECONDS_PER_MONTH = 30 * 24 * 3600
CODECS = {"none": 0, "lz4": 3, "zstd": 4}


async def redis_bytes(url: str, dim: int, count: int) -> tuple[float, float]:
    """(MEMORY USAGE per entry, used_memory growth per entry) for ``count`` vectors of ``dim``."""
    client = redis_client(url, timeout_s=5)
    prefix = f"capacity-{uuid.uuid4().hex[:8]}"
    cache = VectorCache(client, key_prefix=prefix, model_name="all-MiniLM-L6-v2", ttl_s=30 * 24 * 3600,
                        metrics=WorkerMetrics())  # fmt: skip
    rng = np.random.default_rng(dim)
    try:
        await cache.ensure_index(dim)
        before = await used_memory(client)
        keys = [
            content_hash(f"text {i}", model_fingerprint="f" * 64, task=None, dimensions=None)
            for i in range(count)
        ]
        for start in range(0, count, 500):
            chunk = keys[start : start + 500]
            vectors = rng.standard_normal((len(chunk), dim)).astype(np.float32)
            await cache.store([(k, v, 12) for k, v in zip(chunk, vectors, strict=True)], "all-MiniLM-L6-v2")
        await asyncio.sleep(1)  # the index is built in the background
        after = await used_memory(client)
        sample = keys[:: max(1, count // 200)]
        usage = [await client.memory_usage(cache.redis_key(k, dim), samples=0) for k in sample]
        return float(np.mean([u for u in usage if u])), (after - before) / count
    finally:
        await drop_cache_prefix(client, prefix)
        await client.aclose()


async def used_memory(client: object) -> float:
    info = await client.info("memory")  # type: ignore[attr-defined]
    if isinstance(info, dict) and "used_memory" not in info:  # a cluster: one answer per node
        return float(sum(node["used_memory"] for node in info.values()))
    return float(info["used_memory"])


def kafka_bytes(dim: int, encoding: str, content_type: ContentType, codec: str) -> float:
    """Bytes per result in a record batch of 256, as the workers publish them (key = content hash,
    headers, value)."""
    rng = np.random.default_rng(1)
    builder = DefaultRecordBatchBuilder(2, CODECS[codec], 0, -1, -1, -1, 8 << 20)
    for i in range(256):
        vector = rng.standard_normal(dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        key = content_hash(f"text {i}", model_fingerprint="f" * 64, task=None, dimensions=None)
        result = EmbedResult.success(
            request_id=uuid.uuid4().hex,
            key=key,
            model="all-MiniLM-L6-v2",
            vector=vector,
            encoding_format=encoding,  # type: ignore[arg-type]
            tokens=12,
        )
        value = encode_result(result, content_type)
        headers = [("schema", b"1"), ("content-type", content_type.value.encode())]
        builder.append(0, timestamp=None, key=key.encode(), value=value, headers=headers)
    built: bytes = bytes(builder.build())
    return len(built) / 256


def plan(
    name: str,
    monthly: float,
    args: argparse.Namespace,
    redis_per_entry: float,
    kafka_per_result: float,
    kafka_per_result_small: float,
) -> None:
    average = monthly / SECONDS_PER_MONTH
    peak = average * args.peak_factor
    miss_share, hit_share = 1 - args.hit_ratio, args.hit_ratio
    misses, hits = peak * miss_share, peak * hit_share
    miss_cores, hit_cores = misses / args.miss_rate, hits / args.hit_rate
    workers = max(2, math.ceil((miss_cores + hit_cores) * 1.5))  # 50% headroom, 2 for availability
    partitions = max(6, 2 ** math.ceil(math.log2(workers * 2)))  # room to double the fleet
    entries = monthly * miss_share * args.ttl_days / 30
    redis_gb = entries * redis_per_entry / 1e9
    results_gb = monthly * kafka_per_result / 1e9
    small_gb = monthly * kafka_per_result_small / 1e9
    kept_gb = entries * kafka_per_result * 3 / 1e9  # compacted: one result per content hash, 3 replicas
    peak_mb = peak * kafka_per_result / 1e6
    brokers = max(3, math.ceil(3 * results_gb / args.broker_disk_gb_per_month))
    brokers_small = max(3, math.ceil(3 * small_gb / args.broker_disk_gb_per_month))
    lines = [
        f"\n## {name}: {monthly:,.0f} embeddings a month",
        f"- average {monthly:,.0f} / {SECONDS_PER_MONTH:,} s = {average:,.1f}/s; "
        f"peak x{args.peak_factor:g} = {peak:,.1f}/s",
        f"- misses at peak {peak:,.1f} x {miss_share:.2f} = {misses:,.1f}/s; "
        f"/ {args.miss_rate:g} per core = {miss_cores:,.2f} cores",
        f"- hits at peak {peak:,.1f} x {hit_share:.2f} = {hits:,.1f}/s; "
        f"/ {args.hit_rate:g} per core = {hit_cores:,.3f} cores",
        f"- workers (one per core, +50%, at least 2): {workers}; partitions of embed.requests: {partitions}",
        f"- Kafka writes: {monthly:,.0f} x {kafka_per_result:,.0f} B = {results_gb:,.1f} GB of results "
        f"a month as JSON floats ({small_gb:,.1f} GB as base64 + zstd), x3 replicas; "
        f"{peak_mb:,.2f} MB/s at peak",
        f"- Kafka keeps (embed.results compacted, one result per content hash, deleted after the TTL): "
        f"{entries:,.0f} x {kafka_per_result:,.0f} B x 3 = {kept_gb:,.1f} GB",
        f"- brokers (RF 3, {args.broker_disk_gb_per_month:g} GB written a month each): {brokers} "
        f"({brokers_small} with base64 + zstd results)",
        f"- Redis: {entries:,.0f} entries kept ({args.ttl_days} days TTL) x {redis_per_entry:,.0f} B "
        f"= {redis_gb:,.1f} GB (+ replicas: x2 = {2 * redis_gb:,.1f} GB)",
    ]
    print("\n".join(lines))


async def main_async(args: argparse.Namespace) -> int:
    print(f"# bench/capacity.py; Redis {args.redis_url}")
    print("\n| dim | MEMORY USAGE per entry (B) | used_memory growth per entry, with the index (B) |")
    print("|---|---|---|")
    per_entry: dict[int, float] = {}
    for dim in (384, 768):
        usage, growth = await redis_bytes(args.redis_url, dim, args.entries)
        per_entry[dim] = max(usage, growth)
        print(f"| {dim} | {usage:,.0f} | {growth:,.0f} |")
    print("\n| result form (384 dims) | none B | lz4 B | zstd B |\n|---|---|---|---|")
    forms = {
        "JSON, float": ("float", ContentType.JSON),
        "JSON, base64": ("base64", ContentType.JSON),
        "msgpack, base64": ("base64", ContentType.MSGPACK),
    }
    sizes: dict[str, float] = {}
    small: dict[str, float] = {}
    for label, (encoding, content_type) in forms.items():
        row = [kafka_bytes(384, encoding, content_type, codec) for codec in CODECS]
        sizes[label], small[label] = row[0], row[-1]
        print(f"| {label} | " + " | ".join(f"{v:,.0f}" for v in row) + " |")
    print(
        f"\nAssumptions: peak/average {args.peak_factor:g}, cache hit ratio {args.hit_ratio:g}, "
        f"per core {args.miss_rate:g} misses/s and {args.hit_rate:g} hits/s (make bench, this machine), "
        f"TTL {args.ttl_days} days, results as JSON floats (the default)"
    )
    for name, monthly in (("the design's workload", 45e6), ("100 times that", 4.5e9)):
        plan(name, monthly, args, per_entry[384], sizes["JSON, float"], small["JSON, base64"])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument(
        "--miss-rate",
        type=float,
        default=140.0,
        help="misses/s per worker core (queries): bench/gateway.py's fleet over Kafka, 277/s on 2 "
        "cores shared with Kafka, Redis, the gateway and the load",
    )
    parser.add_argument("--hit-rate", type=float, default=4200.0, help="hits/s per worker (make bench)")
    parser.add_argument("--peak-factor", type=float, default=5.0)
    parser.add_argument("--hit-ratio", type=float, default=0.3)
    parser.add_argument("--ttl-days", type=int, default=30)
    parser.add_argument("--broker-disk-gb-per-month", type=float, default=2000.0)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
