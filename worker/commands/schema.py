"""`embedfleet schema`: print the JSON Schema of the wire contract."""

from __future__ import annotations

import argparse
import sys

from schemas.json_schema import SCHEMA_KINDS, SchemaKind, render_schema


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind",
        choices=SCHEMA_KINDS,
        default="all",
        help="which message to describe (default: all, the committed bundle)",
    )


def run(args: argparse.Namespace) -> int:
    kind: SchemaKind = args.kind
    sys.stdout.write(render_schema(kind))
    return 0
