"""The gateway's pure parts: its configuration, request parsing, the reaper's topic names."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from producer.cache import ModelContract
from producer.gateway.config import GatewayConfig
from producer.gateway.openai_api import (
    ApiError,
    decode_embeddings_request,
    embedding_payload,
    input_texts,
)
from producer.gateway.reaper import gateway_client_id, parse_gateway_topic
from producer.gateway.service import EmbeddingService

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_gateway_setting_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    for field in dataclasses.fields(GatewayConfig):
        assert f"`{field.metadata['env']}`" in readme, field.metadata["env"]


def test_config_from_environment_and_flags_keys_never_shown() -> None:
    parser = argparse.ArgumentParser()
    GatewayConfig.add_cli_arguments(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert "--api-keys" not in flags  # secrets come from the environment only
    env = {"EMBEDFLEET_GATEWAY_PORT": "9000", "EMBEDFLEET_GATEWAY_API_KEYS": "sk-a, sk-b ,"}
    config = GatewayConfig.from_args(parser.parse_args(["--port", "9001"]), env)
    assert config.port == 9001 and config.keys == ("sk-a", "sk-b")
    assert "sk-a" not in json.dumps(config.describe())
    with pytest.raises(ValueError, match="EMBEDFLEET_GATEWAY_PORT"):
        GatewayConfig.from_env({"EMBEDFLEET_GATEWAY_PORT": "0"})
    assert GatewayConfig().origins == () and GatewayConfig().host == "127.0.0.1"


def test_input_forms() -> None:
    assert input_texts("one", 2048) == ["one"]
    assert input_texts(["a", "b"], 2048) == ["a", "b"]
    for bad, code in (
        ([], None),
        ([[1, 2]], "unsupported_input"),
        ([1, 2], "unsupported_input"),
        (["a", 3], None),
    ):
        with pytest.raises(ApiError) as raised:
            input_texts(bad, 2048)
        assert raised.value.status == 400 and (code is None or raised.value.code == code)
    with pytest.raises(ApiError, match="at most 2"):
        input_texts(["a", "b", "c"], 2)


def test_request_decoding_errors_name_the_field() -> None:
    request = decode_embeddings_request(b'{"model": "m", "input": "x", "user": "u", "extra": 1}')
    assert request.encoding_format == "float" and request.dimensions is None
    with pytest.raises(ApiError) as raised:
        decode_embeddings_request(b'{"model": "m", "input": "x", "dimensions": "wide"}')
    assert raised.value.param == "dimensions"
    with pytest.raises(ApiError) as raised:
        decode_embeddings_request(b"{nope")
    assert raised.value.code == "invalid_json"
    body = json.loads(raised.value.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_base64_is_little_endian_float32_as_openai_sends_it() -> None:
    vector = np.asarray([0.1, -0.25, 0.5, 1.0], dtype=np.float32)
    encoded = embedding_payload(vector, "base64")
    assert isinstance(encoded, str)
    assert np.array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), vector)
    assert embedding_payload(vector, "float") == [float(v) for v in vector]


def test_dimensions_only_the_declared_widths() -> None:
    contract = ModelContract(fingerprint="f", dim=384, dimensions=frozenset({128, 256}))
    assert EmbeddingService.width(contract, None) is None
    assert EmbeddingService.width(contract, 384) is None  # the model's own: the plain cache key
    assert EmbeddingService.width(contract, 128) == 128
    with pytest.raises(ApiError) as raised:
        EmbeddingService.width(contract, 100)
    assert raised.value.status == 400 and "[128, 256, 384]" in raised.value.message


def test_reaper_topic_names_carry_start_and_lease() -> None:
    client_id = gateway_client_id(2.5, now=1_700_000_000)
    prefix = "embed.results.gw-"
    topic = f"embed.results.{client_id}"
    assert parse_gateway_topic(topic, prefix) == (1_700_000_000.0, 3.0)
    assert parse_gateway_topic("embed.results.py-abc", prefix) is None
    assert parse_gateway_topic("embed.results.gw-12-x", prefix) is None
    assert parse_gateway_topic("embed.results", prefix) is None
