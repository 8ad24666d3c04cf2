"""The console's own counters, served on its own `/metrics` (a separate process from the relay).

Label values come from closed sets, never a name, an id or an address.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

LOGIN_RESULTS = ("ok", "failed", "rate_limited", "bad_request")
ACTION_KINDS = ("release", "release_rewrite", "release_split", "delete", "purge", "reveal", "raw")
ACTION_RESULTS = ("done", "partial", "failed", "forbidden")
ERROR_KINDS = ("csrf", "internal", "ambiguous")


class ConsoleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, version: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.logins = Counter(
            "bccguard_console_logins", "Console login attempts by result", ["result"], registry=r
        )
        self.actions = Counter(
            "bccguard_console_actions",
            "Console actions on held messages, per message, by kind and result",
            ["kind", "result"],
            registry=r,
        )
        self.errors = Counter(
            "bccguard_console_errors",
            "Console requests refused (bad CSRF token, an id held in two directories) or failed unexpectedly",
            ["kind"],
            registry=r,
        )
        self.sessions = Gauge("bccguard_console_sessions", "Console sessions alive", registry=r)
        info = Gauge("bccguard_console_info", "Console version", ["version"], registry=r)
        info.labels(version=version).set(1)
        for res in LOGIN_RESULTS:
            self.logins.labels(result=res)
        for k in ACTION_KINDS:
            for res in ACTION_RESULTS:
                self.actions.labels(kind=k, result=res)
        for k in ERROR_KINDS:
            self.errors.labels(kind=k)
