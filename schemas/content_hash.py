"""The content hash: the cache key, the Kafka key of results, and the producers' request key.

Same text + same settings => same key, in every worker and every client language.

Canonical encoding (version 1)
------------------------------
::

    key     = lowercase hex of SHA-256(payload)                      (64 characters)
    payload = TAG || field(model_fingerprint) || field(task) || field(dimensions) || field(text)
    TAG     = the 21 ASCII bytes "embedfleet-content-v1" (no length prefix, no terminator)
    field(s) = len(utf8(s)) as an 8-byte big-endian unsigned integer || utf8(s)

where

* ``model_fingerprint`` is used as given (UTF-8, no normalisation);
* ``task`` is the task name as given, or the empty string when there is none
  (so ``None`` and ``""`` hash alike: both mean "no prompt");
* ``dimensions`` is the decimal ASCII form of the integer with no sign, no leading
  zeros and no spaces (``"128"``), or the empty string when there is none;
* ``text`` is the text after Unicode Normalization Form C and nothing else: no
  stripping, no case folding, no NFKC. Workers embed the text as it was sent, so two
  texts that differ only in their NFC form share a key (and the first one's vector);
  the model's tokenizer normalises Unicode itself (BERT's: NFD, accents stripped), so
  for the default model their vectors are the same anyway.

A request with ``long`` set to ``pool`` or ``chunks`` (issue 24) appends one more field::

    payload = ... || field(text) || field(long_spec)

where ``long_spec`` is the ASCII text ``<mode>:<overlap>`` (``"pool:32"``: the overlap the
worker uses, the default written out; ``schemas.messages.long_inputs_spec``). A ``truncate``
request (the default) appends nothing, so its key is the key of version 1. The windows of a long
text are keyed as plain texts (the window's text, no ``long_spec``): a window shared by two
documents, or by a document and a plain request, is computed once.

The length prefixes make the framing unambiguous (``("ab", "c")`` and ``("a", "bc")``
differ). Text containing lone surrogates has no UTF-8 form: the codec rejects it and
``content_hash`` raises ``ValueError``.

Unicode version: NFC is stable for assigned characters, but a character unassigned in
one implementation's Unicode tables and assigned in another's may normalise differently.
Python 3.11 ships Unicode 14.0; golang.org/x/text v0.44 ships 15.0 and 17.0. Keys agree for
text whose characters are all assigned in Unicode 14.0 (the test vectors hold only
such text). A disagreement elsewhere costs a cache miss, never a wrong vector, because
each key is computed over the very text that is embedded.

``model_fingerprint`` must change whenever anything but task/dimensions changes the
vector (weights, pooling, normalisation, max tokens, quantization, prompt prefixes).
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Any, Final

CONTENT_HASH_TAG: Final = b"embedfleet-content-v1"
LENGTH_PREFIX_BYTES: Final = 8


def canonical_text(text: str) -> str:
    """The text as hashed: Unicode NFC, nothing else."""
    return unicodedata.normalize("NFC", text)


def _utf8(value: str, field: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} has no UTF-8 form (lone surrogate?): {exc.reason}") from None


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(LENGTH_PREFIX_BYTES, "big") + data


def content_hash_payload(
    text: str,
    *,
    model_fingerprint: str,
    task: str | None,
    dimensions: int | None,
    long_spec: str | None = None,
) -> bytes:
    """The exact bytes that ``content_hash`` feeds to SHA-256 (useful to debug other clients)."""
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise ValueError(f"dimensions must be a positive int or None, got {dimensions!r}")
    return b"".join(
        (
            CONTENT_HASH_TAG,
            _field(_utf8(model_fingerprint, "model_fingerprint")),
            _field(_utf8(task or "", "task")),
            _field(b"" if dimensions is None else str(dimensions).encode("ascii")),
            _field(_utf8(canonical_text(text), "text")),
            b"" if long_spec is None else _field(long_spec.encode("ascii")),
        )
    )


def content_hash(
    text: str,
    *,
    model_fingerprint: str,
    task: str | None,
    dimensions: int | None,
    long_spec: str | None = None,
) -> str:
    """SHA-256 hex of the canonical encoding described in this module's docstring."""
    payload = content_hash_payload(
        text, model_fingerprint=model_fingerprint, task=task, dimensions=dimensions, long_spec=long_spec
    )
    return hashlib.sha256(payload).hexdigest()


class ContentHasher:
    """``content_hash`` for one model fingerprint, faster: the fixed part of the payload (tag,
    fingerprint, task, dimensions) is hashed once per (task, dimensions) and the hash state copied
    for each text. The same hashes (tests/schemas check it over arbitrary inputs)."""

    MAX_PREFIXES: Final = 256  # (task, dimensions) pairs kept; a worker allows a handful

    def __init__(self, model_fingerprint: str) -> None:
        self._fingerprint = model_fingerprint
        self._prefixes: dict[tuple[str | None, int | None], Any] = {}

    def __call__(
        self, text: str, *, task: str | None, dimensions: int | None, long_spec: str | None = None
    ) -> str:
        prefix = self._prefixes.get((task, dimensions))
        if prefix is None:
            fixed = content_hash_payload(
                "", model_fingerprint=self._fingerprint, task=task, dimensions=dimensions
            )
            # The payload of an empty text ends with its length field (8 zero bytes): drop it.
            prefix = hashlib.sha256(fixed[:-LENGTH_PREFIX_BYTES])
            if len(self._prefixes) < self.MAX_PREFIXES:
                self._prefixes[(task, dimensions)] = prefix
        digest = prefix.copy()
        data = _utf8(canonical_text(text), "text")
        digest.update(len(data).to_bytes(LENGTH_PREFIX_BYTES, "big"))
        digest.update(data)
        if long_spec is not None:
            spec = long_spec.encode("ascii")
            digest.update(len(spec).to_bytes(LENGTH_PREFIX_BYTES, "big"))
            digest.update(spec)
        return digest.hexdigest()
