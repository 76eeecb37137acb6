"""Codec: round trips, every codec error code, hostile input, lenient id extraction."""

from __future__ import annotations

import json
from collections.abc import Sequence

import msgspec
import pytest

from schemas import (
    ContentType,
    EmbedRequest,
    EmbedResult,
    ErrorCode,
    Header,
    RequestError,
    RequestLimits,
    ResultDecodeError,
    decode_request,
    decode_result,
    dlq_headers,
    encode_request,
    encode_result,
    request_headers,
)

JSON = [("content-type", b"application/json")]
MSGPACK = [("content-type", b"application/msgpack")]

FULL_REQUEST = EmbedRequest(
    id="req-1",
    text="Grüße, 世界 👋",
    task="query",
    dimensions=128,
    encoding_format="base64",
    reply_to="embed.results.team-a",
    metadata={"tenant": "acme"},
)


def decode_error(
    value: bytes | None, headers: Sequence[Header] = (), limits: RequestLimits | None = None
) -> RequestError:
    with pytest.raises(RequestError) as caught:
        decode_request(value, list(headers), limits or RequestLimits())
    return caught.value


def raw_json(**fields: object) -> bytes:
    return json.dumps({"id": "r", "text": "x"} | fields).encode()


@pytest.mark.parametrize("content_type", list(ContentType))
@pytest.mark.parametrize("request_", [FULL_REQUEST, EmbedRequest(id="a", text="b")])
def test_request_round_trip(content_type: ContentType, request_: EmbedRequest) -> None:
    value = encode_request(request_, content_type)
    assert decode_request(value, request_headers(content_type)) == request_


def test_json_is_default_and_msgpack_aliases_accepted() -> None:
    assert decode_request(encode_request(FULL_REQUEST), []) == FULL_REQUEST
    packed = encode_request(FULL_REQUEST, ContentType.MSGPACK)
    for header in (b"application/x-msgpack", b"Application/MsgPack; charset=binary"):
        assert decode_request(packed, [("Content-Type", header)]) == FULL_REQUEST
    assert decode_request(encode_request(FULL_REQUEST), [(b"content-type", b"application/json")])


def test_minimal_request_omits_defaults_and_ignores_unknown_fields() -> None:
    assert encode_request(EmbedRequest(id="a", text="b")) == b'{"id":"a","text":"b"}'
    request = decode_request(b'{"id":"a","text":"b","future_field":{"x":[1,2]}}', [])
    assert request == EmbedRequest(id="a", text="b")


@pytest.mark.parametrize("content_type", list(ContentType))
def test_result_round_trip(content_type: ContentType) -> None:
    results = [
        EmbedResult.success(request_id="a", key="k", model="m", vector=[0.5, -1.0]),
        EmbedResult.success(
            request_id="a", key="k", model="m", vector=[0.5], encoding_format="base64", cached=True
        ),
        EmbedResult.failure(request_id=None, code=ErrorCode.INTERNAL_ERROR, message="boom"),
    ]
    headers = [("content-type", content_type.value.encode())]
    for result in results:
        assert decode_result(encode_result(result, content_type), headers) == result


def test_success_carries_no_error_and_failure_no_vector() -> None:
    success = json.loads(encode_result(EmbedResult.success(request_id="a", key="k", model="m", vector=[1.0])))
    assert "error" not in success and success["vector"] == [1.0] and success["dim"] == 1
    failure = json.loads(
        encode_result(EmbedResult.failure(request_id="a", code=ErrorCode.EMPTY_TEXT, message="x"))
    )
    assert failure == {"id": "a", "error": {"code": "empty_text", "message": "x"}}


def test_decode_result_rejects_garbage() -> None:
    with pytest.raises(ResultDecodeError):
        decode_result(b"\xff{")
    with pytest.raises(ResultDecodeError):
        decode_result(b"{}", [("content-type", b"text/csv")])


# Every code the codec can give, from the smallest input that triggers it.
LIMITS_WITH_POLICY = RequestLimits(
    allowed_tasks=frozenset({"query"}),
    allowed_dimensions=frozenset({128}),
    allowed_reply_to=frozenset({"embed.results"}),
)
Case = tuple[str, bytes | None, Sequence[Header], ErrorCode]
CODEC_CASES: list[Case] = [
    ("malformed", b'{"id":', [], ErrorCode.INVALID_ENCODING),
    ("missing text", b'{"id":"r"}', [], ErrorCode.INVALID_REQUEST),
    ("empty text", raw_json(text=""), [], ErrorCode.EMPTY_TEXT),
    ("blank text", raw_json(text=" \u3000\n"), [], ErrorCode.EMPTY_TEXT),
    ("long text", raw_json(text="é" * 40_000), [], ErrorCode.TEXT_TOO_LONG),
    ("unknown task", raw_json(task="passage"), [], ErrorCode.UNKNOWN_TASK),
    ("dimensions not offered", raw_json(dimensions=64), [], ErrorCode.UNSUPPORTED_DIMENSIONS),
    ("dimensions negative", raw_json(dimensions=-3), [], ErrorCode.UNSUPPORTED_DIMENSIONS),
    ("dimensions huge", raw_json(dimensions=10**30), [], ErrorCode.UNSUPPORTED_DIMENSIONS),
    ("format", raw_json(encoding_format="int8"), [], ErrorCode.UNSUPPORTED_ENCODING_FORMAT),
    ("content type", raw_json(), [("content-type", b"text/plain")], ErrorCode.UNSUPPORTED_CONTENT_TYPE),
    ("reply_to", raw_json(reply_to="other"), [], ErrorCode.REPLY_TO_NOT_ALLOWED),
    ("too large", b" " * ((1 << 20) + 1), [], ErrorCode.MESSAGE_TOO_LARGE),
    ("header not utf-8", raw_json(), [("x-trace", b"\xff")], ErrorCode.INVALID_HEADERS),
    (
        "metadata entries",
        raw_json(metadata={str(i): "v" for i in range(33)}),
        [],
        ErrorCode.METADATA_TOO_LARGE,
    ),
    ("metadata key", raw_json(metadata={"k" * 129: "v"}), [], ErrorCode.METADATA_TOO_LARGE),
    ("metadata value", raw_json(metadata={"k": "v" * 1025}), [], ErrorCode.METADATA_TOO_LARGE),
]


@pytest.mark.parametrize(("name", "value", "headers", "code"), CODEC_CASES, ids=lambda c: str(c))
def test_codec_error_codes(
    name: str, value: bytes | None, headers: Sequence[Header], code: ErrorCode
) -> None:
    assert decode_error(value, headers, LIMITS_WITH_POLICY).code is code


def test_every_request_level_code_is_reachable_from_the_codec() -> None:
    worker_only = {ErrorCode.INFERENCE_FAILED, ErrorCode.INTERNAL_ERROR, ErrorCode.REPLY_TO_UNAVAILABLE}
    assert {case[3] for case in CODEC_CASES} | worker_only == set(ErrorCode)


def test_policy_is_only_checked_when_configured() -> None:
    request = decode_request(raw_json(task="anything", dimensions=7, reply_to="x"), [])
    assert (request.task, request.dimensions, request.reply_to) == ("anything", 7, "x")


def test_semantic_errors_carry_the_decoded_request() -> None:
    error = decode_error(raw_json(text=" ", metadata={"t": "1"}))
    assert error.request_id == "r" and error.request is not None
    result = error.to_result()
    assert result.id == "r" and result.metadata == {"t": "1"}
    assert result.error is not None and result.error.code == "empty_text"


@pytest.mark.parametrize(
    ("value", "expected_id"),
    [
        (b'{"id":"abc","text":5}', "abc"),  # wrong type elsewhere
        (b'{"text":"x","id":"abc","dimensions":"1"}', "abc"),
        (b'{"id":"abc","text":"\xff\xfe"}', "abc"),  # invalid UTF-8 in another field
        (b'{"id":"abc","text":"x","encoding_format":"f16"}', "abc"),
        (b'{"id":"abc","text":', None),  # truncated: nothing is readable
        (b'{"id":5,"text":"x"}', None),
        (b'{"id":"","text":"x"}', None),
        (b'{"id":"a\\u0000b","text":"x"}', None),  # an id we must not echo
        (json.dumps({"id": "x" * 257, "text": "x"}).encode(), None),
    ],
)
def test_lenient_id_extraction(value: bytes, expected_id: str | None) -> None:
    assert decode_error(value).request_id == expected_id


def test_errors_carry_the_readable_reply_to() -> None:
    """A request that fails validation still names its requester's private topic, so the error
    result reaches the requester instead of the default results topic."""
    invalid = decode_error(b'{"id":"abc","text":5,"reply_to":"embed.results.mine"}')
    assert (invalid.request_id, invalid.reply_to) == ("abc", "embed.results.mine")
    semantic = decode_error(raw_json(text=" ", reply_to="embed.results.mine"))
    assert semantic.reply_to == "embed.results.mine"
    headers = decode_error(raw_json(reply_to="embed.results.mine"), [("x", b"\xff")])
    assert (headers.code, headers.reply_to) == (ErrorCode.INVALID_HEADERS, "embed.results.mine")
    # No readable id: nobody to answer, so no reply_to either.
    assert decode_error(b'{"text":5,"reply_to":"embed.results.mine"}').reply_to is None


def test_lenient_id_extraction_from_msgpack() -> None:
    value = msgspec.msgpack.encode({"id": "abc", "text": 5})
    assert decode_error(value, MSGPACK).request_id == "abc"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# code None: the input is odd but valid and must decode.
HOSTILE: list[tuple[str, bytes | None, Sequence[Header], ErrorCode | None]] = [
    ("tombstone", None, [], ErrorCode.INVALID_REQUEST),
    ("empty bytes", b"", [], ErrorCode.INVALID_ENCODING),
    ("invalid utf-8", b'{"id":"r","text":"\xc3\x28"}', [], ErrorCode.INVALID_ENCODING),
    ("lone high surrogate", b'{"id":"r","text":"\\ud800"}', [], ErrorCode.INVALID_ENCODING),
    ("lone low surrogate", b'{"id":"r","text":"a\\udc00b"}', [], ErrorCode.INVALID_ENCODING),
    ("surrogate in id", b'{"id":"\\ud800","text":"x"}', [], ErrorCode.INVALID_ENCODING),
    ("nul in id", b'{"id":"a\\u0000","text":"x"}', [], ErrorCode.INVALID_REQUEST),
    ("nested top level", nested(100_000), [], ErrorCode.INVALID_REQUEST),
    (
        "nested unknown field",
        b'{"id":"r","text":"x","z":' + nested(100_000) + b"}",
        [],
        ErrorCode.INVALID_ENCODING,
    ),
    (
        "nested objects",
        b'{"id":"r","z":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001,
        [],
        ErrorCode.INVALID_ENCODING,
    ),
    ("nested in text", b'{"id":"r","text":' + nested(100_000) + b"}", [], ErrorCode.INVALID_REQUEST),
    (
        "nested msgpack",
        b"\x82\xa2id\xa1r\xa1z" + b"\x91" * 200_000 + b"\xc0",
        MSGPACK,
        ErrorCode.INVALID_ENCODING,
    ),
    ("10 MB text", raw_json(text="a" * 10_000_000), [], ErrorCode.MESSAGE_TOO_LARGE),
    ("huge array", b'{"id":"r","text":"x","z":[' + b"1," * 400_000 + b"1]}", [], None),
    ("huge array as text", b'{"id":"r","text":[' + b"1," * 400_000 + b"1]}", [], ErrorCode.INVALID_REQUEST),
    ("number as text", b'{"id":"r","text":12}', [], ErrorCode.INVALID_REQUEST),
    ("number as id", b'{"id":12,"text":"x"}', [], ErrorCode.INVALID_REQUEST),
    ("string as dimensions", raw_json(dimensions="128"), [], ErrorCode.INVALID_REQUEST),
    ("bool as dimensions", raw_json(dimensions=True), [], ErrorCode.INVALID_REQUEST),
    ("float as dimensions", raw_json(dimensions=128.0), [], ErrorCode.INVALID_REQUEST),
    (
        "500k-digit dimensions",
        b'{"id":"r","text":"x","dimensions":' + b"9" * 500_000 + b"}",
        [],
        ErrorCode.UNSUPPORTED_DIMENSIONS,
    ),
    ("1e400 dimensions", b'{"id":"r","text":"x","dimensions":1e400}', [], ErrorCode.UNSUPPORTED_DIMENSIONS),
    ("500k-digit unknown", b'{"id":"r","text":"x","z":' + b"9" * 500_000 + b"}", [], None),
    ("number as metadata value", raw_json(metadata={"k": 1}), [], ErrorCode.INVALID_REQUEST),
    ("array as metadata", raw_json(metadata=["k"]), [], ErrorCode.INVALID_REQUEST),
    ("int as encoding_format", raw_json(encoding_format=1), [], ErrorCode.INVALID_REQUEST),
    (
        "bytes as text (msgpack)",
        msgspec.msgpack.encode({"id": "r", "text": b"x"}),
        MSGPACK,
        ErrorCode.INVALID_REQUEST,
    ),
    ("ext type (msgpack)", b"\x82\xa2id\xa1r\xa4text\xd4\x01\x00", MSGPACK, ErrorCode.INVALID_REQUEST),
    ("bad utf-8 (msgpack)", b"\x82\xa2id\xa1r\xa4text\xa3\xed\xa0\x80", MSGPACK, ErrorCode.INVALID_ENCODING),
    ("truncated msgpack", b"\x82\xa2id", MSGPACK, ErrorCode.INVALID_ENCODING),
    ("json as msgpack", raw_json(), MSGPACK, ErrorCode.INVALID_REQUEST),
    ("trailing garbage", raw_json() + b" x", [], ErrorCode.INVALID_ENCODING),
    ("absurd header", raw_json(), [("x-junk", b"h" * 20_000)], ErrorCode.MESSAGE_TOO_LARGE),
    ("many headers", raw_json(), [("h", b"v")] * 10_000, ErrorCode.INVALID_HEADERS),
    ("65 headers", raw_json(), [("h", b"v")] * 65, ErrorCode.INVALID_HEADERS),
    ("header value not utf-8", raw_json(), [("x-trace", b"\xff\xfe")], ErrorCode.INVALID_HEADERS),
    ("header name not utf-8", raw_json(), [(b"\xff\xfe", b"v")], ErrorCode.INVALID_HEADERS),
    (
        "absurd content type",
        raw_json(),
        [("content-type", b"a/" + b"b" * 10_000)],
        ErrorCode.UNSUPPORTED_CONTENT_TYPE,
    ),
    (
        "non-ascii content type",
        raw_json(),
        [("content-type", b"\xff\xfe")],
        ErrorCode.UNSUPPORTED_CONTENT_TYPE,
    ),
    ("null content type", raw_json(), [("content-type", None)], ErrorCode.UNSUPPORTED_CONTENT_TYPE),
    ("future schema", raw_json(), [("schema", b"3")], ErrorCode.INVALID_REQUEST),
    ("reply_to charset", raw_json(reply_to="a/b"), [], ErrorCode.INVALID_REQUEST),
    ("reply_to dotdot", raw_json(reply_to=".."), [], ErrorCode.INVALID_REQUEST),
    ("reply_to too long", raw_json(reply_to="a" * 250), [], ErrorCode.INVALID_REQUEST),
]


@pytest.mark.parametrize(("name", "value", "headers", "code"), HOSTILE, ids=lambda c: str(c)[:40])
def test_hostile_input_gives_request_error_only(
    name: str, value: bytes | None, headers: Sequence[Header], code: ErrorCode | None
) -> None:
    try:
        decode_request(value, headers)
    except RequestError as error:
        assert error.code is code, error.message
        assert len(error.message) <= 1024
    else:
        assert code is None, "expected a RequestError"


def test_nul_bytes_in_text_are_text() -> None:
    assert decode_request(raw_json(text="a\u0000b"), []).text == "a\x00b"


def test_surrogate_pair_is_fine() -> None:
    assert decode_request(b'{"id":"r","text":"\\ud83d\\ude00"}', []).text == "\U0001f600"


def test_error_message_quoting_hostile_value_is_bounded() -> None:
    error = decode_error(raw_json(encoding_format="x" * 100_000))
    assert error.code is ErrorCode.UNSUPPORTED_ENCODING_FORMAT
    assert len(error.message) <= 1024


def test_text_limit_counts_utf8_bytes() -> None:
    limits = RequestLimits(max_text_bytes=4)
    assert decode_request(raw_json(text="éé"), [], limits).text == "éé"  # 4 bytes
    assert decode_error(raw_json(text="ééa"), [], limits).code is ErrorCode.TEXT_TOO_LONG


def test_encode_request_validates_unless_told_not_to() -> None:
    bad = EmbedRequest(id="r", text="   ")
    with pytest.raises(RequestError):
        encode_request(bad)
    assert encode_request(bad, limits=None) == b'{"id":"r","text":"   "}'


def test_dlq_headers() -> None:
    headers = dict(
        dlq_headers(
            code=ErrorCode.EMPTY_TEXT,
            reason="text is only whitespace",
            source_topic="embed.requests",
            source_partition=3,
            source_offset=42,
            worker="worker-1",
        )
    )
    assert headers == {
        "dlq-error-code": b"empty_text",
        "dlq-reason": b"text is only whitespace",
        "dlq-source-topic": b"embed.requests",
        "dlq-source-partition": b"3",
        "dlq-source-offset": b"42",
        "dlq-worker": b"worker-1",
    }


def test_request_headers_carry_schema_version() -> None:
    assert dict(request_headers(ContentType.MSGPACK)) == {
        "content-type": b"application/msgpack",
        "schema": b"1",
    }
