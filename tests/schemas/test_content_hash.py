"""Content hash: committed vectors reproduce, NFC equivalence, framing, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest

from schemas import content_hash, content_hash_payload
from schemas.testdata.generate import CONTENT_HASH_FILE, content_hash_vectors

FP = "fingerprint"


def test_committed_vectors_reproduce() -> None:
    committed = json.loads(CONTENT_HASH_FILE.read_text(encoding="utf-8"))
    assert len(committed["vectors"]) >= 20
    for vector in committed["vectors"]:
        kwargs = {
            "model_fingerprint": vector["model_fingerprint"],
            "task": vector["task"],
            "dimensions": vector["dimensions"],
        }
        payload = content_hash_payload(vector["text"], **kwargs)
        assert payload.hex() == vector["payload_hex"], vector["name"]
        assert content_hash(vector["text"], **kwargs) == vector["key"], vector["name"]
        assert hashlib.sha256(payload).hexdigest() == vector["key"]


def test_committed_file_is_what_the_generator_writes() -> None:
    assert json.loads(CONTENT_HASH_FILE.read_text(encoding="utf-8")) == content_hash_vectors()


def test_payload_layout() -> None:
    payload = content_hash_payload("é", model_fingerprint="m", task=None, dimensions=64)
    assert payload == (
        b"embedfleet-content-v1"
        + (1).to_bytes(8, "big")
        + b"m"
        + (0).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + b"64"
        + (2).to_bytes(8, "big")
        + "é".encode()
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [("e\u0301", "\u00e9"), ("\u212b", "\u00c5"), ("a\u0323\u0307", "a\u0307\u0323")],
)
def test_nfc_equivalent_texts_share_a_key(first: str, second: str) -> None:
    assert first != second
    key = content_hash(first, model_fingerprint=FP, task=None, dimensions=None)
    assert key == content_hash(second, model_fingerprint=FP, task=None, dimensions=None)


def test_settings_change_the_key() -> None:
    keys = {
        content_hash("x", model_fingerprint=FP, task=None, dimensions=None),
        content_hash("x", model_fingerprint=FP, task="query", dimensions=None),
        content_hash("x", model_fingerprint=FP, task=None, dimensions=128),
        content_hash("x", model_fingerprint="other", task=None, dimensions=None),
        content_hash(" x", model_fingerprint=FP, task=None, dimensions=None),
        content_hash("\uff58", model_fingerprint=FP, task=None, dimensions=None),  # not NFKC
    }
    assert len(keys) == 6
    assert content_hash("x", model_fingerprint=FP, task="", dimensions=None) == content_hash(
        "x", model_fingerprint=FP, task=None, dimensions=None
    )


def test_length_prefixes_frame_fields() -> None:
    assert content_hash("x", model_fingerprint="ab", task="c", dimensions=None) != content_hash(
        "x", model_fingerprint="a", task="bc", dimensions=None
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"text": "\ud800", "model_fingerprint": FP, "task": None, "dimensions": None},
        {"text": "x", "model_fingerprint": "\udc00", "task": None, "dimensions": None},
        {"text": "x", "model_fingerprint": FP, "task": "\ud800", "dimensions": None},
        {"text": "x", "model_fingerprint": FP, "task": None, "dimensions": 0},
        {"text": "x", "model_fingerprint": FP, "task": None, "dimensions": True},
    ],
)
def test_bad_input_raises_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        content_hash(**kwargs)  # type: ignore[arg-type]
