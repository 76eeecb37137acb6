"""Roles with principals of their own (issue 25), on the real stack with the authorizer on.

The worker logs in as ``embedfleet-worker`` (SCRAM-SHA-512 on the SASL listener) with a Redis user
that may write its cache prefix; clients log in as their own principals with a read-only Redis user
(a real ``producer.client.Client``, reading its own reply topic). Each role gets the ACLs of
deploy/local/roles.py for this fleet's topics only. A client that tries to forge a result, write
the cache or the model contract, or read another client's replies is refused by the broker or by
Redis, and the fleet still answers afterwards (counted per id on the real reply topic).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    for_code,
)
from aiokafka.protocol.fetch import FetchRequest

from producer.client import Client
from tests.faults import conftest as faults
from tests.security.conftest import (
    SECURITY_ROWS,
    TEST_CLIENTS,
    SecureFleet,
    SecureFleetFactory,
    roles_module,
)

WIDTH = 384
AUTHORIZATION_ERRORS = (
    ClusterAuthorizationFailedError,
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


@dataclass
class TopicAudit:
    """Every committed record of one topic, counted per request id."""

    success: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    records: int = 0


async def audit_topic(
    bootstrap: str, topic: str, partition_count: int = 1, timeout_s: float = 30
) -> TopicAudit:
    """Reads ``topic`` (a reply topic has 1 partition) from the beginning to its end
    (read_committed) over PLAINTEXT."""
    audit = TopicAudit()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        assert topic in await consumer.topics(), f"{topic} does not exist"
        partitions = [TopicPartition(topic, p) for p in range(partition_count)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in partitions])

        while await behind():
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    audit.records += 1
                    if not record.value:
                        continue  # a heartbeat
                    headers = dict(record.headers)
                    if headers.get("content-type") == b"application/msgpack":
                        result = msgspec.msgpack.decode(record.value)
                    else:
                        result = json.loads(record.value)
                    if "error" in result:
                        audit.errors[str(result.get("id"))] += 1
                    else:
                        audit.success[str(result.get("id"))] += 1
    finally:
        await consumer.stop()
    return audit


async def cache_keys(redis_url: str, prefix: str) -> tuple[list[bytes], list[bytes]]:
    """(vector entry keys, contract keys) under ``prefix``, read as the default user."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = await asyncio.to_thread(lambda: list(client.scan_iter(match=f"{prefix}:*", count=1000)))
    finally:
        client.close()
    contracts = [k for k in keys if k.startswith(f"{prefix}:models:".encode())]
    return [k for k in keys if k not in contracts], contracts


async def wait_cached(redis_url: str, prefix: str, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len((await cache_keys(redis_url, prefix))[0]) < count:
        assert time.monotonic() < deadline, f"the worker did not cache {count} vectors"
        await asyncio.sleep(0.2)


def assert_worker_clean(log: str) -> None:
    """The worker met no refusal: every grant it needs is there (an authorization error it
    survives, e.g. a DescribeConfigs it falls back from, would be logged as a warning)."""
    lowered = log.lower()
    for needle in ("authoriz", "noperm", "no permissions"):
        assert needle not in lowered, f"worker log mentions {needle!r}:\n{log[-3000:]}"


def forged_result(request_id: str) -> bytes:
    return json.dumps({"id": request_id, "vector": [0.5] * WIDTH, "model": "forged"}).encode()


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_each_role_does_its_job(
    make_secure_fleet: SecureFleetFactory, kafka_bootstrap: str, guarantee: str
) -> None:
    secure = await make_secure_fleet()
    fleet = secure.fleet
    worker = fleet.start_worker(env=secure.worker_env(EMBEDFLEET_GUARANTEE=guarantee))
    await fleet.wait_ready([worker])
    texts = [f"role check {guarantee} {fleet.tag} {i}" for i in range(6)]
    config = secure.client_config(TEST_CLIENTS[0])
    assert config.reply_topic is not None and config.reply_topic.startswith(
        secure.names.reply_prefix(TEST_CLIENTS[0])
    )
    async with Client(config) as client:
        vectors = await client.embed(texts, timeout=90)
        assert len(vectors) == len(texts) and all(len(v) == WIDTH for v in vectors)
        # The read-only Redis user reads what the worker's user wrote: the contract (the client
        # computed content hashes with it) and the entries (a repeat is answered without a request).
        await wait_cached(fleet.redis_url, fleet.cache_prefix, len(texts))
        produced = client.stats.produced
        again = await client.embed(texts[:3], timeout=30)
        assert [list(v) for v in again] == [list(v) for v in vectors[:3]]
        assert client.stats.produced == produced, "the read-only Redis user could not read the cache"
        audit = await audit_topic(kafka_bootstrap, config.reply_topic)
    assert len(audit.success) == len(texts), audit
    assert set(audit.success.values()) == {1}, f"duplicates: {audit.success}"
    assert not audit.errors, audit.errors
    assert worker.metric("embedfleet_cache_errors_total") == 0, worker.log()[-3000:]
    assert fleet.stop_worker(worker) == 0
    assert_worker_clean(worker.log())


def raise_for_codes(response: Any) -> None:
    """Raises the error of the first topic a CreateTopics/DeleteTopics response refused."""
    for attribute in ("topic_errors", "topic_error_codes", "topics", "responses"):
        for entry in getattr(response, attribute, None) or []:
            if entry[1]:
                raise for_code(entry[1])(f"{entry[0]}: error {entry[1]}")


async def producer_metadata(options: dict[str, Any], topic: str) -> None:
    """The topic's partitions as a producer of this principal asks for them (Metadata)."""
    producer = AIOKafkaProducer(**options, request_timeout_ms=10000)
    await producer.start()
    try:
        await producer.partitions_for(topic)
    finally:
        await producer.stop()


async def raw_fetch(options: dict[str, Any], topic: str) -> None:
    """One Fetch of partition 0 from offset 0, as this principal (what a consumer sends once it
    knows the leader: the single broker); raises the partition's error."""
    admin = AIOKafkaAdminClient(**options, request_timeout_ms=10000)
    await admin.start()
    try:
        response = await admin._send_request(FetchRequest(100, 1, 1 << 20, 1, [(topic, [(0, 0, 1 << 20)])]))
    finally:
        await admin.close()
    for _, partitions in ((t[0], t[1]) for t in response.topics):
        for partition in partitions:
            if partition[1]:
                raise for_code(partition[1])(f"{topic}: fetch error {partition[1]}")


async def refusal(action: Any, timeout_s: float = 30) -> str:
    """Runs ``action()`` (a coroutine function) and returns the name of the authorization error
    it raised; fails when it succeeded or failed another way."""
    try:
        await asyncio.wait_for(action(), timeout_s)
    except AUTHORIZATION_ERRORS as exc:
        return type(exc).__name__
    except KafkaError as exc:  # e.g. a CreateTopics/DeleteTopics response's error
        assert "authoriz" in f"{type(exc).__name__} {exc}".lower(), repr(exc)
        return type(exc).__name__
    raise AssertionError(f"{action.__name__} was not refused")


def redis_refusal(action: Any) -> str:
    try:
        action()
    except redis.exceptions.NoPermissionError as exc:
        return f"NOPERM ({str(exc)[:60]})"
    raise AssertionError(f"{action} was not refused")


async def test_client_forgeries_are_refused(
    make_secure_fleet: SecureFleetFactory, kafka_bootstrap: str
) -> None:
    secure: SecureFleet = await make_secure_fleet()
    fleet = secure.fleet
    worker = fleet.start_worker(env=secure.worker_env())
    await fleet.wait_ready([worker])
    a, b = TEST_CLIENTS
    refused: dict[str, str] = {}
    config_a, config_b = secure.client_config(a), secure.client_config(b)
    assert config_a.reply_topic is not None and config_b.reply_topic is not None
    topic_b = config_b.reply_topic
    async with Client(config_a) as client_a, Client(config_b) as client_b:
        warm = [f"forgery warm-up {fleet.tag} {i}" for i in range(3)]
        await client_a.embed(warm, timeout=90)
        await client_b.embed([f"forgery warm-up of b {fleet.tag}"], timeout=30)
        await wait_cached(fleet.redis_url, fleet.cache_prefix, len(warm))
        options = secure.roles.aiokafka_options(a)

        # (a) principal a produces a result: to the results topic, to b's reply topic, to the DLQ.
        producer = AIOKafkaProducer(**options, acks="all", request_timeout_ms=10000)
        await producer.start()
        try:
            forged = f"forged-{uuid.uuid4().hex}"
            for what, topic in (
                ("client writes a result: refused", fleet.results_topic),
                ("client writes another client's reply: refused", topic_b),
                ("client writes a dead letter: refused", fleet.dlq_topic),
            ):

                async def send(topic: str = topic) -> None:
                    await producer.send_and_wait(topic, forged_result(forged), key=forged.encode())

                refused[what] = await refusal(send)
        finally:
            await producer.stop()

        # Nor may it create a topic under b's prefix, or delete b's reply topic.
        admin = AIOKafkaAdminClient(**options, request_timeout_ms=10000)
        await admin.start()
        try:

            async def create() -> None:
                raise_for_codes(await admin.create_topics([NewTopic(f"{topic_b}-squat", 1, 1)]))

            async def delete() -> None:
                raise_for_codes(await admin.delete_topics([topic_b]))

            refused["client creates a topic in another's prefix: refused"] = await refusal(create)
            refused["client deletes another client's reply topic: refused"] = await refusal(delete)
        finally:
            await admin.close()

        # (c) principal a reads b's reply topic, and the shared results topic: the broker refuses
        # both the topic's metadata (DESCRIBE) and a Fetch of its records (READ).
        for what, topic in (
            ("client reads another client's replies: refused", topic_b),
            ("client reads the results topic: refused", fleet.results_topic),
        ):

            async def metadata(topic: str = topic) -> None:
                await producer_metadata(options, topic)

            async def fetch(topic: str = topic) -> None:
                await raw_fetch(options, topic)

            refused[what] = f"metadata {await refusal(metadata)}, fetch {await refusal(fetch)}"

        # (b) the client's Redis user overwrites a cache entry and the model contract.
        entries, contracts = await cache_keys(fleet.redis_url, fleet.cache_prefix)
        assert entries and contracts, (entries, contracts)
        reader = redis.Redis.from_url(
            fleet.redis_url, username=secure.redis_reader.username, password=secure.redis_reader.password
        )
        try:
            assert reader.hgetall(contracts[0]).get(b"fingerprint"), "the reader cannot read the contract"
            assert reader.hmget(entries[0], ["vector"])[0], "the reader cannot read a cache entry"
            refused["client overwrites a cache entry: refused"] = redis_refusal(
                lambda: reader.hset(entries[0], "vector", b"\0" * (4 * WIDTH))
            )
            refused["client overwrites the model contract: refused"] = redis_refusal(
                lambda: reader.hset(contracts[0], "fingerprint", "forged")
            )
            refused["client deletes a cache entry: refused"] = redis_refusal(
                lambda: reader.delete(entries[0])
            )
            refused["client flushes redis: refused"] = redis_refusal(reader.flushall)
            refused["client writes outside the prefix: refused"] = redis_refusal(
                lambda: reader.set(f"other-{fleet.tag}", "x")
            )
        finally:
            reader.close()
        worker_redis = redis.Redis.from_url(
            fleet.redis_url, username=secure.redis_worker.username, password=secure.redis_worker.password
        )
        try:
            refused["worker writes outside its prefix: refused"] = redis_refusal(
                lambda: worker_redis.hset(f"embedfleet:other-{fleet.tag}", "vector", b"x")
            )
            refused["worker runs CONFIG SET: refused"] = redis_refusal(
                lambda: worker_redis.config_set("maxmemory", "1")
            )
        finally:
            worker_redis.close()

        # Afterwards the fleet still answers a normal request, once per id, with no errors.
        texts = [f"after the forgeries {fleet.tag} {i}" for i in range(8)]
        vectors = await client_a.embed(texts, timeout=90)
        assert len(vectors) == len(texts)
        audit_a = await audit_topic(kafka_bootstrap, config_a.reply_topic)
        audit_b = await audit_topic(kafka_bootstrap, topic_b)
    audit_results = await audit_topic(kafka_bootstrap, fleet.results_topic, fleet.partitions)
    for audit in (audit_a, audit_b, audit_results):
        assert forged not in audit.success and forged not in audit.errors, "a forged result got through"
        assert not audit.errors, audit.errors
        assert set(audit.success.values()) <= {1}, f"duplicates: {audit.success}"
    assert len(audit_a.success) == len(warm) + len(texts), audit_a
    assert len(audit_b.success) == 1, f"b's reply topic lost its result: {audit_b}"
    assert fleet.stop_worker(worker) == 0
    assert_worker_clean(worker.log())

    answered = sum(1 for i in audit_a.success.values() if i == 1) - len(warm)
    for what, how in refused.items():
        row = faults.FaultReport(
            scenario=what,
            sent=len(texts),
            answered=answered,
            missing=len(texts) - answered,
            duplicates=sum(max(0, n - 1) for n in audit_a.success.values()),
            recovery_s=0.0,
            notes=how,
            errors=sum(audit_a.errors.values()),
        )
        faults._LEDGER.rows.append(row)
        SECURITY_ROWS.append(row)


async def test_keda_reads_the_lag_and_nothing_else(
    make_secure_fleet: SecureFleetFactory, kafka_bootstrap: str
) -> None:
    """KEDA's scaler needs the group's committed offsets and the topic's end offsets: it gets
    them, and may neither read a request nor write one."""
    secure = await make_secure_fleet()
    fleet = secure.fleet
    worker = fleet.start_worker(env=secure.worker_env())
    await fleet.wait_ready([worker])
    async with Client(secure.client_config(TEST_CLIENTS[0])) as client:
        await client.embed([f"keda lag check {fleet.tag} {i}" for i in range(4)], timeout=90)
    options = secure.roles.aiokafka_options(roles_module().KEDA)
    partitions = [TopicPartition(fleet.requests_topic, p) for p in range(fleet.partitions)]
    admin = AIOKafkaAdminClient(**options, request_timeout_ms=10000)
    await admin.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the worker commits a moment after it publishes
            committed = await admin.list_consumer_group_offsets(fleet.group_id)
            if sum(o.offset for tp, o in committed.items() if tp in partitions and o.offset > 0) >= 4:
                break
            assert time.monotonic() < deadline, committed
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    lag = sum(ends[tp] - committed[tp].offset for tp in partitions if tp in committed)
    assert sum(ends.values()) >= 4 and lag == 0, (ends, committed)

    async def fetch() -> None:
        await raw_fetch(options, fleet.requests_topic)

    async def produce() -> None:
        producer = AIOKafkaProducer(**options, request_timeout_ms=10000)
        await producer.start()
        try:
            await producer.send_and_wait(fleet.requests_topic, b'{"id": "keda", "text": "x"}')
        finally:
            await producer.stop()

    assert await refusal(fetch) == "TopicAuthorizationFailedError"
    assert await refusal(produce) in ("TopicAuthorizationFailedError", "ClusterAuthorizationFailedError")
    assert fleet.stop_worker(worker) == 0


async def test_a_gateway_serves_as_its_own_principal(make_secure_fleet: SecureFleetFactory) -> None:
    """`embedfleet gateway` logged in as ``embedfleet-gateway`` (its ACLs: requests, its own
    ``gw-`` reply topics) with the read-only Redis user answers through the worker's principal:
    the role is enough for its whole job (reply topic created, heartbeats, results read)."""
    roles = roles_module()
    secure = await make_secure_fleet()
    fleet = secure.fleet
    gateway_acls = roles.gateway_acls(roles.GATEWAY, secure.names)
    admin = {"bootstrap_servers": fleet.bootstrap}  # PLAINTEXT: a super user
    await roles.grant(admin, gateway_acls)
    try:
        await asyncio.sleep(1.0)  # the authorizer applies the committed ACLs a moment later
        worker = fleet.start_worker(env=secure.worker_env())
        await fleet.wait_ready([worker])
        key = "sk-" + uuid.uuid4().hex
        gateway = fleet.start_gateway(
            env={
                **secure.roles.kafka_env(roles.GATEWAY),
                "EMBEDFLEET_REDIS_USERNAME": secure.redis_reader.username,
                "EMBEDFLEET_REDIS_PASSWORD": secure.redis_reader.password,
                "EMBEDFLEET_GATEWAY_API_KEYS": key,
            }
        )
        await gateway.wait_ready()
        texts = [f"gateway role {fleet.tag} {i}" for i in range(4)]
        response = await asyncio.to_thread(
            httpx.post,
            f"{gateway.url}/v1/embeddings",
            json={"model": "all-MiniLM-L6-v2", "input": texts},
            headers={"Authorization": f"Bearer {key}"},
            timeout=90,
        )
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [item["index"] for item in data] == [0, 1, 2, 3]
        assert all(len(item["embedding"]) == WIDTH for item in data)
        log = gateway.log()
        assert "AuthorizationFailed" not in log and "NOPERM" not in log, log[-3000:]
        # uvicorn ends a graceful shutdown by re-raising SIGTERM: -15, not a crash.
        assert gateway.stop() in (0, -signal.SIGTERM) and "Traceback" not in gateway.log()
        assert_worker_clean(worker.log())
    finally:
        await roles.revoke(admin, gateway_acls)
