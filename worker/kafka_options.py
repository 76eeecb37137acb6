"""Kafka connection options (bootstrap, TLS, SASL) from the worker's configuration, for aiokafka."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context

from worker.config import WorkerConfig


def kafka_connection_options(config: WorkerConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": config.kafka_bootstrap,
        "client_id": f"embedfleet-{config.worker_id}",
        "security_protocol": config.kafka_security_protocol,
    }
    if config.kafka_security_protocol in ("SSL", "SASL_SSL"):
        context: ssl.SSLContext = create_ssl_context(
            cafile=config.kafka_ssl_cafile or None,
            certfile=config.kafka_ssl_certfile or None,
            keyfile=config.kafka_ssl_keyfile or None,
        )
        options["ssl_context"] = context
    if config.kafka_security_protocol.startswith("SASL"):
        if not config.kafka_sasl_username:
            raise ValueError("SASL needs EMBEDFLEET_KAFKA_SASL_USERNAME and EMBEDFLEET_KAFKA_SASL_PASSWORD")
        options.update(
            sasl_mechanism=config.kafka_sasl_mechanism,
            sasl_plain_username=config.kafka_sasl_username,
            sasl_plain_password=config.kafka_sasl_password,
        )
    return options
