"""An in-memory Kafka for unit tests of the worker's whole loop (never for the integration path):
one broker holding the requests' partitions and everything produced, a group consumer that calls
the rebalance listener the way aiokafka does, producers whose acks can be made to fail, and the
cluster view the publisher asks about topics. ``runtime_of`` builds a real WorkerRuntime (real
intake, decoder, batcher, pipeline, delivery, publisher and offsets) around them, through the
same ``worker.app.build_parts`` the worker uses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from tests.fakes import FakeRedis
from tests.worker.test_decoder_and_pipeline import FakeEngine
from tests.worker.test_decoder_and_pipeline import split_windows as fake_windows
from tests.worker.test_decoder_and_pipeline import tokenize as fake_tokenize
from worker.app import Connections, build_parts
from worker.config import WorkerConfig
from worker.engine.tokenize import Span, TokenizedText
from worker.runtime import WorkerParts, WorkerRuntime

REQUESTS = "embed.requests"


@dataclass
class Manifest:
    name: str = "m"
    dim: int = 4
    max_tokens: int = 8
    prompts: dict[str, str] = field(default_factory=dict)
    matryoshka_dims: list[int] = field(default_factory=list)


class Engine(FakeEngine):
    """The fake model with what the worker is wired to: a manifest, a fingerprint, a tokenizer."""

    manifest = Manifest()
    model_fingerprint = "f" * 64

    def tokenize(self, texts: Sequence[str], task: str | None = None) -> list[TokenizedText]:
        return fake_tokenize(texts, task)

    def windows(self, text: str, task: str | None, overlap: int) -> list[Span]:
        return fake_windows(text, task, overlap)


@dataclass
class Produced:
    topic: str
    partition: int | None
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def json(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.value or b"null"))


@dataclass
class FakeBroker:
    partitions: int = 2
    logs: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = field(default_factory=dict)
    produced: list[Produced] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    ack_failures: list[BaseException] = field(default_factory=list)  # the next acks fail with these

    def __post_init__(self) -> None:
        for p in range(self.partitions):
            self.logs.setdefault(TopicPartition(REQUESTS, p), [])

    def request(self, value: bytes, partition: int = 0) -> None:
        tp = TopicPartition(REQUESTS, partition)
        offset = len(self.logs[tp])
        self.logs[tp].append(
            ConsumerRecord(REQUESTS, partition, offset, 0, 0, None, value, None, -1, len(value), ())
        )

    def results(self, topic: str = "embed.results") -> list[dict[str, Any]]:
        return [p.json() for p in self.produced if p.topic == topic]

    def dead_letters(self) -> list[Produced]:
        return [p for p in self.produced if p.topic == "embed.requests.dlq"]

    def end(self, partition: int) -> int:
        return len(self.logs[TopicPartition(REQUESTS, partition)])


class FakeConsumer:
    """aiokafka's group consumer as the worker uses it: start() joins and assigns every
    partition; ``revoke`` runs a rebalance that takes partitions away."""

    def __init__(self, broker: FakeBroker) -> None:
        self._broker = broker
        self._assignment: set[TopicPartition] = set(broker.logs)
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._listener: Any = None

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self._listener = listener

    async def start(self) -> None:
        await self._listener.on_partitions_assigned(sorted(self._assignment, key=lambda tp: tp.partition))

    async def stop(self) -> None:
        return None

    async def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        await self._listener.on_partitions_revoked(list(partitions))
        self._assignment -= set(partitions)

    def take_away(self, partitions: Sequence[TopicPartition]) -> None:
        """The group moved on before the revoke callback ran (what a rebalance during an await
        looks like from the worker)."""
        self._assignment -= set(partitions)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    async def committed(self, tp: TopicPartition) -> int | None:
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        return self._broker.committed.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._positions[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self._positions[tp] = 0

    def highwater(self, tp: TopicPartition) -> int:
        return len(self._broker.logs[tp])

    def position_of(self, tp: TopicPartition) -> int | None:
        return self._positions.get(tp)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self._broker.committed.update(offsets)

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]:
        fetched: dict[TopicPartition, list[Any]] = {}
        for tp in sorted(self._assignment - self._paused, key=lambda tp: tp.partition):
            start = self._positions.get(tp, 0)
            records = self._broker.logs[tp][start : start + (max_records or 500)]
            if records:
                fetched[tp] = records
                self._positions[tp] = start + len(records)
        if not fetched:
            await asyncio.sleep(0.005)
        return fetched


class FakeBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: Any, headers: Any) -> object:
        self.records.append((key, value, list(headers or [])))
        return object()

    def record_count(self) -> int:
        return len(self.records)

    def close(self) -> None:
        return None


class FakeClient:
    def set_topics(self, topics: Iterable[str]) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class FakeProducer:
    """Acknowledges every send at once, unless the broker has an ack failure queued."""

    def __init__(self, broker: FakeBroker) -> None:
        self._broker = broker
        self.client = FakeClient()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    def _ack(
        self, topic: str, partition: int | None, records: list[tuple[Any, Any, Any]]
    ) -> asyncio.Future[Any]:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._broker.ack_failures:
            ack.set_exception(self._broker.ack_failures.pop(0))
        else:
            self._broker.produced.extend(Produced(topic, partition, k, v, h) for k, v, h in records)
            ack.set_result(None)
        return ack

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        return self._ack(topic, partition, batch.records)

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[Any]:
        assert key is not None or value is not None, "Need at least one: key or value"  # as aiokafka
        return self._ack(topic, None, [(key, value, list(headers or []))])


class FakeCluster:
    """The cluster view: every topic of the fleet exists with two partitions; committed offsets
    are the broker's."""

    def __init__(self, broker: FakeBroker) -> None:
        self._broker = broker

    async def committed_offset(self, group_id: str, tp: TopicPartition) -> OffsetAndMetadata | None:
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        committed = self._broker.committed.get(tp)
        return None if committed is None else OffsetAndMetadata(committed, "")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def probe(self, timeout_s: float = 5.0) -> bool:
        return True

    async def partitions_of(self, topics: Iterable[str]) -> dict[str, list[int] | None]:
        return {topic: [0, 1] for topic in topics}

    def quarantined(self, topic: str) -> str | None:
        return None

    def quarantine(self, topic: str, why: str) -> None:
        return None

    def forget(self, topic: str) -> None:
        return None

    async def vet_for_transactions(self, topics: Iterable[str]) -> None:
        return None


def config(**env: str) -> WorkerConfig:
    return WorkerConfig.from_env({"EMBEDFLEET_REDIS_URL": "", "EMBEDFLEET_METRICS_PORT": "0", **env})


def runtime_of(
    broker: FakeBroker, engine: Engine, **env: str
) -> tuple[WorkerRuntime, WorkerParts, FakeConsumer]:
    """A real runtime over the in-memory Kafka and Redis, wired by the worker's own build_parts."""
    consumer = FakeConsumer(broker)
    connections = Connections(
        consumer=cast(Any, consumer),
        new_producer=lambda transactional_id, for_replies: cast(Any, FakeProducer(broker)),
        cluster=cast(Any, FakeCluster(broker)),
        redis=cast(Any, FakeRedis()),
    )
    parts = build_parts(config(**env), cast(Any, engine), connections)
    return WorkerRuntime(parts), parts, consumer
