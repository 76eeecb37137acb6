"""Kafka connection keywords for aiokafka (bootstrap, TLS, SASL), shared by the worker and the
clients: both sides must connect the same way, and neither may import the other (the packages'
arrows point down: cli -> worker/producer -> schemas)."""

from __future__ import annotations

import ssl
from typing import Any


def kafka_client_options(
    *,
    bootstrap: str,
    client_id: str,
    security_protocol: str,
    sasl_mechanism: str = "PLAIN",
    sasl_username: str = "",
    sasl_password: str = "",
    ssl_cafile: str = "",
    ssl_certfile: str = "",
    ssl_keyfile: str = "",
) -> dict[str, Any]:
    """aiokafka connection keywords (bootstrap, TLS, SASL); shared by the worker and the client."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": client_id,
        "security_protocol": security_protocol,
    }
    if security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context  # aiokafka only where a connection is made

        context: ssl.SSLContext = create_ssl_context(
            cafile=ssl_cafile or None, certfile=ssl_certfile or None, keyfile=ssl_keyfile or None
        )
        options["ssl_context"] = context
    if security_protocol.startswith("SASL"):
        if not sasl_username:
            raise ValueError("SASL needs EMBEDFLEET_KAFKA_SASL_USERNAME and EMBEDFLEET_KAFKA_SASL_PASSWORD")
        options.update(
            sasl_mechanism=sasl_mechanism,
            sasl_plain_username=sasl_username,
            sasl_plain_password=sasl_password,
        )
    return options
