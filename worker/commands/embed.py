"""`embedfleet embed`: embed JSONL texts offline with a model bundle.

Input, one per line: ``{"id": ..., "text": ...}`` or a bare JSON string (its id is then the
line number, from 1). Output, one per input line in the same order: ``{"id": ..., "vector": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO

from schemas.inputs import parse_jsonl, take
from worker.engine.bundle import BundleError, default_bundle_dir
from worker.engine.tokenize import DEFAULT_TOKEN_BUDGET

CHUNK_LINES = 4096  # texts read per engine call: bounds memory on large inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", default="-", help="JSONL file (default: stdin)")
    parser.add_argument("--model", type=Path, help="bundle directory (default: the default bundle)")
    parser.add_argument("--variant", choices=("fp32", "int8", "fp16", "openvino"), default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--task", help="prompt name declared by the model, e.g. query")
    parser.add_argument("--dimensions", type=int, help="Matryoshka truncation")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET, help="padded tokens per model call"
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--output", "-o", type=Path, help="JSONL output file (default: stdout)")


def run(args: argparse.Namespace) -> int:
    from worker.engine.embedder import Embedder
    from worker.engine.errors import EngineError

    try:
        embedder = Embedder.from_bundle(
            args.model or default_bundle_dir(),
            variant=args.variant,
            device=args.device,
            intra_op_threads=args.threads,
        )
        embedder.check_dimensions(args.dimensions)
        embedder.prefix_for(args.task)
    except (BundleError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    source: IO[str] = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    sink: IO[str] = sys.stdout if args.output is None else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    truncated = 0
    count = 0
    try:
        items = parse_jsonl(source, hint='write one JSON string or {"id": ..., "text": ...} per line')
        while chunk := take(items, CHUNK_LINES):
            result = embedder.embed(
                [item.text for item in chunk],
                task=args.task,
                dimensions=args.dimensions,
                batch_size=args.batch_size,
                token_budget=args.token_budget,
            )
            for item, vector in zip(chunk, result.vectors, strict=True):
                sink.write(json.dumps({"id": item.id, "vector": vector.tolist()}) + "\n")
            truncated += sum(result.truncated)
            count += len(chunk)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not sys.stdout:
            sink.close()
    print(
        f"embedded {count} texts with {embedder.manifest.name} ({embedder.variant}); "
        f"{truncated} truncated to {embedder.manifest.max_tokens} tokens",
        file=sys.stderr,
    )
    return 0
