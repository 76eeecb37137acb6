"""The HTTP gateway against the real stack: a live `embedfleet gateway` in front of a live worker.

The official ``openai`` SDK is the client for /v1/embeddings; raw HTTP (httpx, which the SDK
brings) checks the seed's /embed, the error shapes and the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from producer.config import ClientConfig
from producer.kafka import reply_consumer
from producer.replies import Expected, ReplyRouter
from schemas import EmbedResult, encode_result, result_headers
from tests.fleet import Fleet, GatewayProcess, running_fleet
from worker.engine import quality
from worker.engine.embedder import Embedder

pytestmark = pytest.mark.stack

MODEL = "all-MiniLM-L6-v2"
API_KEY = "sk-test-" + uuid.uuid4().hex
MIN_REFERENCE_COSINE = 0.99


@pytest.fixture(scope="module")
async def fleet(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    log_dir = tmp_path_factory.mktemp("gateway-logs")
    async with running_fleet(kafka_bootstrap, redis_url, model_dir, log_dir, workers=1) as running:
        yield running


@pytest.fixture(scope="module")
async def gateway(fleet: Fleet) -> GatewayProcess:
    started = fleet.start_gateway(env={"EMBEDFLEET_GATEWAY_API_KEYS": f"sk-other,{API_KEY}"})
    await started.wait_ready()
    return started


@pytest.fixture(scope="module")
def sdk(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> quality.Reference:
    return quality.read_reference(shared_dir / "reference" / MODEL)


@pytest.fixture(scope="module")
def int8(model_dir: Path) -> Embedder:
    """The fleet's own model in this process: what each text's vector must be (no cross-talk)."""
    return Embedder.from_bundle(model_dir, variant="int8", intra_op_threads=1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    result: np.ndarray = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result


def post(
    gateway: GatewayProcess, path: str, body: Any, *, key: str | None = API_KEY, **kw: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        gateway.url + path,
        content=content,
        headers={"Content-Type": "application/json", **headers},
        timeout=60,
        **kw,
    )


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error  # type: ignore[no-any-return]


async def end_offsets(fleet: Fleet) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=fleet.bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(fleet.requests_topic, p) for p in range(fleet.partitions)]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


# --- the openai SDK -------------------------------------------------------------------------------


def test_one_string_matches_the_reference(sdk: openai.OpenAI, reference: quality.Reference) -> None:
    response = sdk.embeddings.create(model=MODEL, input=reference.texts[0], encoding_format="float")
    assert response.model == MODEL and response.object == "list"
    assert len(response.data) == 1 and response.data[0].index == 0
    vector = np.asarray(response.data[0].embedding)
    assert vector.shape == (384,)
    assert cosines(vector[None], reference.vectors[:1])[0] >= MIN_REFERENCE_COSINE
    assert response.usage.prompt_tokens == response.usage.total_tokens > 2


def test_a_hundred_strings_match_the_reference_in_order(
    sdk: openai.OpenAI, reference: quality.Reference, int8: Embedder
) -> None:
    texts = reference.texts[1:101]
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    response = sdk.embeddings.create(model=MODEL, input=texts)
    assert [item.index for item in response.data] == list(range(100))
    vectors = np.asarray([item.embedding for item in response.data])
    assert vectors.shape == (100, 384)
    assert cosines(vectors, reference.vectors[1:101]).min() >= MIN_REFERENCE_COSINE
    as_floats = sdk.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert np.array_equal(vectors, np.asarray([item.embedding for item in as_floats.data], dtype=np.float32))
    # usage counts the tokens the model read (special tokens included), as OpenAI counts them.
    expected_tokens = sum(len(t.ids) for t in int8.tokenize(texts))
    assert response.usage.prompt_tokens == expected_tokens == as_floats.usage.prompt_tokens


def test_sdk_errors_are_the_right_exception_types(sdk: openai.OpenAI, gateway: GatewayProcess) -> None:
    with pytest.raises(openai.BadRequestError) as bad_width:
        sdk.embeddings.create(model=MODEL, input="hello", dimensions=128)
    assert bad_width.value.param == "dimensions" and "384" in bad_width.value.message
    same_width = sdk.embeddings.create(model=MODEL, input="hello", dimensions=384, encoding_format="float")
    assert len(same_width.data[0].embedding) == 384
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.embeddings.create(model="text-embedding-3-small", input="hello")
    assert unknown.value.code == "model_not_found"
    wrong_key = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.embeddings.create(model=MODEL, input="hello")
    assert [model.id for model in sdk.models.list()] == [MODEL]
    assert "sk-wrong" not in gateway.log() and API_KEY not in gateway.log()


# --- the seed's /embed, concurrency, the cache -------------------------------------------------------


def test_the_seed_embed_shape(gateway: GatewayProcess, reference: quality.Reference) -> None:
    response = post(gateway, "/embed", {"texts": reference.texts[101:104]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"embeddings", "model", "truncated", "tokens"} and body["model"] == MODEL
    assert body["truncated"] == [False, False, False] and all(0 < n <= 256 for n in body["tokens"])
    assert cosines(np.asarray(body["embeddings"]), reference.vectors[101:104]).min() >= MIN_REFERENCE_COSINE


async def test_fifty_concurrent_requests_each_get_their_own_vectors(
    gateway: GatewayProcess, int8: Embedder
) -> None:
    run = uuid.uuid4().hex[:8]
    requests = [[f"concurrent {run} request {r} text {i}" for i in range(32)] for r in range(50)]
    async with httpx.AsyncClient(
        base_url=gateway.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as http:
        responses = await asyncio.gather(
            *(
                http.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "float"})
                for texts in requests
            )
        )
    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [item["index"] for item in data] == list(range(32))
        got = np.asarray([item["embedding"] for item in data])
        # Each text's own vector; another text's (cross-talk) would score far lower.
        assert cosines(got, int8.embed(texts).vectors).min() >= 0.999


async def test_a_repeated_request_is_served_from_the_cache_alone(
    gateway: GatewayProcess, fleet: Fleet
) -> None:
    texts = [f"cache me {uuid.uuid4().hex} number {i}" for i in range(20)]
    first = post(gateway, "/v1/embeddings", {"model": MODEL, "input": texts})
    assert first.status_code == 200, first.text
    produced_before = await end_offsets(fleet)
    fleet_before = gateway.metric("embedfleet_gateway_texts_total", {"outcome": "fleet"})
    cached_before = gateway.metric("embedfleet_gateway_texts_total", {"outcome": "cached"})
    second = post(gateway, "/v1/embeddings", {"model": MODEL, "input": texts})
    assert second.status_code == 200, second.text
    assert second.json()["data"] == first.json()["data"]
    assert second.json()["usage"] == first.json()["usage"]
    assert await end_offsets(fleet) == produced_before  # no job produced
    assert gateway.metric("embedfleet_gateway_texts_total", {"outcome": "fleet"}) == fleet_before
    assert gateway.metric("embedfleet_gateway_texts_total", {"outcome": "cached"}) == cached_before + 20


# --- errors and limits ------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors(gateway: GatewayProcess) -> None:
    malformed = post(gateway, "/v1/embeddings", b'{"model": "all-MiniLM-L6-v2", "input": ["a",')
    assert_openai_error(malformed, 400, "invalid_json")
    wrong_type = post(gateway, "/v1/embeddings", {"model": MODEL, "input": ["fine", 7]})
    assert assert_openai_error(wrong_type, 400)["param"] == "input"
    wrong_field = post(gateway, "/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "int8"})
    assert assert_openai_error(wrong_field, 400)["param"] == "encoding_format"
    no_model = post(gateway, "/v1/embeddings", {"input": "x"})
    assert_openai_error(no_model, 400)
    assert_openai_error(post(gateway, "/v1/embeddings", {"model": MODEL, "input": []}), 400)
    empty_text = post(gateway, "/v1/embeddings", {"model": MODEL, "input": ["ok", "   "]})
    error = assert_openai_error(empty_text, 400, "empty_text")
    assert "input[1]" in error["message"]
    too_many = post(gateway, "/v1/embeddings", {"model": MODEL, "input": ["a"] * 2049})
    assert "2048" in assert_openai_error(too_many, 400, "too_many_inputs")["message"]
    tokens = post(gateway, "/v1/embeddings", {"model": MODEL, "input": [[101, 7592, 102]]})
    assert "not supported" in assert_openai_error(tokens, 400, "unsupported_input")["message"]
    assert_openai_error(post(gateway, "/v1/embeddings", {"model": MODEL, "input": [1, 2, 3]}), 400)
    assert_openai_error(post(gateway, "/embed", {"texts": "not a list"}), 400)
    assert_openai_error(post(gateway, "/embed", {"texts": []}), 400)
    too_large = post(gateway, "/v1/embeddings", b'{"model": "x", "input": "' + b"a" * (9 << 20) + b'"}')
    assert_openai_error(too_large, 413, "request_too_large")
    assert_openai_error(post(gateway, "/v1/embeddings", {"model": MODEL, "input": "x"}, key=None), 401)
    assert_openai_error(httpx.get(gateway.url + "/v1/nothing-here"), 404)
    assert gateway.alive


def test_health_readiness_metrics_and_no_cors_by_default(gateway: GatewayProcess) -> None:
    assert gateway.http("/healthz")[0] == 200
    assert gateway.http("/readyz") == (200, '{"status":"ready"}')
    assert gateway.http("/metrics")[0] == 200
    answered = {"route": "/v1/embeddings", "status": "200", "model": MODEL}  # in any label order
    assert gateway.metric("embedfleet_gateway_requests_total", answered) >= 1
    preflight = httpx.options(
        gateway.url + "/v1/embeddings",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


async def test_no_worker_means_504_within_the_deadline(fleet: Fleet, topic_factory: Any) -> None:
    """A requests topic nobody consumes (the contract is published: the fleet is just gone)."""
    idle_topic = await topic_factory(partitions=1)
    lonely = fleet.start_gateway(
        env={"EMBEDFLEET_GATEWAY_DEADLINE_S": "2", "EMBEDFLEET_REQUESTS_TOPIC": idle_topic}
    )
    try:
        await lonely.wait_ready()
        started = time.monotonic()
        response = await asyncio.to_thread(
            post,
            lonely,
            "/v1/embeddings",
            {"model": MODEL, "input": [f"nobody home {uuid.uuid4()}"]},
            key=None,
        )
        elapsed = time.monotonic() - started
        assert_openai_error(response, 504, "timeout")
        assert 2.0 <= elapsed < 6.0, elapsed
    finally:
        lonely.stop()


async def test_too_many_outstanding_texts_is_429_with_retry_after(fleet: Fleet, topic_factory: Any) -> None:
    idle_topic = await topic_factory(partitions=1)
    small = fleet.start_gateway(
        env={
            "EMBEDFLEET_GATEWAY_MAX_OUTSTANDING": "3",
            "EMBEDFLEET_GATEWAY_DEADLINE_S": "3",
            "EMBEDFLEET_REQUESTS_TOPIC": idle_topic,
        }
    )
    try:
        await small.wait_ready()
        body = {"model": MODEL, "input": [f"wait {uuid.uuid4()} {i}" for i in range(3)]}
        waiting = asyncio.create_task(asyncio.to_thread(post, small, "/v1/embeddings", body, key=None))
        await asyncio.sleep(1.0)  # the first request's 3 texts are outstanding
        more = {"model": MODEL, "input": [f"more {uuid.uuid4()}"]}
        refused = await asyncio.to_thread(post, small, "/v1/embeddings", more, key=None)
        assert_openai_error(refused, 429, "rate_limit_exceeded")
        assert refused.headers["retry-after"] == "1"
        assert_openai_error(await waiting, 504)
    finally:
        small.stop()


async def test_a_killed_gateways_reply_topic_is_deleted_by_a_live_one(
    fleet: Fleet, gateway: GatewayProcess
) -> None:
    """Gateways with a 2 s lease: one killed, another deletes its topic; the module's gateway
    (60 s lease, heartbeats every 20 s) keeps its topic: leases are per topic."""
    prefix = f"{fleet.results_topic}.gw-"
    admin = AIOKafkaAdminClient(bootstrap_servers=fleet.bootstrap)
    await admin.start()

    async def gateway_topics() -> set[str]:
        return {t for t in await admin.list_topics() if t.startswith(prefix)}

    try:
        lease = {"EMBEDFLEET_GATEWAY_LEASE_S": "2"}
        existing = await gateway_topics()
        assert len(existing) == 1  # the module's gateway
        doomed = fleet.start_gateway(env=lease)
        await doomed.wait_ready()
        (doomed_topic,) = await gateway_topics() - existing
        doomed.stop(signal.SIGKILL)  # no clean stop: its topic stays behind
        await asyncio.sleep(3)
        assert doomed_topic in await gateway_topics()
        survivor = fleet.start_gateway(env=lease)
        await survivor.wait_ready()
        deadline = time.monotonic() + 30
        while doomed_topic in await gateway_topics():
            assert time.monotonic() < deadline, "the killed gateway's topic was left behind"
            await asyncio.sleep(0.5)
        await asyncio.sleep(5)  # more sweeps: nothing else goes
        remaining = await gateway_topics()
        assert existing < remaining and len(remaining) == 2
        assert survivor.metric("embedfleet_gateway_reaped_reply_topics_total") == 1
        assert gateway.http("/readyz")[0] == 200 and survivor.http("/readyz")[0] == 200
        survivor.stop()  # a clean stop deletes its own topic
        deadline = time.monotonic() + 10
        while await gateway_topics() != existing:
            assert time.monotonic() < deadline, await gateway_topics()
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def test_no_contract_means_503_and_not_ready(fleet: Fleet) -> None:
    """A gateway for a model no worker serves: nothing to hash texts with, so no fleet."""
    orphan = fleet.start_gateway(env={"EMBEDFLEET_MODEL_NAME": "model-nobody-serves"})
    try:
        deadline = time.monotonic() + 30
        while True:
            assert orphan.alive, orphan.log()[-2000:]
            with contextlib.suppress(OSError):
                if (await asyncio.to_thread(orphan.http, "/healthz"))[0] == 200:
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # connected to Kafka by now; the contract is what is missing
        status, body = orphan.http("/readyz")
        assert status == 503 and "model-nobody-serves" in body
        response = await asyncio.to_thread(
            post, orphan, "/v1/embeddings", {"model": "model-nobody-serves", "input": "x"}, key=None
        )
        error = assert_openai_error(response, 503, "service_unavailable")
        assert "embedfleet worker" in error["message"] and response.headers["retry-after"] == "2"
        assert orphan.alive
    finally:
        orphan.stop()


async def test_cors_only_for_the_configured_origins(fleet: Fleet) -> None:
    open_to = fleet.start_gateway(env={"EMBEDFLEET_GATEWAY_CORS_ORIGINS": "https://app.example"})
    try:
        await open_to.wait_ready()
        asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        async with httpx.AsyncClient(base_url=open_to.url) as http:
            allowed = await http.options("/v1/embeddings", headers={"Origin": "https://app.example", **asked})
            other = await http.options("/v1/embeddings", headers={"Origin": "https://evil.example", **asked})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
    finally:
        open_to.stop()


# --- input no gateway can decode, records no reader can unpack, clients that trickle --------------


def test_bodies_that_cannot_be_decoded_are_400_not_500(gateway: GatewayProcess) -> None:
    """Deep nesting (RecursionError in msgspec) and invalid UTF-8 inside a string
    (UnicodeDecodeError) were 500 server_error with a traceback in the log."""
    bodies = {
        "deep arrays": b'{"model": "all-MiniLM-L6-v2", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "deep objects": b'{"model": "all-MiniLM-L6-v2", "input": '
        + b'{"a": ' * 50_000
        + b"1"
        + b"}" * 50_000
        + b"}",
        "bad UTF-8": b'{"model": "all-MiniLM-L6-v2", "input": ["ok", "caf\xc3 \xff"]}',
    }
    before = gateway.log().count("Traceback")
    for what, body in bodies.items():
        for path in ("/v1/embeddings", "/embed"):
            response = post(gateway, path, body)
            error = assert_openai_error(response, 400)
            assert error["type"] == "invalid_request_error", (what, path, error)
            # invalid_value: refused before decoding, holding more JSON values than inputs need.
            assert error["code"] in ("invalid_json", "invalid_type", "invalid_value"), (what, path, error)
    assert gateway.log().count("Traceback") == before
    assert gateway.metric("embedfleet_gateway_requests_total", {"status": "500"}) == 0
    assert gateway.alive


def kcat_produce(bootstrap: str, topic: str, partition: int, value: bytes, headers: list[bytes]) -> None:
    """kcat writes header names as raw bytes; aiokafka (and Kafka's Java client) only UTF-8 ones."""
    args: list[str | bytes] = [shutil.which("kcat") or "kcat", "-P", "-b", bootstrap, "-t", topic]
    args += ["-p", str(partition)]
    for header in headers:
        args += ["-H", header]
    done = subprocess.run(args, input=value, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


async def gateway_topics(fleet: Fleet) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=fleet.bootstrap)
    await admin.start()
    try:
        return {t for t in await admin.list_topics() if t.startswith(f"{fleet.results_topic}.gw-")}
    finally:
        await admin.close()


async def test_an_unreadable_record_on_the_reply_topic_does_not_stop_the_gateway(fleet: Fleet) -> None:
    """A header name that is not UTF-8 made aiokafka raise inside getmany(): the reply reader
    stopped, every later request was a 500 and /readyz still said ready."""
    before = await gateway_topics(fleet)
    poisoned = fleet.start_gateway()
    try:
        await poisoned.wait_ready()
        (topic,) = await gateway_topics(fleet) - before
        first = await asyncio.to_thread(
            post, poisoned, "/v1/embeddings", {"model": MODEL, "input": [f"before {uuid.uuid4()}"]}, key=None
        )
        assert first.status_code == 200, first.text
        await asyncio.to_thread(kcat_produce, fleet.bootstrap, topic, 0, b"{}", [b"\xff\xfe=v"])
        producer = AIOKafkaProducer(bootstrap_servers=fleet.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"\x00 not a result", headers=[("x-what", b"\xff")])
        finally:
            await producer.stop()
        for round_ in range(3):
            texts = [f"after poison {round_} {uuid.uuid4()} {i}" for i in range(5)]
            response = await asyncio.to_thread(
                post, poisoned, "/v1/embeddings", {"model": MODEL, "input": texts}, key=None
            )
            assert response.status_code == 200, response.text
            assert len(response.json()["data"]) == 5
        assert poisoned.http("/readyz") == (200, '{"status":"ready"}')
        skipped = "embedfleet_gateway_reply_records_skipped_total"
        assert poisoned.metric(skipped, {"reason": "unreadable"}) == 1
        assert poisoned.metric(skipped, {"reason": "undecodable"}) == 1
        assert poisoned.metric("embedfleet_gateway_reply_reader_restarts_total") == 0
        assert f"skipped a record on the reply topic that cannot be read: TopicPartition(topic='{topic}'" in (
            poisoned.log()
        )
    finally:
        poisoned.stop()


async def test_the_reply_reader_skips_unreadable_records_on_every_partition(
    kafka_bootstrap: str, topic_factory: Any
) -> None:
    """The Python client's reader too (shared mode reads every partition): good results before,
    between and after unreadable records, first in a partition or not, all arrive; only the
    unreadable ones are lost. getmany() drains some partitions before it raises on another:
    the reader puts them back."""
    topic = await topic_factory(partitions=3)
    layout: list[tuple[int, str | None]] = [
        (0, "r0"),
        (0, "r1"),
        (1, "r2"),
        (1, None),
        (1, "r3"),
        (2, None),
        (2, "r4"),
        (2, None),
        (2, None),
        (2, "r5"),
        (0, "r6"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for partition, request_id in layout:
            if request_id is None:
                await asyncio.to_thread(
                    kcat_produce, kafka_bootstrap, topic, partition, b"x", [b"ok=1", b"\xc3\x28=v"]
                )
                continue
            result = EmbedResult.success(request_id=request_id, key="k", model="m", vector=[0.5, 1.5])
            await producer.send_and_wait(
                topic, encode_result(result), partition=partition, headers=result_headers()
            )
    finally:
        await producer.stop()
    config = ClientConfig.from_env({}, kafka_bootstrap=kafka_bootstrap, redis_url="")
    consumer = await reply_consumer(config, topic, {0, 1, 2}, from_end=False)
    positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
    router = ReplyRouter(consumer, positions)
    wanted = [request_id for _, request_id in layout if request_id is not None]
    futures = [router.expect(request_id, Expected(key="k", dim=2)) for request_id in wanted]
    router.start()
    try:
        done, _ = await asyncio.wait(futures, timeout=30)
        answered = sorted(f.result().id or "" for f in done if f.exception() is None)
        assert answered == sorted(wanted), (answered, router.problem)
        assert router.unreadable == 4 and router.restarts == 0 and router.problem is None
    finally:
        await router.stop()
        await consumer.stop()


async def _drip(port: int, head: bytes, *, interval_s: float, opened: float) -> tuple[float, bytes]:
    """Sends ``head`` then trickles header bytes one at a time until the server closes the
    connection; returns when it closed (seconds after ``opened``) and what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = bytearray()

    async def trickle() -> None:
        with contextlib.suppress(OSError):
            if head:
                writer.write(head)
            for _ in range(10_000):
                if interval_s <= 0:
                    return  # an idle connection: sends nothing
                await asyncio.sleep(interval_s)
                writer.write(b"a")
                await writer.drain()

    sender = asyncio.create_task(trickle())
    try:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                answer += chunk
        return time.monotonic() - opened, bytes(answer)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()


async def test_slow_clients_are_cut_off_at_the_read_timeout(fleet: Fleet) -> None:
    """200 connections that sent their headers one byte at a time were all still open after
    15 s (uvicorn times out only idle keep-alive connections). With a 2 s read timeout: trickled
    headers get a 408 and are closed, idle connections are closed, a body that trickles gets a 408,
    and a normal request succeeds meanwhile."""
    timeout_s, slack_s = 2.0, 3.0
    slow = fleet.start_gateway(env={"EMBEDFLEET_GATEWAY_READ_TIMEOUT_S": str(timeout_s)})
    try:
        await slow.wait_ready()
        port = slow.metrics_port
        opened = time.monotonic()
        trickled = [
            asyncio.create_task(
                _drip(
                    port,
                    b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                    interval_s=0.3,
                    opened=opened,
                )
            )
            for _ in range(150)
        ]
        idle = [asyncio.create_task(_drip(port, b"", interval_s=0, opened=opened)) for _ in range(30)]
        body = b'{"model": "all-MiniLM-L6-v2", "input": "' + b"x" * 100 + b'"}'
        slow_body = asyncio.create_task(
            _drip(
                port,
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body) + 1000, body),
                interval_s=0.3,
                opened=opened,
            )
        )
        await asyncio.sleep(0.5)
        # Meanwhile the gateway serves everyone else.
        response = await asyncio.to_thread(
            post, slow, "/v1/embeddings", {"model": MODEL, "input": [f"prompt {uuid.uuid4()}"]}, key=None
        )
        assert response.status_code == 200, response.text
        everyone = [*trickled, *idle, slow_body]
        _, pending = await asyncio.wait(everyone, timeout=timeout_s + slack_s)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} of {len(everyone)} slow connections still open"
        for task in trickled:
            closed_after, answer = task.result()
            assert timeout_s - 0.5 <= closed_after <= timeout_s + slack_s, closed_after
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        for task in idle:
            closed_after, answer = task.result()
            assert timeout_s - 0.5 <= closed_after <= timeout_s + slack_s and answer == b""
        closed_after, answer = slow_body.result()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "request_timeout" and "body" in error["message"]
        assert closed_after <= timeout_s + slack_s
        closed = "embedfleet_gateway_slow_connections_closed_total"
        assert slow.metric(closed, {"reason": "header_timeout"}) == len(trickled)
        assert slow.metric(closed, {"reason": "idle"}) == len(idle)
        assert slow.metric("embedfleet_gateway_rejected_total", {"reason": "slow_body"}) == 1
        # A keep-alive connection's next request is held to the same deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 5)
            assert first.startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            rest = asyncio.create_task(reader.read())  # to the end: the server closes
            writer.write(b"GET /healthz?pad=")
            while not rest.done() and time.monotonic() - started < timeout_s + slack_s:
                await asyncio.wait([rest], timeout=0.3)
                if not rest.done():
                    writer.write(b"a")
            assert (await asyncio.wait_for(rest, 2)).startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started <= timeout_s + slack_s
        finally:
            writer.close()
        # Headers may not grow without bound within the deadline either (httptools has no limit).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * (65 << 10) + b"\r\n")
            huge = await asyncio.wait_for(reader.read(), 5)
            assert huge.startswith(b"HTTP/1.1 431 "), huge[:100]
        finally:
            writer.close()
        assert slow.metric(closed, {"reason": "header_too_large"}) == 1
        assert slow.alive and slow.http("/readyz")[0] == 200
    finally:
        slow.stop()
