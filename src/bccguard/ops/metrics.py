"""Prometheus metrics for the relay: one `Metrics` object on an injected registry.

Why it looks like this:

* Privacy. A label value is only ever taken from a closed set known at start
  (the action names below, the configured rule names, reply classes, failure
  kinds). Never an address, a sender, a domain seen in traffic, or free text:
  a `/metrics` page is scraped, stored for months and shown to people who may
  not read mail. Rule names come from the admin's config; they are passed
  through `rule_label`, which turns anything outside `[A-Za-z0-9_.-]` into `_`
  so not even a mistyped rule name can put an `@` into a series.
* Series exist at zero. Every label combination is created in `__init__`
  (and in `set_rules` for rules added by a reload), so `rate()` and alert
  ratios work from the first scrape instead of appearing with the first event.
* Cheap on the SMTP event loop. The children are resolved once and kept in
  dicts; an update is a dict lookup and a locked add, no label parsing.
* Multi-process ready. With `PROMETHEUS_MULTIPROC_DIR` set before
  `prometheus_client` is imported, values live in mmap files per process and
  `exposition_registry` aggregates them; every gauge declares how it is to be
  aggregated (`multiprocess_mode`). `Info` is not supported in that mode, so
  build info is a gauge fixed at 1.

To add a metric: declare it in `__init__` with `registry=self.registry`, create its
label values with `_children` from a module-level tuple, and add one method
that does the update. Keep the tuple next to the others so the closed sets
stay visible in one place.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from itertools import product
from typing import Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from bccguard.policy.model import DlpVerdict

PREFIX: Final = "bccguard"

ACTIONS: Final = ("pass", "audit", "rewrite", "split", "quarantine", "reject", "tempfail")
# Actions that change or stop a message: an exposure with one of these was prevented.
PREVENTING_ACTIONS: Final = ("rewrite", "split", "quarantine", "reject", "tempfail")
UPSTREAM_FAILURE_KINDS: Final = (
    "connect", "timeout", "tls", "protocol", "session", "capability", "4xx", "5xx",
)  # fmt: skip
# The last-failure gauge also knows "storage": a Maildir outbox that cannot be
# written is counted as a store failure, not an upstream one, but /readyz must see it.
UPSTREAM_STATE_KINDS: Final = (*UPSTREAM_FAILURE_KINDS, "storage")
# What bccguard advertises to its clients that an upstream may lack (upstream.ADVERTISED).
CAPABILITIES: Final = ("8BITMIME", "SMTPUTF8", "SIZE")
# Where a message bccguard promised to keep is written: a failed write is a 451 4.3.0.
STORES: Final = ("spool", "quarantine", "outbox")
CONNECTION_RESULTS: Final = (
    "accepted",
    "refused_network",
    "refused_auth",
    "refused_limit",
    "refused_proxy_untrusted",  # PROXY-protocol listener, peer outside proxy_trusted_networks
    "tls_failed",  # a failed STARTTLS handshake (scanners, plaintext after STARTTLS)
    "protocol_error",
)
REPLY_CLASSES: Final = ("2xx", "3xx", "4xx", "5xx")
RELOAD_RESULTS: Final = ("success", "failure")
# Spool entry kinds (store/spool.py KINDS): what a retry was for.
SPOOL_KINDS: Final = ("retry", "split", "dsn", "notice")
# A split copy is created when spooled, then delivered or failed (DSN to the sender).
SPLIT_COPY_EVENTS: Final = ("created", "delivered", "failed")
# `bccguard quarantine release`: all recipients accepted, some, or none (entry kept).
RELEASE_RESULTS: Final = ("released", "partial", "failed")
# Sender notices: spooled for delivery, dropped by the per-sender rate limit, or
# suppressed because the message was automatic (bounce, list, auto-reply).
NOTICE_RESULTS: Final = ("sent", "rate_limited", "suppressed")
# Milter edge (milter/): the final answer per message to the MTA, and why a session ended early.
MILTER_RESPONSES: Final = ("continue", "edit", "discard", "quarantine", "reject", "tempfail")
MILTER_ERRORS: Final = ("protocol", "timeout", "disconnect", "too_big")

# Customer data ([dlp]): detectors, levels and scan limits (policy/dlp/model.py).
DLP_DETECTORS: Final = ("email", "phone", "iban", "card", "national_id", "customer_table")
DLP_LEVELS: Final = ("low", "high")
DLP_LIMITS: Final = ("bytes", "decompressed", "depth", "members", "pages", "time", "memory")

DEFAULT_RULE: Final = "default"
# A config has a handful of rules; a caller passing something unbounded (a
# sender, say) by mistake must not create a series per value.
MAX_RULES: Final = 500
OVERFLOW_RULE: Final = "_overflow"

# Recipient counts: the relay allows up to 1000 recipients by default and a
# crafted To: header can list many more; the top bucket catches those.
RECIPIENT_BUCKETS: Final = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# 1 KiB .. 64 MiB in powers of four (default max_message_size is 25 MiB).
SIZE_BUCKETS: Final = tuple(float(1024 * 4**i) for i in range(9))
# Inspection is pure CPU on parsed headers: tens of microseconds for a plain
# message, milliseconds for thousands of addresses (see FIELD-NOTES).
INSPECT_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
# Upstream transaction: loopback milliseconds up to the 60 s default timeout.
UPSTREAM_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_UNSAFE_VERSION = re.compile(r"[^A-Za-z0-9_.+-]")  # PEP 440 local versions use "+"
RULE_LABEL_MAX: Final = 64


def rule_label(name: str) -> str:
    """The label value for a rule name: safe characters only, bounded length.

    Config rule names are admin-chosen identifiers, but they are free-form
    strings; this guarantees that whatever is typed there, no `@`, quote or
    newline reaches a label. A well-chosen name (`marketing`, `hr-bulk`) is
    returned unchanged, so log lines and series carry the same rule.
    """
    cleaned = _UNSAFE.sub("_", name)[:RULE_LABEL_MAX]
    return cleaned or "_"


def reply_class(code: int) -> str:
    """`250` -> `"2xx"`; SMTP (RFC 5321 4.2.1) only has classes 2 to 5."""
    label = f"{code // 100}xx"
    if label not in REPLY_CLASSES or not 200 <= code <= 599:
        raise ValueError(f"{code} is not an SMTP reply code")
    return label


def multiprocess_dir() -> str | None:
    """The shared metrics directory when running as several worker processes."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_C = TypeVar("_C", Counter, Gauge, Histogram)


def _children(metric: _C, *label_sets: Iterable[str]) -> dict[tuple[str, ...], _C]:
    """Create every combination of label values now, so each series exists at zero."""
    return {values: metric.labels(*values) for values in product(*label_sets)}


class Metrics:
    """Every counter the relay keeps, with one method per event worth counting.

    Methods raise `ValueError` for a value outside its closed set (an action,
    kind or result name that is not declared above): that is a programming
    error, and failing loudly in tests beats inventing a series. An unknown
    *rule* is different (a message decided under a rule set that a reload has
    since replaced could race): its name is added to the set, sanitised.
    """

    registry: CollectorRegistry

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        rules: Iterable[str] = (DEFAULT_RULE,),
        version: str = "",
    ) -> None:
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            if multiprocess_dir() is None:
                # Per-process CPU, memory and fd counts only mean something
                # for a single process; in multiprocess mode they are left out.
                ProcessCollector(registry=registry)
                PlatformCollector(registry=registry)
        self.registry = registry
        self._lock = threading.Lock()  # guards the rule set only; values lock themselves
        self._rules: list[str] = []
        # time.monotonic() of the last upstream success in this process: the
        # app's readiness check reads it ("upstream reachable recently").
        self.upstream_last_ok: float | None = None

        r = registry
        p = PREFIX

        # --- messages: exactly one `message()` call per processed message
        self._messages_total = Counter(
            f"{p}_messages", "Messages processed, by action taken and by the rule that decided it.",
            ["action", "rule"], registry=r,
        )  # fmt: skip
        self._exposures_total = Counter(
            f"{p}_exposures",
            "Messages whose visible To/Cc exposed external recipients, by action taken and rule; "
            "an action other than pass/audit means the exposure was prevented.",
            ["action", "rule"], registry=r,
        )  # fmt: skip
        self._hidden_total = Counter(
            f"{p}_addresses_hidden", "Recipient addresses removed from To/Cc headers, by rule.",
            ["rule"], registry=r,
        )  # fmt: skip
        self._visible = Histogram(
            f"{p}_visible_recipients", "Distinct addresses visible in To/Cc per message.",
            buckets=RECIPIENT_BUCKETS, registry=r,
        )  # fmt: skip
        self._visible_external = Histogram(
            f"{p}_visible_external_recipients",
            "Distinct external (incl. consumer) addresses visible in To/Cc per message.",
            buckets=RECIPIENT_BUCKETS, registry=r,
        )  # fmt: skip
        self._envelope = Histogram(
            f"{p}_envelope_recipients", "SMTP envelope recipients (RCPT TO) per message.",
            buckets=RECIPIENT_BUCKETS, registry=r,
        )  # fmt: skip
        self._size = Histogram(
            f"{p}_message_size_bytes", "Size of messages as received.",
            buckets=SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        # Messages whose DKIM signature covers a field the rewrite changes
        # (policy/dkim.py), by what was done about it ([policy] on_signed).
        signed = Counter(
            f"{p}_signed_messages",
            "Messages DKIM-signed over To/Cc that a rewrite would break, by action taken.",
            ["action"], registry=r,
        )  # fmt: skip
        self._signed = {k: c for (k,), c in _children(signed, ACTIONS).items()}
        self._inspect = Histogram(
            f"{p}_inspection_seconds", "Time spent parsing headers and deciding, per message.",
            buckets=INSPECT_BUCKETS, registry=r,
        )  # fmt: skip

        # --- upstream MTA
        self._upstream_seconds = Histogram(
            f"{p}_upstream_delivery_seconds",
            "Duration of upstream transactions that got an answer (any reply code).",
            buckets=UPSTREAM_BUCKETS, registry=r,
        )  # fmt: skip
        upstream_failures = Counter(
            f"{p}_upstream_failures", "Upstream transactions that failed, by kind.",
            ["kind"], registry=r,
        )  # fmt: skip
        self._upstream_failures = {
            k: c for (k,), c in _children(upstream_failures, UPSTREAM_FAILURE_KINDS).items()
        }
        self._upstream_last_success = Gauge(
            f"{p}_upstream_last_success_timestamp_seconds",
            "Unix time of the last successful upstream transaction.",
            registry=r, multiprocess_mode="max",
        )  # fmt: skip
        # /readyz compares these with the last success (ops/readiness.py).
        last_failure = Gauge(
            f"{p}_upstream_last_failure_timestamp_seconds",
            "Unix time of the last failed upstream transaction or probe, by kind.",
            ["kind"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self._upstream_last_failure = {
            k: c for (k,), c in _children(last_failure, UPSTREAM_STATE_KINDS).items()
        }
        missing = Gauge(
            f"{p}_upstream_capability_missing",
            "1 when the upstream lacks an extension bccguard advertises to its clients.",
            ["capability"], registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self._capability_missing = {k: c for (k,), c in _children(missing, CAPABILITIES).items()}
        store_failures = Counter(
            f"{p}_store_write_failures",
            "Writes to the spool, quarantine or Maildir outbox that failed (the client got 451 4.3.0).",
            ["store"], registry=r,
        )  # fmt: skip
        self._store_failures = {k: c for (k,), c in _children(store_failures, STORES).items()}

        # --- SMTP front end
        self._sessions_active = Gauge(
            f"{p}_smtp_sessions_active", "SMTP sessions currently open.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        connections = Counter(
            f"{p}_smtp_connections", "Inbound SMTP connections, by how they were handled.",
            ["result"], registry=r,
        )  # fmt: skip
        self._connections = {k: c for (k,), c in _children(connections, CONNECTION_RESULTS).items()}
        replies = Counter(
            f"{p}_smtp_replies", "SMTP replies sent to clients, by reply code class.",
            ["class"], registry=r,
        )  # fmt: skip
        self._replies = {k: c for (k,), c in _children(replies, REPLY_CLASSES).items()}

        # --- milter front end (beside SMTP: the same messages, another way in)
        self._milter_active = Gauge(
            f"{p}_milter_sessions_active", "Milter sessions (MTA connections) currently open.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self._milter_sessions = Counter(
            f"{p}_milter_sessions", "Milter sessions opened by the MTA.", registry=r,
        )  # fmt: skip
        milter_responses = Counter(
            f"{p}_milter_responses",
            "Final milter answers per message: continue (unchanged), edit (headers rewritten), "
            "discard (held or split by bccguard), quarantine (MTA hold queue), reject, tempfail.",
            ["response"], registry=r,
        )  # fmt: skip
        self._milter_responses = {k: c for (k,), c in _children(milter_responses, MILTER_RESPONSES).items()}
        milter_errors = Counter(
            f"{p}_milter_errors",
            "Milter sessions or messages cut short: protocol error, timeout, MTA disconnect "
            "mid-message, message over max_message_size.",
            ["kind"], registry=r,
        )  # fmt: skip
        self._milter_errors = {k: c for (k,), c in _children(milter_errors, MILTER_ERRORS).items()}

        # --- quarantine: the store is shared on disk, so any worker's latest
        # reading is the truth ("mostrecent"), not a sum over workers.
        self._quarantine_messages = Gauge(
            f"{p}_quarantine_messages", "Messages currently held in quarantine.",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self._quarantine_bytes = Gauge(
            f"{p}_quarantine_bytes", "Bytes currently held in quarantine.",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip

        # --- spool: shared on disk like the quarantine, read by the one runner.
        self._spool_entries = Gauge(
            f"{p}_spool_entries", "Spool entries (messages) with copies not yet accepted upstream.",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self._spool_copies = Gauge(
            f"{p}_spool_copies", "Copies (upstream transactions) waiting in the spool.",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        spool_retries = Counter(
            f"{p}_spool_retries", "Spooled copies rescheduled after a failed attempt, by entry kind.",
            ["kind"], registry=r,
        )  # fmt: skip
        self._spool_retries = {k: c for (k,), c in _children(spool_retries, SPOOL_KINDS).items()}
        split_copies = Counter(
            f"{p}_split_copies", "Copies of split messages: created (spooled), delivered, failed.",
            ["event"], registry=r,
        )  # fmt: skip
        self._split_copies = {k: c for (k,), c in _children(split_copies, SPLIT_COPY_EVENTS).items()}
        releases = Counter(
            f"{p}_quarantine_releases",
            "Quarantine releases by result, as recorded in the audit log (the CLI does them).",
            ["result"], registry=r,
        )  # fmt: skip
        self._releases = {k: c for (k,), c in _children(releases, RELEASE_RESULTS).items()}
        notices = Counter(
            f"{p}_notices", "Sender notices: sent (spooled), rate_limited, or suppressed.",
            ["result"], registry=r,
        )  # fmt: skip
        self._notices = {k: c for (k,), c in _children(notices, NOTICE_RESULTS).items()}

        # --- customer data ([dlp]): counts by detector, level and action, never a value
        dlp_messages = Counter(
            f"{p}_dlp_messages",
            "Messages scanned for customer data in which a detector reached a level, by detector, level "
            "and the action taken on the message.",
            ["detector", "level", "action"], registry=r,
        )  # fmt: skip
        self._dlp_messages = _children(dlp_messages, DLP_DETECTORS, DLP_LEVELS, ACTIONS)
        dlp_instances = Counter(
            f"{p}_dlp_instances", "Distinct instances found per message, summed, by detector.",
            ["detector"], registry=r,
        )  # fmt: skip
        self._dlp_instances = {k: c for (k,), c in _children(dlp_instances, DLP_DETECTORS).items()}
        self._dlp_scanned = Counter(
            f"{p}_dlp_scanned_bytes", "Bytes of text handed to the customer-data detectors.", registry=r
        )
        dlp_over = Counter(
            f"{p}_dlp_over_limit", "Messages whose customer-data scan stopped at a limit, by limit.",
            ["limit"], registry=r,
        )  # fmt: skip
        self._dlp_over = {k: c for (k,), c in _children(dlp_over, DLP_LIMITS).items()}
        self._dlp_unreadable = Counter(
            f"{p}_dlp_unreadable_parts", "Encrypted or broken parts the customer-data scan could not read.",
            registry=r,
        )  # fmt: skip

        # --- process
        reloads = Counter(
            f"{p}_config_reloads", "Configuration reloads (SIGHUP), by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self._reloads = {k: c for (k,), c in _children(reloads, RELOAD_RESULTS).items()}
        build_info = Gauge(
            f"{p}_build_info", "Always 1; the version label says which bccguard is running.",
            ["version"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        build_info.labels(_UNSAFE_VERSION.sub("_", version)[:RULE_LABEL_MAX] or "unknown").set(1)

        self._message_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self._hidden_children: dict[str, Counter] = {}
        self.set_rules(rules)

    # ------------------------------------------------------------------ rules

    @property
    def rules(self) -> tuple[str, ...]:
        """Rule label values with series, in the order they were first seen."""
        return tuple(self._rules)

    def set_rules(self, rules: Iterable[str]) -> None:
        """Create series for these rule names (plus "default"); never removes any.

        Called at start and after each successful reload. Series of rules that
        a reload removed are kept: dropping them would lose counts that a
        scrape has not seen yet, and the set stays bounded by the config.
        """
        with self._lock:
            for name in (DEFAULT_RULE, *rules):
                self._add_rule(rule_label(name))

    def _add_rule(self, label: str) -> str:
        if label in self._hidden_children:
            return label
        if len(self._rules) >= MAX_RULES:
            label = OVERFLOW_RULE
            if label in self._hidden_children:
                return label
        for action in ACTIONS:
            self._message_children[(action, label)] = (
                self._messages_total.labels(action, label),
                self._exposures_total.labels(action, label),
            )
        self._hidden_children[label] = self._hidden_total.labels(label)
        self._rules.append(label)
        return label

    def _rule(self, rule: str) -> str:
        if rule in self._hidden_children:
            return rule
        with self._lock:
            return self._add_rule(rule_label(rule))

    # --------------------------------------------------------------- messages

    def message(
        self,
        *,
        action: str,
        rule: str,
        exposure: bool,
        hidden: int,
        visible: int,
        visible_external: int,
        envelope_rcpts: int,
        size: int,
        inspect_seconds: float,
    ) -> None:
        """Count one processed message; call exactly once per message, tempfail included."""
        label = self._rule(rule)
        try:
            messages, exposures = self._message_children[(action, label)]
        except KeyError:
            raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}") from None
        messages.inc()
        if exposure:
            exposures.inc()
        if hidden:
            self._hidden_children[label].inc(hidden)
        self._visible.observe(visible)
        self._visible_external.observe(visible_external)
        self._envelope.observe(envelope_rcpts)
        self._size.observe(size)
        self._inspect.observe(inspect_seconds)

    def signed_message(self, action: str) -> None:
        """A message signed over To/Cc met a rewrite; `action` is what happened to it."""
        _get(self._signed, action, "action").inc()

    def dlp(self, verdict: DlpVerdict, *, action: str) -> None:
        """One scanned message's customer-data findings: counts by closed label sets only."""
        for detector, n in verdict.counts.items():
            _get(self._dlp_instances, detector, "detector").inc(n)
        for detector, level in verdict.levels.items():
            try:
                child = self._dlp_messages[(detector, level, action)]
            except KeyError:
                raise ValueError(f"unknown detector/level/action {(detector, level, action)}") from None
            child.inc()
        self._dlp_scanned.inc(verdict.scanned_bytes)
        for limit in verdict.over_limit:
            _get(self._dlp_over, limit, "limit").inc()
        if verdict.unreadable:
            self._dlp_unreadable.inc(verdict.unreadable)

    # --------------------------------------------------------------- upstream

    def upstream_delivery(self, seconds: float) -> None:
        """One upstream transaction that got an answer, whatever the reply code."""
        self._upstream_seconds.observe(seconds)

    def upstream_failure(self, kind: str) -> None:
        """An upstream transaction failed: no answer (connect/timeout/tls/protocol) or 4xx/5xx.

        "storage" (the Maildir outbox could not be written) is counted as the
        store failure it is, not as an upstream one.
        """
        if kind == "storage":
            self._store_failures["outbox"].inc()
        else:
            _get(self._upstream_failures, kind, "upstream failure kind").inc()
        self._upstream_last_failure[kind].set(time.time())

    def upstream_failure_seen(self, kind: str) -> None:
        """A failure /readyz must know of that is no upstream transaction (a probe, the outbox)."""
        _get(self._upstream_last_failure, kind, "upstream failure kind").set(time.time())

    def upstream_capabilities(self, missing: Iterable[str]) -> None:
        """What the upstream lacks of CAPABILITIES, as its latest EHLO said."""
        gone = set(missing)
        for name, gauge in self._capability_missing.items():
            gauge.set(1 if name in gone else 0)

    def store_write_failure(self, store: str) -> None:
        """A message could not be made durable in `store`; the client got 451 4.3.0."""
        _get(self._store_failures, store, "store").inc()

    def upstream_ok(self) -> None:
        """The upstream accepted something just now; feeds /readyz and the staleness gauge."""
        self.upstream_last_ok = time.monotonic()
        self._upstream_last_success.set(time.time())

    # ------------------------------------------------------------------- SMTP

    def session_opened(self) -> None:
        """An SMTP session started (pair with `session_closed`, also on errors)."""
        self._sessions_active.inc()

    def session_closed(self) -> None:
        """An SMTP session ended, however it ended."""
        self._sessions_active.dec()

    def connection(self, result: str) -> None:
        """An inbound connection was accepted or refused (one call per connection)."""
        _get(self._connections, result, "connection result").inc()

    def reply(self, code: int) -> None:
        """Any SMTP reply we send, counted by class so a code never becomes a label."""
        _get(self._replies, reply_class(code), "reply class").inc()

    # ----------------------------------------------------------------- milter

    def milter_session_opened(self) -> None:
        """The MTA opened a milter connection (pair with `milter_session_closed`)."""
        self._milter_sessions.inc()
        self._milter_active.inc()

    def milter_session_closed(self) -> None:
        self._milter_active.dec()

    def milter_response(self, response: str) -> None:
        """The final answer given to the MTA for one message."""
        _get(self._milter_responses, response, "milter response").inc()

    def milter_error(self, kind: str) -> None:
        _get(self._milter_errors, kind, "milter error").inc()

    # ------------------------------------------------------------ quarantine

    def quarantine_set(self, messages: int, bytes_: int) -> None:
        """The quarantine's current depth, as read from the store."""
        self._quarantine_messages.set(messages)
        self._quarantine_bytes.set(bytes_)

    # ------------------------------------------------------------------ spool

    def spool_set(self, entries: int, copies: int) -> None:
        """The spool's current depth, as seen by the runner after a pass."""
        self._spool_entries.set(entries)
        self._spool_copies.set(copies)

    def spool_retry(self, kind: str) -> None:
        """A spooled copy failed for now and was rescheduled."""
        _get(self._spool_retries, kind, "spool kind").inc()

    def split_copy(self, event: str, n: int = 1) -> None:
        """Split copies created (at spool time), delivered or failed (in the runner)."""
        _get(self._split_copies, event, "split copy event").inc(n)

    def quarantine_release(self, result: str) -> None:
        """One release recorded in the quarantine audit log."""
        _get(self._releases, result, "release result").inc()

    def notice(self, result: str) -> None:
        """A sender notice was spooled, or not (and why)."""
        _get(self._notices, result, "notice result").inc()

    # ---------------------------------------------------------------- process

    def config_reload(self, ok: bool) -> None:
        """A reload was attempted; on failure the old config stays in force."""
        self._reloads["success" if ok else "failure"].inc()


_V = TypeVar("_V")


def _get(children: Mapping[str, _V], key: str, what: str) -> _V:
    try:
        return children[key]
    except KeyError:
        raise ValueError(f"unknown {what} {key!r}; expected one of {tuple(children)}") from None


def exposition_registry(metrics: Metrics) -> CollectorRegistry:
    """The registry to serve on /metrics.

    In a single process that is the one the metrics live on. With
    `PROMETHEUS_MULTIPROC_DIR` set, it is a fresh registry whose only
    collector reads every worker's mmap files and aggregates them, so any
    process (typically the supervisor) can serve the whole relay's numbers.
    """
    path = multiprocess_dir()
    if path is None:
        return metrics.registry
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


__all__ = [
    "ACTIONS",
    "CAPABILITIES",
    "CONNECTION_RESULTS",
    "DEFAULT_RULE",
    "MAX_RULES",
    "MILTER_ERRORS",
    "MILTER_RESPONSES",
    "NOTICE_RESULTS",
    "OVERFLOW_RULE",
    "PREVENTING_ACTIONS",
    "RELEASE_RESULTS",
    "RELOAD_RESULTS",
    "REPLY_CLASSES",
    "SPLIT_COPY_EVENTS",
    "SPOOL_KINDS",
    "STORES",
    "UPSTREAM_FAILURE_KINDS",
    "UPSTREAM_STATE_KINDS",
    "Metrics",
    "exposition_registry",
    "multiprocess_dir",
    "reply_class",
    "rule_label",
]
