"""End-to-end benchmark of one worker through the real broker, all phases in one run.

    python bench/e2e.py [--unique 2000] [--hits 100000] [--mix 10000] [--latency-seconds 15]

Needs the local stack (`make stack-up`) and the default bundle (`make model`). Every phase uses
fresh topics and a fresh cache prefix, and a worker process of its own (all cores):

  a. engine alone: the same texts through `Embedder.embed` in-process, in micro-batches of the
     worker's size cap with the same model batch size and token budget (the ceiling)
  b. worker, unique texts: a backlog of distinct texts, all cache misses
  c. worker, all hits: a backlog cycling over the texts of (b), now cached; also the worker's peak RSS
  d. worker, natural mix: corpus queries in order, natural duplicates, cold cache
  e. latency: unique texts offered at half the capacity measured in (b)
  f. latency on hits: single texts of (b), cached, offered at half the capacity measured in (c)
  g. the texts of (b), cold cache, through two workers of one inference thread each (the other
     way to use the cores; informational: compare with b)

Throughput of a backlog phase = requests / (last result's timestamp - the moment the (first) worker joined
the group): the benchmark reads results only after the worker is done, so it never competes with
the worker for the two cores. Latency = result timestamp - request timestamp (same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis.asyncio as redis_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from schemas import EmbedRequest, encode_request, request_headers  # noqa: E402
from worker.cache import drop_cache_prefix  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402

BOOTSTRAP = os.environ.get("EMBEDFLEET_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
SHARED = Path(os.environ.get("EMBEDFLEET_SHARED", REPO.parent / "shared"))
EMBEDFLEET = str(Path(sys.executable).with_name("embedfleet"))
PY_SPY = str(Path(sys.executable).with_name("py-spy"))  # the bench extra installs it


@dataclass
class Phase:
    name: str
    requests: int
    seconds: float
    hit_rate: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    peak_rss_mb: float = float("nan")

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("nan")


def corpus_queries(limit: int, *, distinct: bool, skip: int = 0) -> list[str]:
    seen: set[str] = set()
    texts: list[str] = []
    with (SHARED / "corpus" / "queries.jsonl").open() as handle:
        for line in handle:
            text = json.loads(line)
            if distinct and text in seen:
                continue
            seen.add(text)
            texts.append(text)
    return texts[skip : skip + limit]


class Run:
    """One phase's fresh topics, cache prefix and worker."""

    def __init__(self, tag: str) -> None:
        slug = re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-")
        self.tag = f"{slug}-{uuid.uuid4().hex[:6]}"
        self.requests = f"embed.requests.bench-{self.tag}"
        self.results = f"embed.results.bench-{self.tag}"
        self.workers: list[subprocess.Popen[bytes]] = []
        self.metrics_port = 9490
        self.ready_at_ms = 0.0  # wall clock when the worker had joined the group

    async def create_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(self.requests, 6, 1),
                    NewTopic(self.results, 6, 1, topic_configs={"cleanup.policy": "compact"}),
                ]
            )
        finally:
            await admin.close()

    async def delete_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
        await admin.start()
        try:
            await admin.delete_topics([self.requests, self.results])
        finally:
            await admin.close()

    def start_worker(self, cache_prefix: str, *, workers: int = 1, **extra_env: str) -> None:
        """Starts `workers` worker processes of one group (each its own metrics port)."""
        env = dict(
            os.environ,
            EMBEDFLEET_REQUESTS_TOPIC=self.requests,
            EMBEDFLEET_RESULTS_TOPIC=self.results,
            EMBEDFLEET_GROUP_ID=f"bench-{self.tag}",
            EMBEDFLEET_CACHE_KEY_PREFIX=cache_prefix,
            EMBEDFLEET_LOG_LEVEL="WARNING",
            **extra_env,
        )
        for index in range(workers):
            port = self.metrics_port + index
            self.workers.append(
                subprocess.Popen(
                    [EMBEDFLEET, "worker", "--worker-id", f"bench-{self.tag}-{index}"],
                    env=dict(env, EMBEDFLEET_METRICS_PORT=str(port)),
                )
            )
        # The clock starts when the first worker is ready: work begins then (with several workers,
        # a small backlog may be drained before the last one has joined).
        deadline = time.monotonic() + 90
        pending = set(range(workers))
        while pending:
            for index in sorted(pending):
                if self._ready(self.metrics_port + index):
                    if len(pending) == workers:
                        self.ready_at_ms = time.time() * 1000
                    pending.discard(index)
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not become ready: see its log above")
            if pending:
                time.sleep(0.1)

    def start_profiler(self, output: Path) -> subprocess.Popen[bytes]:
        """py-spy sampling the (first) worker: collapsed stacks, one line per stack and count."""
        pid = str(self.workers[0].pid)
        argv = [PY_SPY, "record", "--pid", pid, "--rate", "250", "--format", "raw"]
        return subprocess.Popen([*argv, "--output", str(output), "--nonblocking"])

    @staticmethod
    def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(timeout=60)

    @staticmethod
    def _ready(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def peak_rss_mb(self) -> float:
        """The largest peak RSS of the workers."""
        peaks = [float("nan")]
        for worker in self.workers:
            for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return max(peaks[1:], default=float("nan"))

    def metric(self, name: str) -> float:
        """A metric summed over every worker."""
        total = 0.0
        for index in range(len(self.workers)):
            url = f"http://127.0.0.1:{self.metrics_port + index}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                text = r.read().decode()
            total += sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(name + " ") or line.startswith(name + "{")
            )
        return total

    def stop_worker(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.wait(timeout=120)

    async def produce(self, texts: list[str], *, rate: float | None = None) -> None:
        """Produces one request per text, id = its index (optionally paced to `rate` per second)."""
        # Paced (latency phases): no linger, so a request's timestamp is when it leaves the client.
        producer = AIOKafkaProducer(
            bootstrap_servers=BOOTSTRAP,
            acks="all",
            linger_ms=5 if rate is None else 0,
            max_batch_size=512 * 1024,
        )
        await producer.start()
        headers = request_headers()
        try:
            for _ in range(50):  # a topic created a moment ago takes a moment to appear in metadata
                try:
                    await producer.partitions_for(self.requests)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            started = time.perf_counter()
            for index, text in enumerate(texts):
                value = encode_request(EmbedRequest(id=str(index), text=text), limits=None)
                await producer.send(self.requests, value, headers=headers)
                if rate is not None:  # each request at its own time, not in bursts
                    ahead = (index + 1) / rate - (time.perf_counter() - started)
                    if ahead > 0.0005:
                        await asyncio.sleep(ahead)
            await producer.flush()
        finally:
            await producer.stop()

    async def collect(self, count: int, timeout_s: float) -> tuple[list[int], list[int], int]:
        """Reads `count` results: (request timestamps, result timestamps, cached count)."""
        request_ts = await self._timestamps(self.requests, count, timeout_s)
        consumer = AIOKafkaConsumer(
            self.results, bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        result_ts: dict[str, int] = {}
        cached = 0
        deadline = time.monotonic() + timeout_s
        try:
            while len(result_ts) < count and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                    for record in records:
                        result = json.loads(record.value)
                        if result["id"] not in result_ts:
                            result_ts[result["id"]] = record.timestamp
                            cached += bool(result.get("cached"))
        finally:
            await consumer.stop()
        if len(result_ts) < count:
            raise SystemExit(f"only {len(result_ts)} of {count} results arrived within {timeout_s:.0f}s")
        ordered_results = [result_ts[str(i)] for i in range(count)]
        return request_ts, ordered_results, cached

    async def _timestamps(self, topic: str, count: int, timeout_s: float) -> list[int]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        stamps: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(stamps) < count and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                    for record in records:
                        stamps[json.loads(record.value)["id"]] = record.timestamp
        finally:
            await consumer.stop()
        return [stamps[str(i)] for i in range(count)]

    async def wait_drained(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.metric("embedfleet_requests_total") < count:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the worker answered {self.metric('embedfleet_requests_total'):.0f} "
                    f"of {count} within {timeout_s:.0f}s"
                )
            await asyncio.sleep(0.5)


async def backlog_phase(
    name: str,
    texts: list[str],
    cache_prefix: str,
    *,
    timeout_s: float = 900,
    workers: int = 1,
    profile: Path | None = None,
    **worker_env: str,
) -> Phase:
    run = Run(name)
    await run.create_topics()
    try:
        await run.produce(texts)  # the backlog exists before the worker starts
        run.start_worker(cache_prefix, workers=workers, **worker_env)
        spy = run.start_profiler(profile) if profile is not None else None
        await run.wait_drained(len(texts), timeout_s)
        if spy is not None:
            run.stop_profiler(spy)
        rss = run.peak_rss_mb()
        run.stop_worker()
        _, result_ts, cached = await run.collect(len(texts), timeout_s=120)
        # The backlog was there before the worker: from its joining the group to its last result.
        seconds = (max(result_ts) - run.ready_at_ms) / 1000
        return Phase(name, len(texts), seconds, hit_rate=cached / len(texts), peak_rss_mb=rss)
    finally:
        run.stop_worker()
        await run.delete_topics()


async def latency_phase(
    texts: list[str], rate: float, cache_prefix: str, name: str = "e. latency at half capacity"
) -> Phase:
    run = Run("latency")
    await run.create_topics()
    try:
        run.start_worker(cache_prefix)
        started = time.perf_counter()
        await run.produce(texts, rate=rate)
        await run.wait_drained(len(texts), timeout_s=300)
        seconds = time.perf_counter() - started
        run.stop_worker()
        request_ts, result_ts, cached = await run.collect(len(texts), timeout_s=120)
        latency = np.array(result_ts) - np.array(request_ts)
        return Phase(
            name,
            len(texts),
            seconds,
            hit_rate=cached / len(texts),
            p50_ms=float(np.percentile(latency, 50)),
            p99_ms=float(np.percentile(latency, 99)),
        )
    finally:
        run.stop_worker()
        await run.delete_topics()


def engine_phase(texts: list[str], config: WorkerConfig) -> tuple[Phase, float]:
    """The engine in the worker's own setup: the same model calls side by side with the same
    threads each, micro-batches of max_batch_size in arrival order, each length-sorted and cut by
    the same batch size and token budget."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.engine.embedder import Embedder, physical_cpu_count

    calls, per_call = config.model_threads(physical_cpu_count())
    embedder = Embedder.from_bundle(config.model, variant=config.variant, intra_op_threads=per_call)

    def embed(batch: list[str]) -> object:
        return embedder.embed(
            batch, batch_size=config.inference_batch_size, token_budget=config.inference_token_budget
        )

    embed(texts[:64])
    size = config.max_batch_size
    chunks = [texts[start : start + size] for start in range(0, len(texts), size)]
    with ThreadPoolExecutor(max_workers=calls) as pool:
        started = time.perf_counter()
        list(pool.map(embed, chunks))
        seconds = time.perf_counter() - started
    # One batch's inference time: a full model batch of typical texts, as one call runs it.
    batch = texts[: config.inference_batch_size]
    timings = []
    for _ in range(5):
        t0 = time.perf_counter()
        embed(batch)
        timings.append(time.perf_counter() - t0)
    phase = Phase(f"a. engine alone ({calls}x{per_call} threads)", len(texts), seconds)
    return phase, float(np.median(timings))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unique", type=int, default=2000)
    parser.add_argument("--hits", type=int, default=100_000)
    parser.add_argument("--mix", type=int, default=10_000)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--profile-hits",
        type=Path,
        default=None,
        metavar="FILE",
        help="py-spy's collapsed stacks of the worker draining the hits backlog (needs py-spy)",
    )
    parser.add_argument(
        "--hit-rates",
        default="",
        metavar="R1,R2",
        help="also measure latency on hits at these fixed rates (requests/s), e.g. 100,1000",
    )
    args = parser.parse_args()
    config = WorkerConfig.from_env()
    run_id = uuid.uuid4().hex[:8]
    unique = corpus_queries(args.unique, distinct=True)
    print(
        f"bench/e2e.py: model {config.model} ({config.variant}), window {config.batch_window_ms} ms, "
        f"token budget {config.token_budget}, inference batch {config.inference_batch_size}, "
        f"{os.cpu_count()} cores",
        flush=True,
    )

    engine, batch_seconds = await asyncio.to_thread(engine_phase, unique, config)
    print(f"  {engine.name}: {engine.throughput:.0f} texts/s", flush=True)
    misses = await backlog_phase("b. worker, unique texts", unique, f"bench-{run_id}-b")
    print(f"  {misses.name}: {misses.throughput:.0f} results/s", flush=True)
    # The other way to use the machine's cores: two workers of one inference thread each.
    two_workers = await backlog_phase(
        "g. 2 workers x 1 thread, unique",
        unique,
        f"bench-{run_id}-g",
        workers=2,
        EMBEDFLEET_INFERENCE_THREADS="1",
        EMBEDFLEET_INTRA_OP_THREADS="1",
    )
    print(
        f"  {two_workers.name}: {two_workers.throughput:.0f} results/s "
        f"({two_workers.throughput / misses.throughput:.2f} x one worker with "
        f"{config.model_threads(os.cpu_count() or 1)[0]} inference threads)",
        flush=True,
    )
    # The latency and mix phases run before the 100k-message phase: the broker compacts and deletes
    # that phase's ~800 MB of results afterwards, which would disturb whatever runs next.
    rate = misses.throughput / 2
    latency_texts = corpus_queries(int(rate * args.latency_seconds), distinct=True, skip=args.unique)
    latency = await latency_phase(latency_texts, rate, f"bench-{run_id}-e")
    print(f"  {latency.name}: p50 {latency.p50_ms:.0f} ms, p99 {latency.p99_ms:.0f} ms", flush=True)
    mix_texts = corpus_queries(args.mix, distinct=False, skip=20_000)
    mix = await backlog_phase("d. worker, natural mix", mix_texts, f"bench-{run_id}-d")
    print(f"  {mix.name}: {mix.throughput:.0f} results/s, hit rate {mix.hit_rate:.1%}", flush=True)
    hits_texts = [unique[i % len(unique)] for i in range(args.hits)]
    hits = await backlog_phase(
        "c. worker, all cache hits", hits_texts, f"bench-{run_id}-b", profile=args.profile_hits
    )
    print(f"  {hits.name}: {hits.throughput:.0f} results/s, peak RSS {hits.peak_rss_mb:.0f} MB", flush=True)

    # Single-text requests that hit the cache (the texts of b, cached there), at half the hit rate.
    hit_rate = hits.throughput / 2
    hit_texts = [unique[i % len(unique)] for i in range(int(hit_rate * args.latency_seconds))]
    hit_latency = await latency_phase(
        hit_texts, hit_rate, f"bench-{run_id}-b", "f. latency on hits, half capacity"
    )
    print(
        f"  {hit_latency.name}: p50 {hit_latency.p50_ms:.1f} ms, p99 {hit_latency.p99_ms:.1f} ms", flush=True
    )
    for fixed in [float(r) for r in args.hit_rates.split(",") if r.strip()]:
        texts = [unique[i % len(unique)] for i in range(int(fixed * args.latency_seconds))]
        at_rate = await latency_phase(texts, fixed, f"bench-{run_id}-b", f"hits at {fixed:.0f}/s")
        print(f"  latency on hits at {fixed:.0f}/s: p50 {at_rate.p50_ms:.1f} ms, p99 {at_rate.p99_ms:.1f} ms")

    bound_ms = 3 * (config.batch_window_ms + batch_seconds * 1000)
    print()
    print(
        f"{'phase':34} {'requests':>9} {'results/s':>10} {'hit rate':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'peak RSS MB':>12}"
    )
    for phase in (engine, misses, two_workers, hits, mix, latency, hit_latency):
        print(
            f"{phase.name:34} {phase.requests:9d} {phase.throughput:10.0f} {phase.hit_rate:9.1%} "
            f"{phase.p50_ms:8.0f} {phase.p99_ms:8.0f} {phase.peak_rss_mb:12.0f}"
        )
    print()
    # The targets of issue 12; a check passes when value >= target.
    checks = [
        ("unique texts: worker / engine alone (same settings)", misses.throughput / engine.throughput, 0.90),
        ("all hits: results/s per worker", hits.throughput, 25_000.0),
        ("hit latency: 5 ms / p50 (p50 <= 5 ms)", 5.0 / hit_latency.p50_ms, 1.0),
        ("hit latency: 20 ms / p99 (p99 <= 20 ms)", 20.0 / hit_latency.p99_ms, 1.0),
        (
            f"miss latency: 3 x (window + batch of {config.inference_batch_size}: "
            f"{batch_seconds * 1000:.0f} ms) = {bound_ms:.0f} ms / p99",
            bound_ms / latency.p99_ms,
            1.0,
        ),
        (
            f"peak worker RSS <= 500 MB with a {args.hits}-message backlog: 500 / RSS",
            500 / hits.peak_rss_mb,
            1.0,
        ),
    ]
    for label, value, target in checks:
        print(f"{'PASS' if value >= target else 'FAIL'}  {label}: {value:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        phases = [
            {
                "name": phase.name,
                "requests": phase.requests,
                "results_per_s": phase.throughput,
                "hit_rate": phase.hit_rate,
                "p50_ms": phase.p50_ms,
                "p99_ms": phase.p99_ms,
                "peak_rss_mb": phase.peak_rss_mb,
            }
            for phase in (engine, misses, two_workers, hits, mix, latency, hit_latency)
        ]
        checks_json = [{"label": lb, "value": v, "target": t} for lb, v, t in checks]
        args.json.write_text(json.dumps({"phases": phases, "checks": checks_json}, indent=2, default=str))
    client = redis_asyncio.Redis.from_url(config.redis_url)
    for phase_prefix in ("b", "d", "e", "g"):
        await drop_cache_prefix(client, f"bench-{run_id}-{phase_prefix}")
    await client.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
