"""The client's configuration: one frozen dataclass, read from the environment, overridable by keyword.

Credentials (SASL password, Redis password) are hidden from ``repr`` so a logged config never shows them.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.model_routing import BASE_REQUESTS_TOPIC, DEFAULT_MODEL, requests_topic_for
from schemas.settings import mask_url_password

ReplyMode = Literal["private", "shared", "none"]
REPLY_MODES: tuple[ReplyMode, ...] = ("private", "shared", "none")

# Field name -> environment variable. Fields not listed here are set by keyword only.
ENVIRONMENT: Mapping[str, str] = {
    "kafka_bootstrap": "EMBEDFLEET_KAFKA_BOOTSTRAP",
    "requests_topic": "EMBEDFLEET_REQUESTS_TOPIC",
    "results_topic": "EMBEDFLEET_RESULTS_TOPIC",
    "kafka_security_protocol": "EMBEDFLEET_KAFKA_SECURITY_PROTOCOL",
    "kafka_sasl_mechanism": "EMBEDFLEET_KAFKA_SASL_MECHANISM",
    "kafka_sasl_username": "EMBEDFLEET_KAFKA_SASL_USERNAME",
    "kafka_sasl_password": "EMBEDFLEET_KAFKA_SASL_PASSWORD",
    "kafka_ssl_cafile": "EMBEDFLEET_KAFKA_SSL_CAFILE",
    "kafka_ssl_certfile": "EMBEDFLEET_KAFKA_SSL_CERTFILE",
    "kafka_ssl_keyfile": "EMBEDFLEET_KAFKA_SSL_KEYFILE",
    "redis_ssl_cafile": "EMBEDFLEET_REDIS_SSL_CAFILE",
    "redis_url": "EMBEDFLEET_REDIS_URL",
    "redis_username": "EMBEDFLEET_REDIS_USERNAME",
    "redis_password": "EMBEDFLEET_REDIS_PASSWORD",
    "cache_key_prefix": "EMBEDFLEET_CACHE_KEY_PREFIX",
    "model_name": "EMBEDFLEET_MODEL_NAME",
    "default_model": "EMBEDFLEET_DEFAULT_MODEL",
    "model_fingerprint": "EMBEDFLEET_MODEL_FINGERPRINT",
    "model_dim": "EMBEDFLEET_MODEL_DIM",
}


def new_client_id() -> str:
    return f"py-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Every setting of the client, read from the environment, overridable by keyword."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    # Empty: the model's topic by the naming rule (schemas.model_routing): embed.requests for the
    # default model, embed.requests.<model> for the others.
    requests_topic: str = ""
    results_topic: str = "embed.results"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_ssl_cafile: str = ""
    # Client certificate and key for Kafka mTLS (as the worker's EMBEDFLEET_KAFKA_SSL_*).
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    # Empty disables the cache lookup (and the model contract read: see model_fingerprint).
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    redis_ssl_cafile: str = ""  # CA bundle for rediss:// URLs
    redis_timeout_s: float = 1.0
    cache_key_prefix: str = "embedfleet"
    model_name: str = DEFAULT_MODEL
    # The model the fleet serves on the base topic (EMBEDFLEET_DEFAULT_MODEL, as the workers and
    # the Go client read it): every other model's topic is derived from it.
    default_model: str = DEFAULT_MODEL
    # Normally read from Redis ({prefix}:models:{model_name}); set it to hash without Redis.
    model_fingerprint: str = ""
    model_dim: int | None = None
    use_cache: bool = True
    # private: a reply topic of our own; shared: read embed.results; none: produce only (send()).
    reply_mode: ReplyMode = "private"
    client_id: str = field(default_factory=new_client_id)
    linger_ms: int = 5

    def __post_init__(self) -> None:
        if not self.requests_topic:
            object.__setattr__(self, "requests_topic", self.requests_topic_of(self.model_name))
        if self.reply_mode not in REPLY_MODES:
            raise ValueError(f"reply_mode must be one of {REPLY_MODES}, got {self.reply_mode!r}")
        if self.model_dim is not None and self.model_dim < 1:
            raise ValueError(f"model_dim must be positive, got {self.model_dim}")

    def __repr__(self) -> str:
        """Every field but the passwords, and the Redis URL with its password masked."""
        shown = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if f.name == "redis_url":
                value = mask_url_password(value)
            shown.append(f"{f.name}={value!r}")
        return f"ClientConfig({', '.join(shown)})"

    def requests_topic_of(self, model: str) -> str:
        """Where jobs for ``model`` go: the configured topic for this client's own model, the
        naming rule's for any other model of the fleet. A client of the default model takes its
        configured topic as the rule's base (``jobs`` -> ``jobs.<model>``), so a fleet whose base
        topic is renamed needs one setting per client, not one per model."""
        if model == self.model_name and self.requests_topic:
            return self.requests_topic
        own_is_base = self.model_name == self.default_model and self.requests_topic
        base = self.requests_topic if own_is_base else BASE_REQUESTS_TOPIC
        return requests_topic_for(model, default_model=self.default_model, base=base)

    @property
    def reply_topic(self) -> str | None:
        """The topic results come back on (None when nothing is read)."""
        if self.reply_mode == "private":
            return f"{self.results_topic}.{self.client_id}"
        if self.reply_mode == "shared":
            return self.results_topic
        return None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientConfig:
        """Settings from ``EMBEDFLEET_*`` variables; keyword overrides (not None) win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            variable = ENVIRONMENT.get(f.name)
            raw = environ.get(variable) if variable else None
            if raw is not None and raw != "":
                values[f.name] = int(raw) if f.name == "model_dim" else raw
            elif raw == "" and f.name == "redis_url":
                values[f.name] = ""  # an explicitly empty URL turns the cache off
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown ClientConfig settings: {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
