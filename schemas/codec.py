"""Bytes <-> messages, chosen by the Kafka header ``content-type``.

``application/json`` is the default (when the header is absent); ``application/msgpack``
(alias ``application/x-msgpack``) is the compact option. Media-type parameters
(``; charset=utf-8``) are ignored. Anything else is ``unsupported_content_type``.

``decode_request`` never raises anything but ``RequestError`` on hostile input. Checks
run cheapest first: tombstone, header size, message size (before any parsing), content
type, schema version, strict typed decode, then the rules that need the decoded request.
The headers are read once, in one pass, for all their checks.
When the request cannot be decoded but its ``id`` can (a lenient second decode of just
``{"id": str}``), the error carries that id so the worker can answer the requester.

Duplicate keys in a JSON object: the last one wins (msgspec's behaviour).
Nesting: msgspec guards its recursion with Python's recursion limit and raises
RecursionError, which becomes ``invalid_encoding``.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import msgspec
import numpy as np
import orjson
from numpy.typing import NDArray

from schemas.errors import SchemaError
from schemas.messages import (
    LONG_INPUTS_SCHEMA_VERSION,
    REQUEST_ID_MAX_CHARS,
    REQUEST_ID_PATTERN,
    SCHEMA_VERSION,
    Chunk,
    EmbedRequest,
    EmbedResult,
    EncodingFormat,
    ErrorCode,
    truncate_message,
)

HEADER_CONTENT_TYPE: Final = "content-type"
HEADER_SCHEMA: Final = "schema"
# Set by the worker on messages it sends to the dead-letter topic.
HEADER_DLQ_REASON: Final = "dlq-reason"
HEADER_DLQ_ERROR_CODE: Final = "dlq-error-code"
HEADER_DLQ_SOURCE_TOPIC: Final = "dlq-source-topic"
HEADER_DLQ_SOURCE_PARTITION: Final = "dlq-source-partition"
HEADER_DLQ_SOURCE_OFFSET: Final = "dlq-source-offset"
HEADER_DLQ_WORKER: Final = "dlq-worker"
# Notes on a dead letter that is not the original message byte for byte.
HEADER_DLQ_TRUNCATED_VALUE: Final = "dlq-truncated-value"  # value cut to fit (original size)
HEADER_DLQ_TRUNCATED_KEY: Final = "dlq-truncated-key"  # key cut (original size)
HEADER_DLQ_DROPPED_HEADERS: Final = "dlq-dropped-headers"  # original headers dropped (how many)
HEADER_DLQ_REENCODED: Final = "dlq-value-reencoded"  # value re-encoded from the decoded request
HEADER_DLQ_HEADERS_REPAIRED: Final = "dlq-headers-repaired"  # header names were not UTF-8
HEADER_DLQ_RAW_BATCH: Final = "dlq-raw-batch"  # value is a whole unreadable record batch
HEADER_DLQ_NULL_VALUE: Final = "dlq-null-value"  # the original value was null (copy: empty)
HEADER_DLQ_GENERATED_KEY: Final = "dlq-generated-key"  # the original key was null (copy: generated)

SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({SCHEMA_VERSION, LONG_INPUTS_SCHEMA_VERSION})

# A Kafka header as clients hand it over: aiokafka uses (str, bytes); values may be null.
Header = tuple[str | bytes, bytes | None]


class ContentType(StrEnum):
    JSON = "application/json"
    MSGPACK = "application/msgpack"


CONTENT_TYPE_ALIASES: Final = {
    "application/json": ContentType.JSON,
    "application/msgpack": ContentType.MSGPACK,
    "application/x-msgpack": ContentType.MSGPACK,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestLimits:
    """What a worker accepts. The ``allowed_*`` sets are checked only when given."""

    max_message_bytes: int = 1 << 20
    max_text_bytes: int = 64 << 10  # UTF-8 bytes of `text`
    max_header_bytes: int = 16 << 10  # all header names and values together
    max_headers: int = 64  # header count; a request needs two (content-type, schema)
    allowed_tasks: frozenset[str] | None = None
    allowed_dimensions: frozenset[int] | None = None
    allowed_reply_to: frozenset[str] | None = None


DEFAULT_REQUEST_LIMITS: Final = RequestLimits()


class RequestError(SchemaError):
    """A request the worker must answer with an error result (and send to the DLQ).

    ``request_id`` is the requester's id when it could be read; ``request`` is the
    decoded request when only a later rule failed (to echo its metadata); ``reply_to`` is
    the requester's results topic when it could be read (a lenient decode finds it even in a
    request that fails validation), so the error reaches a requester on a private topic.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        request_id: str | None = None,
        *,
        request: EmbedRequest | None = None,
        reply_to: str | None = None,
    ) -> None:
        self.code = code
        self.message = truncate_message(message)
        self.request_id = request_id
        self.request = request
        self.reply_to = (
            reply_to if reply_to is not None else (request.reply_to if request is not None else None)
        )
        super().__init__(f"{code}: {self.message}")

    def to_result(self, *, key: str | None = None, model: str | None = None) -> EmbedResult:
        """The error result to send back to the requester."""
        return EmbedResult.failure(
            request_id=self.request_id,
            code=self.code,
            message=self.message,
            key=key,
            model=model,
            metadata=self.request.metadata if self.request is not None else None,
        )


class ResultDecodeError(SchemaError, ValueError):
    """A result message that is not a valid ``EmbedResult``."""


class _IdProbe(msgspec.Struct):
    """The lenient second decode: only ``id`` and ``reply_to``; everything else is skipped."""

    id: str | None = None
    reply_to: str | None = None


@dataclass(frozen=True, slots=True)
class Readable:
    """What a lenient decode could read of a request that fails validation."""

    request_id: str | None = None
    reply_to: str | None = None


_REQUEST_ID_RE: Final = re.compile(REQUEST_ID_PATTERN)
# msgspec names the failing field in its messages: "... - at `$.field`".
_ERROR_FIELD_RE: Final = re.compile(r"`\$\.([A-Za-z_]+)")

_JSON_REQUEST_DECODER: Final = msgspec.json.Decoder(EmbedRequest)
_MSGPACK_REQUEST_DECODER: Final = msgspec.msgpack.Decoder(EmbedRequest)
_JSON_ID_DECODER: Final = msgspec.json.Decoder(_IdProbe)
_MSGPACK_ID_DECODER: Final = msgspec.msgpack.Decoder(_IdProbe)
_JSON_RESULT_DECODER: Final = msgspec.json.Decoder(EmbedResult)
_MSGPACK_RESULT_DECODER: Final = msgspec.msgpack.Decoder(EmbedResult)
_JSON_ENCODER: Final = msgspec.json.Encoder()
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()

# Errors a decoder may raise on hostile bytes, besides its own ValidationError.
# UnicodeDecodeError: invalid UTF-8 in a msgpack/JSON string; RecursionError: deep
# nesting; ValueError/OverflowError: numbers msgspec cannot represent.
_UNDECODABLE: Final = (msgspec.DecodeError, ValueError, RecursionError, OverflowError)


def _header_name(name: str | bytes) -> str:
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace").lower()
    return name.lower()


def _last_header(headers: Sequence[Header], name: str) -> bytes | None:
    """The last value of a header (as Kafka's Java client's ``lastHeader``), or None."""
    found: bytes | None = None
    for header_name, value in headers:
        if _header_name(header_name) == name:
            found = value if value is not None else b""
    return found


# The exact header values producers send, looked up before any parsing.
_EXACT_CONTENT_TYPES: Final = {name.encode("ascii"): kind for name, kind in CONTENT_TYPE_ALIASES.items()}


def _content_type_from(raw: bytes | None) -> ContentType:
    """The encoding a ``content-type`` value names (None: the header is absent, JSON)."""
    if raw is None:
        return ContentType.JSON
    exact = _EXACT_CONTENT_TYPES.get(raw)
    if exact is not None:
        return exact
    media_type = raw.split(b";", 1)[0].strip().lower()
    try:
        return CONTENT_TYPE_ALIASES[media_type.decode("ascii")]
    except (UnicodeDecodeError, KeyError):
        shown = media_type[:64].decode("ascii", "replace")
        raise RequestError(
            ErrorCode.UNSUPPORTED_CONTENT_TYPE, f"unsupported content-type {shown!r}"
        ) from None


def content_type_of(headers: Sequence[Header]) -> ContentType:
    """The message's encoding; JSON when the header is absent."""
    return _content_type_from(_last_header(headers, HEADER_CONTENT_TYPE))


def _lenient_content_type_from(raw: bytes | None) -> ContentType:
    try:
        return _content_type_from(raw)
    except RequestError:
        return ContentType.JSON


# What decode_request needs of the headers, read in one pass (a plain tuple: one object):
# their size in bytes (names in UTF-8, as Kafka counts them, and values); the last
# `content-type` value and the last `schema` value (a null value reads as b"", None: absent);
# the name of the first header whose name or value is not UTF-8 (None: all are).
HeaderScan = tuple[int, bytes | None, bytes | None, str | None]


def scan_headers(headers: Sequence[Header]) -> HeaderScan:
    """Size, content type, schema version and UTF-8 check of the headers, in one pass: what
    ``decode_request_scanned`` needs of them. The same headers always give the same scan, so a
    reader may keep it for headers it sees again.

    Equivalent to summing the sizes, two ``_last_header`` look-ups and a UTF-8 check of every
    name and value in turn (``tests/schemas/test_header_scan.py`` checks it against them).
    """
    size = 0
    content_type: bytes | None = None
    schema: bytes | None = None
    not_utf8: str | None = None
    for name, value in headers:
        if isinstance(name, bytes):
            size += len(name)
            if name.isascii():
                text = name.decode("ascii")
            else:
                try:
                    text = name.decode("utf-8")
                except UnicodeDecodeError:
                    text = name.decode("utf-8", "replace")
                    if not_utf8 is None:
                        not_utf8 = text
        else:
            text = name
            size += len(name) if name.isascii() else len(name.encode("utf-8", "replace"))
        if value is not None:
            size += len(value)
            if not_utf8 is None and not value.isascii():
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    not_utf8 = text
        lowered = text.lower()
        if lowered == HEADER_CONTENT_TYPE:
            content_type = value if value is not None else b""
        elif lowered == HEADER_SCHEMA:
            schema = value if value is not None else b""
    return size, content_type, schema, not_utf8


def is_valid_request_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= REQUEST_ID_MAX_CHARS
        and _REQUEST_ID_RE.match(value) is not None
    )


def readable_fields(value: bytes | None, content_type: ContentType = ContentType.JSON) -> Readable:
    """The request id (if valid) and reply_to a lenient decode finds; empty on any failure."""
    if not value:
        return Readable()
    decoder = _JSON_ID_DECODER if content_type is ContentType.JSON else _MSGPACK_ID_DECODER
    try:
        probe = decoder.decode(value)
    except (*_UNDECODABLE, msgspec.ValidationError):
        return Readable()
    request_id = probe.id if is_valid_request_id(probe.id) else None
    reply_to = probe.reply_to if probe.reply_to and len(probe.reply_to) <= 249 else None
    return Readable(request_id, reply_to if request_id is not None else None)


def _undecodable(code: ErrorCode, message: str, value: bytes, content_type: ContentType) -> RequestError:
    readable = readable_fields(value, content_type)
    return RequestError(code, message, readable.request_id, reply_to=readable.reply_to)


def _code_for_validation_error(message: str) -> ErrorCode:
    """Map msgspec's message to a specific code by the field it names."""
    match = _ERROR_FIELD_RE.search(message)
    field = match.group(1) if match else None
    if field == "text" and "length" in message:
        return ErrorCode.EMPTY_TEXT
    if field == "dimensions" and any(s in message for s in (">=", "<=", "out of range")):
        return ErrorCode.UNSUPPORTED_DIMENSIONS
    if field == "encoding_format" and message.startswith("Invalid enum value"):
        return ErrorCode.UNSUPPORTED_ENCODING_FORMAT
    if field == "metadata" and "of length" in message:
        return ErrorCode.METADATA_TOO_LARGE
    return ErrorCode.INVALID_REQUEST


_SUPPORTED_SCHEMA_VALUES: Final = frozenset(v.encode("ascii") for v in SUPPORTED_SCHEMA_VERSIONS)


def _check_schema_version(raw: bytes | None) -> None:
    """``raw``: the last ``schema`` header's value, None when absent (accepted)."""
    if raw is None or raw in _SUPPORTED_SCHEMA_VALUES:
        return
    version = raw.decode("utf-8", "replace").strip()
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise RequestError(
            ErrorCode.INVALID_REQUEST,
            f"unsupported schema version {version[:32]!r}; "
            f"this worker speaks {sorted(SUPPORTED_SCHEMA_VERSIONS)}",
        )


def _check_rules(request: EmbedRequest, limits: RequestLimits) -> None:
    """The rules msgspec's types cannot express (configurable or semantic)."""

    def fail(code: ErrorCode, message: str) -> RequestError:
        return RequestError(code, message, request.id, request=request)

    text = request.text
    if text.isascii():  # most texts: no copy to count their UTF-8 bytes
        text_bytes = len(text)
    else:
        try:
            text_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            # msgspec rejects lone surrogates already; kept so content_hash can never see one.
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


def decode_request(
    value: bytes | None,
    headers: Sequence[Header],
    limits: RequestLimits = DEFAULT_REQUEST_LIMITS,
) -> EmbedRequest:
    """Decode and validate one request message; raises only ``RequestError``."""
    return decode_request_and_type(value, headers, limits)[0]


def lenient_content_type(headers: Sequence[Header]) -> ContentType:
    """``content_type_of``, or JSON where the header names no encoding this contract knows."""
    return _lenient_content_type_from(_last_header(headers, HEADER_CONTENT_TYPE))


def decode_request_and_type(
    value: bytes | None,
    headers: Sequence[Header],
    limits: RequestLimits = DEFAULT_REQUEST_LIMITS,
) -> tuple[EmbedRequest, ContentType]:
    """``decode_request``, and the content type it read the value as (the headers are read
    once)."""
    return decode_request_scanned(value, len(headers), scan_headers(headers), limits)


def decode_request_scanned(
    value: bytes | None,
    header_count: int,
    scan: HeaderScan,
    limits: RequestLimits = DEFAULT_REQUEST_LIMITS,
) -> tuple[EmbedRequest, ContentType]:
    """``decode_request_and_type`` for headers already scanned (``scan_headers``)."""
    if value is None:
        raise RequestError(ErrorCode.INVALID_REQUEST, "message has no value (a tombstone)")
    # Header problems are checked first (they are cheap), but the id is still read when the value
    # is of an acceptable size, so the requester gets its error.
    small = len(value) <= limits.max_message_bytes
    header_size, content_type_raw, schema_raw, not_utf8 = scan
    if header_count > limits.max_headers:
        message = f"message has {header_count} headers; the limit is {limits.max_headers}"
        if small:
            raise _undecodable(
                ErrorCode.INVALID_HEADERS, message, value, _lenient_content_type_from(content_type_raw)
            )
        raise RequestError(ErrorCode.INVALID_HEADERS, message)
    if header_size > limits.max_header_bytes:
        message = f"headers are {header_size} bytes; the limit is {limits.max_header_bytes}"
        if small:
            raise _undecodable(
                ErrorCode.MESSAGE_TOO_LARGE, message, value, _lenient_content_type_from(content_type_raw)
            )
        raise RequestError(ErrorCode.MESSAGE_TOO_LARGE, message)
    if not small:
        raise RequestError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"message is {len(value)} bytes; the limit is {limits.max_message_bytes}",
        )
    content_type = _content_type_from(content_type_raw)
    _check_schema_version(schema_raw)
    if not_utf8 is not None:
        # Header names and values are text in this contract (Kafka allows any bytes in values):
        # a header that is not UTF-8 is an error, never passed on half-decoded.
        raise _undecodable(
            ErrorCode.INVALID_HEADERS,
            f"header {not_utf8[:64]!r} is not valid UTF-8",
            value,
            content_type,
        )
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
    _check_rules(request, limits)
    return request, content_type


def _encode(message: EmbedRequest | EmbedResult, content_type: ContentType) -> bytes:
    if content_type is ContentType.JSON:
        return _JSON_ENCODER.encode(message)
    return _MSGPACK_ENCODER.encode(message)


def encode_request(
    request: EmbedRequest,
    content_type: ContentType = ContentType.JSON,
    *,
    limits: RequestLimits | None = DEFAULT_REQUEST_LIMITS,
) -> bytes:
    """Encode a request; with ``limits``, check it as a worker would (``RequestError``)."""
    value = _encode(request, content_type)
    if limits is not None:
        decode_request(value, request_headers(content_type), limits)
    return value


def request_headers(
    content_type: ContentType = ContentType.JSON, *, long_inputs: bool = False
) -> list[tuple[str, bytes]]:
    """The headers a producer sets on a request (``long_inputs``: the request sets ``long`` to
    pool or chunks, so its schema is LONG_INPUTS_SCHEMA_VERSION)."""
    version = LONG_INPUTS_SCHEMA_VERSION if long_inputs else SCHEMA_VERSION
    return [
        (HEADER_CONTENT_TYPE, content_type.value.encode("ascii")),
        (HEADER_SCHEMA, version.encode("ascii")),
    ]


def encode_result(result: EmbedResult, content_type: ContentType = ContentType.JSON) -> bytes:
    return _encode(result, content_type)


class _SuccessFrame(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``EmbedResult``'s fields in its order, under its options, with the vector already encoded:
    msgspec writes every other field exactly as it writes an ``EmbedResult`` and splices the
    ``Raw`` bytes as they are (``tests/schemas/test_success_encoding.py`` holds the two together).
    """

    id: str | None = None
    key: str | None = None
    model: str | None = None
    dim: int | None = None
    vector: msgspec.Raw | None = None
    vector_b64: msgspec.Raw | None = None
    cached: bool = False
    truncated: bool = False
    tokens: int | None = None
    metadata: dict[str, str] = {}
    error: None = None
    windows: int | None = None
    chunks: list[Chunk] | None = None


_ORJSON_NUMPY: Final = orjson.OPT_SERIALIZE_NUMPY
# A msgpack float as msgspec writes a Python float: the float 64 marker, then big-endian bytes.
_MSGPACK_FLOAT64: Final = np.dtype([("marker", "u1"), ("value", ">f8")])


def _msgpack_array_header(length: int) -> bytes:
    if length < 16:
        return bytes((0x90 | length,))
    if length < 1 << 16:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


def _msgpack_str_header(length: int) -> bytes:
    if length < 32:
        return bytes((0xA0 | length,))
    if length < 1 << 8:
        return b"\xd9" + length.to_bytes(1, "big")
    if length < 1 << 16:
        return b"\xda" + length.to_bytes(2, "big")
    return b"\xdb" + length.to_bytes(4, "big")


def _float_vector(vector: NDArray[np.float32], content_type: ContentType) -> msgspec.Raw:
    """``EmbedResult.vector``, encoded."""
    if content_type is ContentType.JSON:
        # The shortest text of each float32 value (orjson writes float32 arrays with Ryu's f32
        # algorithm), which reads back exactly under the contract's rule (parse as float64, cast
        # to float32: float64 has more than twice float32's precision, so the double rounding
        # cannot change the value). About 4.7 KB for 384 dims instead of 8.3 KB as float64 text,
        # and 7 us instead of 20 (bench/hit_codec.py).
        return msgspec.Raw(orjson.dumps(np.ascontiguousarray(vector, dtype=np.float32), option=_ORJSON_NUMPY))
    items = np.empty(vector.shape[0], dtype=_MSGPACK_FLOAT64)
    items["marker"] = 0xCB
    items["value"] = vector  # float32 -> float64 is exact
    return msgspec.Raw(_msgpack_array_header(vector.shape[0]) + items.tobytes())


def _b64_vector(vector: NDArray[np.float32], content_type: ContentType) -> msgspec.Raw:
    """``EmbedResult.vector_b64`` as msgspec writes it."""
    b64 = binascii.b2a_base64(vector.astype("<f4", copy=False).tobytes(), newline=False)
    if content_type is ContentType.JSON:
        return msgspec.Raw(b'"' + b64 + b'"')  # the base64 alphabet needs no JSON escape
    return msgspec.Raw(_msgpack_str_header(len(b64)) + b64)


def encode_vector(
    vector: NDArray[np.float32], encoding_format: EncodingFormat, content_type: ContentType
) -> msgspec.Raw:
    """A success result's vector field as encoded in its value (``vector`` for "float",
    ``vector_b64`` for "base64"), under ``encode_success_result``'s precondition."""
    if encoding_format == "float":
        return _float_vector(vector, content_type)
    if encoding_format == "base64":
        return _b64_vector(vector, content_type)
    raise ValueError(f"unknown encoding_format {encoding_format!r}")


def encode_success_result(
    *,
    request_id: str,
    key: str,
    model: str,
    vector: NDArray[np.float32],
    encoding_format: EncodingFormat = "float",
    cached: bool = False,
    truncated: bool = False,
    tokens: int | None = None,
    metadata: Mapping[str, str] | None = None,
    content_type: ContentType = ContentType.JSON,
    encoded_vector: msgspec.Raw | None = None,
    windows: int | None = None,
    chunks: list[Chunk] | None = None,
) -> bytes:
    """The encoded value of a success result, without building an ``EmbedResult`` or a Python
    float per value: the same bytes as
    ``encode_result(EmbedResult.success(...same arguments...), content_type)``, except that a JSON
    float vector is written as the shortest text of each float32 value rather than of its float64
    widening (the same vector under the contract's rule, in about half the bytes).

    Precondition, not checked here: ``vector`` is a 1-d float32 numpy array whose values are all
    finite (the worker checks a whole batch at once). ``EmbedResult.success`` raises on NaN or
    infinity; this function would write them (``null`` in a JSON float array, as they are in
    msgpack and base64), which no reader of the contract accepts as a vector. Only the dtype and
    the shape are checked (``TypeError``, ``ValueError``), and ``encoding_format``
    (``ValueError``). ``metadata`` is encoded as given, not copied. ``encoded_vector``: what
    ``encode_vector`` gave for this vector, format and content type (a worker keeps the wire
    forms of hot keys), written as given.
    """
    if vector.dtype.kind != "f" or vector.dtype.itemsize != 4:
        raise TypeError(f"a vector must be float32, got {vector.dtype}")
    if vector.ndim != 1:
        raise ValueError(f"a vector must be 1-d, got shape {vector.shape}")
    encoded = encoded_vector or encode_vector(vector, encoding_format, content_type)
    floats, b64 = (encoded, None) if encoding_format == "float" else (None, encoded)
    frame = _SuccessFrame(
        id=request_id,
        key=key,
        model=model,
        dim=vector.shape[0],
        vector=floats,
        vector_b64=b64,
        cached=cached,
        truncated=truncated,
        tokens=tokens,
        metadata=metadata if type(metadata) is dict else dict(metadata or {}),
        windows=windows,
        chunks=chunks,
    )
    if content_type is ContentType.JSON:
        return _JSON_ENCODER.encode(frame)
    return _MSGPACK_ENCODER.encode(frame)


def result_headers(content_type: ContentType = ContentType.JSON) -> list[tuple[str, bytes]]:
    """The headers a worker sets on a result."""
    return request_headers(content_type)


def decode_result(value: bytes, headers: Sequence[Header] = ()) -> EmbedResult:
    """Decode a result message (for clients); raises ``ResultDecodeError``."""
    try:
        content_type = content_type_of(headers)
    except RequestError as exc:
        raise ResultDecodeError(exc.message) from None
    decoder = _JSON_RESULT_DECODER if content_type is ContentType.JSON else _MSGPACK_RESULT_DECODER
    try:
        return decoder.decode(value)
    except (*_UNDECODABLE, msgspec.ValidationError) as exc:
        raise ResultDecodeError(f"invalid result: {exc}") from None


def dlq_headers(
    *,
    code: ErrorCode,
    reason: str,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    worker: str,
) -> list[tuple[str, bytes]]:
    """The headers a worker adds to a message it sends to the dead-letter topic."""
    return [
        (HEADER_DLQ_ERROR_CODE, code.value.encode("ascii")),
        (HEADER_DLQ_REASON, truncate_message(reason).encode("utf-8", "replace")),
        (HEADER_DLQ_SOURCE_TOPIC, source_topic.encode("utf-8")),
        (HEADER_DLQ_SOURCE_PARTITION, str(source_partition).encode("ascii")),
        (HEADER_DLQ_SOURCE_OFFSET, str(source_offset).encode("ascii")),
        (HEADER_DLQ_WORKER, worker.encode("utf-8", "replace")),
    ]
