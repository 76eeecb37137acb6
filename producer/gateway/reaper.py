"""No reply topic left behind by a killed gateway.

Each gateway reads its results from a private topic ``{results}.gw-{start}-{lease}-{random}``
(start: unix seconds; lease: seconds), created at start and deleted at a clean stop. A gateway
killed with SIGKILL (or on a lost node) cannot delete it, so every live gateway:

* writes a heartbeat record (a header readers skip) to its own topic every ``lease / 3``;
* every ``lease`` of its own, lists the topics of other gateways and deletes each one whose newest
  record (or, if it has none, its start) is older than *that topic's* lease, from its name:
  gateways configured with different leases never delete each other's live topics.

Kafka alone decides (no Redis writes, no extra ACLs beyond what a gateway already needs to create
and delete its own topic). Python clients' private topics (``.py-``) are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError

from producer.client import Client
from producer.gateway.metrics import GatewayMetrics
from producer.kafka import connection_options

log = logging.getLogger(__name__)
GATEWAY_ID_PREFIX = "gw-"


def gateway_client_id(lease_s: float, now: float | None = None) -> str:
    """``gw-{unix seconds}-{lease seconds}-{8 hex}``: the start dates a topic with no record, and
    the lease says how long its owner may stay silent."""
    start = int(time.time() if now is None else now)
    return f"{GATEWAY_ID_PREFIX}{start}-{math.ceil(lease_s)}-{uuid.uuid4().hex[:8]}"


def parse_gateway_topic(topic: str, prefix: str) -> tuple[float, float] | None:
    """(start, lease) from a gateway topic's name, or None when ``topic`` is not one."""
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("-")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit() and parts[2]):
        return None
    return float(parts[0]), float(parts[1])


class ReplyTopicReaper:
    """Heartbeats for this gateway's topic; deletes other gateways' topics gone silent."""

    def __init__(self, client: Client, *, lease_s: float, metrics: GatewayMetrics) -> None:
        self._client = client
        self._lease_s = lease_s
        self._metrics = metrics
        config = client.config
        self._prefix = f"{config.results_topic}.{GATEWAY_ID_PREFIX}"
        self._own = config.reply_topic

    async def run(self) -> None:
        next_sweep = 0.0
        while True:
            try:
                await self._client.send_heartbeat()
            except (KafkaError, OSError) as exc:
                log.warning("could not write the reply topic's heartbeat: %s", exc)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self._lease_s
                try:
                    for topic in await self.sweep():
                        self._metrics.reaped_topics.inc()
                        log.info("deleted %s, the reply topic of a gateway silent past its lease", topic)
                except (KafkaError, OSError) as exc:
                    log.warning("could not sweep dead gateways' reply topics: %s", exc)
            await asyncio.sleep(self._lease_s / 3)

    async def sweep(self) -> list[str]:
        """Deletes the topics of gateways silent for longer than their lease; returns their names."""
        options = connection_options(self._client.config)
        admin = AIOKafkaAdminClient(**options)
        await admin.start()
        try:
            candidates = [
                topic
                for topic in await admin.list_topics()
                if topic != self._own and parse_gateway_topic(topic, self._prefix) is not None
            ]
            if not candidates:
                return []
            silent = await self._silent(candidates, options)
            deleted = []
            for topic in silent:
                with contextlib.suppress(UnknownTopicOrPartitionError):  # another gateway was first
                    await admin.delete_topics([topic])
                    deleted.append(topic)
            return deleted
        finally:
            await admin.close()

    async def _silent(self, topics: list[str], options: dict[str, object]) -> list[str]:
        consumer = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False)
        await consumer.start()
        now = time.time()
        silent = []
        try:
            for topic in topics:
                parsed = parse_gateway_topic(topic, self._prefix)
                assert parsed is not None
                last, lease = parsed
                try:
                    newest = await _newest_record_time(consumer, TopicPartition(topic, 0))
                except (KafkaError, TimeoutError) as exc:
                    log.debug("could not read %s (%s): keeping it", topic, exc)
                    continue
                if newest is not None:
                    last = max(last, newest)
                if now - last > lease:
                    silent.append(topic)
        finally:
            await consumer.stop()
        return silent


async def _newest_record_time(consumer: AIOKafkaConsumer, tp: TopicPartition) -> float | None:
    """Seconds since the epoch of the partition's newest record; None when it holds none."""
    consumer.assign([tp])
    end = (await consumer.end_offsets([tp]))[tp]
    begin = (await consumer.beginning_offsets([tp]))[tp]
    if end <= begin:
        return None
    consumer.seek(tp, end - 1)
    records = (await consumer.getmany(tp, timeout_ms=2000)).get(tp, [])
    if not records:
        raise TimeoutError(f"no record of {tp.topic} came back in 2 s")
    newest: int = max(record.timestamp for record in records)
    return newest / 1000.0
