"""Which texts become which requests: content hashes, partition keys, and dedup within one call.

With the model fingerprint (from Redis or the config) a request is keyed by the content hash, the
same key the workers use, so identical texts land on one partition and the cache can be read first.
Without it the client cannot compute content hashes: it keys by sha256(NFC text) only to keep
identical texts on one partition, and skips the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from producer.errors import TextFailure
from schemas import DEFAULT_REQUEST_LIMITS, RequestLimits, canonical_text, content_hash


def partition_key(text: str) -> str:
    """The key used when no fingerprint is known: SHA-256 hex of the NFC text's UTF-8."""
    return hashlib.sha256(canonical_text(text).encode("utf-8")).hexdigest()


def local_problem(text: str, limits: RequestLimits = DEFAULT_REQUEST_LIMITS) -> tuple[str, str] | None:
    """(code, message) when a worker would surely reject the text; None when it may be sent.

    Checked here so a hopeless text costs no round trip and no dead-letter record.
    """
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "invalid_encoding", "text is not valid Unicode (lone surrogate)"
    if not text.strip():
        return "empty_text", "text is empty or only whitespace"
    if size > limits.max_text_bytes:
        return "text_too_long", f"text is {size} UTF-8 bytes; the limit is {limits.max_text_bytes}"
    return None


@dataclass(slots=True)
class Distinct:
    """One distinct text of a call: its key and every index it appears at."""

    key: str
    text: str
    indices: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Plan:
    distinct: list[Distinct]
    failures: list[TextFailure]
    # True when `key` is the content hash (the cache can be read), False for partition keys.
    keyed_by_content_hash: bool


def plan_requests(
    texts: Sequence[str],
    *,
    fingerprint: str | None,
    task: str | None,
    dimensions: int | None,
    limits: RequestLimits = DEFAULT_REQUEST_LIMITS,
    long_spec: str | None = None,
) -> Plan:
    """Group texts by key (one request per distinct key) and set aside texts that cannot be sent.

    ``long_spec``: what a request with ``long`` pool or chunks adds to the content hash
    (``schemas.long_inputs_spec``; None for truncate, whose keys are those of plain requests).
    Partition keys (no fingerprint) do not depend on it: one call has one ``long``."""
    by_key: dict[str, Distinct] = {}
    failures: list[TextFailure] = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            problem_type = f"text must be str, not {type(text).__name__}"
            failures.append(TextFailure(index, "invalid_request", problem_type))
            continue
        problem = local_problem(text, limits)
        if problem is not None:
            failures.append(TextFailure(index, *problem))
            continue
        if fingerprint:
            key = content_hash(
                text, model_fingerprint=fingerprint, task=task, dimensions=dimensions, long_spec=long_spec
            )
        else:
            key = partition_key(text)
        entry = by_key.get(key)
        if entry is None:
            entry = by_key[key] = Distinct(key, text)
        entry.indices.append(index)
    return Plan(list(by_key.values()), failures, bool(fingerprint))
