"""Content hashes, partition keys and the per-call dedup plan (no services)."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import pytest

from producer.client import long_options
from producer.keys import local_problem, partition_key, plan_requests
from schemas import content_hash, long_inputs_spec

TESTDATA = Path(__file__).resolve().parents[2] / "schemas" / "testdata" / "content_hash.json"


def test_keys_match_the_contract_test_vectors() -> None:
    vectors = json.loads(TESTDATA.read_text(encoding="utf-8"))["vectors"]
    checked = 0
    for vector in vectors:
        if not vector["text"].strip() or not vector["model_fingerprint"]:
            continue  # such texts are never sent; an empty fingerprint means "no fingerprint"
        plan = plan_requests(
            [vector["text"]],
            fingerprint=vector["model_fingerprint"],
            task=vector["task"],
            dimensions=vector["dimensions"],
        )
        assert plan.keyed_by_content_hash
        assert [d.key for d in plan.distinct] == [vector["key"]], vector["name"]
        checked += 1
    assert checked >= 10


def test_long_input_keys_match_the_contract_long_vectors() -> None:
    """A pool or chunks request appends the long spec to its key (issue 24), as the workers do."""
    vectors = json.loads(TESTDATA.read_text(encoding="utf-8"))["long_vectors"]
    assert vectors
    for vector in vectors:
        mode, _, overlap = vector["long_spec"].partition(":")
        long, checked_overlap = long_options(mode, int(overlap))
        spec = long_inputs_spec(long, checked_overlap)
        assert spec == vector["long_spec"]
        plan = plan_requests(
            [vector["text"]],
            fingerprint=vector["model_fingerprint"],
            task=vector["task"],
            dimensions=vector["dimensions"],
            long_spec=spec,
        )
        assert [d.key for d in plan.distinct] == [vector["key"]], vector["name"]


@pytest.mark.parametrize(
    ("long", "overlap", "spec"),
    [
        ("truncate", None, None),
        ("truncate", 64, None),  # truncate has no windows: the overlap is dropped, the key is v1's
        ("pool", None, "pool:32"),  # the default overlap written out
        ("pool", 32, "pool:32"),
        ("pool", 0, "pool:0"),
        ("chunks", None, "chunks:32"),
        ("chunks", 100, "chunks:100"),
    ],
)
def test_pool_and_chunks_keys_are_the_content_hash_with_the_long_spec(
    long: str, overlap: int | None, spec: str | None
) -> None:
    checked, checked_overlap = long_options(long, overlap)
    assert long_inputs_spec(checked, checked_overlap) == spec
    plan = plan_requests(["a long text", "x"], fingerprint="fp", task="query", dimensions=128, long_spec=spec)
    expected = content_hash(
        "a long text", model_fingerprint="fp", task="query", dimensions=128, long_spec=spec
    )
    assert plan.distinct[0].key == expected
    plain = content_hash("a long text", model_fingerprint="fp", task="query", dimensions=128)
    assert (plan.distinct[0].key == plain) == (spec is None)


def test_each_long_mode_and_overlap_is_a_key_of_its_own() -> None:
    keys = {
        plan_requests(["x"], fingerprint="fp", task=None, dimensions=None, long_spec=spec).distinct[0].key
        for spec in (None, "pool:32", "pool:0", "chunks:32", "chunks:0")
    }
    assert len(keys) == 5
    # Without a fingerprint the key only spreads texts over partitions: one call has one mode.
    plan = plan_requests(["x"], fingerprint=None, task=None, dimensions=None, long_spec="pool:32")
    assert plan.distinct[0].key == partition_key("x")


@pytest.mark.parametrize(
    ("long", "overlap", "match"),
    [
        ("summarise", None, "long must be one of"),
        ("pool", 257, "overlap"),
        ("pool", -1, "overlap"),
        ("chunks", True, "overlap"),
    ],
)
def test_long_options_no_worker_accepts_raise(long: str, overlap: int | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        long_options(long, overlap)


def test_partition_key_is_sha256_of_the_nfc_text() -> None:
    decomposed = "Cafe\u0301"
    assert partition_key(decomposed) == hashlib.sha256("Café".encode()).hexdigest()
    assert partition_key(decomposed) == partition_key(unicodedata.normalize("NFC", decomposed))


def test_without_a_fingerprint_requests_are_keyed_for_partitioning_only() -> None:
    plan = plan_requests(["a", "b"], fingerprint=None, task="query", dimensions=None)
    assert not plan.keyed_by_content_hash
    assert [d.key for d in plan.distinct] == [partition_key("a"), partition_key("b")]


def test_identical_and_canonically_equal_texts_make_one_request() -> None:
    texts = ["x", "Cafe\u0301", "y", "x", "Café"]
    plan = plan_requests(texts, fingerprint="fp", task=None, dimensions=None)
    assert [d.indices for d in plan.distinct] == [[0, 3], [1, 4], [2]]
    assert plan.distinct[0].key == content_hash("x", model_fingerprint="fp", task=None, dimensions=None)


def test_task_and_dimensions_change_the_key() -> None:
    keys = {
        plan_requests(["x"], fingerprint="fp", task=task, dimensions=dims).distinct[0].key
        for task, dims in [(None, None), ("query", None), (None, 128), ("query", 128)]
    }
    assert len(keys) == 4


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "empty_text"),
        ("  \n\t", "empty_text"),
        ("\ud800", "invalid_encoding"),
        ("x" * (64 * 1024 + 1), "text_too_long"),
    ],
)
def test_texts_no_worker_accepts_fail_locally(text: str, code: str) -> None:
    problem = local_problem(text)
    assert problem is not None and problem[0] == code
    plan = plan_requests(["ok", text], fingerprint="fp", task=None, dimensions=None)
    assert [(f.index, f.code) for f in plan.failures] == [(1, code)]
    assert [d.indices for d in plan.distinct] == [[0]]


def test_non_string_texts_fail_locally() -> None:
    plan = plan_requests(["ok", 3], fingerprint="fp", task=None, dimensions=None)  # type: ignore[list-item]
    assert [(f.index, f.code) for f in plan.failures] == [(1, "invalid_request")]


def test_bad_dimensions_raise() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        plan_requests(["x"], fingerprint="fp", task=None, dimensions=0)
