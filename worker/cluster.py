"""The worker's own view of the Kafka cluster: topics that exist, raw fetches, reachability.

aiokafka's producer asks for metadata with ``allow_auto_topic_creation`` on and keeps every topic
it ever wrote to in its metadata requests: a deleted reply topic is then looked up for the
producer's whole request timeout (40 s, then an exception) or, on a broker that auto-creates
topics, silently created again. So the worker checks every reply topic here first, with metadata
requests that never create anything, remembers the answer briefly, and forgets topics that went
away. The same connection fetches raw record bytes for ``worker.salvage`` and tells the health
endpoint whether Kafka answers at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.structs import OffsetAndMetadata

from worker.errors import WorkerError
from worker.stable_offsets import fetch_stable_offset

log = logging.getLogger(__name__)

# Kafka error codes that mean "this topic is not there for you" (anything else is transient).
UNKNOWN_TOPIC_OR_PARTITION = 3
INVALID_TOPIC = 17
TOPIC_AUTHORIZATION_FAILED = 29
MISSING_TOPIC_CODES = frozenset({UNKNOWN_TOPIC_OR_PARTITION, INVALID_TOPIC, TOPIC_AUTHORIZATION_FAILED})
READ_UNCOMMITTED, READ_COMMITTED = 0, 1
# Topics named in one metadata request (a batch may name many reply topics).
METADATA_TOPICS_PER_REQUEST = 500
# Exactly-once: a reply topic must accept records stamped at least this long ago (see
# ClusterView.vet_for_transactions).
MIN_TIMESTAMP_SLACK_MS = 60_000
# How long a reply topic found to exist is taken to exist without asking again; a topic deleted
# within this time of a send may be re-created by that send on a broker that auto-creates topics.
FOUND_TTL_S = 5.0
VET_ATTEMPTS = 5
VET_BACKOFF_S = 0.2


@dataclass(frozen=True, slots=True)
class RawFetch:
    records: bytes
    aborted_transactions: list[tuple[int, int]]  # (producer id, first offset)
    error_code: int


class TopicMissing(WorkerError, KafkaError):  # type: ignore[misc]
    """A topic that the cluster says does not exist (or may not be written)."""


class ClusterView:
    """What the worker knows of the cluster beyond its consumer: which topics exist (never
    auto-creating one), their record limits, raw fetches for salvage, and reachability probes."""

    def __init__(
        self,
        connection: dict[str, Any],
        *,
        request_timeout_ms: int = 10_000,
        found_ttl_s: float = FOUND_TTL_S,
        missing_ttl_s: float = 5.0,
        max_topics: int = 4096,
        idle_s: float = 60.0,
        quarantine_s: float = 30.0,
    ) -> None:
        self._client = AIOKafkaClient(**connection, request_timeout_ms=request_timeout_ms)
        self._found_ttl_s = found_ttl_s
        self._missing_ttl_s = missing_ttl_s
        # topic -> (partitions or None when missing, monotonic time of the answer), least recently
        # used first: thousands of distinct reply_to names must not grow memory without bound.
        self._topics: OrderedDict[str, tuple[list[int] | None, float]] = OrderedDict()
        self._max_topics = max_topics
        self._idle_s = idle_s
        # Reply topics that refused a write or never acknowledged one: topic -> (until, why).
        # Requests for them are answered reply_to_unavailable at once instead of each waiting out
        # the reply timeout again.
        self._quarantine: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._quarantine_s = quarantine_s
        self._vetted: OrderedDict[str, float] = OrderedDict()  # topic -> vetted until
        self._connection = connection
        self._admin: Any = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._client.bootstrap()

    async def close(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        await self._client.close()

    async def _admin_client(self) -> Any:
        from aiokafka.admin import AIOKafkaAdminClient

        if self._admin is None:
            admin = AIOKafkaAdminClient(**self._connection)
            await admin.start()
            self._admin = admin
        return self._admin

    async def committed_offset(self, group_id: str, tp: TopicPartition) -> OffsetAndMetadata | None:
        """The offset and metadata ``group_id`` last committed for ``tp``, or None, once no
        transaction's offsets for it are pending (worker.stable_offsets). Raises a KafkaError
        when the group coordinator cannot be asked."""
        return await fetch_stable_offset(await self._admin_client(), group_id, tp)

    def forget(self, topic: str) -> None:
        """Drop what is known of ``topic`` (a send to it failed): the next use asks again."""
        self._topics.pop(topic, None)

    def quarantine(self, topic: str, why: str) -> None:
        """``topic`` refused or never acknowledged a write: treat it as unavailable for a while."""
        self._quarantine[topic] = (time.monotonic() + self._quarantine_s, why)
        self._quarantine.move_to_end(topic)
        while len(self._quarantine) > self._max_topics:
            self._quarantine.popitem(last=False)

    def quarantined(self, topic: str) -> str | None:
        """Why ``topic`` is treated as unavailable now, or None."""
        entry = self._quarantine.get(topic)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._quarantine[topic]
            return None
        return entry[1]

    async def vet_for_transactions(self, topics: Iterable[str]) -> None:
        """Exactly-once: quarantines reply topics whose configuration refuses records stamped a
        moment ago (``message.timestamp.before.max.ms`` under a minute on a CreateTime topic).
        Such a topic refuses not only the results but the transaction's abort markers too, and the
        broker then retries those markers forever: the partition's transactional id stays stuck
        and the partition never moves again. Each topic is checked once per quarantine period;
        a topic whose configuration cannot be read is taken as it is."""
        now = time.monotonic()
        unvetted = [t for t in set(topics) if self._vetted.get(t, 0.0) < now and self.quarantined(t) is None]
        if not unvetted:
            return
        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

        admin = await self._admin_client()
        # Right after start the admin client may not know a broker yet (NodeNotReadyError, node
        # id None): a check that gives up at once leaves the trap unchecked, so it is retried
        # (about 3 s in all) before the topics are taken as they are.
        for attempt in range(VET_ATTEMPTS):
            try:
                responses = await admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, t) for t in unvetted]
                )
                break
            except (KafkaError, OSError, TimeoutError) as exc:
                if attempt + 1 == VET_ATTEMPTS:
                    log.warning(
                        "cannot read the configuration of reply topics (%s); taking them as they are", exc
                    )
                    return
                await asyncio.sleep(VET_BACKOFF_S * 2**attempt)
        for response in responses:
            for resource in response.resources:
                topic, entries = resource[3], {e[0]: e[1] for e in resource[4]}
                self._vetted[topic] = now + self._quarantine_s
                self._vetted.move_to_end(topic)
                before = entries.get("message.timestamp.before.max.ms")
                if (
                    entries.get("message.timestamp.type", "CreateTime") == "CreateTime"
                    and before is not None
                    and before.isdigit()
                    and int(before) < MIN_TIMESTAMP_SLACK_MS
                ):
                    self.quarantine(
                        topic,
                        f"message.timestamp.before.max.ms={before} refuses records and transaction "
                        "markers stamped a moment ago",
                    )
        while len(self._vetted) > self._max_topics:
            self._vetted.popitem(last=False)

    @property
    def topics_known(self) -> int:
        return len(self._topics)

    async def partitions_for(self, topic: str) -> list[int] | None:
        """The topic's partitions, or None when it does not exist. Never creates it. Raises
        KafkaError when the cluster cannot be asked (then nothing is known either way)."""
        return (await self.partitions_of([topic]))[topic]

    async def partitions_of(self, topics: Iterable[str]) -> dict[str, list[int] | None]:
        """Partitions of every topic (None: it does not exist), with one metadata request for all
        those not known recently. Never creates a topic. Raises KafkaError when the cluster
        cannot be asked."""
        now = time.monotonic()
        found: dict[str, list[int] | None] = {}
        unknown: list[str] = []
        for topic in set(topics):
            known = self._topics.get(topic)
            ttl = self._found_ttl_s if known is not None and known[0] is not None else self._missing_ttl_s
            if known is not None and now - known[1] < ttl:
                found[topic] = known[0]
                self._topics.move_to_end(topic)
            else:
                unknown.append(topic)
        for start in range(0, len(unknown), METADATA_TOPICS_PER_REQUEST):
            chunk = unknown[start : start + METADATA_TOPICS_PER_REQUEST]
            async with self._lock:
                response = await self._send_any(MetadataRequest(chunk, allow_auto_topic_creation=False))
            answered = time.monotonic()
            partitions_by_topic: dict[str, list[int] | None] = dict.fromkeys(chunk)
            for entry in response.topics:
                error_code, name, partition_list = entry[0], entry[1], entry[-1]
                if name not in partitions_by_topic:
                    continue
                if error_code in MISSING_TOPIC_CODES:
                    partitions_by_topic[name] = None
                elif error_code != 0 and not partition_list:
                    raise KafkaError(f"metadata for {name}: error code {error_code}")
                else:
                    partitions_by_topic[name] = sorted(p[1] for p in partition_list)
            for topic, partitions in partitions_by_topic.items():
                known = self._topics.get(topic)
                if partitions is None and known is not None and known[0] is not None:
                    log.info("topic %s is gone: forgetting it", topic)
                self._topics[topic] = (partitions, answered)
                self._topics.move_to_end(topic)
                found[topic] = partitions
        self._evict(now)
        return found

    def _evict(self, now: float) -> None:
        while len(self._topics) > self._max_topics:
            self._topics.popitem(last=False)
        # Least recently used first: stop at the first entry used within the idle time.
        while self._topics:
            topic, (_, answered) = next(iter(self._topics.items()))
            if now - answered < self._idle_s:
                break
            del self._topics[topic]

    async def probe(self, timeout_s: float = 5.0) -> bool:
        """True when some broker answers a metadata request within ``timeout_s``."""
        try:
            await asyncio.wait_for(
                self._send_any(MetadataRequest([], allow_auto_topic_creation=False)), timeout_s
            )
        except (KafkaError, OSError, TimeoutError):
            return False
        return True

    async def fetch_raw(
        self, tp: TopicPartition, offset: int, max_bytes: int, isolation_level: int
    ) -> RawFetch:
        """The record bytes of one partition from ``offset``, as the broker sends them."""
        leader = self._client.cluster.leader_for_partition(tp)
        if leader is None or leader < 0:
            await self._client.force_metadata_update()
            leader = self._client.cluster.leader_for_partition(tp)
            if leader is None or leader < 0:
                raise KafkaError(f"no leader known for {tp}")
        request = FetchRequest(
            0, 0, max_bytes, isolation_level, [(tp.topic, [(tp.partition, offset, max_bytes)])]
        )
        response = await self._client.send(leader, request)
        for topic, partitions in response.topics:
            for partition, error_code, _highwater, *part_data in partitions:
                if topic != tp.topic or partition != tp.partition:
                    continue
                # Layouts: v4 [lso, aborted, records]; v5-v10 [lso, log start, aborted, records];
                # v11+ [lso, log start, aborted, preferred replica, records].
                if response.API_VERSION >= 11:
                    aborted = part_data[2]
                elif response.API_VERSION >= 4:
                    aborted = part_data[-2]
                else:
                    aborted = None
                return RawFetch(bytes(part_data[-1] or b""), list(aborted or []), error_code)
        return RawFetch(b"", [], 0)

    async def _send_any(self, request: Any) -> Any:
        node = self._client.get_random_node()
        if node is None:
            await self._client.force_metadata_update()
            node = self._client.get_random_node()
            if node is None:
                raise KafkaError("no broker known")
        return await self._client.send(node, request)


# Kafka's default max.message.bytes (1 MiB + 12 bytes of log overhead), assumed when a topic's own
# limit cannot be read.
DEFAULT_MAX_MESSAGE_BYTES = 1048588


async def topic_record_limit(connection: dict[str, Any], topic: str) -> int:
    """The largest record batch ``topic`` accepts (its max.message.bytes); Kafka's default when it
    cannot be read (no DescribeConfigs permission, topic missing, broker down)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(**connection)
    try:
        await admin.start()
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        for response in responses:
            for resource in response.resources:
                for entry in resource[4]:
                    if entry[0] == "max.message.bytes" and entry[1]:
                        return int(entry[1])
    except (KafkaError, OSError, ValueError, TimeoutError) as exc:
        log.warning(
            "cannot read max.message.bytes of %s (%s); assuming Kafka's default %d",
            topic,
            exc,
            DEFAULT_MAX_MESSAGE_BYTES,
        )
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return DEFAULT_MAX_MESSAGE_BYTES
