"""The `embedfleet` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their subcommand runs,
so `embedfleet stack up` does not load ONNX Runtime.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (subcommand, module, one-line help). The module provides add_arguments() and run().
SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("stack", "worker.stack_command", "start, stop or inspect the local Kafka + Redis stack"),
    ("model", "worker.engine.commands", "build or check a model bundle"),
    ("embed", "worker.engine.embed_command", "embed JSONL texts offline with a model bundle"),
    ("worker", "worker.app", "run a worker of the fleet"),
    ("schema", "schemas.commands", "print the JSON Schema of the wire contract"),
    ("produce", "producer.cli", "send texts to the fleet and collect their vectors"),
    ("dlq", "worker.dlq_command", "inspect or replay the dead-letter topic"),
    ("demo", "worker.demo", "run the main job: stack, two workers, a sample of jobs, a summary"),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedfleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Load a module's arguments only for the subcommand being run (or for --help of it).
        if only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    known = {name for name, _, _ in SUBCOMMANDS}
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in known else None)
    args = parser.parse_args(args_list)
    module = getattr(args, "_module", None)
    if module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
