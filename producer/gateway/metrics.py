"""The gateway's Prometheus metrics (its own registry: one per process, no global state)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request

# From well under a cache hit (~1 ms) to the default deadline (30 s).
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def model_of(request: Request) -> str:
    """The ``model`` label of a request: the served model it asked for, once its handler knows it
    (``note_model``); empty before that, for routes without a model and for unknown models, so a
    client's arbitrary names never become series."""
    return str(getattr(request.state, "model", ""))


def note_model(request: Request, model: str) -> None:
    request.state.model = model


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "embedfleet_gateway_requests",
            "HTTP requests answered, by route, status code and model (empty: no model, or one "
            "this gateway does not serve)",
            ["route", "status", "model"],
            registry=r,
        )
        self.latency = Histogram(
            "embedfleet_gateway_request_seconds",
            "Time from a request's arrival to its answer, by route and model",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.texts = Counter(
            "embedfleet_gateway_texts",
            "Texts of embedding requests by outcome: cached (answered from Redis by the gateway), "
            "fleet (answered by a worker), failed, timed_out; by model",
            ["outcome", "model"],
            registry=r,
        )
        self.rejected = Counter(
            "embedfleet_gateway_rejected",
            "Requests refused before reaching the fleet, by reason (unauthorized, overloaded, "
            "too_large, slow_body)",
            ["reason"],
            registry=r,
        )
        self.outstanding = Gauge(
            "embedfleet_gateway_outstanding_texts",
            "Texts sent to the fleet and not yet answered (bounded by EMBEDFLEET_GATEWAY_MAX_OUTSTANDING)",
            registry=r,
        )
        self.ready = Gauge(
            "embedfleet_gateway_ready",
            "1 when connected to Kafka and the model contract is known",
            registry=r,
        )
        self.reaped_topics = Counter(
            "embedfleet_gateway_reaped_reply_topics",
            "Reply topics of dead gateways this gateway deleted",
            registry=r,
        )
        self.slow_connections = Counter(
            "embedfleet_gateway_slow_connections_closed",
            "Connections closed because their request headers did not arrive within "
            "EMBEDFLEET_GATEWAY_READ_TIMEOUT_S (or grew past the header limit), by reason",
            ["reason"],
            registry=r,
        )

    def watch_replies(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Exports the reply reader's counters (``Client.reply_counts``), read at each scrape."""
        self.registry.register(_ReplyCollector(counts))


class _ReplyCollector(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        counts = dict(self._counts())
        restarts = counts.pop("restarts", 0)
        skipped = CounterMetricFamily(
            "embedfleet_gateway_reply_records_skipped",
            "Records on this gateway's reply topic that answered no request, by reason: unreadable "
            "(the Kafka client cannot unpack it), undecodable (not a result), mismatched (a waiting "
            "id with the wrong content hash or width)",
            labels=["reason"],
        )
        for reason, count in sorted(counts.items()):
            skipped.add_metric([reason], count)
        yield skipped
        yield CounterMetricFamily(
            "embedfleet_gateway_reply_reader_restarts",
            "Times the reply reader failed and was started again",
            value=restarts,
        )
