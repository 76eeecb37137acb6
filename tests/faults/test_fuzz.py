"""The record fuzzer: arbitrary records among good ones, written to the real stack, two workers.

``tests/fuzz_records.py`` makes the records from a seed (random bytes, JSON-like values, null keys
and values, 0-100 headers with names and values that need not be UTF-8, every codec, sizes at and
past every limit, bad records first / in the middle / last of a record batch, reply topics that
are missing or refuse the write); this test writes them as raw record batches over all partitions
of a fresh fleet's requests topic, waits until the fleet owes nothing (or stops making progress),
re-reads the results, the reply topics and the DLQ from the beginning and checks:

* both workers are alive;
* every valid request has a success result on its reply topic (exactly one in exactly-once mode),
  and no error result and no dead letter; one whose reply topic cannot take it has a
  ``reply_to_unavailable`` error result on the default results topic and a dead letter;
* every other record is dead-lettered (matched by its source partition and offset) or answered
  with an error result, and never gets a vector; every dead letter is one of those records;
* the workers' peak RSS stays under the memory limit of the Kubernetes manifests;
* the event loop never stalls for more than 1 s (``embedfleet_event_loop_lag_seconds``).

``EMBEDFLEET_FUZZ_SEED`` (default 19, so that `make test` repeats itself; ``random`` draws one,
printed) and ``EMBEDFLEET_FUZZ_RECORDS`` (default 300)
choose the run; ``make fuzz`` runs 20,000 records. A failure prints the seed and the records that
broke the invariants; the same seed makes the same records again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatch

from schemas.codec import DEFAULT_REQUEST_LIMITS, RequestError, RequestLimits, decode_request
from tests.faults.conftest import FaultLedger, FaultReport, assign_from_beginning
from tests.fleet import WorkerProcess, diagnose, start_fleet
from tests.fuzz_records import Expect, FuzzBatch, RecordGenerator, RecordInfo, Topics
from tests.helpers import create_topic, delete_topics
from worker.decoder import MAX_KEY_BYTES
from worker.records import read_batches

DEFAULT_RECORDS = 300
# The memory limit the Kubernetes manifests give a worker (deploy/k8s/deployment.yaml).
MEMORY_LIMIT_MB = 1536
MAX_EVENT_LOOP_STALL_S = 1.0
# How long the fleet may go without settling one more record before the run is called stuck.
IDLE_TIMEOUT_S = 90.0
UNAVAILABLE = "reply_to_unavailable"
LAG_METRIC = "embedfleet_event_loop_lag_seconds"


# `make test` runs this seed unless told otherwise, so CI repeats itself; `make fuzz` draws a new
# seed every run (and prints it).
DEFAULT_SEED = 19


def fuzz_seed() -> int:
    raw = os.environ.get("EMBEDFLEET_FUZZ_SEED", "")
    if raw == "random":
        return random.SystemRandom().randrange(1 << 32)
    return int(raw) if raw else DEFAULT_SEED


def fuzz_records() -> int:
    return int(os.environ.get("EMBEDFLEET_FUZZ_RECORDS", "") or DEFAULT_RECORDS)


def fuzz_excluded() -> frozenset[str]:
    """Kinds to leave out while exploring past a known defect (comma-separated); never in CI."""
    return frozenset(k.strip() for k in os.environ.get("EMBEDFLEET_FUZZ_EXCLUDE", "").split(",") if k.strip())


# --- writing raw record batches -----------------------------------------------------------------


class RawProducer:
    """Sends record batches as they are made (aiokafka's producer would re-encode them, with
    ``str`` header names only); returns each batch's base offset."""

    def __init__(self, bootstrap: str) -> None:
        self._client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=60_000)

    async def __aenter__(self) -> RawProducer:
        await self._client.bootstrap()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    async def send(self, topic: str, partition: int, batch: bytes) -> int:
        await self._client._wait_on_metadata(topic)
        leader = self._client.cluster.leader_for_partition(TopicPartition(topic, partition))
        request = ProduceRequest(None, -1, 30_000, [(topic, [(partition, batch)])])
        response = await self._client.send(leader, request)
        _, error_code, offset, *_ = response.topics[0][1][0]
        if error_code:
            raise for_code(error_code)(f"the broker refused a fuzz batch ({len(batch)} bytes)")
        return int(offset)


# --- what the fleet wrote -------------------------------------------------------------------------


@dataclass
class Findings:
    """Results, error results and dead letters of one read of the topics, by request id and by
    the dead letter's source (partition, offset)."""

    requests_topic: str
    dlq_topic: str
    success: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))  # id -> topic
    errors: dict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )  # (topic, code)
    dead_letters: dict[tuple[int, int], list[str]] = field(default_factory=lambda: defaultdict(list))  # codes
    strange: list[str] = field(default_factory=list)  # records no reader should ever see
    results_read: int = 0

    def add(self, record: Any) -> None:
        headers = {name: value for name, value in record.headers}
        if record.topic == self.dlq_topic:
            self._add_dead_letter(record, headers)
            return
        self.results_read += 1
        try:
            if headers.get("content-type") == b"application/msgpack":
                result = msgspec.msgpack.decode(record.value)
            else:
                result = msgspec.json.decode(record.value)
            request_id, error = result.get("id"), result.get("error")
        except (msgspec.DecodeError, AttributeError, TypeError) as exc:
            self.strange.append(f"undecodable result on {record.topic}@{record.offset}: {exc}")
            return
        if error:
            self.errors[request_id].append((record.topic, str(error.get("code"))))
        elif result.get("vector") is None and result.get("vector_b64") is None:
            self.strange.append(f"a result with neither vector nor error: {str(result)[:300]}")
        else:
            self.success[request_id][record.topic] += 1

    def _add_dead_letter(self, record: Any, headers: dict[str, bytes]) -> None:
        try:
            source = (int(headers["dlq-source-partition"]), int(headers["dlq-source-offset"]))
            topic = headers["dlq-source-topic"].decode()
        except (KeyError, ValueError) as exc:
            self.strange.append(f"a dead letter without its source ({exc}): {sorted(headers)}")
            return
        if topic != self.requests_topic:
            self.strange.append(f"a dead letter from {topic!r}")
        self.dead_letters[source].append(headers.get("dlq-error-code", b"?").decode())


async def read_all(bootstrap: str, topics: Iterable[str], into: Findings, stop: asyncio.Event | None) -> None:
    """Every committed record of ``topics`` from the beginning: to their current ends (``stop``
    None), or until ``stop`` is set (a live reader)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=16 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        partitions = await assign_from_beginning(consumer, topics)
        end = await consumer.end_offsets(partitions) if stop is None else {}
        while True:
            for records in (await consumer.getmany(timeout_ms=300, max_records=2000)).values():
                for record in records:
                    into.add(record)
            if stop is not None:
                if stop.is_set():
                    return
            elif all([await consumer.position(tp) >= offset for tp, offset in end.items()]):
                return
    finally:
        await consumer.stop()


# --- the invariants -------------------------------------------------------------------------------


@dataclass
class Sent:
    info: RecordInfo
    partition: int
    offset: int


@dataclass
class Verdict:
    """Per record: settled (owes nothing more) and the problems found; totals for the table."""

    problems: list[tuple[Sent | None, str]] = field(default_factory=list)
    unsettled: list[Sent] = field(default_factory=list)
    by_kind: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    duplicates: int = 0


def judge(sent: list[Sent], found: Findings, default_topic: str, *, exactly_once: bool) -> Verdict:
    verdict = Verdict()
    by_source = {(s.partition, s.offset): s for s in sent}
    for s in sent:
        info = s.info
        rid = info.request_id
        successes = found.success.get(rid, Counter()) if rid else Counter()
        errors = found.errors.get(rid, []) if rid else []
        dead = found.dead_letters.get((s.partition, s.offset), [])
        row = verdict.by_kind[info.kind]
        row["records"] += 1
        row["answered"] += successes.total() > 0
        row["errors"] += len(errors)
        row["dlq"] += len(dead)
        row["duplicates"] += max(0, successes.total() - 1)
        verdict.duplicates += max(0, successes.total() - 1)
        home = info.reply_topic or default_topic
        unavailable = any(code == UNAVAILABLE and topic == default_topic for topic, code in errors) and dead
        if info.expect is Expect.SUCCESS:
            settled = successes[home] > 0
            if errors:
                verdict.problems.append((s, f"a valid request got error results {errors}"))
            if dead:
                verdict.problems.append((s, f"a valid request was dead-lettered ({dead})"))
        elif info.expect is Expect.UNAVAILABLE:
            settled = bool(unavailable)
        elif info.expect is Expect.SUCCESS_OR_UNAVAILABLE:
            settled = successes[home] > 0 or bool(unavailable)
        else:
            settled = bool(dead) or bool(errors)
        if (
            info.expect is not Expect.SUCCESS
            and info.expect is not Expect.SUCCESS_OR_UNAVAILABLE
            and successes
        ):
            verdict.problems.append((s, f"got a vector ({dict(successes)})"))
        if set(successes) - {home}:
            verdict.problems.append((s, f"a success result on another topic than {home}: {dict(successes)}"))
        if exactly_once and successes.total() > 1:
            verdict.problems.append((s, f"{successes.total()} success results in exactly-once mode"))
        if not settled:
            verdict.unsettled.append(s)
            row["missing"] += 1
    for source in found.dead_letters:
        if source not in by_source:
            verdict.problems.append(
                (None, f"a dead letter of partition {source[0]} offset {source[1]}, no record")
            )
    verdict.problems.extend((None, strange) for strange in found.strange)
    return verdict


def describe(sent: Sent | None, problem: str) -> str:
    if sent is None:
        return f"- {problem}"
    info = sent.info
    return (
        f"- record #{info.index} kind={info.kind} ({info.expect}) p{sent.partition}@{sent.offset} "
        f"{info.position} of its batch, {info.codec}, id={info.request_id!r} reply_to={info.reply_topic!r}: "
        f"{problem}\n    {info.shown}"
    )


# --- the event loop's longest stall, from the worker's histogram ------------------------------------


def lag_buckets(worker: WorkerProcess) -> dict[float, float]:
    """Cumulative counts of the event-loop lag histogram, by upper bound (inf: all)."""
    _, text = worker.http("/metrics")
    found: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{LAG_METRIC}_bucket"):
            bound = re.search(r'le="([^"]+)"', line)
            if bound:
                found[float(bound.group(1))] = float(line.rpartition(" ")[2])
    return found


def longest_stall(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest bucket bound that holds every lag observed between the two readings."""
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0.0) >= total:
            return 0.0 if total == 0 else bound
    return float("inf")


# --- the run ------------------------------------------------------------------------------------------


async def create_reply_topics(bootstrap: str, topics: Topics) -> list[str]:
    names = []
    for name, (partitions, configs) in topics.all_reply_topics().items():
        await create_topic(bootstrap, name, partitions, configs)
        names.append(name)
    return names


async def wait_for_leaders(bootstrap: str, topics: list[str], timeout_s: float = 30) -> None:
    """Until every partition of ``topics`` has a leader: a reader that starts on a topic just
    created can fail to find where a partition begins, and then never reads it."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            metadata = await client.fetch_all_metadata()
            leaderless = [
                topic
                for topic in topics
                if not metadata.partitions_for_topic(topic)
                or any(
                    metadata.leader_for_partition(TopicPartition(topic, p)) in (None, -1)
                    for p in metadata.partitions_for_topic(topic) or ()
                )
            ]
            if not leaderless:
                return
            assert time.monotonic() < deadline, f"no leaders for {leaderless}"
            await asyncio.sleep(0.2)
    finally:
        await client.close()


async def list_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def table(verdict: Verdict) -> list[str]:
    lines = [
        "| kind | records | answered | error results | DLQ | missing | duplicates |",
        "|---|---|---|---|---|---|---|",
    ]
    total: Counter[str] = Counter()
    for kind, row in sorted(verdict.by_kind.items(), key=lambda kv: -kv[1]["records"]):
        total.update(row)
        lines.append(
            f"| {kind} | {row['records']} | {row['answered']} | {row['errors']} | {row['dlq']} | "
            f"{row['missing']} | {row['duplicates']} |"
        )
    lines.append(
        f"| **all** | {total['records']} | {total['answered']} | {total['errors']} | {total['dlq']} | "
        f"{total['missing']} | {total['duplicates']} |"
    )
    return lines


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_fuzzed_records_never_stop_the_fleet(
    guarantee: str,
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    fault_ledger: FaultLedger,
) -> None:
    seed, count, excluded = fuzz_seed(), fuzz_records(), fuzz_excluded()
    exactly_once = guarantee == "exactly-once"
    repeat = (
        f"EMBEDFLEET_FUZZ_SEED={seed} EMBEDFLEET_FUZZ_RECORDS={count} "
        + (f"EMBEDFLEET_FUZZ_EXCLUDE={','.join(sorted(excluded))} " if excluded else "")
        + f".venv/bin/python -m pytest tests/faults/test_fuzz.py -k {guarantee}"
    )
    print(f"record fuzzer: seed {seed}, {count} records, {guarantee} (repeat: {repeat})")
    fleet = await start_fleet(
        kafka_bootstrap, redis_url, model_dir, tmp_path, workers=2, EMBEDFLEET_GUARANTEE=guarantee
    )
    topics = Topics(fleet.requests_topic, fleet.results_topic, fleet.dlq_topic)
    reply_topics: list[str] = []
    try:
        reply_topics = await create_reply_topics(kafka_bootstrap, topics)
        read_from = [fleet.results_topic, fleet.dlq_topic, *reply_topics]
        await wait_for_leaders(kafka_bootstrap, read_from)
        lag_before = {w.name: lag_buckets(w) for w in fleet.workers}
        generator = RecordGenerator(seed, topics, partitions=fleet.partitions)
        live = Findings(fleet.requests_topic, fleet.dlq_topic)
        stop = asyncio.Event()
        reader = asyncio.create_task(read_all(kafka_bootstrap, read_from, live, stop))
        sent: list[Sent] = []
        started = time.monotonic()
        async with RawProducer(kafka_bootstrap) as producer:
            for batch in generator.batches(count, exclude=excluded):
                base = await send_batch(producer, fleet.requests_topic, batch)
                sent.extend(Sent(r.info, batch.partition, base + i) for i, r in enumerate(batch.records))
        written_s = time.monotonic() - started
        # Until the fleet owes nothing, a worker dies, or nothing settles for IDLE_TIMEOUT_S.
        last_progress, settled, reread = time.monotonic(), -1, False
        while True:
            verdict = judge(sent, live, fleet.results_topic, exactly_once=exactly_once)
            now_settled = len(sent) - len(verdict.unsettled)
            if now_settled > settled:
                settled, last_progress, reread = now_settled, time.monotonic(), False
            if not verdict.unsettled or not all(w.alive for w in fleet.workers):
                break
            if time.monotonic() - last_progress > IDLE_TIMEOUT_S:
                break
            if not reread and time.monotonic() - last_progress > 15:
                # Quiet for a while: check against a full read (the live reader may lag behind).
                reread, again = True, Findings(fleet.requests_topic, fleet.dlq_topic)
                await read_all(kafka_bootstrap, read_from, again, None)
                if not judge(sent, again, fleet.results_topic, exactly_once=exactly_once).unsettled:
                    break
            await asyncio.sleep(1.0)
        settled_s = time.monotonic() - started
        await asyncio.sleep(3.0)  # late duplicates, if any, are counted too
        stop.set()
        await reader
        alive = [w.alive for w in fleet.workers]
        stalls = {w.name: longest_stall(lag_before[w.name], lag_buckets(w)) for w in fleet.workers if w.alive}
        peak_rss = fleet.peak_rss_mb()
        # The audit: everything again, from the beginning of every topic.
        found = Findings(fleet.requests_topic, fleet.dlq_topic)
        await read_all(kafka_bootstrap, read_from, found, None)
        verdict = judge(sent, found, fleet.results_topic, exactly_once=exactly_once)
        created = {t for t in await list_topics(kafka_bootstrap) if t.startswith(topics.reply("missing-"))}
        for topic in sorted(created):
            verdict.problems.append((None, f"a worker created the missing reply topic {topic}"))
        stall = max(stalls.values(), default=float("inf"))
        lines = table(verdict)
        kinds = Counter(s.info.kind for s in sent)
        summary = (
            f"seed {seed}, {count} records ({len(kinds)} kinds), {guarantee}: written in {written_s:.0f} s, "
            f"settled in {settled_s:.0f} s; longest event-loop stall <= {stall} s; peak RSS {peak_rss:.0f} MB"
        )
        fault_ledger.rows.append(
            FaultReport(
                f"record fuzzer ({guarantee}, seed {seed})",
                len(sent),
                sum(r["answered"] for r in verdict.by_kind.values()),
                len(verdict.unsettled),
                verdict.duplicates,
                stall,
                ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()),
                errors=sum(r["errors"] for r in verdict.by_kind.values()),
                dlq=sum(r["dlq"] for r in verdict.by_kind.values()),
                peak_rss_mb=peak_rss,
            )
        )
        fault_ledger.tables.append((f"record fuzzer: {summary}", lines))
        write_report(seed, count, guarantee, summary, lines)
        failures = [
            *(
                f"- worker {w.name} exited ({w.process.returncode})"
                for w, up in zip(fleet.workers, alive, strict=True)
                if not up
            ),
            *(describe(s, problem) for s, problem in verdict.problems),
            *(
                describe(s, "not settled: no result, error result or dead letter as owed")
                for s in verdict.unsettled
            ),
        ]
        if peak_rss >= MEMORY_LIMIT_MB:
            failures.append(f"- peak RSS {peak_rss:.0f} MB >= {MEMORY_LIMIT_MB} MB")
        failures += [
            f"- {name}: the event loop stalled for more than {MAX_EVENT_LOOP_STALL_S} s (<= {bound} s; "
            "a stall names no record: repeat with EMBEDFLEET_FUZZ_EXCLUDE=<kinds> to find the kind)"
            for name, bound in stalls.items()
            if bound > MAX_EVENT_LOOP_STALL_S
        ]
        if failures:
            shown = "\n".join(failures[:40]) + (
                f"\n... {len(failures) - 40} more" if len(failures) > 40 else ""
            )
            logs = "\n".join(f"--- {w.name}\n{w.log()[-4000:]}" for w in fleet.workers if not w.alive)
            context = await diagnose(fleet) if verdict.unsettled else ""
            pytest.fail(
                f"record fuzzer, seed {seed} ({count} records, {guarantee}): {len(failures)} problems\n"
                f"repeat: {repeat}\n{summary}\n" + "\n".join(lines) + f"\n{shown}\n{logs}\n{context}",
                pytrace=False,
            )
    finally:
        fleet.stop_all()
        await fleet.cleanup()
        if reply_topics:
            await delete_topics(kafka_bootstrap, reply_topics)


async def send_batch(producer: RawProducer, topic: str, batch: FuzzBatch) -> int:
    try:
        return await producer.send(topic, batch.partition, batch.encode(int(time.time() * 1000)))
    except Exception as exc:
        shown = "\n".join(r.info.shown for r in batch.records)
        raise AssertionError(f"could not write a fuzz batch ({exc!r}):\n{shown}") from exc


def write_report(seed: int, count: int, guarantee: str, summary: str, lines: list[str]) -> None:
    """The table as markdown under the state dir, for the README and the closing note."""
    home = Path(os.environ.get("EMBEDFLEET_HOME", Path(__file__).resolve().parents[2] / ".state"))
    with contextlib.suppress(OSError):
        out = home / "fuzz" / f"{guarantee}-seed{seed}-n{count}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(summary + "\n\n" + "\n".join(lines) + "\n")


# --- the generator itself (no stack) -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2019])
def test_generated_records_are_what_they_claim(seed: int) -> None:
    """The fuzzer's own classification agrees with the contract's decoder (a valid request is one
    the schemas accept with the worker's limits; anything else is rejected), and each batch reads
    back byte for byte with the worker's lenient reader and, where aiokafka can read it, with
    aiokafka's own reader."""
    topics = Topics("embed.requests.t", "embed.results.t", "embed.requests.dlq.t")
    limits = RequestLimits(
        max_message_bytes=DEFAULT_REQUEST_LIMITS.max_message_bytes,
        allowed_tasks=frozenset(),  # the default model declares no prompts
        allowed_dimensions=frozenset({384}),
    )
    allowed = re.compile(r"embed\.results.*")  # the default EMBEDFLEET_REPLY_TO_PATTERN
    seen: Counter[str] = Counter()
    for batch in RecordGenerator(seed, topics, partitions=6).batches(1500):
        encoded = batch.encode(1_700_000_000_000)
        [read] = list(read_batches(encoded))
        if batch.compressed_records is not None:
            assert read.too_large, read.problem
            seen[batch.records[0].info.kind] += 1
            continue
        assert read.problem is None and len(read.records) == len(batch.records)
        readable_by_aiokafka = True
        for raw, made in zip(read.records, batch.records, strict=True):
            assert (raw.key, raw.value, raw.headers) == (made.key, made.value, made.headers)
            readable_by_aiokafka &= raw.unreadable_reason() is None
        if readable_by_aiokafka:
            records = list(DefaultRecordBatch(bytearray(encoded)))
            assert [(r.key, r.value) for r in records] == [(m.key, m.value) for m in batch.records]
        for made in batch.records:
            seen[made.info.kind] += 1
            headers = [(n.decode("utf-8", "replace"), v or b"") for n, v in made.headers]
            try:
                if made.key is not None and len(made.key) > MAX_KEY_BYTES:
                    raise RequestError("message_too_large", "key")  # type: ignore[arg-type]
                for name, _ in made.headers:
                    name.decode("utf-8")
                request = decode_request(made.value, headers, limits)
                if request.reply_to is not None and not allowed.fullmatch(request.reply_to):
                    raise RequestError("reply_to_not_allowed", "reply_to")  # type: ignore[arg-type]
                # The default model's window: 256 tokens less 2 special ones; a quarter of it.
                if request.long != "truncate" and (request.overlap or 0) > (256 - 2) // 4:
                    raise RequestError("invalid_request", "overlap")  # type: ignore[arg-type]
                valid = True
            except (RequestError, UnicodeDecodeError):
                valid = False
            assert valid == (made.info.expect is not Expect.REJECTED), made.info
    assert len(seen) == len(RecordGenerator(seed, topics, partitions=6).kinds)
