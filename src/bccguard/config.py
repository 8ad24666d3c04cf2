"""TOML configuration -> frozen dataclasses, with errors a mail admin can act on.

Every section is a dataclass whose fields are the public key names; the
loader walks them generically, so a typo'd key, a wrong type or a bad value
is reported as `server.max_recipients: expected an integer, got "ten"
(fix: ...)` instead of failing late or being ignored. The embedded defaults
run with no file at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import ipaddress
import math
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bccguard.policy.domains import normalize_domain
from bccguard.policy.model import Action, BusinessReplies, OnMalformed, OnSigned, RewriteTo

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration the relay must not start with; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _check(fn: Callable[[Any], Any], fix: str = "") -> dict[str, Any]:
    """Field metadata: a converter that raises ValueError, and the fix to suggest."""
    return {"check": fn, "fix": fix}


def parse_hostport(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """'127.0.0.1:10025', '[::1]:10025' or ':10025' -> (host, port)."""
    v = value.strip()
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep:
            raise ValueError("missing ']' after IPv6 address")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_s = v.rpartition(":")
        if not sep:
            host, port_s = v, ""
    if not port_s:
        if default_port is None:
            raise ValueError("missing port")
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad port {port_s!r}")
    return host or "0.0.0.0", int(port_s)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _listen(value: str) -> str:
    """A listen address serve can bind: an IP address, or a syntactically valid host name.

    Why here and not only at bind time: `config check` said "ok" to
    999.1.1.1:10025 and `serve` then refused it.
    """
    host, _ = parse_hostport(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if re.fullmatch(r"[0-9.]+", host):
            raise ValueError(f"{host!r} is not an IPv4 address") from None
        if ":" in host:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    return value


def _networks(values: list[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


# What no mail domain holds (non-ASCII is left to IDNA): "a.example, b.example"
# in one entry, or "*.a.example", would match no address at all, and the
# colleagues it was meant for would silently count as customers.
_NOT_IN_DOMAIN = re.compile(r"[^A-Za-z0-9._\-\x80-\U0010ffff]")


def _domains(values: list[str]) -> frozenset[str]:
    out = set()
    for v in values:
        d = v.strip()
        if d.startswith("[") and d.endswith("]"):  # an address literal, [192.0.2.1]
            out.add(normalize_domain(d))
            continue
        bad = _NOT_IN_DOMAIN.search(d)
        if not d.strip(".") or bad is not None:
            hint = ""
            if bad is not None and bad.group() in ", ;":
                hint = " (one domain per entry: a list item each, or --internal-domain once per domain)"
            elif bad is not None and bad.group() == "*":
                hint = f" (subdomains are included: write {d.lstrip('*.')!r})"
            raise ValueError(f"{v!r} is not a domain{hint}")
        out.add(normalize_domain(d.lstrip(".")))
    return frozenset(out)


def _positive(v: int | float) -> int | float:
    if v <= 0:
        raise ValueError(f"{v} is not positive")
    return v


# RFC 5321 4.5.3.2.6: a client waits 10 minutes for the reply to its final
# dot; the whole upstream delivery must end well before that.
CLIENT_FINAL_REPLY_WAIT = 600.0


def _delivery_timeout(v: str | int | float) -> float:
    seconds = parse_duration(v)
    if not 0 < seconds < CLIENT_FINAL_REPLY_WAIT:
        raise ValueError(f"{v} is not between 0 and {CLIENT_FINAL_REPLY_WAIT:g} seconds")
    return seconds


def _fraction(v: float) -> float:
    if not 0 < v <= 1:
        raise ValueError(f"{v} is not in (0, 1]")
    return v


def _non_negative(v: int) -> int:
    if v < 0:
        raise ValueError(f"{v} is negative")
    return v


AUTO_WORKERS_MAX = 8


def auto_worker_count(affinity: int, cpu_max: str | None) -> int:
    """`workers = "auto"`: one process per CPU this relay may actually use.

    `affinity` is how many CPUs the scheduler lets it run on; `cpu_max` is the
    cgroup v2 quota file's text ("max 100000" or "150000 100000"), None
    outside a cgroup. A container limited to 1.5 CPUs on a 64-core host gets
    2, not 64 (the mistake nproc-based defaults make). Capped at
    AUTO_WORKERS_MAX: beyond that the per-worker shares of max_sessions and
    max_sessions_per_ip get coarse (the kernel hashes connections to workers)
    and the upstream MTA is the bottleneck anyway; a number goes higher.
    """
    count = max(1, affinity)
    if cpu_max:
        quota, _, period = cpu_max.strip().partition(" ")
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            count = min(count, max(1, -(-int(quota) // int(period))))
    return min(count, AUTO_WORKERS_MAX)


def usable_workers() -> int:
    """auto_worker_count() for this process: sched affinity and its cgroup's cpu.max."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    cpu_max = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        cpu_max = Path("/sys/fs/cgroup/cpu.max").read_text("ascii")
    return auto_worker_count(affinity, cpu_max)


def _workers(value: Any) -> int:
    """`"auto"` or a positive count, checked as every other count is."""
    if value == "auto":
        return usable_workers()
    return int(_positive(_coerce_scalar(value, int)))


def builtin_consumer_domains() -> frozenset[str]:
    """The packaged list of personal mailbox providers (one domain a line, # comments)."""
    text = resources.files("bccguard").joinpath("data/consumer_domains.txt").read_text("utf-8")
    return frozenset(
        normalize_domain(line.split("#", 1)[0].strip())
        for line in text.splitlines()
        if line.split("#", 1)[0].strip()
    )


def _consumer(value: str | list[str]) -> frozenset[str]:
    if not isinstance(value, str | list) or (
        isinstance(value, list) and not all(isinstance(v, str) for v in value)
    ):
        raise ValueError(f'expected "builtin" or a list of domains, got {_describe(value)}')
    if isinstance(value, str):
        if value != "builtin":
            raise ValueError(f'{value!r} is neither "builtin" nor a list of domains')
        return builtin_consumer_domains()
    names = [v for v in value if v != "builtin"]
    base = builtin_consumer_domains() if len(names) != len(value) else frozenset()
    return base | _domains(names)



DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION_FORMS = '"45s", "90m", "12h", "1h30m", "30d" or "2w"'
# One or more number+unit parts, largest unit first, each unit at most once:
# "1h30m" as Go, Prometheus and systemd write it; "30m1h" or "5m5m" is a typo.
_DURATION_RE = re.compile(
    r"(?:(\d+(?:\.\d+)?)\s*w\s*)?(?:(\d+(?:\.\d+)?)\s*d\s*)?(?:(\d+(?:\.\d+)?)\s*h\s*)?"
    r"(?:(\d+(?:\.\d+)?)\s*m\s*)?(?:(\d+(?:\.\d+)?)\s*s)?"
)
_DURATION_STEPS = (604800, 86400, 3600, 60, 1)


def parse_duration(value: str | int | float) -> float:
    """The one duration syntax of bccguard: '45s', '90m', '1h30m', '30d', '2w' -> seconds.

    Text needs a unit. Why: `purge --older-than 30` once meant 30 seconds and
    emptied a quarantine; an admin who writes "30" means days as often as
    seconds, so a bare number is refused with the forms that work. A TOML
    number (`timeout = 60.0`) is seconds, as the config always read it.
    Zero, negative and non-finite values (TOML has `nan` and `inf`) are
    refused: a timer of nan or inf seconds never fires, or fires at once.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like {DURATION_FORMS}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        v = value.strip().lower()
        m = _DURATION_RE.fullmatch(v)
        if not v or m is None:
            rest = v[1:].lstrip()
            if v.startswith("-") and rest and _DURATION_RE.fullmatch(rest):
                raise ValueError(f"{value!r} is not a positive duration")
            try:
                if not math.isfinite(float(v)):
                    raise ValueError(v)
            except ValueError:
                raise ValueError(f"{value!r} is not a duration (use {DURATION_FORMS})") from None
            raise ValueError(f"{value!r} has no unit (use {DURATION_FORMS})")
        seconds = sum(float(n) * step for n, step in zip(m.groups(), _DURATION_STEPS, strict=True) if n)
    if not seconds > 0:  # also nan
        raise ValueError(f"{value!r} is not a positive duration")
    if math.isinf(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    return seconds


def _seconds(example: str) -> dict[str, Any]:
    """Metadata for a duration key: a TOML number (seconds) or a duration string."""
    return {**_check(parse_duration, f"a duration such as {example}, or a number of seconds"), "raw": True}


UPSTREAM_SCHEMES = ("smtp", "smtp+starttls", "smtps", "maildir")


def _upstream_url(value: str) -> str:
    scheme, _, rest = value.partition(":")
    if scheme not in UPSTREAM_SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not one of {', '.join(UPSTREAM_SCHEMES)}")
    if scheme == "maildir":
        if not rest.strip("/"):
            raise ValueError("maildir: needs a directory, as in maildir:var/outbox")
        return value
    parts = urlsplit(value)
    if not parts.hostname:
        raise ValueError("missing host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port ({exc})") from None
    return value


@dataclass(frozen=True)
class TLSConfig:
    """Inbound STARTTLS. Empty cert/key: STARTTLS is not offered."""

    cert: str = ""
    key: str = ""
    require_tls: bool = False
    min_version: str = field(
        default="TLSv1.2",
        metadata=_check(
            lambda v: v if v in ("TLSv1.2", "TLSv1.3") else _raise(f"{v!r} is not TLSv1.2/TLSv1.3"),
            'use "TLSv1.2" or "TLSv1.3"',
        ),
    )


@dataclass(frozen=True)
class ServerConfig:
    listen: str = field(
        default="127.0.0.1:10025",
        metadata=_check(
            lambda v: _listen(v) if v else v,
            'use "host:port", e.g. "127.0.0.1:10025", or "" with a [milter] listener only',
        ),
    )
    hostname: str = field(default_factory=socket.gethostname)
    allowed_networks: tuple[IPNetwork, ...] = field(
        default=_networks(["127.0.0.0/8", "::1/128"]),
        metadata=_check(_networks, 'list CIDR networks, e.g. ["127.0.0.0/8", "10.0.0.0/8"]'),
    )
    max_message_size: int = field(
        default=25 * 1024 * 1024, metadata=_check(_positive, "a size in bytes, e.g. 26214400")
    )
    max_recipients: int = field(default=1000, metadata=_check(_positive, "e.g. 1000"))
    max_header_size: int = field(
        default=1024 * 1024, metadata=_check(_positive, "a size in bytes, e.g. 1048576")
    )
    max_sessions: int = field(default=500, metadata=_check(_positive, "e.g. 500"))
    max_sessions_per_ip: int = field(default=50, metadata=_check(_positive, "e.g. 50"))
    command_timeout: float = field(default=300.0, metadata=_seconds('"5m"'))
    data_timeout: float = field(default=600.0, metadata=_seconds('"10m"'))
    max_bad_commands: int = field(default=20, metadata=_check(_positive, "e.g. 20"))
    # Postfix-style stress: past this fraction of max_sessions, command and idle
    # timeouts (and the DATA budget) shrink to stress_timeout, so idle and
    # trickling sessions are cut first and real clients find a free slot.
    stress_threshold: float = field(
        default=0.8, metadata=_check(_fraction, "a fraction of max_sessions, e.g. 0.8 (1.0: never)")
    )
    stress_timeout: float = field(default=10.0, metadata=_seconds('"10s" (as Postfix)'))
    # Postfix's smtpd_min_data_rate: each byte received during DATA buys
    # 1/min_data_rate more seconds, so big uploads at a sane rate never time
    # out while a trickle is cut about data_timeout after DATA began.
    min_data_rate: int = field(default=500, metadata=_check(_positive, "bytes per second, e.g. 500"))
    # AUTH PLAIN/LOGIN against `user:hash` lines (`bccguard passwd`); only over TLS.
    auth_file: str = ""
    max_auth_failures: int = field(default=3, metadata=_check(_positive, "e.g. 3"))
    shutdown_timeout: float = field(default=30.0, metadata=_seconds('"30s"'))
    proxy_protocol: bool = False
    # Who may send a PROXY header (the load balancers): required with
    # proxy_protocol, else anyone reaching the port could claim an allowed
    # client address. Connections from elsewhere are closed before the greeting.
    proxy_trusted_networks: tuple[IPNetwork, ...] = field(
        default=(),
        metadata=_check(_networks, 'list the load balancers\' CIDR networks, e.g. ["10.0.0.5/32"]'),
    )
    # Processes sharing the port (SO_REUSEPORT) under one supervisor; 1: no
    # supervisor. "auto" (the default) is resolved here, at load, to one per
    # usable CPU: a relay is one Python loop per core, so one process leaves
    # the other cores idle while clients wait.
    workers: int = field(
        default_factory=usable_workers,
        metadata={**_check(_workers, '"auto" or a process count, e.g. 2'), "raw": True},
    )
    # "auto": uvloop when it is installed (a default dependency on Linux and macOS), else asyncio's own loop.
    event_loop: str = field(
        default="auto",
        metadata=_check(
            lambda v: v if v in ("auto", "asyncio", "uvloop") else _raise(f"{v!r} is not an event loop"),
            '"auto", "asyncio" or "uvloop"',
        ),
    )
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = field(
        default="maildir:var/outbox",
        metadata=_check(
            _upstream_url, 'use "smtp://host:port", "smtp+starttls://…", "smtps://…" or "maildir:DIR"'
        ),
    )
    timeout: float = field(default=60.0, metadata=_seconds('"1m"'))
    # One deadline for the whole delivery of a message, however many steps it takes.
    delivery_timeout: float = field(
        default=120.0,
        metadata={
            **_check(_delivery_timeout, 'a duration under the 600 s a client waits for its reply, e.g. "2m"'),
            "raw": True,
        },
    )
    helo_name: str = ""
    verify_tls: bool = True
    ca_file: str = ""
    pool_size: int = field(default=20, metadata=_check(_non_negative, "0 disables pooling"))
    pool_idle: float = field(default=30.0, metadata=_seconds('"30s"'))


@dataclass(frozen=True)
class QuarantineConfig:
    path: str = "var/quarantine"


def _durations(values: Any) -> tuple[float, ...]:
    if not isinstance(values, list):
        raise ValueError(f"expected a list of durations, got {_describe(values)}")
    if not values:
        raise ValueError("needs at least one step")
    return tuple(parse_duration(v) for v in values)


@dataclass(frozen=True)
class SpoolConfig:
    """Copies answered 250 but not yet accepted upstream (partial refusals, split copies)."""

    path: str = "var/spool"
    retry_schedule: tuple[float, ...] = field(
        default=(60.0, 300.0, 900.0, 1800.0, 3600.0),
        metadata={
            **_check(_durations, 'a list of durations, e.g. ["1m", "5m", "15m", "30m", "1h"]'),
            "raw": True,
        },
    )
    max_age: float = field(
        default=5 * 86400.0,
        metadata=_seconds('"5d"'),
    )


def _mailbox(value: str) -> str:
    if value and (value.count("@") != 1 or any(c in value for c in " <>\r\n\t,;")):
        raise ValueError(f"{value!r} is not a plain address")
    return value


@dataclass(frozen=True)
class NotifyConfig:
    """Sender notices: a short plain-text note to the envelope sender after a change.

    Off by default: an admin turns them on once the policy is tuned, so
    senders are taught the Bcc habit rather than flooded during an audit.
    `rate_limit` counts notices per sender per hour in each relay process
    (kept in memory: a restart forgets it, so a sender may get a few more).
    Empty `from` means `postmaster@<server.hostname>`.
    """

    enabled: bool = False
    rate_limit: int = field(
        default=10, metadata=_check(_non_negative, "notices per sender per hour, e.g. 10")
    )
    from_: str = field(
        default="",
        metadata={**_check(_mailbox, 'an address, e.g. "postmaster@corp.example"'), "key": "from"},
    )


def milter_listen(value: str) -> tuple[str, str, int]:
    """`inet:host:port` (also `inet6:`), `unix:/path` (also `local:`) -> (kind, host or path, port)."""
    kind, sep, rest = value.partition(":")
    if not sep or not rest:
        raise ValueError(f"{value!r} has no kind")
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"{rest!r} is not an absolute path")
        return "unix", rest, 0
    if kind in ("inet", "inet6"):
        # Sendmail's own spelling is `inet:port@host`; Postfix's is `inet:host:port`. Both work.
        if "@" in rest:
            port_s, _, host = rest.partition("@")
            rest = f"[{host}]:{port_s}" if ":" in host else f"{host}:{port_s}"
        host, port = parse_hostport(rest)
        return "inet", host, port
    raise ValueError(f"{kind!r} is not inet or unix")


def _milter_listen(value: str) -> str:
    if value:
        milter_listen(value)
    return value


def _mode(value: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f"{value!r} is not an octal mode")
    return value


@dataclass(frozen=True)
class MilterConfig:
    """The milter listener: the MTA (Postfix `smtpd_milters`) asks bccguard inside its own transaction.

    Empty `listen`: no milter listener. `mode`/`owner`/`group` apply to a
    unix socket (Postfix's smtpd runs as `postfix`, inside a chroot when
    configured so: put the socket where it can reach it). `quarantine`:
    "bccguard" holds the message in bccguard's quarantine (then tells the
    MTA to discard it); "mta" asks the MTA to hold it (Postfix: the hold
    queue, released with `postsuper -H`).
    """

    listen: str = field(
        default="",
        metadata=_check(
            _milter_listen, 'use "inet:127.0.0.1:8891", "unix:/run/bccguard/milter.sock" or "" for none'
        ),
    )
    mode: str = field(default="0660", metadata=_check(_mode, 'an octal mode string, e.g. "0660"'))
    owner: str = ""
    group: str = ""
    quarantine: str = field(
        default="bccguard",
        metadata=_check(
            lambda v: v if v in ("bccguard", "mta") else _raise(f"{v!r} is not bccguard or mta"),
            '"bccguard" (its own quarantine) or "mta" (the MTA\'s hold queue)',
        ),
    )


@dataclass(frozen=True)
class MetricsConfig:
    """Empty listen: no HTTP endpoint (metrics still counted in-process)."""

    listen: str = field(
        default="127.0.0.1:9465",
        metadata=_check(lambda v: _listen(v) if v else v, 'use "host:port" or "" to disable'),
    )


@dataclass(frozen=True)
class ConsoleTLSConfig:
    """HTTPS for the console. Empty cert/key: plain HTTP (keep it on loopback then)."""

    cert: str = ""
    key: str = ""


CONSOLE_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _quarantine_paths(values: list[str]) -> tuple[str, ...]:
    """Directories or globs; each a non-empty path (the shape was checked by the walker)."""
    for v in values:
        if not v.strip() or "\0" in v:
            raise ValueError(f"{_describe(v)} is not a directory or a glob")
    if len(set(values)) != len(values):
        raise ValueError("lists a directory twice")
    return tuple(values)


@dataclass(frozen=True)
class ConsoleConfig:
    """`bccguard console`: the web console over the quarantine, its own process.

    Accounts live in `users_file` (`bccguard console-user add NAME --role ...`);
    the console refuses to start without one. Sessions are kept in the
    console's memory, so a restart logs everyone out.
    """

    listen: str = field(
        default="127.0.0.1:9466",
        metadata=_check(_listen, 'use "host:port", e.g. "127.0.0.1:9466"'),
    )
    users_file: str = ""
    session_ttl: float = field(
        default=8 * 3600.0,
        metadata={**_check(parse_duration, 'a duration, e.g. "8h"'), "raw": True},
    )
    page_size: int = field(default=50, metadata=_check(_positive, "messages per page, e.g. 50"))
    # Failed logins per account and per client address within `login_window`
    # before further attempts are refused until the window has passed.
    max_login_failures: int = field(default=5, metadata=_check(_positive, "e.g. 5"))
    login_window: float = field(
        default=900.0,
        metadata={**_check(parse_duration, 'a duration, e.g. "15m"'), "raw": True},
    )
    # Every quarantine directory the console shows (paths or globs such as
    # "/var/lib/bccguard/quarantine/*", expanded on every request): relays on a
    # shared volume each have their own directory. Empty: quarantine.path alone.
    quarantine_paths: tuple[str, ...] = field(
        default=(),
        metadata=_check(
            _quarantine_paths, 'a list of directories or globs, e.g. ["/var/lib/bccguard/quarantine/*"]'
        ),
    )
    tls: ConsoleTLSConfig = field(default_factory=ConsoleTLSConfig)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = field(
        default="info",
        metadata=_check(
            lambda v: (
                v.lower()
                if v.lower() in ("debug", "info", "warning", "error")
                else _raise(f"{v!r} is not a level")
            ),
            'one of "debug", "info", "warning", "error"',
        ),
    )
    format: str = field(
        default="auto",
        metadata=_check(
            lambda v: v if v in ("auto", "json", "console") else _raise(f"{v!r} is not a format"),
            '"auto" (console on a terminal, else JSON), "json" or "console"',
        ),
    )
    log_addresses: bool = False


DLP_DETECTORS = ("email", "phone", "iban", "card", "national_id", "customer_table")
DLP_ACTIONS = ("pass", "audit", "quarantine", "reject")
DLP_SOFT_ACTIONS = ("pass", "audit", "quarantine")


def _regions(values: list[str]) -> tuple[str, ...]:
    """ISO 3166 alpha-2 codes the phone library knows (it also drives national IDs)."""
    import phonenumbers  # lazy: only configs that name regions pay for the import

    known = phonenumbers.SUPPORTED_REGIONS
    out = []
    for v in values:
        code = v.strip().upper()
        if code not in known:
            raise ValueError(f"{v!r} is not a region code")
        out.append(code)
    if not out:
        raise ValueError("needs at least one region")
    return tuple(dict.fromkeys(out))


def _detectors(values: list[str]) -> tuple[str, ...]:
    for v in values:
        if v not in DLP_DETECTORS:
            raise ValueError(f"{v!r} is not a detector")
    return tuple(dict.fromkeys(values))


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(v: str) -> str:
        if v not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
        return v

    return check


@dataclass(frozen=True)
class DlpSettings:
    """`[dlp]`: customer data in bodies and attachments (README "Customer data").

    Off by default so an upgrade changes nothing. Each key may be overridden
    per `[[policy.rules]]` entry as `dlp_<key>`; a rule then holds a merged copy.
    Thresholds count distinct instances of one detector in the whole message.
    """

    enabled: bool = False
    regions: tuple[str, ...] = field(
        default=("GB",), metadata=_check(_regions, 'ISO country codes, e.g. ["GB", "IE"]')
    )
    detectors: tuple[str, ...] = field(
        default=DLP_DETECTORS,
        metadata=_check(_detectors, f"a list from {', '.join(DLP_DETECTORS)}"),
    )
    low: int = field(default=1, metadata=_check(_positive, "distinct instances, e.g. 1"))
    high: int = field(default=10, metadata=_check(_positive, "distinct instances, e.g. 10"))
    low_action: str = field(
        default="audit", metadata=_check(_one_of(DLP_ACTIONS), " | ".join(DLP_ACTIONS))
    )
    high_action: str = field(
        default="quarantine", metadata=_check(_one_of(DLP_ACTIONS), " | ".join(DLP_ACTIONS))
    )
    unreadable: str = field(
        default="audit", metadata=_check(_one_of(DLP_SOFT_ACTIONS), " | ".join(DLP_SOFT_ACTIONS))
    )
    over_limit: str = field(
        default="audit", metadata=_check(_one_of(DLP_ACTIONS), " | ".join(DLP_ACTIONS))
    )


@dataclass(frozen=True)
class PolicySettings:
    """The [policy] keys a rule may override; a rule holds a full merged copy."""

    internal_domains: frozenset[str] = field(
        default=frozenset(), metadata=_check(_domains, 'list domains, e.g. ["corp.example"]')
    )
    partner_domains: frozenset[str] = field(
        default=frozenset(), metadata=_check(_domains, 'list domains, e.g. ["agency.example"]')
    )
    consumer_domains: frozenset[str] = field(
        default_factory=builtin_consumer_domains,
        metadata={**_check(_consumer, '"builtin" or a list of domains (may include "builtin")'), "raw": True},
    )
    max_visible_external: int = field(default=10, metadata=_check(_non_negative, "e.g. 10"))
    max_visible_consumer: int = field(default=1, metadata=_check(_non_negative, "e.g. 1"))
    action: Action = Action.REWRITE
    rewrite_to: RewriteTo = RewriteTo.SENDER
    # Reply-all storm guard: rewritten/split copies get `Reply-To: <From>` when they have none,
    # so a customer's "reply all" goes to the sender, not to every colleague left in Cc.
    reply_to_sender: bool = False
    # A message DKIM-signed over To/Cc that a rewrite would break. "rewrite"
    # by default: privacy first, and the corporate MTA behind bccguard
    # usually signs again (see policy/dkim.py for the reasoning).
    on_signed: OnSigned = OnSigned.REWRITE
    # An exposure in recipient fields after a line that ended the header
    # section (the MTA delivers them as body text, which bccguard never edits).
    on_malformed: OnMalformed = OnMalformed.QUARANTINE
    # A reply (In-Reply-To or References) that shows no consumer address is a
    # business thread ("pass"), or counted like any message ("count").
    business_replies: BusinessReplies = BusinessReplies.PASS
    # Not a [policy] key: the [dlp] section, merged with a rule's `dlp_<key>`
    # overrides, so the engine reads one settings object per rule.
    dlp: DlpSettings = field(default_factory=DlpSettings, metadata={"internal": True})


@dataclass(frozen=True)
class Rule:
    """`[[policy.rules]]`: the first rule whose criteria all match wins.

    `senders` globs match the envelope sender (or the AUTH user, as before);
    `users` globs match only the authenticated user. A rule names at least
    one of them; when it names both, both must match.
    """

    name: str
    senders: tuple[str, ...]
    settings: PolicySettings
    users: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyConfig:
    defaults: PolicySettings = field(default_factory=PolicySettings)
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    dlp: DlpSettings = field(default_factory=DlpSettings)
    milter: MilterConfig = field(default_factory=MilterConfig)
    source: str = "embedded defaults"


def _raise(msg: str) -> Any:
    raise ValueError(msg)


# ---------------------------------------------------------------- the walker

_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"


def _coerce_scalar(value: Any, tp: Any) -> Any:
    """Check a TOML value against a plain annotation; raise ValueError naming the expectation."""
    if isinstance(tp, type) and issubclass(tp, Enum):
        choices = [m.value for m in tp]
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {_describe(value)}")
        return tp(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ValueError(f"expected {_TYPE_WORDS[tp]}, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r}")  # a bug in this module, not the user's


def _raw_type_ok(value: Any, tp: Any) -> bool:
    """Coarse TOML shape check for fields that carry their own converter."""
    origin = typing.get_origin(tp)
    if origin in (tuple, frozenset, list):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return True


def _build(cls: type[Any], data: dict[str, Any], path: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    # A field whose public key is a Python keyword (`from`) names it in metadata["key"].
    fields = {
        f.metadata.get("key", f.name): f
        for f in dataclasses.fields(cls)
        if f.init and f.name != "source" and not f.metadata.get("internal", False)
    }
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}{key}"
        f = fields.get(key)
        if f is None:
            problems.append(f"{where}: unknown key ({_suggest(key, fields)})")
            continue
        key = f.name  # noqa: PLW2901 - from here on, the Python name
        tp = hints[key]
        check = f.metadata.get("check")
        fix = f.metadata.get("fix", "")
        hint = f" (fix: {fix})" if fix else ""
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a [{where}] table, got {_describe(value)}")
                continue
            kwargs[key] = _build(tp, value, f"{where}.", problems)  # type: ignore[arg-type]
            continue
        try:
            if check is not None:
                if not f.metadata.get("raw", False) and not _raw_type_ok(value, tp):
                    raise ValueError(f"expected a list of strings, got {_describe(value)}")
                base = typing.get_origin(tp) is None and tp in (int, float, str, bool)
                base = base and not f.metadata.get("raw", False)
                kwargs[key] = check(_coerce_scalar(value, tp) if base else value)
            else:
                kwargs[key] = _coerce_scalar(value, tp)
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: {exc}{hint}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required key
        problems.append(f"{path.rstrip('.') or 'config'}: {exc}")
        return None


_RULE_KEYS = {"name", "senders", "users"}
# Rule names become metric label values and log fields: a closed, boring alphabet.
RULE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


DLP_PREFIX = "dlp_"


def _build_policy(data: dict[str, Any], problems: list[str], dlp: DlpSettings | None = None) -> PolicyConfig:
    data = dict(data)
    raw_rules = data.pop("rules", [])
    defaults = _build(PolicySettings, data, "policy.", problems) or PolicySettings()
    dlp = dlp or DlpSettings()
    defaults = dataclasses.replace(defaults, dlp=dlp)
    dlp_names = {f"{DLP_PREFIX}{f.name}" for f in dataclasses.fields(DlpSettings)}
    if not isinstance(raw_rules, list):
        problems.append("policy.rules: expected [[policy.rules]] tables")
        return PolicyConfig(defaults=defaults)
    rules: list[Rule] = []
    seen: set[str] = set()
    setting_names = {f.name for f in dataclasses.fields(PolicySettings)}
    for i, raw in enumerate(raw_rules):
        where = f"policy.rules[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table")
            continue
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f'{where}.name: missing (fix: name = "marketing")')
            name = f"rule{i}"
        elif not RULE_NAME_RE.fullmatch(name):
            problems.append(
                f"{where}.name: {name!r} is not a rule name (fix: letters, digits, '_', '.', '-'; at most 64)"
            )
        elif name in seen:
            problems.append(f"{where}.name: {name!r} is used twice (fix: give each rule its own name)")
        seen.add(name)
        senders = _patterns(raw, "senders", where, problems, 'senders = ["*@marketing.corp.example"]')
        users = _patterns(raw, "users", where, problems, 'users = ["alice", "*@marketing.corp.example"]')
        if "senders" not in raw and "users" not in raw:
            problems.append(
                f'{where}: a rule needs senders or users '
                f'(fix: senders = ["*@marketing.corp.example"] or users = ["alice"])'
            )
        overrides = {k: v for k, v in raw.items() if k not in _RULE_KEYS and k not in dlp_names}
        for k in list(overrides):
            if k not in setting_names or k == "dlp":
                known = (setting_names - {"dlp"}) | _RULE_KEYS | dlp_names
                problems.append(f"{where}.{k}: unknown key ({_suggest(k, known)})")
                del overrides[k]
        dlp_over = {k[len(DLP_PREFIX) :]: v for k, v in raw.items() if k in dlp_names}
        sub = _build(PolicySettings, overrides, f"{where}.", problems)
        sub_dlp = _build(DlpSettings, dlp_over, f"{where}.{DLP_PREFIX}", problems)
        if sub is None or sub_dlp is None:
            continue
        rule_dlp = dataclasses.replace(dlp, **{k: getattr(sub_dlp, k) for k in dlp_over})
        merged = dataclasses.replace(
            defaults, dlp=rule_dlp, **{k: getattr(sub, k) for k in overrides}
        )
        rules.append(
            Rule(
                name=name,
                senders=tuple(s.lower() for s in senders),
                settings=merged,
                users=tuple(u.lower() for u in users),
            )
        )
    return PolicyConfig(defaults=defaults, rules=tuple(rules))


def _patterns(raw: dict[str, Any], key: str, where: str, problems: list[str], fix: str) -> list[str]:
    """A rule's optional list of glob patterns; absent is [], present must be non-empty strings."""
    if key not in raw:
        return []
    value = raw[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}.{key}: expected a non-empty list of patterns (fix: {fix})")
        return []
    return list(value)


def from_dict(data: dict[str, Any], *, source: str = "embedded defaults") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    data = dict(data)
    policy_raw = data.pop("policy", {})
    cfg = _build(Config, data, "", problems)
    if not isinstance(policy_raw, dict):
        problems.append("policy: expected a [policy] table")
        policy_raw = {}
    policy = _build_policy(policy_raw, problems, cfg.dlp if cfg is not None else None)
    if problems or cfg is None:
        raise ConfigError([f"{source}: {p}" for p in problems])
    cfg = dataclasses.replace(cfg, policy=policy, source=source)
    _cross_checks(cfg, source)
    return typing.cast(Config, cfg)


def _cross_checks(cfg: Config, source: str) -> None:
    problems = []
    tls = cfg.server.tls
    if bool(tls.cert) != bool(tls.key):
        problems.append("server.tls: cert and key go together (fix: set both paths, or neither)")
    if tls.require_tls and not tls.cert:
        problems.append("server.tls.require_tls: needs server.tls.cert and key")
    for label, p in (("server.tls.cert", tls.cert), ("server.tls.key", tls.key)):
        if p and not Path(p).is_file():
            problems.append(f"{label}: {p} does not exist (fix: point it at a PEM file)")
    if cfg.server.auth_file and not tls.cert:
        problems.append(
            "server.auth_file: AUTH is only offered over TLS (fix: set server.tls.cert and key)"
        )
    ctls = cfg.console.tls
    if bool(ctls.cert) != bool(ctls.key):
        problems.append("console.tls: cert and key go together (fix: set both paths, or neither)")
    for label, p in (("console.tls.cert", ctls.cert), ("console.tls.key", ctls.key)):
        if p and not Path(p).is_file():
            problems.append(f"{label}: {p} does not exist (fix: point it at a PEM file)")
    if cfg.server.proxy_protocol and not cfg.server.proxy_trusted_networks:
        problems.append(
            "server.proxy_trusted_networks: required when server.proxy_protocol = true, or anyone "
            'could claim a client address (fix: list the load balancers, e.g. ["10.0.0.5/32"])'
        )
    if cfg.upstream.ca_file and not Path(cfg.upstream.ca_file).is_file():
        problems.append(f"upstream.ca_file: {cfg.upstream.ca_file} does not exist")
    problems += _listen_clashes(cfg)
    if cfg.server.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        problems.append(
            "server.event_loop: uvloop is not installed (fix: pip install uvloop, or \"auto\")"
        )
    for name, settings in (("", cfg.policy.defaults), *((r.name, r.settings) for r in cfg.policy.rules)):
        if settings.dlp.low > settings.dlp.high:
            where = f"policy.rules {name!r}: dlp_low" if name else "dlp.low"
            problems.append(
                f"{where}: {settings.dlp.low} is above high ({settings.dlp.high}) (fix: low <= high)"
            )
    problems += _milter_checks(cfg)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])


def _milter_checks(cfg: Config) -> list[str]:
    """A listener at all; a socket owner and group that exist on this host."""
    import grp
    import pwd

    problems = []
    m = cfg.milter
    if not cfg.server.listen and not m.listen:
        problems.append('server.listen: empty, and no [milter] listen either (fix: set at least one)')
    for key, value, lookup in (("owner", m.owner, pwd.getpwnam), ("group", m.group, grp.getgrnam)):
        if value and not value.isdigit():
            try:
                lookup(value)
            except KeyError:
                problems.append(f"milter.{key}: no such {'user' if key == 'owner' else 'group'} {value!r}")
    return problems


_WILDCARDS = ("", "0.0.0.0", "::")


def _listen_clashes(cfg: Config) -> list[str]:
    """Two of bccguard's own sockets on one port: serve (or the console) would fail with
    "address already in use", and the fix it gives (find the other process) points at us."""
    keys = [("server.listen", cfg.server.listen), ("metrics.listen", cfg.metrics.listen),
            ("console.listen", cfg.console.listen)]  # fmt: skip
    bound = [(key, *parse_hostport(value)) for key, value in keys if value]
    if cfg.milter.listen:
        kind, host, port = milter_listen(cfg.milter.listen)
        if kind == "inet":
            bound.append(("milter.listen", host, port))
    problems = []
    for i, (key_a, host_a, port_a) in enumerate(bound):
        for key_b, host_b, port_b in bound[i + 1 :]:
            same_host = host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS
            if port_a and port_a == port_b and same_host:
                problems.append(
                    f"{key_b}: port {port_b} is also {key_a}'s (fix: give each its own port)"
                )
    return problems


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a config file, or the embedded defaults when `path` is None.

    `overrides` (from `serve --listen` and friends) is TOML-shaped data laid
    over the file: checked on its own first, so a bad flag is reported as
    the command line's, not the file's, and applied again on every reload.
    """
    if overrides:
        from_dict(overrides, source="command line")
    if path is None:
        return from_dict(overrides or {})
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file (fix: pass --config with an existing file)"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: TOML syntax error: {exc}"]) from None
    return from_dict(_merge(data, overrides or {}), source=str(p))


def upstream_parts(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) with the scheme's default port filled in."""
    scheme, _, rest = url.partition(":")
    if scheme == "maildir":
        return scheme, "", 0, rest
    parts = urlsplit(url)
    default = 465 if scheme == "smtps" else 25
    return scheme, parts.hostname or "", parts.port or default, ""


__all__ = [
    "Config",
    "ConfigError",
    "ConsoleConfig",
    "DlpSettings",
    "LoggingConfig",
    "MetricsConfig",
    "MilterConfig",
    "NotifyConfig",
    "PolicyConfig",
    "PolicySettings",
    "QuarantineConfig",
    "Rule",
    "ServerConfig",
    "SpoolConfig",
    "TLSConfig",
    "UpstreamConfig",
    "from_dict",
    "load",
    "parse_hostport",
    "upstream_parts",
]
