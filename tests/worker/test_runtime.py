"""The worker's whole loop in memory: a real runtime (intake, decoder, batcher, pipeline, cache,
delivery, publisher, offsets) over an in-memory Kafka and Redis (tests/worker/kafka_fakes.py),
fetch -> batch -> cache -> engine -> publish -> ack -> commit, in well under a second."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from tests.worker.kafka_fakes import REQUESTS, Engine, FakeBroker, runtime_of
from worker.runtime import WorkerRuntime

TP0, TP1 = TopicPartition(REQUESTS, 0), TopicPartition(REQUESTS, 1)


class GatedEngine(Engine):
    """Holds every batch in the model until ``gate`` opens (a batch in flight during a revoke)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.before_batch = self._hold

    def _hold(self) -> None:
        self.entered.set()
        self.gate.wait(10)


def request(request_id: str, text: str) -> bytes:
    return json.dumps({"id": request_id, "text": text}).encode()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def stopped(runtime: WorkerRuntime, running: asyncio.Task[None]) -> None:
    runtime.stop()
    await asyncio.wait_for(running, 10)
    assert runtime.fatal is None


def successes(broker: FakeBroker) -> Counter[str]:
    return Counter(r["id"] for r in broker.results() if "error" not in r or r.get("error") is None)


async def test_every_request_is_answered_once_and_committed_after_its_ack() -> None:
    broker = FakeBroker()
    for i in range(40):
        broker.request(request(f"r{i}", f"text number {i % 25}"), partition=i % 2)  # 15 repeated texts
    broker.request(b"{not json", partition=1)
    runtime, parts, _ = runtime_of(broker, Engine())
    running = asyncio.create_task(runtime.run())
    await until(lambda: broker.committed.get(TP0) == 20 and broker.committed.get(TP1) == 21)
    await stopped(runtime, running)
    assert successes(broker) == Counter({f"r{i}": 1 for i in range(40)})
    [dead_letter] = broker.dead_letters()
    assert dict(dead_letter.headers)["dlq-source-offset"] == b"20" and dead_letter.value == b"{not json"
    assert parts.offsets.in_flight == 0
    # The repeated texts were computed once: from the batch's dedup or from the cache.
    assert parts.metrics.computed_texts._value.get() == 25
    # Results are keyed by content hash; the same text, the same key.
    keys = {r["id"]: r["key"] for r in broker.results()}
    assert keys["r0"] == keys["r25"] and keys["r0"] != keys["r1"]


async def test_a_second_round_of_the_same_texts_is_served_from_the_cache() -> None:
    broker = FakeBroker()
    for i in range(10):
        broker.request(request(f"first-{i}", f"cached text {i}"))
    runtime, parts, _ = runtime_of(broker, Engine())
    running = asyncio.create_task(runtime.run())
    await until(lambda: broker.committed.get(TP0) == 10)
    for i in range(10):
        broker.request(request(f"again-{i}", f"cached text {i}"))
    await until(lambda: broker.committed.get(TP0) == 20)
    await stopped(runtime, running)
    again = [r for r in broker.results() if r["id"].startswith("again-")]
    assert len(again) == 10 and all(r["cached"] for r in again)
    assert parts.metrics.computed_texts._value.get() == 10


async def test_a_publish_failure_is_sent_again_and_nothing_is_committed_before_its_ack() -> None:
    broker = FakeBroker(ack_failures=[KafkaTimeoutError(), KafkaTimeoutError()])
    for i in range(6):
        broker.request(request(f"r{i}", f"text {i}"))
    runtime, parts, _ = runtime_of(broker, Engine())
    running = asyncio.create_task(runtime.run())
    await until(lambda: broker.committed.get(TP0) == 6)
    await stopped(runtime, running)
    assert successes(broker) == Counter({f"r{i}": 1 for i in range(6)})
    assert parts.metrics.publish_retries._value.get() >= 1


async def test_a_revoke_during_a_batch_finishes_it_commits_it_and_leaves_the_rest() -> None:
    engine = GatedEngine()
    broker = FakeBroker()
    broker.request(request("running", "in the model when the revoke comes"), partition=0)
    runtime, parts, consumer = runtime_of(broker, engine)
    running = asyncio.create_task(runtime.run())
    await asyncio.to_thread(engine.entered.wait, 5)
    # More requests arrive while the first batch is in the model: they wait in the batcher.
    for i in range(5):
        broker.request(request(f"queued-{i}", f"queued text {i}"), partition=0)
    await until(lambda: parts.offsets.in_flight == 6)
    revoke = asyncio.create_task(consumer.revoke([TP0]))
    await asyncio.sleep(0.05)
    assert not revoke.done()  # the revoke waits for the batch in the model
    engine.gate.set()
    await asyncio.wait_for(revoke, 5)
    # Committed up to the running batch; the queued requests are left to the next owner.
    assert broker.committed[TP0] == 1
    assert successes(broker) == Counter({"running": 1})
    assert TP0 not in parts.intake.owned and parts.offsets.in_flight_of([TP0]) == 0
    await stopped(runtime, running)
    assert successes(broker) == Counter({"running": 1})  # nothing of TP0 published after the revoke


async def test_cache_hits_are_answered_while_a_miss_is_in_the_model_and_never_committed_past_it() -> None:
    engine = GatedEngine()
    engine.gate.set()
    broker = FakeBroker()
    for i in range(5):
        broker.request(request(f"first-{i}", f"cached text {i}"))
    runtime, parts, _ = runtime_of(broker, engine)
    running = asyncio.create_task(runtime.run())
    await until(lambda: broker.committed.get(TP0) == 5)
    engine.gate.clear()
    engine.entered.clear()
    broker.request(request("miss", "a text nobody asked for before"))  # offset 5: held in the model
    await asyncio.to_thread(engine.entered.wait, 5)
    for i in range(5):
        broker.request(request(f"hit-{i}", f"cached text {i}"))  # offsets 6-10
    await until(lambda: all(f"hit-{i}" in successes(broker) for i in range(5)))
    # Answered from the hit lane while the miss is still in the model; the commit waits for it.
    assert "miss" not in successes(broker)
    await asyncio.sleep(0.2)  # the commit loop's interval, twice
    assert broker.committed[TP0] == 5
    engine.gate.set()
    await until(lambda: broker.committed.get(TP0) == 11)
    await stopped(runtime, running)
    expected = {f"first-{i}": 1 for i in range(5)} | {f"hit-{i}": 1 for i in range(5)} | {"miss": 1}
    assert successes(broker) == Counter(expected)
    hits = [r for r in broker.results() if r["id"].startswith("hit-")]
    assert all(r["cached"] and r["tokens"] == 3 and not r.get("truncated") for r in hits)
    assert parts.metrics.hit_lane_size._sum.get() == 5
    assert parts.metrics.computed_texts._value.get() == 6
    # Every request's key counted once as looked up (the hit lane's lookup), its hit once.
    assert parts.metrics.cache_lookups._value.get() == 11
    assert parts.metrics.cache_hits._value.get() == 5


async def test_an_entry_at_the_models_token_limit_goes_the_batch_path_and_says_whether_it_was_cut() -> None:
    broker = FakeBroker()
    cut = "one two three four five six seven eight nine"  # 9 words: cut at the fake model's 8
    exact = "one two three four five six seven eight"  # exactly 8: not cut, same count
    runtime, parts, _ = runtime_of(broker, Engine())
    running = asyncio.create_task(runtime.run())
    for round_, committed in (("first", 2), ("again", 4)):
        broker.request(request(f"{round_}-cut", cut))
        broker.request(request(f"{round_}-exact", exact))
        await until(lambda committed=committed: broker.committed.get(TP0) == committed)  # type: ignore[misc]
    await stopped(runtime, running)
    by_id = {r["id"]: r for r in broker.results()}
    assert by_id["again-cut"]["cached"] and by_id["again-exact"]["cached"]
    assert by_id["again-cut"]["truncated"] and by_id["first-cut"]["truncated"]
    assert not by_id["again-exact"].get("truncated") and not by_id["first-exact"].get("truncated")
    assert all(by_id[i]["tokens"] == 8 for i in by_id)
    assert parts.metrics.hit_lane_size._sum.get() == 0  # neither can be answered without its tokens


async def test_the_fetch_loop_waits_only_while_more_hits_than_its_bound_are_unacknowledged() -> None:
    """Backpressure on the hit lane (worker.intake.HITS_AHEAD): small publications go on without
    waiting; past the bound the loop waits for the oldest ones, and only as many as needed."""
    from worker import intake as intake_module

    _, parts, _ = runtime_of(FakeBroker(), Engine())
    intake = parts.intake
    loop = asyncio.get_running_loop()
    bound = intake_module.HITS_AHEAD
    first, second, third = (loop.create_future() for _ in range(3))
    intake._answering.extend([(first, bound // 2), (second, bound // 2)])
    intake._answering_hits = bound
    await asyncio.wait_for(intake._hits_acknowledged(bound), 1)  # at the bound: no wait
    intake._answering.append((third, 1))
    intake._answering_hits += 1
    waiting = asyncio.create_task(intake._hits_acknowledged(bound))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # one past the bound: waits for the oldest
    first.set_result(None)
    await asyncio.wait_for(waiting, 1)
    assert [count for _, count in intake._answering] == [bound // 2, 1]
    assert intake._answering_hits == bound // 2 + 1
    second.set_exception(RuntimeError("a failed publication is the runtime's to handle"))
    third.set_result(None)
    await asyncio.wait_for(intake._hits_acknowledged(bound), 1)  # done ones are let go
    assert not intake._answering and intake._answering_hits == 0
