"""Where the fleet keeps things in Redis: the one definition every worker and client follows.

* a vector: HASH ``{prefix}:{model}:{dim}:{content hash}`` with ``vector`` (little-endian float32
  bytes), ``model`` and ``dim`` (a reader serves it only when all three match what it asked for),
  and ``tokens`` (how many tokens the model read, for usage counts; absent in entries written
  before it existed);
* the served model's contract: HASH ``{prefix}:models:{model}`` with ``fingerprint``, ``dim``,
  ``max_tokens``, ``tasks`` and ``dimensions`` (JSON arrays), which clients read to compute content
  hashes;
* a RediSearch HNSW index per model and width: ``{prefix}-{model}-{dim}``.

``{model}`` in vector keys and index names is the model name with every character outside
``[A-Za-z0-9_.-]`` replaced by ``_``. ``schemas/testdata/cache_layout.json`` holds examples that the
Go client's tests check too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final

VECTOR_FIELD: Final = "vector"
MODEL_FIELD: Final = "model"
DIM_FIELD: Final = "dim"
TOKENS_FIELD: Final = "tokens"
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
