"""One record must never stop the fleet: poison at the level of records, bytes and vectors.

Each scenario sends 2000 good requests spread over all six partitions, slips bad records in
after a third of them, and then audits the real topics from the beginning: every good id has
exactly one success result, every bad record has its dead letter (with the reason and where it
came from) and, where its id can be read, its error result on the topic its requester waits on.
The workers must stay alive, in the group (no new assignment) and never stall for 5 s.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from schemas import content_hash
from tests.faults.conftest import Audit, FaultLedger, FaultReport, audit_fleet, scenario_texts
from tests.fleet import Fleet, FleetIO, start_fleet
from tests.helpers import create_topic, delete_topics
from worker.cluster import FOUND_TTL_S

GOOD = 2000
MAX_STALL_S = 5.0
# The memory limit the Kubernetes manifests give a worker (deploy/k8s/deployment.yaml).
MEMORY_LIMIT_MB = 1536
# A worker's peak RSS in these scenarios without anything large (measured: 255-280 MB), with room.
BASELINE_RSS_MB = 400

SendBad = Callable[[FleetIO], Awaitable[None]]


@dataclass
class Scenario:
    fleet: Fleet
    io: FleetIO
    good_ids: list[str]
    audit: Audit
    stall_s: float
    peak_rss_mb: float
    notes: list[str] = field(default_factory=list)


async def run_poison(
    fleet: Fleet,
    shared_dir: Path,
    bad: list[SendBad],
    *,
    dead_letters: int,
    error_results: dict[str, str],
    extra_topics: list[str] | None = None,
    timeout_s: float = 240,
) -> Scenario:
    """Sends GOOD good requests with the bad ones after a third; waits for every good result, the
    dead letters and the error results (id -> code) on the fleet's topic or ``extra_topics``."""
    assignments = fleet.metric("embedfleet_assignments_total")
    texts = scenario_texts(shared_dir, GOOD)
    async with FleetIO(fleet) as io:
        first = await io.send_texts(texts[: GOOD // 3])
        for send in bad:
            await send(io)
        # From here the workers have the bad records (the sends above wait for the broker's ack,
        # which for a 256 MiB value takes the test itself seconds to compress).
        bad_at = time.monotonic()
        rest = await io.send_texts(texts[GOOD // 3 :])
        good_ids = first + rest
        await io.wait_for(good_ids, timeout_s=timeout_s)
        await io.wait_for_dead_letters(dead_letters, timeout_s=60)
        deadline = time.monotonic() + 60
        while True:
            found = await audit_fleet(fleet, extra_topics)
            if (
                all(code in found.errors.get(i, []) for i, code in error_results.items())
                or time.monotonic() > deadline
            ):
                break
            await asyncio.sleep(0.5)
        after = sorted(t for t in io.arrivals if t >= bad_at)
        gaps = [b - a for a, b in zip([bad_at, *after], after, strict=False)]
        scenario = Scenario(fleet, io, good_ids, found, max(gaps, default=0.0), fleet.peak_rss_mb())
    assert all(w.alive for w in fleet.workers), "a worker exited on a bad record"
    assert fleet.metric("embedfleet_assignments_total") == assignments, "a worker lost its group membership"
    return scenario


def check_and_record(
    ledger: FaultLedger, name: str, scenario: Scenario, *, dead_letters: int, error_results: dict[str, str]
) -> FaultReport:
    found = scenario.audit
    errors = found.error_codes(list(error_results))
    row = FaultReport(
        name,
        len(scenario.good_ids) + dead_letters,
        found.answered(scenario.good_ids),
        found.missing(scenario.good_ids),
        found.duplicates(scenario.good_ids),
        scenario.stall_s,
        "; ".join(scenario.notes),
        errors=sum(errors.values()),
        dlq=len(found.dead_letters),
        peak_rss_mb=scenario.peak_rss_mb,
    )
    ledger.rows.append(row)
    assert row.missing == 0 and row.duplicates == 0
    assert row.dlq == dead_letters, found.dlq_codes()
    for request_id, code in error_results.items():
        assert found.errors.get(request_id) == [code], (request_id, found.errors.get(request_id))
        assert found.success[request_id] == 0, f"{request_id} got a vector"
    for headers in found.dead_letters:
        assert headers["dlq-reason"] and headers["dlq-source-topic"] == scenario.fleet.requests_topic.encode()
        assert int(headers["dlq-source-offset"]) >= 0
    assert row.recovery_s < MAX_STALL_S
    return row


@pytest.fixture
def fleet(two_workers: Fleet) -> Fleet:
    return two_workers


def kcat(fleet: Fleet, value: bytes, partition: int, headers: list[bytes]) -> None:
    """kcat writes header names as raw bytes (aiokafka and Kafka's Java client encode str names)."""
    path = Path(fleet.workers[0].log_path).with_suffix(f".{uuid.uuid4().hex}.msg")
    path.write_bytes(value)
    args: list[str | bytes] = [
        shutil.which("kcat") or "kcat",
        "-P",
        "-b",
        fleet.bootstrap,
        "-t",
        fleet.requests_topic,
        "-p",
        str(partition),
    ]
    for header in headers:
        args += ["-H", header]
    args.append(str(path))
    done = subprocess.run(args, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


async def test_header_poison_is_dead_lettered_and_answered_on_the_reply_topic(
    fleet: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    private = f"{fleet.results_topic}.private"
    await create_topic(fleet.bootstrap, private, 1)

    def bad(request_id: str, **fields: Any) -> bytes:
        return json.dumps(
            {"id": request_id, "text": "a poisoned neighbour", "reply_to": private, **fields}
        ).encode()

    async def send_bad(io: FleetIO) -> None:
        # A header name that is not UTF-8: aiokafka fails inside getmany() on this record.
        await asyncio.to_thread(kcat, fleet, bad("bad-name-p0"), 0, [b"\xff\xfe=v"])
        await asyncio.to_thread(kcat, fleet, bad("bad-name-p3"), 3, [b"ok=1", b"\xc3\x28=v"])
        await io.send(bad("bad-value"), headers=[("x-trace", b"\xff\xfe")])
        await io.send(bad("many-headers"), headers=[(f"h{i}", b"v") for i in range(65)])
        await io.send(bad("big-headers"), headers=[("x-big", b"h" * 20_000)])
        # A validation error whose reply_to can be read: the error goes to the private topic.
        await io.send(bad("text-is-a-number", text=5))
        await io.producer.flush()

    errors = {
        "bad-name-p0": "invalid_headers",
        "bad-name-p3": "invalid_headers",
        "bad-value": "invalid_headers",
        "many-headers": "invalid_headers",
        "big-headers": "message_too_large",
        "text-is-a-number": "invalid_request",
    }
    try:
        scenario = await run_poison(
            fleet,
            shared_dir,
            [send_bad],
            dead_letters=len(errors),
            error_results=errors,
            extra_topics=[private],
        )
        in_private = {i for i in errors if i in scenario.audit.errors}
        scenario.notes.append(
            f"header name/value not UTF-8, 65 headers, 20 KB header, "
            f"invalid text; {len(in_private)} errors on the private reply topic"
        )
        check_and_record(
            fault_ledger,
            "poison headers (kcat \\xff\\xfe name, ...)",
            scenario,
            dead_letters=len(errors),
            error_results=errors,
        )
        # They reached the requester's own topic, not the default one.
        private_only = await audit_fleet(fleet)
        assert not any(i in private_only.errors for i in errors)
        codes = scenario.audit.dlq_codes()
        assert codes["invalid_headers"] == 4 and codes["message_too_large"] == 1
        repaired = [h for h in scenario.audit.dead_letters if h.get("dlq-headers-repaired")]
        assert {h["dlq-source-partition"] for h in repaired} == {b"0", b"3"}
        assert fleet.metric("embedfleet_unreadable_records_total") == 2
    finally:
        await delete_topics(fleet.bootstrap, [private])


async def test_a_reply_topic_that_is_gone_gets_reply_to_unavailable(
    fleet: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    gone = f"{fleet.results_topic}.closed-client"
    never = f"{fleet.results_topic}.never-created"
    await create_topic(fleet.bootstrap, gone, 2)
    async with FleetIO(fleet) as io:
        # The topic exists at first: the worker learns its partitions and answers there.
        await io.send(json.dumps({"id": "while-open", "text": "first", "reply_to": gone}).encode())
        await io.producer.flush()
        deadline = time.monotonic() + 60
        while (await audit_fleet(fleet, [gone])).success["while-open"] == 0:
            assert time.monotonic() < deadline, "no result on the reply topic while it existed"
            await asyncio.sleep(0.3)
        answered_at = time.monotonic()
    await delete_topics(fleet.bootstrap, [gone])
    # The worker takes a topic it found to exist for FOUND_TTL_S without asking again (README,
    # "Reply topics are never created by a worker"): within that time a send to the deleted topic
    # may re-create it on this auto-creating broker. The promise starts after it.
    await asyncio.sleep(max(0.0, answered_at + FOUND_TTL_S + 1.0 - time.monotonic()))

    async def send_bad(io: FleetIO) -> None:
        for i in range(3):
            await io.send(
                json.dumps({"id": f"after-close-{i}", "text": f"late {i}", "reply_to": gone}).encode()
            )
        await io.send(json.dumps({"id": "never", "text": "nobody", "reply_to": never}).encode())
        await io.producer.flush()

    errors = {
        **{f"after-close-{i}": "reply_to_unavailable" for i in range(3)},
        "never": "reply_to_unavailable",
    }
    scenario = await run_poison(fleet, shared_dir, [send_bad], dead_letters=len(errors), error_results=errors)
    scenario.notes.append("reply_to deleted after first use (3) and never created (1)")
    check_and_record(
        fault_ledger,
        "reply_to topic deleted / never created",
        scenario,
        dead_letters=len(errors),
        error_results=errors,
    )
    # The workers never created the topics again (the local broker auto-creates on metadata requests).
    admin = AIOKafkaAdminClient(bootstrap_servers=fleet.bootstrap)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
    finally:
        await admin.close()
    assert gone not in topics and never not in topics


def hash_of(text: str, fingerprint: str) -> str:
    return content_hash(text, model_fingerprint=fingerprint, task=None, dimensions=None)


async def contract(redis_url: str, prefix: str) -> tuple[str, str, int]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [str(k) async for k in client.scan_iter(match=f"{prefix}:models:*")]
        fields = cast(dict[str, str], await client.hgetall(keys[0]))
    finally:
        await client.aclose()
    return keys[0].rsplit(":", 1)[1], fields["fingerprint"], int(fields["dim"])


async def test_non_finite_vectors_are_never_served_or_stored(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    shared_dir: Path,
    fault_ledger: FaultLedger,
) -> None:
    fleet = await start_fleet(kafka_bootstrap, redis_url, model_dir, tmp_path, workers=2)
    for worker in list(fleet.workers):  # the same fleet, with NaN from the model for marked texts
        fleet.stop_worker(worker)
    fleet.workers.clear()
    for _ in range(2):
        fleet.start_worker("--fault-marker", "NAN-PILL", "--fault-kind", "nan")
    await fleet.wait_ready()
    try:
        model, fingerprint, dim = await contract(redis_url, fleet.cache_prefix)
        client = redis.Redis.from_url(redis_url)
        poisoned_cache = {
            "cache: NaN vector": {
                "vector": np.full(dim, np.nan, "<f4").tobytes(),
                "model": model,
                "dim": dim,
            },
            "cache: another model": {"vector": np.ones(dim, "<f4").tobytes(), "model": "other", "dim": dim},
            "cache: wrong width": {"vector": np.ones(dim // 2, "<f4").tobytes(), "model": model, "dim": dim},
        }
        salt = uuid.uuid4().hex[:6]
        cache_texts = {name: f"{name} {salt}" for name in poisoned_cache}
        prefix = f"{fleet.cache_prefix}:{model}:{dim}"
        keys = {name: f"{prefix}:{hash_of(text, fingerprint)}" for name, text in cache_texts.items()}
        for name, entry in poisoned_cache.items():
            await client.hset(keys[name], mapping=entry)  # type: ignore[arg-type]

        async def send_bad(io: FleetIO) -> None:
            for i in range(3):
                await io.send(json.dumps({"id": f"nan-{i}", "text": f"NAN-PILL {salt} {i}"}).encode())
            for name, text in cache_texts.items():
                await io.send(json.dumps({"id": name, "text": text}).encode())
            await io.producer.flush()

        errors = {f"nan-{i}": "inference_failed" for i in range(3)}
        scenario = await run_poison(fleet, shared_dir, [send_bad], dead_letters=3, error_results=errors)
        scenario.notes.append("3 NaN vectors from the model, 3 bad cache entries (NaN, model, width)")
        check_and_record(
            fault_ledger,
            "non-finite vectors (model and Redis)",
            scenario,
            dead_letters=3,
            error_results=errors,
        )
        # The bad cache entries were misses: computed, finite, and overwritten with good ones.
        for name in poisoned_cache:
            [result] = scenario.io.results[name]
            assert not result.get("cached") and all(math.isfinite(x) for x in result["vector"])
            stored = cast(dict[bytes, bytes], await client.hgetall(keys[name]))
            vector = np.frombuffer(stored[b"vector"], "<f4")
            assert stored[b"model"] == model.encode() and vector.shape == (dim,)
            assert np.isfinite(vector).all()
        assert fleet.metric("embedfleet_cache_invalid_entries_total") >= 3
        # The NaN vectors were never stored.
        for i in range(3):
            key = hash_of(f"NAN-PILL {salt} {i}", fingerprint)
            assert not await client.exists(f"{fleet.cache_prefix}:{model}:{dim}:{key}")
        await client.aclose()
    finally:
        fleet.stop_all()
        await fleet.cleanup()


async def test_dead_letters_that_would_exceed_the_broker_limit_are_cut_to_fit(
    fleet: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    """The DLQ topic takes 1 MiB records (Kafka's default); the requests topic takes 10 MiB."""
    big = AIOKafkaProducer(
        bootstrap_servers=fleet.bootstrap, compression_type="gzip", max_request_size=16 << 20, acks="all"
    )
    await big.start()

    async def send_bad(io: FleetIO) -> None:
        # 3 MiB of JSON that compresses to a few KB: over the worker's 1 MiB message limit.
        expanded = json.dumps({"id": "expands", "text": "word " * (600 << 10)}).encode()
        await big.send_and_wait(fleet.requests_topic, expanded)
        # An invalid request just under the worker's limit: its copy plus DLQ headers is over the
        # DLQ's limit. Its id can be read, so it is also answered.
        shell = json.dumps({"id": "near-limit", "text": 5, "pad": ""}).encode()
        near = json.dumps({"id": "near-limit", "text": 5, "pad": "z" * (1048576 - len(shell))})
        await io.send(near.encode())
        await io.producer.flush()

    errors = {"near-limit": "invalid_request"}
    try:
        scenario = await run_poison(fleet, shared_dir, [send_bad], dead_letters=2, error_results=errors)
    finally:
        await big.stop()
    scenario.notes.append("gzip 3 MiB request; 1 MiB invalid request; DLQ limit 1 MiB")
    check_and_record(
        fault_ledger, "dead letters over the DLQ record limit", scenario, dead_letters=2, error_results=errors
    )
    cut = [h for h in scenario.audit.dead_letters if "dlq-truncated-value" in h]
    assert len(cut) == 2
    assert {h["dlq-error-code"] for h in cut} == {b"message_too_large", b"invalid_request"}


async def test_a_zstd_bomb_is_rejected_within_the_memory_limit(
    fleet: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    """256 MiB of zeros in zstd is about 8 KB on the wire. The workers decompress a fetched batch
    only up to 64 MiB (worker.records.guard_kafka_decompression): the batch is dead-lettered as it
    came (still compressed) and memory never sees the 256 MiB."""
    bomb = AIOKafkaProducer(
        bootstrap_servers=fleet.bootstrap, compression_type="zstd", max_request_size=300 << 20, acks="all"
    )
    await bomb.start()
    zeros = b'{"id": "bomb", "text": "' + bytes(256 << 20) + b'"}'
    wire: list[int] = []

    async def send_bad(io: FleetIO) -> None:
        for _ in range(2):
            sent = await bomb.send_and_wait(fleet.requests_topic, zeros, partition=1)
            wire.append(sent.offset)

    try:
        scenario = await run_poison(fleet, shared_dir, [send_bad], dead_letters=2, error_results={})
    finally:
        await bomb.stop()
    scenario.notes.append(
        f"2 x 256 MiB zstd values; peak RSS {scenario.peak_rss_mb:.0f} MB (limit {MEMORY_LIMIT_MB})"
    )
    check_and_record(
        fault_ledger, "zstd bomb (2 x 256 MiB values)", scenario, dead_letters=2, error_results={}
    )
    assert scenario.audit.dlq_codes() == {"message_too_large": 2}
    assert all(h["dlq-raw-batch"] == b"1" for h in scenario.audit.dead_letters)
    assert all(b"expands past" in h["dlq-reason"] for h in scenario.audit.dead_letters)
    # Bounded by the expansion limit, far below one copy of the value (the limit is 1.5 GiB).
    assert scenario.peak_rss_mb < 256 + BASELINE_RSS_MB


async def test_tombstones_are_dead_lettered_and_never_stop_a_worker(
    fleet: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    """A record with neither key nor value on every partition (any producer can send one, and
    compacted-topic tooling does): once, aiokafka refused to produce its dead letter and the
    worker exited, then the worker that took the partition over."""

    async def send_tombstones(io: FleetIO) -> None:
        # aiokafka's send() refuses a record with neither key nor value; its batch API does not
        # (and other clients send them freely).
        for partition in range(fleet.partitions):
            batch = io.producer.create_batch()
            batch.append(key=None, value=None, timestamp=None)
            await (await io.producer.send_batch(batch, fleet.requests_topic, partition=partition))
        await io.producer.send(fleet.requests_topic, None, key=b"only-a-key", partition=0)
        await io.producer.flush()

    scenario = await run_poison(fleet, shared_dir, [send_tombstones], dead_letters=7, error_results={})
    scenario.notes.append("6 null key + null value, 1 null value")
    check_and_record(
        fault_ledger, "tombstones on every partition", scenario, dead_letters=7, error_results={}
    )
    tombstones = [h for h in scenario.audit.dead_letters if h.get("dlq-null-value") == b"1"]
    assert len(tombstones) == 7
    assert sum(1 for h in tombstones if h.get("dlq-generated-key") == b"1") == 6


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_reply_topics_that_refuse_the_write_cost_only_their_requests(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    shared_dir: Path,
    fault_ledger: FaultLedger,
    guarantee: str,
) -> None:
    """Reply topics that exist and match the pattern but refuse the result (a record limit below
    its size; a timestamp bound that refuses anything stamped a moment ago): their requests get
    reply_to_unavailable on the default topic and a dead letter, within the reply timeout, and
    every other request is answered as usual (exactly once in exactly-once mode). Once, such a
    topic made the worker resend the same batch every 5 s forever.

    Nothing lingers on its way to an idle broker, so a result may reach it within the millisecond
    it was stamped, which message.timestamp.before.max.ms=0 lets through: a request for the
    stamped topic is answered once, there or with reply_to_unavailable."""
    fleet = await start_fleet(
        kafka_bootstrap, redis_url, model_dir, tmp_path, workers=2, EMBEDFLEET_GUARANTEE=guarantee
    )
    tiny = f"{fleet.results_topic}.tiny"
    stamped = f"{fleet.results_topic}.stamped"
    await create_topic(fleet.bootstrap, tiny, 2, {"max.message.bytes": "512"})
    await create_topic(fleet.bootstrap, stamped, 2, {"message.timestamp.before.max.ms": "0"})
    try:

        async def send_bad(io: FleetIO) -> None:
            for i in range(4):
                for name, topic in (("tiny", tiny), ("stamped", stamped)):
                    value = json.dumps(
                        {"id": f"{name}-{i}", "text": f"refused {name} {i}", "reply_to": topic}
                    )
                    await io.send(value.encode())
            await io.producer.flush()

        errors = {f"tiny-{i}": "reply_to_unavailable" for i in range(4)}
        scenario = await run_poison(
            fleet, shared_dir, [send_bad], dead_letters=len(errors), error_results=errors, timeout_s=180
        )
        stamped_ids = [f"stamped-{i}" for i in range(4)]
        deadline = time.monotonic() + 60
        while True:
            found = await audit_fleet(fleet, [stamped])
            answers = {i: [*found.errors.get(i, []), *["success"] * found.success[i]] for i in stamped_ids}
            refused = [i for i in stamped_ids if found.errors.get(i)]
            if len(found.dead_letters) == len(errors) + len(refused) and all(answers.values()):
                break
            assert time.monotonic() < deadline, (answers, len(found.dead_letters))
            await asyncio.sleep(0.5)
        assert all(a in (["reply_to_unavailable"], ["success"]) for a in answers.values()), answers
        errors.update((i, "reply_to_unavailable") for i in refused)
        scenario.audit = found
        scenario.notes.append(
            f"max.message.bytes=512 (4), message.timestamp.before.max.ms=0 ({len(refused)})"
        )
        check_and_record(
            fault_ledger,
            f"reply topics refusing the write ({guarantee})",
            scenario,
            dead_letters=len(errors),
            error_results=errors,
        )
        # Nothing landed on the refusing topics, and no worker is still resending.
        leftovers = await audit_fleet(fleet, [tiny, stamped])
        assert all(leftovers.success[i] == 0 for i in errors)
        assert all(w.alive for w in fleet.workers)
    finally:
        fleet.stop_all()
        await fleet.cleanup()
        await delete_topics(fleet.bootstrap, [tiny, stamped])
