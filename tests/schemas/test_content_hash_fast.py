"""schemas.ContentHasher: the hashes of schemas.content_hash, for any text, task and width."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import ContentHasher, content_hash

fingerprints = st.text(min_size=1, max_size=70)
tasks = st.one_of(st.none(), st.text(max_size=20))
widths = st.one_of(st.none(), st.integers(1, 4096))


@given(fingerprint=fingerprints, calls=st.lists(st.tuples(st.text(max_size=200), tasks, widths), max_size=8))
def test_the_same_hashes_as_content_hash(
    fingerprint: str, calls: list[tuple[str, str | None, int | None]]
) -> None:
    hasher = ContentHasher(fingerprint)
    for text, task, dimensions in calls:  # repeated (task, width) pairs reuse the hashed prefix
        expected = content_hash(text, model_fingerprint=fingerprint, task=task, dimensions=dimensions)
        assert hasher(text, task=task, dimensions=dimensions) == expected


def test_what_content_hash_refuses_it_refuses() -> None:
    hasher = ContentHasher("f" * 64)
    with pytest.raises(ValueError, match="dimensions"):
        hasher("x", task=None, dimensions=0)
    with pytest.raises(ValueError, match="UTF-8"):
        hasher("\udc80", task=None, dimensions=None)
    assert hasher("x", task=None, dimensions=None) == content_hash(
        "x", model_fingerprint="f" * 64, task=None, dimensions=None
    )
