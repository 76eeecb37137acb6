"""`embedfleet worker`: builds every part of a worker from its configuration and runs them.

``build_parts`` is the one place a worker is wired: consumer, producers, intake, batcher,
pipeline, delivery, offsets, cache, cluster view, contract, metrics and health, each from
``WorkerConfig``; ``serve`` hands them to ``worker.runtime.WorkerRuntime``, installs the signal
handlers and turns the outcome into an exit status. A request's path, file by file:

    worker/intake.py (fetch, offsets tracked) -> worker/decoder.py (job or rejection)
    -> worker/batcher.py -> worker/pipeline.py (worker/cache.py, worker/engine/)
    -> worker/delivery.py (worker/publisher.py) -> worker/offsets.py (done, committed)

with worker/runtime.py driving the loops between them, and worker/failures.py deciding what any
exception on the way means.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas import RequestLimits
from schemas.cache_layout import ModelContract
from worker.batcher import MicroBatcher
from worker.cache import CacheClient, VectorCache, redis_client, redis_login_problem
from worker.cluster import READ_COMMITTED, READ_UNCOMMITTED, ClusterView, topic_record_limit
from worker.config import WorkerConfig
from worker.contract import ContractPublisher
from worker.decoder import RequestDecoder
from worker.delivery import AtLeastOnce, BatchWork, Delivery, ExactlyOnce
from worker.errors import ContractMismatch
from worker.failures import WorkerFatal
from worker.health import HealthServer, HealthState, ModelCalls, log_task_stacks
from worker.hits import HitLane
from worker.intake import IntakeLimits, KafkaIntake, create_consumer, max_expanded_bytes
from worker.jobs import Job, Rejection
from worker.kafka_connection import explain_kafka_error, kafka_connection_options
from worker.metrics import WorkerMetrics
from worker.offsets import ConsumedOffsets
from worker.pipeline import BatchProcessor, Engine
from worker.publisher import ResultPublisher, create_producer
from worker.records import guard_kafka_decompression
from worker.runtime import BatchSlots, Identity, WorkerParts, WorkerRuntime

log = logging.getLogger("embedfleet.worker")
# --fault-kind hold-transaction (tests): how long a marked batch's transaction stays open (under
# the transaction timeout, so a worker that takes the request over commits it after its own hold).
FAULT_HOLD_S = 5.0
GC_YOUNG_THRESHOLD = 20_000  # allocations between two young-generation collections (default 700)


class _HoldOnce:
    """Fault injection (tests): the first batch with a marked request holds its transaction open."""

    def __init__(self, marker: str) -> None:
        self._marker = marker
        self._done = False

    def __call__(self, work: BatchWork) -> float:
        if self._done or not any(isinstance(i, Job) and self._marker in i.request.text for i in work.items):
            return 0.0
        self._done = True
        return FAULT_HOLD_S


def served_model(embedder: Engine) -> ModelContract:
    manifest = embedder.manifest
    return ModelContract(
        name=manifest.name,
        fingerprint=embedder.model_fingerprint,
        dim=manifest.dim,
        tasks=frozenset(manifest.prompts),
        dimensions=frozenset({*manifest.matryoshka_dims, manifest.dim}),
        max_tokens=int(manifest.max_tokens),
    )


@dataclass(frozen=True, slots=True)
class Connections:
    """The worker's clients of Kafka and Redis: real ones from ``connect``, fakes in unit tests."""

    consumer: AIOKafkaConsumer
    # (transactional id or None, for reply topics?) -> a producer, not started
    new_producer: Callable[[str | None, bool], AIOKafkaProducer]
    cluster: ClusterView
    redis: CacheClient | None


def connect(config: WorkerConfig, *, dlq_record_limit: int = 1 << 20) -> Connections:
    """The real clients, from the configuration (nothing is contacted until they start)."""
    redis = None
    if config.redis_url:
        redis = redis_client(
            config.redis_url,
            username=config.redis_username,
            password=config.redis_password,
            timeout_s=config.redis_timeout_s,
            ssl_ca_certs=config.redis_ssl_cafile,
        )
    return Connections(
        consumer=create_consumer(config, read_committed=config.guarantee == "exactly-once"),
        new_producer=lambda transactional_id, for_replies: create_producer(
            config, transactional_id=transactional_id, record_limit=dlq_record_limit, for_replies=for_replies
        ),
        cluster=ClusterView(kafka_connection_options(config), max_topics=config.reply_topics_kept),
        redis=redis,
    )


def build_parts(
    config: WorkerConfig,
    embedder: Engine,
    connections: Connections,
    *,
    inference_threads: int = 1,
    dlq_record_limit: int = 1 << 20,
    hold_marker: str | None = None,
) -> WorkerParts:
    """Every part of one worker, wired from its configuration around its connections."""
    model = served_model(embedder)
    metrics = WorkerMetrics(model=model.name)
    # The one place the delivery guarantee is decided: the strategy object, the isolation level
    # it needs from the consumer (exactly-once reads only committed requests), and who commits.
    exactly_once = config.guarantee == "exactly-once"
    consumer, cluster = connections.consumer, connections.cluster
    offsets = ConsumedOffsets(consumer, metrics, commits=not exactly_once)
    publisher = ResultPublisher(
        cluster,
        results_topic=config.results_topic,
        dlq_topic=config.dlq_topic,
        worker_id=config.worker_id,
        model=model.name,
        max_dlq_record_bytes=dlq_record_limit,
    )
    delivery: Delivery
    if exactly_once:
        delivery = ExactlyOnce(
            offsets=offsets,
            publisher=publisher,
            cluster=cluster,
            metrics=metrics,
            group_id=config.group_id,
            new_producer=lambda transactional_id: connections.new_producer(transactional_id, False),
            hold=_HoldOnce(hold_marker) if hold_marker else None,
            reply_timeout_s=config.reply_timeout_s,
        )
    else:
        delivery = AtLeastOnce(
            lambda for_replies: connections.new_producer(None, for_replies),
            publisher,
            cluster,
            metrics,
            reply_timeout_s=config.reply_timeout_s,
        )
    cache = VectorCache(
        connections.redis,
        key_prefix=config.cache_key_prefix,
        model_name=model.name,
        ttl_s=config.cache_ttl_s,
        metrics=metrics,
    )
    slots = BatchSlots(inference_threads)
    batcher: MicroBatcher[Job | Rejection] = MicroBatcher(
        window_s=config.batch_window_ms / 1000,
        token_budget=config.token_budget,
        max_size=config.max_batch_size,
        model_idle=slots.model_idle,
    )
    decoder = RequestDecoder(
        model=model,
        tokenize=embedder.tokenize,
        split_windows=embedder.windows,
        limits=RequestLimits(
            max_message_bytes=config.max_message_bytes, max_text_bytes=config.max_text_bytes
        ),
        reply_to_pattern=config.reply_to_pattern,
        default_reply_topic=config.results_topic,
        max_kept_value_bytes=dlq_record_limit,
        max_windows=config.max_windows,
    )
    # Decoding and tokenizing run here, off the event loop (long texts would stall heartbeats).
    decode_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
    # The hit lane answers cache hits at intake, beside the batches. Exactly-once commits each
    # batch's offsets in its transaction, in the order batches were cut, so there hits ride the
    # batches.
    hits = (
        None
        if exactly_once or not cache.enabled
        else HitLane(
            cache,
            metrics,
            model_name=model.name,
            max_tokens=int(embedder.manifest.max_tokens),
            hot_cache_bytes=config.hot_cache_bytes,
            hot_cache_max_age_s=config.hot_cache_max_age_s,
        )
    )
    intake = KafkaIntake(
        consumer,
        decoder=decoder,
        batcher=batcher,
        offsets=offsets,
        cluster=cluster,
        group_id=config.group_id,
        metrics=metrics,
        decode_executor=decode_executor,
        limits=IntakeLimits.of(config, READ_COMMITTED if exactly_once else READ_UNCOMMITTED),
        hits=hits,
    )
    model_calls = ModelCalls(config.model_call_stall_s)
    processor = BatchProcessor(
        backend=embedder,
        cache=cache,
        metrics=metrics,
        model_name=model.name,
        inference_batch_size=config.inference_batch_size,
        token_budget=config.model_call_tokens(),
        inference_threads=inference_threads,
        looked_up_at_intake=hits is not None,
        model_calls=model_calls,
    )
    health = HealthState(model_loaded=True, model_calls=model_calls)
    metrics.model.info(
        {
            "name": model.name,
            "fingerprint": model.fingerprint,
            "dim": str(model.dim),
            "variant": str(getattr(embedder, "variant", config.variant)),
            "device": config.device,
            "kernel": str(getattr(embedder, "kernel", "")),
        }
    )
    return WorkerParts(
        identity=Identity(
            config.worker_id,
            config.group_id,
            config.requests_topic,
            model.name,
            model.fingerprint,
            config.guarantee,
        ),
        consumer=consumer,
        intake=intake,
        batcher=batcher,
        slots=slots,
        processor=processor,
        delivery=delivery,
        offsets=offsets,
        cache=cache,
        cluster=cluster,
        contract=ContractPublisher(
            cache,
            model,
            replace=config.on_contract_mismatch == "replace",
            served_as=f"variant {config.variant}, bundle {config.model}",
        ),
        metrics=metrics,
        health=health,
        health_server=(
            HealthServer(health, metrics.exposition, config.metrics_host, config.metrics_port)
            if config.metrics_port
            else None
        ),
        decode_executor=decode_executor,
    )


async def serve(
    config: WorkerConfig, embedder: Engine, *, inference_threads: int = 1, hold_marker: str | None = None
) -> int:
    """Runs a worker until SIGTERM/SIGINT (0) or a fatal error (1: a failed start, or a bug that
    stopped the pipeline; 2: a configuration problem)."""
    # A refused Redis login is a configuration error, not an outage: never run without the cache
    # because of a wrong password.
    problem = await redis_login_problem(config)
    if problem is not None:
        log.error("%s; not starting", problem)
        return 2
    guard_kafka_decompression(max_expanded_bytes(config))
    dlq_limit = await topic_record_limit(kafka_connection_options(config), config.dlq_topic)
    runtime = WorkerRuntime(
        build_parts(
            config,
            embedder,
            connect(config, dlq_record_limit=dlq_limit),
            inference_threads=inference_threads,
            dlq_record_limit=dlq_limit,
            hold_marker=hold_marker,
        )
    )
    # Everything long-lived is loaded by now (model, tokenizer, clients): keep it out of the
    # collector's scans, and collect young objects less often (every result allocates lists and
    # dicts; the default threshold of 700 ran a collection every few results).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runtime.stop)
    loop.add_signal_handler(signal.SIGUSR1, log_task_stacks)
    try:
        return await _run_until_stopped(runtime, config)
    finally:
        # An embedding process (a test) gets its signals back once the worker has stopped.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(signum)


async def _run_until_stopped(runtime: WorkerRuntime, config: WorkerConfig) -> int:
    """Runs the worker; its exit status (see serve)."""
    try:
        await runtime.run()
    except ContractMismatch as exc:
        log.error("%s; not starting", exc)
        return 2
    except KafkaError as exc:
        log.error("%s", await explain_kafka_error(config, exc))
        return 1
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.error(
            "port %d on %s is in use (another worker?): set EMBEDFLEET_METRICS_PORT to a free one, "
            "or 0 to turn /metrics off",
            config.metrics_port,
            config.metrics_host,
        )
        return 2
    if isinstance(runtime.fatal, WorkerFatal):
        log.error(
            "stopped: %s. This is the worker's own configuration or credentials (see the failure "
            "policy in the README): fix it and start the worker again",
            runtime.fatal,
        )
        return 2
    if runtime.fatal is not None:
        log.error("stopped after a fatal error: %s: %s", type(runtime.fatal).__name__, runtime.fatal)
        return 1
    return 0
