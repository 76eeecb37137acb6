"""The publisher's pure parts: dead-letter copies that always fit, and reply topics that are gone."""

from __future__ import annotations

import json

import pytest

from schemas import (
    HEADER_DLQ_REENCODED,
    HEADER_DLQ_TRUNCATED_VALUE,
    ContentType,
    EmbedRequest,
    EmbedResult,
    ErrorCode,
    RequestError,
)
from worker.engine.tokenize import TokenizedText
from worker.jobs import Job, RawMessage, Rejection, Source
from worker.publisher import DLQ_FRAMING_BYTES, ResultPublisher

SOURCE = Source("embed.requests", 2, 41, 0)
LIMIT = 1048588  # Kafka's default max.message.bytes


class FakeCluster:
    def __init__(self, topics: dict[str, list[int]]) -> None:
        self.topics = topics

    async def partitions_for(self, topic: str) -> list[int] | None:
        return self.topics.get(topic)


def publisher(topics: dict[str, list[int]] | None = None) -> ResultPublisher:
    cluster = FakeCluster(topics if topics is not None else {"embed.results": [0, 1]})
    return ResultPublisher(
        cluster,
        results_topic="embed.results",
        dlq_topic="embed.requests.dlq",
        worker_id="w1",
        model="m",
        max_dlq_record_bytes=LIMIT,
    )


def rejection(
    value: bytes | None, *, original_size: int | None = None, headers: list[tuple[str, bytes]] | None = None
) -> Rejection:
    error = RequestError(ErrorCode.MESSAGE_TOO_LARGE, "too large", "r1")
    return Rejection(
        SOURCE,
        RawMessage(None, value, headers or [], original_size=original_size),
        error,
        "embed.results",
        ContentType.JSON,
    )


def record_bytes(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v) for k, v in headers)


@pytest.mark.parametrize("size", [1000, LIMIT - 2000, LIMIT - 10, LIMIT + 5000, 3 << 20])
def test_dead_letters_always_fit_the_dlq_record_limit(size: int) -> None:
    key, value, headers = publisher().dead_letter(rejection(b"x" * size, headers=[("h", b"v" * 8000)]))
    assert record_bytes(key, value, headers) + DLQ_FRAMING_BYTES <= LIMIT
    names = dict(headers)
    if record_bytes(None, b"x" * size, [("h", b"v" * 8000)]) + DLQ_FRAMING_BYTES > LIMIT:
        assert names[HEADER_DLQ_TRUNCATED_VALUE] == str(size).encode()
    else:
        assert value == b"x" * size and HEADER_DLQ_TRUNCATED_VALUE not in names


def test_a_value_cut_by_the_decoder_says_how_big_it_was() -> None:
    _, value, headers = publisher().dead_letter(rejection(b"y" * 1000, original_size=256 << 20))
    assert value == b"y" * 1000 and dict(headers)[HEADER_DLQ_TRUNCATED_VALUE] == str(256 << 20).encode()


def job(reply_topic: str) -> Job:
    request = EmbedRequest(id="j1", text="hello", reply_to=reply_topic)
    return Job(
        SOURCE,
        RawMessage(b"k", None, [("content-type", b"application/json")], original_size=40),
        request,
        "ab" * 32,
        2,
        TokenizedText([101, 102], False),
        reply_topic,
        ContentType.JSON,
    )


async def test_results_for_a_reply_topic_that_is_gone_become_errors_on_the_default_topic() -> None:
    gone = job("embed.results.client-closed")
    result = EmbedResult.success(
        request_id="j1", key=gone.key, model="m", vector=[1.0, 0.0], encoding_format="float"
    )
    outgoing = await publisher().prepare([(gone, result)], [])
    assert not outgoing.results
    [error_result, dead_letter] = outgoing.singles
    assert error_result[0] == "embed.results"
    assert json.loads(error_result[2] or b"")["error"]["code"] == "reply_to_unavailable"
    assert dead_letter[0] == "embed.requests.dlq"
    headers = dict(dead_letter[3])
    assert headers["dlq-error-code"] == b"reply_to_unavailable" and headers[HEADER_DLQ_REENCODED] == b"1"
    assert json.loads(dead_letter[2] or b"")["text"] == "hello"  # re-encoded from the request
    assert [r.error.code for r in outgoing.rejected] == [ErrorCode.REPLY_TO_UNAVAILABLE]


async def test_results_for_an_existing_reply_topic_go_there() -> None:
    mine = job("embed.results.mine")
    result = EmbedResult.success(
        request_id="j1", key=mine.key, model="m", vector=[1.0, 0.0], encoding_format="float"
    )
    outgoing = await publisher({"embed.results": [0], "embed.results.mine": [0, 1, 2]}).prepare(
        [(mine, result)], [rejection(b"bad")]
    )
    assert [topic for topic, _ in outgoing.results] == ["embed.results.mine"]
    assert [single[0] for single in outgoing.singles] == ["embed.results", "embed.requests.dlq"]
    assert not outgoing.rejected
