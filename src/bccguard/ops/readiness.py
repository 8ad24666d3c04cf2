"""What /readyz says about the upstream, decided from the metrics every process records.

Why from metrics: with several workers, the supervisor serves /readyz but
only sees the workers' multiprocess metric files. Reading the same gauges in
a single process too gives one rule, one wording and one test for both.

The rule:
- not ready when no upstream success for READY_UPSTREAM_WINDOW seconds (the
  probe runs every 15 s when traffic does not prove the upstream alive);
- not ready at once when the latest failure, newer than the latest success,
  is one a retry will not cure by itself: the upstream refusing the session
  (greeting, EHLO or STARTTLS), or a Maildir outbox that cannot be written. The text
  names it, so the admin looks at the right thing;
- ready, with a warning, when the upstream lacks an extension bccguard
  advertises (8BITMIME, SMTPUTF8, a SIZE at least ours): the mail that needs
  it is answered 4xx/5xx, the rest flows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bccguard.config import UpstreamConfig, upstream_parts

READY_UPSTREAM_WINDOW = 60.0

# Failure kinds that take the relay out of rotation as soon as they are the latest word.
BLOCKING_KINDS = ("session", "storage")
_LAST_OK = "bccguard_upstream_last_success_timestamp_seconds"
_LAST_FAILURE = "bccguard_upstream_last_failure_timestamp_seconds"
_MISSING = "bccguard_upstream_capability_missing"


@dataclass(frozen=True)
class UpstreamState:
    last_ok: float = 0.0  # unix time; 0: never
    last_failure: dict[str, float] = field(default_factory=dict)  # kind -> unix time
    missing: tuple[str, ...] = ()  # capabilities bccguard advertises that the upstream lacks


def read_state(families: Iterable[Any]) -> UpstreamState:
    """The upstream's state from collected metric families (`registry.collect()`).

    Several samples of one series (one per worker) combine as the gauges
    declare: the latest time, and "missing" if any worker saw it missing.
    """
    last_ok = 0.0
    failures: dict[str, float] = {}
    missing: set[str] = set()
    for family in families:
        if family.name == _LAST_OK:
            last_ok = max([last_ok, *(s.value for s in family.samples)])
        elif family.name == _LAST_FAILURE:
            for s in family.samples:
                kind = s.labels.get("kind", "")
                failures[kind] = max(failures.get(kind, 0.0), s.value)
        elif family.name == _MISSING:
            missing |= {s.labels.get("capability", "") for s in family.samples if s.value}
    return UpstreamState(last_ok, failures, tuple(sorted(missing)))


def upstream_readiness(state: UpstreamState, *, now: float, outbox: str | None) -> tuple[bool, str]:
    """(ready, reason) for the upstream side; `outbox` is the Maildir path, None for SMTP."""
    newer = {k: t for k, t in state.last_failure.items() if t > state.last_ok}
    latest = max(newer, key=newer.__getitem__, default=None)
    if latest in BLOCKING_KINDS:
        return False, _blocking_reason(latest, outbox)
    if now - state.last_ok > READY_UPSTREAM_WINDOW:
        reason = "upstream not reachable recently"
        return False, f"{reason} (last failure: {latest})" if latest else reason
    if state.missing:
        gaps = ", ".join(state.missing)
        return True, f"ready; warning: upstream lacks {gaps}, which bccguard advertises to its clients"
    return True, "ready"


def outbox_path(cfg: UpstreamConfig) -> str | None:
    """The Maildir outbox as the upstream resolves it (absolute), or None for an SMTP upstream."""
    scheme, _, _, path = upstream_parts(cfg.url)
    return str(Path(path).absolute()) if scheme == "maildir" else None


def _blocking_reason(kind: str, outbox: str | None) -> str:
    if kind == "storage":
        where = f"outbox {outbox}" if outbox else "local store"
        return f"{where} not writable (could not store; the log names the path and errno)"
    return "upstream refused the session (greeting, EHLO or STARTTLS); the log has its reply code"


__all__ = [
    "READY_UPSTREAM_WINDOW",
    "UpstreamState",
    "outbox_path",
    "read_state",
    "upstream_readiness",
]
