"""One fleet serves one serving fingerprint: clients compute content hashes from the contract the
workers publish in Redis, so a worker of another fingerprint (another variant or model build)
refuses to start, before it joins the group, unless told to replace the contract."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as redis_asyncio

from schemas.cache_layout import contract_key
from tests.fleet import Fleet
from worker.engine.bundle import load_bundle, serving_fingerprint

OTHER_FINGERPRINT = "0" * 64


async def test_a_worker_of_another_fingerprint_refuses_unless_told_to_replace(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    fleet = Fleet(kafka_bootstrap, redis_url, model_dir, tmp_path)
    await fleet.create_topics()
    client = redis_asyncio.Redis.from_url(redis_url)
    manifest = load_bundle(model_dir).manifest
    key = contract_key(fleet.cache_prefix, manifest.name)
    ours = serving_fingerprint(manifest, "int8")
    try:
        await client.hset(key, mapping={"fingerprint": OTHER_FINGERPRINT, "dim": str(manifest.dim)})

        refused = fleet.start_worker()
        status = await asyncio.to_thread(refused.process.wait, 90)
        log = refused.log()
        assert status == 2, log[-3000:]
        assert "one fleet serves one fingerprint" in log and "EMBEDFLEET_ON_CONTRACT_MISMATCH=replace" in log
        assert "partitions assigned" not in log  # it never joined the group
        assert (await client.hget(key, "fingerprint")) == OTHER_FINGERPRINT.encode()

        replacing = fleet.start_worker(env={"EMBEDFLEET_ON_CONTRACT_MISMATCH": "replace"})
        await fleet.wait_ready([replacing])
        assert (await client.hget(key, "fingerprint")) == ours.encode()
        assert "replacing the published contract" in replacing.log()

        same = fleet.start_worker()  # the contract is its own now: it starts
        await fleet.wait_ready([same])
        fleet.stop_all()
        assert replacing.process.returncode == 0 and same.process.returncode == 0
    finally:
        fleet.stop_all()
        await fleet.cleanup()
        await client.aclose()
