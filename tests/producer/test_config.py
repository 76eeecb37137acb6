"""ClientConfig from the environment, overrides, and the reply topic per mode (no services)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer import ClientConfig
from producer.config import ENVIRONMENT


def test_reads_the_environment_and_keywords_win() -> None:
    env = {
        "EMBEDFLEET_KAFKA_BOOTSTRAP": "k:9093",
        "EMBEDFLEET_REDIS_URL": "redis://r:1/2",
        "EMBEDFLEET_MODEL_NAME": "m",
        "EMBEDFLEET_MODEL_FINGERPRINT": "fp",
        "EMBEDFLEET_MODEL_DIM": "8",
        "EMBEDFLEET_REQUESTS_TOPIC": "req",
        "EMBEDFLEET_RESULTS_TOPIC": "embed.results.x",
        "EMBEDFLEET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "EMBEDFLEET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "EMBEDFLEET_KAFKA_SASL_USERNAME": "u",
        "EMBEDFLEET_KAFKA_SASL_PASSWORD": "kafka-secret",
        "EMBEDFLEET_KAFKA_SSL_CAFILE": "/ca.pem",
        "EMBEDFLEET_REDIS_USERNAME": "ru",
        "EMBEDFLEET_REDIS_PASSWORD": "redis-secret",
        "EMBEDFLEET_KAFKA_SSL_CERTFILE": "/client.pem",
        "EMBEDFLEET_KAFKA_SSL_KEYFILE": "/client.key",
        "EMBEDFLEET_REDIS_SSL_CAFILE": "/redis-ca.pem",
    }
    config = ClientConfig.from_env(env, requests_topic="override", model_dim=None)
    assert config.kafka_bootstrap == "k:9093" and config.redis_url == "redis://r:1/2"
    assert config.model_name == "m" and config.model_fingerprint == "fp" and config.model_dim == 8
    assert config.requests_topic == "override"  # keyword wins; None keywords are ignored
    assert config.kafka_sasl_mechanism == "SCRAM-SHA-512" and config.kafka_ssl_cafile == "/ca.pem"
    assert config.redis_username == "ru" and config.redis_password == "redis-secret"
    assert config.kafka_ssl_certfile == "/client.pem" and config.kafka_ssl_keyfile == "/client.key"
    assert config.redis_ssl_cafile == "/redis-ca.pem"
    assert "secret" not in repr(config)


def test_defaults() -> None:
    config = ClientConfig.from_env({})
    assert config.kafka_bootstrap == "127.0.0.1:9092" and config.model_name == "all-MiniLM-L6-v2"
    assert config.requests_topic == "embed.requests" and config.reply_mode == "private"
    assert config.model_fingerprint == "" and config.use_cache


def test_an_empty_redis_url_turns_the_cache_off() -> None:
    assert ClientConfig.from_env({"EMBEDFLEET_REDIS_URL": ""}).redis_url == ""


def test_reply_topic_per_mode_matches_the_workers_allow_list() -> None:
    import re

    private = ClientConfig(client_id="py-abc")
    assert private.reply_topic == "embed.results.py-abc"
    assert re.fullmatch(r"embed\.results.*", private.reply_topic)
    assert ClientConfig(reply_mode="shared").reply_topic == "embed.results"
    assert ClientConfig(reply_mode="none").reply_topic is None
    assert ClientConfig().client_id != ClientConfig().client_id


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="reply_mode"):
        ClientConfig(reply_mode="public")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown"):
        ClientConfig.from_env({}, bootstrap="x")


def test_the_shared_list_of_client_variables_is_the_python_clients() -> None:
    """schemas/testdata/client_environment.json is what the Go client's tests check their
    ConfigFromEnv against (producer/go/config_test.go): both clients read the same variables."""
    path = Path(__file__).resolve().parents[2] / "schemas" / "testdata" / "client_environment.json"
    assert json.loads(path.read_text())["variables"] == sorted(ENVIRONMENT.values())


def test_reads_the_fleets_default_model_as_the_go_client_does() -> None:
    """EMBEDFLEET_DEFAULT_MODEL moves the base topic to another model (producer/go/routing_test.go
    checks the same cases): the client's own model keeps its name, and its topic follows the rule."""
    mpnet = "all-mpnet-base-v2"
    own = ClientConfig.from_env({"EMBEDFLEET_DEFAULT_MODEL": mpnet, "EMBEDFLEET_MODEL_NAME": mpnet})
    assert own.default_model == mpnet and own.requests_topic == "embed.requests"
    assert own.requests_topic_of("all-MiniLM-L6-v2") == "embed.requests.all-MiniLM-L6-v2"
    minilm = ClientConfig.from_env({"EMBEDFLEET_DEFAULT_MODEL": mpnet})
    assert minilm.model_name == "all-MiniLM-L6-v2"
    assert minilm.requests_topic == "embed.requests.all-MiniLM-L6-v2"
    assert minilm.requests_topic_of(mpnet) == "embed.requests"
    unset = ClientConfig.from_env({"EMBEDFLEET_DEFAULT_MODEL": ""})
    assert unset.default_model == "all-MiniLM-L6-v2" and unset.requests_topic == "embed.requests"
