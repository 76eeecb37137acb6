"""The fleet end to end on the real stack: two worker processes, real Kafka topics, real Redis."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pytest

from schemas import content_hash, decode_vector_b64
from tests.fleet import Fleet, FleetIO, request, start_fleet
from tests.helpers import read_jsonl_texts
from worker.engine.bundle import load_bundle, serving_fingerprint
from worker.engine.recommend import MAX_BATCH_DRIFT

REFERENCE = "reference/all-MiniLM-L6-v2"
STACK_SCRIPT = Path(__file__).resolve().parents[2] / "deploy/local/stack.py"


def model_fingerprint(model_dir: Path, variant: str) -> str:
    return serving_fingerprint(load_bundle(model_dir).manifest, variant)


async def check_a_thousand_texts(
    fleet: Fleet,
    shared_dir: Path,
    *,
    variant: str,
    per_text_floor: float,
    mean_floor: float,
    batch_drift: float = 0.0,
) -> None:
    """1000 texts in -> exactly one result per id, right key, vectors close to the reference;
    the same texts again -> all served from the cache."""
    reference_texts = read_jsonl_texts(shared_dir / REFERENCE / "texts.jsonl")
    reference_vectors = np.load(shared_dir / REFERENCE / "vectors.npy")
    # Unique per run, so "computed the first time" holds even if Redis kept an older run's entries.
    salt = uuid.uuid4().hex[:8]
    corpus = [f"{t} [{salt}]" for t in read_jsonl_texts(shared_dir / "corpus/queries.jsonl", limit=583)]
    texts = reference_texts + corpus
    assert len(texts) == 1000
    fingerprint = model_fingerprint(fleet.model_dir, variant)

    async with FleetIO(fleet) as io:
        ids = await io.send_texts(texts)
        results = await io.wait_for(ids)
        await asyncio.sleep(1.0)  # a duplicate result would arrive within this
        assert all(len(io.results[i]) == 1 for i in ids), "exactly one result per id"
        cosines = []
        for index, (request_id, text) in enumerate(zip(ids, texts, strict=True)):
            result = results[request_id]
            assert "error" not in result, result
            expected_key = content_hash(text, model_fingerprint=fingerprint, task=None, dimensions=None)
            assert result["key"] == expected_key
            assert io.result_keys[request_id][0] == expected_key.encode()
            assert result["dim"] == 384 and len(result["vector"]) == 384
            if index < len(reference_texts):
                cosine = float(np.dot(result["vector"], reference_vectors[index]))
                assert cosine >= per_text_floor, (text[:80], cosine)
                cosines.append(cosine)
        assert float(np.mean(cosines)) >= mean_floor
        computed_once = [r for r in results.values() if not r.get("cached")]
        assert len(computed_once) >= 900  # the reference set has a few duplicate texts

        again = await io.send_texts(texts)
        second = await io.wait_for(again)
        assert all(r.get("cached") is True for r in second.values())
        for first_id, second_id in zip(ids, again, strict=True):
            if batch_drift:  # the cached copy may come from another batch of a repeated text
                cached, first = np.array(second[second_id]["vector"]), np.array(results[first_id]["vector"])
                assert float(cached @ first) >= 1.0 - batch_drift, (first_id, float(cached @ first))
            else:
                np.testing.assert_allclose(
                    second[second_id]["vector"], results[first_id]["vector"], atol=1e-6
                )


async def check_a_variant_fleet(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    shared_dir: Path,
    logs: Path,
    *,
    variant: str,
    serving_variant: str,
    per_text_floor: float,
    mean_floor: float,
    batch_drift: float = 0.0,
) -> None:
    """Two workers serving EMBEDFLEET_VARIANT=``variant``: check_a_thousand_texts."""
    variant_fleet = await start_fleet(
        kafka_bootstrap, redis_url, model_dir, logs, workers=2, EMBEDFLEET_VARIANT=variant
    )
    try:
        await check_a_thousand_texts(
            variant_fleet,
            shared_dir,
            variant=serving_variant,
            per_text_floor=per_text_floor,
            mean_floor=mean_floor,
            batch_drift=batch_drift,
        )
    finally:
        variant_fleet.stop_all()
        await variant_fleet.cleanup()


async def test_a_thousand_texts_fp32_workers_match_the_reference(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    shared_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Workers serving the FP32 variant reproduce sentence-transformers on every reference text."""
    await check_a_variant_fleet(
        kafka_bootstrap,
        redis_url,
        model_dir,
        shared_dir,
        tmp_path_factory.mktemp("fp32"),
        variant="fp32",
        serving_variant="fp32",
        per_text_floor=0.99,
        mean_floor=0.9999,
    )


async def test_a_thousand_texts_openvino_workers(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    shared_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Workers serving the FP32 graph through OpenVINO (BF16 where the CPU has it) answer under
    its own serving fingerprint, close to the reference, and their cached copies agree with the
    first answers within the fleet's batch-drift floor."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from worker.engine.cpu import read_cpu
    from worker.engine.openvino_backend import openvino_precision

    await check_a_variant_fleet(
        kafka_bootstrap,
        redis_url,
        model_dir,
        shared_dir,
        tmp_path_factory.mktemp("openvino"),
        variant="openvino",
        serving_variant=f"openvino-{openvino_precision(read_cpu())}",
        per_text_floor=0.999,
        mean_floor=0.9999,
        # BF16 is batch-invariant to the fleet's floor (1 - cosine <= 1e-5), not bit for bit: a
        # text repeated in the reference set, computed in two batches, has two close copies.
        batch_drift=MAX_BATCH_DRIFT,
    )


async def test_a_thousand_texts_int8_workers(fleet: Fleet, shared_dir: Path) -> None:
    """The default INT8 workers: every reference text >= 0.99 (per-row INT8, see
    worker/engine/quantize.py), and batch-invariant, so the cached copy equals the first answer."""
    await check_a_thousand_texts(fleet, shared_dir, variant="int8", per_text_floor=0.99, mean_floor=0.995)


async def test_duplicates_in_one_batch_are_computed_once(fleet: Fleet) -> None:
    text = f"the same sentence, many times {uuid.uuid4().hex}"
    computed_before = fleet.metric("embedfleet_computed_texts_total")
    duplicates_before = fleet.metric("embedfleet_batch_duplicates_total")
    async with FleetIO(fleet) as io:
        ids = []
        for _ in range(40):  # one producer batch: they arrive in one fetch, one micro-batch
            request_id, value = request(text)
            ids.append(request_id)
            await io.send(value, key=b"same-partition")
        await io.producer.flush()
        results = await io.wait_for(ids)
    assert len({json.dumps(r["vector"]) for r in results.values()}) == 1
    assert fleet.metric("embedfleet_computed_texts_total") - computed_before == 1
    assert fleet.metric("embedfleet_batch_duplicates_total") - duplicates_before >= 39


async def test_two_workers_share_the_partitions(fleet: Fleet) -> None:
    owned = []
    for worker in fleet.workers:
        _, body = await asyncio.to_thread(worker.http, "/readyz")
        owned.append({int(p) for p in json.loads(body)["partitions"].split(",") if p})
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(range(6))
    before = [w.metric("embedfleet_requests_total") for w in fleet.workers]
    async with FleetIO(fleet) as io:
        ids = []
        for i in range(300):
            request_id, value = request(f"spread over partitions {i} {uuid.uuid4().hex}")
            ids.append(request_id)
            await io.send(value, key=str(i).encode())
        await io.producer.flush()
        await io.wait_for(ids)
    after = [w.metric("embedfleet_requests_total") for w in fleet.workers]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    for worker in fleet.workers:  # lag is reported per partition each worker read from
        _, text = await asyncio.to_thread(worker.http, "/metrics")
        # Labels come sorted by name, the constant `model` label among them: look for the series
        # with a partition label wherever it stands.
        assert re.search(r'^embedfleet_consumer_lag\{[^}]*partition="', text, re.MULTILINE), text


BAD_INPUTS: list[tuple[str, bytes, list[tuple[str, bytes]], str, str | None]] = [
    ("undecodable bytes", b"\xff\xfe\x00garbage", [], "invalid_encoding", None),
    ("invalid json", b'{"id": "bad-json", "text": "unterminated', [], "invalid_encoding", None),
    ("wrong type", b'{"id": "bad-type", "text": 42}', [], "invalid_request", "bad-type"),
    ("missing text", b'{"id": "bad-missing"}', [], "invalid_request", "bad-missing"),
    ("empty text", b'{"id": "bad-empty", "text": "   "}', [], "empty_text", "bad-empty"),
    (
        "oversize text",
        json.dumps({"id": "bad-long", "text": "x" * (70 * 1024)}).encode(),
        [],
        "text_too_long",
        "bad-long",
    ),
    (
        "unknown task",
        b'{"id": "bad-task", "text": "hi", "task": "summarise"}',
        [],
        "unknown_task",
        "bad-task",
    ),
    (
        "unsupported dimensions",
        b'{"id": "bad-dims", "text": "hi", "dimensions": 128}',
        [],
        "unsupported_dimensions",
        "bad-dims",
    ),
    (
        "unknown encoding_format",
        b'{"id": "bad-fmt", "text": "hi", "encoding_format": "int8"}',
        [],
        "unsupported_encoding_format",
        "bad-fmt",
    ),
    (
        "invalid msgpack",
        b"\xc1\xc1\xc1",
        [("content-type", b"application/msgpack")],
        "invalid_encoding",
        None,
    ),
    (
        "unknown content-type",
        b'{"id": "bad-ct", "text": "hi"}',
        [("content-type", b"text/csv")],
        "unsupported_content_type",
        None,
    ),
    (
        "reply_to not allowed",
        b'{"id": "bad-reply", "text": "hi", "reply_to": "embed.requests"}',
        [],
        "reply_to_not_allowed",
        "bad-reply",
    ),
]


@pytest.mark.parametrize(
    ("name", "value", "headers", "code", "request_id"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
async def test_bad_input_goes_to_the_dlq_and_the_next_message_is_answered(
    fleet: Fleet, name: str, value: bytes, headers: list[tuple[str, bytes]], code: str, request_id: str | None
) -> None:
    async with FleetIO(fleet) as io:
        dead_before = len(io.dead_letters)
        await io.send(value, key=b"k", headers=headers)
        good_id, good_value = request(f"a good request right after {name}")
        await io.send(good_value, key=b"k")  # same key: same partition, right behind the bad one
        await io.producer.flush()
        results = await io.wait_for([good_id])
        assert "vector" in results[good_id]
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            mine = [h for v, h in io.dead_letters[dead_before:] if v == value[: len(v or b"")]]
            if mine or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert mine, f"no dead letter for {name}"
        dlq_headers = mine[-1]
        assert dlq_headers["dlq-error-code"].decode() == code
        assert dlq_headers["dlq-reason"]
        assert dlq_headers["dlq-source-topic"].decode() == fleet.requests_topic
        assert int(dlq_headers["dlq-source-offset"]) >= 0
        if request_id is not None:
            errors = await io.wait_for([request_id], timeout_s=30)
            assert errors[request_id]["error"]["code"] == code
            assert "vector" not in errors[request_id]


async def test_msgpack_base64_and_metadata(fleet: Fleet) -> None:
    text = f"msgpack request {uuid.uuid4().hex}"
    value = msgspec.msgpack.encode(
        {"id": "mp-1", "text": text, "encoding_format": "base64", "metadata": {"tenant": "acme"}}
    )
    async with FleetIO(fleet) as io:
        await io.send(value, headers=[("content-type", b"application/msgpack")])
        await io.producer.flush()
        deadline = asyncio.get_running_loop().time() + 60
        while "mp-1" not in io.results:
            assert asyncio.get_running_loop().time() < deadline, "no msgpack result"
            await asyncio.sleep(0.05)
    result = io.results["mp-1"][-1]
    assert result["_content_type"] == "application/msgpack"  # answered in the request's encoding
    assert "vector" not in result
    vector = decode_vector_b64(result["vector_b64"])
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    assert result["metadata"] == {"tenant": "acme"}


async def test_kcat_speaks_the_contract(fleet: Fleet) -> None:
    """An independent client (kcat, librdkafka) produces a request and reads the result."""
    request_id = f"kcat-{uuid.uuid4().hex[:8]}"
    line = json.dumps({"id": request_id, "text": "kcat says hello", "metadata": {"via": "kcat"}})
    produced = await asyncio.to_thread(
        subprocess.run,
        [
            "kcat",
            "-P",
            "-b",
            fleet.bootstrap,
            "-t",
            fleet.requests_topic,
            "-H",
            "content-type=application/json",
        ],
        input=line.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert produced.returncode == 0, produced.stderr
    deadline = asyncio.get_running_loop().time() + 60
    found = None
    while found is None and asyncio.get_running_loop().time() < deadline:
        consumed = await asyncio.to_thread(
            subprocess.run,
            [
                "kcat",
                "-C",
                "-b",
                fleet.bootstrap,
                "-t",
                fleet.results_topic,
                "-o",
                "beginning",
                "-e",
                "-q",
                "-f",
                "%k\t%s\n",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        for row in consumed.stdout.decode("utf-8", "replace").splitlines():
            key, _, value = row.partition("\t")
            if request_id in value:
                found = (key, json.loads(value))
        await asyncio.sleep(0.5)
    assert found is not None, "kcat did not see the result"
    key, result = found
    assert result["key"] == key and len(key) == 64
    assert result["metadata"] == {"via": "kcat"}
    assert len(result["vector"]) == 384


async def test_redis_down_results_keep_coming_and_the_cache_returns(fleet: Fleet) -> None:
    stack = [str(STACK_SCRIPT)]
    python = sys.executable
    async with FleetIO(fleet) as io:
        warm = await io.send_texts([f"cached before the outage {i}" for i in range(20)])
        await io.wait_for(warm)
        down = await asyncio.to_thread(
            subprocess.run, [python, *stack, "down", "--service", "redis"], capture_output=True, check=False
        )
        assert down.returncode == 0, down.stderr
        try:
            during = await io.send_texts([f"during the outage {uuid.uuid4().hex} {i}" for i in range(50)])
            results = await io.wait_for(during, timeout_s=60)
            assert all("vector" in r and not r.get("cached") for r in results.values())
            assert fleet.metric("embedfleet_cache_errors_total") > 0
        finally:
            up = await asyncio.to_thread(
                subprocess.run, [python, *stack, "up", "--service", "redis"], capture_output=True, check=False
            )
            assert up.returncode == 0, up.stderr
        # The warm entries survived (Redis saves on shutdown); after the skip interval the cache is used.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            again = await io.send_texts([f"cached before the outage {i}" for i in range(20)])
            results = await io.wait_for(again)
            if all(r.get("cached") for r in results.values()):
                break
            assert asyncio.get_running_loop().time() < deadline, "the cache was not used again"
            await asyncio.sleep(1.0)


async def test_a_metrics_port_in_use_is_a_one_line_error(fleet: Fleet) -> None:
    taken = fleet.workers[0].metrics_port  # a running worker holds it
    worker = fleet.start_worker("--metrics-port", str(taken))
    code = await asyncio.to_thread(worker.process.wait, 60)
    fleet.workers.remove(worker)
    assert code == 2
    assert f"port {taken} on 127.0.0.1 is in use" in worker.log()
    assert "EMBEDFLEET_METRICS_PORT" in worker.log() and "Traceback" not in worker.log()
