"""Kafka connection options (bootstrap, TLS, SASL) from the worker's configuration, for aiokafka,
and a diagnosis of a failed connection that says what to fix."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka import errors as kafka_errors
from aiokafka.conn import create_conn

from schemas.kafka_options import kafka_client_options
from worker.config import WorkerConfig

DIAGNOSE_TIMEOUT_S = 5.0


def kafka_connection_options(config: WorkerConfig) -> dict[str, Any]:
    return kafka_client_options(config, client_id=f"embedfleet-{config.worker_id}")


async def explain_kafka_error(config: WorkerConfig, exc: BaseException) -> str:
    """One line for a Kafka failure, saying what to check next (never the password).

    aiokafka reports a failed bootstrap as ``KafkaConnectionError: Unable to bootstrap`` whatever
    the cause; this connects once more, directly, to tell a refused login from a broker that
    cannot be reached or a TLS problem.
    """
    what = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, kafka_errors.KafkaConnectionError):
        return f"kafka error ({what}); check EMBEDFLEET_KAFKA_BOOTSTRAP and the broker"
    try:
        options = kafka_connection_options(config)
    except ValueError as bad:
        return f"kafka configuration: {bad}"
    login = {
        k: options[k]
        for k in (
            "security_protocol",
            "ssl_context",
            "sasl_mechanism",
            "sasl_plain_username",
            "sasl_plain_password",
        )
        if k in options
    }
    causes: list[str] = []
    for address in config.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host or "127.0.0.1",
                    int(port),
                    client_id=options["client_id"],
                    request_timeout_ms=int(DIAGNOSE_TIMEOUT_S * 1000),
                    **login,
                ),
                DIAGNOSE_TIMEOUT_S,
            )
        except kafka_errors.SaslAuthenticationFailed:
            return (
                f"kafka authentication failed at {address.strip()} for SASL user "
                f"{config.kafka_sasl_username!r} (mechanism {config.kafka_sasl_mechanism}): check "
                "EMBEDFLEET_KAFKA_SASL_USERNAME, EMBEDFLEET_KAFKA_SASL_PASSWORD and "
                "EMBEDFLEET_KAFKA_SASL_MECHANISM"
            )
        except kafka_errors.UnsupportedSaslMechanismError as refused:
            return (
                f"kafka at {address.strip()} does not offer SASL mechanism "
                f"{config.kafka_sasl_mechanism} ({refused}): set EMBEDFLEET_KAFKA_SASL_MECHANISM "
                "to one the listener enables"
            )
        except ssl.SSLError as tls:
            return (
                f"TLS with kafka at {address.strip()} failed ({tls}): check "
                "EMBEDFLEET_KAFKA_SSL_CAFILE / _CERTFILE / _KEYFILE and the security protocol"
            )
        except (OSError, ValueError, TimeoutError, kafka_errors.KafkaError) as other:
            causes.append(f"{address.strip()}: {type(other).__name__} {other}".strip())
            continue
        conn.close()
        return (
            f"kafka error ({what}) although {address.strip()} accepts this login; check "
            "EMBEDFLEET_KAFKA_BOOTSTRAP and the broker's advertised listeners"
        )
    return (
        f"cannot reach kafka at {config.kafka_bootstrap} ({'; '.join(causes) or what}): check "
        "EMBEDFLEET_KAFKA_BOOTSTRAP, EMBEDFLEET_KAFKA_SECURITY_PROTOCOL (the listener's protocol) "
        "and that the broker runs"
    )
