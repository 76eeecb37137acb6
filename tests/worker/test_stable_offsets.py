"""Reading a group's committed offset while a transaction that commits offsets is pending: the
read waits for the transaction to end (OffsetFetch v7 with require_stable, worker.stable_offsets)
instead of answering the offset from before it, which made a new owner answer records twice."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaTimeoutError
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


class ScriptedAdmin:
    """An admin client whose OffsetFetch v7 answers are scripted (pure logic, no broker)."""

    def __init__(self, answers: list[object], plain: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.answers = answers
        self.plain = plain
        self.coordinator_lookups = 0

    async def find_coordinator(self, group_id: str) -> int:
        self.coordinator_lookups += 1
        return 1

    async def _send_request(self, request: object, node_id: int) -> object:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def list_consumer_group_offsets(
        self, group_id: str, coordinator: int, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        return {tp: self.plain[tp] for tp in partitions if tp in self.plain}


def _v7(error: int, offset: int = 5, metadata: str = "tok") -> object:
    return SimpleNamespace(error_code=0, topics=[("t", [(0, offset, -1, metadata, error, {})], {})])


async def test_unstable_answers_are_retried_and_a_broker_without_v7_is_read_the_plain_way() -> None:
    from aiokafka.errors import IncompatibleBrokerVersion

    from worker import stable_offsets

    tp = TopicPartition("t", 0)
    # Unstable twice, then the committed offset; the coordinator is looked up once.
    admin = ScriptedAdmin([_v7(UNSTABLE_OFFSET_COMMIT), _v7(UNSTABLE_OFFSET_COMMIT), _v7(0)], {})
    assert await stable_offsets.fetch_stable_offset(admin, "g", tp) == OffsetAndMetadata(5, "tok")
    assert admin.answers == [] and admin.coordinator_lookups == 1
    # A moved coordinator (NOT_COORDINATOR, retriable) is looked up again.
    admin = ScriptedAdmin([_v7(16), _v7(0)], {})
    assert await stable_offsets.fetch_stable_offset(admin, "g", tp) == OffsetAndMetadata(5, "tok")
    assert admin.coordinator_lookups == 2
    # No shared OffsetFetch version: the plain read answers.
    admin = ScriptedAdmin([IncompatibleBrokerVersion()], {tp: OffsetAndMetadata(3, "old")})
    assert await stable_offsets.fetch_stable_offset(admin, "g", tp) == OffsetAndMetadata(3, "old")
    # Unstable past the bound: a timeout (transient), not a stale answer.
    admin = ScriptedAdmin([_v7(UNSTABLE_OFFSET_COMMIT)] * 100, {})
    with pytest.raises(KafkaTimeoutError):
        await stable_offsets.fetch_stable_offset(admin, "g", tp, wait_s=0.0)
