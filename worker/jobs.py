"""What flows through the pipeline: a decoded job, or a rejected message, with where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from schemas import ContentType, EmbedRequest, ErrorCode, RequestError, encode_request
from worker.engine.tokenize import TokenizedText

Headers = list[tuple[str, bytes]]


class Source(NamedTuple):
    """A consumed record's place in Kafka: what its commit covers, where a DLQ copy points. A
    named tuple: one is made per record and hashed in several places (cheaper than a frozen
    dataclass by half)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


# Not frozen (a frozen dataclass's __init__ sets each field through object.__setattr__, several
# times slower, for a few objects per record); treat them as immutable all the same.
@dataclass(slots=True)
class RawMessage:
    """The message as received, kept for its dead-letter copy. Only what that copy needs is kept:
    a valid request's value is released after decoding (the copy is re-encoded from the request),
    and an oversized value is cut to what the DLQ accepts (``original_size`` says how big it was)."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    notes: Headers = ()  # type: ignore[assignment]  # extra DLQ headers (e.g. repaired header names)
    original_size: int | None = None

    @property
    def size(self) -> int:
        """Bytes this record held when it arrived (for in-flight accounting)."""
        value = self.original_size if self.original_size is not None else len(self.value or b"")
        return value + len(self.key or b"") + sum(len(k) + len(v) for k, v in self.headers)


@dataclass(frozen=True, slots=True)
class Window:
    """One window of a long text (``long: pool/chunks``): a text of its own for the cache and the
    model, keyed as a plain request of that text would be."""

    key: str
    tokens: TokenizedText
    start: int  # its span of the request's text, in characters
    end: int


@dataclass(slots=True, eq=False)
class Job:
    source: Source
    raw: RawMessage
    request: EmbedRequest
    key: str  # the content hash: cache key and Kafka key of the result
    dim: int  # the output width (the model's, or the asked Matryoshka dimensions)
    # The model's token ids after prefix and truncation; None until tokenized (a cache hit
    # answered right after decoding never is: worker.hits).
    tokens: TokenizedText | None
    reply_topic: str
    content_type: ContentType
    # A long-input request's windows (request.long is pool or chunks), set when tokenized; the
    # job's own tokens are then only its head.
    windows: tuple[Window, ...] | None = None

    @property
    def batch_tokens(self) -> int:
        """What the job costs the model: its windows' tokens, or its own."""
        if self.windows is not None:
            return sum(len(w.tokens.ids) for w in self.windows)
        return len(self.tokenized.ids)

    @property
    def tokenized(self) -> TokenizedText:
        """The tokens of a job that reached the batcher (every such job was tokenized)."""
        if self.tokens is None:
            raise ValueError(f"request {self.request.id} was not tokenized")
        return self.tokens

    def with_tokens(self, tokens: TokenizedText, windows: tuple[Window, ...] | None = None) -> Job:
        return Job(
            self.source,
            self.raw,
            self.request,
            self.key,
            self.dim,
            tokens,
            self.reply_topic,
            self.content_type,
            windows,
        )

    def rejected(self, code: ErrorCode, message: str, *, reply_topic: str | None = None) -> Rejection:
        """This request answered with an error instead (and dead-lettered), on its own reply
        topic unless another is given."""
        error = RequestError(code, message, self.request.id, request=self.request)
        return Rejection(
            self.source,
            self.raw,
            error,
            reply_topic or self.reply_topic,
            self.content_type,
            key=self.key,
            request=self.request,
        )


# A job and the encoded value of its success result (schemas.encode_success_result), as published.
Answer = tuple[Job, bytes]


@dataclass(slots=True, eq=False)
class Rejection:
    """A message that gets an error result (when its id is known) and a dead-letter copy."""

    source: Source
    raw: RawMessage
    error: RequestError
    reply_topic: str
    content_type: ContentType
    key: str | None = None
    request: EmbedRequest | None = None  # when the request had been decoded (its value re-encodes)

    def reencoded_value(self) -> bytes | None:
        if self.request is None:
            return None
        return encode_request(self.request, self.content_type, limits=None)
