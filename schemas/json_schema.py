"""The JSON Schema of the wire contract, generated from the msgspec Structs.

The committed ``schemas/embedfleet.schema.json`` is ``contract_schema("all")``; a test
keeps it up to date (regenerate with ``embedfleet schema > schemas/embedfleet.schema.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from schemas.messages import LONG_INPUTS_SCHEMA_VERSION, SCHEMA_VERSION, EmbedRequest, EmbedResult

SchemaKind = Literal["request", "result", "all"]
SCHEMA_KINDS: Final[tuple[SchemaKind, ...]] = ("request", "result", "all")
SCHEMA_FILE: Final = Path(__file__).with_name("embedfleet.schema.json")
_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def contract_schema(kind: SchemaKind = "all") -> dict[str, Any]:
    """A self-contained JSON Schema document (draft 2020-12) for the chosen message(s)."""
    (request_ref, result_ref), components = msgspec.json.schema_components(
        [EmbedRequest, EmbedResult], ref_template="#/$defs/{name}"
    )
    document: dict[str, Any] = {
        "$schema": _DIALECT,
        "$id": f"urn:embedfleet:schema:{SCHEMA_VERSION}:{kind}",
        "title": f"embedfleet wire contract, schema version {SCHEMA_VERSION} ({kind})",
    }
    if kind == "request":
        document["$ref"] = request_ref["$ref"]
    elif kind == "result":
        document["$ref"] = result_ref["$ref"]
    else:
        document["description"] = (
            "Bundle of the request (topic embed.requests) and result (embed.results) "
            f"messages. Kafka headers: content-type, schema={SCHEMA_VERSION} "
            f"(schema={LONG_INPUTS_SCHEMA_VERSION} on a request whose long is pool or chunks)."
        )
    # Only the definitions the chosen root reaches, so `--kind request` stays small.
    wanted = {"request": {"EmbedRequest"}, "result": {"EmbedResult", "ErrorInfo", "Chunk"}}.get(
        kind, set(components)
    )
    document["$defs"] = {name: components[name] for name in sorted(wanted)}
    return document


def render_schema(kind: SchemaKind = "all") -> str:
    """The document as committed: 2-space indented JSON with a final newline."""
    return json.dumps(contract_schema(kind), indent=2, ensure_ascii=False) + "\n"
