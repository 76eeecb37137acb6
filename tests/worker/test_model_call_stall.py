"""A hung model call fails /healthz (worker.health.ModelCalls): nothing in the process can interrupt
a thread stuck in an inference runtime's native code, so liveness is how the orchestrator learns
of it. The pipeline times its real calls, in the inference thread; the health server answers 503
while one runs past the limit and 200 again once it returns."""

from __future__ import annotations

import asyncio
import json
import threading

from tests.worker.test_decoder_and_pipeline import FakeEngine, decoder, record
from worker.cache import VectorCache
from worker.health import HealthServer, HealthState, ModelCalls
from worker.jobs import Job
from worker.metrics import WorkerMetrics
from worker.pipeline import BatchProcessor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_a_call_running_past_the_limit_is_a_stall() -> None:
    clock = Clock()
    calls = ModelCalls(stall_s=30, clock=clock)
    assert calls.longest_running_s() == 0.0 and not calls.stalled
    with calls.running():
        clock.now += 10
        with calls.running():  # a second call, side by side, started later
            clock.now += 25
            assert calls.longest_running_s() == 35 and calls.stalled
        assert calls.stalled  # the oldest is still running
    assert calls.longest_running_s() == 0.0 and not calls.stalled  # both returned
    off = ModelCalls(stall_s=0, clock=clock)
    with off.running():
        clock.now += 10_000
        assert off.longest_running_s() == 10_000 and not off.stalled  # 0 turns it off


def test_a_call_that_raises_is_no_longer_counted() -> None:
    calls = ModelCalls(stall_s=1, clock=Clock())
    try:
        with calls.running():
            raise RuntimeError("inference failed")
    except RuntimeError:
        pass
    assert calls.longest_running_s() == 0.0


async def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_hung_model_call_fails_liveness_until_it_returns() -> None:
    release = threading.Event()
    entered = threading.Event()

    def hang() -> None:  # in the inference thread, as a deadlocked runtime would
        entered.set()
        release.wait(timeout=30)

    engine = FakeEngine()
    engine.before_batch = hang
    metrics = WorkerMetrics()
    calls = ModelCalls(stall_s=0.2)
    processor = BatchProcessor(
        backend=engine,
        cache=VectorCache(None, key_prefix="p", model_name="m", ttl_s=0, metrics=metrics),
        metrics=metrics,
        model_name="m",
        inference_batch_size=32,
        token_budget=2048,
        model_calls=calls,
    )
    server = HealthServer(HealthState(model_loaded=True, model_calls=calls), lambda: b"", "127.0.0.1", 0)
    await server.start()
    try:
        assert await get(server.port, "/healthz") == (200, {"live": True})
        decoded = decoder().decode([record(json.dumps({"id": "a", "text": "some words"}).encode())])
        jobs = [job for job in decoded if isinstance(job, Job)]
        processing = asyncio.ensure_future(processor.process(jobs))
        assert await asyncio.to_thread(entered.wait, 10)
        assert await get(server.port, "/healthz") == (200, {"live": True})  # running, not stalled
        await asyncio.sleep(0.3)
        status, body = await get(server.port, "/healthz")
        assert status == 503 and body["live"] is False
        assert isinstance(body["model_call_running_s"], float) and body["model_call_running_s"] >= 0.2
        assert not processing.done()  # the call is still stuck: liveness is all that can tell
        release.set()
        outcome = await asyncio.wait_for(processing, timeout=10)
        assert [job.request.id for job, _ in outcome.results] == ["a"]
        assert await get(server.port, "/healthz") == (200, {"live": True})
    finally:
        release.set()
        await server.stop()
        processor.close()
