"""The HTTP gateway against the real stack: a live `embedfleet gateway` in front of a live worker.

The official ``openai`` SDK is the client for /v1/embeddings; raw HTTP (httpx, which the SDK
brings) checks the seed's /embed, the error shapes and the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.fleet import Fleet, GatewayProcess, start_fleet
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
    running = await start_fleet(
        kafka_bootstrap, redis_url, model_dir, tmp_path_factory.mktemp("gateway-logs"), workers=1
    )
    try:
        yield running
    finally:
        for gateway in running.gateways:
            gateway.stop()
        running.stop_all()
        await running.cleanup()


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
    assert set(body) == {"embeddings", "model"} and body["model"] == MODEL
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
    status, metrics = gateway.http("/metrics")
    assert (
        status == 200 and 'embedfleet_gateway_requests_total{route="/v1/embeddings",status="200"}' in metrics
    )
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
