"""The gateway's Prometheus metrics (its own registry: one per process, no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From well under a cache hit (~1 ms) to the default deadline (30 s).
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "embedfleet_gateway_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "embedfleet_gateway_request_seconds",
            "Time from a request's arrival to its answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.texts = Counter(
            "embedfleet_gateway_texts",
            "Texts of embedding requests by outcome: cached (answered from Redis by the gateway), "
            "fleet (answered by a worker), failed, timed_out",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "embedfleet_gateway_rejected",
            "Requests refused before reaching the fleet, by reason (unauthorized, overloaded, too_large)",
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
