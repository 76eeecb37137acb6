"""One way to connect to Kafka for the worker and the client (schemas/kafka_options.py): the same
EMBEDFLEET_KAFKA_* environment gives both the same aiokafka keywords (no services needed)."""

from __future__ import annotations

import ssl

import pytest

from producer import ClientConfig
from producer.kafka import connection_options
from worker.config import WorkerConfig
from worker.kafka_connection import kafka_connection_options

SASL = {
    "EMBEDFLEET_KAFKA_BOOTSTRAP": "k1:9094,k2:9094",
    "EMBEDFLEET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "EMBEDFLEET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "EMBEDFLEET_KAFKA_SASL_USERNAME": "fleet",
    "EMBEDFLEET_KAFKA_SASL_PASSWORD": "s3cret",
}


def test_worker_and_client_connect_the_same_way() -> None:
    worker = kafka_connection_options(WorkerConfig.from_env(SASL))
    client = connection_options(ClientConfig.from_env(SASL))
    assert isinstance(worker.pop("ssl_context"), ssl.SSLContext)
    assert isinstance(client.pop("ssl_context"), ssl.SSLContext)
    assert worker.pop("client_id").startswith("embedfleet-") and client.pop("client_id").startswith(
        "embedfleet-"
    )
    assert (
        worker
        == client
        == {
            "bootstrap_servers": "k1:9094,k2:9094",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "fleet",
            "sasl_plain_password": "s3cret",
        }
    )


def test_sasl_without_a_user_says_which_variables_to_set() -> None:
    env = {**SASL, "EMBEDFLEET_KAFKA_SASL_USERNAME": ""}
    with pytest.raises(ValueError, match="EMBEDFLEET_KAFKA_SASL_USERNAME"):
        connection_options(ClientConfig.from_env(env))


def test_plaintext_has_no_tls_and_no_sasl() -> None:
    options = kafka_connection_options(WorkerConfig.from_env({"EMBEDFLEET_KAFKA_BOOTSTRAP": "k:9092"}))
    assert "ssl_context" not in options and "sasl_mechanism" not in options
