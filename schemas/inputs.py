"""Input texts for `embedfleet produce` and `embedfleet embed`: JSONL (objects or bare strings) or
plain-text lines. Here, below both packages, so neither imports the other for it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

from schemas.errors import SchemaError

InputFormat = Literal["jsonl", "lines"]


class InputError(SchemaError, ValueError):
    """A line that cannot be read as the chosen format (the message names the line)."""


@dataclass(frozen=True, slots=True)
class InputText:
    id: Any  # the input's id (any JSON value), or the line number from 1
    text: str


def parse_jsonl(
    lines: Iterable[str], *, hint: str = "for plain text use --format lines"
) -> Iterator[InputText]:
    """``{"id": ..., "text": ...}`` or a bare JSON string per line; blank lines are skipped.
    ``hint`` ends the message of a line that is not JSON (what the user can do instead)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number}: not JSON ({exc.msg}); {hint}") from None
        if isinstance(item, str):
            yield InputText(number, item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            yield InputText(item.get("id", number), item["text"])
        else:
            raise InputError(f'line {number}: expected a JSON string or an object with a string "text"')


def parse_lines(lines: Iterable[str]) -> Iterator[InputText]:
    """One text per line, without its line ending; blank lines are skipped (no worker embeds them)."""
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\r\n")
        if text.strip():
            yield InputText(number, text)


def parse(lines: Iterable[str], input_format: InputFormat) -> Iterator[InputText]:
    return parse_jsonl(lines) if input_format == "jsonl" else parse_lines(lines)


def take(items: Iterator[InputText], count: int) -> list[InputText]:
    """The next ``count`` items (fewer at the end)."""
    return list(islice(items, count))
