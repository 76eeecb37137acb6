"""The hit lane's parts that need no stack: the wire forms of hot keys (worker.hits.WireForms)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from schemas import ContentType, EncodingFormat, encode_vector
from worker.hits import WireForms


def vector(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


ENCODINGS: tuple[EncodingFormat, ...] = ("float", "base64")
FORMS = [(f, c) for f in ENCODINGS for c in ContentType]


@given(
    asks=st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from([4, 8]), st.sampled_from(FORMS)), max_size=200
    ),
    room=st.integers(0, 4000),
)
def test_a_reused_form_is_the_encoding_of_its_vector_and_the_bytes_stay_bounded(
    asks: list[tuple[int, int, tuple[EncodingFormat, ContentType]]], room: int
) -> None:
    forms = WireForms(room)
    for seed, dim, (encoding_format, content_type) in asks:
        v = vector(seed, dim)
        # The content hash covers the width: one key, one vector (seed and width name the key).
        key = f"key-{seed}-{dim}"
        got = forms.get(key, v, encoding_format, content_type)
        assert got == encode_vector(v, encoding_format, content_type)
        assert forms.bytes <= room
    assert forms.bytes == sum(len(f) for f in forms._forms.values())


def test_one_key_keeps_a_form_per_format_and_content_type() -> None:
    v = vector(1)
    forms = WireForms(1 << 20)
    for encoding_format, content_type in FORMS:
        assert forms.get("k", v, encoding_format, content_type) == encode_vector(
            v, encoding_format, content_type
        )
    assert forms.reused == 0  # four forms, none taken for another
    for encoding_format, content_type in FORMS:
        forms.get("k", v, encoding_format, content_type)
    assert forms.reused == len(FORMS)


def test_the_least_recently_used_form_goes_first() -> None:
    a = b = c = np.full(8, 0.5, dtype=np.float32)  # forms of one size, under three keys
    size = len(encode_vector(a, "float", ContentType.JSON))
    forms = WireForms(2 * size + size // 2)  # room for two
    forms.get("a", a)
    forms.get("b", b)
    forms.get("a", a)  # a is now the most recent
    forms.get("c", c)  # b goes
    reused = forms.reused
    forms.get("a", a)
    assert forms.reused == reused + 1
    forms.get("b", b)
    assert forms.reused == reused + 1  # b was dropped: encoded again


@given(model=st.text(min_size=1, max_size=30), prefix=st.text(max_size=10), dim=st.integers(1, 4096))
def test_the_cache_keys_are_the_layouts(model: str, prefix: str, dim: int) -> None:
    from schemas.cache_layout import vector_key
    from worker.cache import VectorCache
    from worker.metrics import WorkerMetrics

    cache = VectorCache(None, key_prefix=prefix, model_name=model, ttl_s=0, metrics=WorkerMetrics())
    for key in ("ab" * 32, "cd" * 32):  # the second reuses the width's prefix
        assert cache.redis_key(key, dim) == vector_key(prefix, model, dim, key)
