"""Exactly-once against zombies: a worker frozen or killed inside an open transaction.

The workers run with ``--fault-marker HOLD-TXN --fault-kind hold-transaction``: the batch holding
the marked request keeps its transaction open (results and offsets sent, not committed) for 30 s,
so the fault hits inside an open transaction, every time. Results are read with read_committed.

* SIGSTOP for longer than the session timeout: the group gives the partitions to the other
  worker, whose producers fence the frozen one's; after SIGCONT the zombie's commit fails and it
  gives the partitions up. 0 duplicates.
* kill -9, then a new worker under a new id: the new owners' producers end the dead one's open
  transaction at once (the reader's stall is measured), 0 duplicates.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import FaultLedger, FaultReport, audit_fleet, scenario_texts
from tests.fleet import Fleet, FleetIO, WorkerProcess

HOLD = ("--fault-marker", "HOLD-TXN", "--fault-kind", "hold-transaction")
REQUESTS = 2000


@pytest.fixture
async def eos_fleet(kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path) -> Any:
    fleet = Fleet(
        kafka_bootstrap, redis_url, model_dir, tmp_path, extra_env={"EMBEDFLEET_GUARANTEE": "exactly-once"}
    )
    await fleet.create_topics()
    for _ in range(2):
        fleet.start_worker(*HOLD)
    await fleet.wait_ready()
    yield fleet
    for worker in fleet.workers:
        if worker.alive:
            worker.process.send_signal(signal.SIGCONT)
    fleet.stop_all()
    await fleet.cleanup()


async def holder(fleet: Fleet, timeout_s: float = 60) -> WorkerProcess:
    """The worker whose transaction is being held open."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for worker in fleet.workers:
            if "holding the open transaction" in worker.log():
                return worker
        await asyncio.sleep(0.1)
    raise AssertionError("no worker held a transaction open")


async def zombie_scenario(
    fleet: Fleet, shared_dir: Path, fault: Any
) -> tuple[FleetIO, list[str], float, str]:
    texts = scenario_texts(shared_dir, REQUESTS)
    async with FleetIO(fleet) as io:
        ids = await io.send_texts(texts[: REQUESTS // 4])
        marked = await io.send_texts(["HOLD-TXN: this batch's transaction stays open"])
        victim = await holder(fleet)
        fault_at = time.monotonic()
        notes = await fault(victim)
        ids += await io.send_texts(texts[REQUESTS // 4 :])
        await io.wait_for(ids + marked, timeout_s=300)
        after = sorted(t for t in io.arrivals if t >= fault_at)
        gaps = [b - a for a, b in zip([fault_at, *after], after, strict=False)]
        return io, ids + marked, max(gaps, default=0.0), notes


async def test_a_frozen_worker_cannot_commit_after_it_wakes(
    eos_fleet: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    async def freeze(victim: WorkerProcess) -> str:
        os.kill(victim.process.pid, signal.SIGSTOP)
        await asyncio.sleep(15)  # > session timeout (10 s): the group moves on without it
        os.kill(victim.process.pid, signal.SIGCONT)
        return f"{victim.name} SIGSTOPped 15 s inside an open transaction, then resumed"

    _, ids, stall, notes = await zombie_scenario(eos_fleet, shared_dir, freeze)
    await asyncio.sleep(5)  # let the zombie try to commit
    found = await audit_fleet(eos_fleet)
    fenced = eos_fleet.metric("embedfleet_fenced_partitions_total")
    row = FaultReport(
        "zombie: SIGSTOP in a transaction (exactly-once)",
        len(ids),
        found.answered(ids),
        found.missing(ids),
        found.duplicates(ids),
        stall,
        f"{notes}; {fenced:.0f} partition(s) fenced",
    )
    fault_ledger.rows.append(row)
    assert row.missing == 0
    assert row.duplicates == 0
    assert all(w.alive for w in eos_fleet.workers)
    assert "fenced" in "".join(w.log() for w in eos_fleet.workers)


async def test_kill_9_in_a_transaction_then_a_new_worker(
    eos_fleet: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    async def kill(victim: WorkerProcess) -> str:
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=10)  # reaped before its replacement starts
        eos_fleet.start_worker(*HOLD)  # a new worker id
        return f"{victim.name} killed with SIGKILL inside an open transaction; a new worker joined"

    io, ids, stall, notes = await zombie_scenario(eos_fleet, shared_dir, kill)
    found = await audit_fleet(eos_fleet)
    row = FaultReport(
        "kill -9 in a transaction + new worker (exactly-once)",
        len(ids),
        found.answered(ids),
        found.missing(ids),
        found.duplicates(ids),
        stall,
        f"{notes}; the reader's longest stall is the stall column",
    )
    fault_ledger.rows.append(row)
    assert row.missing == 0
    assert row.duplicates == 0
    results = [json.dumps(r) for rs in io.results.values() for r in rs]
    assert len(results) == len(ids)  # read_committed saw each result once, live too
