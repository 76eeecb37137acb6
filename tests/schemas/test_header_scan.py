"""decode_request reads the headers in one pass: the same outcome as the four scans it replaced.

The reference below is decode_request as it was before (header size, content type, schema
version and UTF-8 check each scanned the headers on their own), kept verbatim apart from names.
Hypothesis compares both over arbitrary header lists, values and limits: the same request, or
the same error (code, message, request id, reply_to, echoed request).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas import (
    CONTENT_TYPE_ALIASES,
    ContentType,
    EmbedRequest,
    ErrorCode,
    Header,
    RequestError,
    RequestLimits,
    decode_request,
    encode_request,
)
from schemas.codec import (
    _JSON_REQUEST_DECODER,
    _MSGPACK_REQUEST_DECODER,
    _UNDECODABLE,
    SUPPORTED_SCHEMA_VERSIONS,
    _code_for_validation_error,
    _undecodable,
)

# --- the reference: decode_request before the one-pass scan ------------------------------------


def _ref_header_name(name: str | bytes) -> str:
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace").lower()
    return name.lower()


def _ref_header_bytes(headers: Sequence[Header]) -> int:
    total = 0
    for name, value in headers:
        total += len(name) if isinstance(name, bytes) else len(name.encode("utf-8", "replace"))
        total += len(value) if value is not None else 0
    return total


def _ref_last_header(headers: Sequence[Header], name: str) -> bytes | None:
    found: bytes | None = None
    for header_name, value in headers:
        if _ref_header_name(header_name) == name:
            found = value if value is not None else b""
    return found


def _ref_content_type_of(headers: Sequence[Header]) -> ContentType:
    raw = _ref_last_header(headers, "content-type")
    if raw is None:
        return ContentType.JSON
    media_type = raw.split(b";", 1)[0].strip().lower()
    try:
        return CONTENT_TYPE_ALIASES[media_type.decode("ascii")]
    except (UnicodeDecodeError, KeyError):
        shown = media_type[:64].decode("ascii", "replace")
        raise RequestError(
            ErrorCode.UNSUPPORTED_CONTENT_TYPE, f"unsupported content-type {shown!r}"
        ) from None


def _ref_lenient_content_type(headers: Sequence[Header]) -> ContentType:
    try:
        return _ref_content_type_of(headers)
    except RequestError:
        return ContentType.JSON


def _ref_check_schema_version(headers: Sequence[Header]) -> None:
    raw = _ref_last_header(headers, "schema")
    if raw is None:
        return
    version = raw.decode("utf-8", "replace").strip()
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise RequestError(
            ErrorCode.INVALID_REQUEST,
            f"unsupported schema version {version[:32]!r}; "
            f"this worker speaks {sorted(SUPPORTED_SCHEMA_VERSIONS)}",
        )


def _ref_check_header_text(
    headers: Sequence[Header], value: bytes, content_type: ContentType, limits: RequestLimits
) -> None:
    for name, header_value in headers:
        try:
            if isinstance(name, bytes):
                name.decode("utf-8")
            if header_value is not None:
                header_value.decode("utf-8")
        except UnicodeDecodeError:
            shown = name if isinstance(name, str) else name.decode("utf-8", "replace")
            message = f"header {shown[:64]!r} is not valid UTF-8"
            if len(value) <= limits.max_message_bytes:
                raise _undecodable(ErrorCode.INVALID_HEADERS, message, value, content_type) from None
            raise RequestError(ErrorCode.INVALID_HEADERS, message) from None


def _ref_check_rules(request: EmbedRequest, limits: RequestLimits) -> None:
    def fail(code: ErrorCode, message: str) -> RequestError:
        return RequestError(code, message, request.id, request=request)

    try:
        text_bytes = len(request.text.encode("utf-8"))
    except UnicodeEncodeError:
        raise fail(ErrorCode.INVALID_ENCODING, "text is not valid Unicode") from None
    if text_bytes > limits.max_text_bytes:
        raise fail(
            ErrorCode.TEXT_TOO_LONG,
            f"text is {text_bytes} UTF-8 bytes; the limit is {limits.max_text_bytes}",
        )
    if not request.text.strip():
        raise fail(ErrorCode.EMPTY_TEXT, "text is only whitespace")
    tasks, dimensions = limits.allowed_tasks, limits.allowed_dimensions
    if tasks is not None and request.task is not None and request.task not in tasks:
        raise fail(ErrorCode.UNKNOWN_TASK, f"unknown task {request.task!r}; known: {sorted(tasks)}")
    if dimensions is not None and request.dimensions is not None and request.dimensions not in dimensions:
        raise fail(
            ErrorCode.UNSUPPORTED_DIMENSIONS,
            f"dimensions {request.dimensions} not offered; offered: {sorted(dimensions)}",
        )
    reply_to_topics = limits.allowed_reply_to
    if (
        reply_to_topics is not None
        and request.reply_to is not None
        and request.reply_to not in reply_to_topics
    ):
        raise fail(ErrorCode.REPLY_TO_NOT_ALLOWED, f"reply_to {request.reply_to!r} is not allowed")


def reference_decode_request(
    value: bytes | None, headers: Sequence[Header], limits: RequestLimits
) -> EmbedRequest:
    if value is None:
        raise RequestError(ErrorCode.INVALID_REQUEST, "message has no value (a tombstone)")
    small = len(value) <= limits.max_message_bytes
    if len(headers) > limits.max_headers:
        message = f"message has {len(headers)} headers; the limit is {limits.max_headers}"
        if small:
            raise _undecodable(ErrorCode.INVALID_HEADERS, message, value, _ref_lenient_content_type(headers))
        raise RequestError(ErrorCode.INVALID_HEADERS, message)
    header_bytes = _ref_header_bytes(headers)
    if header_bytes > limits.max_header_bytes:
        message = f"headers are {header_bytes} bytes; the limit is {limits.max_header_bytes}"
        if small:
            raise _undecodable(
                ErrorCode.MESSAGE_TOO_LARGE, message, value, _ref_lenient_content_type(headers)
            )
        raise RequestError(ErrorCode.MESSAGE_TOO_LARGE, message)
    if len(value) > limits.max_message_bytes:
        raise RequestError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"message is {len(value)} bytes; the limit is {limits.max_message_bytes}",
        )
    content_type = _ref_content_type_of(headers)
    _ref_check_schema_version(headers)
    _ref_check_header_text(headers, value, content_type, limits)
    decoder = _JSON_REQUEST_DECODER if content_type is ContentType.JSON else _MSGPACK_REQUEST_DECODER
    try:
        request = decoder.decode(value)
    except msgspec.ValidationError as exc:
        raise _undecodable(_code_for_validation_error(str(exc)), str(exc), value, content_type) from None
    except RecursionError:
        raise RequestError(ErrorCode.INVALID_ENCODING, f"{content_type} nests too deep") from None
    except _UNDECODABLE as exc:
        raise _undecodable(
            ErrorCode.INVALID_ENCODING, f"undecodable {content_type}: {exc}", value, content_type
        ) from None
    _ref_check_rules(request, limits)
    return request


# --- the comparison ----------------------------------------------------------------------------

Outcome = tuple[object, ...]


def outcome(decode: object, value: bytes | None, headers: list[Header], limits: RequestLimits) -> Outcome:
    assert callable(decode)
    try:
        return ("ok", decode(value, headers, limits))
    except RequestError as error:
        return ("error", error.code, error.message, error.request_id, error.reply_to, error.request)


REQUEST = EmbedRequest(id="req-1", text="Grüße 世界", reply_to="team.results", metadata={"a": "b"})
VALUES = [
    encode_request(REQUEST),
    encode_request(REQUEST, ContentType.MSGPACK),
    encode_request(EmbedRequest(id="ascii", text="How do I reset my password?")),
    b'{"id":"bad","text":""}',  # empty text: the id is readable
    b'{"id":"bad","reply_to":"t","text":1}',  # wrong type
    b'{"id":"r","text":"   "}',  # only whitespace: a rule
    b'{"id":"r","text":"' + "é".encode() * 40 + b'"}',  # non-ASCII text over a small text limit
    b"\x82\xa2id\xa1r\xa4text\xa1x",  # msgpack by hand
    b"not json",
    b"",
]
NAMES: list[str | bytes] = [
    "content-type",
    "Content-Type",
    b"content-type",
    b"CONTENT-TYPE",
    "schema",
    "Schema",
    b"schema",
    b"SCHEMA",
    "x-trace",
    b"\xffcontent-type",  # not UTF-8: never the content type
    b"sch\xe9ma",
    "\u212a",  # KELVIN SIGN lowers to an ASCII "k"
    "\u0130schema",  # LATIN CAPITAL I WITH DOT ABOVE lowers to two characters
    "sch\udcffema",  # a lone surrogate (a str name as a client may hand it over)
    "é",
    b"\xc3\xa9",
]
HEADER_VALUES: list[bytes | None] = [
    b"application/json",
    b"application/msgpack",
    b"application/x-msgpack",
    b"Application/MsgPack; charset=binary",
    b" application/json ;x",
    b"text/plain",
    b"application/js\xffon",
    b"1",
    b" 1 ",
    b"2",
    b"\xff",
    "é".encode(),
    b"",
    None,
]

names = st.one_of(
    st.sampled_from(NAMES),
    st.text(max_size=16),
    st.binary(max_size=16),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
)
header_values = st.one_of(st.sampled_from(HEADER_VALUES), st.binary(max_size=24))
# Headers a producer may well send, so that many messages get past the header checks.
benign = st.tuples(
    st.sampled_from(["content-type", "Content-Type", b"content-type", "schema", b"Schema", "x-trace"]),
    st.sampled_from([b"application/json", b"application/x-msgpack", b"1", b" 1 ", "é".encode()]),
)
headers_lists = st.lists(st.one_of(benign, benign, st.tuples(names, header_values)), max_size=6)
values = st.one_of(st.sampled_from([*VALUES, None]), st.sampled_from(VALUES), st.binary(max_size=48))
# Repeats weigh the draws towards the limits that let a message reach the later checks.
limits_ = st.builds(
    RequestLimits,
    max_message_bytes=st.sampled_from([1 << 20, 1 << 20, 64, 8]),
    max_text_bytes=st.sampled_from([64 << 10, 16]),
    max_header_bytes=st.sampled_from([16 << 10, 16 << 10, 16 << 10, 64, 24, 0]),
    max_headers=st.sampled_from([64, 64, 64, 64, 2, 1, 0]),
)


@settings(max_examples=1000, deadline=None)
@given(value=values, headers=headers_lists, limits=limits_)
@example(value=VALUES[0], headers=[("\u212a", b"\xff"), (b"schema", None)], limits=RequestLimits())
@example(value=VALUES[1], headers=[(b"CONTENT-TYPE", b"application/x-msgpack")], limits=RequestLimits())
@example(value=VALUES[1], headers=[("content-type", b"application/msgpack")], limits=RequestLimits())
@example(
    value=VALUES[0], headers=[("content-type", b"application/json"), ("schema", b"2")], limits=RequestLimits()
)
@example(value=VALUES[3], headers=[("x", b"\xff"), ("content-type", b"text/plain")], limits=RequestLimits())
def test_one_pass_decode_request_matches_the_four_scans(
    value: bytes | None, headers: list[Header], limits: RequestLimits
) -> None:
    assert outcome(decode_request, value, headers, limits) == outcome(
        reference_decode_request, value, headers, limits
    )
