"""A real fleet for tests: `embedfleet worker` subprocesses on fresh topics of the local stack.

Each Fleet gets its own requests/results/DLQ topics, consumer group and cache key prefix, so
tests never see each other's messages or cache entries, and every worker is a real process that
can be killed, stopped or restarted like in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from producer.config import ClientConfig
from tests.helpers import create_topic, delete_topics
from worker.cache import drop_cache_prefix, redis_client

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDFLEET = str(Path(sys.executable).with_name("embedfleet"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Sum of a metric's samples matching the labels (0 when absent)."""
        _, text = self.http("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            metric_name = series.split("{", 1)[0]
            if metric_name != name:
                continue
            if labels and not all(f'{k}="{v}"' in series for k, v in labels.items()):
                continue
            total += float(value)
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_ready(self, timeout_s: float = 60, *, deadline: float | None = None) -> None:
        """Until /readyz answers 200; fails with the process's log if it exits or times out."""
        deadline = time.monotonic() + timeout_s if deadline is None else deadline
        while True:
            if not self.alive:
                raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
            try:
                status, _ = await asyncio.to_thread(self.http, "/readyz")
            except OSError:
                status = 0
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.2)


@dataclass
class GatewayProcess(WorkerProcess):
    """An `embedfleet gateway` subprocess: ``metrics_port`` is its HTTP port."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.alive:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


@dataclass
class Fleet:
    bootstrap: str
    redis_url: str
    model_dir: Path
    log_dir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    gateways: list[GatewayProcess] = field(default_factory=list)

    @property
    def requests_topic(self) -> str:
        return f"embed.requests.test-{self.tag}"

    @property
    def results_topic(self) -> str:
        return f"embed.results.test-{self.tag}"

    @property
    def dlq_topic(self) -> str:
        return f"embed.requests.dlq.test-{self.tag}"

    @property
    def group_id(self) -> str:
        return f"embedfleet-test-{self.tag}"

    @property
    def cache_prefix(self) -> str:
        return f"embedfleet-test-{self.tag}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "EMBEDFLEET_KAFKA_BOOTSTRAP": self.bootstrap,
                "EMBEDFLEET_REDIS_URL": self.redis_url,
                "EMBEDFLEET_MODEL": str(self.model_dir),
                "EMBEDFLEET_REQUESTS_TOPIC": self.requests_topic,
                "EMBEDFLEET_RESULTS_TOPIC": self.results_topic,
                "EMBEDFLEET_DLQ_TOPIC": self.dlq_topic,
                "EMBEDFLEET_GROUP_ID": self.group_id,
                "EMBEDFLEET_CACHE_KEY_PREFIX": self.cache_prefix,
                # Two workers share two cores in tests.
                "EMBEDFLEET_INTRA_OP_THREADS": "1",
                "EMBEDFLEET_INFERENCE_THREADS": "1",
                "EMBEDFLEET_METRICS_HOST": "127.0.0.1",
            }
        )
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    partitions: int = 6
    # The DLQ topic at Kafka's default record limit (the local broker allows 10 MiB), so the tests
    # see what a default cluster does with a large dead letter.
    dlq_configs: dict[str, str] = field(default_factory=lambda: {"max.message.bytes": "1048588"})

    # 3 on a local cluster (tests/faults/test_broker_failover.py): min.insync.replicas is then 2.
    replication: int = 1

    async def create_topics(self) -> None:
        partitions, rf = self.partitions, self.replication
        await create_topic(self.bootstrap, self.requests_topic, partitions, replication=rf)
        await create_topic(
            self.bootstrap, self.results_topic, partitions, {"cleanup.policy": "compact"}, replication=rf
        )
        await create_topic(self.bootstrap, self.dlq_topic, 1, self.dlq_configs, replication=rf)

    async def delete_topics(self) -> None:
        await delete_topics(self.bootstrap, [self.requests_topic, self.results_topic, self.dlq_topic])

    async def cleanup(self) -> None:
        """Deletes the fleet's topics and its cache entries and indexes, so test runs do not pile
        up data in the local Redis (which would slow its next start: it re-indexes on load)."""
        await self.delete_topics()
        await drop_cache(self.redis_url, self.cache_prefix)

    def start_worker(self, *args: str, env: Mapping[str, str] | None = None) -> WorkerProcess:
        name = f"w{len(self.workers)}-{self.tag}"
        port = free_port()
        log_path = self.log_dir / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [EMBEDFLEET, "worker", "--worker-id", name, "--metrics-port", str(port), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(env),
                cwd=REPO_ROOT,
            )
        worker = WorkerProcess(name, process, port, log_path)
        self.workers.append(worker)
        return worker

    async def wait_ready(self, workers: Iterable[WorkerProcess] | None = None, timeout_s: float = 60) -> None:
        """Until every worker answers /readyz with 200 (model loaded, group joined)."""
        deadline = time.monotonic() + timeout_s
        for worker in list(workers or self.workers):
            await worker.wait_ready(deadline=deadline)

    def stop_worker(self, worker: WorkerProcess, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if worker.alive:
            worker.process.send_signal(sig)
            try:
                worker.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        return int(worker.process.returncode)

    def stop_all(self) -> None:
        for worker in self.workers:
            self.stop_worker(worker)

    def client_config(self, **overrides: Any) -> ClientConfig:
        """A Python client's settings for this fleet (its topics, cache prefix, Kafka and Redis)."""
        settings: dict[str, Any] = {
            "kafka_bootstrap": self.bootstrap,
            "redis_url": self.redis_url,
            "requests_topic": self.requests_topic,
            "results_topic": self.results_topic,
            "cache_key_prefix": self.cache_prefix,
            **overrides,
        }
        return ClientConfig.from_env({}, **settings)

    def start_gateway(self, *args: str, env: Mapping[str, str] | None = None) -> GatewayProcess:
        """`embedfleet gateway` in front of this fleet, on a free port (stop it with stop())."""
        name = f"gw{len(self.gateways)}-{self.tag}"
        port = free_port()
        log_path = self.log_dir / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [EMBEDFLEET, "gateway", "--port", str(port), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(env),
                cwd=REPO_ROOT,
            )
        gateway = GatewayProcess(name, process, port, log_path)
        self.gateways.append(gateway)
        return gateway

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        return sum(w.metric(name, labels) for w in self.workers if w.alive)

    def peak_rss_mb(self) -> float:
        """The largest peak resident memory (VmHWM) among the running workers, in MB."""
        peak = 0.0
        for worker in self.workers:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{worker.process.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        return peak


async def start_fleet(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    log_dir: Path,
    workers: int,
    replication: int = 1,
    **extra_env: str,
) -> Fleet:
    fleet = Fleet(
        kafka_bootstrap, redis_url, model_dir, log_dir, extra_env=dict(extra_env), replication=replication
    )
    await fleet.create_topics()
    for _ in range(workers):
        fleet.start_worker()
    await fleet.wait_ready()
    return fleet


@contextlib.asynccontextmanager
async def running_fleet(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, log_dir: Path, workers: int, **extra_env: str
) -> AsyncIterator[Fleet]:
    """A started fleet (workers ready), and afterwards its gateways and workers stopped and its
    topics and cache entries gone."""
    fleet = await start_fleet(kafka_bootstrap, redis_url, model_dir, log_dir, workers, 1, **extra_env)
    try:
        yield fleet
    finally:
        for gateway in fleet.gateways:
            gateway.stop()
        fleet.stop_all()
        await fleet.cleanup()


async def drop_cache(redis_url: str, prefix: str) -> None:
    client = redis_client(redis_url, timeout_s=5)
    try:
        await drop_cache_prefix(client, prefix)
    finally:
        await client.aclose()


async def diagnose(fleet: Fleet) -> str:
    """What a stalled fleet looks like, for a failing test's message: per partition, the group's
    committed offset against the end of the requests, and the results' last stable offset (what a
    read_committed reader can see) against their high watermark; then each worker's last warnings."""
    lines = []
    consumer = AIOKafkaConsumer(bootstrap_servers=fleet.bootstrap, group_id=fleet.group_id)
    committed_reader = AIOKafkaConsumer(bootstrap_servers=fleet.bootstrap, isolation_level="read_committed")
    try:
        await consumer.start()
        await committed_reader.start()
        for topic in (fleet.requests_topic, fleet.results_topic):
            partitions = [TopicPartition(topic, p) for p in range(fleet.partitions)]
            ends = await consumer.end_offsets(partitions)
            if topic == fleet.requests_topic:
                for tp in partitions:
                    committed = await consumer.committed(tp)
                    lines.append(f"requests p{tp.partition}: committed {committed} of end {ends[tp]}")
            else:
                stable = await committed_reader.end_offsets(partitions)
                for tp in partitions:
                    lines.append(f"results p{tp.partition}: last stable {stable[tp]} of end {ends[tp]}")
    except Exception as exc:  # a diagnosis never hides the failure it explains
        lines.append(f"(offsets unavailable: {type(exc).__name__}: {exc})")
    finally:
        await consumer.stop()
        await committed_reader.stop()
    for worker in fleet.workers:  # where each live worker's tasks wait (worker.health.log_task_stacks)
        if worker.alive:
            worker.process.send_signal(signal.SIGUSR1)
    await asyncio.sleep(1.0)
    for worker in fleet.workers:
        state = "running" if worker.alive else f"exited {worker.process.returncode}"
        if worker.alive:
            wanted = ("embedfleet_in_flight", "embedfleet_partitions_paused", "embedfleet_commits_total")
            with contextlib.suppress(OSError):
                _, text = worker.http("/metrics")
                lines.extend(f"{worker.name} {line}" for line in text.splitlines() if line.startswith(wanted))
        warnings = [
            line
            for line in worker.log().splitlines()
            if any(level in line for level in (" WARNING ", " ERROR ", '"warning"', '"error"'))
        ]
        lines.append(f"--- {worker.name} ({state}); last warnings:")
        lines.extend(line[:400] for line in warnings[-40:])
    return "\n".join(lines)


def request(text: str, **fields: Any) -> tuple[str, bytes]:
    request_id = fields.pop("id", None) or uuid.uuid4().hex
    return request_id, json.dumps({"id": request_id, "text": text, **fields}).encode()


class FleetIO:
    """Produces requests and collects results and dead letters of one fleet (a test's requester)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.producer = AIOKafkaProducer(
            bootstrap_servers=fleet.bootstrap, acks="all", linger_ms=5, max_request_size=16 << 20
        )
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.arrivals: list[float] = []  # monotonic time of each result, for stall measurements
        self.result_keys: dict[str, list[bytes | None]] = {}
        self.dead_letters: list[tuple[bytes | None, dict[str, bytes]]] = []
        self._consumers: list[AIOKafkaConsumer] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> FleetIO:
        await self.producer.start()
        for topic, handler in (
            (self.fleet.results_topic, self._on_result),
            (self.fleet.dlq_topic, self._on_dead_letter),
        ):
            consumer = AIOKafkaConsumer(
                topic,
                bootstrap_servers=self.fleet.bootstrap,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                isolation_level="read_committed",
            )
            await consumer.start()
            self._consumers.append(consumer)
            self._tasks.append(asyncio.create_task(self._read(consumer, handler)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for consumer in self._consumers:
            await consumer.stop()
        await self.producer.stop()

    async def _read(self, consumer: AIOKafkaConsumer, handler: Any) -> None:
        async for record in consumer:
            handler(record)

    def _on_result(self, record: Any) -> None:
        headers = {k: v for k, v in record.headers}
        if headers.get("content-type") == b"application/msgpack":
            result = msgspec.msgpack.decode(record.value)
            result["_content_type"] = "application/msgpack"
        else:
            result = json.loads(record.value)
        self.results.setdefault(result.get("id"), []).append(result)
        self.arrivals.append(time.monotonic())
        self.result_keys.setdefault(result.get("id"), []).append(record.key)

    def _on_dead_letter(self, record: Any) -> None:
        self.dead_letters.append((record.value, {k: v for k, v in record.headers}))

    async def send(
        self, value: bytes | None, *, key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        await self.producer.send(self.fleet.requests_topic, value, key=key, headers=headers)

    async def send_texts(self, texts: Iterable[str], **fields: Any) -> list[str]:
        ids = []
        for text in texts:
            request_id, value = request(text, **fields)
            ids.append(request_id)
            await self.send(value)
        await self.producer.flush()
        return ids

    async def wait_for(self, ids: Iterable[str], timeout_s: float = 120) -> dict[str, dict[str, Any]]:
        wanted = list(ids)
        deadline = time.monotonic() + timeout_s
        while not all(i in self.results for i in wanted):
            if time.monotonic() > deadline:
                missing = [i for i in wanted if i not in self.results]
                raise AssertionError(
                    f"{len(missing)} of {len(wanted)} results missing, e.g. {missing[:3]}\n"
                    + await diagnose(self.fleet)
                )
            await asyncio.sleep(0.05)
        return {i: self.results[i][-1] for i in wanted}

    async def wait_for_dead_letters(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.dead_letters) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.dead_letters)} of {count} dead letters arrived")
            await asyncio.sleep(0.05)
