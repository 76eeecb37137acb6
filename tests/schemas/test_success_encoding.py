"""encode_success_result: the bytes of encode_result(EmbedResult.success(...)), built without it.

Property tests over every finite float32 bit pattern (subnormals, -0.0, the extremes): the
value is byte-identical to the EmbedResult path in base64 (JSON and msgpack) and float msgpack;
a JSON float vector differs only in its numbers' text (the shortest of each float32), which is
the same vector under the contract's rule (parse as float64, cast to float32) in fewer bytes;
a client's decode_result gives back the input vector bit for bit in every format.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from schemas import (
    ContentType,
    EmbedResult,
    EncodingFormat,
    decode_result,
    encode_result,
    encode_success_result,
    result_headers,
)
from schemas.codec import _SuccessFrame

FORMATS: list[tuple[EncodingFormat, ContentType]] = [
    (encoding_format, content_type) for encoding_format in ("float", "base64") for content_type in ContentType
]


def finite_float32(bits: int) -> np.float32:
    """The float32 of these bits; NaN and infinities (exponent all ones) fold onto finite ones."""
    if (bits >> 23) & 0xFF == 0xFF:
        bits &= ~(1 << 30)  # exponent 0xFF -> 0x7F: a finite value of the same sign and mantissa
    return np.float32(np.array([bits], dtype=np.uint32).view(np.float32)[0])


# Every finite bit pattern is as likely as any other (most draws are far from 1.0, many are
# subnormal); hypothesis's own float32 draws add the "interesting" ones (0, -0.0, 1, extremes).
elements = st.one_of(
    st.integers(0, 2**32 - 1).map(finite_float32),
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(np.float32),
)
vectors = st.integers(0, 48).flatmap(lambda n: hnp.arrays(np.float32, n, elements=elements))
ids = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12)
texts = st.text(max_size=12)
metadata = st.one_of(st.none(), st.dictionaries(texts, texts, max_size=3))
fields = st.fixed_dictionaries(
    {
        "request_id": ids,
        "key": texts,
        "model": texts,
        "cached": st.booleans(),
        "truncated": st.booleans(),
        "tokens": st.one_of(st.none(), st.integers(0, 2**40)),
        "metadata": metadata,
    }
)

SPECIAL_BITS = [
    0x00000000,  # 0.0
    0x80000000,  # -0.0
    0x00000001,  # the smallest subnormal, 1.4e-45
    0x80000001,
    0x00000002,
    0x000FFFFF,
    0x007FFFFF,  # the largest subnormal
    0x00800000,  # the smallest normal, 1.1754944e-38
    0x00800001,
    0x3F800000,  # 1.0
    0x3F7FFFFF,  # the float32 below 1.0
    0x3F800001,  # the float32 above 1.0
    0x3DCCCCCD,  # 0.1
    0x3EAAAAAB,  # 1/3
    0x4B800000,  # 2**24
    0x4B800001,
    0x7F7FFFFF,  # the largest, 3.4028235e38
    0xFF7FFFFF,  # its negative
    0x7F000000,
    0x33800000,  # 2**-24
    0x1E3CE508,  # 1e-20
    0x60AD78EC,  # 1e20
]
SPECIAL = np.array(SPECIAL_BITS, dtype=np.uint32).view(np.float32)


def via_embed_result(vector: NDArray[np.float32], **kwargs: Any) -> bytes:
    content_type = kwargs.pop("content_type")
    return encode_result(EmbedResult.success(vector=vector, **kwargs), content_type)


def assert_same_result(
    ours: bytes, reference: bytes, encoding_format: str, content_type: ContentType
) -> None:
    """Byte-identical, except a JSON float vector: the same fields in the same order, and the
    same float32 values, in no more bytes."""
    if (encoding_format, content_type) != ("float", ContentType.JSON):
        assert ours == reference
        return
    mine, theirs = json.loads(ours), json.loads(reference)
    assert list(mine) == list(theirs)
    mine_vector, their_vector = mine.pop("vector"), theirs.pop("vector")
    assert mine == theirs
    assert bits(np.array(mine_vector, dtype=np.float64).astype(np.float32)) == bits(
        np.array(their_vector, dtype=np.float64).astype(np.float32)
    )
    assert len(ours) <= len(reference)


def bits(vector: NDArray[np.float32]) -> list[int]:
    return vector.astype(np.float32).view(np.uint32).tolist()  # type: ignore[no-any-return]


@settings(max_examples=100, deadline=None)
@given(vector=vectors, other=fields)
@pytest.mark.parametrize(("encoding_format", "content_type"), FORMATS)
def test_bytes_are_those_of_encode_result(
    encoding_format: EncodingFormat,
    content_type: ContentType,
    vector: NDArray[np.float32],
    other: dict[str, Any],
) -> None:
    kwargs = dict(other, encoding_format=encoding_format, content_type=content_type)
    assert_same_result(
        encode_success_result(vector=vector, **kwargs),
        via_embed_result(vector, **kwargs),
        encoding_format,
        content_type,
    )


@settings(max_examples=100, deadline=None)
@given(vector=vectors)
@pytest.mark.parametrize(("encoding_format", "content_type"), FORMATS)
def test_decoded_vector_is_the_input_bit_for_bit(
    encoding_format: EncodingFormat, content_type: ContentType, vector: NDArray[np.float32]
) -> None:
    value = encode_success_result(
        request_id="r",
        key="k",
        model="m",
        vector=vector,
        encoding_format=encoding_format,
        content_type=content_type,
    )
    decoded = decode_result(value, result_headers(content_type))
    assert decoded.dim == vector.shape[0]
    assert decoded.vector_array().dtype == np.float32
    assert bits(decoded.vector_array()) == bits(vector)


@pytest.mark.parametrize(("encoding_format", "content_type"), FORMATS)
def test_extremes_subnormals_and_negative_zero(
    encoding_format: EncodingFormat, content_type: ContentType
) -> None:
    vector = np.concatenate([SPECIAL, -SPECIAL])
    kwargs: dict[str, Any] = dict(
        request_id="r",
        key="k",
        model="m",
        encoding_format=encoding_format,
        content_type=content_type,
    )
    value = encode_success_result(vector=vector, **kwargs)
    assert_same_result(value, via_embed_result(vector, **kwargs), encoding_format, content_type)
    assert bits(decode_result(value, result_headers(content_type)).vector_array()) == bits(vector)


# Lengths where msgpack changes the form of an array header (fixarray, array 16, array 32) or of
# the base64 string's header (fixstr, str 8, str 16, str 32), and DIMENSIONS_MAX.
@pytest.mark.parametrize("dims", [0, 1, 5, 6, 15, 16, 47, 48, 384, 12287, 12288, 65535, 65536])
@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_msgpack_headers_at_every_length_boundary(dims: int, encoding_format: EncodingFormat) -> None:
    vector = np.random.default_rng(dims).standard_normal(dims).astype(np.float32)
    kwargs: dict[str, Any] = dict(
        request_id="r",
        key="k",
        model="m",
        encoding_format=encoding_format,
        content_type=ContentType.MSGPACK,
    )
    assert_same_result(
        encode_success_result(vector=vector, **kwargs),
        via_embed_result(vector, **kwargs),
        kwargs.get("encoding_format", "float"),
        kwargs["content_type"],
    )


def test_a_typical_result_in_every_format() -> None:
    rng = np.random.default_rng(21)
    vector = rng.standard_normal(384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    for encoding_format, content_type in FORMATS:
        kwargs: dict[str, Any] = dict(
            request_id="req-000123",
            key="ab" * 32,
            model="all-MiniLM-L6-v2",
            encoding_format=encoding_format,
            cached=True,
            truncated=True,
            tokens=17,
            metadata={"tenant": "acme", "ключ": "значение"},
            content_type=content_type,
        )
        assert_same_result(
            encode_success_result(vector=vector, **kwargs),
            via_embed_result(vector, **kwargs),
            kwargs.get("encoding_format", "float"),
            kwargs["content_type"],
        )


def test_a_non_contiguous_or_big_endian_float32_vector() -> None:
    base = (np.arange(32) / 7).astype(np.float32)
    vectors_: list[NDArray[np.float32]] = [base[::2], base.astype(">f4"), base[::-3].astype(">f4")]
    for vector in vectors_:
        for encoding_format, content_type in FORMATS:
            kwargs: dict[str, Any] = dict(
                request_id="r",
                key="k",
                model="m",
                encoding_format=encoding_format,
                content_type=content_type,
            )
            assert_same_result(
                encode_success_result(vector=vector, **kwargs),
                via_embed_result(vector, **kwargs),
                kwargs.get("encoding_format", "float"),
                kwargs["content_type"],
            )


def test_metadata_is_encoded_from_any_mapping() -> None:
    class Mapping(dict[str, str]):
        pass

    vector = np.ones(3, dtype=np.float32)
    for value in (None, {}, {"a": "b"}, Mapping(a="b")):
        kwargs: dict[str, Any] = dict(
            request_id="r", key="k", model="m", metadata=value, content_type=ContentType.JSON
        )
        assert_same_result(
            encode_success_result(vector=vector, **kwargs),
            via_embed_result(vector, **kwargs),
            kwargs.get("encoding_format", "float"),
            kwargs["content_type"],
        )


def test_a_json_float_vector_is_the_shortest_text_of_each_float32() -> None:
    """Each number is numpy's shortest round-tripping text of the float32 value (the same digits;
    orjson may write an exponent where numpy does not)."""
    rng = np.random.default_rng(7)
    vector = np.concatenate([SPECIAL, rng.standard_normal(2000).astype(np.float32)])
    value = encode_success_result(request_id="r", key="k", model="m", vector=vector)
    texts = value.split(b'"vector":[')[1].split(b"]")[0].split(b",")
    for text, number in zip(texts, vector, strict=True):
        shortest = np.format_float_scientific(number, unique=True, trim="-")
        assert float(text) == float(shortest), (text, shortest)
        digits = shortest.split("e")[0].replace("-", "").replace(".", "").lstrip("0") or "0"
        mine = text.split(b"e")[0].replace(b"-", b"").replace(b".", b"").strip(b"0") or b"0"
        assert len(mine) <= len(digits.rstrip("0") or "0"), (text, shortest)


def test_only_the_cheap_preconditions_are_checked() -> None:
    kwargs: dict[str, Any] = dict(request_id="r", key="k", model="m")
    with pytest.raises(TypeError, match="float32"):
        encode_success_result(vector=np.ones(3), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-d"):
        encode_success_result(vector=np.ones((2, 3), dtype=np.float32), **kwargs)
    with pytest.raises(ValueError, match="encoding_format"):
        encode_success_result(vector=np.ones(3, dtype=np.float32), encoding_format="hex", **kwargs)  # type: ignore[arg-type]
    # Finiteness is the caller's (documented): EmbedResult.success refuses, this writes null.
    nan = np.array([np.nan], dtype=np.float32)
    with pytest.raises(ValueError, match="finite"):
        EmbedResult.success(vector=nan, **kwargs)
    assert b'"vector":[null]' in encode_success_result(vector=nan, **kwargs)


def test_the_frame_mirrors_embed_result() -> None:
    """Same field names in the same order, same defaults, same options: only the vector's type
    differs (pre-encoded), so msgspec writes both alike."""
    frame, result = msgspec.structs.fields(_SuccessFrame), msgspec.structs.fields(EmbedResult)
    assert [(f.name, f.encode_name, f.default) for f in frame] == [
        (f.name, f.encode_name, f.default) for f in result
    ]
    frame_config, result_config = _SuccessFrame.__struct_config__, EmbedResult.__struct_config__
    for option in ("omit_defaults", "array_like", "tag", "tag_field", "forbid_unknown_fields"):
        assert getattr(frame_config, option) == getattr(result_config, option), option
