"""Rebalances in the worker with in-memory fakes for Kafka (no stack). On revoke: what runs
finishes, what is queued for the revoked partitions is dropped (left to the new owner), progress
is committed up to the first record not answered, and the partitions are let go. On assign: a
partition is processed only from where its take positioned it (records fetched before are not)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition

from tests.worker.test_decoder_and_pipeline import FakeEngine, jobs_of, record
from tests.worker.test_decoder_and_pipeline import tokenize as fake_tokenize
from worker.app import Worker
from worker.config import WorkerConfig
from worker.delivery import AtLeastOnce
from worker.engine.tokenize import TokenizedText
from worker.health import log_task_stacks
from worker.jobs import Job, Source

TOPIC = "embed.requests"
TP0, TP1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


@dataclass
class Manifest:
    name: str = "m"
    dim: int = 4
    max_tokens: int = 8
    prompts: dict[str, str] = field(default_factory=dict)
    matryoshka_dims: list[int] = field(default_factory=list)


class Engine(FakeEngine):
    manifest = Manifest()
    model_fingerprint = "f" * 64

    def tokenize(self, texts: Sequence[str], task: str | None = None) -> list[TokenizedText]:
        return fake_tokenize(texts, task)


class FakeConsumer:
    """The consumer side of a rebalance: assignment, committed offsets, seeks, pauses, commits."""

    def __init__(
        self, assignment: set[TopicPartition], committed: dict[TopicPartition, int] | None = None
    ) -> None:
        self._assignment = assignment
        self.committed_offsets = committed or {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    async def committed(self, tp: TopicPartition) -> int | None:
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        return self.committed_offsets.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.positions[tp] = 0

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused.difference_update(partitions)


class RecordingDelivery(AtLeastOnce):
    """The real at-least-once commits, recording which partitions the worker let go."""

    revoked_partitions: list[TopicPartition]

    async def revoked(self, partitions: list[TopicPartition]) -> None:
        self.revoked_partitions.extend(partitions)


# Worker() builds real aiokafka clients (never started) that the fakes below replace. Each test
# closes them, or they are collected unclosed later ("Unclosed AIOKafkaProducer", in another test).
_REPLACED: list[Callable[[], Awaitable[None]]] = []


@pytest.fixture(autouse=True)
async def close_the_replaced_kafka_clients() -> AsyncIterator[None]:
    yield
    while _REPLACED:
        await _REPLACED.pop()()


def worker_with_fakes() -> tuple[Worker, FakeConsumer, RecordingDelivery]:
    config = WorkerConfig.from_env({"EMBEDFLEET_REDIS_URL": "", "EMBEDFLEET_METRICS_PORT": "0"})
    worker = Worker(config, Engine())
    _REPLACED.extend([worker.consumer.stop, worker.delivery.close])
    consumer = FakeConsumer({TP0, TP1})
    delivery = RecordingDelivery(
        worker.delivery._producer,  # type: ignore[attr-defined]
        worker.publisher,
        worker.cluster,
        worker.metrics,
        consumer=consumer,
        offsets=worker.offsets,
    )
    delivery.revoked_partitions = []
    worker.consumer = consumer
    worker.delivery = delivery
    worker._owned = {TP0, TP1}
    return worker, consumer, delivery


def at(job: Job, tp: TopicPartition, offset: int) -> Job:
    return dataclasses.replace(job, source=Source(tp.topic, tp.partition, offset, 0))


async def test_a_revoke_finishes_running_work_drops_queued_work_and_commits_up_to_it() -> None:
    worker, consumer, delivery = worker_with_fakes()
    for offset in range(5):
        worker.offsets.track(TP0, offset, 100)
    worker.offsets.track(TP1, 10, 100)
    worker.offsets.done(TP0, 0)
    worker.offsets.done(TP0, 1)
    # Offset 2 is in a running batch; 3 and 4 (and TP1's 10) wait in the batcher.
    texts = jobs_of("three", "four", "ten")
    for job, (tp, offset) in zip(texts, [(TP0, 3), (TP0, 4), (TP1, 10)], strict=True):
        worker.batcher.add(at(job, tp, offset), 1)

    async def running_batch_finishes() -> None:
        await asyncio.sleep(0.05)
        worker.offsets.done(TP0, 2)

    running = asyncio.create_task(running_batch_finishes())
    await worker.on_revoked([TP0])
    assert running.done()  # the revoke waited for the running batch
    # Committed: TP0 up to its first unanswered record (3, dropped for the new owner); TP1 untouched
    # in the batcher and committed only up to its own first pending record.
    assert consumer.commits == [{TP0: 3, TP1: 10}]
    assert delivery.revoked_partitions == [TP0]
    assert worker.offsets.in_flight_of([TP0]) == 0 and worker.offsets.in_flight_of([TP1]) == 1
    left: list[Any] = worker.batcher.discard(lambda item: True)
    assert [item.source.offset for item in left] == [10]
    assert TP0 not in worker._owned and TP1 in worker._owned
    assert worker._fetch_allowed.is_set()  # fetching resumes after the revoke
    worker.processor.close()


async def test_a_revoke_of_nothing_only_marks_the_worker_not_ready() -> None:
    worker, consumer, delivery = worker_with_fakes()
    worker.health.group_joined = True
    await worker.on_revoked([])
    assert not worker.health.group_joined and consumer.commits == [] and delivery.revoked_partitions == []
    worker.processor.close()


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
    worker, consumer, _ = worker_with_fakes()
    consumer.committed_offsets = {TP1: 40}
    worker._owned = {TP0}
    await worker.on_assigned([TP1])
    assert TP1 in consumer.paused and TP1 not in worker._owned  # taken, not yet positioned
    # A fetch returned while the take ran: TP1's records (from aiokafka's own position) are dropped.
    early = worker._owned_records({**fetched(TP0, 7), **fetched(TP1, 35, 36)})
    assert [r.offset for r in early] == [7]
    await worker._position_taken()  # what the fetch loop does before its next fetch
    assert consumer.positions[TP1] == 40 and TP1 not in consumer.paused and TP1 in worker._owned
    assert [r.offset for r in worker._owned_records(fetched(TP1, 40, 41))] == [40, 41]
    worker.processor.close()


async def test_a_partition_revoked_before_it_is_positioned_is_let_go() -> None:
    worker, consumer, _ = worker_with_fakes()
    worker._owned = {TP0}
    await worker.on_assigned([TP1])
    consumer._assignment = {TP0}  # the next rebalance took TP1 away
    await worker._position_taken()
    assert TP1 not in worker._owned and TP1 not in consumer.positions and not worker._to_position
    worker.processor.close()


async def test_a_partition_without_a_committed_offset_is_read_from_its_beginning() -> None:
    worker, consumer, _ = worker_with_fakes()
    worker._owned = {TP0}
    await worker.on_assigned([TP1])
    await worker._position_taken()
    assert consumer.positions[TP1] == 0
    worker.processor.close()


async def test_a_rebalance_during_the_move_leaves_the_partition_to_the_next_round() -> None:
    """The committed offset is read over the network; a rebalance meanwhile may have replaced the
    assignment the seek would apply to, so the partition is positioned again in the next round."""
    worker, consumer, _ = worker_with_fakes()
    worker._owned = {TP0}
    consumer.committed_offsets = {TP1: 40}
    await worker.on_assigned([TP1])
    reading = asyncio.create_task(worker._position_taken())
    await asyncio.sleep(0)  # the offset is being read
    worker._rebalances += 1  # what on_revoked / on_assigned do when a rebalance begins
    await reading
    assert TP1 not in worker._owned and TP1 in worker._to_position and TP1 in consumer.paused
    await worker._position_taken()
    assert TP1 in worker._owned and consumer.positions[TP1] == 40
    worker.processor.close()
