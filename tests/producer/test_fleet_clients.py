"""The Python and Go clients against a real fleet (two `embedfleet worker` processes, fresh topics).

Vectors are compared to `embedfleet embed` (offline, same bundle, INT8) for the same texts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from producer import Client, ClientConfig, EmbedBatchError, EmbedTimeout, embed_sync
from producer.keys import plan_requests
from schemas.cache_layout import vector_key
from tests.fleet import Fleet, start_fleet

pytestmark = pytest.mark.stack

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDFLEET = str(Path(sys.executable).with_name("embedfleet"))
CORPUS = Path(os.environ.get("EMBEDFLEET_SHARED", REPO_ROOT.parent / "shared")) / "corpus" / "queries.jsonl"
MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.97


def corpus_texts(start: int, count: int) -> list[str]:
    """``count`` distinct corpus queries, from the ``start``-th distinct one."""
    if not CORPUS.exists():
        pytest.skip(f"no corpus at {CORPUS}; set EMBEDFLEET_SHARED")
    seen: dict[str, None] = {}
    with CORPUS.open(encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)
            if text.strip():
                seen.setdefault(text, None)
            if len(seen) >= start + count:
                break
    return list(seen)[start : start + count]


def offline_vectors(fleet: Fleet, texts: list[str], workdir: Path, variant: str) -> np.ndarray:
    """`embedfleet embed` with the fleet's bundle: the reference the fleet must reproduce."""
    source, output = workdir / "texts.jsonl", workdir / "expected.jsonl"
    source.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
    subprocess.run(
        [
            EMBEDFLEET,
            "embed",
            str(source),
            "--model",
            str(fleet.model_dir),
            "--variant",
            variant,
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = [json.loads(line)["vector"] for line in output.read_text(encoding="utf-8").splitlines()]
    return np.asarray(rows, dtype=np.float32)


async def cached_vectors(client: Client, texts: list[str]) -> np.ndarray:
    """The vectors the workers wrote to Redis for these texts, read straight from Redis."""
    contract = await client.model_contract()
    assert contract is not None and contract.dim is not None
    plan = plan_requests(texts, fingerprint=contract.fingerprint, task=None, dimensions=None)
    redis = Redis.from_url(client.config.redis_url)
    try:
        raw = [
            await redis.hget(
                vector_key(client.config.cache_key_prefix, client.config.model_name, contract.dim, d.key),
                "vector",
            )
            for d in plan.distinct
        ]
    finally:
        await redis.aclose()
    assert all(isinstance(value, bytes) for value in raw), "a vector is missing from Redis"
    vectors: np.ndarray = np.stack(
        [np.frombuffer(value, dtype="<f4") for value in raw if isinstance(value, bytes)]
    )
    return vectors


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    result: np.ndarray = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result


def fleet_config(fleet: Fleet, **overrides: Any) -> ClientConfig:
    return fleet.client_config(**overrides)


def fleet_env(fleet: Fleet) -> dict[str, str]:
    return {
        **os.environ,
        "EMBEDFLEET_KAFKA_BOOTSTRAP": fleet.bootstrap,
        "EMBEDFLEET_REDIS_URL": fleet.redis_url,
        "EMBEDFLEET_REQUESTS_TOPIC": fleet.requests_topic,
        "EMBEDFLEET_RESULTS_TOPIC": fleet.results_topic,
        "EMBEDFLEET_CACHE_KEY_PREFIX": fleet.cache_prefix,
    }


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with Client(fleet_config(fleet)) as running:
        yield running


async def test_vectors_match_offline_embed_then_come_from_the_cache(
    client: Client, fleet: Fleet, tmp_path: Path
) -> None:
    texts = corpus_texts(0, 200)
    expected = offline_vectors(fleet, texts, tmp_path, "int8")
    vectors = await client.embed(texts, timeout=120)
    assert client.stats.produced == 200 and client.stats.computed + client.stats.cached == 200
    got = np.stack(vectors)
    assert got.dtype == np.float32 and got.shape == expected.shape
    # The client hands back exactly what the workers computed (and cached), bit for bit.
    assert np.array_equal(got, await cached_vectors(client, texts))
    # INT8 vectors depend on the batch they were computed in (dynamic quantization takes one
    # activation scale per batch), and the fleet's batches differ from `embedfleet embed`'s:
    # offline batch 1 vs 32 alone gives min cosine 0.976. The 0.9999 bound holds for FP32 (below).
    similarity = cosines(got, expected)
    assert similarity.min() >= INT8_MIN_COSINE and similarity.mean() >= 0.99

    produced = client.stats.produced
    again = await client.embed(texts, timeout=30)
    assert client.stats.produced == produced, "the second call must be served by the cache"
    assert client.stats.cached >= 200
    assert np.array_equal(np.stack(again), got)


async def test_fp32_fleet_matches_offline_embed(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    fp32_fleet = await start_fleet(
        kafka_bootstrap, redis_url, model_dir, tmp_path / "logs", workers=1, EMBEDFLEET_VARIANT="fp32"
    )
    try:
        texts = corpus_texts(0, 200)
        expected = offline_vectors(fp32_fleet, texts, tmp_path, "fp32")
        async with Client(fleet_config(fp32_fleet)) as fp32_client:
            got = np.stack(await fp32_client.embed(texts, timeout=120))
        assert cosines(got, expected).min() >= MIN_COSINE
    finally:
        fp32_fleet.stop_all()
        await fp32_fleet.cleanup()


async def test_identical_texts_make_one_request(client: Client) -> None:
    texts = [f"duplicate check {time.time_ns()}", "Cafe\u0301 dedup", "Café dedup"]
    vectors = await client.embed([texts[0], texts[1], texts[0], texts[2]], timeout=60)
    assert client.stats.produced == 2
    assert np.array_equal(vectors[0], vectors[2]) and np.array_equal(vectors[1], vectors[3])
    assert vectors[0] is not vectors[2]


async def test_a_bad_text_fails_alone(client: Client) -> None:
    texts = [f"good text {time.time_ns()}", "", f"another good one {time.time_ns()}"]
    with pytest.raises(EmbedBatchError) as caught:
        await client.embed(texts, timeout=60)
    error = caught.value
    assert [(f.index, f.code) for f in error.failures] == [(1, "empty_text")]
    assert error.vectors[0] is not None and error.vectors[1] is None and error.vectors[2] is not None


async def test_a_worker_error_comes_back_per_text(client: Client) -> None:
    with pytest.raises(EmbedBatchError) as caught:
        await client.embed(["valid text, impossible width"], dimensions=7, timeout=10)
    assert [(f.index, f.code) for f in caught.value.failures] == [(0, "unsupported_dimensions")]


async def test_no_worker_means_a_quick_timeout_not_a_hang(
    fleet: Fleet, topic_factory: Callable[..., Awaitable[str]]
) -> None:
    orphan_topic = await topic_factory(6)
    async with Client(fleet_config(fleet, requests_topic=orphan_topic)) as lonely:
        started = time.monotonic()
        with pytest.raises(EmbedTimeout) as caught:
            await lonely.embed([f"nobody reads this {time.time_ns()}", "nor this one at all"], timeout=3)
        assert time.monotonic() - started < 6
    assert caught.value.missing == 2 and "embedfleet worker" in str(caught.value)


async def test_shared_reply_mode(fleet: Fleet) -> None:
    async with Client(fleet_config(fleet, reply_mode="shared")) as shared:
        texts = [f"shared reply {i} {time.time_ns()}" for i in range(5)]
        vectors = await shared.embed(texts, timeout=60)
    assert len(vectors) == 5 and all(v.shape == (384,) for v in vectors)


async def test_without_redis_the_client_still_embeds(fleet: Fleet) -> None:
    async with Client(fleet_config(fleet, redis_url="")) as no_cache:
        text = f"no redis on the client {time.time_ns()}"
        vectors = await no_cache.embed([text, text], timeout=60)
        assert no_cache.stats.produced == 1 and await no_cache.model_contract() is None
    assert vectors[0].shape == (384,)


async def test_sync_client(fleet: Fleet) -> None:
    # The sync wrapper runs its own loop, so it is called from a thread here.
    vectors = await asyncio.to_thread(
        embed_sync, [f"sync {time.time_ns()}"], timeout=60, config=fleet_config(fleet)
    )
    assert vectors[0].shape == (384,)


def test_produce_command_writes_npy_and_jsonl(fleet: Fleet, tmp_path: Path) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("first line to embed\n\nsecond line to embed\nfirst line to embed\n", encoding="utf-8")
    matrix_path = tmp_path / "out.npy"
    done = subprocess.run(
        [EMBEDFLEET, "produce", str(lines), "--format", "lines", "-o", str(matrix_path)],
        env=fleet_env(fleet),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    matrix = np.load(matrix_path)
    assert matrix.shape == (3, 384) and np.array_equal(matrix[0], matrix[2])
    assert "sent 3 texts" in done.stderr

    jsonl = '{"id": "a", "text": "json object input"}\n"a bare string"\n{"id": "bad", "text": " "}\n'
    done = subprocess.run(
        [EMBEDFLEET, "produce", "-q"],
        input=jsonl,
        env=fleet_env(fleet),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # one text failed
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["a", 2, "bad"]
    assert len(rows[0]["vector"]) == 384 and rows[2]["error"]["code"] == "empty_text"
    assert "failed 1" in done.stderr


async def test_produce_command_says_what_to_do_when_no_worker_answers(
    fleet: Fleet, topic_factory: Callable[..., Awaitable[str]], tmp_path: Path
) -> None:
    env = {**fleet_env(fleet), "EMBEDFLEET_REQUESTS_TOPIC": await topic_factory(6)}
    done = await asyncio.to_thread(
        subprocess.run,
        [EMBEDFLEET, "produce", "--timeout", "2", "-q"],
        input='"lonely text"\n',
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "within 2s" in done.stderr and "embedfleet worker" in done.stderr


def test_go_client_against_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed")
    texts = corpus_texts(1000, 200)  # not the Python test's texts: the Go client's first call must compute
    expected = offline_vectors(fleet, texts, tmp_path, "int8")
    expected_path = tmp_path / "expected_vectors.json"
    expected_path.write_text(json.dumps({"texts": texts, "vectors": expected.astype(np.float64).tolist()}))
    env = {**fleet_env(fleet), "EMBEDFLEET_EXPECTED_VECTORS": str(expected_path)}
    done = subprocess.run(
        [go, "test", "-count=1", "-v", "./..."],
        cwd=REPO_ROOT / "producer" / "go",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "--- PASS: TestIntegrationEmbed" in done.stdout, done.stdout[-4000:]
