"""The demo (what `make run` ends with, also `embedfleet demo`): two workers, 5000 real texts, a summary.

Needs the local stack (`make stack-up`) and the default model bundle (`make model`). Starts two
`embedfleet worker` processes in the group and an `embedfleet gateway`, produces the sample texts
to ``embed.requests`` keyed by content hash, reads every result back from ``embed.results``, prints
a few results and a summary (results, cache hit rate, throughput, end-to-end latency, where the
metrics are), sends one request through the gateway's OpenAI-compatible /v1/embeddings (and prints
the curl command that does the same), then stops everything gracefully. A second run is answered
from the Redis cache.

Every other known model whose bundle is built (``$EMBEDFLEET_HOME/models/NAME``: `make run` builds
all-mpnet-base-v2 with `make model MODEL=all-mpnet-base-v2`) gets one worker of its own
(``embedfleet worker --model NAME``: its topic ``embed.requests.NAME`` and group
``embedfleet.NAME`` by the naming rule) and the same sample; the summary gives each model's results
and width, and the gateway answers for each model. ``--models`` picks them.

The workers' and the gateway's logs go to ``$EMBEDFLEET_HOME/logs/demo-*.log``; only their own
warnings and errors are shown here too (libraries' stay in the files).
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
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from producer.progress import Progress
from schemas import content_hash, decode_result, encode_request, request_headers
from schemas.messages import EmbedRequest
from schemas.model_routing import group_id_for, requests_topic_for
from worker.checkout import default_home
from worker.config import WorkerConfig
from worker.engine.build import known_models
from worker.engine.bundle import default_bundle_dir, load_bundle, serving_fingerprint

# Local-dev tooling: this script belongs to the checkout, next to its sample texts.
SAMPLE = Path(__file__).resolve().with_name("demo-queries.jsonl")
METRICS_PORTS = (9401, 9402)
# The project's own loggers: their warnings and errors are for the person running the demo.
# Libraries' (aiokafka's coordinator warnings while the group rebalances, uvicorn's) say nothing
# they can act on: those stay in the log files.
OWN_LOGGERS = frozenset({"worker", "producer", "schemas"})
SHOWN_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
# A record in worker.logs' text format: "<date> <time> LEVEL [worker-id] logger: message".
TEXT_RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ (?P<level>[A-Z]+) \[[^\]]*\] (?P<logger>[^\s:]+): ")


@dataclass(frozen=True)
class Lane:
    """One model of the demo: its bundle, the contract's fingerprint that keys its texts, the topic
    and group its workers use (the naming rule) and their metrics ports."""

    model: str
    bundle: Path
    fingerprint: str
    requests_topic: str
    group_id: str
    ports: tuple[int, ...]
    default: bool  # the configured model (EMBEDFLEET_MODEL): its workers are configured as before

    @property
    def worker_ids(self) -> list[str]:
        if self.default:  # demo-1, demo-2 as before
            return [f"demo-{index + 1}" for index in range(len(self.ports))]
        return [f"demo-{self.model}-{index + 1}" for index in range(len(self.ports))]


def worker_port(index: int) -> int:
    return METRICS_PORTS[index] if index < len(METRICS_PORTS) else 9401 + index


def other_models(config: WorkerConfig, wanted: list[str] | None) -> list[str]:
    """The models besides the configured one that the demo also runs: ``wanted`` (``--models``),
    else every known model (``embedfleet model build --model NAME``) whose bundle is built."""
    if wanted is not None:
        names = [name for name in wanted if name != config.model_name]
        missing = [name for name in names if not (default_bundle_dir(name) / "manifest.json").exists()]
        if missing:
            raise SystemExit(
                f"no model bundle for {', '.join(missing)}: run `make model MODEL={missing[0]}` first"
            )
        return names
    return [
        name
        for name in known_models()
        if name != config.model_name and (default_bundle_dir(name) / "manifest.json").exists()
    ]


def lanes_for(config: WorkerConfig, workers: int, others: list[str]) -> list[Lane]:
    """The configured model with ``workers`` workers, then one worker for each of ``others``; their
    topics and groups by the naming rule, based on the configured model's (as the gateway's)."""
    lanes = [
        Lane(
            model=config.model_name,
            bundle=config.model,
            fingerprint=serving_fingerprint(load_bundle(config.model).manifest, config.variant),
            requests_topic=config.requests_topic,
            group_id=config.group_id,
            ports=tuple(worker_port(i) for i in range(workers)),
            default=True,
        )
    ]
    index = workers
    for name in others:
        bundle = default_bundle_dir(name)
        lanes.append(
            Lane(
                model=name,
                bundle=bundle,
                fingerprint=serving_fingerprint(load_bundle(bundle).manifest, config.variant),
                requests_topic=requests_topic_for(
                    name, default_model=config.default_model, base=config.requests_topic
                ),
                group_id=group_id_for(name, default_model=config.default_model, base=config.group_id),
                ports=(worker_port(index),),
                default=False,
            )
        )
        index += 1
    return lanes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--texts", type=Path, default=SAMPLE, help="JSONL, one JSON string per line")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all results")
    parser.add_argument(
        "--models",
        type=lambda raw: [name.strip() for name in raw.split(",") if name.strip()],
        default=None,
        help="other models to run besides EMBEDFLEET_MODEL's, one worker each, comma-separated "
        "(default: every known model whose bundle is built; '' for none)",
    )
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=int(os.environ.get("EMBEDFLEET_GATEWAY_PORT") or 8080),
        help="port of the demo's HTTP gateway (env EMBEDFLEET_GATEWAY_PORT)",
    )


def run(args: argparse.Namespace) -> int:
    config = WorkerConfig.from_env()
    manifest_path = config.model / "manifest.json"
    if not manifest_path.exists():
        print(f"error: no model bundle at {config.model}: run `make model` first", file=sys.stderr)
        return 2
    texts = [json.loads(line) for line in args.texts.read_text().splitlines()[: args.limit]]
    lanes = lanes_for(config, args.workers, other_models(config, args.models))
    logs = default_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"logs of the workers and the gateway: {logs}/demo-*.log")
    if len(lanes) > 1:
        asyncio.run(ensure_requests_topics(config, lanes))
    relays: list[LogRelay] = []
    threads = str(max(1, (os.cpu_count() or 2) // sum(len(lane.ports) for lane in lanes)))
    workers = [process for lane in lanes for process in start_workers(lane, threads, logs, relays)]
    gateway = start_gateway(args.gateway_port, logs, relays)
    try:
        status = asyncio.run(demo(config, texts, lanes, args.timeout))
        gateway_status = 0
        for lane in lanes:
            gateway_status = gateway_status or try_gateway(args.gateway_port, lane, texts[:2])
        return status or gateway_status
    finally:
        for process in [gateway, *workers]:
            process.send_signal(signal.SIGTERM)
        for process in [gateway, *workers]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        for relay in relays:
            relay.join()
        print("gateway and workers stopped (drained, committed, left the group)")


def start_gateway(port: int, logs: Path, relays: list[LogRelay]) -> subprocess.Popen[bytes]:
    executable = str(Path(sys.executable).with_name("embedfleet"))
    env = dict(os.environ, EMBEDFLEET_GATEWAY_PORT=str(port))
    env.setdefault("EMBEDFLEET_LOG_LEVEL", "WARNING")
    return start_logged([executable, "gateway"], env, logs / "demo-gateway.log", relays)


def start_logged(
    argv: list[str], env: dict[str, str], log_file: Path, relays: list[LogRelay]
) -> subprocess.Popen[bytes]:
    """Starts ``argv`` with its log (stderr) relayed into ``log_file`` and, in part, to ours."""
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    assert process.stderr is not None
    relays.append(LogRelay(process.stderr, log_file, sys.stderr))
    return process


def shown(line: str, previous: bool) -> bool:
    """Whether a line of a worker's or the gateway's log is also shown on the demo's output: a
    warning or error of the project's own loggers. A line that starts no record (a traceback's)
    goes with the record before it (``previous``); before any record, everything is shown (a
    command that fails before logging starts prints its error plainly)."""
    record = record_of(line)
    if record is None:
        return previous
    level, logger = record
    return level.upper() in SHOWN_LEVELS and logger.split(".")[0] in OWN_LOGGERS


def record_of(line: str) -> tuple[str, str] | None:
    """(level, logger) of a log line that starts a record, text or JSON (EMBEDFLEET_LOG_FORMAT)."""
    if line.startswith("{"):
        try:
            fields = json.loads(line)
        except ValueError:
            return None
        if isinstance(fields, dict) and "level" in fields and "logger" in fields:
            return str(fields["level"]), str(fields["logger"])
        return None
    match = TEXT_RECORD.match(line)
    return (match["level"], match["logger"]) if match else None


class LogRelay:
    """Copies a child's stderr, line by line, into ``log_file`` (all of it) and onto ``terminal``
    (what ``shown`` lets through), in a thread until the child closes it."""

    def __init__(self, source: IO[bytes], log_file: Path, terminal: IO[str]) -> None:
        self._source = source
        self._log_file = log_file
        self._terminal = terminal
        self._thread = threading.Thread(target=self._run, name=f"log-{log_file.stem}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        show = True
        with self._source, self._log_file.open("wb") as log:  # this run's log only
            for raw in iter(self._source.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                show = shown(line, show)
                if show:
                    self._terminal.write(line)
                    self._terminal.flush()

    def join(self, timeout_s: float = 10.0) -> None:
        self._thread.join(timeout_s)


async def ensure_requests_topics(config: WorkerConfig, lanes: list[Lane]) -> None:
    """Each model's requests topic (a worker refuses to start on a missing one), created where
    missing with the configured model's partitions (the local stack creates only that one)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=config.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        (described,) = await admin.describe_topics([config.requests_topic])
        partitions = len(described["partitions"])
        replication = len(described["partitions"][0]["replicas"])
        missing = [
            NewTopic(lane.requests_topic, partitions, replication)
            for lane in lanes
            if lane.requests_topic not in existing
        ]
        if missing:
            await admin.create_topics(missing)
            print("created topics " + ", ".join(t.name for t in missing))
    finally:
        await admin.close()


def try_gateway(port: int, lane: Lane, texts: list[str]) -> int:
    """One request through the gateway's /v1/embeddings, and the curl command that does the same."""
    base = f"http://127.0.0.1:{port}"
    wait_ready([port], timeout_s=30, what="the gateway")
    body = {"model": lane.model, "input": texts}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 (http://127.0.0.1 above)
        answer = json.loads(reply.read())
    took_ms = (time.perf_counter() - started) * 1000
    print(
        "\nHTTP gateway (OpenAI-compatible), the same texts:"
        if lane.default
        else f"\nHTTP gateway, the same texts with model {lane.model!r}:"
    )
    for item in answer["data"]:
        vector = item["embedding"]
        head = ", ".join(f"{v:+.4f}" for v in vector[:4])
        print(f"  input[{item['index']}] -> [{head}, ...] ({len(vector)} floats)")
    print(f"  usage {answer['usage']}, {took_ms:.0f} ms (from the cache)")
    if not lane.default:
        return 0
    print("  with `embedfleet worker` and `embedfleet gateway` running (make stack-up first), try:")
    print(
        f"  curl -s {base}/v1/embeddings -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{body["model"]}", "input": "hello world"}}\''
    )
    return 0


def worker_env(lane: Lane, port: int, threads: str) -> dict[str, str]:
    """A demo worker's environment: ours, its metrics port and threads, and for a model other than
    the configured one its bundle, topic and group (explicit: they win over any configured
    EMBEDFLEET_REQUESTS_TOPIC and EMBEDFLEET_GROUP_ID, which are the configured model's)."""
    env = dict(
        os.environ,
        EMBEDFLEET_METRICS_PORT=str(port),
        EMBEDFLEET_INTRA_OP_THREADS=threads,
        EMBEDFLEET_INFERENCE_THREADS="1",
    )
    if not lane.default:
        env |= {
            "EMBEDFLEET_MODEL": str(lane.bundle),
            "EMBEDFLEET_REQUESTS_TOPIC": lane.requests_topic,
            "EMBEDFLEET_GROUP_ID": lane.group_id,
        }
    env.setdefault("EMBEDFLEET_LOG_LEVEL", "WARNING")  # keep the demo's own output readable
    return env


def start_workers(
    lane: Lane, threads: str, logs: Path, relays: list[LogRelay]
) -> list[subprocess.Popen[bytes]]:
    executable = str(Path(sys.executable).with_name("embedfleet"))
    processes = []
    for port, worker_id in zip(lane.ports, lane.worker_ids, strict=True):
        argv = [executable, "worker", "--worker-id", worker_id]
        processes.append(
            start_logged(argv, worker_env(lane, port, threads), logs / f"{worker_id}.log", relays)
        )
    return processes


def wait_ready(ports: list[int], timeout_s: float = 90, what: str = "worker") -> None:
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"{what} on port {port} not ready after {timeout_s:.0f}s: see the errors above, "
                    f"and its log in {default_home() / 'logs'}"
                )
            time.sleep(0.3)


async def demo(config: WorkerConfig, texts: list[str], lanes: list[Lane], timeout_s: float) -> int:
    ports = [port for lane in lanes for port in lane.ports]
    if len(lanes) == 1:
        print(f"starting {len(ports)} workers ...", flush=True)
    else:
        each = ", ".join(f"{len(lane.ports)} {lane.model}" for lane in lanes)
        print(f"starting {len(ports)} workers ({each}) ...", flush=True)
    await asyncio.to_thread(wait_ready, ports)

    results_reader = AIOKafkaConsumer(bootstrap_servers=config.kafka_bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(
        bootstrap_servers=config.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await results_reader.start()
    await producer.start()
    try:
        partitions = [
            TopicPartition(config.results_topic, p)
            for p in sorted(await producer.partitions_for(config.results_topic))
        ]
        results_reader.assign(partitions)
        await results_reader.seek_to_end(*partitions)  # only this run's results

        run_tag = uuid.uuid4().hex[:8]
        sent_at: dict[str, float] = {}
        started = time.perf_counter()
        for number, lane in enumerate(lanes):
            print(f"sending {len(texts)} texts to {lane.requests_topic} ...", flush=True)
            for index, text in enumerate(texts):
                request_id = request_id_of(run_tag, number, index)
                key = content_hash(text, model_fingerprint=lane.fingerprint, task=None, dimensions=None)
                value = encode_request(EmbedRequest(id=request_id, text=text), limits=None)
                sent_at[request_id] = time.perf_counter()
                await producer.send(lane.requests_topic, value, key=key.encode(), headers=request_headers())
        await producer.flush()

        received: dict[str, Received] = {}
        deadline = time.monotonic() + timeout_s
        progress = Progress(sys.stdout, enabled=True)
        while len(received) < len(sent_at) and time.monotonic() < deadline:
            batches = await results_reader.getmany(timeout_ms=200)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    result = decode_result(record.value, record.headers)
                    if result.id in sent_at and result.id not in received:
                        received[result.id] = Received(
                            now - sent_at[result.id], now - started, result.cached, result.ok, result.vector
                        )
            progress.show(f"  results {len(received)}/{len(sent_at)}")
        progress.show(f"  results {len(received)}/{len(sent_at)}", force=True)
        progress.finish()
    finally:
        await producer.stop()
        await results_reader.stop()

    print("\nsample results:")
    for index in range(3):
        request_id = request_id_of(run_tag, 0, index)
        if request_id in received:
            vector = received[request_id].vector or []
            print(
                f"  {texts[index][:60]!r:64} -> [{', '.join(f'{v:+.4f}' for v in vector[:4])}, ...] "
                f"cached={received[request_id].cached}"
            )
    complete = True
    for number, lane in enumerate(lanes):
        ids = [request_id_of(run_tag, number, index) for index in range(len(texts))]
        lane_results = [received[i] for i in ids if i in received]
        print("\nsummary" if lane.default else f"\nsummary, {lane.model}")
        print_summary(lane_results, len(texts), widths(lane_results) if len(lanes) > 1 else None)
        complete = complete and len(lane_results) == len(texts)
    if len(lanes) > 1:
        print("\nmodels (one fleet, each on its own topic and group):")
        for number, lane in enumerate(lanes):
            lane_results = [
                received[i]
                for i in (request_id_of(run_tag, number, x) for x in range(len(texts)))
                if i in received
            ]
            found = widths(lane_results)
            print(
                f"  {lane.model:24} {'/'.join(str(w) for w in found) or '?'}-d vectors, "
                f"{len(lane_results)} of {len(texts)} results, {lane.requests_topic}, group {lane.group_id}"
            )
    print_metrics(ports)
    return 0 if complete else 1


@dataclass(frozen=True)
class Received:
    """A result as the demo saw it: latency (send -> received), when after the first send, whether
    the cache answered it, whether it is a vector, and the vector."""

    latency_s: float
    at_s: float
    cached: bool
    ok: bool
    vector: list[float] | None


def request_id_of(run_tag: str, lane: int, index: int) -> str:
    """The configured model's ids are as before (demo-<tag>-<index>); other models' name their lane."""
    return f"demo-{run_tag}-{index}" if lane == 0 else f"demo-{run_tag}-m{lane}-{index}"


def widths(results: list[Received]) -> list[int]:
    """The vector widths among ``results`` (one, for a model that answers them all)."""
    return sorted({len(r.vector) for r in results if r.ok and r.vector})


def print_summary(results: list[Received], sent: int, width: list[int] | None = None) -> None:
    """The summary lines of one model's results (``width``: also print the vectors' width)."""
    latencies = np.array([r.latency_s for r in results]) * 1000
    cached = sum(r.cached for r in results)
    failed = sum(not r.ok for r in results)
    # Up to the last result of these texts (several models share the run's time and the CPUs).
    elapsed = max((r.at_s for r in results), default=0.0) or float("nan")
    print(f"  results        {len(results)} of {sent} ({failed} errors)")
    print(f"  cache hit rate {cached / max(1, len(results)):.1%} (served from Redis)")
    print(f"  throughput     {len(results) / elapsed:.0f} results/s ({elapsed:.1f} s for all)")
    if len(latencies):
        print(
            f"  end-to-end     p50 {np.percentile(latencies, 50):.0f} ms, "
            f"p99 {np.percentile(latencies, 99):.0f} ms (send -> result received, under full load)"
        )
    if width is not None:
        print(f"  width          {'/'.join(str(w) for w in width) or '?'} floats per vector")


def print_metrics(ports: list[int]) -> None:
    print("\nmetrics (Prometheus):")
    for port in ports:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as reply:
            lines = reply.read().decode().splitlines()
        wanted = (
            "embedfleet_requests_total",
            "embedfleet_cache_hits_total",
            "embedfleet_cache_lookups_total",
            "embedfleet_batch_size_sum",
            "embedfleet_batch_size_count",
            "process_resident_memory_bytes",
        )
        shown = [line for line in lines if line.startswith(wanted)]
        print(f"  {url}")
        for line in shown:
            print(f"    {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
