"""The publisher's pure parts: dead-letter copies that always fit, and reply topics that are gone."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterable
from typing import Any, cast

import pytest
from aiokafka import TopicPartition

from schemas import (
    HEADER_DLQ_GENERATED_KEY,
    HEADER_DLQ_NULL_VALUE,
    HEADER_DLQ_REENCODED,
    HEADER_DLQ_TRUNCATED_VALUE,
    ContentType,
    EmbedRequest,
    EmbedResult,
    ErrorCode,
    RequestError,
    encode_result,
)
from worker.engine.tokenize import TokenizedText
from worker.jobs import Job, RawMessage, Rejection, Source
from worker.publisher import DLQ_FRAMING_BYTES, Ack, Part, Plan, ResultPublisher, Send

SOURCE = Source("embed.requests", 2, 41, 0)
LIMIT = 1048588  # Kafka's default max.message.bytes


class FakeCluster:
    def __init__(self, topics: dict[str, list[int]]) -> None:
        self.topics = topics
        self.requests: list[set[str]] = []
        self.refusing: dict[str, str] = {}

    async def partitions_of(self, topics: Iterable[str]) -> dict[str, list[int] | None]:
        wanted = set(topics)
        self.requests.append(wanted)
        return {topic: self.topics.get(topic) for topic in wanted}

    def quarantined(self, topic: str) -> str | None:
        return self.refusing.get(topic)


def publisher(
    topics: dict[str, list[int]] | None = None, cluster: FakeCluster | None = None
) -> ResultPublisher:
    cluster = cluster or FakeCluster(topics if topics is not None else {"embed.results": [0, 1]})
    return ResultPublisher(
        cluster,
        results_topic="embed.results",
        dlq_topic="embed.requests.dlq",
        worker_id="w1",
        model="m",
        max_dlq_record_bytes=LIMIT,
    )


def rejection(
    value: bytes | None, *, original_size: int | None = None, headers: list[tuple[str, bytes]] | None = None
) -> Rejection:
    error = RequestError(ErrorCode.MESSAGE_TOO_LARGE, "too large", "r1")
    return Rejection(
        SOURCE,
        RawMessage(None, value, headers or [], original_size=original_size),
        error,
        "embed.results",
        ContentType.JSON,
    )


def record_bytes(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v) for k, v in headers)


@pytest.mark.parametrize("size", [1000, LIMIT - 2000, LIMIT - 10, LIMIT + 5000, 3 << 20])
def test_dead_letters_always_fit_the_dlq_record_limit(size: int) -> None:
    key, value, headers = publisher().dead_letter(rejection(b"x" * size, headers=[("h", b"v" * 8000)]))
    assert record_bytes(key, value, headers) + DLQ_FRAMING_BYTES <= LIMIT
    names = dict(headers)
    if record_bytes(None, b"x" * size, [("h", b"v" * 8000)]) + DLQ_FRAMING_BYTES > LIMIT:
        assert names[HEADER_DLQ_TRUNCATED_VALUE] == str(size).encode()
    else:
        assert value == b"x" * size and HEADER_DLQ_TRUNCATED_VALUE not in names


def test_a_value_cut_by_the_decoder_says_how_big_it_was() -> None:
    _, value, headers = publisher().dead_letter(rejection(b"y" * 1000, original_size=256 << 20))
    assert value == b"y" * 1000 and dict(headers)[HEADER_DLQ_TRUNCATED_VALUE] == str(256 << 20).encode()


def job(reply_topic: str) -> Job:
    request = EmbedRequest(id="j1", text="hello", reply_to=reply_topic)
    return Job(
        SOURCE,
        RawMessage(b"k", None, [("content-type", b"application/json")], original_size=40),
        request,
        "ab" * 32,
        2,
        TokenizedText([101, 102], False),
        reply_topic,
        ContentType.JSON,
    )


async def test_results_for_a_reply_topic_that_is_gone_become_errors_on_the_default_topic() -> None:
    gone = job("embed.results.client-closed")
    result = encode_result(
        EmbedResult.success(
            request_id="j1", key=gone.key, model="m", vector=[1.0, 0.0], encoding_format="float"
        )
    )
    outgoing = await publisher().prepare([(gone, result)], [])
    [error_result, dead_letter] = outgoing.sends
    assert error_result.topic == "embed.results" and error_result.part is Part.ERROR_RESULT
    [(_, value, _)] = error_result.records
    assert json.loads(value or b"")["error"]["code"] == "reply_to_unavailable"
    assert dead_letter.topic == "embed.requests.dlq" and dead_letter.part is Part.DEAD_LETTER
    [(_, dlq_value, dlq_headers)] = dead_letter.records
    headers = dict(dlq_headers)
    assert headers["dlq-error-code"] == b"reply_to_unavailable" and headers[HEADER_DLQ_REENCODED] == b"1"
    assert json.loads(dlq_value or b"")["text"] == "hello"  # re-encoded from the request
    assert [r.error.code for r in outgoing.rejected] == [ErrorCode.REPLY_TO_UNAVAILABLE]


async def test_results_for_an_existing_reply_topic_go_there() -> None:
    mine = job("embed.results.mine")
    result = encode_result(
        EmbedResult.success(
            request_id="j1", key=mine.key, model="m", vector=[1.0, 0.0], encoding_format="float"
        )
    )
    outgoing = await publisher({"embed.results": [0], "embed.results.mine": [0, 1, 2]}).prepare(
        [(mine, result)], [rejection(b"bad")]
    )
    assert [s.topic for s in outgoing.sends] == ["embed.results.mine", "embed.results", "embed.requests.dlq"]
    assert [s.part for s in outgoing.sends] == [Part.RESULT, Part.ERROR_RESULT, Part.DEAD_LETTER]
    assert not outgoing.rejected


def test_a_tombstone_gets_a_dead_letter_kafka_accepts() -> None:
    """A record with neither key nor value: aiokafka refuses to send such a record, which once
    stopped the worker. The copy carries an empty value and a generated key, and says so."""
    tombstone = Rejection(
        SOURCE,
        RawMessage(None, None, []),
        RequestError(ErrorCode.INVALID_ENCODING, "no value", None),
        "embed.results",
        ContentType.JSON,
    )
    key, value, headers = publisher().dead_letter(tombstone)
    names = dict(headers)
    assert value == b"" and names[HEADER_DLQ_NULL_VALUE] == b"1"
    assert key == b"dlq:embed.requests:2:41" and names[HEADER_DLQ_GENERATED_KEY] == b"1"
    # A record with a key keeps it, and says nothing about one.
    keyed = Rejection(SOURCE, RawMessage(b"k", None, []), tombstone.error, "embed.results", ContentType.JSON)
    key, value, headers = publisher().dead_letter(keyed)
    assert key == b"k" and value == b"" and HEADER_DLQ_GENERATED_KEY not in dict(headers)


async def test_all_reply_topics_of_a_batch_are_looked_up_in_one_request() -> None:
    cluster = FakeCluster({"embed.results": [0], **{f"embed.results.c{i}": [0] for i in range(50)}})
    jobs = [job(f"embed.results.c{i}") for i in range(50)]
    results = [
        (
            j,
            encode_result(
                EmbedResult.success(
                    request_id="j1", key=j.key, model="m", vector=[1.0, 0.0], encoding_format="float"
                )
            ),
        )
        for j in jobs
    ]
    the_publisher = publisher(cluster=cluster)
    outgoing = await the_publisher.prepare(results, [])
    assert len(cluster.requests) == 1 and len(cluster.requests[0]) == 51
    assert len(outgoing.sends) == 50


async def test_a_plan_answers_refused_records_otherwise_and_isolates_others() -> None:
    mine = job("embed.results.mine")
    result = encode_result(
        EmbedResult.success(
            request_id="j1", key=mine.key, model="m", vector=[1.0, 0.0], encoding_format="float"
        )
    )
    topics = {"embed.results": [0], "embed.results.mine": [0]}
    plan = Plan(unavailable={SOURCE: "MessageSizeTooLargeError"})
    outgoing = await publisher(topics).prepare([(mine, result)], [], plan)
    assert [s.part for s in outgoing.sends] == [Part.ERROR_RESULT, Part.DEAD_LETTER]
    assert outgoing.sends[0].topic == "embed.results"
    [(_, value, _)] = outgoing.sends[0].records
    assert "MessageSizeTooLargeError" in json.loads(value or b"")["error"]["message"]
    # Pieces already acknowledged are not sent again.
    plan = Plan(unavailable={SOURCE: "x"}, skip={(SOURCE, Part.ERROR_RESULT)})
    outgoing = await publisher(topics).prepare([(mine, result)], [], plan)
    assert [s.part for s in outgoing.sends] == [Part.DEAD_LETTER]
    # A quarantined reply topic is unavailable without a wait.
    cluster = FakeCluster(topics)
    cluster.refusing["embed.results.mine"] = "never acknowledged"
    quarantined = publisher(cluster=cluster)
    outgoing = await quarantined.prepare([(mine, result)], [])
    assert [r.error.code for r in outgoing.rejected] == [ErrorCode.REPLY_TO_UNAVAILABLE]


# --- sending: a lane per (producer, partition) keeps the broker busy ---------------------------


class SlotBuilder:
    """aiokafka's BatchBuilder as the lanes use it, holding ``capacity`` records."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.values: list[bytes | None] = []
        self.closed = False
        self.taken = False  # queued in the producer

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: Any, headers: Any) -> object:
        assert not self.taken, "a record joined a batch the producer had taken"
        if self.closed or len(self.values) >= self.capacity:
            self.closed = True  # as aiokafka: a full builder closes itself
            return None
        self.values.append(value)
        return object()

    def close(self) -> None:
        self.closed = True

    def record_count(self) -> int:
        return len(self.values)


class NoTopics:
    def set_topics(self, topics: Iterable[str]) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class SlotProducer:
    """aiokafka's producer as the lanes see it: one queued batch per partition, behind the
    produce request in flight; ``send_batch`` waits while the partition's slot is taken.
    ``next_request()`` is its sender once the request in flight completes: every queued batch
    joins the next request, and the slots are free again."""

    def __init__(self, capacity: int = 100) -> None:
        self.client = NoTopics()
        self.capacity = capacity
        self.queued: dict[int, SlotBuilder] = {}
        self.handed: list[tuple[int, SlotBuilder]] = []  # (partition, batch), in order
        self.acks: dict[SlotBuilder, asyncio.Future[Any]] = {}
        self._drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def create_batch(self) -> SlotBuilder:
        return SlotBuilder(self.capacity)

    async def send_batch(self, batch: SlotBuilder, topic: str, *, partition: int) -> asyncio.Future[Any]:
        while partition in self.queued:
            await asyncio.shield(self._drained)
        batch.taken = True
        self.queued[partition] = batch
        self.handed.append((partition, batch))
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks[batch] = ack
        return ack

    def next_request(self) -> list[SlotBuilder]:
        request = list(self.queued.values())
        assert all(b.closed for b in request), "an open batch would linger"
        self.queued.clear()
        self._drained.set_result(None)
        self._drained = asyncio.get_running_loop().create_future()
        return request

    def acknowledge(self, batch: SlotBuilder, error: BaseException | None = None) -> None:
        if error is None:
            self.acks[batch].set_result(None)
        else:
            self.acks[batch].set_exception(error)


_offsets = itertools.count()


def span(partition: int, *values: bytes, alone: bool = False) -> Send:
    sources = [Source("embed.requests", 0, next(_offsets), 0) for _ in values]
    return Send(
        "embed.results",
        partition,
        [(b"k", value, []) for value in values],
        [(source, Part.RESULT) for source in sources],
        alone=alone,
    )


async def turns(n: int = 20) -> None:
    """Lets every task that can run do so."""
    for _ in range(n):
        await asyncio.sleep(0)


async def queue_one(the_publisher: ResultPublisher, producer: SlotProducer, partition: int) -> Ack:
    """Takes the partition's slot: a batch handed over and waiting for the request in flight."""
    [(_, ack)] = await the_publisher.send(cast(Any, producer), [span(partition, b"queued")])
    await turns()
    assert producer.queued[partition].values == [b"queued"]
    return ack


async def test_sends_for_a_partition_whose_slot_is_taken_share_one_batch_sent_as_it_frees() -> None:
    producer, the_publisher = SlotProducer(), publisher()
    queued = await queue_one(the_publisher, producer, 0)
    # Two batches delivered concurrently, both waiting for partition 0's slot.
    [[(_, first)], [(_, second)]] = await asyncio.gather(
        the_publisher.send(cast(Any, producer), [span(0, b"b")]),
        the_publisher.send(cast(Any, producer), [span(0, b"c1", b"c2")]),
    )
    await turns()
    assert len(producer.handed) == 1  # still waiting
    [request] = producer.next_request()  # the request before completes: the queued batch goes
    await turns()
    (_, shared) = producer.handed[1]
    assert shared.values == [b"b", b"c1", b"c2"] and shared.closed and len(producer.handed) == 2
    assert first is second and not first.done()
    producer.acknowledge(request)
    producer.acknowledge(shared)
    await turns()
    assert queued.done() and first.done() and first.exception() is None


async def test_sends_for_every_partition_are_handed_over_before_any_is_acknowledged() -> None:
    producer, the_publisher = SlotProducer(), publisher()
    await queue_one(the_publisher, producer, 0)  # partition 0 is busy: the others do not wait for it
    acks = await the_publisher.send(cast(Any, producer), [span(p, b"v%d" % p) for p in range(6)])
    await turns()
    assert sorted(p for p, _ in producer.handed[1:]) == [1, 2, 3, 4, 5]
    assert not any(ack.done() for _, ack in acks)
    producer.next_request()
    await turns()
    assert [p for p, _ in producer.handed].count(0) == 2


async def test_a_refusal_fails_the_spans_of_its_batch_only_and_each_is_sent_alone_next() -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    from worker.delivery import FailedSends
    from worker.failures import SharedBatchRefused
    from worker.metrics import WorkerMetrics
    from worker.publisher import acknowledged

    class Cluster:
        def forget(self, topic: str) -> None: ...

    async def learned(outcomes: list[tuple[Send, BaseException | None]]) -> Plan:
        plan = Plan()
        await FailedSends(the_publisher, cast(Any, Cluster()), WorkerMetrics(), 10.0).learn(
            outcomes, plan, started=0.0, dlq_attempts={}, keep_acknowledged=True
        )
        return plan

    producer, the_publisher = SlotProducer(), publisher()
    queued = await queue_one(the_publisher, producer, 0)
    sends = [span(0, b"b1", b"b2"), span(0, b"c"), span(1, b"d")]
    acks = await the_publisher.send(cast(Any, producer), sends)
    await turns()
    for batch in producer.next_request():  # the queued batch and d's
        producer.acknowledge(batch)
    await turns()
    (_, shared) = producer.handed[-1]
    assert shared.values == [b"b1", b"b2", b"c"]
    producer.acknowledge(shared, MessageSizeTooLargeError())
    outcomes = await acknowledged([*acks, (span(0, b"queued"), queued)])
    assert [type(e) for _, e in outcomes] == [SharedBatchRefused, SharedBatchRefused, type(None), type(None)]
    refusal = outcomes[0][1]
    assert refusal is not None and isinstance(refusal.__cause__, MessageSizeTooLargeError)
    # The span of one record may not be the one refused either: both are sent alone next.
    plan = await learned(outcomes)
    assert plan.alone == {source for send in sends[:2] for source, _ in send.pieces} and not plan.refused
    # Sent alone, each gets a batch of its own, and a refusal is then its own; so is the refusal
    # of a batch that carried one send only.
    alone = [span(2, b"x", alone=True), span(2, b"y", alone=True), span(2, b"z"), span(3, b"w")]
    acks = await the_publisher.send(cast(Any, producer), alone)
    for _ in range(3):
        await turns()
        producer.next_request()
    assert [b.values for p, b in producer.handed if p == 2] == [[b"x"], [b"y"], [b"z"]]
    for _, batch in producer.handed[-4:]:
        producer.acknowledge(batch, MessageSizeTooLargeError() if batch.values in ([b"x"], [b"w"]) else None)
    plan = await learned(await acknowledged(acks))
    assert set(plan.refused) == {alone[0].pieces[0][0], alone[3].pieces[0][0]} and not plan.alone


async def test_nothing_joins_a_batch_once_handed_over() -> None:
    producer, the_publisher = SlotProducer(), publisher()
    await the_publisher.send(cast(Any, producer), [span(0, b"a")])
    await turns()
    [(_, first)] = producer.handed
    assert first.closed  # handed over at once (nothing was queued), and closed right then
    await the_publisher.send(cast(Any, producer), [span(0, b"b")])
    await turns()
    assert first.values == [b"a"]  # b waits in a new batch: SlotBuilder asserts no append after
    producer.next_request()
    await turns()
    assert [b.values for _, b in producer.handed] == [[b"a"], [b"b"]]


async def test_a_span_larger_than_a_batch_has_one_ack_over_all_its_batches() -> None:
    producer, the_publisher = SlotProducer(capacity=2), publisher()
    [(_, ack)] = await the_publisher.send(cast(Any, producer), [span(0, b"1", b"2", b"3", b"4", b"5")])
    for _ in range(3):
        await turns()
        producer.next_request()
    batches = [b for _, b in producer.handed]
    assert [b.values for b in batches] == [[b"1", b"2"], [b"3", b"4"], [b"5"]]
    producer.acknowledge(batches[0])
    producer.acknowledge(batches[2])
    await turns()
    assert not ack.done()
    producer.acknowledge(batches[1])
    await turns()
    assert ack.done() and ack.exception() is None


async def test_a_batch_that_never_gets_its_slot_fails_at_our_own_deadline() -> None:
    from aiokafka.errors import KafkaTimeoutError

    producer = SlotProducer()
    the_publisher = ResultPublisher(
        FakeCluster({"embed.results": [0]}),
        results_topic="embed.results",
        dlq_topic="embed.requests.dlq",
        worker_id="w1",
        model="m",
        max_dlq_record_bytes=LIMIT,
        hand_over_timeout_s=0.2,
    )
    await queue_one(the_publisher, producer, 0)  # and the request before it never completes
    [(_, ack)] = await the_publisher.send(cast(Any, producer), [span(0, b"late")])
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(ack, 5)


# --- aiokafka 0.14's add_batch gives up early; the lanes work around it ------------------------


class OneBroker:
    """The cluster metadata aiokafka's accumulator asks: every partition led by broker 0."""

    def leader_for_partition(self, tp: TopicPartition) -> int:
        return 0


class AccumulatorProducer:
    """``send_batch`` as AIOKafkaProducer does it, over aiokafka's real accumulator."""

    def __init__(self, accumulator: Any, timeout_s: float) -> None:
        self.client = NoTopics()
        self.accumulator = accumulator
        self.timeout_s = timeout_s

    def create_batch(self) -> Any:
        return self.accumulator.create_builder()

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        return await self.accumulator.add_batch(batch, TopicPartition(topic, partition), self.timeout_s)


async def busy_partition(accumulator: Any, tp: TopicPartition, busy_s: float, done: Ack) -> None:
    """aiokafka's sender sending a produce request every 0.1 s (each acknowledged at once); for
    ``busy_s`` a record sent with ``producer.send`` to ``tp`` takes the slot as soon as it frees."""
    loop = asyncio.get_running_loop()
    busy_until = loop.time() + busy_s
    while not done.done():
        await asyncio.sleep(0.1)
        batches, _ = accumulator.drain_by_nodes(ignore_nodes=set())
        for batch in batches.get(0, {}).values():
            batch.done(base_offset=0)
        if loop.time() < busy_until:
            await accumulator.add_message(tp, b"k", b"single", timeout=30)


async def test_aiokafka_add_batch_gives_up_long_before_its_timeout() -> None:
    """The defect the lanes work around (worker.publisher ResultPublisher._submit): each pass of
    add_batch's wait loop subtracts all the time waited so far. If this fails after an aiokafka
    upgrade, the defect is fixed and the retry in _submit can go."""
    from aiokafka.errors import KafkaTimeoutError
    from aiokafka.producer.message_accumulator import MessageAccumulator

    accumulator = MessageAccumulator(OneBroker(), 16384, 0, 30)
    tp = TopicPartition("embed.results", 0)
    await accumulator.add_message(tp, b"k", b"single", timeout=30)
    stop: Ack = asyncio.get_running_loop().create_future()
    sender = asyncio.create_task(busy_partition(accumulator, tp, 1.0, stop))
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(KafkaTimeoutError):
            # The slot is free after about 1.1 s: well within the 3 s allowed.
            await accumulator.add_batch(accumulator.create_builder(), tp, 3.0)
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        stop.set_result(None)
        await sender


async def test_a_lane_waits_out_the_early_give_up_and_delivers() -> None:
    from aiokafka.producer.message_accumulator import MessageAccumulator

    accumulator = MessageAccumulator(OneBroker(), 16384, 0, 30)
    tp = TopicPartition("embed.results", 0)
    await accumulator.add_message(tp, b"k", b"single", timeout=30)
    the_publisher = ResultPublisher(
        FakeCluster({"embed.results": [0]}),
        results_topic="embed.results",
        dlq_topic="embed.requests.dlq",
        worker_id="w1",
        model="m",
        max_dlq_record_bytes=LIMIT,
        hand_over_timeout_s=3.0,
    )
    [(_, ack)] = await the_publisher.send(
        cast(Any, AccumulatorProducer(accumulator, 3.0)), [span(0, b"r1", b"r2")]
    )
    sender = asyncio.create_task(busy_partition(accumulator, tp, 1.0, ack))
    await asyncio.wait_for(asyncio.shield(ack), 10)
    await sender
    assert ack.exception() is None


# --- a real producer against the local broker --------------------------------------------------


async def committed_values(bootstrap: str, topic: str, expected: int) -> list[bytes | None]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    values: list[bytes | None] = []
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while len(values) < expected and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                values.extend(r.value for r in records)
        await asyncio.sleep(0.5)  # and nothing more
        for records in (await consumer.getmany(timeout_ms=500)).values():
            values.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return values


def on_topic(send: Send, topic: str) -> Send:
    send.topic = topic
    return send


async def test_a_real_producer_gets_concurrent_sends_in_one_batch_per_partition_and_transactions_hold(
    kafka_bootstrap: str, topic_factory: Any
) -> None:
    from tests.worker.kafka_fakes import config
    from worker.publisher import acknowledged, create_producer

    topic = await topic_factory(partitions=2)
    the_publisher = ResultPublisher(
        FakeCluster({topic: [0, 1]}),
        results_topic=topic,
        dlq_topic=topic,
        worker_id="w1",
        model="m",
        max_dlq_record_bytes=LIMIT,
    )
    settings = config(EMBEDFLEET_KAFKA_BOOTSTRAP=kafka_bootstrap)
    producer = create_producer(settings)
    handed: list[int] = []
    send_batch = producer.send_batch

    async def counted(batch: Any, topic: str, *, partition: int) -> Any:
        ack = await send_batch(batch, topic, partition=partition)
        handed.append(batch.record_count())
        return ack

    producer.send_batch = counted
    await producer.start()
    try:
        # Twenty batches delivered at once: one record batch per partition carries them all.
        sent = await asyncio.gather(
            *(
                the_publisher.send(producer, [on_topic(span(p, b"%d/%d" % (i, p)), topic) for p in (0, 1)])
                for i in range(20)
            )
        )
        outcomes = await acknowledged([ack for acks in sent for ack in acks])
        assert all(error is None for _, error in outcomes)
        assert handed == [20, 20]
    finally:
        await producer.stop()
    # Exactly-once: what a committed transaction sent is there, in order; an aborted one's is not.
    transactional = create_producer(settings, transactional_id=f"test-{topic}")
    await transactional.start()
    try:
        await transactional.begin_transaction()
        sent = await asyncio.gather(
            *(the_publisher.send(transactional, [on_topic(span(0, b"t%d" % i), topic)]) for i in range(5))
        )
        assert all(e is None for _, e in await acknowledged([ack for acks in sent for ack in acks]))
        await transactional.commit_transaction()
        await transactional.begin_transaction()
        acks = await the_publisher.send(transactional, [on_topic(span(0, b"aborted"), topic)])
        assert all(e is None for _, e in await acknowledged(acks))
        await transactional.abort_transaction()
    finally:
        await transactional.stop()
    values = await committed_values(kafka_bootstrap, topic, 45)
    for p in (0, 1):
        assert [v for v in values if v and v.endswith(b"/%d" % p)] == [b"%d/%d" % (i, p) for i in range(20)]
    assert [v for v in values if v and v.startswith(b"t")] == [b"t%d" % i for i in range(5)]
    assert b"aborted" not in values
