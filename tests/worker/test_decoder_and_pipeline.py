"""The decoder and the batch pipeline with a fake engine and an in-memory Redis: pure logic, no stack."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from schemas import HEADER_DLQ_HEADERS_REPAIRED, ErrorCode, RequestLimits, decode_result
from schemas.cache_layout import ModelContract
from tests.fakes import FakeRedis
from worker.cache import VectorCache
from worker.decoder import RequestDecoder
from worker.engine.embedder import EmbedOutput
from worker.engine.tokenize import Span, TokenizedText
from worker.jobs import Job, Rejection
from worker.metrics import WorkerMetrics
from worker.pipeline import BatchProcessor
from worker.records import RawRecord
from worker.salvage import Unreadable

MODEL = ModelContract(name="m", fingerprint="f" * 64, dim=4, tasks=frozenset(), dimensions=frozenset({4}))


def tokenize(texts: Sequence[str], task: str | None = None) -> list[TokenizedText]:
    """One token per word, cut at 8 (the fake model's limit)."""
    return [TokenizedText(list(range(min(8, len(t.split())))), len(t.split()) > 8) for t in texts]


def split_windows(text: str, task: str | None, overlap: int) -> list[Span]:
    """The fake model's windows: 6 words each (8 tokens less 2 special ones), ``overlap`` words
    shared; a text of 6 words or fewer is one window."""
    if not 0 <= overlap <= 1:
        raise ValueError("overlap must be 0 to 1 tokens (a quarter of the window)")
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    if len(words) <= 6:
        return [Span(0, len(text))]
    spans, start = [], 0
    while True:
        end = start + 6
        if end >= len(words):
            spans.append(Span(words[start][0], len(text)))
            return spans
        spans.append(Span(0 if start == 0 else words[start][0], words[end - 1][1]))
        start = end - overlap


def decoder(max_kept: int = 1 << 20, max_windows: int = 64) -> RequestDecoder:
    return RequestDecoder(
        model=MODEL,
        tokenize=tokenize,
        split_windows=split_windows,
        max_windows=max_windows,
        limits=RequestLimits(),
        reply_to_pattern=r"embed\.results.*",
        default_reply_topic="embed.results",
        max_kept_value_bytes=max_kept,
    )


def record(
    value: bytes | None, offset: int = 0, headers: Sequence[tuple[str, bytes]] = ()
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="embed.requests",
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=len(value or b""),
        headers=tuple(headers),
    )


def test_a_valid_request_carries_its_tokens_and_releases_its_bytes() -> None:
    value = json.dumps({"id": "a", "text": "one two three"}).encode()
    [job] = decoder().decode([record(value)])
    assert isinstance(job, Job)
    assert job.tokenized.ids == [0, 1, 2] and not job.tokenized.truncated
    [read] = decoder().read([record(value)])
    assert isinstance(read, Job) and read.tokens is None and read.key == job.key  # read: not tokenized
    assert job.raw.value is None and job.raw.original_size == len(value)


def test_rejections_keep_only_what_their_dead_letter_can_carry() -> None:
    huge = b'{"id": "x", "text": "' + b"a" * (2 << 20) + b'"}'
    [rejection] = decoder(max_kept=1000).decode([record(huge)])
    assert isinstance(rejection, Rejection) and rejection.error.code == ErrorCode.MESSAGE_TOO_LARGE
    assert rejection.raw.value == huge[:1000] and rejection.raw.original_size == len(huge)


def test_an_error_goes_to_the_readable_reply_to_when_it_is_allowed() -> None:
    mine = json.dumps({"id": "a", "text": 5, "reply_to": "embed.results.mine"}).encode()
    other = json.dumps({"id": "b", "text": 5, "reply_to": "__consumer_offsets"}).encode()
    first, second = decoder().decode([record(mine, 0), record(other, 1)])
    assert isinstance(first, Rejection) and first.reply_topic == "embed.results.mine"
    assert isinstance(second, Rejection) and second.reply_topic == "embed.results"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([("schema", b"99")], "invalid_request"),
        ([("content-type", b"application/x-unknown")], "unsupported_content_type"),
    ],
)
def test_a_record_refused_before_its_body_is_read_is_answered_when_its_id_can_be_read(
    headers: list[tuple[str, bytes]], code: str
) -> None:
    """Found by the record fuzzer: these were dead-lettered without an error result, so a
    requester whose id was readable waited for its deadline."""
    value = b'{"id": "r-9", "text": "hello", "reply_to": "embed.results.mine"}'
    [rejection] = decoder().decode([record(value, headers=headers)])
    assert isinstance(rejection, Rejection)
    assert rejection.error.request_id == "r-9" and rejection.reply_topic == "embed.results.mine"
    assert rejection.error.code.value == code


def test_an_unreadable_record_is_answered_when_its_id_can_be_read() -> None:
    raw = RawRecord(
        7,
        0,
        None,
        json.dumps({"id": "z", "text": "t", "reply_to": "embed.results.me"}).encode(),
        [(b"\xff\xfe", b"v")],
    )
    rejection = decoder().reject_unreadable(
        Unreadable(TopicPartition("embed.requests", 2), 7, 8, 0, "header name is not valid UTF-8", raw)
    )
    assert rejection.error.code == ErrorCode.INVALID_HEADERS and rejection.error.request_id == "z"
    assert rejection.reply_topic == "embed.results.me"
    assert (HEADER_DLQ_HEADERS_REPAIRED, b"1") in rejection.raw.notes
    assert rejection.source.offset == 7 and rejection.source.partition == 2


class FakeEngine:
    """Vectors from the token count; NaN for texts containing NAN (an FP16 overflow).
    ``before_batch``, when set, runs in the inference thread before each batch."""

    before_batch: Callable[[], None] | None = None

    def embed_tokenized(
        self,
        tokenized: Sequence[TokenizedText],
        texts: Sequence[str],
        dimensions: int | None = None,
        batch_size: int = 32,
        token_budget: int = 2048,
    ) -> EmbedOutput:
        if self.before_batch is not None:
            self.before_batch()
        vectors = np.array([[len(t.ids), 1.0, 0.0, 0.0] for t in tokenized], dtype=np.float32)
        vectors[[("NAN" in text) for text in texts]] = np.nan
        return EmbedOutput(vectors, [t.truncated for t in tokenized], [len(t.ids) for t in tokenized])


async def test_the_pipeline_dedups_and_never_answers_with_a_non_finite_vector() -> None:
    metrics = WorkerMetrics()
    processor = BatchProcessor(
        backend=FakeEngine(),
        cache=VectorCache(None, key_prefix="p", model_name="m", ttl_s=0, metrics=metrics),
        metrics=metrics,
        model_name="m",
        inference_batch_size=32,
        token_budget=2048,
    )
    values = [
        {"id": "a", "text": "same words here"},
        {"id": "b", "text": "same words here"},
        {"id": "c", "text": "NAN here"},
        {"id": "d", "text": " ".join(["w"] * 20)},
    ]
    jobs = decoder().decode([record(json.dumps(v).encode(), i) for i, v in enumerate(values)])
    assert all(isinstance(j, Job) for j in jobs)
    outcome = await processor.process([j for j in jobs if isinstance(j, Job)])
    processor.close()
    results = {job.request.id: decode_result(value) for job, value in outcome.results}
    assert set(results) == {"a", "b", "d"}
    assert results["a"].key == results["b"].key and results["d"].truncated
    [failure] = outcome.failures
    assert failure.error.code == ErrorCode.INFERENCE_FAILED and failure.error.request_id == "c"
    assert failure.request is not None  # its dead letter is re-encoded from the request
    assert metrics.batch_duplicates._value.get() == 1
    assert outcome.served == {"computed": 2, "deduplicated": 1}  # counted by the worker, once


def cached_pipeline(redis: FakeRedis) -> tuple[BatchProcessor, WorkerMetrics]:
    metrics = WorkerMetrics()
    cache = VectorCache(redis, key_prefix="p", model_name="m", ttl_s=60, metrics=metrics)  # type: ignore[arg-type]
    processor = BatchProcessor(
        backend=FakeEngine(),
        cache=cache,
        metrics=metrics,
        model_name="m",
        inference_batch_size=32,
        token_budget=2048,
    )
    return processor, metrics


def jobs_of(*texts: str) -> list[Job]:
    values = [json.dumps({"id": f"r{i}", "text": t}).encode() for i, t in enumerate(texts)]
    decoded = decoder().decode([record(v, i) for i, v in enumerate(values)])
    return [j for j in decoded if isinstance(j, Job)]


async def test_the_pipeline_serves_a_second_batch_from_the_cache_it_filled() -> None:
    redis = FakeRedis()
    processor, _ = cached_pipeline(redis)
    first = await processor.process(jobs_of("alpha beta", "gamma"))
    assert first.served == {"computed": 2} and len(redis.hashes) == 2
    assert set(redis.expiry.values()) == {60} and redis.indexes == {"p-m-4"}
    second = await processor.process(jobs_of("gamma", "alpha beta", "delta"))
    processor.close()
    assert second.served == {"cached": 2, "computed": 1}
    by_text = {job.request.text: decode_result(value) for job, value in second.results}
    assert by_text["gamma"].cached and not by_text["delta"].cached
    assert by_text["alpha beta"].vector == [2.0, 1.0, 0.0, 0.0]  # the stored bytes, read back


async def test_a_corrupt_cache_entry_is_recomputed_and_overwritten() -> None:
    redis = FakeRedis()
    processor, metrics = cached_pipeline(redis)
    await processor.process(jobs_of("alpha beta"))
    [name] = redis.hashes
    redis.hashes[name][b"vector"] = np.full(4, np.nan, dtype="<f4").tobytes()
    outcome = await processor.process(jobs_of("alpha beta"))
    processor.close()
    assert outcome.served == {"computed": 1} and metrics.cache_invalid._value.get() == 1
    assert np.isfinite(np.frombuffer(redis.hashes[name][b"vector"], dtype="<f4")).all()


async def test_redis_down_fails_open_and_is_retried_later() -> None:
    redis = FakeRedis()
    processor, metrics = cached_pipeline(redis)
    redis.down = True
    outcome = await processor.process(jobs_of("alpha beta", "gamma"))
    assert outcome.served == {"computed": 2} and not redis.hashes
    assert metrics.cache_up._value.get() == 0
    redis.down = False
    trips = redis.round_trips
    await processor.process(jobs_of("alpha beta"))  # within the retry pause: Redis is not asked
    processor.close()
    assert redis.round_trips == trips


async def test_a_server_refusing_scripts_gets_pipelined_lookups() -> None:
    redis = FakeRedis()
    redis.scripts = False  # scripting disabled, or an ACL without EVAL
    processor, metrics = cached_pipeline(redis)
    await processor.process(jobs_of("alpha beta"))
    outcome = await processor.process(jobs_of("alpha beta", "gamma"))
    processor.close()
    assert outcome.served == {"cached": 1, "computed": 1}
    assert metrics.cache_errors.labels("lookup")._value.get() == 0  # not counted as an outage


HEADER_NAMES = st.sampled_from(["content-type", "Content-Type", "schema", "trace", "x"])
HEADER_VALUES = st.one_of(
    st.none(),
    st.sampled_from([b"application/json", b"application/msgpack", b"1", b"2", b"\xff\xfe", b"text/plain"]),
    st.binary(max_size=8),
)


def outcome(item: Job | Rejection) -> tuple[object, ...]:
    if isinstance(item, Job):
        return ("job", item.key, item.content_type, item.raw.headers)
    return ("rejection", item.error.code, item.error.message, item.content_type, item.raw.headers)


@given(
    headers=st.lists(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4), min_size=1, max_size=6),
    order=st.lists(st.integers(0, 5), min_size=1, max_size=20),
)
def test_headers_seen_before_are_read_as_the_first_time(
    headers: list[list[tuple[str, bytes | None]]], order: list[int]
) -> None:
    """The decoder remembers the header lists it has read (worker.decoder._headers_of): a record
    whose headers it has seen decodes exactly as a fresh decoder decodes it."""
    value = json.dumps({"id": "a", "text": "one two"}).encode()
    records = [record(value, offset, headers[i % len(headers)]) for offset, i in enumerate(order)]  # type: ignore[arg-type]
    remembering = decoder()
    items = remembering.read(records)
    assert [outcome(item) for item in items] == [outcome(decoder().read([r])[0]) for r in records]
    assert len(remembering._headers_seen) <= len(headers)
