"""Prometheus metrics of one worker (base units, ``_total`` counters, ``_seconds`` durations).

Each worker owns its registry (no global state): tests can run several workers in one process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class BulkHistogram(Collector):
    """A histogram observed a batch of values at a time (one vectorised call), exposed exactly as
    prometheus_client's Histogram is. Latency is observed for every result; at tens of thousands
    of results a second, one ``Histogram.observe`` each (a lock and a bucket search in Python)
    was a noticeable share of a cache hit's cost. Event-loop use only (no lock)."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = np.array(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: npt.ArrayLike) -> None:
        array = np.asarray(values, dtype=np.float64)
        # Bucket i counts values <= bound i (Prometheus' "le"): the first bound >= the value.
        self._counts += np.bincount(np.searchsorted(self._bounds, array), minlength=len(self._counts))
        self._sum += float(array.sum())

    def collect(self) -> Iterable[Metric]:
        cumulative = np.cumsum(self._counts).tolist()
        labels = [*(_bound_label(b) for b in self._bounds.tolist()), "+Inf"]
        yield HistogramMetricFamily(
            self._name,
            self._documentation,
            buckets=list(zip(labels, cumulative, strict=True)),
            sum_value=self._sum,
        )


def _bound_label(bound: float) -> str:
    """As prometheus_client writes a bucket bound (1.0 -> "1.0", 0.001 -> "0.001")."""
    return repr(float(bound))


class WorkerMetrics:
    """The worker's Prometheus metrics, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None, *, model: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        # Several models, one fleet: every series a worker exposes carries the model it serves, so
        # dashboards and alerts can split (or sum) by model without relabelling in Prometheus.
        self._exposed: CollectorRegistry | _ConstantLabels = (
            _ConstantLabels(self.registry, {"model": model}) if model else self.registry
        )
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "embedfleet_requests",
            "Requests handled, by outcome: computed (by the model), cached "
            "(served from Redis or a duplicate in the same batch), rejected (bad input), failed "
            "(inference error)",
            ["outcome"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "embedfleet_cache_lookups",
            "Distinct keys looked up in the cache (the worker's hot entries, then Redis)",
            registry=r,
        )
        self.cache_hits = Counter(
            "embedfleet_cache_hits", "Distinct keys found in the cache (hot entries or Redis)", registry=r
        )
        self.hot_cache_hits = Counter(
            "embedfleet_hot_cache_hits",
            "Of the cache hits, those served from the worker's own hot entries (no Redis round trip)",
            registry=r,
        )
        self.cache_invalid = Counter(
            "embedfleet_cache_invalid_entries",
            "Cache entries found but not served (another model or "
            "width, wrong size, non-finite numbers): treated as misses and overwritten",
            registry=r,
        )
        self.cache_errors = Counter(
            "embedfleet_cache_errors", "Redis operations that failed (fail open)", ["operation"], registry=r
        )
        self.batch_duplicates = Counter(
            "embedfleet_batch_duplicates",
            "Requests answered by another identical request of the same batch (computed once)",
            registry=r,
        )
        self.computed_texts = Counter("embedfleet_computed_texts", "Texts run through the model", registry=r)
        self.truncated_texts = Counter(
            "embedfleet_truncated_texts", "Texts cut to the model's maximum tokens", registry=r
        )
        self.long_inputs = Counter(
            "embedfleet_long_inputs",
            "Long-input requests answered from their windows, by mode (pool, chunks)",
            ["mode"],
            registry=r,
        )
        self.windows = Counter(
            "embedfleet_windows",
            "Windows of long-input requests (each looked up, and computed on a miss, as a text)",
            registry=r,
        )
        self.batch_size = Histogram(
            "embedfleet_batch_size", "Requests per micro-batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.hit_lane_size = Histogram(
            "embedfleet_hit_lane_size",
            "Cache hits answered at intake per fetch, published beside the micro-batches",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "embedfleet_batch_tokens",
            "Padded tokens (longest x count) per micro-batch",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "embedfleet_inference_duration_seconds",
            "Model time per micro-batch (its cache misses)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = BulkHistogram(
            "embedfleet_end_to_end_latency_seconds",
            "From the request's Kafka timestamp to its result acknowledged",
            LATENCY_BUCKETS,
            r,
        )
        self.in_flight = Gauge(
            "embedfleet_in_flight_messages", "Messages consumed and not yet committed", registry=r
        )
        self.paused = Gauge("embedfleet_partitions_paused", "Partitions paused for backpressure", registry=r)
        self.lag = Gauge(
            "embedfleet_consumer_lag",
            "Messages behind the end of each assigned partition",
            ["topic", "partition"],
            registry=r,
        )
        self.dlq = Counter(
            "embedfleet_dlq_messages",
            "Messages sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.event_loop_lag = Histogram(
            "embedfleet_event_loop_lag_seconds",
            "How late the event loop wakes a 100 ms timer: a "
            "blocked loop misses Kafka heartbeats and health probes",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_retries = Counter(
            "embedfleet_publish_retries",
            "Batches whose results had to be sent again (broker outage)",
            registry=r,
        )
        self.producers_replaced = Counter(
            "embedfleet_producers_replaced",
            "Idempotent producers replaced because the broker lost their sequence state (an outage)",
            registry=r,
        )
        self.publish_failures = Counter(
            "embedfleet_publish_failures",
            "Sends that failed, by the failure policy's disposition (per_record, transient, fatal)",
            ["disposition"],
            registry=r,
        )
        self.dlq_write_failures = Counter(
            "embedfleet_dlq_write_failures",
            "Dead letters that could not be written after retries (logged, given up)",
            registry=r,
        )
        self.pipeline_failures = Counter(
            "embedfleet_pipeline_failures",
            "Batches the pipeline failed on unexpectedly (answered with internal_error, dead-lettered)",
            registry=r,
        )
        self.unreadable_records = Counter(
            "embedfleet_unreadable_records",
            "Records the Kafka client could not unpack (dead-lettered and skipped)",
            registry=r,
        )
        self.in_flight_bytes = Gauge(
            "embedfleet_in_flight_bytes", "Bytes of messages consumed and not yet committed", registry=r
        )
        self.fenced_partitions = Counter(
            "embedfleet_fenced_partitions",
            "Partitions given up because another worker's producer fenced this one (exactly-once)",
            registry=r,
        )
        self.assignments = Counter(
            "embedfleet_assignments",
            "Partition assignments received (one per rebalance this worker "
            "takes part in): a rise without scaling means members are being expelled",
            registry=r,
        )
        self.fetch_errors = Counter(
            "embedfleet_fetch_errors", "Fetches from Kafka that failed (retried)", registry=r
        )
        self.commits = Counter("embedfleet_commits", "Offset commits", ["outcome"], registry=r)
        self.model = Info("embedfleet_model", "The model this worker serves", registry=r)
        self.ready = Gauge(
            "embedfleet_ready",
            "1 when /readyz answers 200: model loaded, group joined, Kafka reachable, not stopping",
            registry=r,
        )
        self.cache_up = Gauge("embedfleet_cache_up", "1 while the Redis cache answers", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self._exposed)


class _ConstantLabels:
    """A registry's metrics with constant labels added to every sample (prometheus-client has no
    registry-wide constant labels); a label a metric sets itself wins."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._registry = registry
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s._replace(labels={**self._labels, **s.labels}) for s in metric.samples]
            yield metric
