"""The hit lane: cache hits answered right after decoding, beside the batches.

A fetch's requests are looked up in the cache in one round trip (worker.cache), before anything
is tokenized or batched; every request whose entry can answer it is published at once
(worker.runtime), so a hit never waits for the batch window, the tokenizer or the model, and
only the misses go on to the batcher. An entry answers a request by itself when its token count
says the text was not cut: fewer tokens than the model reads means nothing was truncated. An entry
without a count, or with exactly the model's maximum (cut, or a text of exactly that length),
goes the batch path instead, which tokenizes it and then serves it from the cache as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import numpy as np
from numpy.typing import NDArray

from schemas import ContentType, EncodingFormat, encode_success_result, encode_vector
from schemas.cache_layout import CacheEntry
from worker.jobs import Answer, Job
from worker.metrics import WorkerMetrics


class EntryCache(Protocol):
    """What the lane asks of the cache (worker.cache.VectorCache)."""

    @property
    def enabled(self) -> bool: ...
    async def lookup_entries(
        self, keys: Sequence[tuple[str, int]], *, count_lookups: bool = True, count_hits: bool = True
    ) -> list[CacheEntry | None]: ...


@dataclass(slots=True)
class Split:
    """A fetch's jobs: those the cache answered (with their results), and the rest, in order."""

    answered: list[Answer] = field(default_factory=list)
    rest: list[Job] = field(default_factory=list)


class WireForms:
    """Encoded vectors of hot keys, least recently used dropped first past ``max_bytes``.
    Writing a vector (384 floats as text, or base64) is the largest single cost of a cache hit
    after decoding; a key asked for again in the same form reuses its bytes. Keyed by content
    hash (which covers the model, task and width), encoding format and content type."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._forms: OrderedDict[tuple[str, EncodingFormat, ContentType], msgspec.Raw] = OrderedDict()
        self.bytes = 0
        self.reused = 0

    def get(
        self,
        key: str,
        vector: NDArray[np.float32],
        encoding_format: EncodingFormat = "float",
        content_type: ContentType = ContentType.JSON,
    ) -> msgspec.Raw:
        wire_key = (key, encoding_format, content_type)
        form = self._forms.get(wire_key)
        if form is not None:
            self._forms.move_to_end(wire_key)
            self.reused += 1
            return form
        form = encode_vector(vector, encoding_format, content_type)
        if len(form) <= self._max_bytes:
            self._forms[wire_key] = form
            self.bytes += len(form)
            while self.bytes > self._max_bytes:
                _, dropped = self._forms.popitem(last=False)
                self.bytes -= len(dropped)
        return form


class HitLane:
    """Looks a fetch's jobs up in the cache and answers those it can."""

    def __init__(
        self,
        cache: EntryCache,
        metrics: WorkerMetrics,
        *,
        model_name: str,
        max_tokens: int,
        wire_cache_bytes: int = 0,
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._model_name = model_name
        self._max_tokens = max_tokens
        self.wire_forms = WireForms(wire_cache_bytes) if wire_cache_bytes else None

    async def split(self, jobs: Sequence[Job]) -> Split:
        if not jobs or not self._cache.enabled:
            return Split(rest=list(jobs))
        keys = list(dict.fromkeys((job.key, job.dim) for job in jobs))
        # Every key is counted as looked up here (the batch path does not count it again); a hit
        # is counted where it is served: here, or in the batch path for entries sent on.
        entries = await self._cache.lookup_entries(keys, count_hits=False)
        found = dict(zip(keys, entries, strict=True))
        split = Split()
        for job in jobs:
            entry = found[(job.key, job.dim)]
            if entry is None or entry.tokens is None or entry.tokens >= self._max_tokens:
                split.rest.append(job)
                continue
            split.answered.append((job, self._result(job, entry)))
        self._metrics.cache_hits.inc(len({(job.key, job.dim) for job, _ in split.answered}))
        return split

    def _result(self, job: Job, entry: CacheEntry) -> bytes:
        # The entry's vector is finite: servable_entries checked it.
        encoding_format = job.request.encoding_format
        wire_form = (
            None
            if self.wire_forms is None
            else self.wire_forms.get(job.key, entry.vector, encoding_format, job.content_type)
        )
        return encode_success_result(
            request_id=job.request.id,
            key=job.key,
            model=self._model_name,
            vector=entry.vector,
            encoding_format=encoding_format,
            cached=True,
            truncated=False,
            tokens=entry.tokens,
            metadata=job.request.metadata,
            content_type=job.content_type,
            encoded_vector=wire_form,
        )
