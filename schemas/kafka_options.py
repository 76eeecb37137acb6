"""Kafka connection keywords for aiokafka (bootstrap, TLS, SASL), shared by the worker and the
clients: both sides must connect the same way, and neither may import the other (the packages'
arrows point down: cli -> worker/producer -> schemas)."""

from __future__ import annotations

import ssl
from typing import Any, Protocol


class KafkaSettings(Protocol):
    """The Kafka connection settings; the worker's and the client's configurations both have them,
    under the same names and EMBEDFLEET_KAFKA_* variables."""

    @property
    def kafka_bootstrap(self) -> str: ...
    @property
    def kafka_security_protocol(self) -> str: ...
    @property
    def kafka_sasl_mechanism(self) -> str: ...
    @property
    def kafka_sasl_username(self) -> str: ...
    @property
    def kafka_sasl_password(self) -> str: ...
    @property
    def kafka_ssl_cafile(self) -> str: ...
    @property
    def kafka_ssl_certfile(self) -> str: ...
    @property
    def kafka_ssl_keyfile(self) -> str: ...


def kafka_client_options(settings: KafkaSettings, *, client_id: str) -> dict[str, Any]:
    """aiokafka connection keywords (bootstrap, TLS, SASL); shared by the worker and the client."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": client_id,
        "security_protocol": protocol,
    }
    if protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context  # aiokafka only where a connection is made

        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.kafka_ssl_cafile or None,
            certfile=settings.kafka_ssl_certfile or None,
            keyfile=settings.kafka_ssl_keyfile or None,
        )
        options["ssl_context"] = context
    if protocol.startswith("SASL"):
        if not settings.kafka_sasl_username:
            raise ValueError("SASL needs EMBEDFLEET_KAFKA_SASL_USERNAME and EMBEDFLEET_KAFKA_SASL_PASSWORD")
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password,
        )
    return options
