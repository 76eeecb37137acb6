"""Client throughput: the Python client (cold and warm cache) against a naive one-at-a-time client.

    python bench/clients.py                 # starts two workers on fresh topics, then measures
    python bench/clients.py --use-running   # measures a fleet you started (make stack-up + workers)

Needs the local stack (`make stack-up`) and the model bundle (`make model`). The cold run embeds
--texts distinct corpus queries through the fleet (every one computed); the warm run asks for the
same texts again (the client's Redis lookup answers them: nothing is produced); the naive client
produces one request and waits for its result before the next (no cache read, no batching on the
client), measured on --naive-texts other queries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as redis_asyncio
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from producer import Client, ClientConfig
from worker.cache import drop_cache_prefix

REPO = Path(__file__).resolve().parent.parent
EMBEDFLEET = str(Path(sys.executable).with_name("embedfleet"))


@dataclass(frozen=True)
class Row:
    name: str
    texts: int
    seconds: float
    produced: int

    @property
    def rate(self) -> float:
        return self.texts / self.seconds


def distinct_queries(path: Path, count: int) -> list[str]:
    seen: dict[str, None] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)
            if text.strip():
                seen.setdefault(text, None)
            if len(seen) >= count:
                break
    if len(seen) < count:
        raise SystemExit(f"{path} has only {len(seen)} distinct queries")
    return list(seen)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_workers(env: dict[str, str], count: int, log_dir: Path, tag: str) -> list[subprocess.Popen[bytes]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    for index in range(count):
        with (log_dir / f"bench-worker-{index}.log").open("wb") as log:
            workers.append(
                subprocess.Popen(
                    [
                        EMBEDFLEET,
                        "worker",
                        "--worker-id",
                        f"bench-{tag}-{index}",
                        "--metrics-port",
                        str(free_port()),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            )
    return workers


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


@contextlib.asynccontextmanager
async def own_fleet(args: argparse.Namespace) -> AsyncIterator[dict[str, str]]:
    """Workers on fresh topics and a fresh cache prefix, so the cold run really is cold."""
    tag = uuid.uuid4().hex[:8]
    names = {
        "EMBEDFLEET_REQUESTS_TOPIC": f"embed.requests.bench-{tag}",
        "EMBEDFLEET_RESULTS_TOPIC": f"embed.results.bench-{tag}",
        "EMBEDFLEET_DLQ_TOPIC": f"embed.requests.dlq.bench-{tag}",
        "EMBEDFLEET_GROUP_ID": f"embedfleet-bench-{tag}",
        "EMBEDFLEET_CACHE_KEY_PREFIX": f"embedfleet-bench-{tag}",
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap)
    await admin.start()
    topics = [
        NewTopic(names["EMBEDFLEET_REQUESTS_TOPIC"], 6, 1),
        NewTopic(names["EMBEDFLEET_RESULTS_TOPIC"], 6, 1, topic_configs={"cleanup.policy": "compact"}),
        NewTopic(names["EMBEDFLEET_DLQ_TOPIC"], 1, 1),
    ]
    await admin.create_topics(topics)
    env = {
        **os.environ,
        **names,
        "EMBEDFLEET_KAFKA_BOOTSTRAP": args.bootstrap,
        "EMBEDFLEET_REDIS_URL": args.redis_url,
        "EMBEDFLEET_INTRA_OP_THREADS": str(args.threads),
    }
    if args.model:
        env["EMBEDFLEET_MODEL"] = args.model
    workers = start_workers(env, args.workers, Path(args.log_dir), tag)
    try:
        yield names
    finally:
        await asyncio.to_thread(stop_workers, workers)
        await admin.delete_topics([t.name for t in topics])
        await admin.close()
        cache = redis_asyncio.Redis.from_url(args.redis_url)
        await drop_cache_prefix(cache, names["EMBEDFLEET_CACHE_KEY_PREFIX"])
        await cache.aclose()


def chunks(texts: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


async def pipelined(client: Client, texts: Sequence[str], batch: int, in_flight: int) -> None:
    """The client as `embedfleet produce` uses it: calls of `batch` texts, `in_flight` at once."""
    slots = asyncio.Semaphore(in_flight)

    async def one(part: Sequence[str]) -> None:
        async with slots:
            await client.embed(part, timeout=300)

    await asyncio.gather(*(one(part) for part in chunks(texts, batch)))


async def timed(name: str, client: Client, texts: Sequence[str], work: Awaitable[None]) -> Row:
    produced = client.stats.produced
    started = time.perf_counter()
    await work
    return Row(name, len(texts), time.perf_counter() - started, client.stats.produced - produced)


async def wait_for_fleet(config: ClientConfig, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    async with Client(config, use_cache=False) as probe:
        while True:
            try:
                await probe.embed([f"warm-up {uuid.uuid4().hex}"], timeout=10)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise


async def measure(args: argparse.Namespace, topics: dict[str, str]) -> list[Row]:
    config = ClientConfig.from_env(
        kafka_bootstrap=args.bootstrap,
        redis_url=args.redis_url,
        requests_topic=topics.get("EMBEDFLEET_REQUESTS_TOPIC"),
        results_topic=topics.get("EMBEDFLEET_RESULTS_TOPIC"),
        cache_key_prefix=topics.get("EMBEDFLEET_CACHE_KEY_PREFIX"),
    )
    await wait_for_fleet(config)
    texts = distinct_queries(Path(args.corpus), args.texts + args.naive_texts)
    bulk, naive_texts = texts[: args.texts], texts[args.texts :]
    rows = []
    async with Client(config, linger_ms=0, use_cache=False) as naive:

        async def one_by_one() -> None:
            for text in naive_texts:
                await naive.embed([text], timeout=60)

        rows.append(await timed("naive (1 in flight)", naive, naive_texts, one_by_one()))
    async with Client(config) as client:
        rows.append(
            await timed(
                "client, cold cache", client, bulk, pipelined(client, bulk, args.batch, args.in_flight)
            )
        )
        rows.append(
            await timed(
                "client, warm cache", client, bulk, pipelined(client, bulk, args.batch, args.in_flight)
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    base = rows[0].rate
    lines = [f"{'mode':<22}{'texts':>8}{'seconds':>10}{'texts/s':>11}{'produced':>10}{'x naive':>10}"]
    for row in rows:
        lines.append(
            f"{row.name:<22}{row.texts:>8}{row.seconds:>10.2f}{row.rate:>11,.0f}"
            f"{row.produced:>10}{row.rate / base:>10.1f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=20_000, help="distinct queries for the bulk runs")
    parser.add_argument("--naive-texts", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512, help="texts per client call")
    parser.add_argument("--in-flight", type=int, default=8, help="client calls at once")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per worker")
    parser.add_argument(
        "--use-running",
        action="store_true",
        help="measure the fleet on the default topics instead of starting workers",
    )
    parser.add_argument("--bootstrap", default=os.environ.get("EMBEDFLEET_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument(
        "--redis-url", default=os.environ.get("EMBEDFLEET_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--model", default=os.environ.get("EMBEDFLEET_MODEL"), help="bundle directory")
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus" / "queries.jsonl"))
    parser.add_argument("--log-dir", default="/tmp/embedfleet-bench")
    args = parser.parse_args()

    async def run() -> list[Row]:
        if args.use_running:
            return await measure(args, {})
        async with own_fleet(args) as topics:
            return await measure(args, topics)

    rows = asyncio.run(run())
    print(f"{args.workers if not args.use_running else 'running'} workers, {os.cpu_count()} CPUs")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
