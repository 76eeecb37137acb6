"""Content hashes, partition keys and the per-call dedup plan (no services)."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import pytest

from producer.keys import local_problem, partition_key, plan_requests
from schemas import content_hash

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
