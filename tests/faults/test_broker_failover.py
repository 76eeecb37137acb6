"""Broker failover on a replicated Kafka: a local cluster of 3 KRaft nodes (replication factor 3,
min.insync.replicas 2, started here by `stack.py up --brokers 3` beside the single-node stack).

Under load (5000 requests, every one a cache miss), for at-least-once and exactly-once workers:

* kill -9 the leader of the busiest `embed.requests` partition, start it again 5 s later;
* a rolling restart of all three nodes (SIGTERM, start, wait until every replica is back in sync).

The audit re-reads the results topic from the beginning (read_committed): 0 missing, duplicates
counted (0 for exactly-once), the longest stall between results reported.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.faults.conftest import STACK, FaultLedger, FaultReport, audit, run_scenario, scenario_texts
from tests.fleet import Fleet, start_fleet

pytestmark = pytest.mark.stack

NODES = 3
# Beside the single-node stack (9092-9094): node i on 19092 + 10 (i - 1), and so on.
KAFKA_PORT, CONTROLLER_PORT, SASL_PORT = 19092, 19093, 19094


@dataclass
class LocalCluster:
    state_dir: Path

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.port(node)}" for node in range(1, NODES + 1))

    @staticmethod
    def port(node: int) -> int:
        return KAFKA_PORT + 10 * (node - 1)

    def stack(self, action: str) -> None:
        done = subprocess.run(
            [
                sys.executable, str(STACK), action, "--service", "kafka", "--brokers", str(NODES),
                "--state-dir", str(self.state_dir), "--kafka-port", str(KAFKA_PORT),
                "--controller-port", str(CONTROLLER_PORT), "--sasl-port", str(SASL_PORT),
                "--kafka-heap", "384m",
            ],
            capture_output=True, text=True, check=False, timeout=240,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def pid(self, node: int) -> int:
        return int((self.state_dir / "run" / f"kafka-{node}.pid").read_text())

    def kill(self, node: int, sig: int) -> None:
        pid = self.pid(node)
        os.kill(pid, sig)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
            assert time.monotonic() < deadline, f"node {node} did not stop"
            time.sleep(0.2)

    async def leader_of_busiest(self, topic: str) -> tuple[int, int]:
        """(node id, partition): the leader of the partition holding the most records."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap)
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await consumer.start()
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
            leaders = {p["partition"]: p["leader"] for p in described["partitions"]}
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in leaders])
            busiest = max(ends, key=lambda tp: ends[tp]).partition
            return leaders[busiest], busiest
        finally:
            await admin.close()
            await consumer.stop()

    async def wait_in_sync(self, topics: list[str], timeout_s: float = 120) -> None:
        """Until every partition of ``topics`` has all its replicas in sync."""
        deadline = time.monotonic() + timeout_s
        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            try:
                await admin.start()
                described = await admin.describe_topics(topics)
                if all(len(p["isr"]) == NODES for t in described for p in t["partitions"]):
                    return
            except Exception:  # a node is still coming back
                pass
            finally:
                await admin.close()
            assert time.monotonic() < deadline, "replicas did not catch up"
            await asyncio.sleep(1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except OSError:
        return "Z"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("kafka-cluster")
    # The broker jars of the single-node stack, when it has them: no second Maven run.
    home = Path(os.environ.get("EMBEDFLEET_STACK_DIR") or _default_stack_dir())
    if (home / "kafka" / "libs" / ".pom-sha256").exists():
        shutil.copytree(home / "kafka" / "libs", state / "kafka" / "libs")
    running = LocalCluster(state)
    running.stack("up")
    try:
        yield running
    finally:
        running.stack("down")


def _default_stack_dir() -> Path:
    sys.path.insert(0, str(STACK.parent))
    from stack import default_state_dir

    return Path(default_state_dir())


@pytest.fixture(params=["at-least-once", "exactly-once"])
async def replicated_fleet(
    request: pytest.FixtureRequest, cluster: LocalCluster, redis_url: str, model_dir: Path, tmp_path: Path
) -> AsyncIterator[Fleet]:
    fleet = await start_fleet(
        cluster.bootstrap, redis_url, model_dir, tmp_path, workers=2, replication=NODES,
        EMBEDFLEET_GUARANTEE=request.param,
    )  # fmt: skip
    try:
        yield fleet
    finally:
        fleet.stop_all()
        await fleet.cleanup()


async def check(
    ledger: FaultLedger, name: str, fleet: Fleet, ids: list[str], stall: float, notes: str
) -> FaultReport:
    answered, missing, duplicates = await audit(fleet, ids)
    guarantee = fleet.extra_env["EMBEDFLEET_GUARANTEE"]
    row = FaultReport(f"{name} ({guarantee})", len(ids), answered, missing, duplicates, stall, notes)
    ledger.rows.append(row)
    assert all(worker.alive for worker in fleet.workers), "workers must ride out a broker failover"
    assert row.missing == 0
    if guarantee == "exactly-once":
        assert row.duplicates == 0
    return row


async def test_kill_9_the_leader_of_the_busiest_partition(
    replicated_fleet: Fleet, cluster: LocalCluster, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    async def kill_leader() -> str:
        node, partition = await cluster.leader_of_busiest(replicated_fleet.requests_topic)
        await asyncio.to_thread(cluster.kill, node, signal.SIGKILL)
        await asyncio.sleep(5)  # two nodes of three carry on (min.insync.replicas 2)
        await asyncio.to_thread(cluster.stack, "up")
        return f"node {node} (leader of requests p{partition}, the busiest) kill -9, back after 5 s"

    try:
        _, ids, stall, notes = await run_scenario(replicated_fleet, scenario_texts(shared_dir), kill_leader)
    finally:
        await asyncio.to_thread(cluster.stack, "up")
    await check(fault_ledger, "3 brokers: kill -9 the busiest leader", replicated_fleet, ids, stall, notes)


async def test_rolling_restart_of_all_three_brokers(
    replicated_fleet: Fleet, cluster: LocalCluster, shared_dir: Path, fault_ledger: FaultLedger
) -> None:
    fleet = replicated_fleet
    topics = [fleet.requests_topic, fleet.results_topic]

    async def rolling_restart() -> str:
        started = time.monotonic()
        for node in range(1, NODES + 1):
            await asyncio.to_thread(cluster.kill, node, signal.SIGTERM)  # controlled shutdown
            await asyncio.to_thread(cluster.stack, "up")
            await cluster.wait_in_sync(topics)
        took = time.monotonic() - started
        return f"nodes 1, 2, 3 restarted one by one (SIGTERM, start, full ISR) in {took:.0f} s"

    try:
        _, ids, stall, notes = await run_scenario(
            fleet, scenario_texts(shared_dir), rolling_restart, at_fraction=0.1, timeout_s=600
        )
    finally:
        await asyncio.to_thread(cluster.stack, "up")
    await check(fault_ledger, "3 brokers: rolling restart", fleet, ids, stall, notes)
