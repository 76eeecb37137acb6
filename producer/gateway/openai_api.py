"""The HTTP shapes: OpenAI's embeddings request, response and error, and the seed's ``/embed``.

Bodies are decoded and encoded with msgspec (a response of 2048 vectors is ~800k floats). Every
error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``, with the status clients act
on (the ``openai`` SDK maps 400/401/404/413/429/5xx to its exception types and retries 429 and 5xx).

Extensions of OpenAI's shapes (long inputs, issue 24): the request fields ``long`` (truncate, pool,
chunks) and ``overlap``; for ``long: chunks`` each ``data[i]`` carries ``chunks``; and every
answer says what was read, in the headers ``X-Embedfleet-Truncated`` (inputs cut at the model's
limit) and ``X-Embedfleet-Tokens-Read`` (tokens read over all inputs).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Literal, TypeVar

import msgspec
import numpy as np

from producer.client import ChunkResult
from producer.errors import EmbeddingError, Vector
from schemas import LONG_INPUTS, LongInputs
from schemas.messages import WINDOW_OVERLAP_MAX

# Headers of every answer with vectors: what the model read (a header is left out when some
# input's value is not known, e.g. a cache entry written before workers stored token counts).
TRUNCATED_HEADER = "X-Embedfleet-Truncated"  # inputs cut at the model's limit
TOKENS_READ_HEADER = "X-Embedfleet-Tokens-Read"  # tokens the model read, over all inputs


class ApiError(EmbeddingError):
    """An error answer: HTTP status plus OpenAI's error object (``headers``: e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return _ENCODER.encode(
            ErrorBody(ErrorObject(message=self.message, type=self.type, param=self.param, code=self.code))
        )


# What OpenAI's ``input`` may be: a string, strings, token ids, or arrays of token ids (token ids
# are refused with a clear message, see input_texts). Typed so that a body cannot build other
# objects (nested arrays, maps); how many values it may build is bounded before decoding
# (``check_values``).
TokenIds = list[int]
Input = str | list[str | int | TokenIds]


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings. Unknown fields are ignored, as OpenAI does."""

    input: Input
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # accepted and ignored
    # Extensions: a text longer than the model reads (checked by ``long_inputs``).
    long: str | None = None  # truncate (default), pool or chunks
    overlap: int | None = None  # tokens shared by consecutive windows (pool, chunks)


class SeedEmbedRequest(msgspec.Struct):
    """POST /embed, the seed's shape."""

    texts: list[str]


class ErrorObject(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorObject


class ChunkObject(msgspec.Struct):
    """One window of a long input (``long: chunks``): its span of the text in code points."""

    start: int
    end: int
    tokens: int
    embedding: list[float] | str


class EmbeddingObject(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"
    chunks: list[ChunkObject] | msgspec.UnsetType = msgspec.UNSET  # long: chunks only


class Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct):
    data: list[EmbeddingObject]
    model: str
    usage: Usage
    object: str = "list"


class SeedEmbedResponse(msgspec.Struct):
    embeddings: list[list[float]]
    model: str
    # Per text: cut at the model's limit, and the tokens read (null where not known).
    truncated: list[bool | None] = []
    tokens: list[int | None] = []


class Status(msgspec.Struct):
    """/readyz's answer."""

    status: str
    reason: str | None = None


class ModelObject(msgspec.Struct):
    id: str
    created: int = 0
    owned_by: str = "embedfleet"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"


_ENCODER = msgspec.json.Encoder()
_EMBEDDINGS_DECODER = msgspec.json.Decoder(EmbeddingsRequest)
_SEED_DECODER = msgspec.json.Decoder(SeedEmbedRequest)


def encode(value: msgspec.Struct) -> bytes:
    return _ENCODER.encode(value)


def decode_embeddings_request(body: bytes, max_inputs: int = 2048) -> EmbeddingsRequest:
    check_values(body, max_inputs)
    return _decode(_EMBEDDINGS_DECODER, body)


def decode_seed_request(body: bytes, max_inputs: int = 2048) -> SeedEmbedRequest:
    check_values(body, max_inputs)
    return _decode(_SEED_DECODER, body)


# A JSON string, escapes included (the body is decoded only if it is valid JSON anyway).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Values a request may hold besides its inputs: its other fields, a few unknown ones.
_OTHER_VALUES = 64


def _structure(body: bytes, start: int, end: int) -> int:
    return body.count(b",", start, end) + body.count(b"[", start, end) + body.count(b"{", start, end)


def check_values(body: bytes, max_inputs: int) -> None:
    """Refuses, before decoding, a body that holds more JSON values than ``max_inputs`` texts and
    a few fields need: decoding builds every value first and checks counts after (8 MB of ``[]``
    built ~250 MB of Python objects). Strings are skipped (a text may hold any characters);
    what is left is structure: its commas and brackets count the values. It stops counting past
    the limit, and allocates nothing per value."""
    limit = 2 * max_inputs + _OTHER_VALUES
    values, position = 0, 0
    for string in _JSON_STRING.finditer(body):
        values += _structure(body, position, string.start())
        position = string.end()
        if values > limit:
            break
    else:
        values += _structure(body, position, len(body))
    if values > limit:
        raise ApiError(
            400,
            f"the request holds more than {limit} JSON values; at most {max_inputs} inputs (strings) "
            "are accepted (token-id arrays are not supported: send text)",
            param="input",
            code="invalid_value",
        )


T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        # msgspec says where: "Expected `str`, got `int` - at `$.input[3]`".
        message = str(exc)
        param = message.rpartition("at `$.")[2].rstrip("`").split("[")[0].split(".")[0] or None
        raise ApiError(400, f"invalid request: {message}", param=param, code="invalid_type") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from exc
    except (ValueError, RecursionError, OverflowError) as exc:
        # What msgspec raises past its own checks: invalid UTF-8 inside a string
        # (UnicodeDecodeError), nesting deeper than the interpreter allows. The body's fault: 400.
        what = "nested too deeply" if isinstance(exc, RecursionError) else type(exc).__name__
        raise ApiError(
            400,
            f"the request body cannot be decoded ({what}: {exc}): send UTF-8 JSON",
            code="invalid_json",
        ) from None


def input_texts(value: Input, max_inputs: int) -> list[str]:
    """``input`` as a list of strings, or a 400 saying what is wrong with it."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise ApiError(400, "'input' is empty: send a string or a non-empty array of strings", param="input")
    if all(isinstance(item, int) for item in value) or all(
        isinstance(item, list) and all(isinstance(t, int) for t in item) for item in value
    ):
        raise ApiError(
            400,
            "token-id arrays are not supported by this server: send the text as a string or an array "
            "of strings (the fleet tokenizes with the model's own tokenizer)",
            param="input",
            code="unsupported_input",
        )
    texts: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ApiError(
                400, f"'input[{index}]' must be a string, not {type(item).__name__}", param="input"
            )
        texts.append(item)
    check_count(len(texts), max_inputs, "input")
    return texts


def check_count(count: int, max_inputs: int, param: str) -> None:
    if count == 0:
        raise ApiError(400, f"'{param}' is empty: send at least one text", param=param)
    if count > max_inputs:
        raise ApiError(
            400,
            f"'{param}' has {count} texts; at most {max_inputs} are allowed per request: split it",
            param=param,
            code="too_many_inputs",
        )


def long_inputs(long: str | None, overlap: int | None) -> tuple[LongInputs, int | None]:
    """The request's ``long`` and ``overlap``, or a 400 saying what is wrong with them (the
    overlap is ignored for truncate)."""
    if long is None:
        long = "truncate"
    if long not in LONG_INPUTS:
        raise ApiError(
            400,
            f"'long' must be one of {', '.join(repr(mode) for mode in LONG_INPUTS)}, not {long[:64]!r}",
            param="long",
            code="invalid_value",
        )
    if overlap is not None and not 0 <= overlap <= WINDOW_OVERLAP_MAX:
        raise ApiError(
            400,
            f"'overlap' must be from 0 to {WINDOW_OVERLAP_MAX} tokens, not {overlap}",
            param="overlap",
            code="invalid_value",
        )
    return long, None if long == "truncate" else overlap


def read_headers(truncated: Sequence[bool | None], tokens: Sequence[int | None]) -> dict[str, str]:
    """``X-Embedfleet-Truncated`` and ``X-Embedfleet-Tokens-Read`` for the inputs answered, each
    only when every input's value is known: truncation is never silent, nor guessed."""
    headers = {}
    if all(t is not None for t in truncated):
        headers[TRUNCATED_HEADER] = str(sum(1 for t in truncated if t))
    if all(t is not None for t in tokens):
        headers[TOKENS_READ_HEADER] = str(sum(t or 0 for t in tokens))
    return headers


def embedding_payload(vector: Vector, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of the little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values


def chunk_objects(chunks: Sequence[ChunkResult], encoding_format: str) -> list[ChunkObject]:
    return [
        ChunkObject(
            start=chunk.start,
            end=chunk.end,
            tokens=chunk.tokens,
            embedding=embedding_payload(chunk.vector, encoding_format),
        )
        for chunk in chunks
    ]


def embeddings_response(
    vectors: Sequence[Vector],
    tokens: int,
    model: str,
    encoding_format: str,
    chunks: Sequence[Sequence[ChunkResult] | None] | None = None,
) -> EmbeddingsResponse:
    """OpenAI's answer; ``chunks`` (``long: chunks``): every input's windows, as ``data[i].chunks``."""
    windows = chunks or [None] * len(vectors)
    return EmbeddingsResponse(
        data=[
            EmbeddingObject(
                index=index,
                embedding=embedding_payload(vector, encoding_format),
                chunks=msgspec.UNSET if spans is None else chunk_objects(spans, encoding_format),
            )
            for index, (vector, spans) in enumerate(zip(vectors, windows, strict=True))
        ],
        model=model,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )
