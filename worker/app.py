"""`embedfleet worker`: wires consumer, batcher, cache, model and publisher, and owns shutdown.

    fetch loop:  getmany -> track offsets -> decode -> batcher (jobs) | rejections (answered at once)
    batch loop:  batcher -> BatchProcessor (cache, model, cache) -> results -> acks -> commit

Delivery: at-least-once. A consumed record is marked done only when everything it caused is
acknowledged by the broker (acks=all, idempotent producer); offsets are committed per partition up
to the first record not yet done. On revoke the worker finishes and commits what it holds for the
revoked partitions; SIGTERM/SIGINT stop fetching, drain every batch, commit and leave the group.
Backpressure: above ``max_in_flight`` uncommitted records every partition is paused (``pause()``
does not trigger a rebalance) and resumed below half of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from schemas import ErrorCode, RequestLimits
from worker.batcher import Batch, MicroBatcher
from worker.cache import VectorCache, redis_client, redis_login_problem
from worker.config import WorkerConfig
from worker.consumer import ModelContract, RequestDecoder, create_consumer
from worker.health import HealthServer, HealthState
from worker.jobs import Job, Rejection
from worker.kafka_options import explain_kafka_error
from worker.logs import setup_logging
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.pipeline import BatchOutcome, BatchProcessor
from worker.publisher import ResultPublisher, create_producer

log = logging.getLogger("embedfleet.worker")
FETCH_MAX_RECORDS = 500
# Batches handled at once: one per inference thread in the model, plus one being looked up or
# published; meanwhile new work grows the batcher's open batch.
CONCURRENT_BATCHES = 2
DRAIN_TIMEOUT_S = 120.0
COMMIT_INTERVAL_S = 0.1


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._worker.on_assigned(list(assigned))


class Worker:
    def __init__(self, config: WorkerConfig, embedder: Any, *, metrics: WorkerMetrics | None = None,
                 inference_threads: int = 1) -> None:
        self.config = config
        self.embedder = embedder
        self.metrics = metrics or WorkerMetrics()
        self.health = HealthState(model_loaded=True)
        manifest = embedder.manifest
        self.model = ModelContract(
            name=manifest.name, fingerprint=embedder.model_fingerprint, dim=manifest.dim,
            tasks=frozenset(manifest.prompts),
            dimensions=frozenset({*manifest.matryoshka_dims, manifest.dim}))
        self.decoder = RequestDecoder(
            model=self.model, count_tokens=embedder.count_tokens,
            limits=RequestLimits(max_message_bytes=config.max_message_bytes,
                                 max_text_bytes=config.max_text_bytes),
            reply_to_pattern=config.reply_to_pattern, default_reply_topic=config.results_topic)
        self.batcher: MicroBatcher[Job | Rejection] = MicroBatcher(
            window_s=config.batch_window_ms / 1000, token_budget=config.token_budget,
            max_size=config.max_batch_size)
        self.offsets: OffsetTracker[TopicPartition] = OffsetTracker()
        self.consumer: AIOKafkaConsumer = create_consumer(config)
        self.producer: AIOKafkaProducer = create_producer(config)
        self.publisher = ResultPublisher(self.producer, dlq_topic=config.dlq_topic,
                                         worker_id=config.worker_id,
                                         max_dlq_value_bytes=config.max_message_bytes)
        client = None
        if config.redis_url:
            client = redis_client(config.redis_url, username=config.redis_username,
                                  password=config.redis_password, timeout_s=config.redis_timeout_s,
                                  ssl_ca_certs=config.redis_ssl_cafile)
        self.cache = VectorCache(client, key_prefix=config.cache_key_prefix, model_name=manifest.name,
                                 ttl_s=config.cache_ttl_s, metrics=self.metrics)
        self.processor = BatchProcessor(
            backend=embedder, cache=self.cache, metrics=self.metrics, model_name=manifest.name,
            inference_batch_size=config.inference_batch_size, token_budget=config.inference_token_budget,
            inference_threads=inference_threads)
        self.health_server = HealthServer(self.health, self.metrics.exposition, config.metrics_host,
                                          config.metrics_port) if config.metrics_port else None
        self._stopping = asyncio.Event()
        self._fetch_allowed = asyncio.Event()  # cleared while a revoke finishes in-flight work
        self._fetch_allowed.set()
        self._paused = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_slots = asyncio.Semaphore(inference_threads + CONCURRENT_BATCHES - 1)
        self._commit_lock = asyncio.Lock()
        self._commit_wanted = asyncio.Event()
        self._batches_started = 0
        self._owned: set[TopicPartition] = set()  # partitions this worker may process right now
        # Exactly-once: batches publish strictly in the order they were cut.
        self._publish_turn = asyncio.Condition()
        self._next_to_publish = 0
        self._publish_failed = False
        self.metrics.model.info({
            "name": manifest.name, "fingerprint": embedder.model_fingerprint, "dim": str(manifest.dim),
            "variant": str(getattr(embedder, "variant", config.variant)), "device": config.device})

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.producer.start()
            self.consumer.subscribe([self.config.requests_topic], listener=_RebalanceListener(self))
            await self.consumer.start()
            if self.health_server is not None:
                await self.health_server.start()
            if await self.cache.ping():
                await self.cache.publish_model(self.model.name, self.model.redis_fields(
                    max_tokens=self.embedder.manifest.max_tokens))
            log.info("worker %s started: group %s, topic %s, model %s (%s)", self.config.worker_id,
                     self.config.group_id, self.config.requests_topic, self.model.name,
                     self.model.fingerprint[:12])
            batch_loop = asyncio.create_task(self._batch_loop(), name="batch-loop")
            commit_loop = asyncio.create_task(self._commit_loop(), name="commit-loop")
            try:
                await self._fetch_loop()
            finally:
                await self._drain(batch_loop)
                commit_loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await commit_loop
        finally:
            await self._close()

    def stop(self) -> None:
        """Begin a graceful stop: no more fetching; in-flight work is finished and committed."""
        if not self._stopping.is_set():
            log.info("stopping: draining in-flight work")
            self.health.stopping = True
            self._stopping.set()

    async def _drain(self, batch_loop: asyncio.Task[None]) -> None:
        for batch in self.batcher.flush():
            await self._start_batch(batch)
        batch_loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batch_loop
        for batch in self.batcher.flush():  # anything the loop had not picked up
            await self._start_batch(batch)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=DRAIN_TIMEOUT_S)
        await self._commit()

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.consumer.stop()  # leaves the group: the others take over at once
        with contextlib.suppress(Exception):
            await self.producer.stop()
        await self.cache.close()
        self.processor.close()
        if self.health_server is not None:
            await self.health_server.stop()
        log.info("worker %s stopped", self.config.worker_id)

    # --- fetch loop ----------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            await self._fetch_allowed.wait()
            self._apply_backpressure()
            fetch = asyncio.ensure_future(
                self.consumer.getmany(timeout_ms=100, max_records=FETCH_MAX_RECORDS))
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetch
                break
            try:
                fetched = fetch.result()
            except KafkaError as exc:
                # A broker outage or an unreadable batch: never fatal. Count it, back off, retry;
                # nothing was tracked, so nothing is lost (the records are fetched again).
                self.metrics.fetch_errors.inc()
                log.warning("fetch failed (%s: %s); retrying in 1s", type(exc).__name__, exc)
                await asyncio.sleep(1.0)
                continue
            # A fetch that was in flight during a revoke may still carry the lost partitions.
            records = [r for tp, batch in fetched.items() if tp in self._owned for r in batch]
            if not records:
                continue
            for record in records:
                self.offsets.track(TopicPartition(record.topic, record.partition), record.offset)
            self.metrics.in_flight.set(self.offsets.in_flight)
            # Rejections travel in the batches too, so every record is answered in fetch order
            # (exactly-once commits each batch's offsets with its results).
            for item in self.decoder.decode(records):
                self.batcher.add(item, item.tokens if isinstance(item, Job) else 1)
            self._observe_lag(records)

    def _apply_backpressure(self) -> None:
        in_flight = self.offsets.in_flight
        assignment = self.consumer.assignment()
        if not self._paused and in_flight >= self.config.max_in_flight:
            self.consumer.pause(*assignment)
            self._paused = True
        elif self._paused and in_flight < self.config.max_in_flight // 2:
            self.consumer.resume(*assignment)
            self._paused = False
        self.metrics.paused.set(len(self.consumer.paused()))

    def _observe_lag(self, records: list[Any]) -> None:
        """Lag per partition fetched from: its high watermark minus one past the last record read."""
        last: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            last[tp] = max(last.get(tp, -1), record.offset)
        for tp, offset in last.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - offset - 1))

    # --- batch loop ----------------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        while True:
            # Room first, then the batch: while the model is busy, the open batch keeps growing
            # and is taken as one larger batch when room frees up.
            await self._batch_slots.acquire()
            try:
                batch = await self.batcher.next_batch()
            except BaseException:
                self._batch_slots.release()
                raise
            self._launch(batch)

    async def _start_batch(self, batch: Batch[Job | Rejection]) -> None:
        await self._batch_slots.acquire()
        self._launch(batch)

    def _launch(self, batch: Batch[Job | Rejection]) -> None:
        """Starts a batch; the caller holds a batch slot. The slot is given back as soon as the
        model is done with the batch, so the next batch is looked up while this one publishes
        (publishing is bounded by max_in_flight instead)."""
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(batch.padded_tokens)
        sequence = self._batches_started
        self._batches_started += 1
        released = False

        def release_slot(_: object = None) -> None:
            nonlocal released
            if not released:
                released = True
                self._batch_slots.release()

        task = self._spawn(self._process(batch.items, sequence, release_slot))
        task.add_done_callback(release_slot)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug or a lost broker: nothing was committed for these records, so they will be
            # redelivered; stop rather than keep committing around a hole.
            log.error("pipeline task failed; stopping the worker", exc_info=task.exception())
            self.stop()

    async def _process(self, items: list[Job | Rejection], sequence: int,
                       model_done: Callable[[], None]) -> None:
        jobs = [i for i in items if isinstance(i, Job)]
        rejections = [i for i in items if isinstance(i, Rejection)]
        outcome = await self.processor.process(jobs) if jobs else BatchOutcome()
        model_done()
        rejections.extend(outcome.failures)
        if self.config.guarantee == "exactly-once":
            await self._publish_transaction(items, outcome, rejections, sequence)
        else:
            acks = await self.publisher.send_results(outcome.results)
            for rejection in rejections:
                acks.extend(await self.publisher.send_rejection(rejection, model=self.model.name))
            await asyncio.gather(*acks)
        now = time.time()
        for job, _ in outcome.results:
            self.metrics.end_to_end_seconds.observe(max(0.0, now - job.source.timestamp_ms / 1000))
        for rejection in rejections:
            self.metrics.dlq.labels(rejection.error.code.value).inc()
            if rejection.error.code != ErrorCode.INFERENCE_FAILED:
                self.metrics.requests.labels("rejected").inc()
        spans: dict[int, list[int]] = {}
        for item in items:
            self.offsets.done(TopicPartition(item.source.topic, item.source.partition), item.source.offset)
            span = spans.setdefault(item.source.partition, [item.source.offset, item.source.offset])
            span[0], span[1] = min(span[0], item.source.offset), max(span[1], item.source.offset)
        self._commit_wanted.set()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch done", extra={
                "batch_size": len(items), "results": len(outcome.results), "rejected": len(rejections),
                "cached": sum(r.cached for _, r in outcome.results),
                "offsets": {str(p): f"{lo}-{hi}" for p, (lo, hi) in sorted(spans.items())}})

    async def _publish_transaction(self, items: list[Job | Rejection], outcome: BatchOutcome,
                                   rejections: list[Rejection], sequence: int) -> None:
        """Exactly-once: the batch's results, dead letters and offsets in one Kafka transaction.

        Batches publish in the order they were cut (fetch order), so when batch k commits, every
        record before it is committed too and its offsets are simply one past its last record per
        partition. A failed transaction is aborted and stops the worker: its records were not
        committed and will be processed again, and no reader on read_committed saw its results.
        """
        async with self._publish_turn:
            await self._publish_turn.wait_for(
                lambda: self._next_to_publish == sequence or self._publish_failed)
            if self._publish_failed:
                raise RuntimeError("an earlier transaction failed; not publishing later batches")
            offsets: dict[TopicPartition, int] = {}
            for item in items:
                tp = TopicPartition(item.source.topic, item.source.partition)
                offsets[tp] = max(offsets.get(tp, 0), item.source.offset + 1)
            try:
                await self.producer.begin_transaction()
                acks = await self.publisher.send_results(outcome.results)
                for rejection in rejections:
                    acks.extend(await self.publisher.send_rejection(rejection, model=self.model.name))
                await self.producer.send_offsets_to_transaction(offsets, self.config.group_id)
                await self.producer.commit_transaction()
                await asyncio.gather(*acks)
            except BaseException:
                self._publish_failed = True
                with contextlib.suppress(Exception):
                    await self.producer.abort_transaction()
                raise
            finally:
                self._next_to_publish = sequence + 1 if not self._publish_failed else self._next_to_publish
                self._publish_turn.notify_all()
            self.metrics.commits.labels("ok").inc()

    # --- commits and rebalances ----------------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Commits progress at most every COMMIT_INTERVAL_S: results are already acknowledged when
        their offsets become committable, so a later commit only widens the redelivery window."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self._commit()
            await asyncio.sleep(COMMIT_INTERVAL_S)

    async def _commit(self) -> None:
        if self.config.guarantee == "exactly-once":
            return  # offsets are committed inside each batch's transaction
        async with self._commit_lock:
            assignment = self.consumer.assignment()
            offsets = {tp: o for tp, o in self.offsets.committable().items() if tp in assignment}
            self.metrics.in_flight.set(self.offsets.in_flight)
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                # The group is rebalancing: the new owner re-reads from the last commit (duplicates,
                # never losses); the next commit after the rebalance carries the progress.
                self.metrics.commits.labels("failed").inc()
                log.warning("offset commit failed (%s); will retry with the next batch", exc)
                return
            self.offsets.mark_committed(offsets)
            self.metrics.commits.labels("ok").inc()

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish what is already running for the revoked partitions, drop what has not started
        (uncommitted, so the new owner processes it once), commit, and let them go. Dropping keeps
        the revoke short: the group waits for it (rebalance_timeout_ms) before moving on."""
        if not revoked:
            return
        self._fetch_allowed.clear()
        try:
            lost = set(revoked)
            self._owned -= lost
            dropped = self.batcher.discard(
                lambda item: TopicPartition(item.source.topic, item.source.partition) in lost)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            # Polling is fine here: a revoke is rare and its wait is bounded by the running batches.
            while self.offsets.in_flight_of(revoked) > len(dropped) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await self._commit()
            self.offsets.forget(revoked)
            for tp in revoked:
                with contextlib.suppress(KeyError):
                    self.metrics.lag.remove(tp.topic, str(tp.partition))
            log.info("partitions revoked: %s (%d queued requests left to the new owner)",
                     sorted(tp.partition for tp in revoked), len(dropped))
        finally:
            self._fetch_allowed.set()

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self._owned = set(assigned)
        self.health.group_joined = True
        self.health.details["partitions"] = ",".join(str(tp.partition) for tp in sorted(
            self.consumer.assignment(), key=lambda tp: (tp.topic, tp.partition)))
        self.metrics.ready.set(1)
        self._paused = False
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))


# --- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    WorkerConfig.add_cli_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the settings and exit")
    parser.add_argument("--fault-marker", default=None,
                        help="testing only: inference fails for texts containing this marker")


def run(args: argparse.Namespace) -> int:
    try:
        config = WorkerConfig.from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.describe(), indent=2))
        return 0
    setup_logging(config.log_format, config.log_level, worker_id=config.worker_id)
    from worker.engine.bundle import BundleError
    from worker.engine.embedder import Embedder, physical_cpu_count

    calls, per_call = config.model_threads(physical_cpu_count())
    log.info("model: %d call(s) side by side, %d ONNX Runtime thread(s) each", calls, per_call)
    try:
        embedder = Embedder.from_bundle(
            config.model, variant=config.variant, device=config.device,  # type: ignore[arg-type]
            intra_op_threads=per_call, fault_marker=args.fault_marker)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, embedder, inference_threads=calls))


async def serve(config: WorkerConfig, embedder: Any, *, inference_threads: int = 1) -> int:
    # A refused Redis login is a configuration error, not an outage: never run without the cache
    # because of a wrong password.
    problem = await redis_login_problem(config)
    if problem is not None:
        log.error("%s; not starting", problem)
        return 2
    worker = Worker(config, embedder, inference_threads=inference_threads)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    try:
        await worker.run()
    except KafkaError as exc:
        log.error("%s", await explain_kafka_error(config, exc))
        return 1
    return 0
