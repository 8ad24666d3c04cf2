"""The shipped dashboard, alert rules and scrape config are valid and consistent."""

from __future__ import annotations

import re
import runpy
import subprocess

import pytest

from bccguard.ops.metrics import Metrics
from observability_helpers import (
    ALERTS,
    ALERTS_TEST,
    BUILDER,
    DASHBOARD,
    PROM_CONFIG,
    RUNBOOK,
    alert_exprs,
    alert_rules,
    dashboard,
    dashboard_exprs,
    require_tool,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("promtool"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.prometheus
@pytest.mark.parametrize(
    "args",
    [("check", "rules", str(ALERTS)), ("check", "config", str(PROM_CONFIG)),
     ("test", "rules", str(ALERTS_TEST))],
    ids=["check-rules", "check-config", "test-rules"],
)
def test_promtool(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_dashboard_is_what_the_builder_produces():
    builder = runpy.run_path(str(BUILDER))
    assert DASHBOARD.read_text("utf-8") == builder["render"](), (
        "run: python deploy/grafana/build_dashboard.py"
    )


def test_dashboard_panels_use_the_datasource_variable_and_have_targets():
    d = dashboard()
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "instance"]
    instance = d["templating"]["list"][1]
    assert instance["query"]["query"] == "label_values(bccguard_build_info, instance)"
    assert instance["datasource"]["uid"] == "${datasource}"
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in d["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24


def test_dashboard_covers_what_ops_asked_for():
    exprs = " ".join(e for _, e in dashboard_exprs())
    for needle in ("bccguard_messages_total", "bccguard_exposures_total",
                   "bccguard_addresses_hidden_total", "bccguard_visible_recipients_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(bccguard_upstream_delivery_seconds",
                   "bccguard_upstream_failures_total", "bccguard_smtp_sessions_active",
                   "bccguard_smtp_replies_total", "bccguard_quarantine_messages", "topk(10"):
        assert needle in exprs, needle


def test_every_metric_referenced_exists():
    """A renamed metric would leave a panel or alert silently empty."""
    m = Metrics()
    known = {s.name for fam in m.registry.collect() for s in fam.samples} | {"up"}
    exprs = [e for _, e in dashboard_exprs() + alert_exprs()]
    used = {n for e in exprs for n in re.findall(r"\b((?:bccguard_|up\b)\w*)", e)}
    assert used
    assert used <= known, used - known


def test_alert_rules_are_complete():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {"BccguardDown", "BccguardUpstreamFailing", "BccguardTempfailRatioHigh",
            "BccguardQuarantineGrowing", "BccguardExposureSpike", "BccguardLatencyHigh"} <= names
    runbook = RUNBOOK.read_text("utf-8")
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    tested = ALERTS_TEST.read_text("utf-8")
    for r in rules:
        name = r["alert"]
        assert "for" in r, name
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        ann = r["annotations"]
        assert ann["summary"] and ann["description"], name
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path == "deploy/prometheus/RUNBOOK.md", name
        assert anchor in anchors, f"{name}: no section #{anchor} in RUNBOOK.md"
        assert f"alertname: {name}" in tested, f"{name}: no promtool unit test"
