"""Fault-injection scenarios: a known set of requests, a fault in the middle, then an audit.

Each scenario sends N >= 5000 requests with distinct ids to a fresh fleet, injects its fault once
a share of the results has arrived, waits for every id, then re-reads the results topic from the
beginning (read_committed) and counts missing ids and duplicates. The table of all scenarios is
printed at the end of the pytest run.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.fleet import Fleet, FleetIO
from tests.helpers import read_jsonl_texts

REQUESTS_PER_SCENARIO = 5000


@dataclass
class FaultReport:
    scenario: str
    sent: int
    answered: int
    missing: int
    duplicates: int
    recovery_s: float
    notes: str = ""


@dataclass
class FaultLedger:
    rows: list[FaultReport] = field(default_factory=list)


_LEDGER = FaultLedger()


@pytest.fixture(scope="session")
def fault_ledger() -> FaultLedger:
    return _LEDGER


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _LEDGER.rows:
        return
    write = terminalreporter.write_line
    write("")
    write("fault-injection report (requests sent / answered / missing / duplicates / longest stall)")
    write(f"{'scenario':44} {'sent':>6} {'answered':>9} {'missing':>8} {'dups':>6} {'stall s':>8}  notes")
    for row in _LEDGER.rows:
        write(f"{row.scenario:44} {row.sent:6d} {row.answered:9d} {row.missing:8d} {row.duplicates:6d} "
              f"{row.recovery_s:8.1f}  {row.notes}")


def scenario_texts(shared_dir: Path, count: int = REQUESTS_PER_SCENARIO) -> list[str]:
    """Real corpus queries, salted so that every one is a cache miss (the model is busy when the
    fault hits)."""
    salt = uuid.uuid4().hex[:6]
    base = read_jsonl_texts(shared_dir / "corpus" / "queries.jsonl", limit=count)
    return [f"{text} ({salt}-{i})" for i, text in enumerate(base)]


async def audit(fleet: Fleet, ids: list[str], timeout_s: float = 60) -> tuple[int, int, int]:
    """(answered, missing, duplicates) among committed results, read from the beginning."""
    wanted = set(ids)
    counts: dict[str, int] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=fleet.bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        partitions = [TopicPartition(fleet.results_topic, p) for p in range(fleet.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                for record in records:
                    result_id = json.loads(record.value).get("id")
                    if result_id in wanted:
                        counts[result_id] = counts.get(result_id, 0) + 1
            positions = [await consumer.position(tp) for tp in end]
            if all(p >= o for p, o in zip(positions, end.values(), strict=True)):
                break
    finally:
        await consumer.stop()
    answered = len(counts)
    duplicates = sum(c - 1 for c in counts.values())
    return answered, len(wanted) - answered, duplicates


async def run_scenario(fleet: Fleet, texts: list[str], fault: Callable[[], Awaitable[str | None]], *,
                       at_fraction: float = 0.3, timeout_s: float = 300,
                       **request_fields: Any) -> tuple[FleetIO, list[str], float, str]:
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
