"""The wire codec's share of a cache hit, before and after (issue 21, "cheaper per hit").

    .venv/bin/python bench/hit_codec.py [--repeat R] [--json FILE]

Microseconds of CPU per call, in one process, without a broker: each figure is the best of R
passes over many inputs (gc off), "before" and "after" timed side by side in the same run.

1. ``decode_request`` of corpus queries (``shared/corpus/queries.jsonl``) as a producer sends
   them (JSON; ``content-type`` and ``schema`` headers; id, text, task, metadata): the one-pass
   header scan against the four scans it replaced (kept verbatim as the reference in
   ``tests/schemas/test_header_scan.py``).
2. A 384-d success result, the vectors of ``shared/reference/all-MiniLM-L6-v2`` (normalised, as
   the worker serves them), in each encoding: ``EmbedResult.success`` + ``encode_result`` against
   ``encode_success_result`` (the same bytes, except JSON floats: the same float32 values, checked
   here).
3. JSON floats: the float64 text of each value (``0.019155024906992912``, msgspec on ``tolist()``,
   before) against the shortest float32 text (``0.019155025``, half the bytes), as orjson writes a
   float32 array (taken) and as a vectorised numpy search for the shortest decimals would (a search
   at the three decimal places that can hold it, each checked by the exact "parse as float64, cast
   to float32", then msgspec; slower than orjson). Round trips are checked here on every reference
   vector. numpy's own shortest repr (per element, Dragon4) is shown too.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np
import orjson
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas import (  # noqa: E402
    ContentType,
    EmbedRequest,
    EmbedResult,
    EncodingFormat,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
    encode_success_result,
    request_headers,
    result_headers,
)
from schemas.codec import DEFAULT_REQUEST_LIMITS  # noqa: E402
from schemas.messages import ENCODING_FORMATS  # noqa: E402
from tests.schemas.test_header_scan import reference_decode_request  # noqa: E402
from worker.commands.model import shared_dir  # noqa: E402
from worker.engine.quality import read_jsonl_strings  # noqa: E402

REQUESTS: Final = 256
MODEL: Final = "all-MiniLM-L6-v2"


def per_call_us(fn: Callable[[Any], object], inputs: Sequence[Any], repeat: int) -> float:
    """Best of ``repeat`` passes over ``inputs``: microseconds per call (loop included)."""
    best = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            started = time.perf_counter()
            for item in inputs:
                fn(item)
            best = min(best, time.perf_counter() - started)
    finally:
        if enabled:
            gc.enable()
    return best / len(inputs) * 1e6


# --- 3. the shortest float32 text, vectorised --------------------------------------------------


def _level_scales() -> NDArray[np.float64]:
    """Per float32 biased exponent: 10**k for the coarsest decimal place 10**-k that can hold a
    decimal inside the value's rounding interval (k = -(floor(log10(ulp)) + 1)); NaN where 10**k
    is not exact in float64 (|k| > 22: values below ~1e-16 or above ~1e7), left to the fallback."""
    scales = np.full(256, np.nan)
    for exponent in range(256):
        ulp = 2.0 ** (max(exponent, 1) - 150)
        k = -(int(np.floor(np.log10(ulp))) + 1)
        if 0 <= k <= 22:
            scales[exponent] = 10.0**k
    return scales


_SCALES: Final = _level_scales()


def shortest_float32_decimals(vector: NDArray[np.float32]) -> NDArray[np.float64]:
    """For each value, the float64 nearest its shortest float32 decimal (the value itself, widened,
    where the search does not apply). ``rint(x * 10**k) / 10**k`` is exactly what a parser makes
    of the decimal ``m e-k`` (m < 2**53, 10**k exact, one correctly rounded division), so each
    candidate is checked by the contract's own rule: parse as float64, cast to float32."""
    x = vector.astype(np.float64)
    scale = _SCALES[(vector.view(np.uint32) >> 23) & 0xFF]
    decimals = np.rint(x * scale) / scale
    ok = decimals.astype(np.float32) == vector
    for step in (10.0, 100.0):  # the next finer places: one of them always holds one
        if ok.all():
            break
        finer = scale * step
        candidate = np.rint(x * finer) / finer
        decimals = np.where(ok, decimals, candidate)
        ok = decimals.astype(np.float32) == vector
    return np.where(ok, decimals, x)


_JSON: Final = msgspec.json.Encoder()


def float32_shortest_json(vector: NDArray[np.float32]) -> bytes:
    return _JSON.encode(shortest_float32_decimals(vector).tolist())


# --- the run -----------------------------------------------------------------------------------

Encode = Callable[[NDArray[np.float32]], bytes]


def result_encoders(encoding_format: EncodingFormat, content_type: ContentType) -> tuple[Encode, Encode]:
    """A cached hit's result as the worker encoded it (old) and as it can now (new)."""
    common: dict[str, Any] = {
        "request_id": "3f1c9a52-7d4e-4b8a-9c1d-000000000001",
        "key": "9" * 64,
        "model": MODEL,
        "encoding_format": encoding_format,
        "cached": True,
        "truncated": False,
        "tokens": 14,
        "metadata": {"tenant": "acme"},
    }

    def old(vector: NDArray[np.float32]) -> bytes:
        return encode_result(EmbedResult.success(vector=vector, **common), content_type)

    def new(vector: NDArray[np.float32]) -> bytes:
        return encode_success_result(vector=vector, content_type=content_type, **common)

    return old, new


def typical_requests(shared: Path) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    queries = read_jsonl_strings(shared / "corpus" / "queries.jsonl")[:REQUESTS]
    headers = request_headers(ContentType.JSON)
    return [
        (
            encode_request(
                EmbedRequest(
                    id=f"3f1c9a52-7d4e-4b8a-9c1d-{index:012d}",
                    text=query,
                    task="query",
                    metadata={"tenant": "acme"},
                )
            ),
            headers,
        )
        for index, query in enumerate(queries)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=30, help="passes; the best is kept")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    repeat: int = args.repeat
    shared = shared_dir()
    figures: dict[str, Any] = {}

    # 1. request decode
    requests = typical_requests(shared)
    for value, headers in requests:
        assert decode_request(value, headers) == reference_decode_request(
            value, headers, DEFAULT_REQUEST_LIMITS
        )
    limits = DEFAULT_REQUEST_LIMITS
    before = per_call_us(lambda r: reference_decode_request(r[0], r[1], limits), requests, repeat)
    after = per_call_us(lambda r: decode_request(r[0], r[1], limits), requests, repeat)
    size = sum(len(value) for value, _ in requests) / len(requests)
    print(f"decode_request, {len(requests)} corpus queries ({size:.0f} B each on average), JSON:")
    print(f"  before (four header scans) {before:6.2f} us   after (one pass) {after:6.2f} us")
    figures["decode_request"] = {"before_us": before, "after_us": after, "value_bytes": size}

    # 2. result encode
    vectors = np.load(shared / "reference" / MODEL / "vectors.npy").astype(np.float32)
    dims = vectors.shape[1]
    rows = [vectors[i] for i in range(vectors.shape[0])]
    print(f"\na success result, {len(rows)} {MODEL} reference vectors of {dims} dims:")
    for content_type in ContentType:
        for encoding_format in ENCODING_FORMATS:
            old, new = result_encoders(encoding_format, content_type)
            if (encoding_format, content_type) == ("float", ContentType.JSON):  # same float32 values
                for v in rows:
                    mine = decode_result(new(v), result_headers(content_type)).vector_array()
                    theirs = decode_result(old(v), result_headers(content_type)).vector_array()
                    assert mine.view(np.uint32).tolist() == theirs.view(np.uint32).tolist()
            else:
                assert all(old(v) == new(v) for v in rows)
            before = per_call_us(old, rows, repeat)
            after = per_call_us(new, rows, repeat)
            size = sum(len(new(v)) for v in rows) / len(rows)
            label = f"{encoding_format} {content_type.value}"
            print(
                f"  {label:28s} EmbedResult.success+encode_result {before:6.2f} us"
                f"   encode_success_result {after:6.2f} us   {size:6.0f} B"
            )
            figures[f"result {label}"] = {"before_us": before, "after_us": after, "value_bytes": size}

    # 3. float JSON: float64 text (before), float32-shortest text by orjson (taken) and by numpy
    for vector in rows:
        value = _JSON.encode({"vector": msgspec.Raw(float32_shortest_json(vector))})
        decoded = decode_result(value, result_headers()).vector_array()
        assert decoded.view(np.uint32).tolist() == vector.view(np.uint32).tolist()
    taken = per_call_us(lambda v: _JSON.encode(v.tolist()), rows, repeat)
    by_orjson = per_call_us(lambda v: orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY), rows, repeat)
    orjson_size = sum(len(orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY)) for v in rows) / len(rows)
    search = per_call_us(shortest_float32_decimals, rows, repeat)
    shortest = per_call_us(float32_shortest_json, rows, repeat)
    per_element = per_call_us(lambda v: v.astype(str), rows[:20], max(3, repeat // 10))
    taken_size = sum(len(_JSON.encode(v.tolist())) for v in rows) / len(rows)
    shortest_size = sum(len(float32_shortest_json(v)) for v in rows) / len(rows)
    print(f"\nthe JSON float array of one {dims}-d vector:")
    rows_out = [
        ("float64 text: msgspec on tolist() (before)", taken, f"{taken_size:6.0f} B"),
        ("float32-shortest text: orjson (taken)", by_orjson, f"{orjson_size:6.0f} B"),
        ("float32-shortest text: numpy search + msgspec", shortest, f"{shortest_size:6.0f} B"),
        ("  of which the search for the shortest decimals", search, ""),
        ("float32-shortest text: numpy per element (astype)", per_element, ""),
    ]
    for label, us, size_text in rows_out:
        print(f"  {label:52s} {us:7.2f} us   {size_text}".rstrip())
    figures["float json"] = {
        "float64_text_us": taken,
        "float64_text_bytes": taken_size,
        "orjson_float32_us": by_orjson,
        "orjson_float32_bytes": orjson_size,
        "float32_shortest_us": shortest,
        "float32_shortest_search_us": search,
        "float32_shortest_bytes": shortest_size,
        "numpy_per_element_us": per_element,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
