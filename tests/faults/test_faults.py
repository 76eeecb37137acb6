"""Nothing is lost whatever breaks: kill -9, SIGTERM, Redis and broker outages, rebalances, poison.

Every scenario audits the results topic from the beginning afterwards: missing must be 0;
duplicates are reported (at-least-once allows them) and must be 0 where the design promises it
(graceful SIGTERM, exactly-once).
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

from tests.faults.conftest import (
    FaultLedger,
    FaultReport,
    audit,
    audit_fleet,
    run_scenario,
    scenario_texts,
    stack,
)
from tests.fleet import Fleet, FleetIO, start_fleet
from tests.helpers import read_jsonl_texts


async def record(
    ledger: FaultLedger, name: str, fleet: Fleet, ids: list[str], stall: float, notes: str = ""
) -> FaultReport:
    answered, missing, duplicates = await audit(fleet, ids)
    row = FaultReport(name, len(ids), answered, missing, duplicates, stall, notes)
    ledger.rows.append(row)
    return row


async def test_kill_9_mid_batch_the_survivor_takes_over(
    two_workers: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    victim = two_workers.workers[0]

    async def kill() -> str:
        os.kill(victim.process.pid, signal.SIGKILL)
        return "one of two workers killed with SIGKILL"

    _, ids, stall, notes = await run_scenario(two_workers, scenario_texts(shared_dir), kill)
    victim.process.wait(timeout=10)  # reaped (a kill -9 cannot fail: nothing to assert)
    row = await record(fault_ledger, "kill -9 mid-batch (at-least-once)", two_workers, ids, stall, notes)
    assert row.missing == 0


async def test_sigterm_drains_commits_and_leaves_without_duplicates(
    two_workers: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    leaver = two_workers.workers[0]

    async def terminate() -> str:
        code = await asyncio.to_thread(two_workers.stop_worker, leaver, signal.SIGTERM)
        assert code == 0, leaver.log()[-3000:]
        return "one of two workers stopped with SIGTERM under load"

    _, ids, stall, notes = await run_scenario(two_workers, scenario_texts(shared_dir), terminate)
    row = await record(fault_ledger, "SIGTERM under load", two_workers, ids, stall, notes)
    assert row.missing == 0
    assert row.duplicates == 0
    assert "stopped" in leaver.log()


async def test_redis_down_for_10s_then_back(
    two_workers: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    warm_texts = [f"warm cache entry {i}" for i in range(50)]
    async with FleetIO(two_workers) as io:
        await io.wait_for(await io.send_texts(warm_texts))

    async def outage() -> str:
        await asyncio.to_thread(stack, "down", "redis")
        await asyncio.sleep(10)
        await asyncio.to_thread(stack, "up", "redis")
        return "Redis stopped for 10 s"

    try:
        _, ids, stall, notes = await run_scenario(
            two_workers, scenario_texts(shared_dir), outage, at_fraction=0.1
        )
    finally:
        await asyncio.to_thread(stack, "up", "redis")  # idempotent: never leave Redis down
    assert two_workers.metric("embedfleet_cache_errors_total") > 0
    # The hit rate recovers: the warm entries are served from Redis again. (A worker's hot entries
    # cannot stand in for Redis here: it keeps only entries its hit lane found in Redis, and these
    # were computed, never found, before the outage; each is found in Redis at least once after.)
    async with FleetIO(two_workers) as io:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            results = await io.wait_for(await io.send_texts(warm_texts))
            hits = sum(bool(r.get("cached")) for r in results.values())
            if hits == len(warm_texts) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(1)
    row = await record(
        fault_ledger,
        "Redis down 10 s",
        two_workers,
        ids,
        stall,
        f"{notes}; warm hits after: {hits}/{len(warm_texts)}",
    )
    assert row.missing == 0
    assert hits == len(warm_texts)


async def test_broker_restart_mid_run(
    two_workers: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    async def restart() -> str:
        await asyncio.to_thread(stack, "down", "kafka")
        await asyncio.sleep(2)
        await asyncio.to_thread(stack, "up", "kafka")
        return "Kafka broker stopped and started"

    try:
        _, ids, stall, notes = await run_scenario(two_workers, scenario_texts(shared_dir), restart)
    finally:
        await asyncio.to_thread(stack, "up", "kafka")
    assert all(w.alive for w in two_workers.workers), "workers must reconnect, not exit"
    row = await record(fault_ledger, "broker restart", two_workers, ids, stall, notes)
    assert row.missing == 0


async def test_rebalance_when_a_third_worker_joins(
    two_workers: Fleet, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    async def join() -> str:
        newcomer = two_workers.start_worker()
        await two_workers.wait_ready([newcomer])
        return "a third worker joined"

    # Early and with a longer backlog, so the newcomer gets partitions that still hold work.
    _, ids, stall, notes = await run_scenario(
        two_workers, scenario_texts(shared_dir, 8000), join, at_fraction=0.02
    )
    row = await record(fault_ledger, "rebalance: third worker joins", two_workers, ids, stall, notes)
    assert row.missing == 0
    assert two_workers.workers[2].metric("embedfleet_requests_total") > 0


async def test_poison_text_is_isolated(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    shared_dir: Path,
    fault_ledger: FaultLedger,
) -> None:
    fleet = Fleet(kafka_bootstrap, redis_url, model_dir, tmp_path)
    await fleet.create_topics()
    try:
        for _ in range(2):
            fleet.start_worker("--fault-marker", "POISON-PILL")
        await fleet.wait_ready()
        texts = scenario_texts(shared_dir)
        poisoned = {17, 1234, 4321}
        for index in poisoned:
            texts[index] = f"{texts[index]} POISON-PILL"

        async def nothing() -> str:
            return f"{len(poisoned)} texts make inference fail"

        io, ids, stall, notes = await run_scenario(fleet, texts, nothing)
        for index, request_id in enumerate(ids):
            result = io.results[request_id][-1]
            if index in poisoned:
                assert result["error"]["code"] == "inference_failed"
            else:
                assert "vector" in result, result
        await io.wait_for_dead_letters(len(poisoned))
        assert {h["dlq-error-code"] for _, h in io.dead_letters} == {b"inference_failed"}
        # "Answered" counts success results of the good ids; the poisoned get error results.
        good = [request_id for index, request_id in enumerate(ids) if index not in poisoned]
        found = await audit_fleet(fleet)
        bad = [ids[index] for index in sorted(poisoned)]
        row = FaultReport(
            "poison texts (inference fails)",
            len(ids),
            found.answered(good),
            found.missing(good),
            found.duplicates(good),
            stall,
            notes,
            errors=sum(found.error_codes(bad).values()),
            dlq=len(found.dead_letters),
        )
        fault_ledger.rows.append(row)
        assert row.missing == 0 and row.duplicates == 0
        assert found.error_codes(bad) == {"inference_failed": len(poisoned)} and row.dlq == len(poisoned)
    finally:
        fleet.stop_all()
        await fleet.cleanup()


async def test_exactly_once_kill_9_leaves_no_duplicates(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    shared_dir: Path,
    fault_ledger: FaultLedger,
) -> None:
    fleet = await start_fleet(
        kafka_bootstrap, redis_url, model_dir, tmp_path, workers=2, EMBEDFLEET_GUARANTEE="exactly-once"
    )
    try:
        victim = fleet.workers[0]

        async def kill() -> str:
            os.kill(victim.process.pid, signal.SIGKILL)
            return "one of two exactly-once workers killed with SIGKILL"

        _, ids, stall, notes = await run_scenario(fleet, scenario_texts(shared_dir), kill)
        row = await record(fault_ledger, "kill -9 mid-batch (exactly-once)", fleet, ids, stall, notes)
        assert row.missing == 0
        assert row.duplicates == 0
    finally:
        fleet.stop_all()
        await fleet.cleanup()


def long_scenario_texts(shared_dir: Path, count: int = 24, docs_per_text: int = 8) -> list[str]:
    """Long texts (corpus docs joined, ~1,000-3,000 tokens: several windows each), salted so
    every window is a cache miss."""
    salt = uuid.uuid4().hex[:6]
    docs = read_jsonl_texts(shared_dir / "corpus" / "docs.jsonl")
    return [
        f"({salt}-{i}) " + " ".join(docs[(i * docs_per_text + j) % len(docs)] for j in range(docs_per_text))
        for i in range(count)
    ]


async def test_exactly_once_kill_9_while_long_texts_windows_are_in_flight(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    shared_dir: Path,
    fault_ledger: FaultLedger,
) -> None:
    """Issue 24: a long text's windows are computed in the worker's batches and its result is
    published once all are done, in the transaction that commits its offset. A worker killed
    between windows loses nothing and publishes nothing twice."""
    fleet = await start_fleet(
        kafka_bootstrap, redis_url, model_dir, tmp_path, workers=2, EMBEDFLEET_GUARANTEE="exactly-once"
    )
    try:
        victim = fleet.workers[0]
        windows_before_kill: list[float] = []

        async def kill() -> str:
            windows_before_kill.append(victim.metric("embedfleet_windows_total"))
            os.kill(victim.process.pid, signal.SIGKILL)
            return "one of two exactly-once workers killed with SIGKILL while embedding long texts (pool)"

        io, ids, stall, notes = await run_scenario(
            fleet, long_scenario_texts(shared_dir), kill, long="pool", at_fraction=0.25
        )
        row = await record(
            fault_ledger,
            "kill -9 with long texts' windows in flight (exactly-once)",
            fleet,
            ids,
            stall,
            notes,
        )
        found = await audit_fleet(fleet)
        assert row.missing == 0
        assert row.duplicates == 0
        assert found.error_codes(ids) == {}, "every long text answered with a vector, none with an error"
        assert all(io.results[i][-1]["windows"] >= 2 for i in ids), "each answer pooled several windows"
        # The victim was embedding long texts when it died (its windows counter moved), and
        # three quarters of the texts were still unanswered.
        assert windows_before_kill and windows_before_kill[0] > 0
    finally:
        fleet.stop_all()
        await fleet.cleanup()
