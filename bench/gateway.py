"""The HTTP gateway: requests/s and p50/p99 latency on cache hits and on misses, against the seed's
naive pattern measured in the same run (one HTTP service that calls the FP32 model in-process for
every request, no cache, no batching).

    python bench/gateway.py              # starts 2 workers, a gateway and the naive server
    python bench/gateway.py --quick      # fewer requests (a smoke run)

Needs the local stack (`make stack-up`) and the model bundle (`make model`). Every figure is
measured here, side by side; ratios compare figures of this run only. The load generator is a
small keep-alive HTTP/1.1 client on asyncio streams (it shares the machine's cores with the
gateway, the workers, Kafka and Redis: on 2 cores every figure is a lower bound).

Rows:
* hits, closed loop: N connections each sending single-text requests back to back (texts the
  cache holds): requests/s and latency;
* hits at a fixed rate (--hit-rate, default 200/s, open loop): latency;
* misses: requests of --batch distinct new texts on N connections: texts/s through the gateway,
  against the fleet's texts/s through Kafka with the Python client (same texts count, new ones);
* naive: single-text requests to the naive server (the model per request): requests/s, latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from producer import Client  # noqa: E402
from tests.fleet import Fleet, free_port, start_fleet  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
SHARED = Path(os.environ.get("EMBEDFLEET_SHARED", REPO.parent / "shared"))


@dataclass(frozen=True)
class Row:
    name: str
    requests: int
    texts: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tps(self) -> float:
        return self.texts / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def line(self) -> str:
        return (
            f"| {self.name} | {self.requests} | {self.rps:,.0f} | {self.tps:,.0f} | "
            f"{self.pct(50):.1f} | {self.pct(99):.1f} |"
        )


def distinct_queries(count: int, skip: int = 0) -> list[str]:
    seen: dict[str, None] = {}
    with (SHARED / "corpus" / "queries.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)
            if text.strip():
                seen.setdefault(text, None)
            if len(seen) >= skip + count:
                break
    return list(seen)[skip : skip + count]


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, read the response (Content-Length)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length)
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def openai_body(texts: Sequence[str], encoding: str = "float") -> bytes:
    return json.dumps({"model": MODEL, "input": list(texts), "encoding_format": encoding}).encode()


async def closed_loop(
    name: str, port: int, path: str, bodies: list[bytes], texts_per: int, connections: int
) -> Row:
    """``connections`` clients, each sending its share of ``bodies`` back to back."""
    latencies: list[float] = []
    queue = iter(bodies)

    async def client() -> None:
        connection = Connection(port)
        try:
            for body in queue:
                started = time.perf_counter()
                status, payload = await connection.post(path, body)
                if status != 200:
                    raise SystemExit(f"{name}: HTTP {status}: {payload[:300]!r}")
                latencies.append((time.perf_counter() - started) * 1000)
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    seconds = time.perf_counter() - started
    return Row(name, len(bodies), len(bodies) * texts_per, seconds, latencies)


async def open_loop(name: str, port: int, bodies: list[bytes], rate: float) -> Row:
    """Requests sent at ``rate``/s whatever the answers do (a pool of connections, as needed)."""
    latencies: list[float] = []
    idle: list[Connection] = []
    tasks = []

    async def one(body: bytes, due: float) -> None:
        connection = idle.pop() if idle else Connection(port)
        status, payload = await connection.post("/v1/embeddings", body)
        if status != 200:
            raise SystemExit(f"{name}: HTTP {status}: {payload[:300]!r}")
        latencies.append((time.perf_counter() - due) * 1000)  # from when it was due: no coordinated omission
        idle.append(connection)

    loop_started = time.perf_counter()
    for index, body in enumerate(bodies):
        due = loop_started + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body, due)))
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - loop_started
    for connection in idle:
        await connection.close()
    return Row(name, len(bodies), len(bodies), seconds, latencies)


def start_naive(model_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("naive_http.py")), str(model_dir), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    return process, port


async def wait_http(port: int, path: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            header = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            if header[9:12] == b"200":
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing answered 200 on port {port}{path}")
        await asyncio.sleep(0.3)


async def fleet_through_kafka(fleet: Fleet, texts: list[str]) -> Row:
    """The fleet's own rate on new texts: the Python client over Kafka (batches of 512)."""
    client = Client(fleet.client_config())
    async with client:
        started = time.perf_counter()
        await asyncio.gather(
            *(client.embed(texts[i : i + 512], timeout=600) for i in range(0, len(texts), 512))
        )
        seconds = time.perf_counter() - started
    return Row(
        "misses, Python client over Kafka (batches of 512)", len(texts) // 512, len(texts), seconds, []
    )


async def main_async(args: argparse.Namespace) -> int:
    from worker.engine.bundle import default_bundle_dir
    from worker.engine.cpu import read_cpu

    model_dir = Path(args.model or os.environ.get("EMBEDFLEET_MODEL") or default_bundle_dir())
    scale = 0.25 if args.quick else 1.0
    hit_texts = distinct_queries(2000)
    miss_count = int(args.miss_texts * scale) // args.batch * args.batch
    miss_gateway = distinct_queries(miss_count, skip=10_000)
    miss_kafka = distinct_queries(miss_count, skip=10_000 + miss_count)
    logs = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    cpu = read_cpu().model
    print(f"# bench/gateway.py on {os.cpu_count()} cores ({cpu}); logs in {logs}", flush=True)
    fleet = await start_fleet(args.bootstrap, args.redis_url, model_dir, logs, workers=args.workers)
    naive, naive_port = start_naive(model_dir, logs / "naive.log")
    rows: list[Row] = []
    try:
        gateway = fleet.start_gateway()
        await gateway.wait_ready()
        await wait_http(naive_port, "/healthz")
        port = gateway.metrics_port
        warm = Connection(port)
        for i in range(0, len(hit_texts), 256):  # the hit texts into the cache
            status, _ = await warm.post("/v1/embeddings", openai_body(hit_texts[i : i + 256]))
            assert status == 200
        await warm.close()
        rng = np.random.default_rng(1)
        count = int(args.hit_requests * scale)

        def hit_bodies(n: int, encoding: str = "float") -> list[bytes]:
            return [openai_body([hit_texts[i]], encoding) for i in rng.integers(0, len(hit_texts), n)]

        print("hits ...", flush=True)
        await closed_loop("warm-up", port, "/v1/embeddings", hit_bodies(500), 1, 8)
        for connections in args.concurrency:
            rows.append(
                await closed_loop(
                    f"hits, 1 text/request, {connections} connections",
                    port,
                    "/v1/embeddings",
                    hit_bodies(count),
                    1,
                    connections,
                )
            )
        rows.append(
            await closed_loop(
                "hits, 1 text/request, 32 connections, base64",
                port,
                "/v1/embeddings",
                hit_bodies(count, "base64"),
                1,
                32,
            )
        )
        rows.append(
            await open_loop(
                f"hits at {args.hit_rate:.0f} requests/s",
                port,
                hit_bodies(int(args.hit_rate * 10 * scale)),
                args.hit_rate,
            )
        )
        print("misses ...", flush=True)
        bodies = [
            openai_body(miss_gateway[i : i + args.batch], "base64")
            for i in range(0, len(miss_gateway), args.batch)
        ]
        rows.append(
            await closed_loop(
                f"misses, {args.batch} new texts/request, {args.miss_connections} connections",
                port,
                "/v1/embeddings",
                bodies,
                args.batch,
                args.miss_connections,
            )
        )
        rows.append(await fleet_through_kafka(fleet, miss_kafka))
        print("naive ...", flush=True)
        naive_texts = distinct_queries(int(args.naive_requests * scale), skip=30_000)
        seed_bodies = [json.dumps({"texts": [t]}).encode() for t in naive_texts]
        await closed_loop("naive warm-up", naive_port, "/embed", seed_bodies[:20], 1, 1)
        for connections in (1, 8):
            rows.append(
                await closed_loop(
                    f"naive (model per request), 1 text/request, {connections} connections",
                    naive_port,
                    "/embed",
                    seed_bodies,
                    1,
                    connections,
                )
            )
    finally:
        naive.terminate()
        naive.wait(timeout=30)
        for gateway_process in fleet.gateways:
            gateway_process.stop()
        fleet.stop_all()
        await fleet.cleanup()
    print("\n| run | requests | requests/s | texts/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())
    by_name = {row.name: row for row in rows}
    best_hits = max(r.rps for r in rows if r.name.startswith("hits, 1 text"))
    naive_best = max(r.rps for r in rows if r.name.startswith("naive"))
    paced = by_name[f"hits at {args.hit_rate:.0f} requests/s"]
    gateway_misses = next(r for r in rows if r.name.startswith("misses, ") and "Kafka" not in r.name)
    kafka_misses = next(r for r in rows if "Kafka" in r.name)
    checks = [
        ("hit requests/s per gateway (best) / 2,000", best_hits / 2000),
        ("hit requests/s / naive requests/s (best of each)", best_hits / naive_best),
        (f"5 ms... 3 ms / p50 at {args.hit_rate:.0f}/s", 3 / paced.pct(50)),
        (f"10 ms / p99 at {args.hit_rate:.0f}/s", 10 / paced.pct(99)),
        (
            "misses: gateway texts/s / Kafka client texts/s (target 0.85)",
            gateway_misses.tps / kafka_misses.tps,
        ),
    ]
    print("\n| ratio (>= 1 meets the target unless noted) | value |\n|---|---|")
    for name, value in checks:
        print(f"| {name.replace('5 ms... ', '')} | {value:.2f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("EMBEDFLEET_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument(
        "--redis-url", default=os.environ.get("EMBEDFLEET_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--model", help="bundle directory (default: the one `make model` builds)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--hit-requests", type=int, default=20_000)
    parser.add_argument("--hit-rate", type=float, default=200.0)
    parser.add_argument("--miss-texts", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--miss-connections", type=int, default=32)
    parser.add_argument("--naive-requests", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="a quarter of every count")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
