"""The HTTP shapes: OpenAI's embeddings request, response and error, and the seed's ``/embed``.

Bodies are decoded and encoded with msgspec (a response of 2048 vectors is ~800k floats). Every
error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``, with the status clients act
on (the ``openai`` SDK maps 400/401/404/413/429/5xx to its exception types and retries 429 and 5xx).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np

from producer.errors import EmbeddingError, Vector


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


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings. Unknown fields are ignored, as OpenAI does."""

    # A string, strings, or token ids (int arrays: refused with a clear message, see input_texts).
    input: str | list[Any]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # accepted and ignored


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


class EmbeddingObject(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


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


def decode_embeddings_request(body: bytes) -> EmbeddingsRequest:
    return _decode(_EMBEDDINGS_DECODER, body)


def decode_seed_request(body: bytes) -> SeedEmbedRequest:
    return _decode(_SEED_DECODER, body)


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


def input_texts(value: str | list[Any], max_inputs: int) -> list[str]:
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
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ApiError(
                400, f"'input[{index}]' must be a string, not {type(item).__name__}", param="input"
            )
    check_count(len(value), max_inputs, "input")
    return value


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


def embedding_payload(vector: Vector, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of the little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values


def embeddings_response(
    vectors: Sequence[Vector], tokens: int, model: str, encoding_format: str
) -> EmbeddingsResponse:
    return EmbeddingsResponse(
        data=[
            EmbeddingObject(index=index, embedding=embedding_payload(vector, encoding_format))
            for index, vector in enumerate(vectors)
        ],
        model=model,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )
