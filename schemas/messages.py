"""The messages of the wire contract: one source of truth for every producer and worker.

A request is one text in one Kafka message on ``embed.requests``; a result is one
message on ``embed.results`` keyed by the content hash (see ``content_hash.py``).
Both are msgspec Structs, so the JSON Schema (``json_schema.py``) and both encodings
(JSON, msgpack; ``codec.py``) come from these definitions and nothing else.

Vectors are float32. In JSON/msgpack ``vector`` holds each float32 widened exactly to a
float64 (parse as float64, cast to float32: the bits are exact). ``vector_b64`` holds
the standard base64 (with padding) of the little-endian float32 bytes, as the OpenAI
embeddings API does.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Final, Literal

import msgspec
import numpy as np
from numpy.typing import NDArray

# Carried in the Kafka header `schema` and in the JSON Schema `$id`. Bump it on any
# change that an older reader would misread; adding an optional field does not need it.
SCHEMA_VERSION: Final = "1"
# Requests that use ``long`` (pool or chunks) carry this schema header instead: a worker built
# before long inputs refuses it (invalid_request, "unsupported schema version") rather than
# truncating silently a text its requester asked to pool. Workers speak both.
LONG_INPUTS_SCHEMA_VERSION: Final = "2"

REQUEST_ID_MAX_CHARS: Final = 256
# No C0 control characters or DEL: ids end up in headers, logs and terminals.
REQUEST_ID_PATTERN: Final = r"^[^\x00-\x1F\x7F]+$"
TASK_MAX_CHARS: Final = 128
DIMENSIONS_MIN: Final = 1
DIMENSIONS_MAX: Final = 65536
# Kafka's own topic name rules: at most 249 chars of [a-zA-Z0-9._-], and not "." or "..".
REPLY_TO_MAX_CHARS: Final = 249
REPLY_TO_PATTERN: Final = r"^(?!\.\.?$)[a-zA-Z0-9._-]+$"
METADATA_MAX_ENTRIES: Final = 32
METADATA_KEY_MAX_CHARS: Final = 128
METADATA_VALUE_MAX_CHARS: Final = 1024
ERROR_MESSAGE_MAX_CHARS: Final = 1024

EncodingFormat = Literal["float", "base64"]
ENCODING_FORMATS: Final[tuple[EncodingFormat, ...]] = ("float", "base64")

# What a worker does with a text longer than the model reads (issue 24): cut it at the model's
# limit (the default), or split it into windows of the model's limit that overlap by ``overlap``
# tokens, embed every window as a text of its own (batched, deduplicated and cached as any text)
# and return their token-weighted mean, re-normalised ("pool"), or that mean and every window's
# vector with its span of the text ("chunks").
LongInputs = Literal["truncate", "pool", "chunks"]
LONG_INPUTS: Final[tuple[LongInputs, ...]] = ("truncate", "pool", "chunks")
DEFAULT_WINDOW_OVERLAP: Final = 32  # tokens shared by consecutive windows, when not given
WINDOW_OVERLAP_MAX: Final = 256  # and at most a quarter of the model's window (the worker checks)


class ErrorCode(StrEnum):
    """Stable error codes carried in ``EmbedResult.error.code`` and the DLQ headers.

    ===========================  ===============================================================
    invalid_encoding             the bytes are not valid UTF-8 / JSON / msgpack (or nest too deep)
    invalid_request              decodable, but a field is missing, of the wrong type, or malformed
    empty_text                   ``text`` is empty or only whitespace
    text_too_long                ``text`` is longer (in UTF-8 bytes) than the worker accepts
    unknown_task                 ``task`` names no prompt of the model
    unsupported_dimensions       ``dimensions`` is out of range or not offered by the model
    unsupported_encoding_format  ``encoding_format`` is neither ``float`` nor ``base64``
    unsupported_content_type     the ``content-type`` header names an encoding we do not speak
    reply_to_not_allowed         ``reply_to`` names a topic the worker may not write to
    reply_to_unavailable         ``reply_to`` is allowed but names a topic that does not exist
    invalid_headers              a header name or value is not valid UTF-8, or there are too many
    message_too_large            the message (or its headers) is larger than the worker accepts
    metadata_too_large           ``metadata`` has too many entries or too long keys/values
    inference_failed             the model failed on this text (isolated by splitting the batch)
    internal_error               the worker failed for a reason that is not the request's fault
    ===========================  ===============================================================
    """

    INVALID_ENCODING = "invalid_encoding"
    INVALID_REQUEST = "invalid_request"
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LONG = "text_too_long"
    UNKNOWN_TASK = "unknown_task"
    UNSUPPORTED_DIMENSIONS = "unsupported_dimensions"
    UNSUPPORTED_ENCODING_FORMAT = "unsupported_encoding_format"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    REPLY_TO_NOT_ALLOWED = "reply_to_not_allowed"
    REPLY_TO_UNAVAILABLE = "reply_to_unavailable"
    INVALID_HEADERS = "invalid_headers"
    MESSAGE_TOO_LARGE = "message_too_large"
    METADATA_TOO_LARGE = "metadata_too_large"
    INFERENCE_FAILED = "inference_failed"
    INTERNAL_ERROR = "internal_error"


ERROR_CODE_MEANINGS: Final[Mapping[ErrorCode, str]] = MappingProxyType(
    {
        ErrorCode.INVALID_ENCODING: "the bytes are not valid UTF-8 / JSON / msgpack",
        ErrorCode.INVALID_REQUEST: "a field is missing, of the wrong type, or malformed",
        ErrorCode.EMPTY_TEXT: "text is empty or only whitespace",
        ErrorCode.TEXT_TOO_LONG: "text is longer (in UTF-8 bytes) than the worker accepts",
        ErrorCode.UNKNOWN_TASK: "task names no prompt of the model",
        ErrorCode.UNSUPPORTED_DIMENSIONS: "dimensions is out of range or not offered by the model",
        ErrorCode.UNSUPPORTED_ENCODING_FORMAT: "encoding_format is neither float nor base64",
        ErrorCode.UNSUPPORTED_CONTENT_TYPE: "the content-type header names an unknown encoding",
        ErrorCode.REPLY_TO_NOT_ALLOWED: "reply_to names a topic the worker may not write to",
        ErrorCode.REPLY_TO_UNAVAILABLE: "reply_to is allowed but names a topic that does not exist",
        ErrorCode.INVALID_HEADERS: "a header is not valid UTF-8, or there are too many headers",
        ErrorCode.MESSAGE_TOO_LARGE: "the message or its headers exceed the worker's limit",
        ErrorCode.METADATA_TOO_LARGE: "metadata has too many entries or too long keys/values",
        ErrorCode.INFERENCE_FAILED: "the model failed on this text",
        ErrorCode.INTERNAL_ERROR: "the worker failed for a reason that is not the request's fault",
    }
)

RequestId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=REQUEST_ID_MAX_CHARS,
        pattern=REQUEST_ID_PATTERN,
        description="The requester's correlation id, echoed in the result.",
    ),
]
MetadataKey = Annotated[str, msgspec.Meta(max_length=METADATA_KEY_MAX_CHARS)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=METADATA_VALUE_MAX_CHARS)]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    msgspec.Meta(
        max_length=METADATA_MAX_ENTRIES,
        description="String map echoed back in the result unchanged.",
    ),
]


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One text to embed. Unknown fields are ignored; wrong types are errors."""

    id: RequestId
    text: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            description=(
                "The text to embed; must contain a non-whitespace character. "
                "Bounded in UTF-8 bytes by the worker (64 KiB by default)."
            ),
        ),
    ]
    task: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=TASK_MAX_CHARS,
                description="A prompt name of the model (e.g. query, document).",
            ),
        ]
        | None
    ) = None
    dimensions: (
        Annotated[
            int,
            msgspec.Meta(
                ge=DIMENSIONS_MIN,
                le=DIMENSIONS_MAX,
                description="Matryoshka truncation; only for models that declare it.",
            ),
        ]
        | None
    ) = None
    encoding_format: Annotated[
        EncodingFormat,
        msgspec.Meta(description="float: a JSON array; base64: little-endian float32 bytes."),
    ] = "float"
    reply_to: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=REPLY_TO_MAX_CHARS,
                pattern=REPLY_TO_PATTERN,
                description="Results topic override (a Kafka topic name).",
            ),
        ]
        | None
    ) = None
    metadata: Metadata = {}
    long: Annotated[
        LongInputs,
        msgspec.Meta(
            description=(
                "A text longer than the model reads: truncate (cut at its limit, the default), "
                "pool (the token-weighted mean of overlapping windows) or chunks (that mean and "
                "every window's vector with its span)."
            )
        ),
    ] = "truncate"
    overlap: (
        Annotated[
            int,
            msgspec.Meta(
                ge=0,
                le=WINDOW_OVERLAP_MAX,
                description=(
                    "Tokens shared by consecutive windows (pool and chunks; default 32, at most a "
                    "quarter of the model's window)."
                ),
            ),
        ]
        | None
    ) = None

    def long_inputs_spec(self) -> str | None:
        """What the content hash adds for ``long`` (None for truncate: the key of version 1)."""
        return long_inputs_spec(self.long, self.overlap)


def long_inputs_spec(long: str, overlap: int | None) -> str | None:
    """``"pool:32"`` / ``"chunks:32"`` for the windowed modes (the overlap they use), None for
    truncate, whose keys are those of a request without the option."""
    if long == "truncate":
        return None
    return f"{long}:{DEFAULT_WINDOW_OVERLAP if overlap is None else overlap}"


class Chunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One window of a long text (``long: chunks``): its span of the text and its vector."""

    start: Annotated[
        int, msgspec.Meta(ge=0, description="First character (Unicode code point) of the window.")
    ]
    end: Annotated[int, msgspec.Meta(ge=0, description="One past its last character.")]
    tokens: Annotated[int, msgspec.Meta(ge=0, description="Tokens the model read for this window.")]
    vector: list[float] | None = None
    vector_b64: str | None = None


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Why a request produced no vector."""

    # A plain string, not the enum: a reader must accept codes added after it was built.
    code: Annotated[str, msgspec.Meta(examples=[code.value for code in ErrorCode])]
    message: str


class EmbedResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The answer to one request: a vector (``vector`` or ``vector_b64``) or an ``error``."""

    id: str | None = None
    key: Annotated[str | None, msgspec.Meta(description="Content hash: SHA-256 hex, the Kafka key.")] = None
    model: str | None = None
    dim: int | None = None
    vector: list[float] | None = None
    vector_b64: Annotated[
        str | None, msgspec.Meta(description="Base64 of the little-endian float32 bytes.")
    ] = None
    cached: bool = False
    truncated: Annotated[
        bool, msgspec.Meta(description="The text was cut to the model's maximum tokens.")
    ] = False
    tokens: (
        Annotated[
            int,
            msgspec.Meta(
                ge=0,
                description=(
                    "Tokens the model read for this text (special tokens included, after truncation)."
                ),
            ),
        ]
        | None
    ) = None
    metadata: dict[str, str] = {}
    error: ErrorInfo | None = None
    windows: (
        Annotated[
            int,
            msgspec.Meta(ge=1, description="Windows embedded and pooled (long: pool or chunks)."),
        ]
        | None
    ) = None
    chunks: Annotated[
        list[Chunk] | None, msgspec.Meta(description="Every window's span and vector (long: chunks).")
    ] = None

    @classmethod
    def success(
        cls,
        *,
        request_id: str,
        key: str,
        model: str,
        vector: Sequence[float] | NDArray[np.floating],
        encoding_format: EncodingFormat = "float",
        cached: bool = False,
        truncated: bool = False,
        tokens: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> EmbedResult:
        """A result carrying ``vector`` (float) or ``vector_b64`` (base64) as asked."""
        as_float32 = as_float32_vector(vector)
        if encoding_format == "float":
            # float32 -> Python float is exact; as_float32 is already checked (not again here).
            floats, encoded = as_float32.tolist(), None
        elif encoding_format == "base64":
            floats, encoded = None, _b64_of_checked(as_float32)
        else:
            raise ValueError(f"unknown encoding_format {encoding_format!r}")
        return cls(
            id=request_id,
            key=key,
            model=model,
            dim=int(as_float32.shape[0]),
            vector=floats,
            vector_b64=encoded,
            cached=cached,
            truncated=truncated,
            tokens=tokens,
            metadata=dict(metadata or {}),
        )

    @classmethod
    def failure(
        cls,
        *,
        request_id: str | None,
        code: ErrorCode | str,
        message: str,
        key: str | None = None,
        model: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> EmbedResult:
        """A result carrying ``error`` and no vector."""
        return cls(
            id=request_id,
            key=key,
            model=model,
            metadata=dict(metadata or {}),
            error=ErrorInfo(code=str(code), message=truncate_message(message)),
        )

    @property
    def ok(self) -> bool:
        return self.error is None

    def vector_array(self) -> NDArray[np.float32]:
        """The vector as float32, from whichever field carries it."""
        if self.vector_b64 is not None:
            return decode_vector_b64(self.vector_b64)
        if self.vector is not None:
            return np.asarray(self.vector, dtype=np.float32)
        raise ValueError("result carries no vector")


def truncate_message(message: str) -> str:
    """Bound a message: error texts may quote hostile input (e.g. an enum value)."""
    if len(message) <= ERROR_MESSAGE_MAX_CHARS:
        return message
    return message[: ERROR_MESSAGE_MAX_CHARS - 3] + "..."


def as_float32_vector(vector: Sequence[float] | NDArray[np.floating]) -> NDArray[np.float32]:
    """A 1-d, finite float32 copy; JSON cannot carry NaN/inf (msgspec would write null)."""
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1:
        raise ValueError(f"a vector must be 1-d, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("a vector must be finite (no NaN or infinity)")
    return array


def float32_to_floats(vector: Sequence[float] | NDArray[np.floating]) -> list[float]:
    """Float32 values widened exactly to Python floats (the JSON ``vector`` form)."""
    return as_float32_vector(vector).tolist()  # type: ignore[no-any-return]


def encode_vector_b64(vector: Sequence[float] | NDArray[np.floating]) -> str:
    """Standard base64 (padded) of the little-endian float32 bytes."""
    return _b64_of_checked(as_float32_vector(vector))


def _b64_of_checked(vector: NDArray[np.float32]) -> str:
    return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")


def decode_vector_b64(encoded: str) -> NDArray[np.float32]:
    """The float32 vector (native byte order) held by ``encode_vector_b64``'s output."""
    try:
        raw = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError(f"not standard base64: {exc}") from None
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes is not a whole number of float32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)
