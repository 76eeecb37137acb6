"""The worker's one configuration object, read from the environment and overridden by CLI flags.

Every field declares its environment variable and help text once, here; the CLI flags, the
README's table (checked by a test) and ``embedfleet worker --print-config`` all come from it.
Credentials (SASL password, Redis password) are read from the environment only: they have no flag,
so they never show up in ``ps`` or shell history.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from schemas import settings
from schemas.model_routing import DEFAULT_MODEL, group_id_for, requests_topic_for
from schemas.settings import setting
from worker.engine.bundle import MANIFEST_FILE, default_bundle_dir
from worker.engine.tokenize import CPU_CALL_TOKENS, LARGE_CALL_TOKENS, call_token_budget

Guarantee = Literal["at-least-once", "exactly-once"]


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def model_or_bundle(raw: str) -> Path:
    """``--model``: a bare name (no ``/``) is a model, served from ``$EMBEDFLEET_HOME/models/NAME``
    (where ``embedfleet model build --model NAME`` puts it); anything with a ``/`` is a bundle
    directory, as before (write ``./NAME`` for a bundle in the current directory)."""
    if "/" not in raw and raw not in (".", "..") and not raw.startswith("~"):
        return default_bundle_dir(raw)
    return Path(raw).expanduser()


def bundle_model_name(bundle: Path) -> str:
    """The name of the model a bundle holds: its manifest's ``name``, or, where the manifest cannot
    be read (yet), the directory's name (bundles live in ``models/<name>``)."""
    try:
        name = json.loads((bundle / MANIFEST_FILE).read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else bundle.name


@dataclass(frozen=True)
class WorkerConfig:
    """Every setting of a worker: one field each, with its environment variable and help."""

    # Kafka
    kafka_bootstrap: str = setting(
        "EMBEDFLEET_KAFKA_BOOTSTRAP", "Kafka bootstrap servers", default="127.0.0.1:9092"
    )
    group_id: str = setting(
        "EMBEDFLEET_GROUP_ID",
        "consumer group of the model's workers (empty: embedfleet for the default model, "
        "embedfleet.<model> for the others)",
        default="",
    )
    requests_topic: str = setting(
        "EMBEDFLEET_REQUESTS_TOPIC",
        "topic the model's jobs arrive on (empty: embed.requests for the default model, "
        "embed.requests.<model> for the others)",
        default="",
    )
    results_topic: str = setting(
        "EMBEDFLEET_RESULTS_TOPIC", "default topic for results", default="embed.results"
    )
    dlq_topic: str = setting(
        "EMBEDFLEET_DLQ_TOPIC", "dead-letter topic for bad input", default="embed.requests.dlq"
    )
    reply_to_pattern: str = setting(
        "EMBEDFLEET_REPLY_TO_PATTERN",
        "regular expression a request's reply_to must match in full (allow-list)",
        default=r"embed\.results.*",
    )
    worker_id: str = setting(
        "EMBEDFLEET_WORKER_ID",
        "this worker's id (Kafka client id, logs, the dlq-worker header)",
        factory=default_worker_id,
    )
    guarantee: Guarantee = setting(
        "EMBEDFLEET_GUARANTEE",
        "delivery guarantee",
        default="at-least-once",
        choices=("at-least-once", "exactly-once"),
    )
    kafka_security_protocol: str = setting(
        "EMBEDFLEET_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        default="PLAINTEXT",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    kafka_sasl_mechanism: str = setting(
        "EMBEDFLEET_KAFKA_SASL_MECHANISM",
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
        default="PLAIN",
        choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    )
    kafka_sasl_username: str = setting("EMBEDFLEET_KAFKA_SASL_USERNAME", "SASL user name", default="")
    kafka_sasl_password: str = setting(
        "EMBEDFLEET_KAFKA_SASL_PASSWORD", "SASL password (environment only)", default="", secret=True
    )
    kafka_ssl_cafile: str = setting("EMBEDFLEET_KAFKA_SSL_CAFILE", "CA bundle for Kafka TLS", default="")
    kafka_ssl_certfile: str = setting(
        "EMBEDFLEET_KAFKA_SSL_CERTFILE", "client certificate for Kafka mTLS", default=""
    )
    kafka_ssl_keyfile: str = setting("EMBEDFLEET_KAFKA_SSL_KEYFILE", "client key for Kafka mTLS", default="")
    # Redis cache
    redis_url: str = setting(
        "EMBEDFLEET_REDIS_URL",
        "Redis URL of the vector cache (rediss:// for TLS; redis+cluster://host:port[,host:port...]/0 "
        "for Redis Cluster; empty disables the cache)",
        default="redis://127.0.0.1:6379/0",
    )
    redis_username: str = setting("EMBEDFLEET_REDIS_USERNAME", "Redis ACL user", default="")
    redis_password: str = setting(
        "EMBEDFLEET_REDIS_PASSWORD", "Redis password (environment only)", default="", secret=True
    )
    redis_ssl_cafile: str = setting("EMBEDFLEET_REDIS_SSL_CAFILE", "CA bundle for Redis TLS", default="")
    redis_timeout_s: float = setting(
        "EMBEDFLEET_REDIS_TIMEOUT_S", "Redis socket timeout; past it the cache fails open", default=0.25
    )
    cache_ttl_s: int = setting(
        "EMBEDFLEET_CACHE_TTL_S", "cache entry TTL in seconds (0 = no expiry)", default=30 * 24 * 3600
    )
    cache_key_prefix: str = setting(
        "EMBEDFLEET_CACHE_KEY_PREFIX", "prefix of the cache's Redis keys", default="embedfleet"
    )
    # Model
    model: Path = setting(
        "EMBEDFLEET_MODEL",
        "model name (its bundle in $EMBEDFLEET_HOME/models/NAME) or model bundle directory (a path with a /)",
        factory=default_bundle_dir,
        parse=model_or_bundle,
    )
    default_model: str = setting(
        "EMBEDFLEET_DEFAULT_MODEL",
        "the model served on the base requests topic and group; every other model on "
        "<topic>.<model>, <group>.<model>",
        default=DEFAULT_MODEL,
    )
    variant: str = setting(
        "EMBEDFLEET_VARIANT",
        "model variant (openvino: the FP32 graph compiled by OpenVINO, BF16 where the CPU has it; "
        "needs the openvino extra)",
        default="int8",
        choices=("int8", "fp32", "fp16", "openvino"),
    )
    int8_weights: str = setting(
        "EMBEDFLEET_INT8_WEIGHTS",
        "encoding of the int8 variant's weights: s8 (u8 x s8 GEMMs: VNNI, AMX, or AVX2 on a bundle "
        "from builder 5 on), u8 (u8 x u8, exact on any x86 CPU, slower) or auto (s8 where it is "
        "exact here); the same vectors",
        default="auto",
        choices=("auto", "u8", "s8"),
    )
    device: str = setting("EMBEDFLEET_DEVICE", "inference device", default="cpu", choices=("cpu", "cuda"))
    intra_op_threads: int = setting(
        "EMBEDFLEET_INTRA_OP_THREADS",
        "ONNX Runtime threads per model call (0 = physical cores / inference threads)",
        default=0,
    )
    inference_threads: int = setting(
        "EMBEDFLEET_INFERENCE_THREADS",
        "model calls run side by side (0 = physical cores, each call single-threaded)",
        default=0,
    )
    # Batching
    batch_window_ms: float = setting(
        "EMBEDFLEET_BATCH_WINDOW_MS",
        "while the model is busy, a micro-batch closes this long after its first message "
        "(at once when the model is idle)",
        default=5.0,
    )
    token_budget: int = setting(
        "EMBEDFLEET_TOKEN_BUDGET", "padded tokens (longest x count) per batch", default=16384
    )
    max_batch_size: int = setting("EMBEDFLEET_MAX_BATCH_SIZE", "messages per micro-batch", default=256)
    inference_batch_size: int = setting(
        "EMBEDFLEET_INFERENCE_BATCH_SIZE", "texts per model call (length-sorted)", default=32
    )
    inference_token_budget: int = setting(
        "EMBEDFLEET_INFERENCE_TOKEN_BUDGET",
        f"padded tokens per model call (0 = {CPU_CALL_TOKENS} for ONNX Runtime on the CPU, whose "
        f"calls then keep their activations in the L2 cache; {LARGE_CALL_TOKENS} for openvino and CUDA)",
        default=0,
    )
    model_call_stall_s: float = setting(
        "EMBEDFLEET_MODEL_CALL_STALL_S",
        "a model call running longer than this fails /healthz (a hung inference runtime: the "
        "orchestrator restarts the worker and the group reassigns its partitions); 0 = never",
        default=300.0,
    )
    max_in_flight: int = setting(
        "EMBEDFLEET_MAX_IN_FLIGHT",
        "messages consumed but not yet committed; above it partitions pause",
        default=4096,
    )
    max_in_flight_bytes: int = setting(
        "EMBEDFLEET_MAX_IN_FLIGHT_BYTES",
        "bytes of messages consumed but not yet committed (each counted at its size + 16 KiB for "
        "its tokens, vector and result); above it partitions pause. Fetches are sized to match",
        default=256 * 1024 * 1024,
    )
    transaction_timeout_ms: int = setting(
        "EMBEDFLEET_TRANSACTION_TIMEOUT_MS",
        "exactly-once: the broker aborts a killed worker's open transaction after this long "
        "(read_committed readers wait for it at most this long)",
        default=10_000,
    )
    reply_timeout_s: float = setting(
        "EMBEDFLEET_REPLY_TIMEOUT_S",
        "how long a result may wait for a reply_to topic to acknowledge it; past it the request "
        "gets reply_to_unavailable on the default results topic and a dead letter",
        default=10.0,
    )
    reply_topics_kept: int = setting(
        "EMBEDFLEET_REPLY_TOPICS_KEPT",
        "reply topics whose metadata is remembered (least recently used forgotten first; idle ones "
        "after a minute)",
        default=4096,
    )
    hot_cache_bytes: int = setting(
        "EMBEDFLEET_HOT_CACHE_BYTES",
        "bytes of hot cache entries kept in the worker's memory, with the encoded forms of their "
        "vectors: a key asked for again is answered without a Redis round trip or encoding its "
        "vector again (least recently used dropped first; 0 = off)",
        default=64 * 1024 * 1024,
    )
    hot_cache_max_age_s: float = setting(
        "EMBEDFLEET_HOT_CACHE_MAX_AGE_S",
        "seconds a hot entry is kept at most: how long an entry deleted from Redis may still be "
        "served by a worker that holds it",
        default=60.0,
    )
    on_contract_mismatch: str = setting(
        "EMBEDFLEET_ON_CONTRACT_MISMATCH",
        "when Redis holds another serving fingerprint for this model: refuse to start, or replace "
        "the contract (the first worker of a new variant or model build; stop the old ones)",
        default="refuse",
        choices=("refuse", "replace"),
    )
    # Limits
    max_message_bytes: int = setting(
        "EMBEDFLEET_MAX_MESSAGE_BYTES", "largest request message", default=1024 * 1024
    )
    max_text_bytes: int = setting(
        "EMBEDFLEET_MAX_TEXT_BYTES", "largest text (UTF-8 bytes)", default=64 * 1024
    )
    max_windows: int = setting(
        "EMBEDFLEET_MAX_WINDOWS",
        "most windows one long text may be split into (long: pool/chunks); past it: text_too_long",
        default=64,
    )
    # Operations
    metrics_host: str = setting(
        "EMBEDFLEET_METRICS_HOST", "bind address of /metrics, /healthz, /readyz", default="127.0.0.1"
    )
    metrics_port: int = setting("EMBEDFLEET_METRICS_PORT", "port of /metrics (0 = off)", default=9400)
    log_format: str = setting(
        "EMBEDFLEET_LOG_FORMAT", "log lines as json or text", default="text", choices=("json", "text")
    )
    log_level: str = setting(
        "EMBEDFLEET_LOG_LEVEL", "log level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )

    def __post_init__(self) -> None:
        # The naming rule (schemas.model_routing) fills in what is not set explicitly, so every
        # part that reads the topic or the group (intake, delivery, runtime) sees the final names.
        if not self.requests_topic or not self.group_id:
            name = self.model_name
            if not self.requests_topic:
                object.__setattr__(
                    self, "requests_topic", requests_topic_for(name, default_model=self.default_model)
                )
            if not self.group_id:
                object.__setattr__(self, "group_id", group_id_for(name, default_model=self.default_model))
        if self.batch_window_ms < 0 or self.token_budget <= 0 or self.max_batch_size <= 0:
            raise ValueError("batch window must be >= 0, token budget and batch size > 0")
        if self.model_call_stall_s < 0:
            raise ValueError("EMBEDFLEET_MODEL_CALL_STALL_S must be >= 0 (0 = never)")
        if self.inference_token_budget < 0:
            raise ValueError("EMBEDFLEET_INFERENCE_TOKEN_BUDGET must be >= 0 (0 = auto)")
        if self.inference_threads < 0 or self.intra_op_threads < 0:
            raise ValueError("EMBEDFLEET_INFERENCE_THREADS and EMBEDFLEET_INTRA_OP_THREADS must be >= 0")
        if self.inference_batch_size <= 0 or self.max_in_flight < self.max_batch_size:
            raise ValueError("inference batch size must be > 0 and max in flight >= max batch size")
        if self.max_in_flight_bytes < 4 * self.max_message_bytes:
            raise ValueError(
                "EMBEDFLEET_MAX_IN_FLIGHT_BYTES must be at least 4 x EMBEDFLEET_MAX_MESSAGE_BYTES"
            )
        if self.transaction_timeout_ms < 1000:
            raise ValueError("EMBEDFLEET_TRANSACTION_TIMEOUT_MS must be >= 1000")
        if self.reply_timeout_s <= 0 or self.reply_topics_kept <= 0:
            raise ValueError("EMBEDFLEET_REPLY_TIMEOUT_S and EMBEDFLEET_REPLY_TOPICS_KEPT must be > 0")
        if self.hot_cache_bytes < 0:
            raise ValueError("EMBEDFLEET_HOT_CACHE_BYTES must be >= 0")
        if self.hot_cache_max_age_s <= 0:
            raise ValueError("EMBEDFLEET_HOT_CACHE_MAX_AGE_S must be > 0")
        re.compile(self.reply_to_pattern)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerConfig:
        return settings.from_env(cls, environ, **overrides)

    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser) -> None:
        settings.add_cli_arguments(cls, parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> WorkerConfig:
        return settings.from_args(cls, args, environ)

    @property
    def model_name(self) -> str:
        """The name of the model this worker serves (what its contract is published under)."""
        return bundle_model_name(self.model)

    def model_call_tokens(self) -> int:
        """Padded tokens per model call, with the 0 = auto default (``call_token_budget``)."""
        return call_token_budget(self.inference_token_budget, self.variant, self.device)

    def model_threads(self, physical_cores: int) -> tuple[int, int]:
        """(model calls side by side, ONNX Runtime threads per call) with the 0 = auto defaults.

        Auto runs one single-threaded call per physical core: measured on 2 cores, the worker gave
        as much throughput as one 2-thread call and far lower latency under moderate load (p50 55
        vs 294 ms at 400 requests/s), because the event loop's own work no longer stalls a
        2-thread parallel section."""
        calls = self.inference_threads or max(1, physical_cores)
        per_call = self.intra_op_threads or max(1, physical_cores // calls)
        return calls, per_call

    def __repr__(self) -> str:  # secrets and URL passwords masked, as describe() shows them
        shown = ", ".join(f"{name}={value!r}" for name, value in self.describe().items())
        return f"WorkerConfig({shown})"

    def describe(self) -> dict[str, str]:
        """Settings as strings for logs and --print-config, secrets masked."""
        return settings.describe(self)
