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

import contextlib
import logging
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cramjam
import numpy as np
from aiokafka.record.util import calc_crc32c

from worker.errors import WorkerError

log = logging.getLogger(__name__)

BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")
BATCH_HEADER_BYTES = BATCH_HEADER.size  # 61
# Where the CRC-covered part starts: after base offset, length, leader epoch, magic and CRC.
CRC_START = 8 + 4 + 4 + 1 + 4
COMPRESSION_MASK = 0x07
TRANSACTIONAL = 0x10
CONTROL = 0x20
# How far one record batch may expand when decompressed. A batch is at most a fetch's size on the
# wire, but zstd turns 8 KB into 256 MiB of zeros: past this the batch is unreadable, not memory.
DEFAULT_MAX_EXPANDED_BYTES = 64 << 20

RawHeaders = list[tuple[bytes, bytes | None]]


class Truncated(WorkerError, ValueError):
    """The bytes end inside a record or batch."""


class ExpandsTooFar(WorkerError, ValueError):
    """A compressed batch that would expand past the limit (a decompression bomb)."""


# --- bounded decompression -------------------------------------------------------------------
# Each decoder writes into a buffer of the limit's size (numpy.empty: pages are only touched as
# they are written) and fails past it, so a bomb costs at most the limit.


def _into(decompress_into: Callable[[bytes, Any], int], name: str, limit: int) -> Callable[[bytes], bytes]:
    def decode(payload: bytes) -> bytes:
        out = np.empty(limit + 1, dtype=np.uint8)
        try:
            size = decompress_into(bytes(payload), out)
        except Exception as exc:  # cramjam says "failed to write whole buffer" when it is full
            if "whole buffer" in str(exc):
                raise ExpandsTooFar(f"{name} batch expands past {limit} bytes") from None
            raise
        if size > limit:
            raise ExpandsTooFar(f"{name} batch expands past {limit} bytes")
        return out[:size].tobytes()

    return decode


def _gzip(limit: int) -> Callable[[bytes], bytes]:
    def decode(payload: bytes) -> bytes:
        out, data = bytearray(), bytes(payload)
        while data:  # one or more gzip members
            member = zlib.decompressobj(wbits=31)
            out += member.decompress(data, limit + 1 - len(out))
            if len(out) > limit or member.unconsumed_tail:
                raise ExpandsTooFar(f"gzip batch expands past {limit} bytes")
            data = member.unused_data
        return bytes(out)

    return decode


def _snappy(limit: int) -> Callable[[bytes], bytes]:
    def decode(payload: bytes) -> bytes:
        data = memoryview(bytes(payload))
        blocks = [data]
        if bytes(data[:8]) == XERIAL_MAGIC:  # Kafka's (xerial) framing: 16-byte header, sized blocks
            blocks, cursor = [], 16
            while cursor + 4 <= len(data):
                size = struct.unpack_from(">i", data, cursor)[0]
                blocks.append(data[cursor + 4 : cursor + 4 + size])
                cursor += 4 + size
        total = 0
        for block in blocks:  # a raw snappy block starts with its expanded length (varint)
            total += _Reader(block).uvarint()
            if total > limit:
                raise ExpandsTooFar(f"snappy batch expands past {limit} bytes")
        return b"".join(bytes(cramjam.snappy.decompress_raw(bytes(b))) for b in blocks)

    return decode


XERIAL_MAGIC = b"\x82SNAPPY\x00"


Decompressors = dict[int, tuple[str, Callable[[bytes], bytes]]]


def bounded_decompressors(limit: int = DEFAULT_MAX_EXPANDED_BYTES) -> Decompressors:
    """Kafka's codecs by attribute id, each failing (ExpandsTooFar) past ``limit`` bytes."""
    return {
        1: ("gzip", _gzip(limit)),
        2: ("snappy", _snappy(limit)),
        3: ("lz4", _into(cramjam.lz4.decompress_into, "lz4", limit)),
        4: ("zstd", _into(cramjam.zstd.decompress_into, "zstd", limit)),
    }


def guard_kafka_decompression(limit: int = DEFAULT_MAX_EXPANDED_BYTES) -> None:
    """Makes aiokafka decompress fetched batches with the bounded decoders above.

    aiokafka decompresses a whole batch in ``getmany()`` with no limit, so 8 KB of zstd would cost
    the worker 256 MiB three times over (and a larger bomb, every worker that takes the partition
    over). Its record readers (the C extension and the pure-Python fallback) look their codec
    functions up as module globals; this replaces them, once per process, at worker start. A batch
    past the limit then fails inside ``getmany()`` like any unreadable record and is dead-lettered
    by ``worker.salvage``. This is the one place the worker changes a library's behaviour."""
    import aiokafka.record.default_records as python_records

    modules: list[Any] = [python_records]
    with contextlib.suppress(ImportError):
        import aiokafka.record._crecords.default_records as c_records

        modules.append(c_records)
    decoders = bounded_decompressors(limit)
    for module in modules:
        names = ("gzip_decode", "snappy_decode", "lz4_decode", "zstd_decode")
        for attribute, (name, decode) in zip(names, (decoders[i] for i in (1, 2, 3, 4)), strict=True):
            if hasattr(module, attribute):
                setattr(module, attribute, decode)
                log.debug("aiokafka %s: %s decoding bounded at %d bytes", module.__name__, name, limit)


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as the lenient reader found it (headers kept as bytes)."""

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
    problem: str | None = None  # why the batch could not be read (CRC, codec, framing, size)
    too_large: bool = False  # the problem is that it expands past the limit
    raw: bytes | None = None  # the batch as fetched, when it could not be read (for its dead letter)


def read_batches(data: bytes, max_expanded_bytes: int = DEFAULT_MAX_EXPANDED_BYTES) -> Iterator[RawBatch]:
    """Every complete batch in ``data`` (a fetch response's record set); a partial batch at the
    end (the broker cuts at the fetch size) is left out, as Kafka clients do."""
    decompressors = bounded_decompressors(max_expanded_bytes)
    view = memoryview(data)
    pos = 0
    while len(view) - pos >= BATCH_HEADER_BYTES:
        (
            base_offset,
            length,
            _epoch,
            magic,
            crc,
            attributes,
            last_delta,
            base_timestamp,
            _max_ts,
            producer_id,
            _producer_epoch,
            _base_sequence,
            count,
        ) = BATCH_HEADER.unpack_from(view, pos)
        start, end = pos, pos + 12 + length  # the length counts from after itself
        if length < BATCH_HEADER_BYTES - 12 or end > len(view):
            return
        pos = end
        batch = RawBatch(
            base_offset,
            base_offset + last_delta + 1,
            producer_id,
            bool(attributes & TRANSACTIONAL),
            bool(attributes & CONTROL),
        )
        body = view[start + BATCH_HEADER_BYTES : end]
        if magic != 2:
            batch.problem = f"record batch of magic {magic} (only v2 is read)"
        elif calc_crc32c(bytes(view[start + CRC_START : end])) != crc:
            batch.problem = "record batch CRC mismatch (corrupt data)"
        else:
            _read_records(batch, body, attributes, base_timestamp, count, decompressors)
        if batch.problem is not None:
            batch.raw = bytes(view[start:end])
        yield batch


def _read_records(
    batch: RawBatch,
    body: memoryview,
    attributes: int,
    base_timestamp: int,
    count: int,
    decompressors: Decompressors,
) -> None:
    compression = attributes & COMPRESSION_MASK
    records: bytes | memoryview = body
    if compression:
        name, decompress = decompressors.get(compression, (f"codec {compression}", _unknown_codec))
        try:
            records = decompress(bytes(body))
        except ExpandsTooFar as exc:
            batch.problem, batch.too_large = str(exc), True
            return
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
    """A cursor over the bytes of a fetched batch that never reads past them."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def skip(self, count: int) -> None:
        if self.pos + count > len(self.data):
            raise Truncated("record ends early")
        self.pos += count

    def uvarint(self) -> int:
        """An unsigned base-128 varint (snappy's length prefix)."""
        shift = result = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise Truncated("varint ends early")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    def varint(self) -> int:
        """A zigzag varint (Kafka's signed varint/varlong)."""
        result = self.uvarint()
        return (result >> 1) ^ -(result & 1)

    def optional_bytes(self) -> bytes | None:
        length = self.varint()
        if length < 0:
            return None
        start = self.pos
        self.skip(length)
        return bytes(self.data[start : self.pos])
