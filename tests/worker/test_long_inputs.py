"""Long inputs (issue 24) against the real stack: a text longer than the model reads, in each
mode; windows cached and shared as plain texts; the bound on windows per text.

The expected vectors are computed here with the same bundle and variant as the workers (INT8 on
the CPU provider is exactly batch-invariant), so a pooled vector is checked against the
token-weighted mean of its windows' vectors, not against itself.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from schemas import content_hash, decode_vector_b64, long_inputs_spec
from tests.fleet import Fleet, FleetIO, running_fleet
from tests.helpers import read_jsonl_texts
from worker.engine.embedder import Embedder
from worker.pipeline import pool_windows

MAX_WINDOWS = 30  # the module's fleet: a ~5,000-token text needs ~23 windows, a ~9,000 one ~41


@pytest.fixture(scope="module")
async def long_fleet(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    log_dir = tmp_path_factory.mktemp("long-inputs-logs")
    async with running_fleet(
        kafka_bootstrap, redis_url, model_dir, log_dir, workers=2, EMBEDFLEET_MAX_WINDOWS=str(MAX_WINDOWS)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Embedder:
    return Embedder.from_bundle(model_dir, intra_op_threads=1)  # the workers' variant (int8)


def long_text(shared_dir: Path, tokens: int, engine: Embedder, salt: str) -> str:
    """Corpus docs joined until the text holds about ``tokens`` tokens (salted: never cached)."""
    tokenizer = Tokenizer.from_file(str(engine.bundle.tokenizer_path))
    parts, count = [f"({salt})"], 0
    for doc in read_jsonl_texts(shared_dir / "corpus" / "docs.jsonl"):
        parts.append(doc)
        count += len(tokenizer.encode(doc, add_special_tokens=False).ids)
        if count >= tokens:
            return " ".join(parts)
    raise AssertionError("the corpus is shorter than asked")


def expected_windows(
    engine: Embedder, text: str, overlap: int = 32
) -> tuple[list[str], np.ndarray, np.ndarray]:
    spans = engine.windows(text, None, overlap)
    texts = [text[s.start : s.end] for s in spans]
    output = engine.embed(texts)
    return texts, output.vectors, np.asarray(output.token_counts, dtype=np.float64)


async def test_a_5000_token_text_in_each_mode(long_fleet: Fleet, shared_dir: Path, engine: Embedder) -> None:
    text = long_text(shared_dir, 5000, engine, "each-mode")
    window_texts, window_vectors, weights = expected_windows(engine, text)
    assert len(window_texts) >= 20
    pooled = pool_windows(list(window_vectors), weights)
    truncated_vector = engine.embed([text]).vectors[0]
    async with FleetIO(long_fleet) as io:
        ids = {
            "truncate": (await io.send_texts([text]))[0],
            "pool": (await io.send_texts([text], long="pool"))[0],
            "chunks": (await io.send_texts([text], long="chunks", encoding_format="base64"))[0],
        }
        results = await io.wait_for(ids.values(), timeout_s=240)
        assert all(len(io.results[i]) == 1 for i in ids.values()), "one result per request"

    cut = results[ids["truncate"]]
    assert cut.get("error") is None and cut["truncated"] is True and cut["tokens"] == 256
    assert "windows" not in cut and "chunks" not in cut
    np.testing.assert_allclose(np.asarray(cut["vector"], dtype=np.float32), truncated_vector, atol=1e-6)

    pool = results[ids["pool"]]
    assert pool.get("error") is None and pool.get("truncated", False) is False
    assert pool["windows"] == len(window_texts) and pool["tokens"] == int(weights.sum()) > 5000
    fingerprint = engine.model_fingerprint
    assert pool["key"] == content_hash(
        text,
        model_fingerprint=fingerprint,
        task=None,
        dimensions=None,
        long_spec=long_inputs_spec("pool", None),
    )
    pool_vector = np.asarray(pool["vector"], dtype=np.float32)
    np.testing.assert_allclose(pool_vector, pooled, atol=1e-6)
    assert abs(float(np.linalg.norm(pool_vector)) - 1.0) < 1e-5
    # Past the model's limit the pooled vector reads what the truncated one never saw.
    assert float(pool_vector @ truncated_vector) < 0.99

    chunks = results[ids["chunks"]]
    assert chunks["windows"] == len(window_texts) == len(chunks["chunks"])
    assert chunks["key"] not in (pool["key"], cut["key"])
    spans = [(c["start"], c["end"]) for c in chunks["chunks"]]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[0] < b[0] < a[1] <= b[1] for a, b in itertools.pairwise(spans)), "overlapping, in order"
    assert [text[s:e] for s, e in spans] == window_texts
    for chunk, vector, tokens in zip(chunks["chunks"], window_vectors, weights, strict=True):
        assert chunk["tokens"] == int(tokens)
        np.testing.assert_allclose(decode_vector_b64(chunk["vector_b64"]), vector, atol=1e-6)
    np.testing.assert_allclose(decode_vector_b64(chunks["vector_b64"]), pooled, atol=1e-6)


async def test_windows_are_cached_as_plain_texts_and_shared_between_documents(
    long_fleet: Fleet, shared_dir: Path, engine: Embedder
) -> None:
    """A second document that starts as the first recomputes only the windows that differ; a
    window's text sent alone is a cache hit."""
    first = long_text(shared_dir, 1500, engine, "shared")
    second = first + " " + long_text(shared_dir, 600, engine, "tail")
    first_windows = set(expected_windows(engine, first)[0])
    second_windows = expected_windows(engine, second)[0]
    new_windows = [w for w in second_windows if w not in first_windows]
    assert 0 < len(new_windows) < len(second_windows), "the documents share their first windows"

    async with FleetIO(long_fleet) as io:
        [first_id] = await io.send_texts([first], long="pool")
        await io.wait_for([first_id], timeout_s=120)
        computed_before = long_fleet.metric("embedfleet_computed_texts_total")
        [second_id] = await io.send_texts([second], long="pool")
        second_result = (await io.wait_for([second_id], timeout_s=120))[second_id]
        computed = long_fleet.metric("embedfleet_computed_texts_total") - computed_before
        [plain_id] = await io.send_texts([second_windows[0]])
        plain = (await io.wait_for([plain_id]))[plain_id]
    assert second_result.get("error") is None and second_result["windows"] == len(second_windows)
    assert computed == len(new_windows), f"computed {computed} texts, {len(new_windows)} windows were new"
    assert plain["cached"] is True and plain.get("truncated", False) is False


async def test_a_text_past_the_window_bound_is_refused_with_the_numbers(
    long_fleet: Fleet, shared_dir: Path, engine: Embedder
) -> None:
    text = long_text(shared_dir, 9500, engine, "bound")
    needed = len(engine.windows(text, None, 32))
    assert needed > MAX_WINDOWS
    async with FleetIO(long_fleet) as io:
        [too_long, fits] = [
            (await io.send_texts([text], long="pool"))[0],
            (await io.send_texts([text[: len(text) // 4]], long="pool"))[0],
        ]
        results = await io.wait_for([too_long, fits], timeout_s=120)
        await io.wait_for_dead_letters(1)
    error = results[too_long]["error"]
    assert error["code"] == "text_too_long"
    assert f"{needed} windows" in error["message"] and str(MAX_WINDOWS) in error["message"]
    assert results[fits].get("error") is None and results[fits]["windows"] >= 2
    codes = [headers.get("dlq-error-code") for _, headers in io.dead_letters]
    assert codes == [b"text_too_long"]
