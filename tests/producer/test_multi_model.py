"""Several models, one fleet, against the real stack: a MiniLM worker and an MPNet worker (each on
its own requests topic and consumer group, by the naming rule of schemas/model_routing.py), one
gateway in front of both, and the Python client asking each model by name.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from producer.client import Client
from schemas.cache_layout import ENTRY_FIELDS, index_name, vector_key
from schemas.model_routing import requests_topic_for
from tests.fleet import Fleet, FleetIO, GatewayProcess, WorkerProcess, request, running_fleet
from tests.helpers import create_topic, delete_topics
from worker.cache import redis_client
from worker.engine import quality
from worker.engine.bundle import Bundle

pytestmark = pytest.mark.stack

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
MIN_REFERENCE_COSINE = 0.99
TEXTS_PER_MODEL = 20
WIDTHS = {MINILM: 384, MPNET: 768}
REQUESTS_PER_MODEL = 16  # MPNet: ~140 texts/s on 2 cores shared with other tests


@pytest.fixture(scope="module")
def mpnet_dir(mpnet_bundle: Bundle) -> Path:
    """Built (or reused) in $EMBEDFLEET_HOME/models by the session fixture: never skipped."""
    return mpnet_bundle.path


def start_mpnet_worker(fleet: Fleet, mpnet_dir: Path) -> WorkerProcess:
    """An MPNet worker by `--model NAME`, on <fleet topic>.<model> in group <fleet group>.<model>."""
    return fleet.start_worker(
        "--model",
        MPNET,
        env={
            "EMBEDFLEET_HOME": str(mpnet_dir.parent.parent),
            "EMBEDFLEET_MODEL": "",  # the flag names the model
            "EMBEDFLEET_REQUESTS_TOPIC": requests_topic_for(MPNET, base=fleet.requests_topic),
            "EMBEDFLEET_GROUP_ID": mpnet_group(fleet),
            "EMBEDFLEET_VARIANT": "int8",
        },
    )


def mpnet_group(fleet: Fleet) -> str:
    return f"{fleet.group_id}.{MPNET}"


@pytest.fixture(scope="module")
async def two_models(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    mpnet_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Fleet, GatewayProcess]]:
    """The fleet's MiniLM worker on the fleet's topic, an MPNet worker started by `--model NAME`
    on <fleet topic>.<model> (the gateway derives the same name from its base topic), a gateway."""
    log_dir = tmp_path_factory.mktemp("multi-model-logs")
    async with running_fleet(kafka_bootstrap, redis_url, model_dir, log_dir, workers=1) as fleet:
        mpnet_topic = requests_topic_for(MPNET, base=fleet.requests_topic)
        await create_topic(kafka_bootstrap, mpnet_topic, 2)
        try:
            mpnet = start_mpnet_worker(fleet, mpnet_dir)
            gateway = fleet.start_gateway()
            await fleet.wait_ready([mpnet], timeout_s=90)
            await gateway.wait_ready()
            yield fleet, gateway
        finally:
            await delete_topics(kafka_bootstrap, [mpnet_topic])


@pytest.fixture(scope="module")
def references(shared_dir: Path) -> dict[str, quality.Reference]:
    return {name: quality.read_reference(shared_dir / "reference" / name) for name in (MINILM, MPNET)}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    result: np.ndarray = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result


async def test_one_gateway_serves_two_models_each_from_its_own_workers_and_cache(
    two_models: tuple[Fleet, GatewayProcess], references: dict[str, quality.Reference]
) -> None:
    fleet, gateway = two_models
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        assert [model.id for model in (await sdk.models.list()).data] == [MINILM, MPNET]
        for name, width in ((MINILM, 384), (MPNET, 768)):
            reference = references[name]
            texts = reference.texts[:TEXTS_PER_MODEL]
            response = await sdk.embeddings.create(model=name, input=texts)
            assert response.model == name
            vectors = np.asarray([item.embedding for item in response.data])
            assert vectors.shape == (TEXTS_PER_MODEL, width)
            worst = cosines(vectors, reference.vectors[:TEXTS_PER_MODEL]).min()
            assert worst >= MIN_REFERENCE_COSINE, (name, worst)
        with pytest.raises(openai.BadRequestError) as bad_width:  # dimensions per model
            await sdk.embeddings.create(model=MPNET, input="hello", dimensions=384)
        assert bad_width.value.param == "dimensions" and "768" in bad_width.value.message
        with pytest.raises(openai.NotFoundError) as unknown:
            await sdk.embeddings.create(model="text-embedding-3-small", input="hello")
        assert unknown.value.code == "model_not_found"
    finally:
        await sdk.close()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        missing = await http.get("/v1/models/no-such-model")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        assert (await http.get(f"/v1/models/{MPNET}")).json()["id"] == MPNET
        seed = await http.post("/embed", json={"texts": ["the seed endpoint"]})  # the default model
        assert seed.status_code == 200 and len(seed.json()["embeddings"][0]) == 384
    # The gateway's per-request metrics carry the model; an unknown model's name never becomes a label.
    route = {"route": "/v1/embeddings"}
    answered = "embedfleet_gateway_requests_total"
    assert gateway.metric(answered, {**route, "status": "200", "model": MPNET}) == 1
    assert gateway.metric(answered, {**route, "status": "400", "model": MPNET}) == 1
    assert gateway.metric(answered, {**route, "status": "404", "model": ""}) == 1
    assert gateway.metric("embedfleet_gateway_request_seconds_count", {**route, "model": MPNET}) == 2
    assert gateway.metric("embedfleet_gateway_request_seconds_count", {**route, "model": MINILM}) == 1
    assert gateway.metric("embedfleet_gateway_texts_total", {"model": MPNET}) == TEXTS_PER_MODEL
    assert gateway.metric("embedfleet_gateway_texts_total", {"model": MINILM}) == TEXTS_PER_MODEL + 1
    assert "text-embedding-3-small" not in gateway.http("/metrics")[1]

    # The Python client, by model name: one text, two models, two cache entries in two indexes.
    text = "one text, embedded by two models"
    async with Client(fleet.client_config()) as client:
        small = await client.embed([text])
        large = await client.embed([text], model=MPNET)
        assert (small[0].shape, large[0].shape) == ((384,), (768,))
        keys = {
            name: (await client.prepare([text], model=name)).plan.distinct[0].key for name in (MINILM, MPNET)
        }
    assert keys[MINILM] != keys[MPNET]  # each model's fingerprint goes into its content hash
    minilm_worker, mpnet_worker = fleet.workers
    assert mpnet_worker.metric("embedfleet_computed_texts_total", {"model": MPNET}) >= TEXTS_PER_MODEL
    assert minilm_worker.metric("embedfleet_computed_texts_total", {"model": MPNET}) == 0
    redis = redis_client(fleet.redis_url, timeout_s=5)
    try:
        entries = {
            name: await redis.hmget(vector_key(fleet.cache_prefix, name, dim, keys[name]), list(ENTRY_FIELDS))
            for name, dim in ((MINILM, 384), (MPNET, 768))
        }
        assert entries[MINILM][1:3] == [MINILM.encode(), b"384"]
        assert entries[MPNET][1:3] == [MPNET.encode(), b"768"]
        indexes = {i.decode() if isinstance(i, bytes) else i for i in await redis.execute_command("FT._LIST")}
        assert {
            index_name(fleet.cache_prefix, MINILM, 384),
            index_name(fleet.cache_prefix, MPNET, 768),
        } <= indexes
    finally:
        await redis.aclose()


def width_of(result: dict[str, Any]) -> int:
    """The length of a result's vector, whichever encoding it came in (0 when it has none)."""
    if result.get("vector") is not None:
        return len(result["vector"])
    if result.get("vector_b64"):
        return len(base64.b64decode(result["vector_b64"])) // 4
    return 0


async def send_to_model(io: FleetIO, fleet: Fleet, model: str, count: int) -> list[str]:
    """``count`` requests of fresh texts (no cache hit: every one is computed) on ``model``'s topic."""
    topic = requests_topic_for(model, base=fleet.requests_topic)
    ids = []
    for i in range(count):
        request_id, value = request(f"{model} request {i} {uuid.uuid4().hex}")
        ids.append(request_id)
        await io.producer.send(topic, value)
    await io.producer.flush()
    return ids


def assert_answered_once_by(io: FleetIO, ids: list[str], model: str) -> None:
    """Every id has exactly one result on the results topic, a success of ``model``'s width."""
    counts = {i: len(io.results.get(i, [])) for i in ids}
    assert all(n == 1 for n in counts.values()), {i: n for i, n in counts.items() if n != 1}
    errors = {i: io.results[i][0]["error"] for i in ids if io.results[i][0].get("error")}
    assert not errors, errors
    seen = {(r["model"], r["dim"], width_of(r), r.get("cached", False)) for i in ids for r in io.results[i]}
    assert seen == {(model, WIDTHS[model], WIDTHS[model], False)}, seen


def computed(worker: WorkerProcess) -> float:
    return worker.metric("embedfleet_computed_texts_total")


async def committed_offsets(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, p["partition"]) for p in description["partitions"]]
    assert partitions, f"no partitions of {topic}"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()


async def test_a_worker_of_one_model_never_consumes_the_other_models_requests(
    two_models: tuple[Fleet, GatewayProcess],
) -> None:
    fleet, _ = two_models
    minilm_worker = fleet.workers[0]
    mpnet_worker = fleet.workers[-1]
    assert minilm_worker.alive and mpnet_worker.alive
    before = {minilm_worker.name: computed(minilm_worker), mpnet_worker.name: computed(mpnet_worker)}
    async with FleetIO(fleet) as io:
        ids = {model: await send_to_model(io, fleet, model, REQUESTS_PER_MODEL) for model in (MINILM, MPNET)}
        await io.wait_for([*ids[MINILM], *ids[MPNET]], timeout_s=60)
        await asyncio.sleep(2)  # a redelivery or a second answer would arrive meanwhile
        for model in (MINILM, MPNET):
            assert_answered_once_by(io, ids[model], model)
    # Each worker computed exactly its own model's texts: none of the other's went through it.
    assert computed(minilm_worker) - before[minilm_worker.name] == REQUESTS_PER_MODEL
    assert computed(mpnet_worker) - before[mpnet_worker.name] == REQUESTS_PER_MODEL

    # Each model's group committed offsets on its own topic only, up to that topic's end.
    topics = {MINILM: fleet.requests_topic, MPNET: requests_topic_for(MPNET, base=fleet.requests_topic)}
    groups = {MINILM: fleet.group_id, MPNET: mpnet_group(fleet)}
    for model in (MINILM, MPNET):
        ends = await end_offsets(fleet.bootstrap, topics[model])
        assert sum(ends.values()) >= REQUESTS_PER_MODEL
        deadline = time.monotonic() + 20
        while (committed := await committed_offsets(fleet.bootstrap, groups[model])) != ends:
            assert {tp.topic for tp in committed} <= {topics[model]}, (model, committed)
            assert time.monotonic() < deadline, (model, committed, ends)
            await asyncio.sleep(0.5)


async def test_killing_one_models_workers_leaves_the_other_models_answers_untouched(
    two_models: tuple[Fleet, GatewayProcess], mpnet_dir: Path
) -> None:
    """Runs last in this module: it kills the MPNet worker and leaves a new one in its place."""
    fleet, _ = two_models
    minilm_worker = fleet.workers[0]
    mpnet_worker = fleet.workers[-1]
    assert minilm_worker.alive and mpnet_worker.alive
    assert fleet.stop_worker(mpnet_worker, signal.SIGKILL) == -signal.SIGKILL
    async with FleetIO(fleet) as io:
        ids = {model: await send_to_model(io, fleet, model, REQUESTS_PER_MODEL) for model in (MINILM, MPNET)}
        await io.wait_for(ids[MINILM], timeout_s=60)
        await asyncio.sleep(5)  # what the MPNet requests get while no MPNet worker runs: nothing
        assert_answered_once_by(io, ids[MINILM], MINILM)
        answered = [i for i in ids[MPNET] if i in io.results]
        assert not answered, f"{len(answered)} MPNet requests answered with no MPNet worker running"

        replacement = start_mpnet_worker(fleet, mpnet_dir)
        await fleet.wait_ready([replacement], timeout_s=90)
        await io.wait_for(ids[MPNET], timeout_s=60)
        await asyncio.sleep(2)
        assert_answered_once_by(io, ids[MPNET], MPNET)
        assert_answered_once_by(io, ids[MINILM], MINILM)  # still one answer each
    assert computed(replacement) == REQUESTS_PER_MODEL
