"""`embedfleet worker`: wires consumer, batcher, cache, model and delivery, and owns shutdown.

    fetch loop:  getmany -> track offsets and bytes -> decode + tokenize (off the loop) -> batcher
                 (getmany failing on a record it cannot unpack -> worker.salvage -> DLQ, move on)
    batch loop:  batcher -> BatchProcessor (cache, model, cache) -> Delivery -> offsets done
    commit loop: at-least-once commits offsets up to the acknowledged records
    health loop: Kafka reachable? cache up? -> /readyz and embedfleet_ready

Delivery (worker.delivery) is chosen once: at-least-once (acks, then commits) or exactly-once
(a transaction per input partition, fencing zombies). Either way a consumed record is marked done
only when everything it caused is acknowledged, and offsets never move past a record not done.
On revoke the worker finishes and commits what it holds for the revoked partitions; SIGTERM/SIGINT
stop fetching, drain every batch, commit and leave the group. Backpressure: above
``max_in_flight`` uncommitted records or ``max_in_flight_bytes`` of them every partition is paused
(``pause()`` does not trigger a rebalance) and resumed below half of both.

Nothing a record contains stops the worker: decoding errors, unreadable records, missing reply
topics and broker or Redis outages are answered, dead-lettered, retried or waited out. Only a bug
(an exception the pipeline does not expect) stops it, and then ``serve`` returns 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from schemas import ErrorCode, RequestLimits
from worker.batcher import Batch, MicroBatcher
from worker.cache import VectorCache, redis_client, redis_login_problem
from worker.cluster import READ_COMMITTED, READ_UNCOMMITTED, ClusterView, topic_record_limit
from worker.config import WorkerConfig
from worker.consumer import ModelContract, RequestDecoder, create_consumer
from worker.delivery import AtLeastOnce, BatchWork, Delivered, Delivery, ExactlyOnce
from worker.errors import ContractMismatch
from worker.failures import FATAL, TRANSIENT, WorkerFatal, classify, describe
from worker.health import HealthServer, HealthState, log_task_stacks, watch_event_loop
from worker.jobs import Job, Rejection
from worker.kafka_options import explain_kafka_error, kafka_connection_options
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.pipeline import BatchOutcome, BatchProcessor, Engine
from worker.publisher import ResultPublisher, create_producer
from worker.records import DEFAULT_MAX_EXPANDED_BYTES, guard_kafka_decompression
from worker.salvage import salvage

log = logging.getLogger("embedfleet.worker")
FETCH_MAX_RECORDS = 500
# Batches handled at once: one per inference thread in the model, plus one being looked up or
# published; meanwhile new work grows the batcher's open batch.
CONCURRENT_BATCHES = 2
DRAIN_TIMEOUT_S = 120.0
COMMIT_INTERVAL_S = 0.1
HEALTH_INTERVAL_S = 2.0
# --fault-kind hold-transaction (tests): how long a marked batch's transaction stays open (under
# the transaction timeout, so a worker that takes the request over commits it after its own hold).
FAULT_HOLD_S = 5.0
# What a record costs in memory beyond its bytes: token ids, the vector, the encoded result.
RECORD_OVERHEAD_BYTES = 16 * 1024
# Fetches this small are decoded and tokenized on the event loop (well under a millisecond);
# larger ones in the decode thread, so long texts never stall heartbeats.
INLINE_DECODE_RECORDS = 16
INLINE_DECODE_BYTES = 16 * 1024
GC_YOUNG_THRESHOLD = 20_000  # allocations between two young-generation collections (default 700)


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks to the worker."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._worker.on_assigned(list(assigned))


def _internal_error(job: Job, exc: BaseException) -> Rejection:
    return job.rejected(ErrorCode.INTERNAL_ERROR, f"the worker failed on this batch: {describe(exc)}")


def max_expanded_bytes(config: WorkerConfig) -> int:
    """How far one fetched record batch may expand when decompressed (a legitimate batch holds
    many messages of at most max_message_bytes; a decompression bomb is stopped here)."""
    return max(DEFAULT_MAX_EXPANDED_BYTES, 8 * config.max_message_bytes)


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


class Worker:
    """One worker of the fleet: wires decoder, batcher, pipeline and delivery, runs the fetch,
    batch, commit and health loops, and owns rebalances, backpressure and shutdown."""

    def __init__(
        self,
        config: WorkerConfig,
        embedder: Engine,
        *,
        metrics: WorkerMetrics | None = None,
        inference_threads: int = 1,
        dlq_record_limit: int = 1 << 20,
        hold_marker: str | None = None,
    ) -> None:
        self.config = config
        self.embedder = embedder
        self.metrics = metrics or WorkerMetrics()
        self.health = HealthState(model_loaded=True)
        self.fatal: BaseException | None = None
        manifest = embedder.manifest
        self.model = ModelContract(
            name=manifest.name,
            fingerprint=embedder.model_fingerprint,
            dim=manifest.dim,
            tasks=frozenset(manifest.prompts),
            dimensions=frozenset({*manifest.matryoshka_dims, manifest.dim}),
        )
        self._max_tokens = int(manifest.max_tokens)
        self.decoder = RequestDecoder(
            model=self.model,
            tokenize=embedder.tokenize,
            limits=RequestLimits(
                max_message_bytes=config.max_message_bytes, max_text_bytes=config.max_text_bytes
            ),
            reply_to_pattern=config.reply_to_pattern,
            default_reply_topic=config.results_topic,
            max_kept_value_bytes=dlq_record_limit,
        )
        # Decoding and tokenizing run here, off the event loop (long texts would stall heartbeats).
        self._decode_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        # Batches cut and not yet through the model (lookup, then inference): while there are
        # fewer than inference threads, nothing is gained by waiting and the open batch goes now.
        self._batches_before_model_done = 0
        self._inference_threads = inference_threads
        self.batcher: MicroBatcher[Job | Rejection] = MicroBatcher(
            window_s=config.batch_window_ms / 1000,
            token_budget=config.token_budget,
            max_size=config.max_batch_size,
            model_idle=lambda: self._batches_before_model_done < self._inference_threads,
        )
        self.offsets: OffsetTracker[TopicPartition] = OffsetTracker()
        connection = kafka_connection_options(config)
        self.cluster = ClusterView(connection, max_topics=config.reply_topics_kept)
        # The one place the delivery guarantee is decided: the strategy object, and the isolation
        # level it needs from the consumer (exactly-once reads only committed requests).
        exactly_once = config.guarantee == "exactly-once"
        self._isolation = READ_COMMITTED if exactly_once else READ_UNCOMMITTED
        self.consumer: AIOKafkaConsumer = create_consumer(config, read_committed=exactly_once)
        self.publisher = ResultPublisher(
            self.cluster,
            results_topic=config.results_topic,
            dlq_topic=config.dlq_topic,
            worker_id=config.worker_id,
            model=manifest.name,
            max_dlq_record_bytes=dlq_record_limit,
        )
        self.delivery: Delivery
        if exactly_once:
            self.delivery = ExactlyOnce(
                consumer=self.consumer,
                publisher=self.publisher,
                cluster=self.cluster,
                metrics=self.metrics,
                group_id=config.group_id,
                new_producer=lambda transactional_id: create_producer(
                    config, transactional_id=transactional_id, record_limit=dlq_record_limit
                ),
                hold=_HoldOnce(hold_marker) if hold_marker else None,
                reply_timeout_s=config.reply_timeout_s,
            )
        else:
            self.delivery = AtLeastOnce(
                create_producer(config, record_limit=dlq_record_limit),
                self.publisher,
                self.cluster,
                self.metrics,
                consumer=self.consumer,
                offsets=self.offsets,
                reply_producer=create_producer(config, record_limit=dlq_record_limit, for_replies=True),
                reply_timeout_s=config.reply_timeout_s,
            )
        client = None
        if config.redis_url:
            client = redis_client(
                config.redis_url,
                username=config.redis_username,
                password=config.redis_password,
                timeout_s=config.redis_timeout_s,
                ssl_ca_certs=config.redis_ssl_cafile,
            )
        self.cache = VectorCache(
            client,
            key_prefix=config.cache_key_prefix,
            model_name=manifest.name,
            ttl_s=config.cache_ttl_s,
            metrics=self.metrics,
        )
        self.processor = BatchProcessor(
            backend=embedder,
            cache=self.cache,
            metrics=self.metrics,
            model_name=manifest.name,
            inference_batch_size=config.inference_batch_size,
            token_budget=config.inference_token_budget,
            inference_threads=inference_threads,
        )
        self.health_server = (
            HealthServer(self.health, self.metrics.exposition, config.metrics_host, config.metrics_port)
            if config.metrics_port
            else None
        )
        self._stopping = asyncio.Event()
        self._fetch_allowed = asyncio.Event()  # cleared while a revoke finishes in-flight work
        self._fetch_allowed.set()
        self._paused = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch_slots = asyncio.Semaphore(inference_threads + CONCURRENT_BATCHES - 1)
        self._commit_wanted = asyncio.Event()
        self._batches_started = 0
        self._owned: set[TopicPartition] = set()  # partitions this worker may process right now
        # Taken (fenced, for exactly-once) but not yet positioned: the fetch loop moves each to its
        # committed offset between two fetches, then owns and resumes it (see _position_taken).
        self._to_position: set[TopicPartition] = set()
        self._rebalances = 0  # rebalance callbacks begun (revokes and assigns)
        self._contract_published = False
        self.metrics.model.info(
            {
                "name": manifest.name,
                "fingerprint": embedder.model_fingerprint,
                "dim": str(manifest.dim),
                "variant": str(getattr(embedder, "variant", config.variant)),
                "device": config.device,
            }
        )

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        background: list[asyncio.Task[None]] = []
        try:
            if self.health_server is not None:  # first: a port in use fails before the group is joined
                await self.health_server.start()
            # Before joining the group: a worker of another fingerprint must never take partitions.
            await self._publish_contract()
            await self.cluster.start()
            await self.delivery.start()
            self.consumer.subscribe([self.config.requests_topic], listener=_RebalanceListener(self))
            await self.consumer.start()
            log.info(
                "worker %s started: group %s, topic %s, model %s (%s), %s",
                self.config.worker_id,
                self.config.group_id,
                self.config.requests_topic,
                self.model.name,
                self.model.fingerprint[:12],
                self.config.guarantee,
            )
            background = [
                asyncio.create_task(watch_event_loop(self.metrics.event_loop_lag), name="loop-lag"),
                asyncio.create_task(self._health_loop(), name="health-loop"),
            ]
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
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._close()

    async def _publish_contract(self) -> None:
        """Publishes the model contract clients hash with; refuses (ContractMismatch) when the
        fleet already serves another fingerprint of this model, unless told to replace it.
        Without Redis there is nothing to check against: the worker starts (the cache fails open)."""
        if not await self.cache.ping():
            return  # published by the health loop once the cache answers (clients need it)
        published = await self.cache.published_fingerprint(self.model.name)
        if published is not None and published != self.model.fingerprint:
            if self.config.on_contract_mismatch != "replace":
                raise ContractMismatch(
                    f"the fleet serves model {self.model.name} with serving fingerprint "
                    f"{published[:12]}..., this worker {self.model.fingerprint[:12]}... (variant "
                    f"{self.config.variant}, bundle {self.config.model}): clients compute content "
                    "hashes from the published contract, so one fleet serves one fingerprint. "
                    "Start this worker with the fleet's variant and bundle, or, to move the fleet "
                    "to this one, start it with EMBEDFLEET_ON_CONTRACT_MISMATCH=replace and stop "
                    "the old workers"
                )
            log.warning(
                "replacing the published contract of %s (fingerprint %s... -> %s...): stop the "
                "workers that serve the old one",
                self.model.name,
                published[:12],
                self.model.fingerprint[:12],
            )
        await self.cache.publish_model(self.model.name, self.model.redis_fields(max_tokens=self._max_tokens))
        self._contract_published = True

    def stop(self) -> None:
        """Begin a graceful stop: no more fetching; in-flight work is finished and committed."""
        if not self._stopping.is_set():
            log.info("stopping: draining in-flight work")
            self.health.stopping = True
            self.metrics.ready.set(0)
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
        await self.delivery.close()
        with contextlib.suppress(Exception):
            await self.cluster.close()
        await self.cache.close()
        self.processor.close()
        self._decode_executor.shutdown(wait=True)
        if self.health_server is not None:
            await self.health_server.stop()
        log.info("worker %s stopped", self.config.worker_id)

    # --- fetch loop ----------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            await self._fetch_allowed.wait()
            self._apply_backpressure()
            if self._to_position:
                await self._position_taken()
            fetch = asyncio.ensure_future(
                self.consumer.getmany(timeout_ms=100, max_records=FETCH_MAX_RECORDS)
            )
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
            except Exception as exc:
                disposition = classify(exc)  # worker.failures: the one policy
                if disposition is FATAL:  # the worker's own credentials or configuration
                    self.fatal = self.fatal or WorkerFatal(f"fetching failed: {describe(exc)}")
                    self.stop()
                    break
                if disposition is TRANSIENT:
                    # An outage: count it, back off, retry; nothing was tracked, so nothing is
                    # lost (the records are fetched again).
                    self.metrics.fetch_errors.inc()
                    log.warning("fetch failed (%s); retrying in 1s", describe(exc))
                    await asyncio.sleep(1.0)
                    continue
                # Per-record: raised while aiokafka unpacked a record (see worker.salvage).
                await self._salvage(exc)
                continue
            await self._take(self._owned_records(fetched))

    def _owned_records(
        self, fetched: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]
    ) -> list[ConsumerRecord[Any, Any]]:
        """The fetched records of the partitions this worker owns. Others are dropped, and nothing
        is lost by it: a partition no longer assigned is read by its new owner from the committed
        offset, and one being taken (aiokafka fetches a new assignment before the rebalance
        callback has fenced the previous owner, from a position that may be stale by then) is
        positioned at its committed offset by _position_taken before it is owned."""
        return [record for tp, batch in fetched.items() if tp in self._owned for record in batch]

    async def _position_taken(self) -> None:
        """Moves each taken partition to its committed offset, then owns and resumes it. Runs in
        the fetch loop between two fetches, so no fetch straddles the move: every record fetched
        from then on comes from the committed offset on. A rebalance during the move (its awaits)
        leaves the partition to the next round: the move may have applied to the old assignment."""
        for tp in sorted(self._to_position, key=lambda tp: (tp.topic, tp.partition)):
            if tp not in self.consumer.assignment():  # revoked meanwhile
                self._to_position.discard(tp)
                continue
            rebalances = self._rebalances
            try:
                committed = await self.consumer.committed(tp)
                if rebalances != self._rebalances:
                    return
                if committed is None:
                    await self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)
                if rebalances != self._rebalances:
                    return
            except IllegalStateError:  # no longer assigned: a rebalance is under way
                return
            except KafkaError as exc:
                log.warning("could not read the committed offset of %s (%s); retrying", tp, exc)
                await asyncio.sleep(1.0)
                return
            self._to_position.discard(tp)
            self._owned.add(tp)
            if not self._paused:
                self.consumer.resume(tp)

    async def _take(self, records: list[ConsumerRecord[Any, Any]], extra: Sequence[Rejection] = ()) -> None:
        if not records and not extra:
            return
        value_bytes = 0
        for record in records:
            value_bytes += len(record.value or b"")
            size = (
                len(record.value or b"")
                + len(record.key or b"")
                + RECORD_OVERHEAD_BYTES
                + sum(len(k) + len(v or b"") for k, v in record.headers or ())
            )
            self.offsets.track(TopicPartition(record.topic, record.partition), record.offset, size)
        self._observe_in_flight()
        if len(records) <= INLINE_DECODE_RECORDS and value_bytes <= INLINE_DECODE_BYTES:
            # A few small records (low load): decoding them here costs less than the hop to the
            # decode thread and back, which waits for the GIL while the loop is busy.
            items = self.decoder.decode(records)
        else:
            loop = asyncio.get_running_loop()
            items = await loop.run_in_executor(self._decode_executor, self.decoder.decode, records)
        # Rejections travel in the batches too, so every record is answered in fetch order
        # (exactly-once commits each batch's offsets with its results).
        for item in [*items, *extra]:
            self.batcher.add(item, len(item.tokens.ids) if isinstance(item, Job) else 1)
        if records:
            self._observe_lag(records)

    async def _salvage(self, error: Exception) -> None:
        """getmany failed on a record it cannot unpack: find it, hand over the good records before
        it and a rejection for it, and move its partition past it (worker.salvage)."""
        log.warning(
            "the Kafka client could not unpack a fetched record (%s: %s); locating it",
            type(error).__name__,
            error,
        )

        async def position_of(tp: TopicPartition) -> int | None:
            return self.offsets.position(tp)

        try:
            found = await salvage(
                self.consumer,
                self.cluster,
                [tp for tp in self.consumer.assignment() if tp in self._owned],
                position_of,
                max_bytes=self.config.max_message_bytes + (64 << 10),
                isolation_level=self._isolation,
                max_expanded_bytes=max_expanded_bytes(self.config),
            )
        except Exception as exc:  # never fatal: the next fetch fails the same way and we try again
            log.warning(
                "could not locate the unreadable record yet (%s: %s); retrying in 1s",
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, KafkaError),
            )
            await asyncio.sleep(1.0)
            return
        if not found.unreadable:
            log.warning("no unreadable record found; fetching again in 1s")
            await asyncio.sleep(1.0)
            return
        rejections = []
        for unreadable in found.unreadable:
            self.metrics.unreadable_records.inc()
            self.offsets.track(
                unreadable.tp, unreadable.offset, RECORD_OVERHEAD_BYTES, next_offset=unreadable.next_offset
            )
            rejections.append(self.decoder.reject_unreadable(unreadable))
        await self._take(found.records, rejections)

    def _observe_in_flight(self) -> None:
        self.metrics.in_flight.set(self.offsets.in_flight)
        self.metrics.in_flight_bytes.set(self.offsets.in_flight_bytes)

    def _apply_backpressure(self) -> None:
        count, size = self.offsets.in_flight, self.offsets.in_flight_bytes
        assignment = self.consumer.assignment()
        if not self._paused and (
            count >= self.config.max_in_flight or size >= self.config.max_in_flight_bytes
        ):
            self.consumer.pause(*assignment)
            self._paused = True
        elif (
            self._paused
            and count < self.config.max_in_flight // 2
            and size < self.config.max_in_flight_bytes // 2
        ):
            self.consumer.resume(*[tp for tp in assignment if tp in self._owned])
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
        self._batches_before_model_done += 1
        released = False

        def release_slot(_: object = None) -> None:
            nonlocal released
            if not released:
                released = True
                self._batches_before_model_done -= 1
                self._batch_slots.release()
                self.batcher.wake()

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
            # A bug: nothing was committed for these records, so they will be redelivered; stop
            # rather than keep committing around a hole, and exit non-zero.
            if isinstance(task.exception(), WorkerFatal):
                log.error("%s; stopping the worker", task.exception())
            else:
                log.error("pipeline task failed; stopping the worker", exc_info=task.exception())
            self.fatal = self.fatal or task.exception()
            self.stop()

    async def _process(
        self, items: list[Job | Rejection], sequence: int, model_done: Callable[[], None]
    ) -> None:
        jobs = [i for i in items if isinstance(i, Job)]
        refused = [i for i in items if isinstance(i, Rejection)]  # by the decoder
        try:
            outcome = await self.processor.process(jobs) if jobs else BatchOutcome()
        except Exception as exc:  # unclassified, so per-record (worker.failures): answer them all
            log.error(
                "the pipeline failed on a batch of %d; answering internal_error", len(jobs), exc_info=True
            )
            self.metrics.pipeline_failures.inc()
            outcome = BatchOutcome(failures=[_internal_error(job, exc) for job in jobs])
        finally:
            model_done()
        rejections = [*refused, *outcome.failures]
        try:
            delivered = await self.delivery.deliver(sequence, BatchWork(items, outcome.results, rejections))
        except WorkerFatal:
            raise
        except Exception as exc:
            if classify(exc) is FATAL:
                raise WorkerFatal(describe(exc)) from exc
            # Unclassified: per-record. The batch's records are answered internal_error instead;
            # if even that cannot be published, the task fails and the worker stops uncommitted.
            log.error("publishing a batch failed unexpectedly; answering internal_error", exc_info=True)
            self.metrics.pipeline_failures.inc()
            outcome = BatchOutcome(
                failures=[i if isinstance(i, Rejection) else _internal_error(i, exc) for i in items]
            )
            delivered = await self.delivery.deliver(sequence, BatchWork(items, [], outcome.failures))
            refused = []
        if delivered.lost:
            self._lose(delivered.lost)
        self._count(outcome, refused, delivered)
        spans: dict[int, list[int]] = {}
        for item in items:
            tp = TopicPartition(item.source.topic, item.source.partition)
            if tp in delivered.lost:
                continue
            self.offsets.done(tp, item.source.offset)
            span = spans.setdefault(item.source.partition, [item.source.offset, item.source.offset])
            span[0], span[1] = min(span[0], item.source.offset), max(span[1], item.source.offset)
        self._observe_in_flight()
        self._commit_wanted.set()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch done",
                extra={
                    "batch_size": len(items),
                    "results": len(outcome.results),
                    "rejected": len(rejections),
                    "cached": sum(r.cached for _, r in outcome.results),
                    "offsets": {str(p): f"{lo}-{hi}" for p, (lo, hi) in sorted(spans.items())},
                },
            )

    def _count(self, outcome: BatchOutcome, refused: list[Rejection], delivered: Delivered) -> None:
        """Every request's outcome is counted here, once: served (cached, deduplicated, computed),
        failed in the model, or rejected (by the decoder, or while publishing: reply topic gone);
        every error result's dead letter by its code; end-to-end latency of the answered."""
        for label, count in outcome.served.items():
            self.metrics.requests.labels(label).inc(count)
        self.metrics.requests.labels("failed").inc(len(outcome.failures))
        self.metrics.requests.labels("rejected").inc(len(refused) + len(delivered.rejected))
        for rejection in [*refused, *outcome.failures, *delivered.rejected]:
            self.metrics.dlq.labels(rejection.error.code.value).inc()
        now = time.time()
        gone = {(r.source.partition, r.source.offset) for r in delivered.rejected}
        for job, _ in outcome.results:
            if (job.source.partition, job.source.offset) not in gone:
                self.metrics.end_to_end_seconds.observe(max(0.0, now - job.source.timestamp_ms / 1000))

    def _lose(self, partitions: set[TopicPartition]) -> None:
        """Partitions another worker owns now (fenced): drop their queued work and pause them;
        the group's next rebalance hands them out properly."""
        self._owned -= partitions
        self.batcher.discard(
            lambda item: TopicPartition(item.source.topic, item.source.partition) in partitions
        )
        self.offsets.forget(partitions)
        with contextlib.suppress(Exception):
            self.consumer.pause(*[tp for tp in partitions if tp in self.consumer.assignment()])
        log.warning(
            "gave up partitions %s (fenced by their new owner)", sorted(tp.partition for tp in partitions)
        )

    # --- commits, health and rebalances --------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Commits progress at most every COMMIT_INTERVAL_S: results are already acknowledged when
        their offsets become committable, so a later commit only widens the redelivery window."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self._commit()
            await asyncio.sleep(COMMIT_INTERVAL_S)

    async def _commit(self) -> None:
        self._observe_in_flight()
        await self.delivery.commit()

    async def _health_loop(self) -> None:
        """Keeps /readyz and embedfleet_ready truthful: Kafka answering, the group joined (a
        member that lost its partitions to a session timeout is not ready), Redis up or degraded."""
        while True:
            self.health.kafka_reachable = await self.cluster.probe()
            self.health.cache_ok = not self.cache.enabled or await self.cache.ping()
            if self.cache.enabled and self.health.cache_ok and not self._contract_published:
                # Redis was away at start: clients cannot compute keys without the contract.
                try:
                    await self._publish_contract()
                except ContractMismatch as exc:
                    self.fatal = self.fatal or WorkerFatal(str(exc))
                    self.stop()
                except Exception as exc:  # the cache fails open; try again next round
                    log.warning("could not publish the model contract yet (%s)", describe(exc))
            self.metrics.ready.set(1 if self.health.ready else 0)
            reclaim = self.delivery.reclaimable(set(self.consumer.assignment()))
            if reclaim:
                log.info(
                    "taking back partitions %s (still assigned here after a fence or a failed take)",
                    sorted(tp.partition for tp in reclaim),
                )
                await self._assign(reclaim)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish what is already running for the revoked partitions, drop what has not started
        (uncommitted, so the new owner processes it once), commit, and let them go. Dropping keeps
        the revoke short: the group waits for it (rebalance_timeout_ms) before moving on."""
        self._rebalances += 1
        self.health.group_joined = False
        self.metrics.ready.set(0)
        if not revoked:
            return
        self._fetch_allowed.clear()
        try:
            lost = set(revoked)
            dropped = self.batcher.discard(
                lambda item: TopicPartition(item.source.topic, item.source.partition) in lost
            )
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            # Polling is fine here: a revoke is rare and its wait is bounded by the running batches.
            while self.offsets.in_flight_of(revoked) > len(dropped) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            self._owned -= lost
            self._to_position -= lost
            await self._commit()
            await self.delivery.revoked(revoked)
            self.offsets.forget(revoked)
            for tp in revoked:
                with contextlib.suppress(KeyError):
                    self.metrics.lag.remove(tp.topic, str(tp.partition))
            log.info(
                "partitions revoked: %s (%d queued requests left to the new owner)",
                sorted(tp.partition for tp in revoked),
                len(dropped),
            )
        finally:
            self._fetch_allowed.set()

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self._rebalances += 1
        self.metrics.assignments.inc()
        await self._assign(assigned)
        self.health.group_joined = True
        self.health.details["partitions"] = ",".join(
            str(tp.partition)
            for tp in sorted(self.consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        )
        self.metrics.ready.set(1 if self.health.ready else 0)
        self._paused = False
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))

    async def _assign(self, partitions: list[TopicPartition]) -> None:
        """Takes partitions (exactly-once: fences their previous owner); the fetch loop then
        positions them at their committed offset and owns them (_position_taken). Until then
        they stay paused: aiokafka already fetches a new assignment."""
        with contextlib.suppress(Exception):
            self.consumer.pause(*partitions)
        failed = await self.delivery.assigned(partitions)
        self._to_position |= {tp for tp in partitions if tp not in failed}


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
    worker = Worker(
        config,
        embedder,
        inference_threads=inference_threads,
        dlq_record_limit=dlq_limit,
        hold_marker=hold_marker,
    )
    # Everything long-lived is loaded by now (model, tokenizer, clients): keep it out of the
    # collector's scans, and collect young objects less often (every result allocates lists and
    # dicts; the default threshold of 700 ran a collection every few results).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    loop.add_signal_handler(signal.SIGUSR1, log_task_stacks)
    try:
        return await _run_until_stopped(worker, config)
    finally:
        # An embedding process (a test) gets its signals back once the worker has stopped.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(signum)


async def _run_until_stopped(worker: Worker, config: WorkerConfig) -> int:
    """Runs the worker; its exit status (see serve)."""
    try:
        await worker.run()
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
    if isinstance(worker.fatal, WorkerFatal):
        log.error(
            "stopped: %s. This is the worker's own configuration or credentials (see the failure "
            "policy in the README): fix it and start the worker again",
            worker.fatal,
        )
        return 2
    if worker.fatal is not None:
        log.error("stopped after a fatal error: %s: %s", type(worker.fatal).__name__, worker.fatal)
        return 1
    return 0
