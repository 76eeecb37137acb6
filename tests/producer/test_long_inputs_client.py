"""Long inputs (issue 24) against the real stack: a live `embedfleet gateway` in front of a live
worker that speaks long inputs, asked with the official ``openai`` SDK (``extra_body``).

A text of about 5,000 tokens (corpus documents joined) is pooled over windows when asked
(``long: pool``: every token read, nothing cut) and cut at the model's limit otherwise, and the
gateway says which in its headers: truncation is never silent.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from producer.gateway.openai_api import TOKENS_READ_HEADER, TRUNCATED_HEADER
from tests.fleet import Fleet, GatewayProcess, running_fleet
from worker.engine.quality import read_jsonl_strings

pytestmark = pytest.mark.stack

MODEL = "all-MiniLM-L6-v2"
API_KEY = "sk-test-" + uuid.uuid4().hex
REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = Path(os.environ.get("EMBEDFLEET_SHARED", REPO_ROOT.parent / "shared")) / "corpus" / "docs.jsonl"
# About 5,000 tokens of English prose and code (~3.6 characters a word piece): ~23 windows of
# the model's 256 tokens, well under the worker's EMBEDFLEET_MAX_WINDOWS (64) and its 64 KiB.
LONG_TEXT_CHARS = 18_000
MODEL_MAX_TOKENS = 256


def long_text() -> str:
    """Corpus documents joined until the text is about 5,000 tokens long."""
    if not DOCS.exists():
        pytest.skip(f"no corpus at {DOCS}; set EMBEDFLEET_SHARED")
    parts: list[str] = []
    size = 0
    for doc in read_jsonl_strings(DOCS):
        if not doc.strip():
            continue
        parts.append(doc.strip())
        size += len(doc) + 2
        if size >= LONG_TEXT_CHARS:
            break
    text = "\n\n".join(parts)
    assert len(text) >= LONG_TEXT_CHARS // 2, "the corpus is too short for a long text"
    assert len(text.encode("utf-8")) < 60 * 1024  # under the texts' 64 KiB bound
    return text


@pytest.fixture(scope="module")
async def fleet(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    log_dir = tmp_path_factory.mktemp("long-inputs-logs")
    async with running_fleet(kafka_bootstrap, redis_url, model_dir, log_dir, workers=1) as running:
        yield running


@pytest.fixture(scope="module")
async def gateway(fleet: Fleet) -> GatewayProcess:
    started = fleet.start_gateway(env={"EMBEDFLEET_GATEWAY_API_KEYS": API_KEY})
    await started.wait_ready()
    return started


@pytest.fixture(scope="module")
def sdk(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield client
    client.close()


def test_a_long_text_is_pooled_when_asked_and_cut_otherwise_and_the_headers_say_which(
    sdk: openai.OpenAI,
) -> None:
    text = long_text()

    # (a) long: pool: every window read, none cut.
    pooled = sdk.embeddings.with_raw_response.create(
        model=MODEL, input=text, encoding_format="float", extra_body={"long": "pool"}
    )
    assert pooled.http_response.status_code == 200
    pooled_tokens = int(pooled.headers[TOKENS_READ_HEADER])
    assert pooled_tokens > MODEL_MAX_TOKENS, pooled.headers
    assert pooled.headers[TRUNCATED_HEADER] == "0", pooled.headers
    pooled_body = pooled.parse()
    assert len(pooled_body.data) == 1
    vector = np.asarray(pooled_body.data[0].embedding, dtype=np.float64)
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1.0) < 1e-3  # re-normalised
    assert pooled_body.usage.prompt_tokens == pooled_tokens

    # (b) long: truncate (the default, said explicitly): cut at the model's limit, and said so.
    cut = sdk.embeddings.with_raw_response.create(
        model=MODEL, input=text, encoding_format="float", extra_body={"long": "truncate"}
    )
    assert cut.http_response.status_code == 200
    assert cut.headers[TRUNCATED_HEADER] == "1", cut.headers
    cut_tokens = int(cut.headers[TOKENS_READ_HEADER])
    assert 0 < cut_tokens <= MODEL_MAX_TOKENS < pooled_tokens
    # Another key and another vector than the pooled one.
    cut_vector = np.asarray(cut.parse().data[0].embedding, dtype=np.float64)
    assert not np.allclose(cut_vector, vector)
