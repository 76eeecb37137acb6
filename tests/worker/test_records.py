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
    found = scan(TP, data, 100, [], read_committed=False)
    # One pass over the batch: the good records on both sides of the culprit, and the culprit;
    # the partition continues after the whole batch (aiokafka would unpack it again otherwise).
    assert [r.offset for r in found.records] == [100, 102]
    [unreadable] = found.unreadable
    assert unreadable.offset == 101 and found.resume_at == 103 and unreadable.next_offset == 103
    assert "not valid UTF-8" in unreadable.reason
    assert unreadable.record is not None and unreadable.record.headers == [(b"\xff\xfe", b"v")]
    assert unreadable.record.text_headers() == [("\ufffd\ufffd", b"v")]
    # From a later position the records before it are not handed over again.
    found = scan(TP, data, 101, [], read_committed=False)
    assert [r.offset for r in found.records] == [102] and [u.offset for u in found.unreadable] == [101]
    # Past it, everything reads: nothing to salvage.
    found = scan(TP, data, 102, [], read_committed=False)
    assert found.resume_at is None and found.unreadable == [] and found.records == []


def culprit_batch(base_offset: int, pattern: str) -> bytes:
    """One record batch whose records follow ``pattern``: 'g' a good record, 'b' one whose header
    name is not UTF-8."""
    records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = [
        (None, f'{{"id":"r{base_offset + i}","text":"t"}}'.encode(), [("XX", b"v")] if kind == "b" else [])
        for i, kind in enumerate(pattern)
    ]
    # The header as encoded (name length 2, "XX", value length 1, "v"): bare "XX" bytes also
    # occur in the varints of a large batch.
    data = bytearray(bytes(batch(base_offset, records)).replace(b"\x04XX\x02v", b"\x04\xff\xfe\x02v"))
    struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[CRC_START:])))
    return bytes(data)


@pytest.mark.parametrize("pattern", ["bggg", "gggb", "ggbgg", "bgbgbg", "bbbb", "gbbbbbbbbg", "b"])
def test_every_good_record_of_a_batch_is_handed_over_whichever_records_are_unreadable(pattern: str) -> None:
    data = culprit_batch(50, pattern)
    found = scan(TP, data, 50, [], read_committed=False)
    assert [r.offset for r in found.records] == [50 + i for i, k in enumerate(pattern) if k == "g"]
    assert [u.offset for u in found.unreadable] == [50 + i for i, k in enumerate(pattern) if k == "b"]
    assert found.resume_at == 50 + len(pattern)


def test_salvage_reads_past_every_culprit_batch_in_one_pass_and_leaves_clean_batches_after() -> None:
    data = culprit_batch(0, "gbg") + bytes(batch(3, [(None, b"x", [])])) + culprit_batch(4, "bg")
    data += bytes(batch(6, [(None, b"after", [])]))
    found = scan(TP, data, 0, [], read_committed=False)
    assert [r.offset for r in found.records] == [0, 2, 3, 5]
    assert [u.offset for u in found.unreadable] == [1, 4]
    assert found.resume_at == 6  # the clean batch after the last culprit is the consumer's again


def test_salvage_is_linear_in_the_batch() -> None:
    """10,000 records, every other one unreadable: one scan hands all of them over (the old scan
    stopped at the first culprit and took one round per record: quadratic)."""
    pattern = "gb" * 5000
    found = scan(TP, culprit_batch(0, pattern), 0, [], read_committed=False)
    assert len(found.records) == 5000 and len(found.unreadable) == 5000 and found.resume_at == 10_000


def test_a_corrupt_batch_is_unreadable_as_a_whole() -> None:
    data = batch(7, [(None, b"a", []), (None, b"b", [])], compression=1)  # gzip
    data[-3] ^= 0xFF  # flip bits inside the compressed records
    found = scan(TP, bytes(data), 7, [], read_committed=False)
    assert found.records == []
    [unreadable] = found.unreadable
    assert (unreadable.offset, unreadable.next_offset, unreadable.record) == (7, 9, None)
    assert "CRC" in unreadable.reason and found.resume_at == 9


def test_compressed_batches_and_a_partial_trailing_batch() -> None:
    first = bytes(batch(0, [(None, b"x" * 1000, []), (None, b"y", [])], compression=4))  # zstd
    second = culprit_batch(2, "b")
    third = bytes(batch(3, [(None, b"z", [])]))
    found = scan(TP, first + second + third[:-5], 0, [], read_committed=False)
    assert [r.value for r in found.records] == [b"x" * 1000, b"y"] and found.resume_at == 3


def test_aborted_transactions_are_skipped_under_read_committed() -> None:
    aborted = bytes(batch(0, [(None, b"aborted", [])], transactional=True, producer_id=9))
    committed = bytes(batch(1, [(None, b"kept", [])], transactional=True, producer_id=10))
    tail = culprit_batch(2, "b")
    found = scan(TP, aborted + committed + tail, 0, [(9, 0)], read_committed=True)
    assert [r.value for r in found.records] == [b"kept"]
    found = scan(TP, aborted + committed + tail, 0, [(9, 0)], read_committed=False)
    assert [r.value for r in found.records] == [b"aborted", b"kept"]


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
    found = scan(TP, data, 5, [], read_committed=False, max_expanded_bytes=1 << 20)
    [unreadable] = found.unreadable
    assert found.records == [] and unreadable.too_large and found.resume_at == 6
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
