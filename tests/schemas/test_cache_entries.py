"""The one rule for serving a cache entry (``schemas.cache_layout.servable_entry``) against the
committed cases in ``schemas/testdata/cache_entries.json``, which the Go client's tests check too
(producer/go/cache_test.go): the two readers decide every case the same way."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.cache_layout import ENTRY_FIELDS, servable_entries, servable_entry
from schemas.testdata.generate import CACHE_ENTRIES_FILE, cache_entries_vectors

CASES: list[dict[str, Any]] = json.loads(CACHE_ENTRIES_FILE.read_text(encoding="utf-8"))["cases"]


def fields_of(case: dict[str, Any]) -> list[bytes | None]:
    """What a reader's HMGET returns for the case (all None for a missing or wrong-typed key)."""
    if case["redis_type"] != "hash":
        return [None] * len(ENTRY_FIELDS)
    raw = {name: bytes.fromhex(value) for name, value in case["fields_hex"].items()}
    return [raw.get(name) for name in ENTRY_FIELDS]


def test_committed_cache_entries_file_is_what_the_generator_writes() -> None:
    assert cache_entries_vectors() == json.loads(CACHE_ENTRIES_FILE.read_text(encoding="utf-8"))


def test_the_cases_cover_every_way_an_entry_can_be_bad() -> None:
    names = {case["name"] for case in CASES}
    for needed in (
        "vector_nan", "vector_plus_inf", "vector_short", "vector_long", "missing_vector",
        "missing_model", "missing_dim", "other_model", "dim_other_width", "tokens_negative",
        "wrong_type_string", "wrong_type_list",
    ):  # fmt: skip
        assert needed in names
    assert sum(case["servable"] for case in CASES) >= 5


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_servable_entry_decides_each_case_as_committed(case: dict[str, Any]) -> None:
    entry = servable_entry(fields_of(case), model=case["model"], dim=case["dim"])
    # Names say the verdict (good_* are served), independently of the function that wrote the file.
    assert (entry is not None) == case["servable"] == case["name"].startswith("good")
    if entry is not None:
        assert entry.vector.dtype == np.float32 and entry.vector.flags.writeable
        assert entry.vector.tolist() == case["vector"]
        assert entry.tokens == case["tokens"]


def test_str_fields_read_like_bytes() -> None:
    """A client with decode_responses gets str: the same rule applies to the same bytes."""
    vector = np.array([0.5, 1.0], dtype="<f4").tobytes()
    assert servable_entry([vector, "m", "2", "3"], model="m", dim=2) is not None
    assert servable_entry([vector, "m", "2", "x"], model="m", dim=2) is None


def test_a_reader_that_fetched_other_fields_is_a_bug_not_a_miss() -> None:
    with pytest.raises(ValueError, match="fields"):
        servable_entry([b"", b"m", b"1"], model="m", dim=1)


@given(st.lists(st.sampled_from(range(len(CASES))), max_size=40))
def test_many_entries_at_once_are_decided_as_each_alone(picks: list[int]) -> None:
    """servable_entries groups the vectors by width for one vectorised check: any mix of cases
    (widths, bad entries, duplicates) gets what each case gets on its own."""
    cases = [CASES[i] for i in picks]
    for model in {c["model"] for c in cases}:
        asked = [c for c in cases if c["model"] == model]
        together = servable_entries(
            [fields_of(c) for c in asked], model=model, dims=[c["dim"] for c in asked]
        )
        for case, entry in zip(asked, together, strict=True):
            alone = servable_entry(fields_of(case), model=model, dim=case["dim"])
            assert (entry is None) == (alone is None) == (not case["servable"])
            if entry is not None and alone is not None:
                assert entry.tokens == alone.tokens
                np.testing.assert_array_equal(entry.vector, alone.vector)
                assert entry.vector.dtype == np.float32 and entry.vector.flags.writeable
