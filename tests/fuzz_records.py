"""A seeded generator of arbitrary Kafka records for the record fuzzer (tests/faults/test_fuzz.py).

Pure: a seed, the topic names and a count in, record batches out (``RecordGenerator.batches``), each
record classified when it is made, so the fuzzer knows what the fleet owes it:

* ``SUCCESS``: a valid request with a unique id: a success result on its reply topic (the default
  results topic when it names none), no error result, no dead letter;
* ``UNAVAILABLE``: a valid request whose reply topic matches the allow-list but refuses the write
  (tiny ``max.message.bytes``) or does not exist: a ``reply_to_unavailable`` error result on the
  default results topic and a dead letter;
* ``SUCCESS_OR_UNAVAILABLE``: a valid request whose reply topic may take the write or not (a
  timestamp bound the broker checks against its own clock; ``min.insync.replicas`` above the
  replica count, which Kafka 4.1 caps): either of the two above;
* ``REJECTED``: anything else (random bytes, JSON-like values, tombstones, hostile headers, sizes
  past a limit, bad fields, unreadable or undecompressable batches): a dead letter (matched by its
  source partition and offset) or an error result for its id, never a success result.

Records are written as raw record batches (``encode_batch``, message format v2), so that keys and
values can be null, header names can be bytes that are not UTF-8 (aiokafka's producer and Kafka's
Java client only write ``str`` names), every codec can be chosen, and a bad record can sit first,
in the middle or last of a batch among good ones. Values are made one batch at a time and never
kept: the fuzzer keeps ``RecordInfo`` (a short description) per record.
"""

from __future__ import annotations

import json
import random
import string
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import msgspec
from aiokafka.codec import gzip_encode, lz4_encode, snappy_encode, zstd_encode
from aiokafka.record.util import calc_crc32c

from schemas.codec import DEFAULT_REQUEST_LIMITS
from worker.decoder import MAX_KEY_BYTES
from worker.records import DEFAULT_MAX_EXPANDED_BYTES

RawHeaders = list[tuple[bytes, bytes | None]]

MAX_MESSAGE_BYTES: Final = DEFAULT_REQUEST_LIMITS.max_message_bytes  # 1 MiB
MAX_TEXT_BYTES: Final = DEFAULT_REQUEST_LIMITS.max_text_bytes  # 64 KiB
MAX_HEADER_BYTES: Final = DEFAULT_REQUEST_LIMITS.max_header_bytes  # 16 KiB
MAX_HEADERS: Final = DEFAULT_REQUEST_LIMITS.max_headers  # 64
# Kafka's codec ids in a batch's attributes.
CODECS: Final = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
# Values larger than this go in a batch of their own (the requests topic takes 10 MiB batches).
SMALL_BATCH_BYTES: Final = 2 << 20


class Expect(StrEnum):
    SUCCESS = "success"
    UNAVAILABLE = "unavailable"
    SUCCESS_OR_UNAVAILABLE = "success-or-unavailable"
    REJECTED = "rejected"


# Reply topics the fuzzer creates (suffixes of the fleet's results topic, so they match the
# default allow-list `embed\.results.*`), with the configuration each is created with.
BENIGN_REPLY_TOPICS: Final[dict[str, tuple[int, dict[str, str]]]] = {
    "plain": (3, {}),
    "logappend": (2, {"message.timestamp.type": "LogAppendTime"}),
    "compact": (2, {"cleanup.policy": "compact", "max.compaction.lag.ms": "1000"}),
    "wide": (24, {}),
    "zstd": (1, {"compression.type": "zstd"}),
}
REFUSING_REPLY_TOPICS: Final[dict[str, tuple[int, dict[str, str]]]] = {
    # Every result (a few KB) is over it; short error results may fit.
    "tiny": (2, {"max.message.bytes": "512"}),
}
FLAKY_REPLY_TOPICS: Final[dict[str, tuple[int, dict[str, str]]]] = {
    # A record whose CreateTime is any earlier than the broker's clock is refused: most are.
    "ts-bound": (1, {"message.timestamp.before.max.ms": "0"}),
    # Replication factor 1 with min.insync.replicas 2: acks=all writes never succeed on a broker
    # that enforces it; Kafka 4.1 caps the effective min ISR at the replica count and acknowledges
    # them (measured on the local stack), so either outcome is accepted.
    "noack": (1, {"min.insync.replicas": "2"}),
}


@dataclass(frozen=True, slots=True)
class Topics:
    """The names the generator writes into records."""

    requests: str
    results: str  # the default results topic
    dlq: str

    def reply(self, label: str) -> str:
        return f"{self.results}.fz-{label}"

    def all_reply_topics(self) -> dict[str, tuple[int, dict[str, str]]]:
        """Every reply topic to create before the run: name -> (partitions, configs)."""
        return {
            self.reply(label): spec
            for label, spec in {**BENIGN_REPLY_TOPICS, **REFUSING_REPLY_TOPICS, **FLAKY_REPLY_TOPICS}.items()
        }


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """What the fuzzer keeps of a record: its kind, what it is owed, and how to show it."""

    index: int
    kind: str
    expect: Expect
    request_id: str | None  # the id a worker can read from it (None: none readable)
    reply_topic: str | None  # where a success result belongs (None: the default results topic)
    position: str  # only / first / middle / last in its record batch
    codec: str
    shown: str  # a short repr of key, value and headers, for a failure message


@dataclass(frozen=True, slots=True)
class FuzzRecord:
    info: RecordInfo
    key: bytes | None
    value: bytes | None
    headers: RawHeaders


@dataclass(frozen=True, slots=True)
class FuzzBatch:
    partition: int
    codec: str
    records: list[FuzzRecord]
    compressed_records: bytes | None = None  # a decompression bomb's, made compressed

    def encode(self, timestamp_ms: int) -> bytes:
        return encode_batch(
            [(r.key, r.value, r.headers) for r in self.records],
            self.codec,
            timestamp_ms,
            compressed_records=self.compressed_records,
        )


def show(key: bytes | None, value: bytes | None, headers: RawHeaders, limit: int = 400) -> str:
    """A bounded repr of a record (values can be megabytes)."""

    def cut(data: bytes | None, size: int) -> str:
        if data is None:
            return "None"
        return repr(data[:size]) + (f"...(+{len(data) - size} bytes)" if len(data) > size else "")

    shown_headers = ", ".join(f"{cut(n, 24)}={cut(v, 24)}" for n, v in headers[:6])
    more = f", ... {len(headers)} headers" if len(headers) > 6 else ""
    return f"key={cut(key, 48)} value={cut(value, limit)} headers=[{shown_headers}{more}]"[: limit + 400]


# --- record batch encoding (message format v2, KIP-98) ------------------------------------------


def _varint(value: int) -> bytes:
    """Kafka's zigzag varint."""
    encoded = (value << 1) ^ (value >> 63)
    out = bytearray()
    while True:
        byte = encoded & 0x7F
        encoded >>= 7
        if encoded:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _optional(data: bytes | None) -> bytes:
    return _varint(-1) if data is None else _varint(len(data)) + data


def encode_record(offset_delta: int, key: bytes | None, value: bytes | None, headers: RawHeaders) -> bytes:
    body = bytearray(b"\x00")  # attributes
    body += _varint(0)  # timestamp delta
    body += _varint(offset_delta)
    body += _optional(key) + _optional(value)
    body += _varint(len(headers))
    for name, header_value in headers:
        body += _varint(len(name)) + name + _optional(header_value)
    return _varint(len(body)) + bytes(body)


_COMPRESS: Final[dict[str, Callable[[bytes], bytes]]] = {
    "gzip": gzip_encode,
    "snappy": snappy_encode,
    "lz4": lz4_encode,
    "zstd": zstd_encode,
}


def compress(codec: str, data: bytes) -> bytes:
    return data if codec == "none" else _COMPRESS[codec](data)


def encode_batch(
    records: Sequence[tuple[bytes | None, bytes | None, RawHeaders]],
    codec: str,
    timestamp_ms: int,
    *,
    compressed_records: bytes | None = None,
) -> bytes:
    """One record batch (not idempotent, not transactional) as a producer sends it; the broker
    assigns the offsets. ``compressed_records``: the records section already compressed."""
    body = compressed_records
    if body is None:
        body = compress(codec, b"".join(encode_record(i, k, v, h) for i, (k, v, h) in enumerate(records)))
    after_crc = (
        struct.pack(
            ">hiqqqhii",
            CODECS[codec],  # attributes: the codec, CreateTime, not transactional
            len(records) - 1,  # last offset delta
            timestamp_ms,
            timestamp_ms,
            -1,  # producer id
            -1,  # producer epoch
            -1,  # base sequence
            len(records),
        )
        + body
    )
    crc = calc_crc32c(after_crc)
    # base offset, length (from the leader epoch on), leader epoch, magic, CRC
    head = struct.pack(">qiibI", 0, 4 + 1 + 4 + len(after_crc), -1, 2, crc)
    return head + after_crc


# --- values -------------------------------------------------------------------------------------

# Pieces of text: ASCII, accents, CJK, RTL, emoji, combining marks, zero-width and control
# characters (valid in a text: JSON escapes them), so texts exercise tokenizer and NFC.
_TEXT_PIECES: Final = [
    "the",
    "quick",
    "embedding",
    "fleet",
    "Kafka",
    "café",
    "naïve",
    "Straße",
    "東京",
    "数据",
    "한국어",
    "مرحبا",
    "שלום",
    "😀",
    "👩‍👩‍👧",
    "e\u0301",
    "\u200b",
    "\u202e",
    "\x00",
    "\x07",
    "\t",
    "\\",
    '"',
    "{",
    "]}",
    "%s",
    "<script>",
    "ﬁ",
    "\U0001d518\U0001d52b\U0001d526",  # Fraktur letters
    "\ufeff",
]
_NAME_CHARS: Final = string.ascii_lowercase + string.digits + "-_."
_RESERVED_HEADERS: Final = frozenset({"content-type", "schema"})
# A key argument left out: the record gets a random one (None is a key of its own: no key).
RANDOM_KEY: Final = b"\x00random key\x00"


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


class RecordGenerator:
    """Seeded: the same seed, topics and count give the same records (ids included)."""

    def __init__(self, seed: int, topics: Topics, *, partitions: int, id_prefix: str = "fz") -> None:
        self.seed = seed
        self.topics = topics
        self.partitions = partitions
        self.rng = random.Random(seed)
        self.id_prefix = f"{id_prefix}{seed}"
        self._index = 0
        self._good_texts: list[str] = []
        self._bomb_cache: dict[str, bytes] = {}
        # kind -> (weight, expectation, maker); a maker returns (key, value, headers, id, reply_to)
        self.kinds: dict[str, tuple[float, Expect, Callable[[str], Made]]] = {
            # valid requests
            "good": (30, Expect.SUCCESS, self._good),
            "good-msgpack": (6, Expect.SUCCESS, self._good_msgpack),
            "good-repeated-text": (4, Expect.SUCCESS, self._good_repeated),
            "good-reply-topic": (6, Expect.SUCCESS, self._good_reply_topic),
            "good-text-at-limit": (0.4, Expect.SUCCESS, self._good_text_at_limit),
            "good-value-at-limit": (0.3, Expect.SUCCESS, self._good_value_at_limit),
            "good-64-headers": (1, Expect.SUCCESS, self._good_64_headers),
            "good-header-bytes-at-limit": (1, Expect.SUCCESS, self._good_header_bytes_at_limit),
            "good-key-at-limit": (1, Expect.SUCCESS, self._good_key_at_limit),
            "good-long-input": (3, Expect.SUCCESS, self._good_long_input),
            # valid requests whose reply topic cannot take the result
            "reply-refused": (1.5, Expect.UNAVAILABLE, self._reply_to("tiny")),
            "reply-never-acked": (0.5, Expect.SUCCESS_OR_UNAVAILABLE, self._reply_to("noack")),
            "reply-missing": (2, Expect.UNAVAILABLE, self._reply_missing),
            "reply-timestamp-bound": (1, Expect.SUCCESS_OR_UNAVAILABLE, self._reply_to("ts-bound")),
            # everything else
            "random-bytes": (4, Expect.REJECTED, self._random_bytes),
            "json-like": (6, Expect.REJECTED, self._json_like),
            "deep-nesting": (0.5, Expect.REJECTED, self._deep_nesting),
            "invalid-field": (6, Expect.REJECTED, self._invalid_field),
            "invalid-id": (2, Expect.REJECTED, self._invalid_id),
            "long-overlap-too-wide": (1, Expect.REJECTED, self._long_overlap_too_wide),
            "text-over-limit": (0.4, Expect.REJECTED, self._text_over_limit),
            "value-over-limit": (0.3, Expect.REJECTED, self._value_over_limit),
            "headers-over-count": (1, Expect.REJECTED, self._headers_over_count),
            "header-bytes-over-limit": (1, Expect.REJECTED, self._header_bytes_over_limit),
            "header-value-not-utf8": (2, Expect.REJECTED, self._header_value_not_utf8),
            "header-name-not-utf8": (2, Expect.REJECTED, self._header_name_not_utf8),
            "key-over-limit": (1, Expect.REJECTED, self._key_over_limit),
            "tombstone": (1.5, Expect.REJECTED, self._tombstone),
            "null-key-and-value": (1.5, Expect.REJECTED, self._null_key_and_value),
            "empty-value": (1, Expect.REJECTED, self._empty_value),
            "bad-content-type": (1, Expect.REJECTED, self._bad_content_type),
            "bad-schema-version": (1, Expect.REJECTED, self._bad_schema_version),
            "msgpack-garbage": (1.5, Expect.REJECTED, self._msgpack_garbage),
            "reply-not-allowed": (1.5, Expect.REJECTED, self._reply_not_allowed),
            "reply-invalid-name": (1.5, Expect.REJECTED, self._reply_invalid_name),
            "decompression-bomb": (0.05, Expect.REJECTED, self._bomb),
        }

    # --- batches --------------------------------------------------------------------------------

    def batches(self, count: int, *, exclude: frozenset[str] = frozenset()) -> Iterator[FuzzBatch]:
        """``count`` records in batches of 1-8 over every partition. Every kind appears at least
        once (the first ``len(kinds)`` records take each kind once, in random order), then kinds
        are drawn by weight; bad records are placed first, in the middle, last, or everywhere.
        ``exclude``: kinds left out (to explore past a known defect; a full run has none)."""
        unknown = exclude - set(self.kinds)
        assert not unknown, f"no such kinds: {sorted(unknown)}"
        names = [n for n in self.kinds if n not in exclude]
        weights = [self.kinds[n][0] for n in names]
        queue = self.rng.sample(names, len(names))[:count]
        queue += self.rng.choices(names, weights, k=max(0, count - len(queue)))
        goods = [n for n in queue if self.kinds[n][1] is Expect.SUCCESS]
        bads = [n for n in queue if self.kinds[n][1] is not Expect.SUCCESS]
        self.rng.shuffle(goods)
        self.rng.shuffle(bads)
        while goods or bads:
            if bads and bads[-1] == "decompression-bomb":  # alone: its batch is lost as a whole
                yield self._batch([bads.pop()], "only")
                continue
            size = self.rng.randint(1, 8)
            layout = self.rng.choice(["first", "middle", "last", "all", "alternate", "none"])
            kinds: list[str] = []
            if layout == "all":
                while bads and len(kinds) < size and bads[-1] != "decompression-bomb":
                    kinds.append(bads.pop())
            elif layout == "alternate":
                for i in range(size):
                    source = bads if i % 2 == 0 else goods
                    if source and source[-1] != "decompression-bomb":
                        kinds.append(source.pop())
            else:
                while goods and len(kinds) < size - (layout != "none"):
                    kinds.append(goods.pop())
                if layout != "none" and bads and bads[-1] != "decompression-bomb":
                    at = {"first": 0, "middle": len(kinds) // 2, "last": len(kinds)}.get(layout, 0)
                    kinds.insert(at, bads.pop())
            if not kinds:  # only one source left, and not the layout's: take what there is
                kinds.append((goods or bads).pop())
            yield self._batch(kinds, None)

    def _batch(self, kinds: list[str], position: str | None) -> FuzzBatch:
        partition = self.rng.randrange(self.partitions)
        if kinds == ["decompression-bomb"]:
            codec = self.rng.choice([c for c in CODECS if c != "none"])
            bomb = self._record(kinds[0], "only", codec)
            return FuzzBatch(partition, codec, [bomb], self.bomb_section(codec))
        codec = self.rng.choice(list(CODECS))
        records = []
        for place, kind in enumerate(kinds):
            where = position or (
                "only"
                if len(kinds) == 1
                else "first"
                if place == 0
                else "last"
                if place == len(kinds) - 1
                else "middle"
            )
            records.append(self._record(kind, where, codec))
        # Large values travel alone-ish: a batch stays well under the topic's 10 MiB limit.
        total = sum(len(r.value or b"") + len(r.key or b"") for r in records)
        if total > SMALL_BATCH_BYTES and len(records) > 1:
            codec = "zstd"
            records = [self._with_codec(r, codec) for r in records]
        return FuzzBatch(partition, codec, records)

    def _with_codec(self, record: FuzzRecord, codec: str) -> FuzzRecord:
        info = record.info
        return FuzzRecord(
            RecordInfo(
                info.index,
                info.kind,
                info.expect,
                info.request_id,
                info.reply_topic,
                info.position,
                codec,
                info.shown,
            ),
            record.key,
            record.value,
            record.headers,
        )

    def _record(self, kind: str, position: str, codec: str) -> FuzzRecord:
        index = self._index
        self._index += 1
        request_id = f"{self.id_prefix}-{index}-{kind}"
        _, expect, make = self.kinds[kind]
        made = make(request_id)
        info = RecordInfo(
            index,
            kind,
            expect,
            made.request_id,
            made.reply_topic,
            position,
            codec,
            made.shown or show(made.key, made.value, made.headers),
        )
        return FuzzRecord(info, made.key, made.value, made.headers)

    def bomb_section(self, codec: str) -> bytes:
        """The compressed records section of a bomb (cached: one per codec, it is the same)."""
        if codec not in self._bomb_cache:
            value = b'{"text": "' + bytes(DEFAULT_MAX_EXPANDED_BYTES + (1 << 20)) + b'"}'
            self._bomb_cache[codec] = compress(codec, encode_record(0, None, value, []))
        return self._bomb_cache[codec]

    # --- pieces ---------------------------------------------------------------------------------

    def text(self, max_pieces: int = 24) -> str:
        pieces = self.rng.choices(_TEXT_PIECES, k=self.rng.randint(0, max_pieces))
        # A word of its own, so no text is only whitespace, and every text is new to the cache.
        pieces.insert(self.rng.randint(0, len(pieces)), f"w{self.rng.getrandbits(48):x}")
        return self.rng.choice([" ", "", "\n"]).join(pieces)

    def key(self) -> bytes | None:
        choice = self.rng.random()
        if choice < 0.3:
            return None
        if choice < 0.6:
            return f"{self.rng.getrandbits(256):064x}".encode()  # what producers send: a content hash
        return self.rng.randbytes(self.rng.randint(0, 64))

    def header_name(self) -> bytes:
        while True:
            if self.rng.random() < 0.15:
                name = self.rng.choice(["ключ", "名前", "x-😀", "Ünïcode", "x y", ""])
            else:
                name = "".join(self.rng.choices(_NAME_CHARS, k=self.rng.randint(1, 20)))
            if name.lower() not in _RESERVED_HEADERS:
                return name.encode("utf-8")

    def header_value(self) -> bytes | None:
        choice = self.rng.random()
        if choice < 0.1:
            return None
        if choice < 0.2:
            return b""
        return self.text(4).encode("utf-8")[:200]

    def benign_headers(self, count: int | None = None, *, content_type: bytes | None = None) -> RawHeaders:
        """Headers a valid request may carry: UTF-8 names and values, within the limits (leaving
        room for the content-type and schema headers)."""
        count = self.rng.randint(0, 12) if count is None else count
        headers: RawHeaders = [(self.header_name(), self.header_value()) for _ in range(count)]
        if content_type is not None:
            headers.insert(self.rng.randint(0, len(headers)), (b"content-type", content_type))
        if self.rng.random() < 0.5:
            headers.insert(self.rng.randint(0, len(headers)), (b"schema", b"1"))
        return headers

    def fields(self) -> dict[str, Any]:
        """Optional fields of a valid request, drawn at random."""
        found: dict[str, Any] = {}
        if self.rng.random() < 0.3:
            found["encoding_format"] = self.rng.choice(["float", "base64"])
        if self.rng.random() < 0.2:
            found["metadata"] = {
                f"k{i}-{self.text(2)[:40]}": self.text(6)[:200] for i in range(self.rng.randint(0, 32))
            }
        if self.rng.random() < 0.1:
            found["dimensions"] = 384  # the model's own width: allowed
        if self.rng.random() < 0.2:  # unknown fields are ignored
            found[self.rng.choice(["extra", "priority", "trace", "💥"])] = self.json_like(3)
        if self.rng.random() < 0.05:
            found["task"] = None
            found["reply_to"] = None
        return found

    def json_like(self, depth: int) -> Any:
        choice = self.rng.randrange(9 if depth > 0 else 7)
        if choice == 0:
            return None
        if choice == 1:
            return self.rng.choice([True, False])
        if choice == 2:
            return self.rng.randint(-(2**63), 2**64)
        if choice == 3:
            return self.rng.choice([0.0, -0.0, 1e308, -1e-308, 3.14, 2.0**53 + 1])
        if choice in (4, 5):
            return self.text(6)
        if choice == 6:
            return ""
        if choice == 7:
            return [self.json_like(depth - 1) for _ in range(self.rng.randint(0, 5))]
        return {self.text(2)[:30]: self.json_like(depth - 1) for _ in range(self.rng.randint(0, 5))}

    def encode_json(self, value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=self.rng.random() < 0.5).encode("utf-8")

    def request(self, request_id: str, text: str | None = None, **fields: Any) -> dict[str, Any]:
        return {"id": request_id, "text": self.text() if text is None else text, **self.fields(), **fields}

    # --- valid requests -------------------------------------------------------------------------

    def _valid(
        self,
        request_id: str,
        body: dict[str, Any],
        headers: RawHeaders | None = None,
        *,
        key: bytes | None = RANDOM_KEY,
    ) -> Made:
        self._good_texts.append(body["text"])
        return Made(
            self.key() if key is RANDOM_KEY else key,
            self.encode_json(body),
            self.benign_headers(content_type=self._json_content_type()) if headers is None else headers,
            request_id,
            body.get("reply_to"),
        )

    def _json_content_type(self) -> bytes | None:
        return self.rng.choice(
            [None, b"application/json", b"application/json; charset=utf-8", b"APPLICATION/JSON"]
        )

    def _good(self, request_id: str) -> Made:
        return self._valid(request_id, self.request(request_id))

    def _good_msgpack(self, request_id: str) -> Made:
        body = self.request(request_id)
        self._good_texts.append(body["text"])
        content_type = self.rng.choice([b"application/msgpack", b"application/x-msgpack; v=1"])
        return Made(
            self.key(),
            msgspec.msgpack.encode(body),
            self.benign_headers(content_type=content_type),
            request_id,
        )

    def _good_repeated(self, request_id: str) -> Made:
        text = self.rng.choice(self._good_texts) if self._good_texts else self.text()
        return self._valid(request_id, self.request(request_id, text))

    def _good_reply_topic(self, request_id: str) -> Made:
        topic = self.topics.reply(self.rng.choice(list(BENIGN_REPLY_TOPICS)))
        return self._valid(request_id, self.request(request_id, reply_to=topic))

    def _good_long_input(self, request_id: str) -> Made:
        """A text of up to ~1,500 tokens pooled or chunked (issue 24), overlap given or not, schema
        header 2 (what clients send), 1 or none."""
        extra: dict[str, Any] = {"long": self.rng.choice(["pool", "chunks", "truncate"])}
        if self.rng.random() < 0.6:
            extra["overlap"] = self.rng.randint(0, 63)  # all-MiniLM-L6-v2's window takes 0-63
        body = self.request(request_id, self.text(max_pieces=self.rng.choice([8, 300, 1200])), **extra)
        headers = [(b"schema", self.rng.choice([b"2", b"1"]))] if self.rng.random() < 0.8 else []
        return self._valid(request_id, body, headers + self.benign_headers(self.rng.randint(0, 4)))

    def _long_overlap_too_wide(self, request_id: str) -> Made:
        """An overlap the schema allows (<= 256) but the model's window does not (a quarter)."""
        body = self.request(
            request_id,
            self.text(),
            long=self.rng.choice(["pool", "chunks"]),
            overlap=self.rng.randint(64, 256),
        )
        return self._valid(request_id, body, [(b"schema", b"2")])

    def _good_text_at_limit(self, request_id: str) -> Made:
        return self._valid(request_id, {"id": request_id, "text": self._text_of_bytes(MAX_TEXT_BYTES)})

    def _text_of_bytes(self, size: int) -> str:
        """A text of exactly ``size`` UTF-8 bytes, multi-byte characters up to the end."""
        head = self.text()
        pieces = [head]
        total = _utf8_len(head)
        while total < size:
            piece = self.rng.choice(["é", "東", "😀", "a", "é東", " word"])
            if total + _utf8_len(piece) > size:
                piece = "a" * (size - total)
            pieces.append(piece)
            total += _utf8_len(piece)
        return "".join(pieces)

    def _good_value_at_limit(self, request_id: str) -> Made:
        body = {"id": request_id, "text": self.text(), "pad": ""}
        body["pad"] = "p" * (MAX_MESSAGE_BYTES - len(json.dumps(body).encode()))
        self._good_texts.append(body["text"])
        value = json.dumps(body).encode()
        assert len(value) == MAX_MESSAGE_BYTES
        return Made(self.key(), value, [], request_id)

    def _good_64_headers(self, request_id: str) -> Made:
        headers = self.benign_headers(MAX_HEADERS - 2, content_type=b"application/json")
        while len(headers) < MAX_HEADERS:
            headers.append((self.header_name(), b"v"))
        return self._valid(request_id, self.request(request_id), headers)

    def _headers_of_bytes(self, size: int) -> RawHeaders:
        headers: RawHeaders = [(b"content-type", b"application/json"), (b"x-fill", b"")]
        used = sum(len(n) + len(v or b"") for n, v in headers)
        headers[1] = (b"x-fill", b"f" * (size - used))
        return headers

    def _good_header_bytes_at_limit(self, request_id: str) -> Made:
        return self._valid(request_id, self.request(request_id), self._headers_of_bytes(MAX_HEADER_BYTES))

    def _good_key_at_limit(self, request_id: str) -> Made:
        return self._valid(request_id, self.request(request_id), key=self.rng.randbytes(MAX_KEY_BYTES))

    def _reply_to(self, label: str) -> Callable[[str], Made]:
        def make(request_id: str) -> Made:
            return self._valid(request_id, self.request(request_id, reply_to=self.topics.reply(label)))

        return make

    def _reply_missing(self, request_id: str) -> Made:
        # Mostly distinct names (thousands over a long run), some reused.
        suffix = self.rng.getrandbits(40) if self.rng.random() < 0.8 else self.rng.randrange(4)
        topic = self.topics.reply(f"missing-{suffix:x}")
        return self._valid(request_id, self.request(request_id, reply_to=topic))

    # --- everything else ------------------------------------------------------------------------

    def _bad(
        self,
        value: bytes | None,
        request_id: str | None = None,
        headers: RawHeaders | None = None,
        key: bytes | None = RANDOM_KEY,
    ) -> Made:
        return Made(
            self.key() if key is RANDOM_KEY else key,
            value,
            self.benign_headers() if headers is None else headers,
            request_id,
        )

    def _random_bytes(self, request_id: str) -> Made:
        size = self.rng.choice([1, 2, 8, 100, 1000, 5000])
        return self._bad(self.rng.randbytes(self.rng.randint(1, size)), headers=self._any_headers())

    def _any_headers(self) -> RawHeaders:
        """Any headers at all: 0-100, random bytes for names and values."""
        count = self.rng.choice([0, 1, 3, 10, 64, 65, 100])
        return [
            (self.rng.randbytes(self.rng.randint(0, 12)), self.rng.choice([None, self.rng.randbytes(8)]))
            for _ in range(self.rng.randint(0, count))
        ]

    def _json_like(self, request_id: str) -> Made:
        value = self.json_like(5)
        readable: str | None = None
        if isinstance(value, dict) or self.rng.random() < 0.5:
            body = value if isinstance(value, dict) else {"payload": value}
            if self.rng.random() < 0.6:
                body["id"] = request_id
                readable = request_id
            # never a valid request: `text` absent, not a string, or empty
            if self.rng.random() < 0.5:
                body.pop("text", None)
            else:
                body["text"] = self.rng.choice([None, 0, [], {}, "", ["a"], 1.5, True])
            value = body
        return self._bad(self.encode_json(value), readable)

    def _deep_nesting(self, request_id: str) -> Made:
        depth = self.rng.choice([200, 5000, 100_000])
        opener, closer = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        inner = b"1" if opener == b'{"a":' else b""
        return self._bad(opener * depth + inner + closer * depth)

    def _invalid_field(self, request_id: str) -> Made:
        body = self.request(request_id)
        field_name, bad_value = self.rng.choice(
            [
                ("text", 42),
                ("text", None),
                ("text", ["list"]),
                ("text", ""),
                ("text", " \t\n\u2003 "),
                ("dimensions", 0),
                ("dimensions", -5),
                ("dimensions", 1e30),
                ("dimensions", "384"),
                ("dimensions", 383),
                ("dimensions", 10**40),
                ("task", "query"),
                ("task", "rm -rf /"),
                ("task", ""),
                ("encoding_format", "int8"),
                ("long", "summarize"),
                ("long", None),
                ("overlap", -1),
                ("overlap", 257),
                ("overlap", "32"),
                ("encoding_format", None),
                ("metadata", {str(i): "v" for i in range(33)}),
                ("metadata", {"k": "v" * 1025}),
                ("metadata", {"k": {"nested": 1}}),
                ("metadata", []),
                ("reply_to", 5),
                ("reply_to", ""),
            ]
        )
        body[field_name] = bad_value
        return self._bad(self.encode_json(body), request_id)

    def _invalid_id(self, request_id: str) -> Made:
        bad_id = self.rng.choice(["", "a\nb", "bell\x07", "i" * 257, 123, None, ["id"], {"id": 1}])
        return self._bad(self.encode_json({"id": bad_id, "text": self.text()}))

    def _text_over_limit(self, request_id: str) -> Made:
        extra = self.rng.choice([1, 2, 1000, 200_000])
        body = {"id": request_id, "text": self._text_of_bytes(MAX_TEXT_BYTES + extra)}
        return self._bad(self.encode_json(body), request_id if extra < 900_000 else None)

    def _value_over_limit(self, request_id: str) -> Made:
        over = self.rng.choice([1, 2, 4096, 2 << 20])
        body = {"id": request_id, "text": self.text(), "pad": ""}
        body["pad"] = "p" * (MAX_MESSAGE_BYTES + over - len(json.dumps(body).encode()))
        return self._bad(json.dumps(body).encode(), headers=[])

    def _headers_over_count(self, request_id: str) -> Made:
        count = self.rng.randint(MAX_HEADERS + 1, 100)
        headers: RawHeaders = [(self.header_name(), b"v") for _ in range(count)]
        return self._bad(self.encode_json(self.request(request_id)), request_id, headers)

    def _header_bytes_over_limit(self, request_id: str) -> Made:
        size = MAX_HEADER_BYTES + self.rng.choice([1, 2, 50_000])
        body = self.encode_json(self.request(request_id))
        return self._bad(body, request_id, self._headers_of_bytes(size))

    def _header_value_not_utf8(self, request_id: str) -> Made:
        headers = self.benign_headers()
        bad = self.rng.choice([b"\xff\xfe", b"\xc3\x28", b"ok\x80", b"\xed\xa0\x80"])
        headers.insert(self.rng.randint(0, len(headers)), (self.header_name(), bad))
        return self._bad(self.encode_json(self.request(request_id)), request_id, headers)

    def _header_name_not_utf8(self, request_id: str) -> Made:
        headers = self.benign_headers()
        for _ in range(self.rng.randint(1, 3)):
            bad = self.rng.choice([b"\xff\xfe", b"\xc3\x28", b"x-\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"])
            headers.insert(self.rng.randint(0, len(headers)), (bad, self.header_value()))
        return self._bad(self.encode_json(self.request(request_id)), request_id, headers)

    def _key_over_limit(self, request_id: str) -> Made:
        key = self.rng.randbytes(MAX_KEY_BYTES + self.rng.choice([1, 2, 100_000]))
        return self._bad(self.encode_json(self.request(request_id)), key=key)

    def _tombstone(self, request_id: str) -> Made:
        return self._bad(None, key=self.rng.randbytes(self.rng.randint(0, 64)), headers=self._any_headers())

    def _null_key_and_value(self, request_id: str) -> Made:
        headers = [] if self.rng.random() < 0.5 else self._any_headers()
        return self._bad(None, key=None, headers=headers)

    def _empty_value(self, request_id: str) -> Made:
        return self._bad(b"", key=self.rng.choice([None, b"", b"k"]))

    def _bad_content_type(self, request_id: str) -> Made:
        content_type = self.rng.choice(
            [b"application/xml", b"text/plain", b"", b"\xff\xfe", b"application/json+evil", b"a" * 1000]
        )
        headers: RawHeaders = [(b"content-type", content_type)]
        return self._bad(self.encode_json(self.request(request_id)), request_id, headers)

    def _bad_schema_version(self, request_id: str) -> Made:
        version = self.rng.choice([b"99", b"", b"0", b"1.0", b"\x00", b"\xff"])
        headers: RawHeaders = [(b"schema", version)]
        return self._bad(self.encode_json(self.request(request_id)), request_id, headers)

    def _msgpack_garbage(self, request_id: str) -> Made:
        value = self.rng.choice(
            [
                self.rng.randbytes(self.rng.randint(1, 300)),
                b"\xc1\xc1\xc1",
                msgspec.msgpack.encode({"id": request_id, "text": b"\x00\x01"}),
                msgspec.msgpack.encode([request_id, "text"]),
                msgspec.msgpack.encode({"id": request_id, "text": self.text(), "dimensions": -1}),
            ]
        )
        headers: RawHeaders = [(b"content-type", b"application/msgpack")]
        return self._bad(value, request_id if request_id.encode() in value else None, headers)

    def _reply_not_allowed(self, request_id: str) -> Made:
        topic = self.rng.choice(
            [self.topics.requests, self.topics.dlq, "__consumer_offsets", "other.results", "embed.requests"]
        )
        return self._bad(self.encode_json(self.request(request_id, reply_to=topic)), request_id)

    def _reply_invalid_name(self, request_id: str) -> Made:
        junk = "".join(self.rng.choices(' /\\:*?"<>|#é😀\t\x00', k=self.rng.randint(1, 8)))
        topic = self.rng.choice(
            [
                f"{self.topics.results}.{junk}",
                f"{self.topics.results}." + "x" * self.rng.choice([240, 300, 5000]),
                ".",
                "..",
                f"{self.topics.results}\n",
            ]
        )
        return self._bad(self.encode_json(self.request(request_id, reply_to=topic)), request_id)

    def _bomb(self, request_id: str) -> Made:
        # Its records section is made compressed by ``bomb_section`` (never held expanded here).
        size = DEFAULT_MAX_EXPANDED_BYTES + (1 << 20)
        return Made(None, None, [], None, shown=f"one record of {size} bytes of zeros, compressed")


@dataclass(frozen=True, slots=True)
class Made:
    key: bytes | None
    value: bytes | None
    headers: RawHeaders = field(default_factory=list)
    request_id: str | None = None
    reply_topic: str | None = None
    shown: str | None = None  # how to show it, when not by its bytes
