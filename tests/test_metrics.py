"""Metrics: exact values after known traffic, series at zero, no addresses, the ops endpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bccguard.ops.http import OpsServer
from bccguard.ops.metrics import (
    ACTIONS,
    CONNECTION_RESULTS,
    MAX_RULES,
    OVERFLOW_RULE,
    UPSTREAM_FAILURE_KINDS,
    Metrics,
    reply_class,
    rule_label,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def msg(m: Metrics, action: str, rule: str = "default", *, exposure: bool = False, hidden: int = 0,
        visible: int = 1, visible_external: int = 0, envelope_rcpts: int = 1, size: int = 2048,
        inspect_seconds: float = 0.0001) -> None:
    m.message(action=action, rule=rule, exposure=exposure, hidden=hidden, visible=visible,
              visible_external=visible_external, envelope_rcpts=envelope_rcpts, size=size,
              inspect_seconds=inspect_seconds)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, rules=["marketing", "hr"], version="1.2.3")


def val(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_series_exists_at_zero_before_any_traffic(registry, metrics):
    for rule in ("default", "marketing", "hr"):
        assert val(registry, "bccguard_addresses_hidden_total", rule=rule) == 0
        for action in ACTIONS:
            assert val(registry, "bccguard_messages_total", action=action, rule=rule) == 0
            assert val(registry, "bccguard_exposures_total", action=action, rule=rule) == 0
    for kind in UPSTREAM_FAILURE_KINDS:
        assert val(registry, "bccguard_upstream_failures_total", kind=kind) == 0
    for result in CONNECTION_RESULTS:
        assert val(registry, "bccguard_smtp_connections_total", result=result) == 0
    for cls in ("2xx", "3xx", "4xx", "5xx"):
        assert val(registry, "bccguard_smtp_replies_total", **{"class": cls}) == 0
    for result in ("success", "failure"):
        assert val(registry, "bccguard_config_reloads_total", result=result) == 0
    for name in ("bccguard_smtp_sessions_active", "bccguard_quarantine_messages",
                 "bccguard_quarantine_bytes", "bccguard_upstream_last_success_timestamp_seconds",
                 "bccguard_visible_recipients_count", "bccguard_inspection_seconds_count"):
        assert val(registry, name) == 0, name
    assert val(registry, "bccguard_build_info", version="1.2.3") == 1


def test_exact_values_after_known_traffic(registry, metrics):
    msg(metrics, "pass", visible=2, envelope_rcpts=2, size=1000)
    msg(metrics, "pass", visible=1, envelope_rcpts=1, size=1000)
    msg(metrics, "rewrite", "marketing", exposure=True, hidden=40, visible=42,
        visible_external=40, envelope_rcpts=42, size=5000, inspect_seconds=0.002)
    msg(metrics, "audit", "hr", exposure=True, hidden=3, visible=5, visible_external=3)
    msg(metrics, "reject", "marketing", exposure=True, visible=3000, visible_external=2999)
    msg(metrics, "tempfail")

    assert val(registry, "bccguard_messages_total", action="pass", rule="default") == 2
    assert val(registry, "bccguard_messages_total", action="rewrite", rule="marketing") == 1
    assert val(registry, "bccguard_messages_total", action="audit", rule="hr") == 1
    assert val(registry, "bccguard_messages_total", action="reject", rule="marketing") == 1
    assert val(registry, "bccguard_messages_total", action="tempfail", rule="default") == 1
    assert val(registry, "bccguard_messages_total", action="rewrite", rule="default") == 0
    assert val(registry, "bccguard_exposures_total", action="rewrite", rule="marketing") == 1
    assert val(registry, "bccguard_exposures_total", action="audit", rule="hr") == 1
    assert val(registry, "bccguard_exposures_total", action="pass", rule="default") == 0
    assert val(registry, "bccguard_addresses_hidden_total", rule="marketing") == 40
    assert val(registry, "bccguard_addresses_hidden_total", rule="hr") == 3  # audit: would hide
    assert val(registry, "bccguard_addresses_hidden_total", rule="default") == 0

    assert val(registry, "bccguard_visible_recipients_count") == 6
    assert val(registry, "bccguard_visible_recipients_sum") == 2 + 1 + 42 + 5 + 3000 + 1
    assert val(registry, "bccguard_visible_recipients_bucket", le="1.0") == 2
    assert val(registry, "bccguard_visible_recipients_bucket", le="50.0") == 5
    assert val(registry, "bccguard_visible_recipients_bucket", le="10000.0") == 6
    assert val(registry, "bccguard_visible_external_recipients_sum") == 40 + 3 + 2999
    assert val(registry, "bccguard_visible_external_recipients_bucket", le="0.0") == 3
    assert val(registry, "bccguard_envelope_recipients_sum") == 2 + 1 + 42 + 1 + 1 + 1
    assert val(registry, "bccguard_message_size_bytes_sum") == 1000 + 1000 + 5000 + 3 * 2048
    assert val(registry, "bccguard_message_size_bytes_bucket", le="1024.0") == 2
    assert val(registry, "bccguard_inspection_seconds_bucket", le="5e-05") == 0
    assert val(registry, "bccguard_inspection_seconds_bucket", le="0.0001") == 5
    assert val(registry, "bccguard_inspection_seconds_bucket", le="0.0025") == 6


def test_upstream_sessions_replies_quarantine_reloads(registry, metrics):
    metrics.upstream_delivery(0.02)
    metrics.upstream_delivery(3.0)
    metrics.upstream_failure("timeout")
    metrics.upstream_failure("4xx")
    metrics.upstream_failure("4xx")
    assert metrics.upstream_last_ok is None
    metrics.upstream_ok()
    assert metrics.upstream_last_ok is not None
    for _ in range(3):
        metrics.session_opened()
    metrics.session_closed()
    metrics.connection("accepted")
    metrics.connection("refused_network")
    for code in (220, 250, 250, 354, 451, 550, 554):
        metrics.reply(code)
    metrics.quarantine_set(7, 70_000)
    metrics.config_reload(True)
    metrics.config_reload(False)
    metrics.config_reload(False)

    assert val(registry, "bccguard_upstream_delivery_seconds_count") == 2
    assert val(registry, "bccguard_upstream_delivery_seconds_bucket", le="0.025") == 1
    assert val(registry, "bccguard_upstream_failures_total", kind="timeout") == 1
    assert val(registry, "bccguard_upstream_failures_total", kind="4xx") == 2
    assert val(registry, "bccguard_upstream_failures_total", kind="connect") == 0
    assert val(registry, "bccguard_upstream_last_success_timestamp_seconds") > 1e9
    assert val(registry, "bccguard_smtp_sessions_active") == 2
    assert val(registry, "bccguard_smtp_connections_total", result="accepted") == 1
    assert val(registry, "bccguard_smtp_connections_total", result="refused_network") == 1
    assert val(registry, "bccguard_smtp_replies_total", **{"class": "2xx"}) == 3
    assert val(registry, "bccguard_smtp_replies_total", **{"class": "3xx"}) == 1
    assert val(registry, "bccguard_smtp_replies_total", **{"class": "4xx"}) == 1
    assert val(registry, "bccguard_smtp_replies_total", **{"class": "5xx"}) == 2
    assert val(registry, "bccguard_quarantine_messages") == 7
    assert val(registry, "bccguard_quarantine_bytes") == 70_000
    assert val(registry, "bccguard_config_reloads_total", result="success") == 1
    assert val(registry, "bccguard_config_reloads_total", result="failure") == 2


@pytest.mark.parametrize(
    ("call", "arg"),
    [("upstream_failure", "dns"), ("connection", "maybe"), ("reply", 99), ("reply", 600)],
)
def test_values_outside_closed_sets_are_refused(metrics, call, arg):
    with pytest.raises(ValueError, match=r"unknown|not an SMTP"):
        getattr(metrics, call)(arg)


def test_unknown_action_is_refused(metrics):
    with pytest.raises(ValueError, match="unknown action"):
        msg(metrics, "deliver")


def test_action_enum_members_are_accepted(registry, metrics):
    from bccguard.policy.model import Action

    msg(metrics, Action.SPLIT, "hr")
    assert val(registry, "bccguard_messages_total", action="split", rule="hr") == 1


def test_set_rules_after_reload_adds_series_and_keeps_old(registry, metrics):
    msg(metrics, "rewrite", "marketing")
    metrics.set_rules(["newsletters"])
    assert val(registry, "bccguard_messages_total", action="pass", rule="newsletters") == 0
    assert val(registry, "bccguard_messages_total", action="rewrite", rule="marketing") == 1
    assert metrics.rules == ("default", "marketing", "hr", "newsletters")


def test_rule_not_announced_is_counted_under_its_sanitised_name(registry, metrics):
    msg(metrics, "pass", "late-rule")
    assert val(registry, "bccguard_messages_total", action="pass", rule="late-rule") == 1
    assert val(registry, "bccguard_messages_total", action="reject", rule="late-rule") == 0


def test_rule_set_is_bounded(registry):
    m = Metrics(registry)
    for i in range(MAX_RULES + 20):
        msg(m, "pass", f"r{i}")
    assert len(m.rules) == MAX_RULES + 1
    assert val(registry, "bccguard_messages_total", action="pass", rule=OVERFLOW_RULE) == 21


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("marketing", "marketing"),
        ("hr-bulk_2.0", "hr-bulk_2.0"),
        ("jane@corp.example", "jane_corp.example"),
        ('x"}\n@', "x____"),
        ("", "_"),
        ("ü", "_"),
        ("a" * 100, "a" * 64),
    ],
)
def test_rule_label(name, label):
    assert rule_label(name) == label


def test_reply_class():
    assert [reply_class(c) for c in (220, 354, 421, 599)] == ["2xx", "3xx", "4xx", "5xx"]


def test_no_sample_contains_an_at_sign_even_with_hostile_rule_names(registry):
    hostile = ["ceo@corp.example", "@", 'x"} 1\nbccguard_fake{a="b@c', "customer@gmail.com"]
    m = Metrics(registry, rules=hostile, version="1.0@evil")
    for rule in [*hostile, "late@example.org"]:
        msg(m, "rewrite", rule, exposure=True, hidden=2)
    text = generate_latest(registry).decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples
    assert not [line for line in samples if "@" in line]
    # and the exposition still parses: a rule name cannot inject a series
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert "bccguard_fake" not in names


def test_default_registry_is_private_and_has_process_metrics():
    a, b = Metrics(), Metrics()  # two in one process: no duplicate-registration error
    assert a.registry is not b.registry
    assert a.registry.get_sample_value("process_cpu_seconds_total") is not None


# ------------------------------------------------------------------ OpsServer


def get(url: str, accept: str = "") -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def ops(metrics):
    state = {"ready": (False, "upstream not reachable yet")}
    server = OpsServer("127.0.0.1:0", metrics, lambda: state["ready"])
    server.start()
    yield server, state
    server.stop()


def test_ops_endpoints(ops, metrics):
    server, state = ops
    base = f"http://127.0.0.1:{server.port}"
    assert server.port > 0
    assert get(f"{base}/healthz")[0::2] == (200, "ok\n")
    assert get(f"{base}/readyz")[0::2] == (503, "upstream not reachable yet\n")
    state["ready"] = (True, "")
    assert get(f"{base}/readyz")[0::2] == (200, "ready\n")
    assert get(f"{base}/nope")[0] == 404
    assert get(f"{base}/metrics/x")[0] == 404

    msg(metrics, "rewrite", "marketing", hidden=4)
    status, ctype, text = get(f"{base}/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    assert 'bccguard_messages_total{action="rewrite",rule="marketing"} 1.0' in text
    assert 'bccguard_addresses_hidden_total{rule="marketing"} 4.0' in text

    openmetrics = "application/openmetrics-text; version=1.0.0"
    status, ctype, text = get(f"{base}/metrics", accept=openmetrics)
    assert ctype.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")


def test_stop_means_no_more_answers_even_on_an_open_connection(metrics):
    """A stopped relay must look down to Prometheus, which reuses its scrape connection."""
    import http.client

    server = OpsServer("127.0.0.1:0", metrics, lambda: (True, ""))
    server.start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz", headers={"Connection": "keep-alive"})
    assert conn.getresponse().read() == b"ok\n"
    server.stop()
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    conn.close()


def test_readiness_that_raises_is_not_ready(metrics):
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    server = OpsServer("127.0.0.1:0", metrics, broken)
    server.start()
    try:
        status, _, text = get(f"http://127.0.0.1:{server.port}/readyz")
        assert status == 503
        assert "boom" not in text
    finally:
        server.stop()


def test_bind_failure_is_oserror_at_start(ops, metrics):
    server, _ = ops
    clash = OpsServer(f"127.0.0.1:{server.port}", metrics, lambda: (True, ""))
    with pytest.raises(OSError):
        clash.start()
    clash.stop()  # harmless when never started


def test_ipv6_listen(metrics):
    try:
        server = OpsServer("[::1]:0", metrics, lambda: (True, ""))
        server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert get(f"http://[::1]:{server.port}/healthz")[0] == 200
    finally:
        server.stop()


# ----------------------------------------------------------- multiprocess mode

WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import CollectorRegistry
    from bccguard.ops.metrics import Metrics
    m = Metrics(CollectorRegistry(), rules=["marketing"], version="9.9")
    n = int(sys.argv[1])
    for _ in range(n):
        m.message(action="rewrite", rule="marketing", exposure=True, hidden=3, visible=5,
                  visible_external=3, envelope_rcpts=5, size=4096, inspect_seconds=0.001)
    m.session_opened()
    m.quarantine_set(n, n * 100)
    m.upstream_failure("connect")
    """
)


def test_two_processes_aggregate_through_the_multiproc_dir(tmp_path):
    """Issue 7 runs N workers: their numbers must add up on one /metrics."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(n)], env=env) for n in (3, 5)
    ]
    assert [w.wait(timeout=30) for w in workers] == [0, 0]

    # The serving side is a separate process too (the env var must be set before
    # prometheus_client is imported, which has already happened in this one).
    reader = textwrap.dedent(
        """
        import json, urllib.request
        from bccguard.ops.http import OpsServer
        from bccguard.ops.metrics import Metrics
        s = OpsServer("127.0.0.1:0", Metrics(), lambda: (True, ""))
        s.start()
        print(urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics").read().decode())
        s.stop()
        """
    )
    out = subprocess.run([sys.executable, "-c", reader], env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(out) for s in fam.samples
    }

    def v(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert v("bccguard_messages_total", action="rewrite", rule="marketing") == 8
    assert v("bccguard_messages_total", action="pass", rule="marketing") == 0
    assert v("bccguard_addresses_hidden_total", rule="marketing") == 24
    assert v("bccguard_visible_recipients_count") == 8
    assert v("bccguard_upstream_failures_total", kind="connect") == 2
    assert v("bccguard_build_info", version="9.9") == 1
    # livesum: both workers are dead and were not marked so; the sum still counts them
    assert v("bccguard_smtp_sessions_active") == 2
    assert v("bccguard_quarantine_messages") in (3, 5)  # the most recent reading wins
    assert not [k for k in samples if k[0].startswith("process_")]
