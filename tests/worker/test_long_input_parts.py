"""Long inputs (issue 24) without services: the decoder's windows and bound, the pipeline's
pooling and chunks (fake model: one token per word, 8 per text), and the real tokenizer's windows
over arbitrary texts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import ErrorCode, content_hash, decode_result, long_inputs_spec
from tests.worker.test_decoder_and_pipeline import MODEL, FakeEngine, decoder, record
from worker.cache import VectorCache
from worker.engine.tokenize import TextTokenizer
from worker.jobs import Job, Rejection
from worker.metrics import WorkerMetrics
from worker.pipeline import BatchProcessor, pool_windows


def decoded(value: dict[str, object], max_windows: int = 64) -> Job | Rejection:
    [item] = decoder(max_windows=max_windows).decode([record(json.dumps(value).encode())])
    return item


def words(count: int, salt: str = "w") -> str:
    return " ".join(f"{salt}{i}" for i in range(count))


def processor() -> tuple[BatchProcessor, WorkerMetrics]:
    metrics = WorkerMetrics()
    cache = VectorCache(None, key_prefix="p", model_name="m", ttl_s=0, metrics=metrics)
    return (
        BatchProcessor(
            backend=FakeEngine(),
            cache=cache,
            metrics=metrics,
            model_name="m",
            inference_batch_size=32,
            token_budget=2048,
        ),
        metrics,
    )


def test_a_long_request_gets_windows_keyed_as_plain_texts_and_its_own_key() -> None:
    text = words(20)
    job = decoded({"id": "a", "text": text, "long": "pool", "overlap": 1})
    assert isinstance(job, Job) and job.windows is not None
    spans = [(w.start, w.end) for w in job.windows]
    expected = [" ".join(text.split()[a:b]) for a, b in ((0, 6), (5, 11), (10, 16), (15, 20))]
    assert [text[s:e] for s, e in spans] == expected
    for window in job.windows:
        plain = content_hash(
            text[window.start : window.end], model_fingerprint=MODEL.fingerprint, task=None, dimensions=None
        )
        assert window.key == plain
    assert job.key == content_hash(
        text,
        model_fingerprint=MODEL.fingerprint,
        task=None,
        dimensions=None,
        long_spec=long_inputs_spec("pool", 1),
    )
    assert job.batch_tokens == 6 + 6 + 6 + 5
    # The same text, truncated: the old key, no windows.
    plain_job = decoded({"id": "b", "text": text})
    assert isinstance(plain_job, Job) and plain_job.windows is None and plain_job.key != job.key


def test_a_short_text_is_one_window_the_whole_text() -> None:
    job = decoded({"id": "a", "text": "three short words", "long": "chunks"})
    assert isinstance(job, Job) and job.windows is not None and len(job.windows) == 1
    [window] = job.windows
    assert (window.start, window.end) == (0, len("three short words"))
    assert window.key == content_hash(
        "three short words", model_fingerprint=MODEL.fingerprint, task=None, dimensions=None
    )


def test_past_the_window_bound_the_request_is_refused_with_the_numbers() -> None:
    refused = decoded({"id": "a", "text": words(40), "long": "pool", "overlap": 0}, max_windows=5)
    assert isinstance(refused, Rejection) and refused.error.code == ErrorCode.TEXT_TOO_LONG
    assert "7 windows" in refused.error.message and "at most 5" in refused.error.message
    assert refused.error.request_id == "a" and refused.request is not None
    fits = decoded({"id": "b", "text": words(30), "long": "pool", "overlap": 0}, max_windows=5)
    assert isinstance(fits, Job) and fits.windows is not None and len(fits.windows) == 5


def test_an_overlap_the_models_window_cannot_take_is_an_invalid_request() -> None:
    refused = decoded({"id": "a", "text": words(20), "long": "pool", "overlap": 2})
    assert isinstance(refused, Rejection) and refused.error.code == ErrorCode.INVALID_REQUEST


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.sampled_from(["pool", "chunks"]), st.integers(0, 1)),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
async def test_pool_and_chunks_are_the_token_weighted_windows(
    requests: list[tuple[int, str, int]], base64: bool
) -> None:
    pipeline, metrics = processor()
    try:
        values = [
            {
                "id": f"r{i}",
                "text": words(count, salt=f"s{i % 2}-"),  # two salts: windows repeat across requests
                "long": mode,
                "overlap": overlap,
                "encoding_format": "base64" if base64 else "float",
            }
            for i, (count, mode, overlap) in enumerate(requests)
        ]
        jobs = decoder().decode([record(json.dumps(v).encode(), i) for i, v in enumerate(values)])
        assert all(isinstance(j, Job) for j in jobs)
        outcome = await pipeline.process([j for j in jobs if isinstance(j, Job)])
    finally:
        pipeline.close()
    assert not outcome.failures and len(outcome.results) == len(values)
    for job, value in outcome.results:
        result = decode_result(value)
        windows = job.windows or ()
        # FakeEngine's vector of a text of n tokens is (n, 1, 0, 0).
        expected = pool_windows(
            [np.array([len(w.tokens.ids), 1, 0, 0], dtype=np.float32) for w in windows],
            np.array([len(w.tokens.ids) for w in windows], dtype=np.float64),
        )
        np.testing.assert_allclose(result.vector_array(), expected, atol=1e-6)
        assert result.windows == len(windows) and result.tokens == sum(len(w.tokens.ids) for w in windows)
        assert result.truncated is False and result.key == job.key
        if job.request.long == "chunks":
            assert result.chunks is not None and len(result.chunks) == len(windows)
            assert [(c.start, c.end, c.tokens) for c in result.chunks] == [
                (w.start, w.end, len(w.tokens.ids)) for w in windows
            ]
            assert all((c.vector_b64 is not None) == base64 for c in result.chunks)
        else:
            assert result.chunks is None
    assert metrics.windows._value.get() == sum(len(j.windows or ()) for j in jobs if isinstance(j, Job))


async def test_one_failed_window_fails_its_request_only() -> None:
    pipeline, _ = processor()
    try:
        values = [
            {"id": "bad", "text": words(10) + " NAN " + words(10, "x"), "long": "pool"},
            {"id": "good", "text": words(10, "y"), "long": "pool", "overlap": 1},
        ]
        jobs = [
            j for j in decoder().decode([record(json.dumps(v).encode(), i) for i, v in enumerate(values)])
        ]
        outcome = await pipeline.process([j for j in jobs if isinstance(j, Job)])
    finally:
        pipeline.close()
    [failure] = outcome.failures
    assert failure.error.request_id == "bad" and failure.error.code == ErrorCode.INFERENCE_FAILED
    assert [job.request.id for job, _ in outcome.results] == ["good"]


# --- the real tokenizer ------------------------------------------------------------------------

# Words of at most 8 characters: none is longer than half a window (13 tokens here), so every
# window ends at a word boundary and re-tokenizes, alone, to the tokens it had in the text.
WORD = st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=8)
SEPARATOR = st.sampled_from([" ", "  ", "\n", ", ", " - "])


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_file(model_dir / "tokenizer.json", 32)  # a small window: many windows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(WORD, SEPARATOR), min_size=1, max_size=120), st.integers(0, 6), st.integers(0, 4))
def test_windows_cover_the_text_in_order_and_each_is_read_whole(
    tokenizer: TextTokenizer, pieces: list[tuple[str, str]], overlap: int, reserved: int
) -> None:
    text = "".join(word + separator for word, separator in pieces).strip() or "x"
    spans = tokenizer.windows(text, overlap=overlap, reserved=reserved)
    assert spans[0].start == 0 and spans[-1].end == len(text)
    for before, after in itertools.pairwise(spans):
        assert before.start < after.start and before.end < after.end
        # no text is skipped between two windows (whitespace aside)
        assert after.start <= before.end or not text[before.end : after.start].strip()
    room = tokenizer.max_tokens - tokenizer.special_tokens - reserved
    for span in spans:
        # Read whole, with room for a prompt of ``reserved`` tokens.
        assert tokenizer.content_tokens(text[span.start : span.end]) <= room
    # Consecutive windows share about ``overlap`` tokens: never more than overlap + a word.
    whole = tokenizer.content_tokens(text)
    assert sum(tokenizer.content_tokens(text[s.start : s.end]) for s in spans) <= whole + (len(spans) - 1) * (
        overlap + 13
    )
    if whole <= tokenizer.max_tokens - tokenizer.special_tokens - reserved:
        assert len(spans) == 1
