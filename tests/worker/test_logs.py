"""Structured logs: one JSON object per line (worker id, partitions, offsets, batch size), or text."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from tests.fleet import FleetIO, start_fleet
from worker.logs import JsonFormatter


def test_json_formatter_carries_extra_fields() -> None:
    record = logging.LogRecord("embedfleet.worker", logging.INFO, __file__, 1, "batch done", None, None)
    record.batch_size = 7
    record.offsets = {"0": "10-16"}
    line = json.loads(JsonFormatter("w-1").format(record))
    assert line["worker"] == "w-1" and line["msg"] == "batch done"
    assert line["batch_size"] == 7 and line["offsets"] == {"0": "10-16"}
    assert line["level"] == "info" and line["ts"].endswith("Z")


async def test_a_worker_logs_json_batch_events(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    fleet = await start_fleet(
        kafka_bootstrap,
        redis_url,
        model_dir,
        tmp_path,
        workers=1,
        EMBEDFLEET_LOG_FORMAT="json",
        EMBEDFLEET_LOG_LEVEL="DEBUG",
    )
    try:
        async with FleetIO(fleet) as io:
            await io.wait_for(await io.send_texts([f"log me {uuid.uuid4().hex} {i}" for i in range(20)]))
        fleet.stop_all()
        lines = [json.loads(line) for line in fleet.workers[0].log().splitlines() if line.startswith("{")]
        assert lines, "no JSON log lines"
        batches = [line for line in lines if line["msg"] == "batch done"]
        assert batches and sum(b["batch_size"] for b in batches) == 20
        assert all(b["worker"] == fleet.workers[0].name for b in batches)
        assert all(isinstance(b["offsets"], dict) and b["offsets"] for b in batches)
        assert any("partitions assigned" in line["msg"] for line in lines)
    finally:
        fleet.stop_all()
        await fleet.cleanup()
