"""Outages longer than the client timeouts, long texts, and a truthful /readyz.

* Kafka down for 60 s (longer than the producer's 40 s request timeout): the workers stay up,
  say so on /readyz (503, "kafka": "unreachable", embedfleet_ready 0) and resume by themselves.
* Redis down: the workers stay ready and say the cache is degraded.
* A backlog of 2000 requests of 64 KiB: decoding and tokenizing stay off the event loop, so
  /healthz keeps answering, nobody is expelled from the group and memory stays bounded.
* A bug (an exception the pipeline does not expect) stops the worker with exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.faults.conftest import (
    FaultLedger,
    FaultReport,
    audit_fleet,
    run_scenario,
    scenario_texts,
    stack,
)
from tests.faults.test_poison_records import MEMORY_LIMIT_MB
from tests.fleet import Fleet, FleetIO, WorkerProcess
from worker.app import serve
from worker.config import WorkerConfig
from worker.engine.embedder import EmbedOutput
from worker.engine.tokenize import Span, TokenizedText

OUTAGE_S = 60


def readyz(worker: WorkerProcess) -> tuple[int, dict[str, Any]]:
    status, body = worker.http("/readyz")
    return status, json.loads(body)


async def test_kafka_down_longer_than_the_request_timeout(
    two_workers: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    seen: dict[str, Any] = {}

    async def outage() -> str:
        await asyncio.to_thread(stack, "down", "kafka")
        try:
            deadline = time.monotonic() + OUTAGE_S
            while time.monotonic() < deadline:
                for worker in two_workers.workers:
                    assert worker.alive, f"{worker.name} exited during the outage:\n{worker.log()[-2000:]}"
                    status, body = await asyncio.to_thread(readyz, worker)
                    if status == 503 and body["kafka"] == "unreachable":
                        seen.setdefault(worker.name, time.monotonic() - (deadline - OUTAGE_S))
                        seen[f"{worker.name}-gauge"] = worker.metric("embedfleet_ready")
                await asyncio.sleep(1)
        finally:
            await asyncio.to_thread(stack, "up", "kafka")
        return f"Kafka stopped for {OUTAGE_S} s"

    try:
        _, ids, stall, notes = await run_scenario(
            two_workers, scenario_texts(shared_dir, 2000), outage, at_fraction=0.3, timeout_s=400
        )
    finally:
        await asyncio.to_thread(stack, "up", "kafka")
    found = await audit_fleet(two_workers)
    not_ready_after = [round(seen[w.name], 1) for w in two_workers.workers if w.name in seen]
    row = FaultReport(
        f"Kafka down {OUTAGE_S} s",
        len(ids),
        found.answered(ids),
        found.missing(ids),
        found.duplicates(ids),
        stall,
        f"{notes}; /readyz 503 after {not_ready_after} s",
        peak_rss_mb=two_workers.peak_rss_mb(),
    )
    fault_ledger.rows.append(row)
    assert row.missing == 0
    assert all(w.alive for w in two_workers.workers)
    assert len(not_ready_after) == 2, "a worker stayed ready with Kafka down"
    assert all(seen[f"{w.name}-gauge"] == 0 for w in two_workers.workers)
    await two_workers.wait_ready(timeout_s=60)  # ready again by itself
    for worker in two_workers.workers:
        assert worker.metric("embedfleet_ready") == 1


async def test_redis_down_is_degraded_not_unready(two_workers: Fleet, shared_dir: Path) -> None:
    worker = two_workers.workers[0]
    await asyncio.to_thread(stack, "down", "redis")
    try:
        async with FleetIO(two_workers) as io:
            await io.wait_for(await io.send_texts([f"during the outage {uuid.uuid4().hex}"]), timeout_s=60)
        deadline = time.monotonic() + 15
        while True:
            status, body = await asyncio.to_thread(readyz, worker)
            if body["cache"] == "degraded" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert (status, body["cache"]) == (200, "degraded")
        assert worker.metric("embedfleet_ready") == 1 and worker.metric("embedfleet_cache_up") == 0
    finally:
        await asyncio.to_thread(stack, "up", "redis")
    deadline = time.monotonic() + 20
    while (await asyncio.to_thread(readyz, worker))[1]["cache"] != "ok":
        assert time.monotonic() < deadline, "the cache never came back on /readyz"
        await asyncio.sleep(0.5)


def long_texts(shared_dir: Path, distinct: int, size: int) -> list[str]:
    """Texts of ``size`` UTF-8 bytes made of real corpus documents."""
    docs = [json.loads(line) for line in (shared_dir / "corpus" / "docs.jsonl").read_text().splitlines()]
    docs = [d if isinstance(d, str) else d.get("text", "") for d in docs]
    rng = random.Random(7)
    texts = []
    for i in range(distinct):
        parts = [f"{uuid.uuid4().hex} {i}"]
        while sum(len(p.encode()) + 1 for p in parts) < size:
            parts.append(rng.choice(docs))
        texts.append(" ".join(parts).encode()[:size].decode("utf-8", "ignore"))
    return texts


async def test_a_backlog_of_64_kib_texts_never_blocks_the_loop(
    two_workers: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    assignments = two_workers.metric("embedfleet_assignments_total")
    texts = long_texts(shared_dir, 50, 64 * 1024 - 16)
    probes: list[float] = []
    stop = asyncio.Event()

    async def probe_health() -> None:
        while not stop.is_set():
            for worker in two_workers.workers:
                started = time.monotonic()
                status, _ = await asyncio.to_thread(worker.http, "/healthz")
                assert status == 200
                probes.append(time.monotonic() - started)
            await asyncio.sleep(0.05)

    async with FleetIO(two_workers) as io:
        prober = asyncio.create_task(probe_health())
        started = time.monotonic()
        ids = await io.send_texts(texts[i % len(texts)] for i in range(2000))
        await io.wait_for(ids, timeout_s=600)
        elapsed = time.monotonic() - started
        stop.set()
        await prober
    found = await audit_fleet(two_workers)
    p99 = float(np.percentile(probes, 99))
    loop_lag = [
        w.metric("embedfleet_event_loop_lag_seconds_sum")
        / max(1.0, w.metric("embedfleet_event_loop_lag_seconds_count"))
        for w in two_workers.workers
    ]
    row = FaultReport(
        "backlog: 2000 requests of 64 KiB",
        len(ids),
        found.answered(ids),
        found.missing(ids),
        found.duplicates(ids),
        0.0,
        f"{elapsed:.0f} s; /healthz p50 {statistics.median(probes) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms over {len(probes)} probes; mean loop lag "
        f"{max(loop_lag) * 1000:.1f} ms; no new assignment",
        peak_rss_mb=two_workers.peak_rss_mb(),
    )
    fault_ledger.rows.append(row)
    assert row.missing == 0 and row.duplicates == 0
    assert two_workers.metric("embedfleet_assignments_total") == assignments, "a worker was expelled"
    assert p99 < 1.0, f"/healthz p99 {p99:.2f} s: the event loop was blocked"
    assert row.peak_rss_mb < MEMORY_LIMIT_MB
    truncated = sum(bool(r[-1].get("truncated")) for r in io.results.values())
    assert truncated == len(ids)  # every 64 KiB text is longer than the model reads, and says so


@dataclass
class _Manifest:
    name: str = "broken-model"
    dim: int = 4
    max_tokens: int = 8
    prompts: dict[str, str] | None = None
    matryoshka_dims: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.prompts = {}


class _BrokenEngine:
    """An engine with a bug: it returns fewer vectors than it was given texts."""

    manifest = _Manifest()
    model_fingerprint = "f" * 64
    variant = "test"

    def tokenize(self, texts: Sequence[str], task: str | None = None) -> list[TokenizedText]:
        return [TokenizedText([101, 102], False) for _ in texts]

    def windows(self, text: str, task: str | None, overlap: int) -> list[Span]:
        return [Span(0, len(text))]

    def embed_tokenized(
        self,
        tokenized: Sequence[TokenizedText],
        texts: Sequence[str],
        dimensions: int | None = None,
        batch_size: int = 32,
        token_budget: int = 2048,
    ) -> EmbedOutput:
        return EmbedOutput(np.ones((0, 4), np.float32), [], [])


async def test_a_bug_in_the_engine_is_answered_per_record_and_the_worker_goes_on(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    """An exception the pipeline does not expect is per-record (worker.failures): the batch's
    requests get internal_error and a dead letter, and the worker serves on (it once exited with
    status 1 and left the records to the next worker, which met the same bug)."""
    fleet = Fleet(kafka_bootstrap, redis_url, model_dir, tmp_path)
    await fleet.create_topics()
    try:
        config = WorkerConfig.from_env(
            fleet.env({"EMBEDFLEET_METRICS_PORT": "0", "EMBEDFLEET_WORKER_ID": f"broken-{fleet.tag}"})
        )
        async with FleetIO(fleet) as io:
            worker = asyncio.create_task(serve(config, _BrokenEngine()))  # type: ignore[arg-type]
            first = await io.send_texts(["this text meets a bug"])
            await io.wait_for(first, timeout_s=90)
            assert not worker.done(), "the worker stopped on a bug in one batch"
            later = await io.send_texts([f"and so does this one {i}" for i in range(3)])
            results = await io.wait_for(later, timeout_s=60)
            await io.wait_for_dead_letters(4)
            assert not worker.done()
            os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: a graceful stop
            status = await asyncio.wait_for(worker, timeout=60)
        assert status == 0
        for request_id in [*first, *later]:
            [result] = io.results[request_id]  # one answer each, and it is an error
            assert result["error"]["code"] == "internal_error", result
        assert all(r["error"]["code"] == "internal_error" for r in results.values())
        assert sorted(h["dlq-error-code"] for _, h in io.dead_letters) == [b"internal_error"] * 4
    finally:
        await fleet.cleanup()
