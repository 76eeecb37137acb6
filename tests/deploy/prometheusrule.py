"""deploy/k8s/prometheusrule.yaml is deploy/prometheus/rules.yaml wrapped in a PrometheusRule.

Regenerate it after changing the rules (the tests fail until then):

    .venv/bin/python -m tests.deploy.prometheusrule
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yaml"
PROMETHEUS_RULE = REPO_ROOT / "deploy" / "k8s" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yaml by `.venv/bin/python -m tests.deploy.prometheusrule`:
# edit the rules there (they are unit-tested with promtool), then regenerate this file.
# The Prometheus Operator loads it; adjust the `release` label to your Prometheus's ruleSelector.
"""


# A private SafeDumper subclass: the representer below must not change yaml.safe_dump elsewhere.
_Dumper: Any = type("_Dumper", (yaml.SafeDumper,), {})


def _str(dumper: Any, value: str) -> Any:
    # Multi-line PromQL stays a readable block, as in rules.yaml.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def render() -> str:
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "embedfleet",
            "labels": {"app.kubernetes.io/name": "embedfleet", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": rule_groups()},
    }
    body: str = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=110, allow_unicode=True)
    return HEADER + body


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(render())
    print(f"wrote {PROMETHEUS_RULE.relative_to(REPO_ROOT)}")
