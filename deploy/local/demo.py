"""The demo (what `make run` ends with, also `embedfleet demo`): two workers, 5000 real texts, a summary.

Needs the local stack (`make stack-up`) and the default model bundle (`make model`). Starts two
`embedfleet worker` processes in the group and an `embedfleet gateway`, produces the sample texts
to ``embed.requests`` keyed by content hash, reads every result back from ``embed.results``, prints
a few results and a summary (results, cache hit rate, throughput, end-to-end latency, where the
metrics are), sends one request through the gateway's OpenAI-compatible /v1/embeddings (and prints
the curl command that does the same), then stops everything gracefully. A second run is answered
from the Redis cache. The workers' and the gateway's logs go to ``$EMBEDFLEET_HOME/logs/demo-*.log``;
only their own warnings and errors are shown here too (libraries' stay in the files).
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
from pathlib import Path
from typing import IO

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from producer.progress import Progress
from schemas import content_hash, decode_result, encode_request, request_headers
from schemas.messages import EmbedRequest
from worker.checkout import default_home
from worker.config import WorkerConfig
from worker.engine.bundle import load_bundle, serving_fingerprint

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--texts", type=Path, default=SAMPLE, help="JSONL, one JSON string per line")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all results")
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
    fingerprint = serving_fingerprint(load_bundle(config.model).manifest, config.variant)
    logs = default_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"logs of the workers and the gateway: {logs}/demo-*.log")
    relays: list[LogRelay] = []
    workers = start_workers(args.workers, logs, relays)
    gateway = start_gateway(args.gateway_port, logs, relays)
    try:
        status = asyncio.run(demo(config, texts, fingerprint, workers, args.timeout))
        gateway_status = try_gateway(args.gateway_port, config, texts[:2])
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


def try_gateway(port: int, config: WorkerConfig, texts: list[str]) -> int:
    """One request through the gateway's /v1/embeddings, and the curl command that does the same."""
    base = f"http://127.0.0.1:{port}"
    wait_ready([port], timeout_s=30, what="the gateway")
    body = {"model": load_bundle(config.model).manifest.name, "input": texts}
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
    print("\nHTTP gateway (OpenAI-compatible), the same texts:")
    for item in answer["data"]:
        vector = item["embedding"]
        head = ", ".join(f"{v:+.4f}" for v in vector[:4])
        print(f"  input[{item['index']}] -> [{head}, ...] ({len(vector)} floats)")
    print(f"  usage {answer['usage']}, {took_ms:.0f} ms (from the cache)")
    print("  with `embedfleet worker` and `embedfleet gateway` running (make stack-up first), try:")
    print(
        f"  curl -s {base}/v1/embeddings -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{body["model"]}", "input": "hello world"}}\''
    )
    return 0


def start_workers(count: int, logs: Path, relays: list[LogRelay]) -> list[subprocess.Popen[bytes]]:
    executable = str(Path(sys.executable).with_name("embedfleet"))
    threads = str(max(1, (os.cpu_count() or 2) // count))
    processes = []
    for index in range(count):
        port = METRICS_PORTS[index] if index < len(METRICS_PORTS) else 9401 + index
        env = dict(
            os.environ,
            EMBEDFLEET_METRICS_PORT=str(port),
            EMBEDFLEET_INTRA_OP_THREADS=threads,
            EMBEDFLEET_INFERENCE_THREADS="1",
        )
        env.setdefault("EMBEDFLEET_LOG_LEVEL", "WARNING")  # keep the demo's own output readable
        worker_id = f"demo-{index + 1}"
        argv = [executable, "worker", "--worker-id", worker_id]
        processes.append(start_logged(argv, env, logs / f"{worker_id}.log", relays))
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


async def demo(
    config: WorkerConfig,
    texts: list[str],
    fingerprint: str,
    workers: list[subprocess.Popen[bytes]],
    timeout_s: float,
) -> int:
    ports = [METRICS_PORTS[i] if i < len(METRICS_PORTS) else 9401 + i for i in range(len(workers))]
    print(f"starting {len(workers)} workers ...", flush=True)
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
        print(f"sending {len(texts)} texts to {config.requests_topic} ...", flush=True)
        started = time.perf_counter()
        for index, text in enumerate(texts):
            request_id = f"demo-{run_tag}-{index}"
            key = content_hash(text, model_fingerprint=fingerprint, task=None, dimensions=None)
            value = encode_request(EmbedRequest(id=request_id, text=text), limits=None)
            sent_at[request_id] = time.perf_counter()
            await producer.send(config.requests_topic, value, key=key.encode(), headers=request_headers())
        await producer.flush()

        received: dict[str, tuple[float, bool, bool, list[float] | None]] = {}
        deadline = time.monotonic() + timeout_s
        progress = Progress(sys.stdout, enabled=True)
        while len(received) < len(texts) and time.monotonic() < deadline:
            batches = await results_reader.getmany(timeout_ms=200)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    result = decode_result(record.value, record.headers)
                    if result.id in sent_at and result.id not in received:
                        received[result.id] = (
                            now - sent_at[result.id],
                            result.cached,
                            result.ok,
                            result.vector,
                        )
            progress.show(f"  results {len(received)}/{len(texts)}")
        elapsed = time.perf_counter() - started
        progress.show(f"  results {len(received)}/{len(texts)}", force=True)
        progress.finish()
    finally:
        await producer.stop()
        await results_reader.stop()

    latencies = np.array([r[0] for r in received.values()]) * 1000
    cached = sum(r[1] for r in received.values())
    failed = sum(not r[2] for r in received.values())
    print("\nsample results:")
    for index in range(3):
        request_id = f"demo-{run_tag}-{index}"
        if request_id in received:
            vector = received[request_id][3] or []
            print(
                f"  {texts[index][:60]!r:64} -> [{', '.join(f'{v:+.4f}' for v in vector[:4])}, ...] "
                f"cached={received[request_id][1]}"
            )
    print("\nsummary")
    print(f"  results        {len(received)} of {len(texts)} ({failed} errors)")
    print(f"  cache hit rate {cached / max(1, len(received)):.1%} (served from Redis)")
    print(f"  throughput     {len(received) / elapsed:.0f} results/s ({elapsed:.1f} s for all)")
    if len(latencies):
        print(
            f"  end-to-end     p50 {np.percentile(latencies, 50):.0f} ms, "
            f"p99 {np.percentile(latencies, 99):.0f} ms (send -> result received, under full load)"
        )
    print_metrics(ports)
    return 0 if len(received) == len(texts) else 1


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
