"""The worker's runtime: runs the parts ``worker.app.serve`` built, and owns shutdown.

    fetch loop:  worker.intake (Kafka in: own partitions, offsets tracked, decode, batcher)
    batch loop:  batcher -> BatchProcessor (cache, model, cache) -> Delivery -> offsets done
    commit loop: the offsets room commits up to the acknowledged records (at-least-once)
    health loop: Kafka reachable? cache up? contract published? -> /readyz and embedfleet_ready

A consumed record is marked done only when everything it caused is acknowledged, and offsets
never move past a record not done (worker.offsets). On revoke the runtime finishes and commits
what it holds for the revoked partitions; SIGTERM/SIGINT stop fetching, drain every batch, commit
and leave the group. What any failure means is decided by the one policy (worker.failures): no
record, reply topic or outage stops the runtime; only the worker's own configuration (``fatal``,
a WorkerFatal) or a bug that leaves a hole in the offsets does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from aiokafka import ConsumerRebalanceListener, TopicPartition

from schemas import ErrorCode
from worker.batcher import Batch, MicroBatcher
from worker.contract import ContractPublisher
from worker.delivery import BatchWork, Delivered, Delivery
from worker.errors import ContractMismatch
from worker.failures import FATAL, WorkerFatal, classify, describe
from worker.health import HealthServer, HealthState, watch_event_loop
from worker.intake import KafkaIntake
from worker.jobs import Answer, Job, Rejection
from worker.metrics import WorkerMetrics
from worker.offsets import ConsumedOffsets
from worker.pipeline import BatchOutcome

log = logging.getLogger("embedfleet.worker")
# Batches handled at once: one per inference thread in the model, plus one being looked up or
# published; meanwhile new work grows the batcher's open batch.
CONCURRENT_BATCHES = 2
DRAIN_TIMEOUT_S = 120.0
COMMIT_INTERVAL_S = 0.1
HEALTH_INTERVAL_S = 2.0


class GroupConsumer(Protocol):
    """What the runtime asks of the group consumer itself (the intake fetches with it)."""

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...


class Processor(Protocol):
    """The pipeline of one batch (worker.pipeline.BatchProcessor)."""

    async def process(self, jobs: list[Job]) -> BatchOutcome: ...
    def close(self) -> None: ...


class ClusterProbe(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def probe(self, timeout_s: float = 5.0) -> bool: ...


class Cache(Protocol):
    @property
    def enabled(self) -> bool: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class BatchSlots:
    """How many batches run at once, and whether the model is idle: while fewer batches than
    inference threads are between their cut and the model's end, nothing is gained by waiting and
    the batcher's open batch goes at once (MicroBatcher's ``model_idle``)."""

    def __init__(self, inference_threads: int) -> None:
        self._inference_threads = inference_threads
        self.before_model_done = 0
        self.semaphore = asyncio.Semaphore(inference_threads + CONCURRENT_BATCHES - 1)

    def model_idle(self) -> bool:
        return self.before_model_done < self._inference_threads


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this worker is, for its logs."""

    worker_id: str
    group_id: str
    requests_topic: str
    model: str
    fingerprint: str
    guarantee: str


@dataclass(slots=True)
class WorkerParts:
    """Everything the runtime runs, built by ``worker.app.serve`` (or by a test from fakes)."""

    identity: Identity
    consumer: GroupConsumer
    intake: KafkaIntake
    batcher: MicroBatcher[Job | Rejection]
    slots: BatchSlots
    processor: Processor
    delivery: Delivery
    offsets: ConsumedOffsets
    cache: Cache
    cluster: ClusterProbe
    contract: ContractPublisher
    metrics: WorkerMetrics
    health: HealthState
    health_server: HealthServer | None
    decode_executor: Executor


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks to the runtime."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._runtime.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._runtime.on_assigned(list(assigned))


def _source(item: Job | Rejection) -> TopicPartition:
    return TopicPartition(item.source.topic, item.source.partition)


class WorkerRuntime:
    """Runs the fetch, batch, commit and health loops over parts it is handed; owns rebalances
    and shutdown. It builds nothing."""

    def __init__(self, parts: WorkerParts) -> None:
        self._parts = parts
        self._identity = parts.identity
        self._intake = parts.intake
        self._batcher = parts.batcher
        self._slots = parts.slots
        self._delivery = parts.delivery
        self._offsets = parts.offsets
        self._metrics = parts.metrics
        self.health = parts.health
        self.fatal: BaseException | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._commit_wanted = asyncio.Event()
        self._batches_started = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        parts = self._parts
        background: list[asyncio.Task[None]] = []
        try:
            if parts.health_server is not None:  # first: a port in use fails before the group is joined
                await parts.health_server.start()
            # Before joining the group: a worker of another fingerprint must never take partitions.
            await parts.contract.publish()
            await parts.cluster.start()
            await self._delivery.start()
            parts.consumer.subscribe([self._identity.requests_topic], listener=_RebalanceListener(self))
            await parts.consumer.start()
            identity = self._identity
            log.info(
                "worker %s started: group %s, topic %s, model %s (%s), %s",
                identity.worker_id,
                identity.group_id,
                identity.requests_topic,
                identity.model,
                identity.fingerprint[:12],
                identity.guarantee,
            )
            background = [
                asyncio.create_task(watch_event_loop(self._metrics.event_loop_lag), name="loop-lag"),
                asyncio.create_task(self._health_loop(), name="health-loop"),
            ]
            batch_loop = asyncio.create_task(self._batch_loop(), name="batch-loop")
            commit_loop = asyncio.create_task(self._commit_loop(), name="commit-loop")
            try:
                await self._intake.run(self._stopping, answer=self.answer)
            except WorkerFatal as exc:
                self._fail(exc)
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

    def stop(self) -> None:
        """Begin a graceful stop: no more fetching; in-flight work is finished and committed."""
        if not self._stopping.is_set():
            log.info("stopping: draining in-flight work")
            self.health.stopping = True
            self._metrics.ready.set(0)
            self._stopping.set()

    def _fail(self, exc: BaseException) -> None:
        self.fatal = self.fatal or exc
        self.stop()

    async def _drain(self, batch_loop: asyncio.Task[None]) -> None:
        for batch in self._batcher.flush():
            await self._start_batch(batch)
        batch_loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batch_loop
        for batch in self._batcher.flush():  # anything the loop had not picked up
            await self._start_batch(batch)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=DRAIN_TIMEOUT_S)
        await self._offsets.commit()

    async def _close(self) -> None:
        parts = self._parts
        with contextlib.suppress(Exception):
            await parts.consumer.stop()  # leaves the group: the others take over at once
        await self._delivery.close()
        with contextlib.suppress(Exception):
            await parts.cluster.close()
        await parts.cache.close()
        parts.processor.close()
        parts.decode_executor.shutdown(wait=True)
        if parts.health_server is not None:
            await parts.health_server.stop()
        log.info("worker %s stopped", self._identity.worker_id)

    # --- batch loop ----------------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        while True:
            # Room first, then the batch: while the model is busy, the open batch keeps growing
            # and is taken as one larger batch when room frees up.
            await self._slots.semaphore.acquire()
            try:
                batch = await self._batcher.next_batch()
            except BaseException:
                self._slots.semaphore.release()
                raise
            self._launch(batch)

    async def _start_batch(self, batch: Batch[Job | Rejection]) -> None:
        await self._slots.semaphore.acquire()
        self._launch(batch)

    def _launch(self, batch: Batch[Job | Rejection]) -> None:
        """Starts a batch; the caller holds a batch slot. The slot is given back as soon as the
        model is done with the batch, so the next batch is looked up while this one publishes
        (publishing is bounded by max_in_flight instead)."""
        self._metrics.batch_size.observe(len(batch))
        self._metrics.batch_tokens.observe(batch.padded_tokens)
        sequence = self._batches_started
        self._batches_started += 1
        self._slots.before_model_done += 1
        released = False

        def release_slot(_: object = None) -> None:
            nonlocal released
            if not released:
                released = True
                self._slots.before_model_done -= 1
                self._slots.semaphore.release()
                self._batcher.wake()

        generations = self._generations(batch.items)
        task = self._spawn(self._process(batch.items, sequence, release_slot, generations))
        task.add_done_callback(release_slot)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Nothing was committed for these records, so they will be redelivered; stop rather
            # than keep committing around a hole, and exit non-zero.
            if isinstance(task.exception(), WorkerFatal):
                log.error("%s; stopping the worker", task.exception())
            else:
                log.error("pipeline task failed; stopping the worker", exc_info=task.exception())
            self._fail(task.exception() or RuntimeError("pipeline task failed"))

    def answer(self, results: list[Answer]) -> asyncio.Task[None]:
        """Publishes cache hits the intake answered (worker.hits) at once, beside the batches:
        a hit never waits for the window or the model. Done once they are acknowledged."""
        self._metrics.hit_lane_size.observe(len(results))
        sequence = self._batches_started
        self._batches_started += 1
        outcome = BatchOutcome(results=results, served=Counter(cached=len(results)))
        jobs = [job for job, _ in results]
        return self._spawn(self._publish(jobs, outcome, [], sequence, self._generations(jobs)))

    def _generations(self, items: Sequence[Job | Rejection]) -> dict[TopicPartition, int | None]:
        """The offsets room's generation of each partition of a batch, as it is cut: the batch
        belongs to that stretch of ownership (worker.offsets.OffsetTracker.generation)."""
        generations: dict[TopicPartition, int | None] = {}
        tp: TopicPartition | None = None
        for item in items:  # mostly grouped by partition
            source = item.source
            if tp is None or source.partition != tp.partition or source.topic != tp.topic:
                tp = TopicPartition(source.topic, source.partition)
                if tp not in generations:
                    generations[tp] = self._offsets.generation(tp)
        return generations

    async def _process(
        self,
        items: list[Job | Rejection],
        sequence: int,
        model_done: Callable[[], None],
        generations: dict[TopicPartition, int | None],
    ) -> None:
        jobs = [i for i in items if isinstance(i, Job)]
        refused = [i for i in items if isinstance(i, Rejection)]  # by the decoder
        try:
            outcome = await self._parts.processor.process(jobs) if jobs else BatchOutcome()
        except Exception as exc:  # unclassified, so per-record (worker.failures): answer them all
            log.error(
                "the pipeline failed on a batch of %d; answering internal_error", len(jobs), exc_info=True
            )
            self._metrics.pipeline_failures.inc()
            outcome = BatchOutcome(failures=[_internal_error(job, exc) for job in jobs])
        finally:
            model_done()
        await self._publish(items, outcome, refused, sequence, generations)

    async def _publish(
        self,
        items: Sequence[Job | Rejection],
        outcome: BatchOutcome,
        refused: list[Rejection],
        sequence: int,
        generations: dict[TopicPartition, int | None],
    ) -> None:
        """Delivers a batch's outcome (results, and rejections by the decoder or the pipeline),
        then marks its records done: their offsets may be committed. Only under the ownership
        the batch was cut in: a partition revoked and taken back since tracks its records anew."""
        rejections = [*refused, *outcome.failures]
        try:
            delivered = await self._delivery.deliver(
                sequence, BatchWork(items, outcome.results, rejections, generations)
            )
        except WorkerFatal:
            raise
        except Exception as exc:
            if classify(exc) is FATAL:
                raise WorkerFatal(describe(exc)) from exc
            # Unclassified: per-record. The batch's records are answered internal_error instead;
            # if even that cannot be published, the task fails and the worker stops uncommitted.
            log.error("publishing a batch failed unexpectedly; answering internal_error", exc_info=True)
            self._metrics.pipeline_failures.inc()
            outcome = BatchOutcome(
                failures=[i if isinstance(i, Rejection) else _internal_error(i, exc) for i in items]
            )
            delivered = await self._delivery.deliver(
                sequence, BatchWork(items, [], outcome.failures, generations)
            )
            refused = []
        if delivered.lost:
            self._lose(delivered.lost)
        if delivered.stale:
            log.info(
                "dropped a batch's part of partitions %s: cut before they were revoked or fenced, "
                "their records are read again from the committed offset by their owner",
                sorted(tp.partition for tp in delivered.stale),
            )
        self._count(outcome, refused, delivered)
        done = self._offsets.done
        current = {tp: self._offsets.generation(tp) == g for tp, g in generations.items()}
        skip = delivered.lost | delivered.stale
        tp: TopicPartition | None = None
        answered = True
        for item in items:  # mostly grouped by partition: one TopicPartition per group
            source = item.source
            if tp is None or source.partition != tp.partition or source.topic != tp.topic:
                tp = TopicPartition(source.topic, source.partition)
                answered = tp not in skip and current.get(tp, False)
            if answered:
                done(tp, source.offset)
        self._offsets.observe()
        self._commit_wanted.set()
        if log.isEnabledFor(logging.DEBUG):
            spans: dict[int, tuple[int, int]] = {}
            for item in items:
                low, high = spans.get(item.source.partition, (item.source.offset, item.source.offset))
                spans[item.source.partition] = (min(low, item.source.offset), max(high, item.source.offset))
            log.debug(
                "batch done",
                extra={
                    "batch_size": len(items),
                    "results": len(outcome.results),
                    "rejected": len(rejections),
                    "cached": outcome.served["cached"],
                    "offsets": {str(p): f"{lo}-{hi}" for p, (lo, hi) in sorted(spans.items())},
                },
            )

    def _count(self, outcome: BatchOutcome, refused: list[Rejection], delivered: Delivered) -> None:
        """Every request's outcome is counted here, once: served (cached, deduplicated, computed),
        failed in the model, or rejected (by the decoder, or while publishing: reply topic gone);
        every error result's dead letter by its code; end-to-end latency of the answered."""
        metrics = self._metrics
        for label, count in outcome.served.items():
            metrics.requests.labels(label).inc(count)
        metrics.requests.labels("failed").inc(len(outcome.failures))
        metrics.requests.labels("rejected").inc(len(refused) + len(delivered.rejected))
        for rejection in [*refused, *outcome.failures, *delivered.rejected]:
            metrics.dlq.labels(rejection.error.code.value).inc()
        gone = {r.source for r in delivered.rejected}
        stamps = [job.source.timestamp_ms for job, _ in outcome.results if not gone or job.source not in gone]
        if stamps:
            latency = time.time() - np.asarray(stamps, dtype=np.float64) / 1000
            metrics.end_to_end_seconds.observe_many(np.maximum(latency, 0.0))

    def _lose(self, partitions: set[TopicPartition]) -> None:
        """Partitions another worker owns now (fenced): drop their queued work and pause them;
        the group's next rebalance hands them out properly."""
        self._intake.lose(partitions)
        self._batcher.discard(lambda item: _source(item) in partitions)
        self._offsets.forget(partitions)
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
            await self._offsets.commit()
            await asyncio.sleep(COMMIT_INTERVAL_S)

    async def _health_loop(self) -> None:
        """Keeps /readyz and embedfleet_ready truthful: Kafka answering, the group joined (a
        member that lost its partitions to a session timeout is not ready), Redis up or degraded;
        publishes the contract once the cache answers if it could not at start."""
        parts = self._parts
        while True:
            self.health.kafka_reachable = await parts.cluster.probe()
            self.health.cache_ok = not parts.cache.enabled or await parts.cache.ping()
            if parts.cache.enabled and self.health.cache_ok and not parts.contract.published:
                # Redis was away at start: clients cannot compute keys without the contract.
                try:
                    await parts.contract.publish()
                except ContractMismatch as exc:
                    self._fail(WorkerFatal(str(exc)))
                except Exception as exc:  # the cache fails open; try again next round
                    log.warning("could not publish the model contract yet (%s)", describe(exc))
            self._metrics.ready.set(1 if self.health.ready else 0)
            reclaim = self._delivery.reclaimable(set(parts.consumer.assignment()))
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
        self._intake.rebalance_begins()
        self.health.group_joined = False
        self._metrics.ready.set(0)
        if not revoked:
            return
        async with self._intake.fetching_held():
            lost = set(revoked)
            dropped = self._batcher.discard(lambda item: _source(item) in lost)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            # Polling is fine here: a revoke is rare and its wait is bounded by the running batches.
            while self._offsets.in_flight_of(revoked) > len(dropped) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            self._intake.release(revoked)
            await self._offsets.commit()
            await self._delivery.revoked(revoked)
            self._offsets.forget(revoked)
            for tp in revoked:
                with contextlib.suppress(KeyError):
                    self._metrics.lag.remove(tp.topic, str(tp.partition))
            log.info(
                "partitions revoked: %s (%d queued requests left to the new owner)",
                sorted(tp.partition for tp in revoked),
                len(dropped),
            )

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self._intake.rebalance_begins()
        self._metrics.assignments.inc()
        await self._assign(assigned)
        self.health.group_joined = True
        self.health.details["partitions"] = ",".join(
            str(tp.partition)
            for tp in sorted(self._parts.consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        )
        self._metrics.ready.set(1 if self.health.ready else 0)
        self._intake.assignment_began()
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))

    async def _assign(self, partitions: list[TopicPartition]) -> None:
        """Takes partitions (exactly-once: fences their previous owner); the intake then positions
        them at their committed offset and owns them. Until then they stay paused: aiokafka
        already fetches a new assignment."""
        self._intake.hold(partitions)
        failed = await self._delivery.assigned(partitions)
        self._intake.taken([tp for tp in partitions if tp not in failed])


def _internal_error(job: Job, exc: BaseException) -> Rejection:
    return job.rejected(ErrorCode.INTERNAL_ERROR, f"the worker failed on this batch: {describe(exc)}")
