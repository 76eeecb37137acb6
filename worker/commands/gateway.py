"""`embedfleet gateway`: the HTTP gateway (OpenAI's /v1/embeddings and the seed's /embed) in front
of the fleet, with the settings of producer.gateway.config (EMBEDFLEET_GATEWAY_*) plus the
client's Kafka, Redis and model settings, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from producer.config import ClientConfig
from producer.gateway import GatewayConfig, serve
from producer.gateway.reaper import gateway_client_id
from schemas.settings import mask_url_password
from worker.logs import setup_logging

log = logging.getLogger("embedfleet.gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    GatewayConfig.add_cli_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the settings and exit")


def run(args: argparse.Namespace) -> int:
    try:
        config = GatewayConfig.from_args(args)
        # One private reply topic per gateway process; linger 1 ms: a request's misses go at once.
        client = ClientConfig.from_env(
            reply_mode="private", client_id=gateway_client_id(config.lease_s), linger_ms=1
        )
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        shown = config.describe() | {f"client.{k}": v for k, v in _client_settings(client).items()}
        print(json.dumps(shown, indent=2))
        return 0
    problem = config.exposure_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level, worker_id=client.client_id)
    if not config.keys and not config.loopback_only:
        log.warning(
            "the gateway serves %s without API keys (EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS=true): anyone "
            "who can reach it may embed, and read what the cache holds",
            config.host,
        )
    serve(config, client)
    return 0


def _client_settings(client: ClientConfig) -> dict[str, str]:
    shown = {}
    for f in dataclasses.fields(client):
        value = getattr(client, f.name)
        secret = "password" in f.name and value
        shown[f.name] = "***" if secret else mask_url_password(str(value))
    return shown
