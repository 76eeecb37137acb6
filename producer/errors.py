"""What ``Client.embed`` raises: per-text failures and timeouts, with the good vectors kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class TextFailure:
    """Why the text at ``index`` of the call got no vector (``code`` is an ``ErrorCode`` value)."""

    index: int
    code: str
    message: str


class EmbeddingError(Exception):
    """The producer package's exception root: every error the client raises derives from it."""


class EmbedBatchError(EmbeddingError):
    """Some texts failed. ``vectors[i]`` is the vector of text i, or None where it failed."""

    def __init__(self, failures: Sequence[TextFailure], vectors: Sequence[Vector | None]) -> None:
        self.failures = list(failures)
        self.vectors = list(vectors)
        first = self.failures[0]
        more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        super().__init__(
            f"{len(self.failures)} of {len(self.vectors)} texts failed; "
            f"text {first.index}: {first.code}: {first.message}{more}"
        )


class EmbedTimeout(EmbeddingError):
    """Results were still missing at the deadline. ``vectors`` holds what did arrive."""

    def __init__(
        self,
        missing: int,
        total: int,
        timeout: float,
        vectors: Sequence[Vector | None],
        failures: Sequence[TextFailure] = (),
    ) -> None:
        self.missing = missing
        self.total = total
        self.timeout = timeout
        self.vectors = list(vectors)
        self.failures = list(failures)
        super().__init__(
            f"{missing} of {total} texts got no result within {timeout:g}s: is `embedfleet worker` "
            "running and consuming the requests topic (and can it keep up)?"
        )
