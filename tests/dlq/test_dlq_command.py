"""`embedfleet dlq list|replay` against a real fleet: dead letters made by real workers, a fix
(a bigger text limit), then a replay of one error code only."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.fleet import EMBEDFLEET, REPO_ROOT, Fleet, FleetIO, start_fleet

SMALL_TEXT_LIMIT = 200
MESSAGE_LIMIT = 2048


@dataclass
class Scenario:
    fleet: Fleet
    io: FleetIO
    too_long: dict[str, bytes] = field(default_factory=dict)  # id -> raw request value
    unknown_task: list[str] = field(default_factory=list)
    too_large: list[str] = field(default_factory=list)

    def headers_of(self, request_id: str) -> list[tuple[str, bytes]]:
        return [("content-type", b"application/json"), ("x-trace", f"trace-{request_id}".encode())]


def dlq(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EMBEDFLEET, "dlq", *args],
        env=fleet.env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def run_dlq(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    result = await asyncio.to_thread(dlq, fleet, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


async def read_topic(bootstrap: str, topic: str) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        metadata = await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(topic, p) for p in sorted(metadata.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                records.extend((await consumer.getmany(tp, timeout_ms=500)).get(tp, []))
        return records
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
async def scenario(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Scenario]:
    """One worker with a small text limit; three texts over it, two unknown tasks, one message
    over the message limit and the DLQ's record limit (its DLQ copy is cut), one undecodable
    message and one good request."""
    fleet = await start_fleet(
        kafka_bootstrap,
        redis_url,
        model_dir,
        tmp_path_factory.mktemp("dlq"),
        workers=1,
        EMBEDFLEET_MAX_TEXT_BYTES=str(SMALL_TEXT_LIMIT),
        EMBEDFLEET_MAX_MESSAGE_BYTES=str(MESSAGE_LIMIT),
    )
    try:
        async with FleetIO(fleet) as io:
            state = Scenario(fleet, io)
            salt = uuid.uuid4().hex[:8]
            for i in range(3):
                request_id = f"long-{i}-{salt}"
                value = json.dumps({"id": request_id, "text": f"{salt} long text {i} " + "word " * 60})
                state.too_long[request_id] = value.encode()
                await io.send(
                    value.encode(), key=f"key-{request_id}".encode(), headers=state.headers_of(request_id)
                )
            for i in range(2):
                request_id = f"task-{i}-{salt}"
                state.unknown_task.append(request_id)
                # An ANSI escape in the task name: `dlq list` must not pass it to the terminal.
                await io.send(
                    json.dumps({"id": request_id, "text": "short", "task": "no-such-task\x1b[31m"}).encode()
                )
            request_id = f"large-{salt}"
            state.too_large.append(request_id)
            # Larger than the DLQ topic takes (1 MiB): its copy is cut, so replay skips it.
            await io.send(
                json.dumps(
                    {"id": request_id, "text": "x" * 100, "metadata": {"pad": "p" * (1536 << 10)}}
                ).encode()
            )
            # Not JSON, with raw terminal escapes: the DLQ keeps the bytes, `list` must escape them.
            await io.send(b"\x1b[2J\x1b]0;pwned\x07 not a request")
            good = (await io.send_texts(["a perfectly fine request"]))[0]
            # An over-size message is not parsed, so its id is unknown: it gets no error result.
            all_ids = [*state.too_long, *state.unknown_task, good]
            results = await io.wait_for(all_ids, timeout_s=60)
            await io.wait_for_dead_letters(7)
            assert results[good].get("vector"), results[good]
            for request_id in state.too_long:
                assert results[request_id]["error"]["code"] == "text_too_long"
            for request_id in state.unknown_task:
                assert results[request_id]["error"]["code"] == "unknown_task"
            codes = sorted(h["dlq-error-code"].decode() for _, h in io.dead_letters)
            assert codes == [
                "invalid_encoding",
                "message_too_large",
                *["text_too_long"] * 3,
                *["unknown_task"] * 2,
            ]
            yield state
    finally:
        fleet.stop_all()
        await fleet.cleanup()


async def test_list_prints_dead_letters_safely(scenario: Scenario) -> None:
    listing = await run_dlq(scenario.fleet, "list")
    out = listing.stdout
    assert out.count("text_too_long") == 3 and out.count("unknown_task") == 2, out
    assert "message_too_large" in out
    assert "\x1b" not in out and "\x07" not in out, out  # escaped, not interpreted
    assert '"\\x1b[2J\\x1b]0;pwned\\x07 not a request"' in out, out
    assert f"from {scenario.fleet.requests_topic}/" in out
    assert "7 dead letter(s) read, 7 matched, 7 shown" in out

    only = await run_dlq(scenario.fleet, "list", "--reason", "unknown_task", "--limit", "1")
    assert only.stdout.count("unknown_task") == 1 and "text_too_long" not in only.stdout
    assert "2 matched, 1 shown (--limit 1)" in only.stdout

    as_json = await run_dlq(scenario.fleet, "list", "--json", "--reason", "text_too_long")
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {r["key"] for r in rows} == {f"key-{i}" for i in scenario.too_long}
    assert all(r["source_topic"] == scenario.fleet.requests_topic and r["incomplete"] is None for r in rows)

    later = await run_dlq(scenario.fleet, "list", "--from-offset", "5")
    assert "2 dead letter(s) read" in later.stdout


async def test_unknown_code_and_missing_topic_say_what_to_do(scenario: Scenario) -> None:
    bad_code = await asyncio.to_thread(dlq, scenario.fleet, "list", "--reason", "no_such_code")
    assert bad_code.returncode == 2 and "known:" in bad_code.stderr and "text_too_long" in bad_code.stderr
    missing = await asyncio.to_thread(
        subprocess.run,
        [EMBEDFLEET, "dlq", "list"],
        env=scenario.fleet.env({"EMBEDFLEET_DLQ_TOPIC": "no.such.topic"}),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "EMBEDFLEET_DLQ_TOPIC" in missing.stderr, missing.stderr


async def test_dry_run_sends_nothing(scenario: Scenario) -> None:
    fleet = scenario.fleet
    before = len(await read_topic(fleet.bootstrap, fleet.requests_topic))
    dry = await run_dlq(
        fleet, "replay", "--reason", "text_too_long", "--reason", "message_too_large", "--dry-run"
    )
    assert "matched 4, would replay 3, skipped 1 (dry run: nothing sent)" in dry.stdout, dry.stdout
    assert "value was truncated" in dry.stdout
    await asyncio.sleep(1.0)
    assert len(await read_topic(fleet.bootstrap, fleet.requests_topic)) == before
    assert len(scenario.io.dead_letters) == 7


async def test_replay_after_the_fix_computes_only_the_chosen_code(scenario: Scenario) -> None:
    fleet, io = scenario.fleet, scenario.io
    fleet.stop_all()
    worker = fleet.start_worker(env={"EMBEDFLEET_MAX_TEXT_BYTES": str(64 * 1024)})
    await fleet.wait_ready([worker])

    replay = await run_dlq(fleet, "replay", "--reason", "text_too_long", "--reason", "message_too_large")
    assert "matched 4, replayed 3, skipped 1" in replay.stdout, replay.stdout
    assert re.search(r"skipped 0:\d+ \(message_too_large\): value was truncated", replay.stdout)

    # Every text_too_long request now gets a vector; the others were not sent again.
    deadline = asyncio.get_running_loop().time() + 60
    while not all(len(io.results.get(i, [])) >= 2 for i in scenario.too_long):
        assert asyncio.get_running_loop().time() < deadline, {i: io.results.get(i) for i in scenario.too_long}
        await asyncio.sleep(0.1)
    for request_id in scenario.too_long:
        latest = io.results[request_id][-1]
        assert "error" not in latest and len(latest["vector"]) == 384, latest
    await asyncio.sleep(1.0)
    for request_id in scenario.unknown_task:
        assert len(io.results[request_id]) == 1, io.results[request_id]
    assert not any(i in io.results for i in scenario.too_large)
    assert len(io.dead_letters) == 7

    # The replayed records are the originals: same key, value and headers, no dlq-* header.
    records = await read_topic(fleet.bootstrap, fleet.requests_topic)
    for request_id, value in scenario.too_long.items():
        copies = [r for r in records if r.value == value]
        assert len(copies) == 2, request_id
        for record in copies:
            assert record.key == f"key-{request_id}".encode()
            assert list(record.headers) == scenario.headers_of(request_id)
