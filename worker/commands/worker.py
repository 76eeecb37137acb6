"""`embedfleet worker`: run one worker of the fleet (worker.app.serve) with the settings of
worker.config, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from worker.app import FAULT_HOLD_S, serve
from worker.config import WorkerConfig
from worker.logs import setup_logging

log = logging.getLogger("embedfleet.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    WorkerConfig.add_cli_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the settings and exit")
    parser.add_argument(
        "--fault-marker", default=None, help="testing only: inference fails for texts containing this marker"
    )
    parser.add_argument(
        "--fault-kind",
        default="raise",
        choices=("raise", "nan", "hold-transaction"),
        help="testing only: what the marker does: the model raises, the model gives "
        "NaN vectors, or (exactly-once) the batch's transaction is held open "
        f"for {FAULT_HOLD_S:.0f}s before it commits",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = WorkerConfig.from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.describe(), indent=2))
        return 0
    setup_logging(config.log_format, config.log_level, worker_id=config.worker_id)
    from worker.engine.embedder import Embedder, physical_cpu_count
    from worker.engine.errors import EngineError

    calls, per_call = config.model_threads(physical_cpu_count())
    log.info("model: %d call(s) side by side, %d ONNX Runtime thread(s) each", calls, per_call)
    try:
        embedder = Embedder.from_bundle(
            config.model,
            variant=config.variant,
            device=config.device,  # type: ignore[arg-type]
            intra_op_threads=per_call,
            fault_marker=args.fault_marker if args.fault_kind != "hold-transaction" else None,
            fault_kind=args.fault_kind,
            int8_weights=config.int8_weights,
            parallel_calls=calls,
        )
    except EngineError as exc:  # a bundle, a device or INT8 weights this machine cannot serve
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("model: variant %s, kernel %s", embedder.variant, embedder.kernel)
    hold = args.fault_marker if args.fault_kind == "hold-transaction" else None
    return asyncio.run(serve(config, embedder, inference_threads=calls, hold_marker=hold))
