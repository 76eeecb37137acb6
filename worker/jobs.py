"""What flows through the pipeline: a decoded job, or a rejected message, with where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from schemas import ContentType, EmbedRequest, RequestError

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Source:
    """A consumed record's place in Kafka: what its commit covers, where a DLQ copy points."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class RawMessage:
    """The message as received, kept so a failure can send it unchanged to the dead-letter topic."""

    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass(frozen=True, slots=True)
class Job:
    source: Source
    raw: RawMessage
    request: EmbedRequest
    key: str  # the content hash: cache key and Kafka key of the result
    dim: int  # the output width (the model's, or the asked Matryoshka dimensions)
    tokens: int  # model tokens after prefix and truncation
    reply_topic: str
    content_type: ContentType


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message that gets an error result (when its id is known) and a dead-letter copy."""

    source: Source
    raw: RawMessage
    error: RequestError
    reply_topic: str
    content_type: ContentType
    key: str | None = None
