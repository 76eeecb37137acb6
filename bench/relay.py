"""The least work any aiokafka worker can do: the ceiling that bench/e2e.py judges the worker by.

    .venv/bin/python bench/relay.py --requests TOPIC --results TOPIC --group GROUP
        [--bootstrap 127.0.0.1:9092] [--ready-file PATH] [--max-records 10000] [--depth 2]
        [--model-name all-MiniLM-L6-v2] [--dim 384] [--tokens 12]

It consumes the request topic as a worker does (a consumer group, auto_offset_reset earliest, manual
commits, the worker's fetch sizes) and answers every request with ONE result of the size and form
the worker would send for a cache hit: a real result of a fixed random unit vector in the requested
``encoding_format``, encoded as the worker encodes it (float: ~4.7 KB of JSON for 384 dimensions;
base64 ~2.2 KB), encoded once per format and templated (prefix + id + middle + key + suffix), with
the worker's result headers. The key is 64 hex characters derived from the request's bytes (SHA-256
of the value; not the content hash, which would need the model's fingerprint and text
canonicalisation) so keys spread over partitions as the worker's do; the partition is the Java
client's murmur2 of the key over the results topic's partitions (``worker.partitioner``), as the
worker computes it.

Per fetch (``getmany`` with a large ``max_records``): one record batch per results partition
(``create_batch``, closed before ``send_batch``, more batches only when one is full), one future
per batch, sent round by round so that every produce request carries one batch of every partition.
A fetch's offsets become committable once all its batches, and those of every earlier fetch, are
acknowledged (acks=all, idempotent, as the worker's producer); one commit at a time carries all that
became committable since the last (a commit per fetch put a coordinator round trip between fetches
when requests come one by one: p50 11 ms instead of 5 at 200 requests/s). Up to ``--depth`` fetches
are unacknowledged at once: fetch N+1 is taken and sent while fetch N's acknowledgements are
outstanding.

Only JSON requests are understood (what the benchmark sends); only ``id`` and ``encoding_format``
are read from them. Readiness: when the consumer has joined the group and got partitions, it prints
``relay ready: ...`` and writes the wall-clock time (ms) to ``--ready-file``. SIGTERM or SIGINT:
it finishes what is in flight, commits, prints a summary line and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from schemas import encode_success_result, result_headers  # noqa: E402
from worker.partitioner import partition_hashes  # noqa: E402

log = logging.getLogger("relay")

# The worker's fetch sizes (worker.intake.create_consumer with the default 1 MiB message limit and
# in-flight budget) and producer batch size (worker.publisher.create_producer).
MAX_PARTITION_FETCH_BYTES = (1 << 20) + (64 << 10)
FETCH_MAX_BYTES = 50 << 20
MAX_BATCH_BYTES = (1 << 20) - 1024
MAX_REQUEST_BYTES = 2 << 20
_ID_MARK = "\x01relay-id\x01"
_KEY_MARK = "0" * 63 + "x"  # 64 characters, never a SHA-256 hex digest


class _Head(msgspec.Struct):
    """The fields of a request the relay reads (msgspec skips the others)."""

    id: str
    encoding_format: str = "float"


_HEAD = msgspec.json.Decoder(_Head)
_ENCODE_STR = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Template:
    """One pre-encoded result: prefix + JSON string of the id + middle + key + suffix."""

    prefix: bytes
    middle: bytes
    suffix: bytes

    @classmethod
    def of(cls, encoding_format: str, *, model_name: str, dim: int, tokens: int, seed: int = 21) -> Template:
        vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        # Encoded as the worker encodes its results (schemas.encode_success_result).
        encoded = encode_success_result(
            request_id=_ID_MARK,
            key=_KEY_MARK,
            model=model_name,
            vector=vector,
            encoding_format="base64" if encoding_format == "base64" else "float",
            cached=True,
            tokens=tokens,
        )
        id_json = _ENCODE_STR(_ID_MARK)
        prefix, rest = encoded.split(id_json)
        middle, suffix = rest.split(_KEY_MARK.encode())
        return cls(prefix, middle, suffix)

    def render(self, request_id: str, key: bytes) -> bytes:
        return b"".join((self.prefix, _ENCODE_STR(request_id), self.middle, key, self.suffix))


@dataclass
class RelayOptions:
    requests_topic: str
    results_topic: str
    group_id: str
    bootstrap: str = "127.0.0.1:9092"
    max_records: int = 10_000
    depth: int = 2  # fetches in flight (sent, not yet acknowledged)
    model_name: str = "all-MiniLM-L6-v2"
    dim: int = 384
    tokens: int = 12


@dataclass
class RelayStats:
    records: int = 0
    fetches: int = 0
    batches: int = 0
    commits: int = 0
    commits_failed: int = 0
    ready_at: float | None = None  # time.time() when partitions were first assigned
    started: float = field(default_factory=time.time)


class _Readiness(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # What is in flight belongs to the old assignment: acknowledge and commit it first.
        await self._relay.drain()
        self._relay.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned and self._relay.stats.ready_at is None:
            self._relay.stats.ready_at = time.time()
            self._relay.on_ready(sorted(tp.partition for tp in assigned))


class Relay:
    """The relay's consume -> produce -> commit loop (``run``), stopped by ``stop``."""

    def __init__(
        self, options: RelayOptions, *, on_ready: Callable[[list[int]], None] = lambda _: None
    ) -> None:
        self.options = options
        self.on_ready = on_ready
        self.stats = RelayStats()
        self._stop = asyncio.Event()
        self._in_flight: deque[asyncio.Task[None]] = deque()
        self._acked: dict[TopicPartition, int] = {}  # next offset per partition, all acknowledged
        self._committed: dict[TopicPartition, int] = {}
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._templates = {
            fmt: Template.of(fmt, model_name=options.model_name, dim=options.dim, tokens=options.tokens)
            for fmt in ("float", "base64")
        }
        self._headers = result_headers()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=options.bootstrap,
            group_id=options.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
            fetch_max_bytes=FETCH_MAX_BYTES,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=options.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=MAX_REQUEST_BYTES,
        )

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> RelayStats:
        await self._producer.start()
        try:
            partitions = await self._results_partitions()
            self._consumer.subscribe([self.options.requests_topic], listener=_Readiness(self))
            await self._consumer.start()
            committer = asyncio.ensure_future(self._commit_loop())
            try:
                await self._loop(partitions)
                await self.drain()
            finally:
                committer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await committer
                await self._consumer.stop()
        finally:
            await self._producer.stop()
        return self.stats

    async def _results_partitions(self) -> list[int]:
        for _ in range(100):  # a topic created a moment ago takes a moment to appear in metadata
            found = await self._producer.partitions_for(self.options.results_topic)
            if found:
                return sorted(found)
            await asyncio.sleep(0.1)
        raise SystemExit(f"the results topic {self.options.results_topic} has no partitions")

    async def _loop(self, partitions: list[int]) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                fetch = asyncio.ensure_future(
                    self._consumer.getmany(timeout_ms=100, max_records=self.options.max_records)
                )
                await asyncio.wait([fetch, stop], return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    break
                fetched = fetch.result()
                if fetched:
                    await self._relay(fetched, partitions)
        finally:
            stop.cancel()

    async def _relay(self, fetched: dict[TopicPartition, list[Any]], partitions: list[int]) -> None:
        templates, headers = self._templates, self._headers
        values: list[bytes] = []
        keys: list[bytes] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, records in fetched.items():
            for record in records:
                head = _HEAD.decode(record.value)
                key = hashlib.sha256(record.value).hexdigest().encode()
                template = templates.get(head.encoding_format) or templates["float"]
                values.append(template.render(head.id, key))
                keys.append(key)
            offsets[tp] = records[-1].offset + 1
        # One list of batch builders per results partition.
        count = len(partitions)
        builders: dict[int, list[Any]] = {}
        for key, value, key_hash in zip(keys, values, partition_hashes(keys), strict=True):
            partition = partitions[key_hash % count]
            chain = builders.get(partition)
            if chain is None:
                chain = builders[partition] = [self._producer.create_batch()]
            if chain[-1].append(key=key, value=value, timestamp=None, headers=headers) is None:
                chain.append(self._producer.create_batch())
                if chain[-1].append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise SystemExit(f"a result of {len(value)} bytes does not fit a record batch")
        # Round by round: aiokafka holds one batch per partition until the sender takes it, so
        # the i-th batches of all partitions go into one produce request.
        futures: list[asyncio.Future[Any]] = []
        rounds = max(len(chain) for chain in builders.values())
        topic = self.options.results_topic
        for index in range(rounds):
            for partition, chain in builders.items():
                if index < len(chain):
                    chain[index].close()
                    futures.append(await self._producer.send_batch(chain[index], topic, partition=partition))
        self.stats.records += len(values)
        self.stats.fetches += 1
        self.stats.batches += len(futures)
        previous = self._in_flight[-1] if self._in_flight else None
        self._in_flight.append(asyncio.ensure_future(self._acknowledged(previous, futures, offsets)))
        while len(self._in_flight) >= self.options.depth:
            await self._in_flight.popleft()
        while self._in_flight and self._in_flight[0].done():
            await self._in_flight.popleft()

    async def _acknowledged(
        self,
        previous: asyncio.Task[None] | None,
        futures: list[asyncio.Future[Any]],
        offsets: dict[TopicPartition, int],
    ) -> None:
        """Once every batch of a fetch, and every earlier fetch, is acknowledged, its offsets
        become committable (fetch order: a later fetch may hold later offsets of a partition)."""
        await asyncio.gather(*futures)  # a failed produce is fatal: the relay has no retries
        if previous is not None:
            await asyncio.shield(previous)
        self._acked.update(offsets)
        self._commit_wanted.set()

    async def _commit_loop(self) -> None:
        """One commit at a time, of everything acknowledged since the last one: a commit per fetch
        would put a coordinator round trip between fetches when requests come one by one."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            async with self._commit_lock:
                await self._commit()

    async def _commit(self) -> None:
        offsets = {tp: o for tp, o in self._acked.items() if self._committed.get(tp) != o}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
            self._committed.update(offsets)
            self.stats.commits += 1
        except KafkaError as exc:  # a rebalance: the new owner reprocesses (at least once)
            self.stats.commits_failed += 1
            log.warning("commit failed: %r", exc)

    def forget(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self._acked.pop(tp, None)
            self._committed.pop(tp, None)

    async def drain(self) -> None:
        """Waits for every fetch in flight to be acknowledged and commits."""
        while self._in_flight:
            await self._in_flight.popleft()
        async with self._commit_lock:
            await self._commit()


async def relay_main(options: RelayOptions, ready_file: Path | None) -> RelayStats:
    def ready(partitions: list[int]) -> None:
        if ready_file is not None:
            ready_file.write_text(f"{time.time() * 1000:.1f}\n")
        print(f"relay ready: partitions {partitions}", flush=True)

    relay = Relay(options, on_ready=ready)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, relay.stop)
    stats = await relay.run()
    seconds = time.time() - (stats.ready_at or stats.started)
    print(
        f"relay done: {stats.records} records in {stats.fetches} fetches, {stats.batches} batches, "
        f"{stats.commits} commits ({stats.commits_failed} failed), {seconds:.1f} s since ready",
        flush=True,
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", required=True, help="the request topic")
    parser.add_argument("--results", required=True, help="the results topic (it must exist)")
    parser.add_argument("--group", required=True, help="the consumer group")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--ready-file", type=Path, default=None, help="written when partitions are assigned")
    parser.add_argument("--max-records", type=int, default=RelayOptions.max_records, help="per getmany")
    parser.add_argument("--depth", type=int, default=RelayOptions.depth, help="fetches in flight (>= 1)")
    parser.add_argument("--model-name", default=RelayOptions.model_name)
    parser.add_argument("--dim", type=int, default=RelayOptions.dim)
    parser.add_argument("--tokens", type=int, default=RelayOptions.tokens, help="the results' tokens field")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="relay %(levelname)s %(name)s: %(message)s")
    options = RelayOptions(
        requests_topic=args.requests,
        results_topic=args.results,
        group_id=args.group,
        bootstrap=args.bootstrap,
        max_records=args.max_records,
        depth=max(1, args.depth),
        model_name=args.model_name,
        dim=args.dim,
        tokens=args.tokens,
    )
    asyncio.run(relay_main(options, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
