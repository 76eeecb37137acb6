"""`embedfleet stack up|down|status`: the local Kafka + Redis stack of a source checkout.

The stack manager is the script ``deploy/local/stack.py`` (it belongs to the deployment files,
not to the worker); this subcommand finds it next to the package and runs it with this Python.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

STACK_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "local" / "stack.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "stack_args",
        nargs=argparse.REMAINDER,
        help="passed on to deploy/local/stack.py (e.g. --service redis)",
    )


def run(args: argparse.Namespace) -> int:
    if not STACK_SCRIPT.exists():
        print(
            f"error: {STACK_SCRIPT} not found. The local stack runs from a source checkout of "
            "embedfleet (git clone, then `make stack-up`).",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(STACK_SCRIPT), args.action, *args.stack_args])
