"""Both delivery strategies with in-memory fakes for the producer, the consumer and the publisher:
ordering, fencing, retries, offset commits and the "did the lost commit go through?" check,
without a broker."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaTimeoutError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from schemas import ContentType, EmbedRequest, ErrorCode, RequestError
from worker.delivery import AtLeastOnce, BatchWork, ExactlyOnce
from worker.jobs import RawMessage, Rejection, Source
from worker.metrics import WorkerMetrics
from worker.offsets import ConsumedOffsets, OffsetTracker
from worker.publisher import Outgoing, Part, Plan, Send

TOPIC = "embed.requests"


class FakeProducer:
    def __init__(self, transactional_id: str, log: list[str], fail: dict[str, list[BaseException]]) -> None:
        self.transactional_id = transactional_id
        self.log = log
        self.fail = fail  # operation -> errors to raise, in order
        self.last_offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        self.tokens: list[str] = []

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

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, OffsetAndMetadata], group: str
    ) -> None:
        self.last_offsets = dict(offsets)
        self.tokens.extend(o.metadata for o in offsets.values())
        self._do(f"offsets {next(iter(offsets.values())).offset}")

    async def commit_transaction(self) -> None:
        self._do("commit")

    async def abort_transaction(self) -> None:
        self._do("abort")


class FakePublisher:
    def __init__(self, ack_errors: list[BaseException] | None = None) -> None:
        self.sent = 0
        self.ack_errors = ack_errors or []

    async def prepare(self, results: Any, rejections: Any, plan: Plan | None = None) -> Outgoing:
        source = Source(TOPIC, 0, 0, 0)
        return Outgoing(sends=[Send("embed.results", 0, [(b"k", b"v", [])], [(source, Part.RESULT)])])

    async def send(self, producer: Any, sends: Sequence[Send]) -> list[tuple[Send, asyncio.Future[Any]]]:
        self.sent += 1
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.ack_errors:
            ack.set_exception(self.ack_errors.pop(0))
        else:
            ack.set_result(None)
        return [(send, ack) for send in sends[:1]] + [(send, _acked()) for send in sends[1:]]

    def is_reply_topic(self, topic: str) -> bool:
        return topic not in ("embed.results", "embed.requests.dlq")


def _acked() -> asyncio.Future[Any]:
    ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    ack.set_result(None)
    return ack


class FakeCluster:
    def __init__(self) -> None:
        self.quarantined: dict[str, str] = {}
        self.committed: dict[TopicPartition, OffsetAndMetadata] = {}

    async def committed_offset(self, group_id: str, tp: TopicPartition) -> OffsetAndMetadata | None:
        return self.committed.get(tp)

    def forget(self, topic: str) -> None:
        pass

    def quarantine(self, topic: str, why: str) -> None:
        self.quarantined[topic] = why

    async def probe(self, timeout_s: float = 5.0) -> bool:
        return True

    async def vet_for_transactions(self, topics: Any) -> None:
        return None


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


@dataclass
class ExactlyOnceRig:
    cluster: FakeCluster
    offsets: OffsetTracker[TopicPartition]
    producers: list[FakeProducer]


def exactly_once(
    fail: dict[str, list[BaseException]] | None = None,
) -> tuple[ExactlyOnce, list[str], ExactlyOnceRig]:
    log: list[str] = []
    rig = ExactlyOnceRig(FakeCluster(), OffsetTracker(), [])

    def new_producer(tid: str) -> Any:
        rig.producers.append(FakeProducer(tid, log, fail or {}))
        return rig.producers[-1]

    delivery = ExactlyOnce(
        offsets=rig.offsets,
        publisher=FakePublisher(),
        cluster=rig.cluster,
        metrics=WorkerMetrics(),
        group_id="g",
        new_producer=new_producer,
    )
    return delivery, log, rig


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.delivery._backoff", lambda attempt: 0.0)


async def test_exactly_once_takes_a_partition_only_once_its_previous_owner_is_fenced() -> None:
    tp0, tp1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    delivery, log, _ = exactly_once()
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


def tracked(rig: ExactlyOnceRig, *items: tuple[int, int]) -> BatchWork:
    """A batch cut now: it carries the offsets room's generation of its partitions."""
    batch = work(*items)
    batch.generations = {
        tp: rig.offsets.generation(tp) for tp in {TopicPartition(TOPIC, p) for p, _ in items}
    }
    return batch


async def test_a_batch_cut_before_its_partition_was_revoked_and_taken_back_is_not_committed() -> None:
    """A batch still in the model when its partition is revoked and assigned back: committed
    under the new ownership, its offset would move the group's position backwards (the new
    owner's records past it answered twice) or past records still in flight (lost on the next
    rebalance). It is dropped; the new ownership reads its records again from the committed
    offset, and nothing of the new ownership is marked done or given up."""
    tp0 = TopicPartition(TOPIC, 0)
    delivery, log, rig = exactly_once()
    await delivery.assigned([tp0])
    for offset in range(4):
        rig.offsets.track(tp0, offset)
    old = tracked(rig, (0, 2), (0, 3))
    await delivery.revoked([tp0])
    rig.offsets.forget([tp0])
    await delivery.assigned([tp0])
    for offset in range(4):  # read again from the committed offset
        rig.offsets.track(tp0, offset)
    log.clear()
    delivered = await delivery.deliver(0, old)
    assert delivered.stale == {tp0} and delivered.lost == set()
    assert log == []  # nothing sent, nothing committed
    assert rig.offsets.in_flight == 4
    delivered = await delivery.deliver(1, tracked(rig, (0, 0), (0, 1), (0, 2), (0, 3)))
    assert delivered.stale == set() and delivered.lost == set()
    assert [line for line in log if "offsets" in line] == ["embedfleet-g-embed.requests-0 offsets 4"]


async def test_a_transaction_never_commits_past_a_record_pending_in_a_later_batch() -> None:
    """Batches of one partition may finish out of order (a batch cut later can hold lower
    offsets, e.g. salvaged records): each transaction's offset stops at the lowest record still
    pending elsewhere, so a new owner after a crash between them reads that record again."""
    tp0 = TopicPartition(TOPIC, 0)
    delivery, log, rig = exactly_once()
    await delivery.assigned([tp0])
    for offset in range(6):
        rig.offsets.track(tp0, offset)
    log.clear()
    await delivery.deliver(0, tracked(rig, (0, 3), (0, 4)))
    await delivery.deliver(1, tracked(rig, (0, 0), (0, 1), (0, 2), (0, 5)))
    assert [line for line in log if "offsets" in line] == [
        "embedfleet-g-embed.requests-0 offsets 0",  # 0-2 still pending: not past them
        "embedfleet-g-embed.requests-0 offsets 6",
    ]
    assert rig.offsets.in_flight == 0  # marked done as each transaction committed
    # Each transaction carries its own token in the offsets' metadata.
    tokens = [t for p in rig.producers for t in p.tokens]
    assert len(tokens) == 2 and len(set(tokens)) == 2


async def test_a_failed_commit_is_retried_unless_it_went_through() -> None:
    tp0 = TopicPartition(TOPIC, 0)
    # The commit times out but had reached the broker: the group's committed offset carries the
    # failed attempt's token.
    delivery, log, rig = exactly_once(fail={"commit": [KafkaTimeoutError()]})
    await delivery.assigned([tp0])
    original_commit = FakeProducer.commit_transaction

    async def commit_reaches_the_broker(producer: FakeProducer) -> None:
        rig.cluster.committed.update(producer.last_offsets)
        await original_commit(producer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeProducer, "commit_transaction", commit_reaches_the_broker)
        assert (await delivery.deliver(0, work((0, 3)))).lost == set()
    assert log.count("embedfleet-g-embed.requests-0 commit") == 1  # not sent twice
    assert log.count("embedfleet-g-embed.requests-0 start") == 2  # a fresh producer ended it
    # It had not gone through: the batch is published again, in a new transaction, even though
    # the group's committed offset is the same number (an earlier transaction, another token).
    delivery, log, rig = exactly_once(fail={"commit": [KafkaTimeoutError()]})
    await delivery.assigned([tp0])
    rig.cluster.committed[tp0] = OffsetAndMetadata(4, "an earlier transaction")
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
    delivery = AtLeastOnce(lambda _: FakeProducer("p", [], {}), publisher, FakeCluster(), WorkerMetrics())
    delivered = await delivery.deliver(0, work((0, 1)))
    assert delivered.lost == set() and publisher.sent == 3


async def test_the_offsets_room_commits_up_to_the_first_unanswered_record_of_assigned_partitions() -> None:
    tp0, tp1, gone = (TopicPartition(TOPIC, p) for p in (0, 1, 2))
    consumer = FakeConsumer({})
    consumer.assigned = {tp0, tp1}
    consumer.fail_commits = [CommitFailedError("rebalancing")]
    metrics = WorkerMetrics()
    offsets = ConsumedOffsets(consumer, metrics)
    for tp, offset in [(tp0, 5), (tp0, 6), (tp0, 7), (tp1, 3), (gone, 9)]:
        offsets.track(tp, offset)
    for tp, offset in [(tp0, 5), (tp0, 7), (tp1, 3), (gone, 9)]:
        offsets.done(tp, offset)
    await offsets.commit()  # refused (a rebalance): nothing is marked committed, it is tried again
    await offsets.commit()
    assert consumer.commits == [{tp0: 6, tp1: 4}, {tp0: 6, tp1: 4}]  # 6 is not answered yet
    await offsets.commit()
    assert len(consumer.commits) == 2  # nothing moved: nothing sent
    assert metrics.commits.labels("failed")._value.get() == 1
    # Exactly-once: offsets go into the transactions; the room commits nothing itself.
    quiet = ConsumedOffsets(consumer, metrics, commits=False)
    quiet.track(tp0, 1)
    quiet.done(tp0, 1)
    await quiet.commit()
    assert len(consumer.commits) == 2


# --- the failure policy at work: the real publisher over a producer that refuses by topic -------


class FakeBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None]] = []

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: Any, headers: Any) -> object:
        self.records.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.records)

    def close(self) -> None:
        return None


class FakeClient:
    def __init__(self) -> None:
        self.topics: list[list[str]] = []

    def set_topics(self, topics: list[str]) -> asyncio.Future[None]:
        self.topics.append(list(topics))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class TopicProducer:
    """An aiokafka producer as the publisher uses it: acknowledges every send at once, except to
    topics it refuses (the error its ack fails with) or never acknowledges."""

    def __init__(
        self, refuse: dict[str, BaseException] | None = None, silent: set[str] | None = None
    ) -> None:
        self.client = FakeClient()
        self.refuse = refuse or {}
        self.silent = silent or set()
        self.written: list[tuple[str, bytes | None, bytes | None]] = []
        self.pending: list[asyncio.Future[Any]] = []

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    def _ack(self, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> asyncio.Future[Any]:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if topic in self.silent:
            self.pending.append(ack)
        elif topic in self.refuse:
            ack.set_exception(self.refuse[topic])
        else:
            self.written.extend((topic, k, v) for k, v in records)
            ack.set_result(None)
        return ack

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        return self._ack(topic, batch.records)

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None
    ) -> Any:
        assert key is not None or value is not None, "Need at least one: key or value"  # as aiokafka
        return self._ack(topic, [(key, value)])

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class TopicsCluster(FakeCluster):
    async def partitions_of(self, topics: Any) -> dict[str, list[int] | None]:
        return {topic: [0] for topic in topics}

    def quarantined_reason(self, topic: str) -> str | None:
        return self.quarantined.get(topic)


def real_publisher(cluster: TopicsCluster) -> Any:
    from worker.publisher import ResultPublisher

    class View:
        async def partitions_of(self, topics: Any) -> dict[str, list[int] | None]:
            return await cluster.partitions_of(topics)

        def quarantined(self, topic: str) -> str | None:
            return cluster.quarantined.get(topic)

    return ResultPublisher(
        View(),
        results_topic="embed.results",
        dlq_topic="embed.requests.dlq",
        worker_id="w",
        model="m",
        max_dlq_record_bytes=1 << 20,
    )


def jobs_for(*reply_topics: str) -> list[tuple[Any, Any]]:
    from schemas import EmbedResult, encode_result
    from worker.engine.tokenize import TokenizedText
    from worker.jobs import Job

    pairs = []
    for offset, topic in enumerate(reply_topics):
        request = EmbedRequest(id=f"r{offset}", text=f"t{offset}", reply_to=topic)
        job = Job(
            Source(TOPIC, 0, offset, 0),
            RawMessage(None, None, [], original_size=10),
            request,
            f"{offset:064x}",
            2,
            TokenizedText([1, 2], False),
            topic,
            ContentType.JSON,
        )
        result = encode_result(
            EmbedResult.success(
                request_id=request.id, key=job.key, model="m", vector=[1.0, 0.0], encoding_format="float"
            )
        )
        pairs.append((job, result))
    return pairs


def at_least_once_over(producer: TopicProducer, replies: TopicProducer, timeout_s: float = 10.0) -> Any:
    cluster = TopicsCluster()
    delivery = AtLeastOnce(
        lambda for_replies: replies if for_replies else producer,
        real_publisher(cluster),
        cluster,
        WorkerMetrics(),
        reply_timeout_s=timeout_s,
    )
    return delivery, cluster


async def test_a_producer_whose_sequence_state_the_broker_lost_is_replaced_and_nothing_is_refused() -> None:
    """After an outage the broker may answer an idempotent producer OutOfOrderSequenceNumber;
    aiokafka then fails that batch and keeps its sequence numbers, so every later send of that
    producer fails the same way. The records are not at fault: a fresh producer sends them."""
    from aiokafka.errors import OutOfOrderSequenceNumber

    lost = OutOfOrderSequenceNumber()
    broken = TopicProducer(refuse={"embed.results": lost, "embed.requests.dlq": lost})
    made: list[TopicProducer] = []

    def new_producer(for_replies: bool) -> Any:
        producer = TopicProducer() if made else broken
        if not for_replies:
            made.append(producer)
        return producer

    cluster = TopicsCluster()
    metrics = WorkerMetrics()
    delivery = AtLeastOnce(new_producer, real_publisher(cluster), cluster, metrics)
    # One result alone: a send of one record is never split, so only the policy can save it.
    results = jobs_for("embed.results")
    delivered = await asyncio.wait_for(
        delivery.deliver(0, BatchWork([j for j, _ in results], results, [])), 10
    )
    assert delivered.rejected == [] and delivered.lost == set()
    assert len(made) == 2 and broken.written == []
    fresh = made[1]
    assert [(t, v) for t, _, v in fresh.written] == [("embed.results", results[0][1])]  # once, no DLQ
    assert metrics.producers_replaced._value.get() == 1
    # The fresh producer stays: the next batch goes straight through it.
    more = jobs_for("embed.results", "embed.results", "embed.results")
    delivered = await asyncio.wait_for(delivery.deliver(1, BatchWork([j for j, _ in more], more, [])), 10)
    assert delivered.rejected == [] and len(made) == 2
    assert [t for t, _, _ in fresh.written] == ["embed.results"] * 4


def test_the_failure_policy_keeps_fatal_for_the_workers_own_state_and_lost_producer_state_transient() -> None:
    import inspect

    import aiokafka.errors as kafka_errors

    from worker.failures import FATAL, TRANSIENT, classify, needs_new_producer

    own_state = {
        "AuthenticationFailedError",
        "SaslAuthenticationFailed",
        "UnsupportedSaslMechanismError",
        "IllegalSaslStateError",
        "ClusterAuthorizationFailedError",
        "GroupAuthorizationFailedError",
        "TransactionalIdAuthorizationFailed",
        "KafkaConfigurationError",
        "ProducerFenced",
        "InvalidProducerEpoch",
    }
    for name, cls in inspect.getmembers(kafka_errors, inspect.isclass):
        if not issubclass(cls, kafka_errors.KafkaError):
            continue
        try:
            error = cast(BaseException, cls())
        except TypeError:
            continue
        assert (classify(error) is FATAL) == (name in own_state), name
    for name in ("OutOfOrderSequenceNumber", "UnknownProducerId", "InvalidProducerIdMapping"):
        error = getattr(kafka_errors, name)()
        assert classify(error) is TRANSIENT and needs_new_producer(error), name
    assert not needs_new_producer(kafka_errors.KafkaTimeoutError())


async def test_a_reply_topic_that_refuses_costs_its_requests_only_and_nothing_is_sent_twice() -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    own = TopicProducer()
    replies = TopicProducer(refuse={"embed.results.small": MessageSizeTooLargeError()})
    delivery, _ = at_least_once_over(own, replies)
    results = jobs_for("embed.results", "embed.results.small", "embed.results.fine", "embed.results.small")
    delivered = await asyncio.wait_for(
        delivery.deliver(0, BatchWork([j for j, _ in results], results, [])), 10
    )
    assert sorted(r.request.id for r in delivered.rejected if r.request) == ["r1", "r3"]
    assert {r.error.code for r in delivered.rejected} == {ErrorCode.REPLY_TO_UNAVAILABLE}
    topics = [t for t, _, _ in own.written + replies.written]
    # Each good result exactly once; each refused request one error result and one dead letter.
    assert topics.count("embed.results.fine") == 1
    assert sorted(topics) == sorted(
        [
            "embed.results",
            "embed.results.fine",
            "embed.results",
            "embed.results",
            "embed.requests.dlq",
            "embed.requests.dlq",
        ]
    )


async def test_a_reply_topic_that_never_acknowledges_is_answered_after_the_bound() -> None:
    own = TopicProducer()
    replies = TopicProducer(silent={"embed.results.stuck"})
    delivery, cluster = at_least_once_over(own, replies, timeout_s=0.3)
    results = jobs_for("embed.results.stuck", "embed.results.ok")
    delivered = await asyncio.wait_for(
        delivery.deliver(0, BatchWork([j for j, _ in results], results, [])), 10
    )
    assert [r.request.id for r in delivered.rejected if r.request] == ["r0"]
    assert "embed.results.stuck" in cluster.quarantined
    assert [t for t, _, _ in replies.written] == ["embed.results.ok"]
    assert sorted(t for t, _, _ in own.written) == ["embed.requests.dlq", "embed.results"]


async def test_a_dead_letter_the_dlq_refuses_is_counted_and_given_up_never_fatal() -> None:
    from aiokafka.errors import PolicyViolationError

    own = TopicProducer(refuse={"embed.requests.dlq": PolicyViolationError()})
    delivery, _ = at_least_once_over(own, TopicProducer())
    bad = rejection(0, 7)
    delivered = await asyncio.wait_for(delivery.deliver(0, BatchWork([bad], [], [bad])), 10)
    assert delivered.lost == set()
    assert [t for t, _, _ in own.written] == ["embed.results"]  # the error result still went out
    assert delivery._metrics.dlq_write_failures._value.get() == 1


async def test_a_tombstone_is_dead_lettered_not_fatal() -> None:
    own = TopicProducer()
    delivery, _ = at_least_once_over(own, TopicProducer())
    tombstone = Rejection(
        Source(TOPIC, 0, 3, 0),
        RawMessage(None, None, []),
        RequestError(ErrorCode.INVALID_ENCODING, "null value", None),
        "embed.results",
        ContentType.JSON,
    )
    await asyncio.wait_for(delivery.deliver(0, BatchWork([tombstone], [], [tombstone])), 10)
    [(topic, key, value)] = own.written
    assert topic == "embed.requests.dlq" and key == b"dlq:embed.requests:0:3" and value == b""
