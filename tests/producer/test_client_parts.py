"""The client's pieces that need no services: the model contract, cache keys, reply routing, errors."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from producer import Client, ClientConfig, EmbedBatchError, EmbedTimeout, ModelContract, TextFailure
from producer.replies import Expected, ReplyRouter
from schemas import (
    HEADER_SCHEMA,
    Chunk,
    EmbedRequest,
    EmbedResult,
    LongInputs,
    content_hash,
    decode_request,
    encode_request,
    encode_result,
    encode_success_result,
    encode_vector_b64,
    long_inputs_spec,
    result_headers,
)
from schemas.cache_layout import CacheEntry, contract_key, vector_key
from schemas.messages import LONG_INPUTS_SCHEMA_VERSION


def test_model_contract_from_the_workers_hash() -> None:
    contract = ModelContract.from_redis_fields(
        {
            b"fingerprint": b"abc",
            b"dim": b"384",
            b"tasks": b'["document", "query"]',
            b"dimensions": b"[128, 384]",
            b"max_tokens": b"256",
        }
    )
    assert contract == ModelContract("abc", 384, frozenset({"query", "document"}), frozenset({128, 384}), 256)
    assert ModelContract.from_redis_fields({}) is None
    assert ModelContract.from_redis_fields({b"fingerprint": b"x", b"dim": b"many"}) is None


def test_redis_keys_follow_the_workers_layout() -> None:
    assert vector_key("embedfleet", "all-MiniLM-L6-v2", 384, "k") == "embedfleet:all-MiniLM-L6-v2:384:k"
    assert vector_key("p", "org/model v2", 8, "k") == "p:org_model_v2:8:k"
    assert contract_key("embedfleet", "all-MiniLM-L6-v2") == "embedfleet:models:all-MiniLM-L6-v2"


@dataclass
class _Record:
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=result_headers)


class _FakeConsumer:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[_Record]] = asyncio.Queue()

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[str, list[_Record]]:
        try:
            return {"tp": await asyncio.wait_for(self.queue.get(), timeout_ms / 1000)}
        except TimeoutError:
            return {}


async def test_router_resolves_by_id_and_ignores_strangers() -> None:
    consumer = _FakeConsumer()
    router = ReplyRouter(consumer)
    router.start()
    mine = router.expect("mine")
    ok = EmbedResult.success(
        request_id="mine", key="k", model="m", vector=[1.0, 2.0], encoding_format="base64"
    )
    other = EmbedResult.success(request_id="someone-else", key="k", model="m", vector=[3.0])
    await consumer.queue.put(
        [_Record(b"garbage"), _Record(None), _Record(encode_result(other)), _Record(encode_result(ok))]
    )
    result = await asyncio.wait_for(mine, 2)
    assert result.vector_array().tolist() == [1.0, 2.0]
    assert router.undecodable == 1 and router.waiting == 0
    late = router.expect("late")
    router.forget(["late"])
    assert late.cancelled()
    await router.stop()


async def test_router_accepts_only_the_key_and_width_it_asked_for() -> None:
    """An id alone can be answered by anyone who may write the reply topic: a forged result
    (another key or width) is ignored and the request waits for the real one."""
    consumer = _FakeConsumer()
    router = ReplyRouter(consumer)
    router.start()
    mine = router.expect("mine", Expected(key="k1", dim=2))

    def result(key: str, vector: list[float]) -> _Record:
        return _Record(
            encode_result(
                EmbedResult.success(
                    request_id="mine", key=key, model="m", vector=vector, encoding_format="float"
                )
            )
        )

    await consumer.queue.put([result("forged", [9.0, 9.0]), result("k1", [9.0, 9.0, 9.0])])
    await asyncio.sleep(0.05)
    assert not mine.done() and router.mismatched == 2 and router.waiting == 1
    await consumer.queue.put([result("k1", [1.0, 2.0])])
    assert (await asyncio.wait_for(mine, 2)).vector_array().tolist() == [1.0, 2.0]
    # A validation error has no key and still answers (it can only cost the requester a retry).
    failed = router.expect("bad", Expected(key="k2", dim=2))
    error = EmbedResult.failure(request_id="bad", code="empty_text", message="empty")
    await consumer.queue.put([_Record(encode_result(error))])
    assert (await asyncio.wait_for(failed, 2)).error is not None
    await router.stop()


async def test_router_failure_reaches_the_waiting_callers() -> None:
    class Broken:
        async def getmany(self, timeout_ms: int, max_records: int) -> dict[str, list[_Record]]:
            await asyncio.sleep(0.05)
            raise RuntimeError("broker gone")

    router = ReplyRouter(Broken())
    waiting = router.expect("a")
    router.start()
    with pytest.raises(RuntimeError, match="broker gone"):
        await asyncio.wait_for(waiting, 2)
    with pytest.raises(RuntimeError, match="stopped"):
        router.expect("b")
    await router.stop()


def test_errors_keep_the_good_vectors_and_say_what_to_do() -> None:
    good = np.ones(2, dtype=np.float32)
    batch = EmbedBatchError([TextFailure(1, "empty_text", "text is empty")], [good, None])
    assert batch.vectors[0] is good and batch.failures[0].index == 1
    assert "1 of 2 texts failed; text 1: empty_text" in str(batch)
    timeout = EmbedTimeout(3, 5, 3.0, [None] * 5)
    assert timeout.missing == 3 and "3 of 5 texts got no result within 3s" in str(timeout)
    assert "embedfleet worker" in str(timeout)


# --- long inputs (issue 24): keys, the request, the cache lookup, the outcome --------------------


class _FakeCache:
    """The client's cache reader: every key is a hit of ``tokens`` tokens; lookups are recorded."""

    enabled = True

    def __init__(self, contract: ModelContract, tokens: dict[str, int | None] | None = None) -> None:
        self.contract = contract
        self.tokens = tokens or {}
        self.lookups: list[list[str]] = []

    async def read_contract(self, model: str | None = None) -> ModelContract | None:
        return self.contract

    async def lookup(self, keys: list[str], dim: int, model: str | None = None) -> list[CacheEntry | None]:
        self.lookups.append(list(keys))
        return [CacheEntry(np.full(dim, 0.5, dtype=np.float32), self.tokens.get(key, 3)) for key in keys]

    async def close(self) -> None:
        pass


class _AnsweringProducer:
    """Records each request and answers it at once on ``consumer``'s queue, as a worker would:
    ``answer(request, key)`` gives the encoded result (None: no answer)."""

    def __init__(self, consumer: _FakeConsumer, answer: Any = None) -> None:
        self.consumer = consumer
        self.answer = answer
        self.sent: list[tuple[str, EmbedRequest, str, dict[str, bytes]]] = []

    async def send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        request = decode_request(value, headers)
        self.sent.append((topic, request, key.decode(), dict(headers)))
        if self.answer is not None:
            await self.consumer.queue.put([_Record(self.answer(request, key.decode()))])
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked


CONTRACT = ModelContract("fp", 2, max_tokens=8, name="all-MiniLM-L6-v2")


def key_of(text: str, long_spec: str | None = None) -> str:
    return content_hash(text, model_fingerprint="fp", task=None, dimensions=None, long_spec=long_spec)


def _client(cache: _FakeCache | None = None, answer: Any = None) -> tuple[Client, _AnsweringProducer]:
    client = Client(ClientConfig.from_env({}, model_fingerprint="fp", model_dim=2, redis_url=""))
    if cache is not None:
        client._cache = cache  # type: ignore[assignment]
    consumer = _FakeConsumer()
    producer = _AnsweringProducer(consumer, answer)
    client._producer = producer
    client._router = ReplyRouter(consumer)
    return client, producer


@pytest.mark.parametrize(("long", "overlap"), [("pool", None), ("chunks", 16)])
async def test_pool_and_chunks_skip_the_cache_and_send_schema_2_with_the_long_fields(
    long: LongInputs, overlap: int | None
) -> None:
    cache = _FakeCache(CONTRACT)
    client, producer = _client(cache)
    texts = ["a long document", "another", "a long document"]
    prepared = await client.prepare(texts, long=long, overlap=overlap)
    assert cache.lookups == []  # a pooled vector is never cached under the request's key
    spec = long_inputs_spec(long, overlap)
    assert spec == f"{long}:{overlap or 32}"
    keys = [key_of(t, spec) for t in texts]
    assert [entry.key for entry in prepared.misses] == [keys[0], keys[1]]
    assert [entry.indices for entry in prepared.misses] == [[0, 2], [1]]
    ids = await client.send(texts, long=long, overlap=overlap)
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert cache.lookups == []
    assert len(producer.sent) == 2
    for (_, request, key, headers), expected_key in zip(producer.sent, keys, strict=False):
        assert key == expected_key
        assert headers[HEADER_SCHEMA] == LONG_INPUTS_SCHEMA_VERSION.encode() == b"2"
        assert request.long == long and request.overlap == overlap
        assert request.long_inputs_spec() == spec


async def test_truncate_requests_stay_schema_1_and_keep_the_plain_key() -> None:
    cache = _FakeCache(CONTRACT, tokens={key_of("short"): 3, key_of("long"): 8})
    client, producer = _client(cache)
    # The overlap means nothing without windows: dropped, the request is the one of before.
    ids = await client.send(["short", "long"], long="truncate", overlap=64)
    assert cache.lookups == [[key_of("short"), key_of("long")]]  # truncate reads the cache
    assert ids[0] is None and ids[1] is not None  # "long" may have been cut: the workers say
    ((_, request, key, headers),) = producer.sent
    assert headers[HEADER_SCHEMA] == b"1"
    assert request.long == "truncate" and request.overlap is None
    assert key == key_of("long")
    assert b'"long":' not in encode_request(request, limits=None)


async def test_a_cache_entry_of_a_text_that_may_have_been_cut_is_left_to_the_workers() -> None:
    """Fewer tokens than the model reads: not cut (served, truncated False). At the limit, or a
    count not stored: the workers answer, and say whether they cut it."""
    short, at_limit, unknown = key_of("short"), key_of("limit"), key_of("old")
    cache = _FakeCache(CONTRACT, tokens={short: 5, at_limit: 8, unknown: None})
    client, _ = _client(cache)
    prepared = await client.prepare(["short", "limit", "old"])
    assert [entry.key for entry in prepared.misses] == [at_limit, unknown]
    assert prepared.truncated == [False, None, None] and prepared.tokens == [5, None, None]
    assert prepared.vectors[0] is not None and client.stats.cached == 1
    # Without the model's limit (a contract that does not say it) the entry is served, unknown.
    client, _ = _client(_FakeCache(ModelContract("fp", 2), tokens={at_limit: 8}))
    prepared = await client.prepare(["limit"])
    assert prepared.misses == [] and prepared.truncated == [None] and prepared.tokens == [8]


def _long_answer(request: EmbedRequest, key: str) -> bytes:
    """A worker's answer to a chunks request of two windows (base64, as the client asks)."""
    assert request.long == "chunks" and request.encoding_format == "base64"
    first, second = np.asarray([1.0, 0.0], np.float32), np.asarray([0.0, 1.0], np.float32)
    chunks = [
        Chunk(start=0, end=10, tokens=256, vector_b64=encode_vector_b64(first)),
        Chunk(start=8, end=len(request.text), tokens=100, vector_b64=encode_vector_b64(second)),
    ]
    pooled = (256 * first + 100 * second) / np.linalg.norm(256 * first + 100 * second)
    return encode_success_result(
        request_id=request.id,
        key=key,
        model="all-MiniLM-L6-v2",
        vector=pooled.astype(np.float32),
        encoding_format="base64",
        truncated=False,
        tokens=356,
        windows=2,
        chunks=chunks,
    )


async def test_a_chunks_result_fills_the_outcome_per_text() -> None:
    client, _ = _client(answer=_long_answer)
    client._router.start()  # type: ignore[union-attr]
    try:
        texts = ["a text of two windows", "a text of two windows"]
        prepared = await client.prepare(texts, long="chunks")
        outcome = await client.complete(prepared, timeout=5)
    finally:
        await client._router.stop()  # type: ignore[union-attr]
    assert outcome.failures == [] and outcome.missing == 0 and outcome.produced == 1
    assert outcome.truncated == [False, False] and outcome.tokens == [356, 356]
    first, second = outcome.chunks
    assert first is not None and second is not None
    assert [(c.start, c.end, c.tokens) for c in first] == [(0, 10, 256), (8, len(texts[0]), 100)]
    assert first[0].vector.dtype == np.float32 and first[0].vector.tolist() == [1.0, 0.0]
    assert first[1].vector.tolist() == [0.0, 1.0]
    assert first[0].vector is not second[0].vector  # repeated texts get copies
    vector = outcome.vectors[0]
    assert vector is not None and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-6


async def test_a_chunk_of_another_width_fails_the_text_and_pool_has_no_chunks() -> None:
    def wrong_width(request: EmbedRequest, key: str) -> bytes:
        chunk = Chunk(start=0, end=1, tokens=3, vector=[1.0, 0.0, 0.0])
        return encode_success_result(
            request_id=request.id,
            key=key,
            model="m",
            vector=np.asarray([1.0, 0.0], np.float32),
            tokens=3,
            chunks=[chunk],
        )

    client, _ = _client(answer=wrong_width)
    client._router.start()  # type: ignore[union-attr]
    try:
        outcome = await client.complete(await client.prepare(["x"], long="chunks"), timeout=5)
        assert [(f.index, f.code) for f in outcome.failures] == [(0, "invalid_result")]
        assert outcome.vectors == [None] and outcome.chunks == [None]
        pooled = await client.complete(await client.prepare(["x"], long="pool"), timeout=5)
        assert pooled.failures == [] and pooled.chunks == [None] and pooled.truncated == [False]
    finally:
        await client._router.stop()  # type: ignore[union-attr]


async def test_a_cut_text_says_so() -> None:
    def cut(request: EmbedRequest, key: str) -> bytes:
        return encode_success_result(
            request_id=request.id,
            key=key,
            model="m",
            vector=np.asarray([1.0, 0.0], np.float32),
            truncated=True,
            tokens=8,
        )

    client, _ = _client(answer=cut)
    client._router.start()  # type: ignore[union-attr]
    try:
        outcome = await client.complete(await client.prepare(["a very long text"]), timeout=5)
    finally:
        await client._router.stop()  # type: ignore[union-attr]
    assert outcome.truncated == [True] and outcome.tokens == [8] and outcome.chunks == [None]


async def test_unknown_long_modes_raise_before_anything_is_sent() -> None:
    client, producer = _client()
    with pytest.raises(ValueError, match="long must be one of"):
        await client.prepare(["x"], long="summarise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overlap"):
        await client.send(["x"], long="pool", overlap=1000)
    assert producer.sent == []
