"""Kafka plumbing for the client: connection options, the producer, the reply topic and its reader."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from producer.config import ClientConfig
from producer.errors import EmbeddingError
from schemas.kafka_options import kafka_client_options

# A private reply topic outlives a client that dies without closing; a short retention bounds the
# data it keeps (the broker still lists the empty topic until someone deletes it).
REPLY_TOPIC_CONFIGS = {"retention.ms": str(3600 * 1000), "cleanup.policy": "delete"}


class ServiceUnavailable(EmbeddingError, RuntimeError):
    """Kafka (or the topic the client needs) cannot be reached: the message says what to do."""


def connection_options(config: ClientConfig) -> dict[str, Any]:
    return kafka_client_options(config, client_id=f"embedfleet-{config.client_id}")


def create_producer(config: ClientConfig) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **connection_options(config),
        acks="all",
        enable_idempotence=True,
        linger_ms=config.linger_ms,
        max_batch_size=256 * 1024,
    )


def unreachable(config: ClientConfig, exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"cannot reach Kafka at {config.kafka_bootstrap} ({type(exc).__name__}: {exc}): start the local "
        "stack with `embedfleet stack up`, or set EMBEDFLEET_KAFKA_BOOTSTRAP"
    )


async def create_topic(config: ClientConfig, name: str) -> None:
    admin = AIOKafkaAdminClient(**connection_options(config))
    await admin.start()
    try:
        # Replication -1 = the broker's default. aiokafka's NewTopic accepts -1 only together with
        # a replica assignment argument; an empty one sends none, so the broker picks the replicas.
        topic = NewTopic(name, 1, -1, replica_assignments={}, topic_configs=REPLY_TOPIC_CONFIGS)
        await admin.create_topics([topic])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def delete_topic(config: ClientConfig, name: str) -> None:
    admin = AIOKafkaAdminClient(**connection_options(config))
    await admin.start()
    try:
        await admin.delete_topics([name])
    except UnknownTopicOrPartitionError:
        pass
    finally:
        await admin.close()


async def reply_consumer(
    config: ClientConfig, topic: str, partitions: set[int], *, from_end: bool
) -> AIOKafkaConsumer:
    """A group-less consumer of ``partitions`` of ``topic``, positioned before the first reply.

    ``from_end``: start at the end offsets read now (a shared topic holds everyone's old results);
    otherwise at the beginning (a fresh private topic). Positions are fixed here, before the
    client produces anything, so no reply can be skipped.
    """
    consumer = AIOKafkaConsumer(
        **connection_options(config),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        offsets = await (consumer.end_offsets(assigned) if from_end else consumer.beginning_offsets(assigned))
        for tp, offset in offsets.items():
            consumer.seek(tp, offset)
    except KafkaError:
        await consumer.stop()
        raise
    return consumer
