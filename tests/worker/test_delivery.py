"""Both delivery strategies with in-memory fakes for the producer, the consumer and the publisher:
ordering, fencing, retries, offset commits and the "did the lost commit go through?" check,
without a broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaTimeoutError, ProducerFenced

from schemas import ContentType, EmbedRequest, ErrorCode, RequestError
from worker.delivery import AtLeastOnce, BatchWork, ExactlyOnce
from worker.jobs import RawMessage, Rejection, Source
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.publisher import Outgoing

TOPIC = "embed.requests"


class FakeProducer:
    def __init__(self, transactional_id: str, log: list[str], fail: dict[str, list[BaseException]]) -> None:
        self.transactional_id = transactional_id
        self.log = log
        self.fail = fail  # operation -> errors to raise, in order

    def _do(self, operation: str) -> None:
        self.log.append(f"{self.transactional_id} {operation}")
        errors = self.fail.get(operation)
        if errors:
            raise errors.pop(0)

    async def start(self) -> None:
        self._do("start")

    async def stop(self) -> None:
        self._do("stop")

    async def begin_transaction(self) -> None:
        self._do("begin")

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int], group: str) -> None:
        self._do(f"offsets {offsets[next(iter(offsets))]}")

    async def commit_transaction(self) -> None:
        self._do("commit")

    async def abort_transaction(self) -> None:
        self._do("abort")


class FakePublisher:
    def __init__(self, ack_errors: list[BaseException] | None = None) -> None:
        self.sent = 0
        self.ack_errors = ack_errors or []

    async def prepare(self, results: Any, rejections: Any) -> Outgoing:
        return Outgoing()

    async def send(self, producer: Any, outgoing: Outgoing) -> list[tuple[str, asyncio.Future[Any]]]:
        self.sent += 1
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.ack_errors:
            ack.set_exception(self.ack_errors.pop(0))
        else:
            ack.set_result(None)
        return [("embed.results", ack)]


class FakeCluster:
    def forget(self, topic: str) -> None:
        pass


class FakeConsumer:
    def __init__(self, committed: dict[TopicPartition, int], log: list[str] | None = None) -> None:
        self.committed_offsets = committed
        self.positions: dict[TopicPartition, int] = {}
        self.log = log if log is not None else []
        self.assigned: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail_commits: list[BaseException] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))
        if self.fail_commits:
            raise self.fail_commits.pop(0)

    async def committed(self, tp: TopicPartition) -> int | None:
        self.log.append(f"committed {tp.partition}")
        return self.committed_offsets.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.positions[tp] = 0


def rejection(partition: int, offset: int) -> Rejection:
    error = RequestError(ErrorCode.EMPTY_TEXT, "empty", "r")
    return Rejection(
        Source(TOPIC, partition, offset, 0),
        RawMessage(None, b"{}", []),
        error,
        "embed.results",
        ContentType.JSON,
        request=EmbedRequest(id="r", text=" "),
    )


def work(*items: tuple[int, int]) -> BatchWork:
    rejections = [rejection(p, o) for p, o in items]
    return BatchWork(rejections, [], rejections)


def exactly_once(
    fail: dict[str, list[BaseException]] | None = None,
    committed: dict[TopicPartition, int] | None = None,
) -> tuple[ExactlyOnce, list[str], FakeConsumer]:
    log: list[str] = []
    consumer = FakeConsumer(committed or {}, log)
    delivery = ExactlyOnce(
        consumer=consumer,
        publisher=FakePublisher(),
        cluster=FakeCluster(),
        metrics=WorkerMetrics(),
        group_id="g",
        new_producer=lambda tid: FakeProducer(tid, log, fail or {}),
    )
    return delivery, log, consumer


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.delivery._backoff", lambda attempt: 0.0)


async def test_exactly_once_takes_a_partition_only_once_its_previous_owner_is_fenced() -> None:
    tp0, tp1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    delivery, log, _ = exactly_once(committed={tp0: 40})
    assert await delivery.assigned([tp0, tp1]) == set()
    # assigned() returns once the new epoch is in place (start() alone returns before
    # InitProducerId has ended the previous owner's transaction; beginning one waits for it), so
    # the committed offset the worker reads next is final.
    assert [line for line in log if "-0 " in line] == [
        "embedfleet-g-embed.requests-0 start",
        "embedfleet-g-embed.requests-0 begin",
        "embedfleet-g-embed.requests-0 abort",
    ]


async def test_exactly_once_commits_each_partition_with_its_offsets() -> None:
    tp0, tp1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    delivery, log, _ = exactly_once()
    await delivery.assigned([tp0, tp1])
    log.clear()
    delivered = await delivery.deliver(0, work((0, 5), (0, 6), (1, 9)))
    assert delivered.lost == set()
    assert [line for line in log if "-0 " in line] == [
        "embedfleet-g-embed.requests-0 begin",
        "embedfleet-g-embed.requests-0 offsets 7",
        "embedfleet-g-embed.requests-0 commit",
    ]
    assert "embedfleet-g-embed.requests-1 offsets 10" in log


async def test_a_fenced_worker_gives_the_partition_up_and_never_publishes_it_again() -> None:
    tp0 = TopicPartition(TOPIC, 0)
    delivery, log, _ = exactly_once(fail={"commit": [ProducerFenced()]})
    await delivery.assigned([tp0])
    assert (await delivery.deliver(0, work((0, 1)))).lost == {tp0}
    log.clear()
    assert (await delivery.deliver(1, work((0, 2)))).lost == {tp0}
    assert log == []  # nothing sent for a partition that is not this worker's
    assert delivery.reclaimable({tp0}) == []  # not yet: a new owner would have revoked it first


async def test_a_failed_commit_is_retried_unless_it_went_through() -> None:
    tp0 = TopicPartition(TOPIC, 0)
    # The commit times out but had reached the broker: the fresh producer's committed offset says so.
    delivery, log, consumer = exactly_once(fail={"commit": [KafkaTimeoutError()]})
    await delivery.assigned([tp0])
    consumer.committed_offsets[tp0] = 4
    assert (await delivery.deliver(0, work((0, 3)))).lost == set()
    assert log.count("embedfleet-g-embed.requests-0 commit") == 1  # not sent twice
    assert log.count("embedfleet-g-embed.requests-0 start") == 2  # a fresh producer ended it
    # It had not gone through: the batch is published again, in a new transaction.
    delivery, log, consumer = exactly_once(fail={"commit": [KafkaTimeoutError()]})
    await delivery.assigned([tp0])
    assert (await delivery.deliver(0, work((0, 3)))).lost == set()
    assert log.count("embedfleet-g-embed.requests-0 commit") == 2
    assert "embedfleet-g-embed.requests-0 abort" in log


async def test_a_transaction_retrying_across_a_revoke_never_uses_the_next_owners_producer() -> None:
    """The partition is revoked and assigned back to this worker while a batch's transaction is
    still failing: that batch is lost (its records are read again from the committed offset), and
    the producer of the new ownership is neither replaced nor stopped by it."""
    tp0 = TopicPartition(TOPIC, 0)
    delivery, log, _ = exactly_once(fail={"commit": [KafkaTimeoutError()]})
    await delivery.assigned([tp0])
    retried = asyncio.Event()
    real_backoff_sleep = asyncio.sleep

    async def revoke_and_take_back(seconds: float) -> None:
        if not retried.is_set():
            retried.set()
            await delivery.revoked([tp0])
            await delivery.assigned([tp0])
        await real_backoff_sleep(0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("worker.delivery.asyncio.sleep", revoke_and_take_back)
        log.clear()
        delivered = await delivery.deliver(0, work((0, 3)))
    assert delivered.lost == {tp0}
    # One start: the new ownership's producer. The old batch did not start another one.
    assert log.count("embedfleet-g-embed.requests-0 start") == 1
    assert log.count("embedfleet-g-embed.requests-0 commit") == 1  # the failed one, never again
    log.clear()
    assert (await delivery.deliver(1, work((0, 3)))).lost == set()
    assert log == [
        "embedfleet-g-embed.requests-0 begin",
        "embedfleet-g-embed.requests-0 offsets 4",
        "embedfleet-g-embed.requests-0 commit",
    ]  # the new owner's producer, still running


async def test_batches_publish_in_the_order_they_were_cut() -> None:
    tp0 = TopicPartition(TOPIC, 0)
    delivery, log, _ = exactly_once()
    await delivery.assigned([tp0])
    log.clear()
    later = asyncio.create_task(delivery.deliver(1, work((0, 8))))
    await asyncio.sleep(0.01)
    assert log == []  # batch 1 waits for batch 0
    await delivery.deliver(0, work((0, 7)))
    await later
    offsets = [line for line in log if "offsets" in line]
    assert offsets == ["embedfleet-g-embed.requests-0 offsets 8", "embedfleet-g-embed.requests-0 offsets 9"]


async def test_at_least_once_sends_again_until_acknowledged() -> None:
    publisher = FakePublisher(ack_errors=[KafkaTimeoutError(), KafkaTimeoutError()])
    delivery = AtLeastOnce(
        FakeProducer("p", [], {}),
        publisher,
        FakeCluster(),
        WorkerMetrics(),
        consumer=FakeConsumer({}),
        offsets=OffsetTracker(),
    )
    delivered = await delivery.deliver(0, work((0, 1)))
    assert delivered.lost == set() and publisher.sent == 3


async def test_at_least_once_commits_up_to_the_first_unanswered_record_of_assigned_partitions() -> None:
    tp0, tp1, gone = (TopicPartition(TOPIC, p) for p in (0, 1, 2))
    consumer = FakeConsumer({})
    consumer.assigned = {tp0, tp1}
    consumer.fail_commits = [CommitFailedError("rebalancing")]
    offsets: OffsetTracker[TopicPartition] = OffsetTracker()
    for tp, offset in [(tp0, 5), (tp0, 6), (tp0, 7), (tp1, 3), (gone, 9)]:
        offsets.track(tp, offset)
    for tp, offset in [(tp0, 5), (tp0, 7), (tp1, 3), (gone, 9)]:
        offsets.done(tp, offset)
    metrics = WorkerMetrics()
    delivery = AtLeastOnce(
        FakeProducer("p", [], {}), FakePublisher(), FakeCluster(), metrics, consumer=consumer, offsets=offsets
    )
    await delivery.commit()  # refused (a rebalance): nothing is marked committed, it is tried again
    await delivery.commit()
    assert consumer.commits == [{tp0: 6, tp1: 4}, {tp0: 6, tp1: 4}]  # 6 is not answered yet
    await delivery.commit()
    assert len(consumer.commits) == 2  # nothing moved: nothing sent
    assert metrics.commits.labels("failed")._value.get() == 1
