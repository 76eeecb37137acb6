"""The committed contract files: codec vectors reproduce, JSON Schema is up to date, CLI."""

from __future__ import annotations

import argparse
import json

import msgspec
import pytest

from schemas import (
    ContentType,
    RequestError,
    decode_request,
    decode_result,
    decode_vector_b64,
    encode_request,
    encode_result,
    encode_vector_b64,
)
from schemas.json_schema import SCHEMA_FILE, contract_schema, render_schema
from schemas.testdata.generate import CACHE_LAYOUT_FILE, CODEC_FILE, cache_layout_vectors, codec_vectors
from worker.commands.schema import add_arguments, run

CODEC = json.loads(CODEC_FILE.read_text(encoding="utf-8"))
MSGPACK = [("content-type", b"application/msgpack")]


def test_committed_codec_file_is_what_the_generator_writes() -> None:
    assert codec_vectors() == CODEC


def test_committed_cache_layout_file_is_what_the_generator_writes() -> None:
    """The Go client's tests read the same file (producer/go/contract_test.go)."""
    assert cache_layout_vectors() == json.loads(CACHE_LAYOUT_FILE.read_text(encoding="utf-8"))


def test_worker_and_client_write_and_read_the_same_keys() -> None:
    from schemas.cache_layout import ModelContract
    from worker.cache import VectorCache
    from worker.metrics import WorkerMetrics

    for case in cache_layout_vectors()["keys"]:
        worker = VectorCache(
            None, key_prefix=case["prefix"], model_name=case["model"], ttl_s=0, metrics=WorkerMetrics()
        )
        assert worker.redis_key(case["content_hash"], case["dim"]) == case["vector_key"]
        assert worker.index_name(case["dim"]) == case["index_name"]
    served = ModelContract(
        name="m",
        fingerprint="f" * 64,
        dim=384,
        tasks=frozenset({"query", "document"}),
        dimensions=frozenset({384, 128}),
        max_tokens=256,
    )
    fields = served.redis_fields()
    assert fields == cache_layout_vectors()["contract"]["fields"]
    read = ModelContract.from_redis_fields(dict(fields.items()))
    assert read is not None and (read.fingerprint, read.dim, read.max_tokens) == ("f" * 64, 384, 256)


@pytest.mark.parametrize("case", CODEC["requests"], ids=lambda c: c["name"])
def test_request_vectors(case: dict[str, object]) -> None:
    from_json = decode_request(str(case["json"]).encode(), [])
    from_msgpack = decode_request(bytes.fromhex(str(case["msgpack_hex"])), MSGPACK)
    assert from_json == from_msgpack
    fields = {name: msgspec.to_builtins(getattr(from_json, name)) for name in from_json.__struct_fields__}
    assert fields == case["fields"]
    assert encode_request(from_json) == str(case["json"]).encode()
    assert encode_request(from_json, ContentType.MSGPACK).hex() == case["msgpack_hex"]


@pytest.mark.parametrize("case", CODEC["results"], ids=lambda c: c["name"])
def test_result_vectors(case: dict[str, object]) -> None:
    result = decode_result(str(case["json"]).encode())
    assert decode_result(bytes.fromhex(str(case["msgpack_hex"])), MSGPACK) == result
    fields = {name: msgspec.to_builtins(getattr(result, name)) for name in result.__struct_fields__}
    assert fields == case["fields"]
    assert encode_result(result) == str(case["json"]).encode()
    assert encode_result(result, ContentType.MSGPACK).hex() == case["msgpack_hex"]


@pytest.mark.parametrize("case", CODEC["vectors"], ids=lambda c: c["name"])
def test_base64_vectors(case: dict[str, object]) -> None:
    floats = list(case["vector"])  # type: ignore[call-overload]
    assert encode_vector_b64(floats) == case["vector_b64"]
    assert decode_vector_b64(str(case["vector_b64"])).tolist() == floats


@pytest.mark.parametrize("case", CODEC["invalid_requests"], ids=lambda c: c["name"])
def test_invalid_request_vectors(case: dict[str, object]) -> None:
    headers = [] if case["content_type"] is None else [("content-type", str(case["content_type"]).encode())]
    with pytest.raises(RequestError) as caught:
        decode_request(bytes.fromhex(str(case["value_hex"])), headers)
    assert caught.value.code == case["code"]
    assert caught.value.request_id == case["request_id"]


def test_schema_file_is_up_to_date() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == render_schema("all"), (
        "regenerate: embedfleet schema > schemas/embedfleet.schema.json"
    )


def test_schema_kinds() -> None:
    request = contract_schema("request")
    assert request["$ref"] == "#/$defs/EmbedRequest" and set(request["$defs"]) == {"EmbedRequest"}
    assert request["$defs"]["EmbedRequest"]["required"] == ["id", "text"]
    result = contract_schema("result")
    assert set(result["$defs"]) == {"EmbedResult", "ErrorInfo", "Chunk"}
    assert contract_schema("all")["$id"] == "urn:embedfleet:schema:1:all"


def test_schema_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--kind", "request"])) == 0
    assert json.loads(capsys.readouterr().out) == contract_schema("request")
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "nope"])


def test_schema_command_through_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.commands import main

    assert main(["schema"]) == 0
    assert capsys.readouterr().out == render_schema("all")
