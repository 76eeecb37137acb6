"""deploy/prometheus/rules.yaml: valid for promtool, unit-tested, complete; the dashboard's and the
compose Prometheus's files valid too."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import prometheusrule
from tests.deploy.deployfiles import (
    COMPOSE_PROMETHEUS,
    RULES,
    RULES_TEST,
    alerts,
    dashboard_queries,
    grafana_to_promql,
    load_yaml,
    require_promtool,
)

REQUIRED_ALERTS = (
    "EmbedfleetHighLatencyP99",
    "EmbedfleetLowCacheHitRate",
    "EmbedfleetConsumerLagGrowing",
    "EmbedfleetConsumerBacklog",
    "EmbedfleetDLQRate",
    "EmbedfleetNoResultsWhileRequestsArrive",
    "EmbedfleetWorkerDown",
    "EmbedfleetWorkerNotReady",
    "EmbedfleetRedisDown",
    "EmbedfleetHighMemory",
    "EmbedfleetGPUMemoryHigh",
    "EmbedfleetGatewayErrorRate",
    "EmbedfleetGatewayHighLatencyP99",
)
SEVERITIES = {"critical", "warning", "info"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", "--syntax-only", str(COMPOSE_PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each dashboard query, Grafana variables substituted, as a recording rule promtool parses."""
    queries = dashboard_queries()
    assert queries
    group: dict[str, Any] = {
        "name": "dashboard",
        "rules": [
            {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
            for i, (_, expr) in enumerate(queries)
        ],
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", REQUIRED_ALERTS)
def test_alert_has_for_severity_and_annotations(name: str) -> None:
    rule = alerts().get(name)
    assert rule is not None, f"{name} missing from {RULES}"
    assert rule.get("for"), f"{name}: no `for:` duration (a single bad scrape would page)"
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    for key in ("summary", "description", "runbook"):
        assert str(annotations.get(key, "")).strip(), f"{name}: annotation {key!r} is empty"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases: dict[str, set[bool]] = {}
    for test in load_yaml(RULES_TEST)["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for name in alerts():
        assert cases.get(name) == {True, False}, (
            f"{name}: rules_test.yaml needs a case where it fires and one where it does not "
            f"(has: {sorted(cases.get(name, set()))})"
        )


def test_the_kubernetes_prometheusrule_is_the_rules_file() -> None:
    assert prometheusrule.PROMETHEUS_RULE.read_text() == prometheusrule.render(), (
        "deploy/k8s/prometheusrule.yaml is out of date: run `.venv/bin/python -m tests.deploy.prometheusrule`"
    )
    document = load_yaml(prometheusrule.PROMETHEUS_RULE)
    assert document["spec"]["groups"] == load_yaml(RULES)["groups"]
