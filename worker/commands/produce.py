"""`embedfleet produce`: send texts to the fleet and write their vectors, in input order.

Input (FILE or - for stdin): JSONL, one ``{"id": ..., "text": ...}`` or bare JSON string per line,
or plain-text lines with ``--format lines`` (ids are then line numbers). Output: JSONL
``{"id": ..., "vector": [...]}`` (``{"id": ..., "error": {...}}`` for a failed text) to stdout or
``--output``; a name ending in .npy gets one float32 matrix instead (failed rows are NaN).
Exit status: 0 all embedded, 1 some texts failed or timed out, 2 bad input or no service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from producer.client import Client
from producer.config import ClientConfig
from producer.errors import EmbedBatchError, EmbedTimeout, TextFailure, Vector
from producer.kafka import ServiceUnavailable
from producer.outputs import Sink, open_sink
from producer.progress import Progress, RateLimiter
from schemas import LONG_INPUTS
from schemas.inputs import InputError, InputText, parse, take

Outcome = list[tuple[Vector | None, TextFailure | None]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", default="-", help="input file (default: - for stdin)")
    parser.add_argument(
        "--format",
        dest="input_format",
        choices=("jsonl", "lines"),
        default="jsonl",
        help="jsonl: {id, text} objects or JSON strings; lines: one plain text per line",
    )
    parser.add_argument("--output", "-o", help="JSONL file, or a .npy file for one matrix (default: stdout)")
    parser.add_argument("--task", help="prompt name of the model, e.g. query or document")
    parser.add_argument("--dimensions", type=int, help="Matryoshka truncation (if the model offers it)")
    parser.add_argument(
        "--long",
        choices=LONG_INPUTS,
        default="truncate",
        help="a text longer than the model reads: truncate (default), pool or chunks (its windows' mean)",
    )
    parser.add_argument(
        "--overlap", type=int, help="tokens shared by consecutive windows (pool, chunks; default 32)"
    )
    parser.add_argument("--rate", type=float, help="send at most this many texts per second")
    parser.add_argument("--concurrency", type=int, default=4096, help="texts in flight at once")
    parser.add_argument("--batch-size", type=int, default=512, help="texts per client call")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds a batch may wait for its results"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="only produce the requests (writes {id, request_id} lines)"
    )
    parser.add_argument(
        "--reply-mode",
        choices=("private", "shared"),
        default=None,
        help="private: a reply topic of this run's own (default); shared: read embed.results",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read the Redis cache first")
    parser.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers (env EMBEDFLEET_KAFKA_BOOTSTRAP)")
    parser.add_argument("--redis-url", help="Redis URL of the cache, '' for none (env EMBEDFLEET_REDIS_URL)")
    parser.add_argument("--model-name", help="model served by the fleet (env EMBEDFLEET_MODEL_NAME)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress line")


@dataclass(slots=True)
class Counts:
    read: int = 0
    done: int = 0


def client_config(args: argparse.Namespace) -> ClientConfig:
    reply_mode = "none" if args.no_wait else args.reply_mode
    return ClientConfig.from_env(
        kafka_bootstrap=args.kafka_bootstrap,
        redis_url=args.redis_url,
        model_name=args.model_name,
        reply_mode=reply_mode,
        use_cache=False if args.no_cache else None,
    )


def chunk_size(args: argparse.Namespace) -> int:
    size: int = max(1, min(args.batch_size, args.concurrency))
    # With a rate limit, small chunks about four times a second keep the pace smooth.
    return max(1, min(size, int(args.rate / 4))) if args.rate else size


async def _embed_chunk(client: Client, items: list[InputText], args: argparse.Namespace) -> Outcome:
    try:
        vectors = await client.embed(
            [item.text for item in items],
            task=args.task,
            dimensions=args.dimensions,
            timeout=args.timeout,
            long=args.long,
            overlap=args.overlap,
        )
    except EmbedBatchError as exc:
        by_index = {failure.index: failure for failure in exc.failures}
        return [(exc.vectors[i], by_index.get(i)) for i in range(len(items))]
    return [(vector, None) for vector in vectors]


async def _next_chunk(items: Iterator[InputText], size: int) -> list[InputText]:
    # Read in a thread: a slow stdin must not stall the loop that reads the results.
    return await asyncio.to_thread(take, items, size)


async def embed_all(
    client: Client,
    items: Iterator[InputText],
    sink: Sink,
    args: argparse.Namespace,
    progress: Progress,
    counts: Counts,
) -> None:
    limiter = RateLimiter(args.rate)
    size = chunk_size(args)
    in_flight: deque[tuple[list[InputText], asyncio.Task[Outcome]]] = deque()
    texts_in_flight = 0

    async def write_head() -> None:
        nonlocal texts_in_flight
        chunk, task = in_flight.popleft()
        for item, (vector, failure) in zip(chunk, await task, strict=True):
            sink.write(item, vector, failure)
        texts_in_flight -= len(chunk)
        counts.done += len(chunk)
        progress.update(counts.read, counts.done, client.stats)

    try:
        while chunk := await _next_chunk(items, size):
            counts.read += len(chunk)
            while in_flight and (texts_in_flight + len(chunk) > args.concurrency or in_flight[0][1].done()):
                await write_head()
            await limiter.acquire(len(chunk))
            in_flight.append((chunk, asyncio.create_task(_embed_chunk(client, chunk, args))))
            texts_in_flight += len(chunk)
        while in_flight:
            await write_head()
    finally:
        for _, task in in_flight:
            task.cancel()
        for _, task in in_flight:
            with contextlib.suppress(BaseException):
                await task


async def send_all(
    client: Client,
    items: Iterator[InputText],
    sink: Sink,
    args: argparse.Namespace,
    progress: Progress,
    counts: Counts,
) -> None:
    limiter = RateLimiter(args.rate)
    size = chunk_size(args)
    while chunk := await _next_chunk(items, size):
        counts.read += len(chunk)
        await limiter.acquire(len(chunk))
        ids = await client.send(
            [item.text for item in chunk],
            task=args.task,
            dimensions=args.dimensions,
            long=args.long,
            overlap=args.overlap,
        )
        for item, request_id in zip(chunk, ids, strict=True):
            sink.write_sent(item, request_id)
        counts.done += len(chunk)
        progress.update(counts.read, counts.done, client.stats)


def summary(client: Client, counts: Counts, progress: Progress, *, no_wait: bool) -> str:
    stats = client.stats
    if no_wait:
        return (
            f"produced {stats.produced} requests for {counts.read} texts (cached {stats.cached}, "
            f"invalid {stats.failed}) in {progress.elapsed_s:.1f}s, "
            f"{progress.rate(counts.done):,.0f} texts/s; results go to the workers' results topic"
        )
    return (
        f"sent {counts.read} texts ({stats.produced} requests produced): cached {stats.cached}, "
        f"computed {stats.computed}, failed {stats.failed} in {progress.elapsed_s:.1f}s, "
        f"{progress.rate(counts.done):,.0f} texts/s"
    )


async def produce(args: argparse.Namespace, source: IO[str], sink: Sink, stderr: IO[str]) -> int:
    progress = Progress(stderr, enabled=not args.quiet)
    counts = Counts()
    items = parse(source, args.input_format)
    async with Client(client_config(args)) as client:
        try:
            if args.no_wait:
                await send_all(client, items, sink, args, progress, counts)
            else:
                await embed_all(client, items, sink, args, progress, counts)
        except EmbedTimeout as exc:
            progress.finish()
            stderr.write(f"error: {exc}\n")
            stderr.write(summary(client, counts, progress, no_wait=args.no_wait) + "\n")
            return 1
        progress.update(counts.read, counts.done, client.stats, force=True)
        progress.finish()
        stderr.write(summary(client, counts, progress, no_wait=args.no_wait) + "\n")
        return 1 if client.stats.failed else 0


def run(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or args.batch_size < 1 or (args.rate is not None and args.rate <= 0):
        print("error: --concurrency and --batch-size must be >= 1, --rate > 0", file=sys.stderr)
        return 2
    if args.no_wait and args.output and args.output.endswith(".npy"):
        print("error: --no-wait writes request ids, not vectors: use a JSONL --output", file=sys.stderr)
        return 2
    try:
        source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"error: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return 2
    sink = open_sink(args.output, sys.stdout)
    try:
        return asyncio.run(produce(args, source, sink, sys.stderr))
    except (InputError, ServiceUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        sink.close()
        if source is not sys.stdin:
            source.close()
