"""The batch murmur2 gives exactly aiokafka's (the Java client's) hash and partition for every
key length, including the 1-3 byte tails."""

import random

import pytest
from aiokafka.partitioner import murmur2

from worker.partitioner import murmur2_many, partition_hashes


def test_same_hashes_as_aiokafka_for_every_length() -> None:
    rng = random.Random(12)
    keys = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80))) for _ in range(2000)]
    keys += [b"", b"a", b"ab", b"abc", b"abcd", b"\xff" * 7]
    assert murmur2_many(keys).tolist() == [murmur2(k) & 0xFFFFFFFF for k in keys]


@pytest.mark.parametrize("partitions", [1, 6, 7, 100])
def test_same_partitions_as_the_java_client(partitions: int) -> None:
    keys = [f"{i:064x}".encode() for i in range(500)]  # content hashes are 64 hex digits
    expected = [(murmur2(k) & 0x7FFFFFFF) % partitions for k in keys]
    assert [h % partitions for h in partition_hashes(keys)] == expected


def test_known_java_values() -> None:
    # From Kafka's own UtilsTest.testMurmur2 (as signed Java ints).
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536}
    for key, java in cases.items():
        assert int(murmur2_many([key])[0]) == java & 0xFFFFFFFF
