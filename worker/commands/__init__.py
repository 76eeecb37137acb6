"""The `embedfleet` command: one entry point, one subcommand per job, all in this package.

Each subcommand is a module here that exposes ``add_arguments(parser)`` and ``run(args) -> int``
(worker, model, embed, schema, produce, dlq, gateway); local-dev tooling (the stack, the demo) instead runs
a script of the source checkout (worker.checkout). Modules are imported only when their
subcommand runs, so `embedfleet stack up` does not load ONNX Runtime. This package sits above
the worker runtime and the client (producer/), which never import it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from worker.checkout import run_checkout_script


class Subcommand(NamedTuple):
    name: str
    module: str  # imported only when this subcommand runs
    help: str
    # A checkout script (local-dev tooling): its arguments, --help included, go to the script.
    script: str | None = None


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "stack", "worker.checkout", "start, stop or inspect the local Kafka + Redis stack", script="stack.py"
    ),
    Subcommand("model", "worker.commands.model", "build or check a model bundle"),
    Subcommand("embed", "worker.commands.embed", "embed JSONL texts offline with a model bundle"),
    Subcommand("worker", "worker.commands.worker", "run a worker of the fleet"),
    Subcommand("schema", "worker.commands.schema", "print the JSON Schema of the wire contract"),
    Subcommand("produce", "worker.commands.produce", "send texts to the fleet and collect their vectors"),
    Subcommand("dlq", "worker.commands.dlq", "inspect or replay the dead-letter topic"),
    Subcommand(
        "gateway",
        "worker.commands.gateway",
        "serve OpenAI's /v1/embeddings (and /embed) over HTTP in front of the fleet",
    ),
    Subcommand(
        "demo",
        "worker.checkout",
        "run the main job: two workers, a sample of jobs, a summary (needs the stack)",
        script="demo.py",
    ),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedfleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        # Load a module's arguments only for the subcommand being run (or for --help of it).
        if only == command.name:
            module = importlib.import_module(command.module)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    known = {command.name for command in SUBCOMMANDS}
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    tool = next((c for c in SUBCOMMANDS if c.name == chosen and c.script), None)
    if tool is not None and tool.script is not None:
        rest = args_list[args_list.index(tool.name) + 1 :]
        return run_checkout_script(tool.script, rest, f"`embedfleet {tool.name}`")
    parser = build_parser(chosen if chosen in known else None)
    args = parser.parse_args(args_list)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
