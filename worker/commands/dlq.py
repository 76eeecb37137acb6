"""`embedfleet dlq list|replay`: inspect the dead-letter topic, and re-send what a fix made valid.

    embedfleet dlq list   [--reason CODE ...] [--limit N] [--from-offset N] [--json]
    embedfleet dlq replay [--reason CODE ...] [--dry-run] [--to TOPIC] [--from-offset N]

Both read the DLQ from its beginning (or ``--from-offset``, applied to every partition) up to the
end offsets it has when the command starts, then stop: they never wait for new dead letters, and
what a replay sends back to the DLQ (a request that fails again) lands past that end.

A dead letter is the raw request (original key, value and headers) plus ``dlq-*`` headers saying
why it was refused (``schemas/codec.py``, ``worker/publisher.py``). ``replay`` re-sends the raw
request with every ``dlq-*`` header removed, through an idempotent producer with acks=all. Dead
letters the DLQ could not keep whole (``dlq-truncated-value``, ``dlq-truncated-key``,
``dlq-dropped-headers``) are skipped and reported: re-sending a cut copy would not be the request.
Bootstrap servers, topics and Kafka security come from the worker's environment (``WorkerConfig``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from schemas import (
    HEADER_DLQ_DROPPED_HEADERS,
    HEADER_DLQ_GENERATED_KEY,
    HEADER_DLQ_NULL_VALUE,
    HEADER_DLQ_RAW_BATCH,
    HEADER_DLQ_TRUNCATED_KEY,
    HEADER_DLQ_TRUNCATED_VALUE,
    ErrorCode,
)
from worker.config import WorkerConfig
from worker.errors import WorkerError
from worker.kafka_connection import explain_kafka_error, kafka_connection_options

DLQ_HEADER_PREFIX = "dlq-"
# Notes the publisher adds when it could not keep the original whole (worker/publisher.py):
# re-sending such a copy would not be the request.
INCOMPLETE_MARKERS: dict[str, str] = {
    HEADER_DLQ_TRUNCATED_VALUE: "value was truncated (original {} bytes)",
    HEADER_DLQ_TRUNCATED_KEY: "key was truncated (original {} bytes)",
    HEADER_DLQ_DROPPED_HEADERS: "original headers were dropped ({} of them)",
    HEADER_DLQ_RAW_BATCH: "the value is a whole record batch the worker could not read",
}
PREVIEW_BYTES = 60
PROGRESS_INTERVAL_S = 1.0
# With no record arriving for this long while the end offsets are not reached, give up (the
# end offsets came from the broker, so this only happens when records vanish under retention).
STALL_TIMEOUT_S = 15.0

Headers = list[tuple[str, bytes]]


class DlqError(WorkerError, RuntimeError):
    """A problem the user can fix; the message says how."""


# --- rendering ---------------------------------------------------------------------------------


def escape_text(text: str) -> str:
    """Text safe for a terminal: printable characters kept, everything else (ANSI escapes,
    newlines, bidi overrides) shown as a Python escape."""
    out: list[str] = []
    for char in text:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "".join(out)


def preview(data: bytes | None, limit: int = PREVIEW_BYTES) -> str:
    """The first ``limit`` bytes, decoded as UTF-8 where possible and escaped for a terminal."""
    if data is None:
        return "(null)"
    shown = escape_text(data[:limit].decode("utf-8", "surrogateescape"))
    return f'"{shown}"' + ("..." if len(data) > limit else "")


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic, with the reason and source its headers carry."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> str | None:
        found = None
        for key, value in self.headers:
            if key == name:
                found = value.decode("utf-8", "replace")
        return found

    @property
    def code(self) -> str:
        return self.header("dlq-error-code") or "(none)"

    @property
    def reason(self) -> str:
        return self.header("dlq-reason") or ""

    @property
    def source(self) -> str:
        topic = self.header("dlq-source-topic") or "?"
        partition = self.header("dlq-source-partition") or "?"
        return f"{topic}/{partition}@{self.header('dlq-source-offset') or '?'}"

    def original_headers(self) -> Headers:
        return [(k, v) for k, v in self.headers if not k.lower().startswith(DLQ_HEADER_PREFIX)]

    def incomplete(self) -> str | None:
        """Why this dead letter is not the whole original request (None when it is)."""
        for name, template in INCOMPLETE_MARKERS.items():
            size = self.header(name)
            if size is not None:
                return template.format(escape_text(size))
        if self.value is None:
            return "it has no value (a tombstone)"
        return None

    def line(self) -> str:
        value_size = "null" if self.value is None else f"{len(self.value)} B"
        return (
            f"{self.partition}:{self.offset}  {escape_text(self.code)}  "
            f"from {escape_text(self.source)}  reason: {escape_text(self.reason)}\n"
            f"    key {preview(self.key, 40)}  value ({value_size}) {preview(self.value)}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "error_code": self.code,
            "reason": self.reason,
            "source_topic": self.header("dlq-source-topic"),
            "source_partition": self.header("dlq-source-partition"),
            "source_offset": self.header("dlq-source-offset"),
            "worker": self.header("dlq-worker"),
            "key": None if self.key is None else self.key.decode("utf-8", "backslashreplace"),
            "value_bytes": None if self.value is None else len(self.value),
            "value_preview": None
            if self.value is None
            else self.value[:PREVIEW_BYTES].decode("utf-8", "backslashreplace"),
            "incomplete": self.incomplete(),
        }


# --- reading the DLQ up to its end offsets -----------------------------------------------------


@dataclass
class Scan:
    """What a pass over the DLQ saw."""

    total: int = 0
    end_offsets: dict[int, int] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)


def _header_name(name: str | bytes) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name


async def read_dead_letters(
    config: WorkerConfig, scan: Scan, *, from_offset: int | None
) -> AsyncIterator[DeadLetter]:
    """Every dead letter from the start (or ``from_offset``) up to the end offsets of now."""
    options = kafka_connection_options(config)
    options["client_id"] = f"embedfleet-dlq-{config.worker_id}"
    consumer = AIOKafkaConsumer(
        **options,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    try:
        await consumer.start()
        # A consumer without subscriptions keeps no topic metadata: ask the cluster once.
        metadata = await consumer._client.fetch_all_metadata()
        partitions = metadata.partitions_for_topic(config.dlq_topic)
        if not partitions:
            raise DlqError(
                f"the DLQ topic {config.dlq_topic!r} does not exist on "
                f"{config.kafka_bootstrap}: check EMBEDFLEET_DLQ_TOPIC"
            )
        tps = [TopicPartition(config.dlq_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        scan.end_offsets = {tp.partition: ends[tp] for tp in tps}
        pending: set[TopicPartition] = set()
        for tp in tps:
            start = max(begins[tp], from_offset or 0)
            scan.next_offsets[tp.partition] = min(start, ends[tp])
            if start < ends[tp]:
                consumer.seek(tp, start)
                pending.add(tp)
        for tp in set(tps) - pending:
            consumer.pause(tp)
        last_progress = time.monotonic()
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    scan.total += 1
                    scan.next_offsets[tp.partition] = record.offset + 1
                    headers = tuple((_header_name(k), bytes(v or b"")) for k, v in record.headers)
                    notes = {name for name, _ in headers}
                    # The publisher stands in for a null key or value (Kafka refuses a record
                    # with neither): the original nulls come back here.
                    yield DeadLetter(
                        partition=tp.partition,
                        offset=record.offset,
                        key=None if HEADER_DLQ_GENERATED_KEY in notes else record.key,
                        value=None if HEADER_DLQ_NULL_VALUE in notes else record.value,
                        headers=headers,
                    )
            for tp in list(pending):
                # position() also moves past transaction markers and aborted records.
                if await consumer.position(tp) >= ends[tp] or scan.next_offsets[tp.partition] >= ends[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
            if batches:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
                stuck = ", ".join(f"{tp.partition}@{scan.next_offsets[tp.partition]}" for tp in pending)
                print(
                    f"warning: no records for {STALL_TIMEOUT_S:.0f}s before the end offsets "
                    f"(partition@offset {stuck}); stopping there",
                    file=sys.stderr,
                )
                return
    finally:
        await consumer.stop()


def matches(letter: DeadLetter, reasons: Sequence[str] | None) -> bool:
    return not reasons or letter.code in reasons


# --- list --------------------------------------------------------------------------------------


async def list_dead_letters(config: WorkerConfig, args: argparse.Namespace, out: TextIO) -> int:
    scan = Scan()
    matched = shown = 0
    async for letter in read_dead_letters(config, scan, from_offset=args.from_offset):
        if not matches(letter, args.reason):
            continue
        matched += 1
        if args.limit is not None and shown >= args.limit:
            continue
        shown += 1
        print(json.dumps(letter.as_json(), ensure_ascii=True) if args.json else letter.line(), file=out)
    summary = f"{config.dlq_topic}: {scan.total} dead letter(s) read, {matched} matched, {shown} shown" + (
        f" (--limit {args.limit})" if args.limit is not None and matched > shown else ""
    )
    print(summary, file=sys.stderr if args.json else out)
    return 0


# --- replay ------------------------------------------------------------------------------------


@dataclass
class ReplayReport:
    matched: int = 0
    replayed: int = 0
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)


async def replay_dead_letters(config: WorkerConfig, args: argparse.Namespace, out: TextIO) -> int:
    target = args.to or config.requests_topic
    scan = Scan()
    report = ReplayReport()
    producer: AIOKafkaProducer | None = None
    acks: list[asyncio.Future[Any]] = []
    if not args.dry_run:
        options = kafka_connection_options(config)
        options["client_id"] = f"embedfleet-dlq-{config.worker_id}"
        producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=True, linger_ms=5)
    try:
        if producer is not None:
            await producer.start()
            # Fails fast for a missing topic instead of blocking max_block_ms on the first send.
            if target not in await _topics(producer):
                raise DlqError(
                    f"the topic {target!r} does not exist: check --to or EMBEDFLEET_REQUESTS_TOPIC"
                )
        verb = "would replay" if args.dry_run else "replaying"
        print(
            f"{verb} dead letters from {config.dlq_topic} to {target}"
            + (f" (codes: {', '.join(args.reason)})" if args.reason else ""),
            file=out,
        )
        last_progress = time.monotonic()
        async for letter in read_dead_letters(config, scan, from_offset=args.from_offset):
            if not matches(letter, args.reason):
                continue
            report.matched += 1
            why = letter.incomplete()
            if why is not None:
                report.skipped.append((letter, why))
                continue
            if producer is not None:
                acks.append(
                    await producer.send(
                        target, letter.value, key=letter.key, headers=letter.original_headers()
                    )
                )
            report.replayed += 1
            if time.monotonic() - last_progress >= PROGRESS_INTERVAL_S:
                last_progress = time.monotonic()
                ends = sum(scan.end_offsets.values())
                done = sum(scan.next_offsets.values())
                print(
                    f"  ... read to offset {done} of {ends}: matched {report.matched}, "
                    f"{'would replay' if args.dry_run else 'sent'} {report.replayed}, "
                    f"skipped {len(report.skipped)}",
                    file=out,
                    flush=True,
                )
        if acks:
            await asyncio.gather(*acks)
    finally:
        if producer is not None:
            await producer.stop()
    for letter, why in report.skipped:
        print(f"  skipped {letter.partition}:{letter.offset} ({escape_text(letter.code)}): {why}", file=out)
    replayed = "would replay" if args.dry_run else "replayed"
    print(
        f"{config.dlq_topic} -> {target}: read {scan.total}, matched {report.matched}, "
        f"{replayed} {report.replayed}, skipped {len(report.skipped)}"
        + (" (dry run: nothing sent)" if args.dry_run else ""),
        file=out,
    )
    if len(scan.next_offsets) == 1:
        print(f"dead letters after these: --from-offset {next(iter(scan.next_offsets.values()))}", file=out)
    elif scan.next_offsets:
        resume = ", ".join(f"{p}: {o}" for p, o in sorted(scan.next_offsets.items()))
        print(f"next offsets (partition: offset): {resume}", file=out)
    return 0


async def _topics(producer: AIOKafkaProducer) -> set[str]:
    metadata = await producer.client.fetch_all_metadata()
    return set(metadata.topics())


# --- command line ------------------------------------------------------------------------------


def _code(raw: str) -> str:
    known = {code.value for code in ErrorCode}
    if raw not in known:
        raise argparse.ArgumentTypeError(f"unknown error code {raw!r}; known: {', '.join(sorted(known))}")
    return raw


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (__doc__ or "").split("\n\n")[0]
    sub = parser.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--reason",
        action="append",
        type=_code,
        metavar="CODE",
        help="only dead letters with this dlq-error-code (repeatable)",
    )
    common.add_argument(
        "--from-offset",
        type=_non_negative,
        default=None,
        metavar="N",
        help="start at this offset of each DLQ partition (default: the beginning)",
    )
    listing = sub.add_parser(
        "list",
        parents=[common],
        help="print dead letters",
        description="Print the DLQ's dead letters (read up to its end, then stop).",
    )
    listing.add_argument(
        "--limit",
        type=_non_negative,
        default=None,
        metavar="N",
        help="print at most N dead letters (all are still counted)",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    replay = sub.add_parser(
        "replay",
        parents=[common],
        help="re-send dead letters to the requests topic",
        description="Re-send dead letters (original key, value and headers; dlq-* headers removed).",
    )
    replay.add_argument("--dry-run", action="store_true", help="report what would be sent; send nothing")
    replay.add_argument(
        "--to", default=None, metavar="TOPIC", help="topic to send to (default EMBEDFLEET_REQUESTS_TOPIC)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = WorkerConfig.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # aiokafka reports unreachable brokers itself; keep its noise to warnings.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    action = list_dead_letters if args.dlq_action == "list" else replay_dead_letters
    try:
        return asyncio.run(action(config, args, sys.stdout))
    except (DlqError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"error: {asyncio.run(explain_kafka_error(config, exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `embedfleet dlq list | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
