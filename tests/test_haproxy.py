"""Several relays behind one address: HAProxy, the PROXY protocol v2, one relay stopped mid-stream.

    client (from 127.0.0.5) --> HAProxy 127.0.0.1:F
        --send-proxy-v2, from 127.0.0.9--> relay A | relay B --> sink

The relays are real `bccguard serve` processes with `proxy_protocol = true` and
`allowed_networks = ["127.0.0.5/32"]`: only the real client may relay, not
the proxy's own address, so every accepted message also proves the PROXY
header was read. HAProxy (Debian's package, a private config on loopback
ports) health-checks both with `option smtpchk` over the PROXY protocol.

The client behaves like an MTA: a fresh connection per message, and on any
4xx, refused or cut connection it tries again (after a short pause) until it
gets a 250 or a 5xx. Relay A gets SIGTERM once a third of the stream is
through. Then: every Message-ID arrives at the sink, and arrives once. A
duplicate is only possible when a connection is cut after the final dot was
sent and before the reply was read (the client cannot know whether the relay
took it, so it must resend: SMTP's at-least-once); such "ambiguous" retries
are counted, and duplicates may never exceed them.

Seen while writing this test: a draining relay answers QUIT with 421 on a
session whose message it already accepted, and smtplib's context manager turns
that 421 into an exception; a client that retried on it delivered one message
twice. The client below counts the message as sent at the 250 (`quit_failed`
counts those QUITs), as an MTA does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy_helpers import RelayProcess, free_port, poll, require_binary, to_toml
from sink import Sink

pytestmark = pytest.mark.haproxy

N = 200
WORKERS = 8
CLIENT_IP = "127.0.0.5"  # the real client
PROXY_SOURCE = "127.0.0.9"  # HAProxy's source address towards the relays
DEADLINE = 120.0


HAPROXY_CFG = """\
global
    maxconn 2000
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # A relay that stopped listening refuses the connection: try the other one.
    retries 3
    option redispatch

frontend smtp
    bind 127.0.0.1:{front}
    default_backend relays

backend relays
    balance roundrobin
    # SMTP health check (EHLO/HELO, expects 2xx), itself sent over the PROXY protocol.
    option smtpchk HELO haproxy.test
    default-server send-proxy-v2 check-send-proxy check inter 300ms fall 1 rise 2 source {proxy_source}
    server a 127.0.0.1:{port_a}
    server b 127.0.0.1:{port_b}
"""


@dataclass
class ClientStats:
    attempts: int = 0
    retries: int = 0
    ambiguous: int = 0  # cut after the final dot was sent, before the reply: outcome unknown
    after_dot: list[str] = field(default_factory=list)  # every non-250 answer to a final dot
    quit_failed: int = 0  # delivered (250), then QUIT got 421 or a cut: must NOT be retried
    rejected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_message(i: int) -> tuple[str, bytes]:
    mid = f"<lb-{i}@corp.example>"
    head = f"From: news@corp.example\r\nTo: alice@corp.example\r\nSubject: n{i}\r\nMessage-ID: {mid}\r\n"
    data = (head + f"\r\nbody {i}\r\n").encode()
    return mid, data


def send_with_retries(port: int, i: int, stats: ClientStats, stop_at: float) -> None:
    """What an MTA does: retry on 4xx and on connection trouble, give up only on 5xx."""
    mid, data = one_message(i)
    while time.monotonic() < stop_at:
        with stats.lock:
            stats.attempts += 1
        sent_dot = False
        c = smtplib.SMTP(timeout=30, source_address=(CLIENT_IP, 0))
        try:
            c.connect("127.0.0.1", port)
            c.ehlo("client.test")
            code, msg = c.mail("news@corp.example")
            if code != 250:
                raise smtplib.SMTPResponseException(code, msg)
            code, msg = c.rcpt("alice@corp.example")
            if code not in (250, 251):
                raise smtplib.SMTPResponseException(code, msg)
            c.putcmd("data")
            code, msg = c.getreply()
            if code != 354:
                raise smtplib.SMTPResponseException(code, msg)
            c.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            sent_dot = True
            code, msg = c.getreply()
            if code == 250:
                # Delivered. Whatever QUIT gets now (a draining relay says 421) changes nothing:
                # smtplib's context manager would raise on it, and a naive retry would duplicate.
                try:
                    c.quit()
                except (OSError, smtplib.SMTPException):
                    with stats.lock:
                        stats.quit_failed += 1
                return
            with stats.lock:
                stats.after_dot.append(f"{mid}: {code} {msg!r}")
            raise smtplib.SMTPResponseException(code, msg)
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:
                with stats.lock:
                    stats.rejected.append(f"{mid}: {exc.smtp_code} {exc.smtp_error!r}")
                return
        except (OSError, smtplib.SMTPException) as exc:
            if sent_dot:
                with stats.lock:
                    stats.ambiguous += 1
                    stats.after_dot.append(f"{mid}: {type(exc).__name__} {exc}")
        finally:
            c.close()
        with stats.lock:
            stats.retries += 1
        time.sleep(0.2)
    with stats.lock:
        stats.rejected.append(f"{mid}: gave up at the deadline")


def stream(port: int, stats: ClientStats, next_index: list[int]) -> None:
    lock = threading.Lock()
    stop_at = time.monotonic() + DEADLINE

    def worker() -> None:
        while True:
            with lock:
                i = next_index[0]
                if i >= N:
                    return
                next_index[0] += 1
            send_with_retries(port, i, stats, stop_at)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + 30)


def haproxy_servers(stats_path: Path) -> dict[str, str]:
    """server name -> status (UP/DOWN/...) from the runtime API."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(stats_path))
        s.sendall(b"show stat\n")
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    out = {}
    lines = buf.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "relays" and row.get("svname") in ("a", "b"):
            out[row["svname"]] = row.get("status", "")
    return out


def relay_config(tmp_path: Path, name: str, port: int, upstream: str) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(
        to_toml(
            {
                "server": {
                    "listen": f"127.0.0.1:{port}",
                    "hostname": f"relay-{name}.test",
                    "proxy_protocol": True,
                    "proxy_trusted_networks": [f"{PROXY_SOURCE}/32"],  # HAProxy connects from here
                    "allowed_networks": [f"{CLIENT_IP}/32"],
                    "shutdown_timeout": 10.0,
                    "workers": 1,  # one process per relay: its one "stopped" line tells the drain
                },
                "upstream": {"url": upstream, "timeout": 10.0},
                "quarantine": {"path": str(tmp_path / name / "quarantine")},
                "spool": {"path": str(tmp_path / name / "spool")},
                "metrics": {"listen": ""},
                "logging": {"format": "json"},
                "policy": {"internal_domains": ["corp.example"]},
            }
        )
    )
    return cfg


async def test_two_relays_behind_haproxy_lose_nothing_when_one_stops(tmp_path: Path, sink: Sink) -> None:
    haproxy = require_binary("haproxy")
    port_a, port_b, front = free_port(), free_port(), free_port()
    relay_a = RelayProcess(relay_config(tmp_path, "a", port_a, sink.url), tmp_path / "a.log", name="relay a")
    relay_b = RelayProcess(relay_config(tmp_path, "b", port_b, sink.url), tmp_path / "b.log", name="relay b")
    stats_path = tmp_path / "haproxy.sock"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        HAPROXY_CFG.format(
            stats=stats_path, front=front, port_a=port_a, port_b=port_b, proxy_source=PROXY_SOURCE
        )
    )
    check = await asyncio.to_thread(
        subprocess.run,
        [haproxy, "-c", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    ha_log = (tmp_path / "haproxy.log").open("wb")
    proc = None
    try:
        await relay_a.astart()
        await relay_b.astart()
        proc = subprocess.Popen(  # noqa: ASYNC220 - starts it, does not wait
            [haproxy, "-db", "-f", str(cfg)],
            stdout=ha_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        await poll(
            lambda: stats_path.exists() and haproxy_servers(stats_path) == {"a": "UP", "b": "UP"},
            "HAProxy to see both relays UP (SMTP health check over PROXY v2)",
            30,
            interval=0.2,
        )

        # A slow upstream keeps transactions in DATA, so the SIGTERM lands on work in flight.
        sink.data_delay = 0.05
        stats = ClientStats()
        next_index = [0]
        t0 = time.monotonic()
        client = asyncio.create_task(asyncio.to_thread(stream, front, stats, next_index))

        def delivered_ids() -> list[str]:
            out = []
            for m in sink.messages:
                found = re.search(rb"^Message-ID: (<[^>]+>)", m.data, re.MULTILINE)
                if found and m.reply.startswith("2"):
                    out.append(found.group(1).decode())
            return out

        await poll(lambda: len(delivered_ids()) >= N // 3, f"{N // 3} messages through", DEADLINE)
        signalled = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        relay_a.signal(signal.SIGTERM)  # mid-stream, with sessions in flight
        at_stop = len(delivered_ids())
        rc_a = await asyncio.to_thread(relay_a.wait_exit, 60)
        await poll(lambda: haproxy_servers(stats_path).get("a") != "UP", "HAProxy to mark relay a DOWN", 30)
        await asyncio.wait_for(client, DEADLINE + 60)
        elapsed = time.monotonic() - t0

        ids = delivered_ids()
        counts = Counter(ids)
        duplicates = {k: v for k, v in counts.items() if v > 1}
        expected = {one_message(i)[0] for i in range(N)}
        finished_after_term = [e for e in relay_a.events("message_processed") if e["timestamp"] > signalled]
        print(
            f"haproxy: {N} messages in {elapsed:.1f}s, relay a stopped after {at_stop} "
            f"and finished {len(finished_after_term)} in flight; "
            f"attempts={stats.attempts} retries={stats.retries} ambiguous={stats.ambiguous} "
            f"quit_failed={stats.quit_failed} "
            f"duplicates={sum(v - 1 for v in duplicates.values())}"
        )
        print("answers to a final dot other than 250:", stats.after_dot)
        assert rc_a == 0, "SIGTERM must drain and exit 0"
        assert [e.get("drained") for e in relay_a.events("stopped")] == [True]
        assert stats.rejected == []
        assert set(counts) == expected, f"missing: {sorted(expected - set(counts))[:10]}"
        assert sum(v - 1 for v in duplicates.values()) <= stats.ambiguous, duplicates

        # Both relays carried traffic; the survivor took the rest.
        by_a = [e for e in relay_a.events("message_processed") if e.get("reply_code") == 250]
        by_b = [e for e in relay_b.events("message_processed") if e.get("reply_code") == 250]
        assert by_a and by_b
        assert len(by_a) + len(by_b) == len(ids)
        # The survivor logged the real client, never the proxy's address.
        clients_b = {e.get("client") for e in relay_b.events("message_processed")}
        assert clients_b == {CLIENT_IP}, clients_b
        assert all(e.get("client") != PROXY_SOURCE for e in relay_a.events("message_processed"))
        assert not relay_b.events("relay_refused")
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        ha_log.close()
        await relay_a.astop()
        await relay_b.astop()
        if os.environ.get("BCCGUARD_TEST_VERBOSE"):
            print((tmp_path / "haproxy.log").read_text()[-3000:])
