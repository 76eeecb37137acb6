"""Rebalances in the worker's runtime over the in-memory Kafka of tests/worker/kafka_fakes.py (no
stack, no private attribute). On revoke: what runs
finishes, what is queued for the revoked partitions is dropped (left to the new owner), progress
is committed up to the first record not answered, and the partitions are let go. On assign: a
partition is processed only from where its take positioned it (records fetched before are not)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition

from tests.worker.kafka_fakes import REQUESTS, Engine, FakeBroker, FakeConsumer, runtime_of
from tests.worker.test_decoder_and_pipeline import jobs_of, record
from worker.health import log_task_stacks
from worker.jobs import Job, Source
from worker.runtime import WorkerParts, WorkerRuntime

TP0, TP1 = TopicPartition(REQUESTS, 0), TopicPartition(REQUESTS, 1)


async def owning(*partitions: TopicPartition, committed: dict[TopicPartition, int] | None = None) -> Worker:
    """A runtime over the in-memory Kafka that owns ``partitions`` (assigned, taken, positioned)."""
    broker = FakeBroker(committed=dict(committed or {}))
    runtime, parts, consumer = runtime_of(broker, Engine())
    if partitions:
        await runtime.on_assigned(list(partitions))
        await parts.intake.position_taken()
    return Worker(runtime, parts, consumer, broker)


@dataclass
class Worker:
    runtime: WorkerRuntime
    parts: WorkerParts
    consumer: FakeConsumer
    broker: FakeBroker

    def close(self) -> None:
        self.parts.processor.close()


def at(job: Job, tp: TopicPartition, offset: int) -> Job:
    return dataclasses.replace(job, source=Source(tp.topic, tp.partition, offset, 0))


async def test_a_revoke_finishes_running_work_drops_queued_work_and_commits_up_to_it() -> None:
    worker = await owning(TP0, TP1)
    offsets, batcher = worker.parts.offsets, worker.parts.batcher
    for offset in range(5):
        offsets.track(TP0, offset, 100)
    offsets.track(TP1, 10, 100)
    offsets.done(TP0, 0)
    offsets.done(TP0, 1)
    # Offset 2 is in a running batch; 3 and 4 (and TP1's 10) wait in the batcher.
    texts = jobs_of("three", "four", "ten")
    for job, (tp, offset) in zip(texts, [(TP0, 3), (TP0, 4), (TP1, 10)], strict=True):
        batcher.add(at(job, tp, offset), 1)

    async def running_batch_finishes() -> None:
        await asyncio.sleep(0.05)
        offsets.done(TP0, 2)

    running = asyncio.create_task(running_batch_finishes())
    await worker.runtime.on_revoked([TP0])
    assert running.done()  # the revoke waited for the running batch
    # Committed: TP0 up to its first unanswered record (3, dropped for the new owner); TP1 untouched
    # in the batcher and committed only up to its own first pending record.
    assert worker.broker.committed == {TP0: 3, TP1: 10}
    assert offsets.in_flight_of([TP0]) == 0 and offsets.in_flight_of([TP1]) == 1
    left: list[Any] = batcher.discard(lambda item: True)
    assert [item.source.offset for item in left] == [10]
    assert worker.parts.intake.owned == {TP1}
    assert not worker.parts.intake.fetch_held  # fetching resumes after the revoke
    worker.close()


async def test_a_revoke_of_nothing_only_marks_the_worker_not_ready() -> None:
    worker = await owning(TP0)
    assert worker.runtime.health.group_joined
    await worker.runtime.on_revoked([])
    assert not worker.runtime.health.group_joined and worker.broker.committed == {}
    assert worker.parts.intake.owned == {TP0}
    worker.close()


async def test_sigusr1_logs_where_every_task_waits(caplog: pytest.LogCaptureFixture) -> None:
    """What the fault tests' diagnosis asks a stuck worker: each task and its chain of awaits."""
    gate = asyncio.Event()

    async def inner_wait() -> None:
        await gate.wait()

    async def outer() -> None:
        await inner_wait()

    task = asyncio.create_task(outer(), name="stuck-task")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="worker.health"):
        log_task_stacks()
    gate.set()
    await task
    [line] = [r.getMessage() for r in caplog.records if "stuck-task" in r.getMessage()]
    assert "outer" in line and "inner_wait" in line and line.index("outer") < line.index("inner_wait")


def fetched(tp: TopicPartition, *offsets: int) -> dict[TopicPartition, list[Any]]:
    return {tp: [record(b"{}", offset) for offset in offsets]}


async def test_a_taken_partition_is_processed_only_from_its_committed_offset() -> None:
    """aiokafka fetches a new assignment before the rebalance callback has taken it (for
    exactly-once: before the previous owner is fenced), from a position that may be stale by then.
    The worker holds the partition, takes it, and only between two fetches moves it to its
    committed offset and owns it: records fetched before that are dropped and read again from the
    committed offset; none is skipped, none is processed from the stale position."""
    worker = await owning(TP0, committed={TP1: 40})
    intake, consumer = worker.parts.intake, worker.consumer
    await worker.runtime.on_assigned([TP1])
    assert TP1 in consumer.paused() and TP1 not in intake.owned  # taken, not yet positioned
    # A fetch returned while the take ran: TP1's records (from aiokafka's own position) are dropped.
    early = intake.owned_records({**fetched(TP0, 7), **fetched(TP1, 35, 36)})
    assert [r.offset for r in early] == [7]
    await intake.position_taken()  # what the fetch loop does before its next fetch
    assert consumer.position_of(TP1) == 40 and TP1 not in consumer.paused() and TP1 in intake.owned
    assert [r.offset for r in intake.owned_records(fetched(TP1, 40, 41))] == [40, 41]
    worker.close()


async def test_a_partition_revoked_before_it_is_positioned_is_let_go() -> None:
    worker = await owning(TP0)
    await worker.runtime.on_assigned([TP1])
    worker.consumer.take_away([TP1])  # the next rebalance took TP1 away
    await worker.parts.intake.position_taken()
    intake = worker.parts.intake
    assert TP1 not in intake.owned and not intake.waiting_for_position
    assert worker.consumer.position_of(TP1) is None
    worker.close()


async def test_a_partition_without_a_committed_offset_is_read_from_its_beginning() -> None:
    worker = await owning(TP0)
    await worker.runtime.on_assigned([TP1])
    await worker.parts.intake.position_taken()
    assert worker.consumer.position_of(TP1) == 0
    worker.close()


async def test_a_rebalance_during_the_move_leaves_the_partition_to_the_next_round() -> None:
    """The committed offset is read over the network; a rebalance meanwhile may have replaced the
    assignment the seek would apply to, so the partition is positioned again in the next round."""
    worker = await owning(TP0, committed={TP1: 40})
    intake = worker.parts.intake
    await worker.runtime.on_assigned([TP1])
    reading = asyncio.create_task(intake.position_taken())
    await asyncio.sleep(0)  # the offset is being read
    intake.rebalance_begins()  # what on_revoked / on_assigned do when a rebalance begins
    await reading
    assert TP1 not in intake.owned and TP1 in intake.waiting_for_position and TP1 in worker.consumer.paused()
    await intake.position_taken()
    assert TP1 in intake.owned and worker.consumer.position_of(TP1) == 40
    worker.close()


async def test_records_of_a_partition_revoked_while_they_were_decoded_are_dropped() -> None:
    """The revoke runs while the fetch loop awaits the decode thread: what it decoded for the
    revoked partition must not reach the batcher. In exactly-once mode such a stale item once
    committed its partition's offset past the records the revoke had left to the next owner."""
    worker = await owning(TP0)
    stale = dataclasses.replace(record(b'{"id": "r1", "text": "late"}', 7), partition=TP1.partition)
    kept = record(b'{"id": "r2", "text": "kept"}', 8)
    await worker.parts.intake.take([stale, kept])
    queued: list[Any] = worker.parts.batcher.discard(lambda item: True)
    assert [(item.source.partition, item.source.offset) for item in queued] == [(0, 8)]
    worker.close()


async def test_a_revoke_waits_for_the_fetch_being_taken_before_it_drops_the_queued_records() -> None:
    """A revoke drops the queued records of its partitions (left to the new owner). A fetch being
    decoded off the loop at that moment must land in the batcher before the drop: added after
    it, its later records would be cut and committed past the dropped earlier ones (exactly-once:
    a transaction covering offsets the new owner then never reads; seen as 130 lost results in
    the frozen-zombie test)."""
    import json
    import time

    from tests.worker.test_decoder_and_pipeline import record

    worker = await owning(TP0)
    offsets, batcher = worker.parts.offsets, worker.parts.batcher
    for job, offset in zip(jobs_of("zero", "one"), (0, 1), strict=True):
        offsets.track(TP0, offset, 100)
        batcher.add(at(job, TP0, offset), 1)
    # Two records large enough to be read on the decode thread, which is busy for a moment.
    big = "word " * 30_000
    fetched = [record(json.dumps({"id": f"r{o}", "text": big}).encode(), offset=o) for o in (2, 3)]
    worker.parts.decode_executor.submit(time.sleep, 0.3)
    taking = asyncio.create_task(worker.parts.intake.take(fetched))
    await asyncio.sleep(0.05)
    assert not taking.done()  # waiting for the decode thread
    await asyncio.wait_for(worker.runtime.on_revoked([TP0]), 10)
    assert taking.done()  # the revoke waited for it
    left: list[Any] = batcher.discard(lambda item: True)
    assert left == []  # all four dropped together: nothing of TP0 is cut after the revoke
    assert offsets.in_flight_of([TP0]) == 0
    assert TP0 not in worker.broker.committed or worker.broker.committed[TP0] == 0
    worker.close()
