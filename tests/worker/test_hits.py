"""The hit lane's parts that need no stack: hot entries in front of Redis and their wire forms
(worker.hits.HotEntries), and the lane over a fake cache."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from schemas import ContentType, EmbedRequest, EncodingFormat, LongInputs, encode_vector
from schemas.cache_layout import CacheEntry
from worker.hits import HOT_ENTRY_OVERHEAD_BYTES, HitLane, HotEntries
from worker.jobs import Job, RawMessage, Source
from worker.metrics import WorkerMetrics


def vector(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def entry(seed: int, dim: int = 8) -> CacheEntry:
    return CacheEntry(vector(seed, dim), tokens=seed % 7)


ENCODINGS: tuple[EncodingFormat, ...] = ("float", "base64")
FORMS = [(f, c) for f in ENCODINGS for c in ContentType]


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["put", "get", "form"]),
            st.integers(0, 20),
            st.sampled_from([4, 8]),
            st.sampled_from(FORMS),
            st.floats(0, 5),
        ),
        max_size=200,
    ),
    room=st.integers(0, 6000),
    max_age=st.floats(0.5, 20),
)
def test_hot_entries_give_back_what_was_put_until_it_ages_out_and_stay_within_their_bytes(
    steps: list[tuple[str, int, int, tuple[EncodingFormat, ContentType], float]], room: int, max_age: float
) -> None:
    hot = HotEntries(room, max_age)
    now = 0.0
    put_at: dict[tuple[str, int], float] = {}
    for action, seed, dim, (encoding_format, content_type), step in steps:
        now += step
        # The content hash covers the width: one key, one vector (seed and width name the key).
        key = (f"key-{seed}", dim)
        if action == "put":
            hot.put(key, entry(seed, dim), now)
            put_at[key] = now
        elif action == "get":
            got = hot.get(key, now)
            if got is not None:  # only what was put, and not past its age
                assert np.array_equal(got.vector, vector(seed, dim)) and got.tokens == seed % 7
                assert now - put_at[key] < max_age
        else:
            got_entry = hot.get(key, now)
            v = got_entry.vector if got_entry is not None else vector(seed, dim)
            assert hot.form(key, v, encoding_format, content_type) == encode_vector(
                v, encoding_format, content_type
            )
        assert hot.bytes <= room
        assert hot.bytes == sum(h.size for h in hot._entries.values())


def test_a_hot_entry_keeps_a_form_per_format_and_content_type() -> None:
    hot = HotEntries(1 << 20, 60)
    hot.put(("k", 8), entry(1), 0.0)
    kept = hot.get(("k", 8), 0.0)
    assert kept is not None
    for encoding_format, content_type in FORMS:
        form = hot.form(("k", 8), kept.vector, encoding_format, content_type)
        assert form == encode_vector(kept.vector, encoding_format, content_type)
    assert hot.reused_forms == 0  # four forms, none taken for another
    for encoding_format, content_type in FORMS:
        hot.form(("k", 8), kept.vector, encoding_format, content_type)
    assert hot.reused_forms == len(FORMS)
    # A vector that is not the kept one (another entry under the same key) is never given a kept form.
    other = vector(2)
    assert hot.form(("k", 8), other, "float", ContentType.JSON) == encode_vector(
        other, "float", ContentType.JSON
    )


def test_the_least_recently_used_entry_goes_first_and_an_old_one_is_not_served() -> None:
    size = vector(0).nbytes + HOT_ENTRY_OVERHEAD_BYTES
    hot = HotEntries(2 * size + size // 2, max_age_s=10)  # room for two
    hot.put(("a", 8), entry(1), 0.0)
    hot.put(("b", 8), entry(2), 0.0)
    assert hot.get(("a", 8), 1.0) is not None  # a is now the most recent
    hot.put(("c", 8), entry(3), 1.0)  # b goes
    assert hot.get(("b", 8), 1.0) is None
    assert hot.get(("a", 8), 1.0) is not None and hot.get(("c", 8), 1.0) is not None
    assert hot.get(("a", 8), 10.0) is None  # put at 0: aged out at 10
    assert hot.get(("c", 8), 10.0) is not None
    assert len(hot) == 1 and hot.bytes == size


class CountingCache:
    """The lane's cache (worker.cache.VectorCache's lookup_entries): entries by key; counts the
    keys it is asked for; ``down`` answers every key None, as the cache does when Redis fails."""

    enabled = True

    def __init__(self, entries: dict[tuple[str, int], CacheEntry], metrics: WorkerMetrics) -> None:
        self.entries = entries
        self.metrics = metrics
        self.asked: list[tuple[str, int]] = []
        self.down = False

    async def lookup_entries(
        self, keys: Sequence[tuple[str, int]], *, count_lookups: bool = True, count_hits: bool = True
    ) -> list[CacheEntry | None]:
        self.asked.extend(keys)
        if count_lookups:  # as VectorCache counts them
            self.metrics.cache_lookups.inc(len(keys))
        return [None if self.down else self.entries.get(key) for key in keys]


def job(
    request_id: str, key: str, encoding_format: EncodingFormat = "float", long: LongInputs = "truncate"
) -> Job:
    request = EmbedRequest(id=request_id, text="t", encoding_format=encoding_format, long=long)
    return Job(
        Source("embed.requests", 0, 0, 0),
        RawMessage(None, None, []),
        request,
        key,
        8,
        None,
        "embed.results",
        ContentType.JSON,
    )


async def test_the_lane_asks_redis_once_for_a_hot_key_and_serves_it_while_redis_is_away() -> None:
    metrics = WorkerMetrics()
    cache = CountingCache({("hot", 8): entry(3), ("cut", 8): CacheEntry(vector(4), tokens=256)}, metrics)
    lane = HitLane(cache, metrics, model_name="m", max_tokens=256, hot_cache_bytes=1 << 20)
    first = await lane.split([job("a", "hot"), job("b", "cold"), job("c", "hot", "base64"), job("d", "cut")])
    assert [j.request.id for j, _ in first.answered] == ["a", "c"]
    assert [j.request.id for j in first.rest] == ["b", "d"]
    assert sorted(cache.asked) == [("cold", 8), ("cut", 8), ("hot", 8)]
    cache.asked.clear()
    cache.down = True
    again = await lane.split([job("e", "hot"), job("f", "cold")])
    assert [j.request.id for j, _ in again.answered] == ["e"]
    assert cache.asked == [("cold", 8)]  # the hot key was not asked for again
    result = msgspec.json.decode(again.answered[0][1])
    assert result["id"] == "e" and result["cached"] is True and result["tokens"] == 3
    assert np.array_equal(np.asarray(result["vector"], dtype=np.float32), vector(3))
    # Each key once per split: lookups 3 + 2; hits "hot" twice; of them, once from the hot entries.
    assert metrics.cache_lookups._value.get() == 5
    assert metrics.cache_hits._value.get() == 2
    assert metrics.hot_cache_hits._value.get() == 1


async def test_long_inputs_go_on_in_order_without_a_lookup() -> None:
    """A pool/chunks request's own key is never cached (its windows are): the lane never asks
    for it, even when an entry happens to sit there, and keeps the fetch's order in the rest."""
    metrics = WorkerMetrics()
    cache = CountingCache({("hot", 8): entry(3), ("pooled", 8): entry(5)}, metrics)
    lane = HitLane(cache, metrics, model_name="m", max_tokens=256, hot_cache_bytes=0)
    split = await lane.split(
        [
            job("a", "pooled", long="pool"),
            job("b", "hot"),
            job("c", "cold"),
            job("d", "pooled", long="chunks"),
        ]
    )
    assert [j.request.id for j, _ in split.answered] == ["b"]
    assert [j.request.id for j in split.rest] == ["a", "c", "d"]
    assert sorted(cache.asked) == [("cold", 8), ("hot", 8)]


async def test_without_hot_entries_every_split_asks_redis() -> None:
    metrics = WorkerMetrics()
    cache = CountingCache({("hot", 8): entry(3)}, metrics)
    lane = HitLane(cache, metrics, model_name="m", max_tokens=256, hot_cache_bytes=0)
    for _ in range(2):
        split = await lane.split([job("a", "hot")])
        assert len(split.answered) == 1
    assert cache.asked == [("hot", 8), ("hot", 8)]


@given(model=st.text(min_size=1, max_size=30), prefix=st.text(max_size=10), dim=st.integers(1, 4096))
def test_the_cache_keys_are_the_layouts(model: str, prefix: str, dim: int) -> None:
    from schemas.cache_layout import vector_key
    from worker.cache import VectorCache
    from worker.metrics import WorkerMetrics

    cache = VectorCache(None, key_prefix=prefix, model_name=model, ttl_s=0, metrics=WorkerMetrics())
    for key in ("ab" * 32, "cd" * 32):  # the second reuses the width's prefix
        assert cache.redis_key(key, dim) == vector_key(prefix, model, dim, key)
