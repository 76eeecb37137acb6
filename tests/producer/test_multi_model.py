"""Several models, one fleet, against the real stack: a MiniLM worker and an MPNet worker (each on
its own requests topic and consumer group, by the naming rule of schemas/model_routing.py), one
gateway in front of both, and the Python client asking each model by name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from producer.client import Client
from schemas.cache_layout import ENTRY_FIELDS, index_name, vector_key
from schemas.model_routing import requests_topic_for
from tests.fleet import Fleet, GatewayProcess, running_fleet
from tests.helpers import create_topic, delete_topics
from worker.cache import redis_client
from worker.engine import quality

pytestmark = pytest.mark.stack

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
MIN_REFERENCE_COSINE = 0.99
TEXTS_PER_MODEL = 20


@pytest.fixture(scope="module")
def mpnet_dir(model_dir: Path) -> Path:
    path = model_dir.parent / MPNET
    if not (path / "manifest.json").exists():
        pytest.skip(f"no {MPNET} bundle at {path}: run `embedfleet model build --model {MPNET}`")
    return path


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
            mpnet = fleet.start_worker(
                "--model",
                MPNET,
                env={
                    "EMBEDFLEET_HOME": str(mpnet_dir.parent.parent),
                    "EMBEDFLEET_MODEL": "",  # the flag names the model
                    "EMBEDFLEET_REQUESTS_TOPIC": mpnet_topic,
                    "EMBEDFLEET_GROUP_ID": f"{fleet.group_id}.{MPNET}",
                    "EMBEDFLEET_VARIANT": "int8",
                },
            )
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
