"""Every metric the dashboard and the rules query is one a running worker really exports.

The names are read from the /metrics of the real workers of the `fleet` fixture (two
`embedfleet worker` processes on the local stack) and of a live `embedfleet gateway` in front of
them, not from the metrics modules: a renamed metric, a changed suffix or a dropped collector
fails here instead of in an empty graph.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

from tests.deploy.deployfiles import dashboard_queries, metric_names, recorded_names, rules
from tests.fleet import Fleet

# Metrics the queries may use that are not the worker's, each with where it comes from.
NOT_FROM_THE_WORKER = {
    "up": "Prometheus itself, per scrape target",
    "DCGM_FI_DEV_FB_USED": "NVIDIA dcgm-exporter (GPU frame buffer used, MiB)",
    "DCGM_FI_DEV_FB_FREE": "NVIDIA dcgm-exporter (GPU frame buffer free, MiB)",
    "kafka_consumergroup_lag": "kafka-exporter (consumer-group lag as the broker sees it)",
    "keda_scaler_metrics_value": "KEDA operator (the value its Kafka scaler computed)",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_names(exposition: str) -> set[str]:
    """Metric names in a Prometheus text exposition: every sample's name, plus the names declared
    by `# TYPE` lines (a labelled metric has no sample until its first observation)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
            elif kind == "summary":
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES[1:])
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def used_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (dashboard panel or rule)."""
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"dashboard: {where}")
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"rule: {rule.get('alert') or rule.get('record')}")
    return used


def test_the_name_extractor() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(embedfleet_batch_size_bucket{job=~"$job",'
        'le!="+Inf"}[$__rate_interval]))) / on () group_left sum(embedfleet:x:rate5m) > 1.2e9 '
        "or vector(0) and up offset 5m"
    )
    assert metric_names(expr) == {"embedfleet_batch_size_bucket", "embedfleet:x:rate5m", "up"}


def test_the_exposition_parser() -> None:
    text = (
        "# HELP a_total x\n# TYPE a_total counter\n# TYPE h histogram\n"
        'h_bucket{le="1"} 0\n# TYPE g gauge\ng{p="1"} 2\n'
    )
    assert exported_names(text) == {"a_total", "h", "h_bucket", "h_sum", "h_count", "g"}


async def test_every_queried_metric_is_exported_by_a_live_worker(fleet: Fleet) -> None:
    exported: set[str] = set()
    for worker in fleet.workers:
        status, text = await asyncio.to_thread(worker.http, "/metrics")
        assert status == 200, text
        exported |= exported_names(text)
    # Sanity: the parse found the worker's own metrics, not an empty page.
    assert {"embedfleet_ready", "embedfleet_requests_total", "process_resident_memory_bytes"} <= exported
    gateway = fleet.start_gateway()
    try:
        await gateway.wait_ready()
        body = json.dumps({"model": "all-MiniLM-L6-v2", "input": ["metric names"]}).encode()
        answer = await asyncio.to_thread(
            urllib.request.urlopen,
            urllib.request.Request(gateway.url + "/v1/embeddings", data=body, method="POST"),
        )
        assert answer.status == 200
        status, text = await asyncio.to_thread(gateway.http, "/metrics")
        assert status == 200, text
        exported |= exported_names(text)
    finally:
        gateway.stop()
    assert {"embedfleet_gateway_requests_total", "embedfleet_gateway_request_seconds_bucket"} <= exported

    recorded = recorded_names()
    used = used_names()
    assert used, "no metric names found in the dashboard and the rules"
    unknown = {
        name: sorted(where)
        for name, where in used.items()
        if name not in exported and name not in recorded and name not in NOT_FROM_THE_WORKER
    }
    assert not unknown, (
        "queried but not exported by `embedfleet worker` (nor recorded by rules.yaml, nor listed in "
        f"NOT_FROM_THE_WORKER): {unknown}"
    )
    # A recording rule named in a query must be one rules.yaml defines (typos otherwise vanish).
    undefined = {name for name in used if ":" in name and name not in recorded}
    assert not undefined, f"recording rules used but not defined: {sorted(undefined)}"
