"""The hit lane: cache hits answered right after decoding, beside the batches.

A fetch's requests are looked up in the cache in one round trip (worker.cache), before anything
is tokenized or batched; every request whose entry can answer it is published at once
(worker.runtime), so a hit never waits for the batch window, the tokenizer or the model, and
only the misses go on to the batcher. An entry answers a request by itself when its token count
says the text was not cut: fewer tokens than the model reads means nothing was truncated. An entry
without a count, or with exactly the model's maximum (cut, or a text of exactly that length),
goes the batch path instead, which tokenizes it and then serves it from the cache as before.

Hot entries (``HotEntries``) sit in front of Redis: an entry the lane found is kept in the
worker's memory, with the encoded forms of its vector, for a while. A cache entry never changes
(its key is the content hash of the model's serving fingerprint and the text, and the model is
deterministic), so a kept copy is never wrong; keeping it only for ``max_age_s`` bounds how long
an entry deleted from Redis is still served from here. A key asked for again within that time
costs neither a Redis round trip nor encoding its vector again, and is served even while Redis is
away.
"""

from __future__ import annotations

import time
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


@dataclass(slots=True)
class _Hot:
    entry: CacheEntry
    expires_at: float
    size: int
    forms: dict[tuple[EncodingFormat, ContentType], msgspec.Raw] = field(default_factory=dict)


# What a kept entry costs beyond its vector and forms: the key, the objects around them.
HOT_ENTRY_OVERHEAD_BYTES = 400


class HotEntries:
    """Cache entries of hot keys and the encoded forms of their vectors, in the worker's memory:
    at most ``max_bytes`` (least recently used dropped first), each for at most ``max_age_s``."""

    def __init__(self, max_bytes: int, max_age_s: float) -> None:
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._entries: OrderedDict[tuple[str, int], _Hot] = OrderedDict()
        self.bytes = 0
        self.reused_forms = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, int], now: float) -> CacheEntry | None:
        hot = self._entries.get(key)
        if hot is None:
            return None
        if hot.expires_at <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return hot.entry

    def put(self, key: tuple[str, int], entry: CacheEntry, now: float) -> None:
        if key in self._entries:
            self._drop(key)
        size = int(entry.vector.nbytes) + HOT_ENTRY_OVERHEAD_BYTES
        if size > self._max_bytes:
            return
        self._entries[key] = _Hot(entry, now + self._max_age_s, size)
        self.bytes += size
        self._shrink()

    def form(
        self,
        key: tuple[str, int],
        vector: NDArray[np.float32],
        encoding_format: EncodingFormat,
        content_type: ContentType,
    ) -> msgspec.Raw:
        """``encode_vector(vector, encoding_format, content_type)``, kept with the entry of
        ``key`` (when it is kept) and reused."""
        hot = self._entries.get(key)
        if hot is None or hot.entry.vector is not vector:  # not kept, or another entry now
            return encode_vector(vector, encoding_format, content_type)
        form = hot.forms.get((encoding_format, content_type))
        if form is not None:
            self.reused_forms += 1
        else:
            form = hot.forms[(encoding_format, content_type)] = encode_vector(
                vector, encoding_format, content_type
            )
            hot.size += len(form)
            self.bytes += len(form)
            self._shrink()
        return form

    def _drop(self, key: tuple[str, int]) -> None:
        self.bytes -= self._entries.pop(key).size

    def _shrink(self) -> None:
        while self.bytes > self._max_bytes and self._entries:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.size


class HitLane:
    """Looks a fetch's jobs up in the cache and answers those it can."""

    def __init__(
        self,
        cache: EntryCache,
        metrics: WorkerMetrics,
        *,
        model_name: str,
        max_tokens: int,
        hot_cache_bytes: int = 0,
        hot_cache_max_age_s: float = 60.0,
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._model_name = model_name
        self._max_tokens = max_tokens
        self.hot = HotEntries(hot_cache_bytes, hot_cache_max_age_s) if hot_cache_bytes else None

    async def split(self, jobs: Sequence[Job]) -> Split:
        if not jobs or not self._cache.enabled:
            return Split(rest=list(jobs))
        if any(job.request.long != "truncate" for job in jobs):
            # A long input's own key is never cached (its windows are, looked up in its batch):
            # it goes on without a lookup that could only miss.
            split = await self.split([job for job in jobs if job.request.long == "truncate"])
            answered = {id(job) for job, _ in split.answered}
            split.rest = [job for job in jobs if id(job) not in answered]  # in order, as promised
            return split
        hot = self.hot
        now = time.monotonic()
        found: dict[tuple[str, int], CacheEntry | None] = {}
        asked: list[tuple[str, int]] = []
        for job in jobs:
            key = (job.key, job.dim)
            if key not in found:
                entry = found[key] = hot.get(key, now) if hot is not None else None
                if entry is None:
                    asked.append(key)
        # Every key is counted as looked up here (the batch path does not count it again); a hit
        # is counted where it is served: here, or in the batch path for entries sent on.
        held = len(found) - len(asked)
        if held:
            self._metrics.cache_lookups.inc(held)
        if asked:
            entries = await self._cache.lookup_entries(asked, count_hits=False)
            for key, entry in zip(asked, entries, strict=True):
                found[key] = entry
                if entry is not None and hot is not None:
                    hot.put(key, entry, now)
        split = Split()
        served: set[tuple[str, int]] = set()
        for job in jobs:
            key = (job.key, job.dim)
            entry = found[key]
            if entry is None or entry.tokens is None or entry.tokens >= self._max_tokens:
                split.rest.append(job)
                continue
            served.add(key)
            split.answered.append((job, self._result(job, key, entry)))
        self._metrics.cache_hits.inc(len(served))
        hot_served = len(served.difference(asked)) if held else 0
        if hot_served:
            self._metrics.hot_cache_hits.inc(hot_served)
        return split

    def _result(self, job: Job, key: tuple[str, int], entry: CacheEntry) -> bytes:
        # The entry's vector is finite: servable_entries checked it.
        encoding_format = job.request.encoding_format
        wire_form = (
            None if self.hot is None else self.hot.form(key, entry.vector, encoding_format, job.content_type)
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
