"""Where `embedfleet produce` writes: JSONL lines (streamed in input order) or one .npy matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from producer.errors import TextFailure, Vector
from schemas import float32_to_floats
from schemas.inputs import InputText


class Sink(Protocol):
    """Where `embedfleet produce` writes vectors (JSONL or .npy)."""

    def write(self, item: InputText, vector: Vector | None, failure: TextFailure | None) -> None: ...

    def write_sent(self, item: InputText, request_id: str | None) -> None: ...

    def close(self) -> None: ...


def vector_line(item: InputText, vector: Vector | None, failure: TextFailure | None) -> str:
    if failure is not None:
        error = {"code": failure.code, "message": failure.message}
        record: dict[str, object] = {"id": item.id, "error": error}
    else:
        assert vector is not None
        record = {"id": item.id, "vector": float32_to_floats(vector)}
    return json.dumps(record, ensure_ascii=False)


class JsonlSink:
    """``{"id", "vector"}`` per text (``{"id", "error"}`` for a failed one); ``{"id", "request_id"}`` when
    only sending."""

    def __init__(self, stream: IO[str], *, owned: bool) -> None:
        self._stream = stream
        self._owned = owned

    def write(self, item: InputText, vector: Vector | None, failure: TextFailure | None) -> None:
        self._stream.write(vector_line(item, vector, failure) + "\n")

    def write_sent(self, item: InputText, request_id: str | None) -> None:
        self._stream.write(json.dumps({"id": item.id, "request_id": request_id}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._stream.flush()
        if self._owned:
            self._stream.close()


class NpySink:
    """All vectors as one float32 matrix, rows in input order; a failed text's row is NaN."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._rows: list[Vector | None] = []

    def write(self, item: InputText, vector: Vector | None, failure: TextFailure | None) -> None:
        self._rows.append(vector)

    def write_sent(self, item: InputText, request_id: str | None) -> None:
        raise ValueError("a .npy output needs the vectors: drop --no-wait or write JSONL")

    def close(self) -> None:
        dim = next((row.shape[0] for row in self._rows if row is not None), 0)
        matrix = np.full((len(self._rows), dim), np.nan, dtype=np.float32)
        for index, row in enumerate(self._rows):
            if row is not None:
                matrix[index] = row
        np.save(self._path, matrix)


def open_sink(output: str | None, stdout: IO[str]) -> Sink:
    if output is None or output == "-":
        return JsonlSink(stdout, owned=False)
    if output.endswith(".npy"):
        return NpySink(Path(output))
    return JsonlSink(open(output, "w", encoding="utf-8"), owned=True)  # closed by close()
