"""The cache on Redis Cluster (`redis+cluster://`): a local cluster of 3 masters and 3 replicas
(started here by `stack.py up --service redis-cluster` beside the single-node stack).

* a batch's lookups and stores are one round trip per node (counted on the client's sockets);
* workers and the Python client share the cache through the cluster;
* a master killed with SIGKILL under load: the cache fails open (nothing lost), and once its
  replica has taken over, cached texts are hits again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from producer import Client
from tests.faults.conftest import STACK, FaultLedger, FaultReport, audit, run_scenario, scenario_texts
from tests.fleet import FleetIO, start_fleet
from worker.cache import VectorCache, redis_client
from worker.engine.embedder import Embedder
from worker.metrics import WorkerMetrics

pytestmark = pytest.mark.stack

GO_CLIENT = Path(__file__).resolve().parents[2] / "producer" / "go"
FIRST_PORT = 7100  # 6 nodes on 7100-7105 (cluster bus +10000), beside the single Redis on 6379


class LocalRedisCluster:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.ports = [FIRST_PORT + i for i in range(6)]
        # Several nodes: any one that answers lets a client (re)discover the cluster.
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:3]) + "/0"

    def stack(self, action: str) -> None:
        done = subprocess.run(
            [
                sys.executable, str(STACK), action, "--service", "redis-cluster",
                "--state-dir", str(self.state_dir), "--redis-cluster-port", str(FIRST_PORT),
            ],
            capture_output=True, text=True, check=False, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)

    def masters(self) -> list[int]:
        nodes = self.node(self.ports[0]).cluster("NODES")
        return sorted(int(address.split(":")[1].split("@")[0]) for address, info in nodes.items()
                      if "master" in info["flags"] and "fail" not in info["flags"])  # fmt: skip

    def kill(self, port: int) -> None:
        pid = int((self.state_dir / "run" / f"redis-cluster-{port}.pid").read_text())
        os.kill(pid, signal.SIGKILL)

    def healthy(self) -> bool:
        try:
            info = self.node(self.ports[0]).cluster("INFO")
        except redis.RedisError:
            return False
        return info.get("cluster_state") == "ok" and len(self.masters()) == 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    running = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    running.stack("up")
    try:
        yield running
    finally:
        running.stack("down")


async def test_lookups_and_stores_are_one_round_trip_per_node(cluster: LocalRedisCluster) -> None:
    client = redis_client(cluster.url, timeout_s=2)
    cache = VectorCache(client, key_prefix=f"cl-{uuid.uuid4().hex[:8]}", model_name="m", ttl_s=60,
                        metrics=WorkerMetrics())  # fmt: skip
    rng = np.random.default_rng(3)
    entries = [(f"k{i}", rng.standard_normal(8).astype(np.float32), 4) for i in range(300)]
    sends: list[int] = []
    original = redis.asyncio.connection.AbstractConnection.send_packed_command

    async def counted(self: Any, command: Any, check_health: bool = True) -> None:
        sends.append(self.port)
        await original(self, command, check_health)

    try:
        # Connections to every node first (their setup commands are not a batch's cost).
        await cache.store(entries[:30], "m")
        await cache.lookup([(key, 8) for key, _, _ in entries[:30]])
        redis.asyncio.connection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        await cache.store(entries, "m")
        store_sends = list(sends)
        sends.clear()
        found = await cache.lookup([(key, 8) for key, _, _ in entries] + [("absent", 8)])
        lookup_sends = list(sends)
    finally:
        redis.asyncio.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
        await client.aclose()
    assert all(v is not None and np.array_equal(v, e[1]) for v, e in zip(found, entries, strict=False))
    assert found[-1] is None
    # 300 keys over 3 masters: one send per master, not one per key.
    assert len(lookup_sends) == len(set(lookup_sends)) == 3, lookup_sends
    assert len(store_sends) == len(set(store_sends)) == 3, store_sends


async def test_workers_and_the_client_share_the_cache_through_the_cluster(
    cluster: LocalRedisCluster, kafka_bootstrap: str, model_dir: Path, tmp_path: Path
) -> None:
    fleet = await start_fleet(kafka_bootstrap, cluster.url, model_dir, tmp_path, workers=1)
    try:
        texts = [f"cluster cached text {uuid.uuid4().hex[:6]} {i}" for i in range(200)]
        client = Client(fleet.client_config())
        async with client:
            first = await client.embed(texts, timeout=60)
            assert client.stats.computed == 200 and client.stats.produced == 200
            again = await client.embed(texts, timeout=60)
        assert client.stats.produced == 200, "the second call is answered from the cluster alone"
        assert client.stats.cached == 200
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        assert "vector index" in fleet.workers[0].log()  # it said why there is no kNN index
    finally:
        fleet.stop_all()
        await fleet.cleanup()


async def test_the_go_client_reads_the_cluster_cache(
    cluster: LocalRedisCluster, kafka_bootstrap: str, model_dir: Path, tmp_path: Path
) -> None:
    """go-redis's cluster client for `redis+cluster://`: the Go integration test (first call
    computed, second answered from the cluster alone) against a fleet on the cluster."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed")
    fleet = await start_fleet(kafka_bootstrap, cluster.url, model_dir, tmp_path, workers=1)
    try:
        texts = [f"go over a redis cluster {uuid.uuid4().hex[:6]} {i}" for i in range(50)]
        expected = Embedder.from_bundle(model_dir, variant="int8", intra_op_threads=1).embed(texts).vectors
        path = tmp_path / "expected.json"
        path.write_text(json.dumps({"texts": texts, "vectors": expected.astype(np.float64).tolist()}))
        env = {
            **os.environ,
            "EMBEDFLEET_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "EMBEDFLEET_REDIS_URL": cluster.url,
            "EMBEDFLEET_REQUESTS_TOPIC": fleet.requests_topic,
            "EMBEDFLEET_RESULTS_TOPIC": fleet.results_topic,
            "EMBEDFLEET_CACHE_KEY_PREFIX": fleet.cache_prefix,
            "EMBEDFLEET_EXPECTED_VECTORS": str(path),
        }
        done = await asyncio.to_thread(
            subprocess.run,
            [go, "test", "-count=1", "-v", "-run", "TestIntegrationEmbed", "./..."],
            cwd=GO_CLIENT,
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert "--- PASS: TestIntegrationEmbed" in done.stdout, done.stdout[-4000:]
    finally:
        fleet.stop_all()
        await fleet.cleanup()


async def test_a_master_killed_under_load_fails_open_then_hits_come_back(
    cluster: LocalRedisCluster, kafka_bootstrap: str, model_dir: Path, tmp_path: Path, shared_dir: Path,
    fault_ledger: FaultLedger,
) -> None:  # fmt: skip
    fleet = await start_fleet(kafka_bootstrap, cluster.url, model_dir, tmp_path, workers=2)
    warm = [f"warm cluster entry {uuid.uuid4().hex[:6]} {i}" for i in range(60)]
    try:
        async with FleetIO(fleet) as io:
            await io.wait_for(await io.send_texts(warm))
        victim = cluster.masters()[-1]

        async def kill_master() -> str:
            await asyncio.to_thread(cluster.kill, victim)
            return f"master 127.0.0.1:{victim} killed with SIGKILL"

        _, ids, stall, notes = await run_scenario(
            fleet, scenario_texts(shared_dir), kill_master, at_fraction=0.2
        )
        answered, missing, duplicates = await audit(fleet, ids)
        errors = fleet.metric("embedfleet_cache_errors_total")
        deadline = time.monotonic() + 60
        while not cluster.healthy():  # its replica takes over (cluster-node-timeout 2 s)
            assert time.monotonic() < deadline, "no replica took over"
            await asyncio.sleep(0.5)
        async with FleetIO(fleet) as io:
            deadline = time.monotonic() + 30
            while True:
                results = await io.wait_for(await io.send_texts(warm))
                hits = sum(bool(r.get("cached")) for r in results.values())
                if hits == len(warm) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
        fault_ledger.rows.append(
            FaultReport("Redis Cluster: a master killed", len(ids), answered, missing, duplicates, stall,
                        f"{notes}; cache errors {errors:.0f}; warm hits after failover {hits}/{len(warm)}")
        )  # fmt: skip
        assert all(worker.alive for worker in fleet.workers)
        assert missing == 0
        assert errors > 0, "the kill was not felt: the test proved nothing"
        assert hits == len(warm)
    finally:
        fleet.stop_all()
        cluster.stack("up")  # the killed node rejoins as a replica
        await fleet.cleanup()
