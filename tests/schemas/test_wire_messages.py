"""Messages: vector helpers, result constructors, error code table."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from schemas import (
    ERROR_CODE_MEANINGS,
    EmbedResult,
    ErrorCode,
    decode_vector_b64,
    encode_vector_b64,
    float32_to_floats,
)


def test_base64_vector_round_trip_is_exact() -> None:
    rng = np.random.default_rng(7)
    vector = rng.standard_normal(384).astype(np.float32)
    decoded = decode_vector_b64(encode_vector_b64(vector))
    assert decoded.dtype == np.float32
    assert decoded.tobytes() == vector.tobytes()


def test_base64_is_little_endian_float32() -> None:
    assert encode_vector_b64([1.0]) == base64.b64encode(b"\x00\x00\x80\x3f").decode()
    big_endian = np.array([1.0, -2.5], dtype=">f4")
    assert decode_vector_b64(encode_vector_b64(big_endian)).tolist() == [1.0, -2.5]


@pytest.mark.parametrize("bad", ["not base64!", "AAA", "AAAAAAA=", "é"])
def test_decode_vector_b64_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_vector_b64(bad)


def test_float_vector_is_float32_widened_exactly() -> None:
    floats = float32_to_floats([0.1])
    assert floats == [float(np.float32(0.1))]
    assert np.float32(floats[0]) == np.float32(0.1)


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [[1.0, 2.0]]])
def test_success_rejects_non_finite_or_non_1d(bad: list[object]) -> None:
    with pytest.raises(ValueError):
        EmbedResult.success(request_id="a", key="k", model="m", vector=bad)  # type: ignore[arg-type]


def test_success_and_failure() -> None:
    vector = np.array([0.25, -0.5], dtype=np.float32)
    as_floats = EmbedResult.success(request_id="a", key="k", model="m", vector=vector)
    assert as_floats.ok and as_floats.vector == [0.25, -0.5] and as_floats.vector_b64 is None
    as_b64 = EmbedResult.success(request_id="a", key="k", model="m", vector=vector, encoding_format="base64")
    assert as_b64.vector is None and as_b64.dim == 2
    assert as_b64.vector_array().tolist() == [0.25, -0.5]
    failure = EmbedResult.failure(request_id="a", code=ErrorCode.TEXT_TOO_LONG, message="m" * 5000)
    assert not failure.ok and failure.error is not None
    assert failure.error.code == "text_too_long" and len(failure.error.message) == 1024
    with pytest.raises(ValueError):
        failure.vector_array()


def test_every_error_code_has_a_meaning() -> None:
    assert set(ERROR_CODE_MEANINGS) == set(ErrorCode)
    assert all(code.value == code.name.lower() for code in ErrorCode)
