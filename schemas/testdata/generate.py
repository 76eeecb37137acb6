"""Generate the cross-language test vectors of the wire contract.

Run ``python -m schemas.testdata.generate`` to rewrite ``content_hash.json``, ``codec.json``,
``cache_layout.json`` and ``cache_entries.json`` next to this file. The committed files are the
contract: the tests check that the code still reproduces them byte for byte, so a change of the
code that alters a key or an encoding fails until it is made deliberately (and versioned).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from schemas import cache_layout
from schemas.codec import (
    ContentType,
    RequestError,
    RequestLimits,
    decode_request,
    encode_request,
    encode_result,
)
from schemas.content_hash import canonical_text, content_hash, content_hash_payload
from schemas.messages import EmbedRequest, EmbedResult, ErrorCode, encode_vector_b64

TESTDATA_DIR: Final = Path(__file__).parent
CONTENT_HASH_FILE: Final = TESTDATA_DIR / "content_hash.json"
CODEC_FILE: Final = TESTDATA_DIR / "codec.json"
CACHE_LAYOUT_FILE: Final = TESTDATA_DIR / "cache_layout.json"
CACHE_ENTRIES_FILE: Final = TESTDATA_DIR / "cache_entries.json"

FINGERPRINT: Final = "all-minilm-l6-v2:int8-per-channel:9f2c1a7e"

# (name, text, model_fingerprint, task, dimensions)
_HASH_CASES: Final[tuple[tuple[str, str, str, str | None, int | None], ...]] = (
    ("ascii", "hello world", FINGERPRINT, None, None),
    ("ascii_task_query", "hello world", FINGERPRINT, "query", None),
    ("ascii_task_empty_same_as_none", "hello world", FINGERPRINT, "", None),
    ("ascii_dimensions", "hello world", FINGERPRINT, None, 128),
    ("ascii_task_and_dimensions", "hello world", FINGERPRINT, "document", 256),
    ("dimensions_max", "hello world", FINGERPRINT, "query", 65536),
    ("other_fingerprint", "hello world", "nomic-embed-text-v1.5:fp16:0b1d", None, None),
    ("empty_fingerprint", "hello world", "", None, None),
    ("framing_ab_c", "x", "ab", "c", None),
    ("framing_a_bc", "x", "a", "bc", None),
    ("cjk", "東京は日本の首都です。", FINGERPRINT, None, None),
    ("hangul_precomposed", "곧 출시됩니다", FINGERPRINT, None, None),
    ("hangul_conjoining_jamo_nfc_composes", "\u1100\u1161\u11a8", FINGERPRINT, None, None),
    ("hangul_precomposed_gag", "\uac01", FINGERPRINT, None, None),
    ("emoji_skin_tone", "\U0001f44d\U0001f3fd great", FINGERPRINT, None, None),
    ("emoji_zwj_family", "\U0001f469\u200d\U0001f469\u200d\U0001f467", FINGERPRINT, None, None),
    ("e_combining_acute", "caf\u0065\u0301", FINGERPRINT, None, None),
    ("e_precomposed_acute", "caf\u00e9", FINGERPRINT, None, None),
    ("angstrom_sign_singleton", "\u212b", FINGERPRINT, None, None),
    ("a_ring_precomposed", "\u00c5", FINGERPRINT, None, None),
    ("combining_order_dot_below_first", "a\u0323\u0307", FINGERPRINT, None, None),
    ("combining_order_dot_above_first", "a\u0307\u0323", FINGERPRINT, None, None),
    ("fullwidth_not_nfkc", "\uff21\uff22\uff23", FINGERPRINT, None, None),
    ("nbsp_not_stripped", "\u00a0hello\u00a0", FINGERPRINT, None, None),
    ("whitespace_kept", "  hello world \t\n", FINGERPRINT, None, None),
    ("whitespace_only", " \t\n", FINGERPRINT, None, None),
    ("empty_text", "", FINGERPRINT, None, None),
    ("nul_byte", "a\u0000b", FINGERPRINT, None, None),
    ("devanagari", "नमस्ते दुनिया", FINGERPRINT, "query", None),
    ("arabic", "مرحبا بالعالم", FINGERPRINT, None, 64),
    ("long_text", "The quick brown fox jumps over the lazy dog. " * 40, FINGERPRINT, None, None),
)


# Requests with ``long`` set (issue 24): the spec is appended as one more field.
_LONG_CASES: Final = (
    (
        "pool_default_overlap",
        "The quick brown fox jumps over the lazy dog. " * 40,
        FINGERPRINT,
        None,
        None,
        "pool:32",
    ),
    ("chunks_overlap_0", "hello world", FINGERPRINT, "query", 128, "chunks:0"),
    ("pool_non_ascii", "caf\u0065\u0301 " * 3, FINGERPRINT, None, None, "pool:64"),
)


def content_hash_vectors() -> dict[str, Any]:
    long_vectors = []
    for name, text, fingerprint, task, dimensions, spec in _LONG_CASES:
        long_vectors.append(
            {
                "name": name,
                "text": text,
                "model_fingerprint": fingerprint,
                "task": task,
                "dimensions": dimensions,
                "long_spec": spec,
                "payload_hex": content_hash_payload(
                    text, model_fingerprint=fingerprint, task=task, dimensions=dimensions, long_spec=spec
                ).hex(),
                "key": content_hash(
                    text, model_fingerprint=fingerprint, task=task, dimensions=dimensions, long_spec=spec
                ),
            }
        )
    vectors = []
    for name, text, fingerprint, task, dimensions in _HASH_CASES:
        vectors.append(
            {
                "name": name,
                "text": text,
                "model_fingerprint": fingerprint,
                "task": task,
                "dimensions": dimensions,
                "nfc_text_utf8_hex": canonical_text(text).encode("utf-8").hex(),
                "payload_hex": content_hash_payload(
                    text, model_fingerprint=fingerprint, task=task, dimensions=dimensions
                ).hex(),
                "key": content_hash(text, model_fingerprint=fingerprint, task=task, dimensions=dimensions),
            }
        )
    return {
        "description": (
            "key = sha256 hex of 'embedfleet-content-v1' || field(model_fingerprint) || "
            "field(task or '') || field(decimal dimensions or '') || field(NFC(text)); "
            "field(s) = uint64 big-endian byte length of utf8(s) || utf8(s); long_vectors: a request "
            "with long pool or chunks appends field(long_spec), long_spec = '<mode>:<overlap>'"
        ),
        "vectors": vectors,
        "long_vectors": long_vectors,
    }


_REQUESTS: Final[tuple[tuple[str, EmbedRequest], ...]] = (
    ("minimal", EmbedRequest(id="req-1", text="hello world")),
    (
        "all_fields",
        EmbedRequest(
            id="req-2",
            text="東京は日本の首都です。",
            task="query",
            dimensions=128,
            encoding_format="base64",
            reply_to="embed.results.team-a",
            metadata={"tenant": "acme", "trace": "00-4bf92f35"},
        ),
    ),
    ("emoji_and_escapes", EmbedRequest(id="req-3", text='say "hi" \\ \U0001f44b\n\ttab')),
)

_FLOATS: Final = (0.1, -0.0, 1.0, -1.5, 3.4028234663852886e38, 1e-45, 0.333333343267)


def _floats_vector_cases() -> list[dict[str, Any]]:
    cases: list[tuple[str, list[float]]] = [
        ("specials", list(_FLOATS)),
        ("empty", []),
        ("unit_384", [1.0 / 384**0.5] * 384),
        ("ramp", [i / 7 - 1 for i in range(17)]),
    ]
    out = []
    for name, floats in cases:
        out.append(
            {
                "name": name,
                # The float32 values, widened exactly: what a JSON `vector` carries.
                "vector": EmbedResult.success(request_id="x", key="k", model="m", vector=floats).vector,
                "vector_b64": encode_vector_b64(floats),
            }
        )
    return out


def _results() -> list[tuple[str, EmbedResult]]:
    vector = [0.1, -0.25, 0.5, 1.0]
    key = content_hash("hello world", model_fingerprint=FINGERPRINT, task=None, dimensions=None)
    return [
        (
            "success_float",
            EmbedResult.success(request_id="req-1", key=key, model="all-MiniLM-L6-v2", vector=vector),
        ),
        (
            "success_base64_cached",
            EmbedResult.success(
                request_id="req-2",
                key=key,
                model="all-MiniLM-L6-v2",
                vector=vector,
                encoding_format="base64",
                cached=True,
                truncated=True,
                metadata={"tenant": "acme"},
            ),
        ),
        (
            "failure",
            EmbedResult.failure(
                request_id="req-3",
                code=ErrorCode.EMPTY_TEXT,
                message="text is only whitespace",
                metadata={"tenant": "acme"},
            ),
        ),
        (
            "failure_without_id",
            EmbedResult.failure(request_id=None, code=ErrorCode.INVALID_ENCODING, message="undecodable"),
        ),
    ]


# (name, content type header or None, raw value) -> the error code a worker must give.
_INVALID: Final[tuple[tuple[str, str | None, bytes], ...]] = (
    ("malformed_json", None, b'{"id": "r", "text": '),
    ("invalid_utf8", None, b'{"id": "r", "text": "\xff"}'),
    ("lone_surrogate", None, b'{"id": "r", "text": "\\ud800"}'),
    ("missing_text", None, b'{"id": "r"}'),
    ("text_wrong_type", None, b'{"id": "r", "text": 5}'),
    ("empty_id", None, b'{"id": "", "text": "x"}'),
    ("whitespace_text", None, b'{"id": "r", "text": " \\n\\t"}'),
    ("dimensions_zero", None, b'{"id": "r", "text": "x", "dimensions": 0}'),
    ("dimensions_float", None, b'{"id": "r", "text": "x", "dimensions": 1.5}'),
    ("encoding_format_unknown", None, b'{"id": "r", "text": "x", "encoding_format": "int8"}'),
    ("reply_to_bad_charset", None, b'{"id": "r", "text": "x", "reply_to": "a b"}'),
    ("content_type_unknown", "text/plain", b'{"id": "r", "text": "x"}'),
    ("msgpack_bytes_as_json", "application/json", b"\x82\xa2id\xa1r\xa4text\xa1x"),
)


def _hex_or_text(value: bytes, content_type: ContentType) -> dict[str, str]:
    if content_type is ContentType.JSON:
        return {"json": value.decode("utf-8")}
    return {"msgpack_hex": value.hex()}


def _fields(message: EmbedRequest | EmbedResult) -> dict[str, Any]:
    """Every field, defaults included (the wire form omits defaults)."""
    return {field: msgspec.to_builtins(getattr(message, field)) for field in message.__struct_fields__}


def codec_vectors() -> dict[str, Any]:
    requests = []
    for name, request in _REQUESTS:
        requests.append(
            {
                "name": name,
                # All fields after decoding, defaults included.
                "fields": _fields(request),
                **_hex_or_text(encode_request(request, ContentType.JSON), ContentType.JSON),
                **_hex_or_text(encode_request(request, ContentType.MSGPACK), ContentType.MSGPACK),
            }
        )
    results = []
    for name, result in _results():
        results.append(
            {
                "name": name,
                "fields": _fields(result),
                **_hex_or_text(encode_result(result, ContentType.JSON), ContentType.JSON),
                **_hex_or_text(encode_result(result, ContentType.MSGPACK), ContentType.MSGPACK),
            }
        )
    invalid = []
    for name, content_type, value in _INVALID:
        headers = [] if content_type is None else [("content-type", content_type.encode())]
        try:
            decode_request(value, headers)
        except RequestError as exc:
            code, request_id = exc.code, exc.request_id
        else:
            raise AssertionError(f"invalid case {name} decoded")
        invalid.append(
            {
                "name": name,
                "content_type": content_type,
                "value_hex": value.hex(),
                "code": code.value,
                "request_id": request_id,
            }
        )
    return {
        "description": (
            "Requests and results in JSON (text) and msgpack (hex) as this implementation "
            "writes them; `fields` are the decoded values with defaults. `vectors`: float32 "
            "values (widened exactly to float64) and their base64 little-endian float32 form. "
            "`invalid_requests`: raw values and the error code a worker gives."
        ),
        "requests": requests,
        "results": results,
        "vectors": _floats_vector_cases(),
        "invalid_requests": invalid,
    }


def cache_layout_vectors() -> dict[str, Any]:
    """Redis keys, the contract record and the request limits, as every worker and client use them."""
    hash_ = content_hash("hello", model_fingerprint="f" * 64, task=None, dimensions=None)
    keys = []
    for prefix, model, dim in (
        ("embedfleet", "all-MiniLM-L6-v2", 384),
        ("tenant-a", "org/model name:v2", 128),
        ("p", "nomic-embed-text-v1.5", 768),
    ):
        keys.append(
            {
                "prefix": prefix,
                "model": model,
                "dim": dim,
                "content_hash": hash_,
                "vector_key": cache_layout.vector_key(prefix, model, dim, hash_),
                "index_name": cache_layout.index_name(prefix, model, dim),
                "contract_key": cache_layout.contract_key(prefix, model),
            }
        )
    limits = RequestLimits()
    return {
        "description": "schemas/cache_layout.py: cache keys and the model contract record; "
        "schemas/codec.py RequestLimits: the workers' default limits",
        "keys": keys,
        "contract": {
            "fields": cache_layout.contract_fields(
                fingerprint="f" * 64,
                dim=384,
                max_tokens=256,
                tasks=["query", "document"],
                dimensions=[384, 128],
            )
        },
        "limits": {
            "max_message_bytes": limits.max_message_bytes,
            "max_text_bytes": limits.max_text_bytes,
            "max_header_bytes": limits.max_header_bytes,
            "max_headers": limits.max_headers,
        },
    }


def _f32(*floats: float) -> bytes:
    return struct.pack(f"<{len(floats)}f", *floats)


_NAN_PAYLOAD: Final = struct.pack("<I", 0x7FA00001)  # a signalling NaN: not the usual bit pattern
_GOOD4: Final = _f32(0.5, -0.25, 1.0, -0.0)
_MODEL: Final = "all-MiniLM-L6-v2"
_UNSAFE_MODEL: Final = "org/model name:v2"
_ABSENT: Final = b"<absent>"


def _entry(**fields: bytes) -> dict[str, bytes]:
    """A HASH's fields: a good 4-wide entry of _MODEL without tokens, changed by ``fields``
    (``_ABSENT`` drops one)."""
    base = {"vector": _GOOD4, "model": _MODEL.encode(), "dim": b"4"}
    return {k: v for k, v in {**base, **fields}.items() if v != _ABSENT}


# (name, asked model, asked dim, redis type, fields of a HASH: field -> raw bytes)
_ENTRY_CASES: Final[tuple[tuple[str, str, int, str, dict[str, bytes]], ...]] = (
    ("good", _MODEL, 4, "hash", _entry(tokens=b"7")),
    ("good_without_tokens", _MODEL, 4, "hash", _entry()),
    ("good_tokens_zero", _MODEL, 4, "hash", _entry(tokens=b"0")),
    ("good_tokens_leading_zeros", _MODEL, 4, "hash", _entry(tokens=b"007")),
    ("good_tokens_nine_digits", _MODEL, 4, "hash", _entry(tokens=b"999999999")),
    ("good_extremes", _MODEL, 4, "hash",
     _entry(vector=_f32(3.4028234663852886e38, -3.4028234663852886e38, 1e-45, -0.0))),
    ("good_384", _MODEL, 384, "hash",
     _entry(vector=_f32(*[(i % 7 - 3) / 8 for i in range(384)]), dim=b"384", tokens=b"12")),
    ("good_unsafe_model_name", _UNSAFE_MODEL, 4, "hash", _entry(model=_UNSAFE_MODEL.encode(), tokens=b"3")),
    ("good_extra_field", _MODEL, 4, "hash", _entry(tokens=b"7", note=b"ignored")),
    ("absent", _MODEL, 4, "none", {}),
    ("missing_vector", _MODEL, 4, "hash", _entry(vector=_ABSENT, tokens=b"7")),
    ("missing_model", _MODEL, 4, "hash", _entry(model=_ABSENT, tokens=b"7")),
    ("missing_dim", _MODEL, 4, "hash", _entry(dim=_ABSENT, tokens=b"7")),
    ("only_tokens", _MODEL, 4, "hash", {"tokens": b"7"}),
    ("other_model", _MODEL, 4, "hash", _entry(model=b"another-model")),
    ("model_case_differs", _MODEL, 4, "hash", _entry(model=_MODEL.lower().encode())),
    ("sanitised_model_name", _UNSAFE_MODEL, 4, "hash", _entry(model=b"org_model_name_v2")),
    ("model_empty", _MODEL, 4, "hash", _entry(model=b"")),
    ("model_not_utf8", _MODEL, 4, "hash", _entry(model=_MODEL.encode() + b"\xff")),
    ("model_trailing_space", _MODEL, 4, "hash", _entry(model=_MODEL.encode() + b" ")),
    ("dim_other_width", _MODEL, 4, "hash", _entry(dim=b"5")),
    ("dim_leading_zero", _MODEL, 4, "hash", _entry(dim=b"04")),
    ("dim_plus_sign", _MODEL, 4, "hash", _entry(dim=b"+4")),
    ("dim_space", _MODEL, 4, "hash", _entry(dim=b" 4")),
    ("dim_float", _MODEL, 4, "hash", _entry(dim=b"4.0")),
    ("dim_empty", _MODEL, 4, "hash", _entry(dim=b"")),
    ("vector_short", _MODEL, 4, "hash", _entry(vector=_GOOD4[:12])),
    ("vector_long", _MODEL, 4, "hash", _entry(vector=_GOOD4 + _f32(1.0))),
    ("vector_odd_length", _MODEL, 4, "hash", _entry(vector=_GOOD4[:15])),
    ("vector_empty", _MODEL, 4, "hash", _entry(vector=b"")),
    ("vector_and_dim_of_another_width", _MODEL, 4, "hash", _entry(vector=_f32(0.5, 0.5), dim=b"2")),
    ("vector_nan", _MODEL, 4, "hash", _entry(vector=_f32(0.5, float("nan"), 1.0, 0.0))),
    ("vector_signalling_nan", _MODEL, 4, "hash", _entry(vector=_GOOD4[:12] + _NAN_PAYLOAD)),
    ("vector_all_nan_384", _MODEL, 384, "hash",
     _entry(vector=_f32(*[float("nan")] * 384), dim=b"384", tokens=b"5")),
    ("vector_plus_inf", _MODEL, 4, "hash", _entry(vector=_f32(float("inf"), 0.0, 0.0, 0.0))),
    ("vector_minus_inf", _MODEL, 4, "hash", _entry(vector=_f32(0.0, 0.0, 0.0, float("-inf")))),
    ("tokens_empty", _MODEL, 4, "hash", _entry(tokens=b"")),
    ("tokens_negative", _MODEL, 4, "hash", _entry(tokens=b"-1")),
    ("tokens_plus_sign", _MODEL, 4, "hash", _entry(tokens=b"+1")),
    ("tokens_not_a_number", _MODEL, 4, "hash", _entry(tokens=b"seven")),
    ("tokens_ten_digits", _MODEL, 4, "hash", _entry(tokens=b"1234567890")),
    ("tokens_unicode_digit", _MODEL, 4, "hash", _entry(tokens="\u0663".encode())),
    ("wrong_type_string", _MODEL, 4, "string", {}),
    ("wrong_type_list", _MODEL, 4, "list", {}),
    ("wrong_type_set", _MODEL, 4, "set", {}),
)  # fmt: skip


def cache_entries_vectors() -> dict[str, Any]:
    """Cache entries and whether a reader may serve them (``cache_layout.servable_entry``)."""
    cases = []
    for name, model, dim, redis_type, fields in _ENTRY_CASES:
        entry = cache_layout.servable_entry(
            [fields.get(field) for field in cache_layout.ENTRY_FIELDS] if redis_type in {"hash", "none"}
            else [None] * len(cache_layout.ENTRY_FIELDS),
            model=model,
            dim=dim,
        )  # fmt: skip
        # The verdicts are written by hand, in the names: a change of the rule cannot rewrite them.
        if (entry is not None) != name.startswith("good"):
            raise AssertionError(f"cache entry case {name}: servable is {entry is not None}")
        cases.append(
            {
                "name": name,
                "model": model,
                "dim": dim,
                "redis_type": redis_type,
                "fields_hex": {field: value.hex() for field, value in fields.items()},
                "servable": entry is not None,
                "tokens": None if entry is None else entry.tokens,
                "vector": None if entry is None else [float(x) for x in entry.vector],
            }
        )
    return {
        "description": (
            "schemas/cache_layout.py servable_entry (Go: ServableEntry): whether a cache entry may "
            "be served to a reader asking for `model` and `dim`. `fields_hex`: the HASH's fields "
            "as hex bytes (a field not listed is absent); `redis_type` none: no key; string, list, "
            "set: a key of another type (a miss, never an error). `vector`: the float32 values "
            "served, widened exactly; `tokens`: the count served (null: unknown)."
        ),
        "fields": list(cache_layout.ENTRY_FIELDS),
        "cases": cases,
    }


def render(document: dict[str, Any]) -> str:
    # ASCII-only with \u escapes: an editor that normalises text on save cannot alter
    # the combining sequences the vectors are about.
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def main() -> int:
    CONTENT_HASH_FILE.write_text(render(content_hash_vectors()), encoding="utf-8")
    CODEC_FILE.write_text(render(codec_vectors()), encoding="utf-8")
    CACHE_LAYOUT_FILE.write_text(render(cache_layout_vectors()), encoding="utf-8")
    CACHE_ENTRIES_FILE.write_text(render(cache_entries_vectors()), encoding="utf-8")
    sys.stdout.write(
        f"wrote {CONTENT_HASH_FILE}, {CODEC_FILE}, {CACHE_LAYOUT_FILE} and {CACHE_ENTRIES_FILE}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
