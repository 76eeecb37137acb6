"""A lenient reader of Kafka record batches (message format v2), for records aiokafka cannot unpack.

aiokafka decodes header names strictly while it unpacks a batch inside ``getmany()``: one header
name that is not UTF-8 makes every fetch of that partition fail, so without help the partition is
stuck for good (and every worker that takes it over fails the same way). This reader parses the
same bytes without decoding anything: it tells the good records before the unreadable one from the
unreadable one itself, so the worker can answer the good ones, dead-letter the bad one and move
past it. It is pure: bytes in, records out.

Format (KIP-98): a batch header of 61 bytes (base offset, length, leader epoch, magic, CRC-32C,
attributes, last offset delta, timestamps, producer id/epoch, base sequence, record count), then
the records, compressed as a whole when the attributes say so; each record is varint-framed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiokafka import codec
from aiokafka.record.util import calc_crc32c

BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")
BATCH_HEADER_BYTES = BATCH_HEADER.size  # 61
# Where the CRC-covered part starts: after base offset, length, leader epoch, magic and CRC.
CRC_START = 8 + 4 + 4 + 1 + 4
COMPRESSION_MASK = 0x07
TRANSACTIONAL = 0x10
CONTROL = 0x20
DECOMPRESSORS: dict[int, tuple[str, Callable[[bytes], bytes]]] = {
    1: ("gzip", codec.gzip_decode),
    2: ("snappy", codec.snappy_decode),
    3: ("lz4", codec.lz4_decode),
    4: ("zstd", codec.zstd_decode),
}

RawHeaders = list[tuple[bytes, bytes | None]]


class Truncated(ValueError):
    """The bytes end inside a record or batch."""


@dataclass(frozen=True, slots=True)
class RawRecord:
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: RawHeaders

    def unreadable_reason(self) -> str | None:
        """Why aiokafka cannot unpack this record, or None when it can (it decodes header names
        as strict UTF-8; header values stay bytes)."""
        for name, _ in self.headers:
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                shown = name[:32].decode("utf-8", "replace")
                return f"header name {shown!r} is not valid UTF-8 (the Kafka client cannot read the record)"
        return None

    def text_headers(self) -> list[tuple[str, bytes]]:
        """Headers as the pipeline carries them: names decoded, undecodable bytes replaced."""
        return [(name.decode("utf-8", "replace"), value or b"") for name, value in self.headers]


@dataclass(slots=True)
class RawBatch:
    base_offset: int
    next_offset: int  # one past the batch's last offset (kept even when compaction removed it)
    producer_id: int
    transactional: bool
    control: bool
    records: list[RawRecord] = field(default_factory=list)
    problem: str | None = None  # why the batch could not be read (CRC, codec, framing)


def read_batches(data: bytes) -> Iterator[RawBatch]:
    """Every complete batch in ``data`` (a fetch response's record set); a partial batch at the
    end (the broker cuts at the fetch size) is left out, as Kafka clients do."""
    view = memoryview(data)
    pos = 0
    while len(view) - pos >= BATCH_HEADER_BYTES:
        (base_offset, length, _epoch, magic, crc, attributes, last_delta, base_timestamp, _max_ts,
         producer_id, _producer_epoch, _base_sequence, count) = BATCH_HEADER.unpack_from(view, pos)
        start, end = pos, pos + 12 + length  # the length counts from after itself
        if length < BATCH_HEADER_BYTES - 12 or end > len(view):
            return
        pos = end
        batch = RawBatch(base_offset, base_offset + last_delta + 1, producer_id,
                         bool(attributes & TRANSACTIONAL), bool(attributes & CONTROL))
        body = view[start + BATCH_HEADER_BYTES:end]
        if magic != 2:
            batch.problem = f"record batch of magic {magic} (only v2 is read)"
        elif calc_crc32c(bytes(view[start + CRC_START:end])) != crc:
            batch.problem = "record batch CRC mismatch (corrupt data)"
        else:
            _read_records(batch, body, attributes, base_timestamp, count)
        yield batch


def _read_records(batch: RawBatch, body: memoryview, attributes: int, base_timestamp: int,
                  count: int) -> None:
    compression = attributes & COMPRESSION_MASK
    records: bytes | memoryview = body
    if compression:
        name, decompress = DECOMPRESSORS.get(compression, (f"codec {compression}", _unknown_codec))
        try:
            records = decompress(bytes(body))
        except Exception as exc:  # each codec library raises its own types
            batch.problem = f"{name} payload cannot be decompressed ({type(exc).__name__}: {exc})"
            return
    reader = _Reader(memoryview(records))
    try:
        for _ in range(count):
            batch.records.append(_read_record(reader, batch.base_offset, base_timestamp))
    except (Truncated, ValueError) as exc:
        batch.problem = f"record framing is broken ({exc})"


def _unknown_codec(_: bytes) -> bytes:
    raise ValueError("unknown compression codec")


def _read_record(reader: _Reader, base_offset: int, base_timestamp: int) -> RawRecord:
    length = reader.varint()
    end = reader.pos + length
    reader.skip(1)  # attributes (unused in v2)
    timestamp_delta = reader.varint()
    offset_delta = reader.varint()
    key = reader.optional_bytes()
    value = reader.optional_bytes()
    headers: RawHeaders = []
    for _ in range(reader.varint()):
        name = reader.optional_bytes() or b""
        headers.append((name, reader.optional_bytes()))
    if reader.pos != end:
        raise ValueError(f"record length {length} does not match its fields")
    return RawRecord(base_offset + offset_delta, base_timestamp + timestamp_delta, key, value, headers)


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def skip(self, count: int) -> None:
        if self.pos + count > len(self.data):
            raise Truncated("record ends early")
        self.pos += count

    def varint(self) -> int:
        """A zigzag varint (Kafka's signed varint/varlong)."""
        shift = result = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise Truncated("varint ends early")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (result >> 1) ^ -(result & 1)
            shift += 7

    def optional_bytes(self) -> bytes | None:
        length = self.varint()
        if length < 0:
            return None
        start = self.pos
        self.skip(length)
        return bytes(self.data[start:self.pos])
