"""The publisher's pure parts: dead-letter copies that always fit, and reply topics that are gone."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from schemas import (
    HEADER_DLQ_GENERATED_KEY,
    HEADER_DLQ_NULL_VALUE,
    HEADER_DLQ_REENCODED,
    HEADER_DLQ_TRUNCATED_VALUE,
    ContentType,
    EmbedRequest,
    EmbedResult,
    ErrorCode,
    RequestError,
    encode_result,
)
from worker.engine.tokenize import TokenizedText
from worker.jobs import Job, RawMessage, Rejection, Source
from worker.publisher import DLQ_FRAMING_BYTES, Part, Plan, ResultPublisher

SOURCE = Source("embed.requests", 2, 41, 0)
LIMIT = 1048588  # Kafka's default max.message.bytes


class FakeCluster:
    def __init__(self, topics: dict[str, list[int]]) -> None:
        self.topics = topics
        self.requests: list[set[str]] = []
        self.refusing: dict[str, str] = {}

    async def partitions_of(self, topics: Iterable[str]) -> dict[str, list[int] | None]:
        wanted = set(topics)
        self.requests.append(wanted)
        return {topic: self.topics.get(topic) for topic in wanted}

    def quarantined(self, topic: str) -> str | None:
        return self.refusing.get(topic)


def publisher(
    topics: dict[str, list[int]] | None = None, cluster: FakeCluster | None = None
) -> ResultPublisher:
    cluster = cluster or FakeCluster(topics if topics is not None else {"embed.results": [0, 1]})
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
    result = encode_result(
        EmbedResult.success(
            request_id="j1", key=gone.key, model="m", vector=[1.0, 0.0], encoding_format="float"
        )
    )
    outgoing = await publisher().prepare([(gone, result)], [])
    [error_result, dead_letter] = outgoing.sends
    assert error_result.topic == "embed.results" and error_result.part is Part.ERROR_RESULT
    [(_, value, _)] = error_result.records
    assert json.loads(value or b"")["error"]["code"] == "reply_to_unavailable"
    assert dead_letter.topic == "embed.requests.dlq" and dead_letter.part is Part.DEAD_LETTER
    [(_, dlq_value, dlq_headers)] = dead_letter.records
    headers = dict(dlq_headers)
    assert headers["dlq-error-code"] == b"reply_to_unavailable" and headers[HEADER_DLQ_REENCODED] == b"1"
    assert json.loads(dlq_value or b"")["text"] == "hello"  # re-encoded from the request
    assert [r.error.code for r in outgoing.rejected] == [ErrorCode.REPLY_TO_UNAVAILABLE]


async def test_results_for_an_existing_reply_topic_go_there() -> None:
    mine = job("embed.results.mine")
    result = encode_result(
        EmbedResult.success(
            request_id="j1", key=mine.key, model="m", vector=[1.0, 0.0], encoding_format="float"
        )
    )
    outgoing = await publisher({"embed.results": [0], "embed.results.mine": [0, 1, 2]}).prepare(
        [(mine, result)], [rejection(b"bad")]
    )
    assert [s.topic for s in outgoing.sends] == ["embed.results.mine", "embed.results", "embed.requests.dlq"]
    assert [s.part for s in outgoing.sends] == [Part.RESULT, Part.ERROR_RESULT, Part.DEAD_LETTER]
    assert not outgoing.rejected


def test_a_tombstone_gets_a_dead_letter_kafka_accepts() -> None:
    """A record with neither key nor value: aiokafka refuses to send such a record, which once
    stopped the worker. The copy carries an empty value and a generated key, and says so."""
    tombstone = Rejection(
        SOURCE,
        RawMessage(None, None, []),
        RequestError(ErrorCode.INVALID_ENCODING, "no value", None),
        "embed.results",
        ContentType.JSON,
    )
    key, value, headers = publisher().dead_letter(tombstone)
    names = dict(headers)
    assert value == b"" and names[HEADER_DLQ_NULL_VALUE] == b"1"
    assert key == b"dlq:embed.requests:2:41" and names[HEADER_DLQ_GENERATED_KEY] == b"1"
    # A record with a key keeps it, and says nothing about one.
    keyed = Rejection(SOURCE, RawMessage(b"k", None, []), tombstone.error, "embed.results", ContentType.JSON)
    key, value, headers = publisher().dead_letter(keyed)
    assert key == b"k" and value == b"" and HEADER_DLQ_GENERATED_KEY not in dict(headers)


async def test_all_reply_topics_of_a_batch_are_looked_up_in_one_request() -> None:
    cluster = FakeCluster({"embed.results": [0], **{f"embed.results.c{i}": [0] for i in range(50)}})
    jobs = [job(f"embed.results.c{i}") for i in range(50)]
    results = [
        (
            j,
            encode_result(
                EmbedResult.success(
                    request_id="j1", key=j.key, model="m", vector=[1.0, 0.0], encoding_format="float"
                )
            ),
        )
        for j in jobs
    ]
    the_publisher = publisher(cluster=cluster)
    outgoing = await the_publisher.prepare(results, [])
    assert len(cluster.requests) == 1 and len(cluster.requests[0]) == 51
    assert len(outgoing.sends) == 50


async def test_a_plan_answers_refused_records_otherwise_and_isolates_others() -> None:
    mine = job("embed.results.mine")
    result = encode_result(
        EmbedResult.success(
            request_id="j1", key=mine.key, model="m", vector=[1.0, 0.0], encoding_format="float"
        )
    )
    topics = {"embed.results": [0], "embed.results.mine": [0]}
    plan = Plan(unavailable={SOURCE: "MessageSizeTooLargeError"})
    outgoing = await publisher(topics).prepare([(mine, result)], [], plan)
    assert [s.part for s in outgoing.sends] == [Part.ERROR_RESULT, Part.DEAD_LETTER]
    assert outgoing.sends[0].topic == "embed.results"
    [(_, value, _)] = outgoing.sends[0].records
    assert "MessageSizeTooLargeError" in json.loads(value or b"")["error"]["message"]
    # Pieces already acknowledged are not sent again.
    plan = Plan(unavailable={SOURCE: "x"}, skip={(SOURCE, Part.ERROR_RESULT)})
    outgoing = await publisher(topics).prepare([(mine, result)], [], plan)
    assert [s.part for s in outgoing.sends] == [Part.DEAD_LETTER]
    # A quarantined reply topic is unavailable without a wait.
    cluster = FakeCluster(topics)
    cluster.refusing["embed.results.mine"] = "never acknowledged"
    quarantined = publisher(cluster=cluster)
    outgoing = await quarantined.prepare([(mine, result)], [])
    assert [r.error.code for r in outgoing.rejected] == [ErrorCode.REPLY_TO_UNAVAILABLE]
