"""The gateway's configuration object: ``EMBEDFLEET_GATEWAY_*`` settings, overridden by the flags of
``embedfleet gateway``. Kafka, Redis and model settings are the client's (``producer.config``)."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas import settings
from schemas.settings import setting


@dataclass(frozen=True)
class GatewayConfig:
    """Every setting of the HTTP gateway: one field each, with its environment variable and help."""

    host: str = setting("EMBEDFLEET_GATEWAY_HOST", "bind address of the HTTP server", default="127.0.0.1")
    port: int = setting("EMBEDFLEET_GATEWAY_PORT", "port of the HTTP server", default=8080)
    api_keys: str = setting(
        "EMBEDFLEET_GATEWAY_API_KEYS",
        "comma-separated bearer API keys; empty = no auth, allowed on a loopback address only "
        "unless EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS=true (environment only)",
        default="",
        secret=True,
    )
    allow_anonymous: bool = setting(
        "EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS",
        "serve without API keys on an address other than loopback (logged as a warning at start)",
        default=False,
    )
    max_concurrent: int = setting(
        "EMBEDFLEET_GATEWAY_MAX_CONCURRENT",
        "embedding requests handled at once per gateway process; past it a 503 with Retry-After",
        default=256,
    )
    deadline_s: float = setting(
        "EMBEDFLEET_GATEWAY_DEADLINE_S",
        "how long a request waits for the fleet's results before a 504",
        default=30.0,
    )
    read_timeout_s: float = setting(
        "EMBEDFLEET_GATEWAY_READ_TIMEOUT_S",
        "how long a client may take to send a request's headers, and then its body; past it the "
        "connection is closed (a 408 when something had arrived)",
        default=10.0,
    )
    max_inputs: int = setting(
        "EMBEDFLEET_GATEWAY_MAX_INPUTS", "texts per request (OpenAI allows 2048)", default=2048
    )
    max_body_bytes: int = setting(
        "EMBEDFLEET_GATEWAY_MAX_BODY_BYTES", "largest request body; past it a 413", default=8 * 1024 * 1024
    )
    max_outstanding: int = setting(
        "EMBEDFLEET_GATEWAY_MAX_OUTSTANDING",
        "texts sent to the fleet and not yet answered, per gateway process; past it a 429",
        default=8192,
    )
    cors_origins: str = setting(
        "EMBEDFLEET_GATEWAY_CORS_ORIGINS",
        "comma-separated origins allowed by CORS (* = any); empty = CORS off",
        default="",
    )
    lease_s: float = setting(
        "EMBEDFLEET_GATEWAY_LEASE_S",
        "a gateway marks its reply topic alive this often x 1/3; a gateway topic silent for "
        "longer is deleted by any live gateway (a killed gateway's leftover)",
        default=60.0,
    )
    log_format: str = setting(
        "EMBEDFLEET_LOG_FORMAT", "log lines as json or text", default="text", choices=("json", "text")
    )
    log_level: str = setting(
        "EMBEDFLEET_LOG_LEVEL", "log level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"EMBEDFLEET_GATEWAY_PORT must be 1-65535, got {self.port}")
        if self.deadline_s <= 0 or self.lease_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("EMBEDFLEET_GATEWAY_DEADLINE_S, _LEASE_S and _READ_TIMEOUT_S must be > 0")
        if self.max_concurrent < 1:
            raise ValueError(f"EMBEDFLEET_GATEWAY_MAX_CONCURRENT must be >= 1, got {self.max_concurrent}")
        if self.max_inputs < 1 or self.max_body_bytes < 1024 or self.max_outstanding < 1:
            raise ValueError(
                "EMBEDFLEET_GATEWAY_MAX_INPUTS and _MAX_OUTSTANDING must be >= 1, _MAX_BODY_BYTES >= 1024"
            )

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key.strip() for key in self.api_keys.split(",") if key.strip())

    @property
    def loopback_only(self) -> bool:
        """The server listens on a loopback address only (reachable from this machine alone)."""
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    def exposure_problem(self) -> str | None:
        """Why this configuration must not start: an open gateway on a reachable address, unless
        EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS says so. None when it may start."""
        if self.keys or self.loopback_only or self.allow_anonymous:
            return None
        return (
            f"the gateway would listen on {self.host} without API keys, open to anyone who can reach "
            "it: set EMBEDFLEET_GATEWAY_API_KEYS (comma-separated bearer keys), or bind it to "
            "127.0.0.1, or set EMBEDFLEET_GATEWAY_ALLOW_ANONYMOUS=true if that is really meant"
        )

    def __repr__(self) -> str:  # secrets masked, as describe() shows them
        shown = ", ".join(f"{name}={value!r}" for name, value in self.describe().items())
        return f"GatewayConfig({shown})"

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(origin.strip() for origin in self.cors_origins.split(",") if origin.strip())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GatewayConfig:
        return settings.from_env(cls, environ, **overrides)

    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser) -> None:
        settings.add_cli_arguments(cls, parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        return settings.from_args(cls, args, environ)

    def describe(self) -> dict[str, str]:
        return settings.describe(self)
