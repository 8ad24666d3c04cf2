"""/readyz's upstream rule (ops/readiness.py), from the metrics a relay or its workers record."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from bccguard.config import UpstreamConfig
from bccguard.ops.metrics import Metrics
from bccguard.ops.readiness import (
    READY_UPSTREAM_WINDOW,
    UpstreamState,
    outbox_path,
    read_state,
    upstream_readiness,
)

NOW = 1_000_000.0


def test_state_is_read_from_the_metrics_the_relay_records() -> None:
    m = Metrics(registry=CollectorRegistry())
    fresh = read_state(m.registry.collect())  # every series exists at zero
    assert fresh.last_ok == 0.0 and not any(fresh.last_failure.values()) and fresh.missing == ()
    before = time.time()
    m.upstream_ok()
    m.upstream_failure("session")
    m.upstream_capabilities(["8BITMIME"])
    state = read_state(m.registry.collect())
    assert state.last_ok >= before and state.last_failure["session"] >= state.last_ok
    assert state.missing == ("8BITMIME",)
    assert upstream_readiness(state, now=time.time(), outbox=None)[0] is False


def test_several_workers_combine_to_the_latest_and_any_missing() -> None:
    """The supervisor sees one sample per worker: the newest time wins, a gap anywhere shows."""
    workers = [Metrics(registry=CollectorRegistry()) for _ in range(2)]
    workers[0].upstream_ok()
    workers[1].upstream_capabilities(["SMTPUTF8"])
    families = [f for w in workers for f in w.registry.collect()]
    state = read_state(families)
    assert state.last_ok > 0 and state.missing == ("SMTPUTF8",)


def test_blocking_failures_turn_not_ready_at_once_and_name_the_cause() -> None:
    recent = UpstreamState(last_ok=NOW - 1, last_failure={"session": NOW})
    ready, reason = upstream_readiness(recent, now=NOW, outbox=None)
    assert not ready and "refused the session" in reason
    full = UpstreamState(last_ok=NOW - 1, last_failure={"storage": NOW})
    ready, reason = upstream_readiness(full, now=NOW, outbox="/var/lib/bccguard/outbox")
    assert not ready and "outbox /var/lib/bccguard/outbox not writable" in reason
    # a success since then clears it
    healed = UpstreamState(last_ok=NOW + 1, last_failure={"session": NOW, "storage": NOW})
    assert upstream_readiness(healed, now=NOW + 1, outbox=None) == (True, "ready")


def test_passing_failures_only_count_once_the_window_is_over() -> None:
    blip = UpstreamState(last_ok=NOW - 1, last_failure={"connect": NOW, "4xx": NOW})
    assert upstream_readiness(blip, now=NOW, outbox=None) == (True, "ready")
    stale = UpstreamState(last_ok=NOW - READY_UPSTREAM_WINDOW - 1, last_failure={"connect": NOW})
    assert upstream_readiness(stale, now=NOW, outbox=None) == (
        False,
        "upstream not reachable recently (last failure: connect)",
    )
    assert upstream_readiness(UpstreamState(), now=NOW, outbox=None) == (
        False,
        "upstream not reachable recently",
    )


def test_missing_capabilities_warn_but_stay_ready() -> None:
    state = UpstreamState(last_ok=NOW, missing=("8BITMIME", "SIZE"))
    ready, reason = upstream_readiness(state, now=NOW, outbox=None)
    assert ready and reason.startswith("ready; warning:") and "8BITMIME, SIZE" in reason


def test_outbox_path_is_the_maildir_as_resolved() -> None:
    assert outbox_path(UpstreamConfig(url="maildir:/srv/outbox")) == "/srv/outbox"
    assert outbox_path(UpstreamConfig(url="smtp://127.0.0.1:25")) is None
