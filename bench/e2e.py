"""End-to-end benchmark of one worker through the real broker, judged by a ceiling of the same run.

All phases run in one run.

    python bench/e2e.py [--unique 2000] [--hits 100000] [--mix 10000] [--latency-seconds 20]
        [--latency-min-requests 10000] [--g-seconds 60] [--hit-rates R1,R2] [--json FILE]

Needs the local stack (`make stack-up`) and the default bundle (`make model`). Every phase uses
fresh topics and a fresh cache prefix, and a worker process of its own (all cores). The ceiling is
bench/relay.py: the least work any aiokafka worker can do (consume, produce one pre-encoded result of
the worker's size and form per request, commit after the acks), a separate process like the worker.

  a. engine alone: the same texts through `Embedder.embed` in-process, in micro-batches of the
     worker's size cap with the same model batch size and token budget (the ceiling for misses)
  b. worker, unique texts: a backlog of distinct texts, all cache misses
  e. miss latency: unique texts offered at half the capacity measured in (b)
  d. worker, natural mix: corpus queries in order, natural duplicates, cold cache
  c. all hits, float: a backlog of --hits requests cycling over the texts of (b), now cached,
     through the worker (also its peak RSS), and the same backlog form through the relay
  f. latency on hits: single texts of (b), cached, offered at half the worker's capacity in (c)
     to the worker, then at the same rate to the relay
  c64. all hits, base64: as (c) with `encoding_format: "base64"`, worker and relay
  g. two workers of one inference thread each (the other way to use the cores; informational,
     compared with b) on distinct texts sized to --g-seconds of work at (b)'s rate, cold cache

Throughput of a backlog phase = results / (last result's timestamp - the moment the worker, or
the relay, had joined the group with partitions; for g, the moment both workers had, counting
only results appended since): the benchmark reads results only after the worker is done, so it
never competes with it for the cores. The results topics use LogAppendTime: a result's timestamp
is when the broker appended it (after the worker's produce request reached it). Latency = that
timestamp - the request's CreateTime (the paced producer sends each request at its own time,
without linger; same host clock); a latency phase's results/s is the rate offered. Each worker
phase also reports the worker's embedfleet_publish_retries_total.

Targets (PASS when value >= target; `--json` writes them as checks for bench/summary.py): worker /
engine alone on unique texts >= 0.9; all hits, worker results/s / relay messages/s >= 0.6 for float
and for base64; hit latency at half the worker's float hit capacity: worker p50 <= relay p50 + 2 ms
and worker p99 <= 20 ms; miss latency at half the miss capacity: p99 <= 3 x (window + one model
batch's inference time); peak worker RSS <= 500 MB with the --hits backlog. Phase g has no target.
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
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import redis.asyncio as redis_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from schemas import EmbedRequest, encode_request, request_headers  # noqa: E402
from worker.cache import drop_cache_prefix  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.engine.cpu import read_cpu  # noqa: E402

BOOTSTRAP = os.environ.get("EMBEDFLEET_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
SHARED = Path(os.environ.get("EMBEDFLEET_SHARED", REPO.parent / "shared"))
EMBEDFLEET = str(Path(sys.executable).with_name("embedfleet"))
PY_SPY = str(Path(sys.executable).with_name("py-spy"))  # the bench extra installs it
RELAY = str(Path(__file__).resolve().with_name("relay.py"))
LOG_APPEND_TIME = 1  # a record's timestamp_type when the topic stamps it on append
# How often readiness is polled, the worker's and the relay's alike: the clock of a backlog phase
# starts when it is seen (a 100k base64 backlog takes the relay under 2 s).
READY_POLL_S = 0.02


class _Seen(msgspec.Struct):
    """What the benchmark reads of a request or result (msgspec skips the vector)."""

    id: str | None = None
    cached: bool = False


_SEEN = msgspec.json.Decoder(_Seen)


@dataclass
class Phase:
    name: str
    requests: int
    seconds: float
    hit_rate: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    peak_rss_mb: float = float("nan")
    retries: float = float("nan")  # embedfleet_publish_retries_total of the worker(s)
    relay: Phase | None = None  # the relay on the same workload

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("nan")

    def as_json(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "name": self.name,
            "requests": self.requests,
            "results_per_s": self.throughput,
            "hit_rate": self.hit_rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "peak_rss_mb": self.peak_rss_mb,
            "publish_retries": self.retries,
        }
        if self.relay is not None:
            figures["relay"] = self.relay.as_json()
        return figures


@dataclass
class Check:
    """A target: passes when value >= target (what bench/summary.py reads)."""

    label: str
    value: float
    target: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.value >= self.target)


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


def bundle_identity(config: WorkerConfig) -> tuple[str, int]:
    """The model name and dimensions the worker writes in its results (for the relay's)."""
    try:
        manifest = json.loads((Path(config.model) / "manifest.json").read_text())
        return str(manifest["name"]), int(manifest["dim"])
    except (OSError, KeyError, ValueError):
        return Path(config.model).name, 384


class Run:
    """One phase's fresh topics, cache prefix and worker(s) or relay."""

    relay_model: tuple[str, int] = ("all-MiniLM-L6-v2", 384)

    def __init__(self, tag: str) -> None:
        slug = re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-")
        self.tag = f"{slug}-{uuid.uuid4().hex[:6]}"
        self.requests = f"embed.requests.bench-{self.tag}"
        self.results = f"embed.results.bench-{self.tag}"
        self.group = f"bench-{self.tag}"
        self.workers: list[subprocess.Popen[bytes]] = []
        self.relay: subprocess.Popen[bytes] | None = None
        self.metrics_port = 9490
        self.ready_at_ms = 0.0  # wall clock when the (first) worker or the relay had joined the group
        self.all_ready_at_ms = 0.0  # wall clock when every worker was ready at once

    async def create_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(self.requests, 6, 1),
                    NewTopic(
                        self.results,
                        6,
                        1,
                        topic_configs={
                            "cleanup.policy": "compact",
                            # A result's timestamp is when the broker appended it, not when the
                            # worker's producer built its batch (which is before the ack).
                            "message.timestamp.type": "LogAppendTime",
                        },
                    ),
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
            EMBEDFLEET_GROUP_ID=self.group,
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
        # ready_at_ms: the first worker is ready (work begins then). all_ready_at_ms: every worker
        # answered ready in one round of polls, so the rebalance a second worker causes is over
        # (a worker is unready from its revoke to its next assignment).
        deadline = time.monotonic() + 90
        while True:
            ready = [self._ready(self.metrics_port + index) for index in range(workers)]
            now_ms = time.time() * 1000
            if any(ready) and not self.ready_at_ms:
                self.ready_at_ms = now_ms
            if all(ready):
                self.all_ready_at_ms = now_ms
                return
            for worker in self.workers:
                if worker.poll() is not None:
                    raise SystemExit(f"a worker exited with {worker.returncode}: see its log above")
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not become ready: see its log above")
            time.sleep(READY_POLL_S)

    def start_relay(self, *extra: str) -> None:
        """bench/relay.py as a process of its own on this phase's topics; ready_at_ms is when it
        has joined the group with partitions (polled as often as the worker's /readyz)."""
        name, dim = self.relay_model
        ready_file = Path(tempfile.gettempdir()) / f"embedfleet-relay-{self.tag}.ready"
        ready_file.unlink(missing_ok=True)
        argv = [sys.executable, RELAY, "--requests", self.requests, "--results", self.results]
        argv += ["--group", self.group, "--bootstrap", BOOTSTRAP, "--ready-file", str(ready_file)]
        argv += ["--model-name", name, "--dim", str(dim), *extra]
        self.relay = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        try:
            while not ready_file.exists():
                if self.relay.poll() is not None:
                    raise SystemExit(f"the relay exited with {self.relay.returncode}: see its log above")
                if time.monotonic() > deadline:
                    raise SystemExit("the relay did not become ready: see its log above")
                time.sleep(READY_POLL_S)
            self.ready_at_ms = self.all_ready_at_ms = time.time() * 1000
        finally:
            ready_file.unlink(missing_ok=True)

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

    def stop(self) -> None:
        """Stops the workers and the relay (SIGTERM: each finishes what is in flight)."""
        processes = [*self.workers, *([self.relay] if self.relay is not None else [])]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=120)

    async def produce(
        self, texts: list[str], *, rate: float | None = None, encoding_format: str = "float"
    ) -> None:
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
        fmt: Any = encoding_format
        try:
            for _ in range(50):  # a topic created a moment ago takes a moment to appear in metadata
                try:
                    await producer.partitions_for(self.requests)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            started = time.perf_counter()
            for index, text in enumerate(texts):
                request = EmbedRequest(id=str(index), text=text, encoding_format=fmt)
                await producer.send(self.requests, encode_request(request, limits=None), headers=headers)
                if rate is not None:  # each request at its own time, not in bursts
                    ahead = (index + 1) / rate - (time.perf_counter() - started)
                    if ahead > 0.0005:
                        await asyncio.sleep(ahead)
            await producer.flush()
        finally:
            await producer.stop()

    async def collect(self, count: int, timeout_s: float) -> tuple[list[int], list[int], int]:
        """Reads `count` results: (request CreateTimes, result LogAppendTimes, cached count)."""
        request_ts = await self._timestamps(self.requests, count, timeout_s)
        result_ts: dict[str, int] = {}
        cached = 0
        async for record in _records(self.results, lambda: len(result_ts) >= count, timeout_s):
            if record.timestamp_type != LOG_APPEND_TIME:
                raise SystemExit(f"{self.results} does not stamp LogAppendTime: the latencies would be wrong")
            seen = _SEEN.decode(record.value)
            if seen.id is not None and seen.id not in result_ts:
                result_ts[seen.id] = record.timestamp
                cached += seen.cached
        if len(result_ts) < count:
            raise SystemExit(f"only {len(result_ts)} of {count} results arrived within {timeout_s:.0f}s")
        return request_ts, [result_ts[str(i)] for i in range(count)], cached

    async def _timestamps(self, topic: str, count: int, timeout_s: float) -> list[int]:
        stamps: dict[str, int] = {}
        async for record in _records(topic, lambda: len(stamps) >= count, timeout_s):
            seen = _SEEN.decode(record.value)
            if seen.id is not None:
                stamps[seen.id] = record.timestamp
        return [stamps[str(i)] for i in range(count)]

    async def _committed(self, admin: AIOKafkaAdminClient) -> int:
        """The group's committed offsets, summed (the requests it has answered: offsets start at 0)."""
        offsets = await admin.list_consumer_group_offsets(self.group)
        return sum(max(0, o.offset) for o in offsets.values())

    async def wait_drained(self, count: int, timeout_s: float) -> None:
        """Until the worker has answered `count` requests (its metrics), or the relay has
        committed `count` offsets (the group's committed offsets: it commits after the acks)."""
        deadline = time.monotonic() + timeout_s
        if self.relay is not None:
            admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
            await admin.start()
            try:
                while (done := await self._committed(admin)) < count:
                    if self.relay.poll() is not None:
                        raise SystemExit(f"the relay exited with {self.relay.returncode}")
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the relay committed {done} of {count} within {timeout_s:.0f}s")
                    await asyncio.sleep(0.5)
            finally:
                await admin.close()
            return
        while self.metric("embedfleet_requests_total") < count:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the worker answered {self.metric('embedfleet_requests_total'):.0f} "
                    f"of {count} within {timeout_s:.0f}s"
                )
            await asyncio.sleep(0.5)


async def _records(topic: str, done: Any, timeout_s: float) -> Any:
    """Every record of `topic` from the start, until done() or the timeout."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=BOOTSTRAP,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not done() and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=20_000)).values():
                for record in records:
                    yield record
    finally:
        await consumer.stop()


def settle() -> None:
    """Writes back what the broker has written so far (a 100k-result phase leaves ~800 MB of dirty
    pages whose writeback would otherwise land in the next phase)."""
    started = time.perf_counter()
    os.sync()
    time.sleep(max(0.0, 2.0 - (time.perf_counter() - started)))


async def backlog_phase(
    name: str,
    texts: list[str],
    cache_prefix: str,
    *,
    relay: bool = False,
    encoding_format: str = "float",
    timeout_s: float = 900,
    workers: int = 1,
    profile: Path | None = None,
    **worker_env: str,
) -> Phase:
    """The backlog exists before the worker (or relay) starts; from its joining the group (for
    several workers: all of them, counting only the results appended since) to its last result."""
    run = Run(name)
    await run.create_topics()
    try:
        await run.produce(texts, encoding_format=encoding_format)
        spy = None
        if relay:
            run.start_relay()
        else:
            run.start_worker(cache_prefix, workers=workers, **worker_env)
            spy = run.start_profiler(profile) if profile is not None else None
        await run.wait_drained(len(texts), timeout_s)
        if spy is not None:
            run.stop_profiler(spy)
        rss = run.peak_rss_mb() if not relay else float("nan")
        retries = run.metric("embedfleet_publish_retries_total") if not relay else float("nan")
        run.stop()
        _, result_ts, cached = await run.collect(len(texts), timeout_s=300)
        start_ms = run.all_ready_at_ms if workers > 1 else run.ready_at_ms
        counted = sum(ts >= start_ms for ts in result_ts) if workers > 1 else len(texts)
        seconds = (max(result_ts) - start_ms) / 1000
        return Phase(name, counted, seconds, hit_rate=cached / len(texts), peak_rss_mb=rss, retries=retries)
    finally:
        run.stop()
        await run.delete_topics()


async def latency_phase(
    texts: list[str], rate: float, cache_prefix: str, name: str, *, relay: bool = False
) -> Phase:
    """Requests offered one at a time at `rate` per second to a worker (or the relay) that is
    already in its group; latency = result LogAppendTime - request CreateTime."""
    run = Run("relay-latency" if relay else "latency")
    await run.create_topics()
    try:
        if relay:
            run.start_relay()
        else:
            run.start_worker(cache_prefix)
        started = time.perf_counter()
        await run.produce(texts, rate=rate)
        seconds = time.perf_counter() - started  # results/s of a latency phase: the rate offered
        await run.wait_drained(len(texts), timeout_s=300)
        retries = run.metric("embedfleet_publish_retries_total") if not relay else float("nan")
        run.stop()
        request_ts, result_ts, cached = await run.collect(len(texts), timeout_s=300)
        latency = np.array(result_ts) - np.array(request_ts)
        return Phase(
            name,
            len(texts),
            seconds,
            hit_rate=cached / len(texts),
            p50_ms=float(np.percentile(latency, 50)),
            p99_ms=float(np.percentile(latency, 99)),
            retries=retries,
        )
    finally:
        run.stop()
        await run.delete_topics()


def engine_phase(texts: list[str], config: WorkerConfig) -> tuple[Phase, float]:
    """The engine in the worker's own setup: the same model calls side by side with the same
    threads each, micro-batches of max_batch_size in arrival order, each length-sorted and cut by
    the same batch size and token budget."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.engine.embedder import Embedder, physical_cpu_count

    calls, per_call = config.model_threads(physical_cpu_count())
    embedder = Embedder.from_bundle(
        config.model, variant=config.variant, intra_op_threads=per_call, int8_weights=config.int8_weights
    )

    def embed(batch: list[str]) -> object:
        return embedder.embed(
            batch, batch_size=config.inference_batch_size, token_budget=config.model_call_tokens()
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


def hit_texts(unique: list[str], count: int) -> list[str]:
    return [unique[i % len(unique)] for i in range(count)]


def show(phase: Phase) -> str:
    if phase.p50_ms == phase.p50_ms:  # a latency phase
        text = f"p50 {phase.p50_ms:.1f} ms, p99 {phase.p99_ms:.1f} ms at {phase.throughput:.0f}/s"
        if phase.relay is not None:
            text += f"; relay p50 {phase.relay.p50_ms:.1f} ms, p99 {phase.relay.p99_ms:.1f} ms"
    else:
        text = f"{phase.throughput:.0f} results/s"
        if phase.relay is not None:
            text += f"; relay {phase.relay.throughput:.0f}/s (worker / relay {ratio(phase):.2f})"
    if phase.retries == phase.retries:
        text += f"; publish retries {phase.retries:.0f}"
    return f"  {phase.name}: {text}"


def ratio(phase: Phase) -> float:
    return phase.throughput / phase.relay.throughput if phase.relay is not None else float("nan")


def table(phases: list[Phase]) -> None:
    print(
        f"{'phase':36} {'requests':>9} {'results/s':>10} {'relay/s':>8} {'w/relay':>8} {'hit rate':>9} "
        f"{'p50 ms':>7} {'relay':>6} {'p99 ms':>7} {'relay':>6} {'retries':>8} {'peak RSS MB':>12}"
    )
    for phase in phases:
        relay = phase.relay or Phase("", 0, 0.0)
        relay_rate = relay.throughput if phase.relay is not None and phase.p50_ms != phase.p50_ms else None
        print(
            f"{phase.name[:36]:36} {phase.requests:9d} {phase.throughput:10.0f} "
            f"{'' if relay_rate is None else f'{relay_rate:.0f}':>8} "
            f"{'' if relay_rate is None else f'{ratio(phase):.2f}':>8} {phase.hit_rate:9.1%} "
            f"{_ms(phase.p50_ms):>7} {_ms(relay.p50_ms):>6} {_ms(phase.p99_ms):>7} {_ms(relay.p99_ms):>6} "
            f"{'' if phase.retries != phase.retries else f'{phase.retries:.0f}':>8} "
            f"{'' if phase.peak_rss_mb != phase.peak_rss_mb else f'{phase.peak_rss_mb:.0f}':>12}"
        )


def _ms(value: float) -> str:
    return "" if value != value else f"{value:.1f}"


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--unique", type=int, default=2000, help="distinct texts of phases a and b")
    parser.add_argument("--hits", type=int, default=100_000, help="backlog of the hit phases (c, c64)")
    parser.add_argument("--mix", type=int, default=10_000, help="requests of phase d")
    parser.add_argument(
        "--latency-seconds", type=float, default=20.0, help="how long each latency phase offers requests"
    )
    parser.add_argument(
        "--latency-min-requests",
        type=int,
        default=10_000,
        help="at least this many requests per hit-latency phase (f: longer than --latency-seconds)",
    )
    parser.add_argument(
        "--g-seconds", type=float, default=60.0, help="phase g's work, in seconds at phase b's rate"
    )
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
        help="also measure latency on hits at these fixed rates (requests/s), worker and relay",
    )
    args = parser.parse_args()
    config = WorkerConfig.from_env()
    Run.relay_model = bundle_identity(config)
    run_id = uuid.uuid4().hex[:8]
    unique = corpus_queries(args.unique, distinct=True)
    machine = read_cpu()
    print(
        f"CPU: {machine.model}, {machine.cores} logical cores; "
        f"{', '.join(machine.reported_flags) or 'no AVX2'}"
    )
    print(
        f"bench/e2e.py: model {config.model} ({config.variant}), window {config.batch_window_ms} ms, "
        f"token budget {config.token_budget}, inference batch {config.inference_batch_size}",
        flush=True,
    )

    engine, batch_seconds = await asyncio.to_thread(engine_phase, unique, config)
    print(show(engine), flush=True)
    misses = await backlog_phase("b. worker, unique texts", unique, f"bench-{run_id}-b")
    print(show(misses), flush=True)

    # Before the 100k-message phases: the broker writes ~800 MB for each of them.
    rate = misses.throughput / 2
    latency_texts = corpus_queries(int(rate * args.latency_seconds), distinct=True, skip=args.unique)
    latency = await latency_phase(latency_texts, rate, f"bench-{run_id}-e", "e. miss latency, half capacity")
    print(show(latency), flush=True)
    mix_texts = corpus_queries(args.mix, distinct=False, skip=20_000)
    mix = await backlog_phase("d. worker, natural mix", mix_texts, f"bench-{run_id}-d")
    print(show(mix), flush=True)

    # All hits, float (the default format): the worker, then the relay on the same backlog form.
    hits = await backlog_phase(
        "c. all hits, float", hit_texts(unique, args.hits), f"bench-{run_id}-b", profile=args.profile_hits
    )
    settle()
    hits.relay = await backlog_phase("c. relay, float", hit_texts(unique, args.hits), "", relay=True)
    settle()
    print(show(hits) + f"; peak RSS {hits.peak_rss_mb:.0f} MB", flush=True)

    # Single-text hits at half the worker's float hit capacity: the worker, then the relay at the
    # same rate.
    hit_rate = hits.throughput / 2
    count = max(int(hit_rate * args.latency_seconds), args.latency_min_requests)
    hit_latency = await latency_phase(
        hit_texts(unique, count), hit_rate, f"bench-{run_id}-b", "f. hit latency, half capacity"
    )
    hit_latency.relay = await latency_phase(
        hit_texts(unique, count), hit_rate, "", "f. relay latency", relay=True
    )
    print(show(hit_latency), flush=True)
    fixed_phases: list[Phase] = []
    for fixed in [float(r) for r in args.hit_rates.split(",") if r.strip()]:
        texts = hit_texts(unique, int(fixed * args.latency_seconds))
        at_rate = await latency_phase(texts, fixed, f"bench-{run_id}-b", f"hit latency at {fixed:.0f}/s")
        at_rate.relay = await latency_phase(texts, fixed, "", "relay latency", relay=True)
        fixed_phases.append(at_rate)
        print(show(at_rate), flush=True)

    settle()  # the latency phases wrote ~300k results each: their writeback must not land in c64
    hits64 = await backlog_phase(
        "c64. all hits, base64", hit_texts(unique, args.hits), f"bench-{run_id}-b", encoding_format="base64"
    )
    settle()
    hits64.relay = await backlog_phase(
        "c64. relay, base64", hit_texts(unique, args.hits), "", relay=True, encoding_format="base64"
    )
    settle()
    print(show(hits64), flush=True)

    # The other way to use the machine's cores: two workers of one inference thread each, on
    # enough distinct texts to dwarf the rebalance the second worker causes.
    g_texts = corpus_queries(max(args.unique, int(misses.throughput * args.g_seconds)), distinct=True)
    two_workers = await backlog_phase(
        "g. 2 workers x 1 thread, unique",
        g_texts,
        f"bench-{run_id}-g",
        workers=2,
        EMBEDFLEET_INFERENCE_THREADS="1",
        EMBEDFLEET_INTRA_OP_THREADS="1",
    )
    threads = config.model_threads(os.cpu_count() or 1)[0]
    print(
        show(two_workers) + f" ({two_workers.throughput / misses.throughput:.2f} x one worker with "
        f"{threads} inference threads in b; {len(g_texts)} texts, {two_workers.requests} of them "
        f"answered after both workers were ready; CPU {machine.model})",
        flush=True,
    )

    bound_ms = 3 * (config.batch_window_ms + batch_seconds * 1000)
    hit_p50_bound = (hit_latency.relay.p50_ms if hit_latency.relay else float("nan")) + 2.0
    print()
    table([engine, misses, two_workers, hits, hits64, mix, latency, hit_latency, *fixed_phases])
    print()
    checks = [
        Check(
            "unique texts: worker / engine alone (same settings)",
            misses.throughput / engine.throughput,
            0.90,
            f"{misses.throughput:.0f} / {engine.throughput:.0f} texts/s",
        ),
        Check(
            "all hits, float: worker results/s / relay messages/s",
            ratio(hits),
            0.6,
            f"{hits.throughput:.0f} / {hits.relay.throughput if hits.relay else 0.0:.0f} per s",
        ),
        Check(
            "all hits, base64: worker results/s / relay messages/s",
            ratio(hits64),
            0.6,
            f"{hits64.throughput:.0f} / {hits64.relay.throughput if hits64.relay else 0.0:.0f} per s",
        ),
        Check(
            f"hit latency at half capacity ({hit_rate:.0f}/s): (relay p50 + 2 ms) / worker p50",
            hit_p50_bound / hit_latency.p50_ms,
            1.0,
            f"worker p50 {hit_latency.p50_ms:.1f} ms <= relay p50 + 2 = {hit_p50_bound:.1f} ms; "
            f"{hit_latency.retries:.0f} publish retries",
        ),
        Check(
            f"hit latency at half capacity ({hit_rate:.0f}/s): 20 ms / worker p99",
            20.0 / hit_latency.p99_ms,
            1.0,
            f"worker p99 {hit_latency.p99_ms:.1f} ms <= 20 ms",
        ),
        Check(
            f"miss latency: 3 x (window + batch of {config.inference_batch_size}: "
            f"{batch_seconds * 1000:.0f} ms) = {bound_ms:.0f} ms / p99",
            bound_ms / latency.p99_ms,
            1.0,
            f"p99 {latency.p99_ms:.0f} ms <= {bound_ms:.0f} ms; {latency.retries:.0f} publish retries",
        ),
        Check(
            f"peak worker RSS <= 500 MB with a {args.hits}-message backlog: 500 / RSS",
            500 / hits.peak_rss_mb,
            1.0,
            f"{hits.peak_rss_mb:.0f} MB",
        ),
    ]
    for check in checks:
        print(
            f"{'PASS' if check.passed else 'FAIL'}  {check.label}: {check.value:.2f} "
            f"(target >= {check.target:.2f}; {check.detail})"
        )
    print(
        f"info  g. 2 workers x 1 thread / one worker: {two_workers.throughput / misses.throughput:.2f} "
        f"(no target; CPU {machine.model}, {', '.join(machine.reported_flags)})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        phases = [
            p.as_json()
            for p in (engine, misses, two_workers, hits, hits64, mix, latency, hit_latency, *fixed_phases)
        ]
        checks_json = [
            {"label": c.label, "value": c.value, "target": c.target, "detail": c.detail} for c in checks
        ]
        figures = {
            "cpu": {"model": machine.model, "cores": machine.cores, "flags": machine.reported_flags},
            "phases": phases,
            "checks": checks_json,
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    client = redis_asyncio.Redis.from_url(config.redis_url)
    for phase_prefix in ("b", "d", "e", "g"):
        await drop_cache_prefix(client, f"bench-{run_id}-{phase_prefix}")
    await client.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
