"""Reading a group's committed offset while a transaction that commits offsets is pending: the
read waits for the transaction to end (OffsetFetch v7 with require_stable, worker.stable_offsets)
instead of answering the offset from before it, which made a new owner answer records twice."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from worker.cluster import ClusterView
from worker.stable_offsets import UNSTABLE_OFFSET_COMMIT, committed_of


def test_a_v7_answer_is_read_per_partition_with_its_metadata_and_errors() -> None:
    tp = TopicPartition("t", 1)

    def response(
        error: int, partitions: list[tuple[int, int, int, str | None, int, dict[int, bytes]]]
    ) -> object:
        return SimpleNamespace(error_code=error, topics=[("t", partitions, {})])

    assert committed_of(response(0, [(0, 5, -1, "a", 0, {}), (1, 9, -1, "tok", 0, {})]), tp) == (
        OffsetAndMetadata(9, "tok")
    )
    assert committed_of(response(0, [(1, -1, -1, None, 0, {})]), tp) is None  # nothing committed
    assert committed_of(response(0, [(1, -1, -1, None, UNSTABLE_OFFSET_COMMIT, {})]), tp) == 88
    assert committed_of(response(16, []), tp) == 16  # the whole request refused


async def test_the_committed_offset_is_read_only_once_the_transaction_carrying_it_ended(
    kafka_bootstrap: str,
) -> None:
    tag = uuid.uuid4().hex[:10]
    topic, group = f"stable-offsets-{tag}", f"stable-offsets-{tag}"
    tp = TopicPartition(topic, 0)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    view = ClusterView({"bootstrap_servers": kafka_bootstrap})
    await view.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"stable-{tag}")
    await producer.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
        assert await view.committed_offset(group, tp) is None
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(7, "first")}, group)
        await producer.commit_transaction()
        assert await view.committed_offset(group, tp) == OffsetAndMetadata(7, "first")
        # A second transaction's offsets are pending: the read waits for its end.
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(9, "second")}, group)
        read = asyncio.create_task(view.committed_offset(group, tp))
        await asyncio.sleep(1.0)
        assert not read.done(), f"answered while the transaction was open: {read.result()}"
        await producer.commit_transaction()
        assert await asyncio.wait_for(read, 10) == OffsetAndMetadata(9, "second")
        # An aborted transaction's offsets are never read.
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(11, "third")}, group)
        read = asyncio.create_task(view.committed_offset(group, tp))
        await asyncio.sleep(0.5)
        await producer.abort_transaction()
        assert await asyncio.wait_for(read, 10) == OffsetAndMetadata(9, "second")
    finally:
        await producer.stop()
        await view.close()
        await admin.delete_topics([topic])
        await admin.close()
