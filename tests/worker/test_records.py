"""The lenient record reader and the salvage scan: pure logic on record batches built here.

Batches are built with aiokafka's own builder (so they are what a Kafka client writes), then
patched where a client would refuse to write (a header name that is not UTF-8), with the CRC
recomputed as the broker would accept it.
"""

from __future__ import annotations

import struct

import pytest
from aiokafka import TopicPartition, codec
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c

from worker.records import (
    CRC_START,
    ExpandsTooFar,
    bounded_decompressors,
    guard_kafka_decompression,
    read_batches,
)
from worker.salvage import scan

TP = TopicPartition("embed.requests", 3)


def batch(
    base_offset: int,
    records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
    *,
    compression: int = 0,
    transactional: bool = False,
    producer_id: int = -1,
) -> bytearray:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=int(transactional),
        producer_id=producer_id,
        producer_epoch=0 if transactional else -1,
        base_sequence=0 if transactional else -1,
        batch_size=1 << 20,
    )
    for delta, (key, value, headers) in enumerate(records):
        builder.append(delta, timestamp=1_000 + delta, key=key, value=value, headers=headers)
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)
    return data


def with_bad_header_name(data: bytearray, placeholder: bytes, replacement: bytes) -> bytes:
    """Replace a header name's bytes (same length) and fix the CRC, like a client that writes raw
    bytes (kcat -H $'\\xff\\xfe=v') would have produced."""
    at = bytes(data).index(placeholder)
    data[at : at + len(placeholder)] = replacement
    struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[CRC_START:])))
    return bytes(data)


def test_reads_what_aiokafka_wrote() -> None:
    data = bytes(batch(40, [(b"k", b"v0", [("content-type", b"application/json")]), (None, b"v1", [])]))
    [read] = list(read_batches(data))
    assert read.problem is None and read.next_offset == 42
    assert [(r.offset, r.key, r.value, r.headers) for r in read.records] == [
        (40, b"k", b"v0", [(b"content-type", b"application/json")]),
        (41, None, b"v1", []),
    ]


def test_finds_the_record_with_a_header_name_that_is_not_utf8() -> None:
    data = with_bad_header_name(
        batch(
            100,
            [
                (None, b'{"id":"a","text":"x"}', []),
                (None, b'{"id":"b","text":"y","reply_to":"embed.results.me"}', [("XX", b"v")]),
                (None, b'{"id":"c","text":"z"}', []),
            ],
        ),
        b"XX",
        b"\xff\xfe",
    )
    good, unreadable = scan(TP, data, 100, [], read_committed=False)
    assert [r.offset for r in good] == [100]
    assert unreadable is not None and unreadable.offset == 101 and unreadable.next_offset == 102
    assert "not valid UTF-8" in unreadable.reason
    assert unreadable.record is not None and unreadable.record.headers == [(b"\xff\xfe", b"v")]
    assert unreadable.record.text_headers() == [("\ufffd\ufffd", b"v")]
    # From a later position the records before it are not handed over again.
    good, unreadable = scan(TP, data, 101, [], read_committed=False)
    assert good == [] and unreadable is not None and unreadable.offset == 101
    # Past it, everything reads.
    good, unreadable = scan(TP, data, 102, [], read_committed=False)
    assert [r.offset for r in good] == [102] and unreadable is None


def test_a_corrupt_batch_is_unreadable_as_a_whole() -> None:
    data = batch(7, [(None, b"a", []), (None, b"b", [])], compression=1)  # gzip
    data[-3] ^= 0xFF  # flip bits inside the compressed records
    good, unreadable = scan(TP, bytes(data), 7, [], read_committed=False)
    assert good == [] and unreadable is not None
    assert (unreadable.offset, unreadable.next_offset, unreadable.record) == (7, 9, None)
    assert "CRC" in unreadable.reason


def test_compressed_batches_and_a_partial_trailing_batch() -> None:
    first = bytes(batch(0, [(None, b"x" * 1000, []), (None, b"y", [])], compression=4))  # zstd
    second = bytes(batch(2, [(None, b"z", [])]))
    good, unreadable = scan(TP, first + second[:-5], 0, [], read_committed=False)
    assert [r.value for r in good] == [b"x" * 1000, b"y"] and unreadable is None


def test_aborted_transactions_are_skipped_under_read_committed() -> None:
    aborted = bytes(batch(0, [(None, b"aborted", [])], transactional=True, producer_id=9))
    committed = bytes(batch(1, [(None, b"kept", [])], transactional=True, producer_id=10))
    good, _ = scan(TP, aborted + committed, 0, [(9, 0)], read_committed=True)
    assert [r.value for r in good] == [b"kept"]
    good, _ = scan(TP, aborted + committed, 0, [(9, 0)], read_committed=False)
    assert [r.value for r in good] == [b"aborted", b"kept"]


@pytest.mark.parametrize("codec_id", [1, 2, 3, 4])  # gzip, snappy, lz4, zstd
def test_bounded_decompression_round_trips_and_stops_bombs(codec_id: int) -> None:
    encode = {
        1: codec.gzip_encode,
        2: lambda d: codec.snappy_encode(d, xerial_compatible=True),
        3: codec.lz4_encode,
        4: codec.zstd_encode,
    }[codec_id]
    _, decode = bounded_decompressors(1 << 20)[codec_id]
    text = b"an ordinary batch of requests " * 1000
    assert decode(encode(text)) == text
    with pytest.raises(ExpandsTooFar):
        decode(encode(bytes(4 << 20)))  # 4 MiB of zeros, a few KB compressed, past the 1 MiB limit


def test_a_decompression_bomb_is_one_unreadable_batch() -> None:
    data = bytes(batch(5, [(None, bytes(2 << 20), [])], compression=4))  # zstd, tiny on the wire
    assert len(data) < 1024
    good, unreadable = scan(TP, data, 5, [], read_committed=False, max_expanded_bytes=1 << 20)
    assert good == [] and unreadable is not None and unreadable.too_large
    assert unreadable.batch == data and "expands past" in unreadable.reason


def test_the_guard_bounds_aiokafka_own_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """After guard_kafka_decompression, aiokafka's record reader (the C extension when it is
    built) fails on a bomb instead of expanding it; the originals are restored afterwards."""
    import aiokafka.record._crecords.default_records as c_records
    import aiokafka.record.default_records as python_records

    for module in (c_records, python_records):
        for name in ("gzip_decode", "snappy_decode", "lz4_decode", "zstd_decode"):
            monkeypatch.setattr(module, name, getattr(module, name))  # restored on teardown
    guard_kafka_decompression(1 << 20)
    data = bytes(batch(0, [(None, bytes(2 << 20), [])], compression=4))
    records = MemoryRecords(data)
    with pytest.raises(ExpandsTooFar):
        list(records.next_batch())
    small = MemoryRecords(bytes(batch(0, [(None, b"fine", [])], compression=4)))
    assert [r.value for r in small.next_batch()] == [b"fine"]
