"""Shared by the deploy and Prometheus tests: where the artifacts are, how to find tools,
and every PromQL expression the dashboard and the alert rules contain."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "bccguard.json"
BUILDER = ROOT / "deploy" / "grafana" / "build_dashboard.py"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RUNBOOK = ROOT / "deploy" / "prometheus" / "RUNBOOK.md"


def require_tool(name: str) -> str:
    """The tool's path; skip when absent locally, fail in CI (where .ci/run installs it)."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} not found (Debian: apt-get install prometheus)"
    if os.environ.get("CI"):
        pytest.fail(f"{msg}; CI must run this test")
    pytest.skip(msg)
    raise AssertionError("unreachable")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text("utf-8"))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every target, plus the instance variable's query."""
    out = [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            out.append((f"variable {var['name']}", query["query"]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text("utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_exprs() -> list[tuple[str, str]]:
    return [(r.get("alert") or r["record"], r["expr"]) for r in alert_rules()]


_LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")


def to_promql(expr: str, *, instance: str, rate_interval: str = "30s",
              interval: str = "5s", range_: str = "5m") -> str:
    """Substitute Grafana's variables the way Grafana would for one selected instance.

    `label_values(metric, label)` is Grafana syntax, not PromQL; the equivalent
    query that proves the metric exists with that label is `group by (label) (metric)`.
    """
    m = _LABEL_VALUES.match(expr.strip())
    if m:
        return f"group by ({m.group(2)}) ({m.group(1)})"
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__interval", interval)
        .replace("$__range", range_)
        .replace("${instance}", instance)  # a regex; its dots match themselves too
        .replace("$instance", instance)
    )
