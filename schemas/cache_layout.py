"""Where the fleet keeps things in Redis: the one definition every worker and client follows.

* a vector: HASH ``{prefix}:{model}:{dim}:{content hash}`` with ``vector`` (little-endian float32
  bytes), ``model`` and ``dim``, and ``tokens`` (how many tokens the model read, for usage counts;
  absent in entries written before it existed). Whether an entry may be served is decided by
  ``servable_entry`` alone (and its Go twin, ``ServableEntry`` in producer/go/cache.go), which the
  worker, the Python client, the gateway and the Go client all call: anything it refuses is a miss,
  and the worker's next computation of that text overwrites the entry;
* the served model's contract: HASH ``{prefix}:models:{model}`` with ``fingerprint``, ``dim``,
  ``max_tokens``, ``tasks`` and ``dimensions`` (JSON arrays), which clients read to compute content
  hashes;
* a RediSearch HNSW index per model and width: ``{prefix}-{model}-{dim}``.

``{model}`` in vector keys and index names is the model name with every character outside
``[A-Za-z0-9_.-]`` replaced by ``_``. ``schemas/testdata/cache_layout.json`` holds examples that the
Go client's tests check too, and ``schemas/testdata/cache_entries.json`` the entries that may and
may not be served.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, cast

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

VECTOR_FIELD: Final = "vector"
MODEL_FIELD: Final = "model"
DIM_FIELD: Final = "dim"
TOKENS_FIELD: Final = "tokens"
# What a reader fetches of an entry (one HMGET), in this order: servable_entry's input.
ENTRY_FIELDS: Final = (VECTOR_FIELD, MODEL_FIELD, DIM_FIELD, TOKENS_FIELD)
# A token count is 1 to 9 ASCII digits: the same numbers parse in every reader (Go's Atoi takes a
# sign and overflows where Python's int does not).
_TOKENS: Final = re.compile(rb"[0-9]{1,9}")
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.-]")


# Redis Cluster: a URL whose scheme ends in "+cluster" names one node of the cluster to start from.
CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_node_url(url: str) -> str | None:
    """``redis+cluster://host:port/0`` -> ``redis://host:port/0`` (a node to discover the cluster
    from; of several, ``redis+cluster://h1:p1,h2:p2/0``, the first); None for a plain Redis URL."""
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower())
    if not (plain and sep):
        return None
    netloc, slash, path = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    return f"{plain}{sep}{credentials}{at}{hosts.split(',')[0]}{slash}{path}"


def cluster_startup_nodes(url: str) -> list[tuple[str, int]]:
    """Every node a ``redis+cluster://h1:p1,h2:p2/0`` URL names (any one that answers will do)."""
    netloc = url.partition("://")[2].partition("/")[0].rpartition("@")[2]
    nodes = []
    for address in netloc.split(","):
        host, _, port = address.rpartition(":")
        nodes.append((host or address, int(port) if port.isdigit() else 6379))
    return nodes


def safe_model_name(name: str) -> str:
    return _UNSAFE.sub("_", name)


def vector_key(prefix: str, model_name: str, dim: int, content_hash: str) -> str:
    return f"{prefix}:{safe_model_name(model_name)}:{dim}:{content_hash}"


def vector_key_prefix(prefix: str, model_name: str, dim: int) -> str:
    """What every vector key of one model and width starts with (the index's PREFIX)."""
    return f"{prefix}:{safe_model_name(model_name)}:{dim}:"


def index_name(prefix: str, model_name: str, dim: int) -> str:
    return f"{prefix}-{safe_model_name(model_name)}-{dim}"


def contract_key(prefix: str, model_name: str) -> str:
    return f"{prefix}:models:{model_name}"


def contract_fields(
    *, fingerprint: str, dim: int, max_tokens: int, tasks: Iterable[str], dimensions: Iterable[int]
) -> dict[str, str]:
    """The contract HASH's fields, as the workers write them."""
    return {
        "fingerprint": fingerprint,
        "dim": str(dim),
        "max_tokens": str(max_tokens),
        "tasks": json.dumps(sorted(tasks)),
        "dimensions": json.dumps(sorted(dimensions)),
    }


@dataclass(frozen=True, slots=True)
class ModelContract:
    """What the served model is, as its workers publish it (``contract_key``) and clients read it:
    enough to compute content hashes and cache keys, and what requests may ask of it. The one
    definition for workers, clients and the gateway."""

    fingerprint: str
    dim: int | None
    tasks: frozenset[str] = frozenset()
    dimensions: frozenset[int] = frozenset()  # offered output widths (the full one included)
    max_tokens: int | None = None
    name: str = ""

    def redis_fields(self) -> dict[str, str]:
        """The contract HASH's fields, as the workers write them."""
        if self.dim is None or self.max_tokens is None:
            raise ValueError("a published contract needs the model's width and max tokens")
        return contract_fields(
            fingerprint=self.fingerprint,
            dim=self.dim,
            max_tokens=self.max_tokens,
            tasks=self.tasks,
            dimensions=self.dimensions,
        )

    @classmethod
    def from_redis_fields(cls, fields: Mapping[bytes | str, bytes | str]) -> ModelContract | None:
        """Parses the HASH; None when it is absent, has no fingerprint or is malformed."""
        text = {_text(k): _text(v) for k, v in fields.items()}
        if not text.get("fingerprint"):
            return None
        try:
            return cls(
                fingerprint=text["fingerprint"],
                dim=int(text["dim"]) if text.get("dim") else None,
                tasks=frozenset(json.loads(text.get("tasks") or "[]")),
                dimensions=frozenset(int(d) for d in json.loads(text.get("dimensions") or "[]")),
                max_tokens=int(text["max_tokens"]) if text.get("max_tokens") else None,
            )
        except (ValueError, TypeError) as exc:
            log.warning("ignoring a malformed model contract in Redis: %s", exc)
            return None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A cache entry that may be served."""

    vector: NDArray[np.float32]
    tokens: int | None  # None in entries written before workers stored it


def _raw(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def servable_entry(values: Sequence[bytes | str | None], *, model: str, dim: int) -> CacheEntry | None:
    """The one rule for serving a cache entry: ``values`` are its ``ENTRY_FIELDS`` (None where a
    field is absent, all None for a missing key or a key of another Redis type). Served only when
    ``model`` is exactly the model asked for (the key holds a sanitised name that two models can
    share; the serving fingerprint is in the content hash, so the name is what an entry can
    check), ``dim`` is the width asked for in plain decimal, ``vector`` is exactly ``4 * dim``
    bytes of finite float32 numbers, and ``tokens``, when present, is a plain decimal count.
    Anything else is a miss."""
    return servable_entries([values], model=model, dims=[dim])[0]


def servable_entries(
    rows: Sequence[Sequence[bytes | str | None]], *, model: str, dims: Sequence[int]
) -> list[CacheEntry | None]:
    """``servable_entry`` for many entries at once (``rows[i]`` asked at width ``dims[i]``): the
    same rule, with the vectors of one width checked in one vectorised pass (a worker serves
    thousands of cache hits a second)."""
    if len(rows) != len(dims):
        raise ValueError(f"{len(rows)} entries but {len(dims)} widths")
    wanted_model = model.encode()
    found: list[CacheEntry | None] = [None] * len(rows)
    by_width: dict[int, list[tuple[int, bytes, int | None]]] = {}
    dim_texts: dict[int, bytes] = {}
    for index, (values, dim) in enumerate(zip(rows, dims, strict=True)):
        if len(values) != len(ENTRY_FIELDS):
            raise ValueError(f"expected the {len(ENTRY_FIELDS)} fields {ENTRY_FIELDS}, got {len(values)}")
        vector, entry_model, entry_dim, tokens = values
        if isinstance(vector, str) or isinstance(entry_model, str) or isinstance(entry_dim, str):
            vector, entry_model, entry_dim = _raw(vector), _raw(entry_model), _raw(entry_dim)
        tokens = _raw(tokens)
        dim_text = dim_texts.get(dim)
        if dim_text is None:
            dim_text = dim_texts[dim] = str(dim).encode()
        if (
            dim <= 0
            or vector is None
            or len(vector) != 4 * dim
            or entry_model != wanted_model
            or entry_dim != dim_text
        ):
            continue
        if tokens is not None and _TOKENS.fullmatch(tokens) is None:
            continue
        by_width.setdefault(dim, []).append((index, vector, None if tokens is None else int(tokens)))
    for dim, group in by_width.items():
        # Native, writable copies: the reply's bytes are not kept alive by the vectors.
        floats = np.frombuffer(b"".join(v for _, v, _ in group), dtype="<f4").astype(np.float32)
        vectors = floats.reshape(len(group), dim)
        all_finite = cast(list[bool], np.isfinite(vectors).all(axis=1).tolist())
        for (index, _, count), row, ok in zip(group, vectors, all_finite, strict=True):
            if ok:
                found[index] = CacheEntry(row, count)
    return found
