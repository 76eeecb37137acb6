"""The revoke path of the worker with in-memory fakes for Kafka (no stack): what runs finishes,
what is queued for the revoked partitions is dropped (left to the new owner), progress is
committed up to the first record not answered, and the partitions are let go."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition

from tests.worker.test_decoder_and_pipeline import FakeEngine, jobs_of
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
    """The consumer side of the revoke: its assignment and the offsets committed."""

    def __init__(self, assignment: set[TopicPartition]) -> None:
        self._assignment = assignment
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


class RecordingDelivery(AtLeastOnce):
    """The real at-least-once commits, recording which partitions the worker let go."""

    revoked_partitions: list[TopicPartition]

    async def revoked(self, partitions: list[TopicPartition]) -> None:
        self.revoked_partitions.extend(partitions)


def worker_with_fakes() -> tuple[Worker, FakeConsumer, RecordingDelivery]:
    config = WorkerConfig.from_env({"EMBEDFLEET_REDIS_URL": "", "EMBEDFLEET_METRICS_PORT": "0"})
    worker = Worker(config, Engine())
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
