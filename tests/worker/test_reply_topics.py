"""Reply topics a worker learns of at start: results reach them at once, not after a timeout.

A worker's producer that saw a reply topic in its first, all-topics metadata answer never added
it to the topics it refreshes; the next refresh forgot the topic's leader and the batch waited
40 s (aiokafka's request timeout) before failing with NotLeaderForPartitionError. A gateway or
client that starts before the workers (a fleet restart, a rolling deploy) hit it every time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from producer import Client
from tests.fleet import Fleet

pytestmark = pytest.mark.stack


async def test_a_reply_topic_older_than_the_worker_gets_its_results_at_once(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    fleet = Fleet(kafka_bootstrap, redis_url, model_dir, tmp_path)
    await fleet.create_topics()
    try:
        fleet.start_worker()
        await fleet.wait_ready()
        fleet.stop_all()  # the model contract is now in Redis: the client can key by content hash
        client = Client(fleet.client_config())
        async with client:  # its private reply topic exists before the next worker starts
            worker = fleet.start_worker()
            await fleet.wait_ready([worker])
            await asyncio.sleep(10)  # past the worker's first metadata refreshes (it took this)
            for round_ in range(3):
                texts = [f"reply topic round {round_} text {i} {uuid.uuid4().hex[:6]}" for i in range(5)]
                started = time.monotonic()
                vectors = await client.embed(texts, timeout=20)
                assert len(vectors) == 5 and all(v.shape == (384,) for v in vectors)
                assert time.monotonic() - started < 20
            assert client.stats.computed == 15 and client.stats.failed == 0
            assert "NotLeaderForPartition" not in worker.log()
    finally:
        fleet.stop_all()
        await fleet.cleanup()
