"""More than 30 kinds of malformed or hostile messages, interleaved with good ones.

Every bad message must land on the dead-letter topic with a reason, every good one must be
answered, the workers must keep running, and their memory must stay bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaProducer

from tests.fleet import FleetIO, request, start_fleet

BIG = 10 * 1024 * 1024 - 64 * 1024  # just under the local broker's 10 MiB message limit
Hostile = tuple[str, bytes | None, list[tuple[str, bytes]], bytes | None]


def hostile_messages() -> list[Hostile]:
    """(name, value, headers, key)"""
    ok = {"id": "x", "text": "fine"}

    def js(value: object) -> bytes:
        return json.dumps(value).encode()

    return [
        ("truncated json", b'{"id": "t1", "text": "cut he', [], None),
        ("deep nesting", b"[" * 200_000 + b"]" * 200_000, [], None),
        ("deep object nesting", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, [], None),
        ("huge array as text", js({"id": "h1", "text": list(range(200_000))}), [], None),
        ("10 MB value", js({"id": "big1", "text": "a" * BIG}), [], None),
        ("raw NUL bytes", b'{"id": "n1",\x00 "text": "x"}', [], None),
        ("invalid utf-8", b'{"id": "u1", "text": "\xc3\x28"}', [], None),
        ("lone surrogate", b'{"id": "s1", "text": "\\ud800"}', [], None),
        ("id is a number", js({"id": 123, "text": "x"}), [], None),
        ("text is a number", js({"id": "n2", "text": 42}), [], None),
        ("text is null", js({"id": "n3", "text": None}), [], None),
        ("negative dimensions", js({**ok, "id": "d1", "dimensions": -5}), [], None),
        ("enormous dimensions", b'{"id": "d2", "text": "x", "dimensions": 1e30}', [], None),
        ("dimensions as string", js({**ok, "id": "d3", "dimensions": "384"}), [], None),
        ("unknown content-type", js({**ok, "id": "c1"}), [("content-type", b"application/xml")], None),
        ("reply_to internal topic", js({**ok, "id": "r1", "reply_to": "__consumer_offsets"}), [], None),
        ("reply_to requests topic", js({**ok, "id": "r2", "reply_to": "embed.requests"}), [], None),
        ("absurd key", js({**ok, "id": "k1"}), [], b"k" * (1024 * 1024)),
        ("absurd headers", js({**ok, "id": "hd1"}), [(f"h{i}", b"v" * 1024) for i in range(200)], None),
        ("empty value", b"", [], None),
        ("tombstone", None, [], b"tomb"),
        ("top-level array", b'[{"id": "a1", "text": "x"}]', [], None),
        ("top-level string", b'"just a string"', [], None),
        ("empty id", js({"id": "", "text": "x"}), [], None),
        ("id too long", js({"id": "i" * 10_000, "text": "x"}), [], None),
        ("id with control characters", js({"id": "bad\nid\x07", "text": "x"}), [], None),
        (
            "metadata too many entries",
            js({**ok, "id": "m1", "metadata": {str(i): "v" for i in range(1000)}}),
            [],
            None,
        ),
        ("metadata value not a string", js({**ok, "id": "m2", "metadata": {"k": {"nested": 1}}}), [], None),
        ("whitespace text", js({"id": "w1", "text": " \t\n "}), [], None),
        ("text too long", js({"id": "l1", "text": "y" * (70 * 1024)}), [], None),
        ("unknown task", js({**ok, "id": "t2", "task": "rm -rf /"}), [], None),
        ("unknown encoding_format", js({**ok, "id": "e1", "encoding_format": "int8"}), [], None),
        ("msgpack garbage", b"\xc1\xc1\xc1\xc1", [("content-type", b"application/msgpack")], None),
        (
            "msgpack wrong types",
            msgspec.msgpack.encode({"id": 5, "text": b"\x00\x01"}),
            [("content-type", b"application/msgpack")],
            None,
        ),
        ("number too large", b'{"id": "big2", "text": "x", "dimensions": 1' + b"0" * 400 + b"}", [], None),
        ("unknown schema version", js({**ok, "id": "v1"}), [("schema", b"99")], None),
        ("BOM before json", b"\xef\xbb\xbf" + js({**ok, "id": "bom1"}), [], None),
    ]


async def test_hostile_messages_go_to_the_dlq_and_good_ones_are_answered(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    fleet = await start_fleet(
        kafka_bootstrap,
        redis_url,
        model_dir,
        tmp_path,
        workers=2,
        EMBEDFLEET_MAX_MESSAGE_BYTES=str(12 * 1024 * 1024),
    )
    hostile = hostile_messages()
    assert len(hostile) >= 30
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, max_request_size=12 * 1024 * 1024, acks="all"
    )
    await producer.start()
    try:
        async with FleetIO(fleet) as io:
            bad_offsets: dict[int, str] = {}
            good_ids: list[str] = []
            for round_ in range(2):  # twice, so every kind also arrives mid-stream
                for name, value, headers, key in hostile:
                    good_id, good_value = request(f"good neighbour of {name} {round_} {uuid.uuid4().hex}")
                    good_ids.append(good_id)
                    await producer.send_and_wait(fleet.requests_topic, good_value, partition=0)
                    sent = await producer.send_and_wait(
                        fleet.requests_topic, value, key=key, headers=headers, partition=0
                    )
                    bad_offsets[sent.offset] = name
            results = await io.wait_for(good_ids, timeout_s=120)
            assert all("vector" in r for r in results.values())

            deadline = time.monotonic() + 60
            while True:
                seen = {int(dlq["dlq-source-offset"]): dlq for _, dlq in io.dead_letters}
                missing = {o: n for o, n in bad_offsets.items() if o not in seen}
                if not missing or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert not missing, f"no dead letter for {sorted(set(missing.values()))}"
            for offset, dlq_headers in seen.items():
                assert offset in bad_offsets, "a good message went to the DLQ"
                assert dlq_headers["dlq-error-code"] and dlq_headers["dlq-reason"], bad_offsets[offset]
        assert all(w.alive for w in fleet.workers), "a worker died on hostile input"
        # Bounded memory: the 10 MB values pass through, but nothing accumulates.
        assert fleet.peak_rss_mb() < 700
    finally:
        await producer.stop()
        fleet.stop_all()
        await fleet.cleanup()
