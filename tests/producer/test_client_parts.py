"""The client's pieces that need no services: the model contract, cache keys, reply routing, errors."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from producer import EmbedBatchError, EmbedTimeout, ModelContract, TextFailure
from producer.replies import Expected, ReplyRouter
from schemas import EmbedResult, encode_result, result_headers
from schemas.cache_layout import contract_key, vector_key


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
