"""The decoder: turns consumed records into jobs.

Every record becomes either a ``Job`` (valid request, content hash computed, tokens counted) or
a ``Rejection`` (bad input, with a stable error code). Nothing is dropped: the pipeline answers
both. The decoder knows the model only through ``ModelContract`` and a token counter.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import ConsumerRecord

from schemas import (
    HEADER_DLQ_HEADERS_REPAIRED,
    HEADER_DLQ_RAW_BATCH,
    ContentHasher,
    ContentType,
    ErrorCode,
    RequestError,
    RequestLimits,
    decode_request_scanned,
    lenient_content_type,
    readable_fields,
    scan_headers,
)
from schemas.cache_layout import ModelContract
from schemas.codec import HeaderScan
from schemas.messages import DEFAULT_WINDOW_OVERLAP
from worker.engine.tokenize import Span, TokenizedText
from worker.jobs import Job, RawMessage, Rejection, Source, Window
from worker.salvage import Unreadable

Tokenize = Callable[[Sequence[str], str | None], list[TokenizedText]]
# A long text's windows (text, task, overlap): worker.engine.Embedder.windows.
SplitWindows = Callable[[str, str | None, int], list[Span]]
# Producers key requests by content hash (64 characters); a key far beyond that is hostile.
MAX_KEY_BYTES = 1024
MAX_REMEMBERED_TOPICS = 4096
# Header lists remembered with their scan, and the largest remembered (values' bytes): a producer
# that sends a new value each time (a trace id) only refills the memory.
MAX_REMEMBERED_HEADERS = 256
MAX_REMEMBERED_HEADER_BYTES = 1024


class RequestDecoder:
    """Turns Kafka records into Jobs (request, content hash, tokens) or Rejections (error code
    and the raw record), never raising on input."""

    def __init__(
        self,
        *,
        model: ModelContract,
        tokenize: Tokenize,
        split_windows: SplitWindows,
        limits: RequestLimits,
        reply_to_pattern: str,
        default_reply_topic: str,
        max_kept_value_bytes: int = 1 << 20,
        max_windows: int = 64,
    ) -> None:
        if model.dim is None:
            raise ValueError("the served model's contract needs its width")
        self._model = model
        self._full_width: int = model.dim
        self._tokenize = tokenize
        self._split_windows = split_windows
        self._max_windows = max_windows
        self._limits = RequestLimits(
            max_message_bytes=limits.max_message_bytes,
            max_text_bytes=limits.max_text_bytes,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            allowed_tasks=model.tasks,
            allowed_dimensions=model.dimensions,
        )
        # A rejected value is kept only as far as its dead-letter copy can carry it.
        self._max_kept_value_bytes = max_kept_value_bytes
        self._reply_to = re.compile(reply_to_pattern)
        self._allowed_topics: dict[str, bool] = {}
        # Header lists seen (producers send the same few over and over): aiokafka's tuple of
        # (name, value) -> the list with null values as b"" and its scan, read once each.
        self._headers_seen: dict[tuple[Any, ...], tuple[list[tuple[str, bytes]], HeaderScan]] = {}
        self._content_hash = ContentHasher(model.fingerprint)
        self._default_reply_topic = default_reply_topic

    def reply_topic_allowed(self, topic: str) -> bool:
        return self._reply_to.fullmatch(topic) is not None

    def _reply_topic_allowed(self, topic: str) -> bool:
        """``reply_topic_allowed``, remembered for the topics seen (most requests name one)."""
        allowed = self._allowed_topics.get(topic)
        if allowed is None:
            allowed = self.reply_topic_allowed(topic)
            if len(self._allowed_topics) >= MAX_REMEMBERED_TOPICS:
                self._allowed_topics.clear()
            self._allowed_topics[topic] = allowed
        return allowed

    def _error_reply_topic(self, error: RequestError) -> str:
        """Where the requester waits: its own reply_to when it could be read (even from a request
        that fails validation) and it is allowed, else the default results topic."""
        reply_to = error.reply_to
        if reply_to is not None and self.reply_topic_allowed(reply_to):
            return reply_to
        return self._default_reply_topic

    def decode(self, records: Sequence[ConsumerRecord[Any, Any]]) -> list[Job | Rejection]:
        """Jobs (tokenized) and rejections, in record order: ``read`` then ``tokenize``."""
        items = self.read(records)
        tokenized = iter(self.tokenize([i for i in items if isinstance(i, Job)]))
        return [next(tokenized) if isinstance(i, Job) else i for i in items]

    def tokenize(self, jobs: Sequence[Job]) -> list[Job | Rejection]:
        """The jobs with their tokens, in order; each task's texts in one call. A long-input
        request (``long: pool/chunks``) also gets its windows, or is rejected when it needs more
        than the worker allows."""
        by_task: dict[str | None, list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            by_task[job.request.task].append(index)
        tokenized: list[Job | Rejection] = list(jobs)
        for task, indices in by_task.items():
            tokens = self._tokenize([jobs[i].request.text for i in indices], task)
            for index, job_tokens in zip(indices, tokens, strict=True):
                job = jobs[index].with_tokens(job_tokens)
                tokenized[index] = job if job.request.long == "truncate" else self._windowed(job)
        return tokenized

    def _windowed(self, job: Job) -> Job | Rejection:
        request = job.request
        overlap = DEFAULT_WINDOW_OVERLAP if request.overlap is None else request.overlap
        try:
            spans = self._split_windows(request.text, request.task, overlap)
        except ValueError as exc:  # an overlap the model's window cannot take
            if request.overlap is not None:
                return job.rejected(ErrorCode.INVALID_REQUEST, str(exc))
            # The default is more than a small model's window takes: the most it takes.
            overlap = 0
            spans = self._split_windows(request.text, request.task, overlap)
        if len(spans) > self._max_windows:
            return job.rejected(
                ErrorCode.TEXT_TOO_LONG,
                f"text needs {len(spans)} windows of the model's tokens (overlap {overlap}); "
                f"this worker embeds at most {self._max_windows} per text (EMBEDFLEET_MAX_WINDOWS)",
            )
        if len(spans) == 1:  # the whole text: its tokens are already there
            texts, tokens = [request.text], [job.tokenized]
        else:
            texts = [request.text[span.start : span.end] for span in spans]
            tokens = self._tokenize(texts, request.task)
        windows = tuple(
            Window(
                self._content_hash(text, task=request.task, dimensions=request.dimensions),
                window_tokens,
                span.start,
                span.end,
            )
            for text, window_tokens, span in zip(texts, tokens, spans, strict=True)
        )
        return job.with_tokens(job.tokenized, windows)

    def read(self, records: Sequence[ConsumerRecord[Any, Any]]) -> list[Job | Rejection]:
        """Jobs (not yet tokenized) and rejections, in record order: everything but the
        tokenizer, so a cache hit can be answered without it."""
        decoded: list[Job | Rejection] = []
        for record in records:
            source = Source(record.topic, record.partition, record.offset, record.timestamp)
            headers, scan = self._headers_of(record.headers)
            content_type = ContentType.JSON
            key_checked = False
            try:
                if record.key is not None and len(record.key) > MAX_KEY_BYTES:
                    raise RequestError(
                        ErrorCode.MESSAGE_TOO_LARGE,
                        f"key is {len(record.key)} bytes; the limit is {MAX_KEY_BYTES}",
                    )
                key_checked = True
                request, content_type = decode_request_scanned(record.value, len(headers), scan, self._limits)
                reply_topic = request.reply_to or self._default_reply_topic
                if not self._reply_topic_allowed(reply_topic):
                    raise RequestError(
                        ErrorCode.REPLY_TO_NOT_ALLOWED,
                        f"reply_to {reply_topic[:64]!r} is not an allowed results topic",
                        request.id,
                        request=request,
                    )
                key = self._content_hash(
                    request.text,
                    task=request.task,
                    dimensions=request.dimensions,
                    long_spec=request.long_inputs_spec(),
                )
            except RequestError as error:
                if key_checked:  # the error result is written as the request was (JSON if unknown)
                    content_type = lenient_content_type(headers)
                if (
                    error.request_id is None
                    and error.request is None
                    and len(record.value or b"") <= self._limits.max_message_bytes
                ):
                    # Refused before the body was read (key, schema header, content type): the
                    # requester still waits for an answer when its id can be read. (An oversized
                    # value is never parsed.)
                    readable = readable_fields(record.value, content_type)
                    if readable.request_id is not None:
                        error = RequestError(
                            error.code, error.message, readable.request_id, reply_to=readable.reply_to
                        )
                decoded.append(
                    Rejection(
                        source,
                        self._kept(RawMessage(record.key, record.value, headers)),
                        error,
                        self._error_reply_topic(error),
                        content_type,
                        request=error.request,
                    )
                )
                continue
            except (ValueError, UnicodeError) as exc:  # content_hash on text it cannot encode
                hash_error = RequestError(ErrorCode.INVALID_REQUEST, str(exc), None)
                raw = RawMessage(record.key, record.value, headers)
                decoded.append(
                    Rejection(source, self._kept(raw), hash_error, self._default_reply_topic, content_type)
                )
                continue
            # The value is released: a dead-letter copy is re-encoded from the request.
            released = RawMessage(record.key, None, headers, original_size=len(record.value or b""))
            decoded.append(
                Job(
                    source,
                    released,
                    request,
                    key,
                    request.dimensions or self._full_width,
                    None,
                    reply_topic,
                    content_type,
                )
            )
        return decoded

    def _headers_of(self, raw: Sequence[Any] | None) -> tuple[list[tuple[str, bytes]], HeaderScan]:
        """A record's headers (aiokafka's names are str, its values bytes or None: None reads
        as b"") and their scan, remembered for the header tuples seen. The list is shared by every
        record with the same headers: nothing changes it."""
        key = tuple(raw or ())
        seen = self._headers_seen.get(key)
        if seen is None:
            headers = [(k, b"" if v is None else v) for k, v in key]
            seen = (headers, scan_headers(headers))
            if len(self._headers_seen) >= MAX_REMEMBERED_HEADERS:
                self._headers_seen.clear()
            if sum(len(v) for _, v in headers) <= MAX_REMEMBERED_HEADER_BYTES:
                self._headers_seen[key] = seen
        return seen

    def _kept(self, raw: RawMessage) -> RawMessage:
        if raw.value is None or len(raw.value) <= self._max_kept_value_bytes:
            return raw
        return RawMessage(
            raw.key, raw.value[: self._max_kept_value_bytes], raw.headers, original_size=len(raw.value)
        )

    def reject_unreadable(self, unreadable: Unreadable) -> Rejection:
        """A record the Kafka client could not unpack: dead-lettered with what could be read of
        it, and answered when its id (and reply_to) can be read from the value."""
        source = Source(
            unreadable.tp.topic, unreadable.tp.partition, unreadable.offset, unreadable.timestamp_ms
        )
        record = unreadable.record
        if record is None:  # a whole batch: nothing of it can be read; its bytes are the copy
            raw = self._kept(RawMessage(None, unreadable.batch, [], notes=[(HEADER_DLQ_RAW_BATCH, b"1")]))
            code = ErrorCode.MESSAGE_TOO_LARGE if unreadable.too_large else ErrorCode.INVALID_ENCODING
            return Rejection(
                source,
                raw,
                RequestError(code, unreadable.reason),
                self._default_reply_topic,
                ContentType.JSON,
            )
        raw = self._kept(
            RawMessage(
                record.key, record.value, record.text_headers(), notes=[(HEADER_DLQ_HEADERS_REPAIRED, b"1")]
            )
        )
        readable = readable_fields(record.value)
        error = RequestError(
            ErrorCode.INVALID_HEADERS, unreadable.reason, readable.request_id, reply_to=readable.reply_to
        )
        return Rejection(source, raw, error, self._error_reply_topic(error), ContentType.JSON)
