"""The local Kafka broker behaves like a real one: durable produce, groups, offsets, transactions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

TopicFactory = Callable[..., Awaitable[str]]


async def consume_all(consumer: AIOKafkaConsumer, expected: int, timeout_s: float = 20.0) -> list[bytes]:
    values: list[bytes] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(values) < expected and asyncio.get_running_loop().time() < deadline:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            values.extend(r.value for r in records if r.value is not None)
    return values


async def test_round_trip_with_acks_all_and_idempotence(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [f"message-{i}".encode() for i in range(200)]
        futures = [await producer.send(topic, value, key=str(i).encode()) for i, value in enumerate(sent)]
        metadata = await asyncio.gather(*futures)
        assert all(m.offset >= 0 for m in metadata)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        received = await consume_all(consumer, len(sent))
    finally:
        await consumer.stop()
    assert sorted(received) == sorted(sent)


async def wait_for_assignment(
    consumers: list[AIOKafkaConsumer], partitions: int, timeout_s: float = 30.0
) -> list[set[TopicPartition]]:
    """Polls every consumer (so each takes part in the group protocol) until the split settles."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        await asyncio.gather(*(c.getmany(timeout_ms=200) for c in consumers))
        assignments = [set(c.assignment()) for c in consumers]
        union = set().union(*assignments)
        disjoint = sum(len(a) for a in assignments) == len(union)
        if len(union) == partitions and disjoint and all(assignments):
            return assignments
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"group did not settle: {assignments}")


async def test_two_consumers_split_partitions_and_resume_from_commits(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(partitions=6)
    group = f"group-{uuid.uuid4().hex[:8]}"

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            heartbeat_interval_ms=500,
            session_timeout_ms=10000,
        )

    first, second = consumer(), consumer()
    await first.start()
    await second.start()
    try:
        assignments = await wait_for_assignment([first, second], partitions=6)
        assert {len(a) for a in assignments} == {3}
    finally:
        await second.stop()
    # The survivor takes over all six partitions before anything is produced.
    await wait_for_assignment([first], partitions=6)

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(12):
            await producer.send_and_wait(topic, f"before-{i}".encode(), partition=i % 6)
        # It reads the first dozen and commits.
        before = await consume_all(first, 12)
        assert sorted(before) == sorted(f"before-{i}".encode() for i in range(12))
        await first.commit()
        await first.stop()
        for i in range(12):
            await producer.send_and_wait(topic, f"after-{i}".encode(), partition=i % 6)
    finally:
        await producer.stop()

    restarted = consumer()
    await restarted.start()
    try:
        after = await consume_all(restarted, 12)
        await asyncio.sleep(0.5)
        after += await consume_all(restarted, 0, timeout_s=1.0)
    finally:
        await restarted.stop()
    # It resumes exactly at the committed offsets: nothing from before, everything after.
    assert sorted(after) == sorted(f"after-{i}".encode() for i in range(12))


async def test_transactions_commit_and_abort(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = await topic_factory(partitions=2)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            for i in range(5):
                await producer.send(topic, f"committed-a-{i}".encode())
        await producer.begin_transaction()
        for i in range(5):
            await producer.send(topic, f"aborted-{i}".encode())
        await producer.abort_transaction()
        async with producer.transaction():
            for i in range(5):
                await producer.send(topic, f"committed-b-{i}".encode())
    finally:
        await producer.stop()

    committed = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    uncommitted = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_uncommitted",
    )
    await committed.start()
    await uncommitted.start()
    try:
        seen_committed = await consume_all(committed, 10)
        seen_all = await consume_all(uncommitted, 15)
    finally:
        await committed.stop()
        await uncommitted.stop()
    assert sorted(seen_committed) == sorted(
        [f"committed-a-{i}".encode() for i in range(5)] + [f"committed-b-{i}".encode() for i in range(5)]
    )
    # The aborted records were written (a plain reader sees them); read_committed hides them.
    assert sum(v.startswith(b"aborted-") for v in seen_all) == 5
