"""Fault-injection scenarios: a known set of requests, a fault in the middle, then an audit.

Each scenario sends N >= 5000 requests with distinct ids to a fresh fleet, injects its fault once
a share of the results has arrived, waits for every id, then re-reads the results topic from the
beginning (read_committed) and counts missing ids and duplicates. The table of all scenarios is
printed at the end of the pytest run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.fleet import Fleet, FleetIO, start_fleet
from tests.helpers import read_jsonl_texts

REQUESTS_PER_SCENARIO = 5000


STACK = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack.py"


def stack(action: str, service: str) -> None:
    """Stops or starts one service of the local stack (`embedfleet stack up|down --service ...`)."""
    done = subprocess.run(
        [sys.executable, str(STACK), action, "--service", service],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@dataclass
class FaultReport:
    scenario: str
    sent: int
    answered: int  # good ids with a success result
    missing: int  # good ids without one
    duplicates: int  # success results beyond the first, per id
    recovery_s: float  # the longest gap between results after the fault
    notes: str = ""
    errors: int = 0  # error results for the bad records
    dlq: int = 0  # dead letters of the bad records
    peak_rss_mb: float = 0.0  # the workers' peak resident memory (VmHWM)


@dataclass
class FaultLedger:
    rows: list[FaultReport] = field(default_factory=list)
    # (title, markdown lines): detail tables printed after the report (the record fuzzer's, by kind)
    tables: list[tuple[str, list[str]]] = field(default_factory=list)


_LEDGER = FaultLedger()


@pytest.fixture(scope="session")
def fault_ledger() -> FaultLedger:
    return _LEDGER


@pytest.fixture
async def two_workers(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """Two workers on fresh topics, stopped and cleaned up after the test."""
    fleet = await start_fleet(kafka_bootstrap, redis_url, model_dir, tmp_path, workers=2)
    yield fleet
    fleet.stop_all()
    await fleet.cleanup()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _LEDGER.rows:
        return
    write = terminalreporter.write_line
    write("")
    write(
        "fault-injection report (sent / answered / error results / DLQ / missing / duplicates / "
        "longest stall / peak RSS)"
    )
    write(
        f"{'scenario':48} {'sent':>6} {'answered':>9} {'errors':>6} {'dlq':>5} {'missing':>8} "
        f"{'dups':>6} {'stall s':>8} {'RSS MB':>7}  notes"
    )
    for row in _LEDGER.rows:
        write(
            f"{row.scenario:48} {row.sent:6d} {row.answered:9d} {row.errors:6d} {row.dlq:5d} "
            f"{row.missing:8d} {row.duplicates:6d} {row.recovery_s:8.1f} {row.peak_rss_mb:7.0f}  "
            f"{row.notes}"
        )
    for title, lines in _LEDGER.tables:
        write("")
        write(title)
        for line in lines:
            write(line)


def scenario_texts(shared_dir: Path, count: int = REQUESTS_PER_SCENARIO) -> list[str]:
    """Real corpus queries, salted so that every one is a cache miss (the model is busy when the
    fault hits)."""
    salt = uuid.uuid4().hex[:6]
    base = read_jsonl_texts(shared_dir / "corpus" / "queries.jsonl", limit=count)
    return [f"{text} ({salt}-{i})" for i, text in enumerate(base)]


@dataclass
class Audit:
    """Every committed record of some topics, read from the beginning, counted per request id."""

    success: Counter[str] = field(default_factory=Counter)  # id -> success results
    errors: dict[str, list[str]] = field(default_factory=dict)  # id -> error codes
    dead_letters: list[dict[str, bytes]] = field(default_factory=list)  # DLQ headers

    def answered(self, ids: list[str]) -> int:
        return sum(1 for i in ids if self.success[i] > 0)

    def missing(self, ids: list[str]) -> int:
        return len(ids) - self.answered(ids)

    def duplicates(self, ids: list[str]) -> int:
        return sum(max(0, self.success[i] - 1) for i in ids)

    def error_codes(self, ids: list[str]) -> Counter[str]:
        return Counter(code for i in ids for code in self.errors.get(i, []))

    def dlq_codes(self) -> Counter[str]:
        return Counter(h.get("dlq-error-code", b"").decode() for h in self.dead_letters)


async def assign_from_beginning(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    """Assigns every partition of ``topics`` to ``consumer`` at its beginning. The partitions come
    from an all-topics metadata request, as tests/dlq reads them: none is auto-created."""
    metadata = await consumer._client.fetch_all_metadata()
    partitions = [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(metadata.partitions_for_topic(topic) or ())
    ]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    return partitions


async def read_topics(bootstrap: str, topics: list[str], timeout_s: float = 60) -> list[Any]:
    """Every committed record of ``topics`` (all partitions), from the beginning to the current end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    found: list[Any] = []
    try:
        partitions = await assign_from_beginning(consumer, topics)
        end = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                found.extend(records)
            positions = [await consumer.position(tp) for tp in end]
            if all(p >= o for p, o in zip(positions, end.values(), strict=True)):
                break
    finally:
        await consumer.stop()
    return found


async def audit_fleet(fleet: Fleet, extra_topics: list[str] | None = None) -> Audit:
    """Results (the fleet's topic and ``extra_topics``) and dead letters, counted."""
    found = Audit()
    for record in await read_topics(fleet.bootstrap, [fleet.results_topic, *(extra_topics or [])]):
        result = json.loads(record.value)
        if result.get("error"):
            found.errors.setdefault(result.get("id"), []).append(result["error"]["code"])
        else:
            found.success[result.get("id")] += 1
    for record in await read_topics(fleet.bootstrap, [fleet.dlq_topic]):
        found.dead_letters.append({k: v for k, v in record.headers})
    return found


async def audit(fleet: Fleet, ids: list[str], timeout_s: float = 60) -> tuple[int, int, int]:
    """(answered, missing, duplicates) among committed results, read from the beginning."""
    found = await audit_fleet(fleet)
    return found.answered(ids), found.missing(ids), found.duplicates(ids)


async def run_scenario(
    fleet: Fleet,
    texts: list[str],
    fault: Callable[[], Awaitable[str | None]],
    *,
    at_fraction: float = 0.3,
    timeout_s: float = 300,
    **request_fields: Any,
) -> tuple[FleetIO, list[str], float, str]:
    """Sends the texts, runs `fault` when `at_fraction` of them are answered, waits for all.
    Returns the IO (results as seen live), the ids, the longest stall after the fault and notes."""
    async with FleetIO(fleet) as io:
        ids = await io.send_texts(texts, **request_fields)
        threshold = int(len(ids) * at_fraction)
        deadline = time.monotonic() + timeout_s
        while sum(1 for i in ids if i in io.results) < threshold:
            assert time.monotonic() < deadline, "the fleet never got going"
            await asyncio.sleep(0.02)
        fault_at = time.monotonic()
        notes = await fault() or ""
        await io.wait_for(ids, timeout_s=timeout_s)
        after = [t for t in io.arrivals if t >= fault_at]
        gaps = [b - a for a, b in zip([fault_at, *after], after, strict=False)]
        return io, ids, max(gaps, default=0.0), notes
