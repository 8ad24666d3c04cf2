"""SMTP edge faults found by an independent fault run (issue 12), against real relays.

Each test reproduces what was seen (half-closed clients, a shutdown with
sessions in DATA, slow clients filling every slot, a second instance on the
same port, PROXY headers from anyone, TLS noise, RFC 5321 gaps) and checks
the invariants every such test owes: no 250 without the message upstream,
no address in a reply or log line, fds/tasks/sessions back to baseline, and
a normal message served afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import smtplib
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import StartRelay, message, send
from deploy_helpers import RelayProcess, free_port, poll, to_toml
from sink import Sink

CUSTOMER = "person1@gmail.com"


# ------------------------------------------------------------------ helpers


async def _open(
    port: int, host: str = "127.0.0.1", source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(source, 0) if source else None), 10
    )


async def _read_to_eof(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    """Everything the relay sends until it closes its side (a deadline, not a timing check)."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), within):
            out += chunk
    return out


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (multi-line joined); never an address in it."""
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line, "connection closed"
        assert b"@" not in line, f"an address leaked into a reply: {line!r}"
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


async def _cmd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await _reply(reader)


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _relay_toml(tmp_path: Path, name: str, port: int, metrics_port: int, **server: Any) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(
        to_toml(
            {
                "server": {
                    "listen": f"127.0.0.1:{port}",
                    "hostname": "relay.test",
                    "workers": 1,
                    "shutdown_timeout": 5.0,
                    **server,
                },
                "upstream": {"url": f"maildir:{tmp_path / name / 'outbox'}"},
                "quarantine": {"path": str(tmp_path / name / "quarantine")},
                "spool": {"path": str(tmp_path / name / "spool")},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
                "logging": {"format": "json"},
                "policy": {"internal_domains": ["corp.example"]},
            }
        )
    )
    return cfg


def _delivered(tmp_path: Path, name: str) -> int:
    new = tmp_path / name / "outbox" / "new"
    return len(list(new.iterdir())) if new.is_dir() else 0


def _send_plain(port: int, rcpt: str = "colleague@corp.example") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.ehlo("client.test")
        c.mail("news@corp.example")
        assert c.rcpt(rcpt)[0] == 250
        return c.data(message(["colleague@corp.example"]))


def _assert_log_private(relay: RelayProcess) -> None:
    text = relay.log_path.read_text("utf-8", "replace")
    assert "@corp.example" not in text and CUSTOMER not in text
    assert "Traceback" not in text


# ------------------------------------------------------------------ item 2: half-closed clients


async def _half_close(port: int, stage: str, proxy: bool) -> bytes:
    """Connect, get to `stage`, send FIN (write_eof) and read until the relay closes its side."""
    reader, writer = await _open(port)
    try:
        if proxy and stage != "before-proxy":
            writer.write(b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 25\r\n")
        if stage in ("mid-command", "mid-data"):
            assert (await _reply(reader)).startswith(b"220")
            assert (await _cmd(reader, writer, b"EHLO client.test\r\n")).startswith(b"250")
        if stage == "mid-command":
            writer.write(b"MAIL FROM:<news@corp.exa")
        elif stage == "mid-data":
            assert (await _cmd(reader, writer, b"MAIL FROM:<news@corp.example>\r\n")).startswith(b"250")
            assert (await _cmd(reader, writer, b"RCPT TO:<colleague@corp.example>\r\n")).startswith(b"250")
            assert (await _cmd(reader, writer, b"DATA\r\n")).startswith(b"354")
            writer.write(b"Subject: half\r\n\r\nhalf a message\r\n")
        writer.write_eof()
        # The relay closes its side at once: this read ends with EOF, not after command_timeout.
        return await _read_to_eof(reader)
    finally:
        writer.close()


@pytest.mark.parametrize("proxy", [False, True], ids=["direct", "proxy-protocol"])
async def test_half_closed_clients_release_their_slot_at_once(tmp_path: Path, proxy: bool) -> None:
    """1,000 half-closed connections (500 per mode) in every state leave no session, fd or slot behind.

    Seen: a client that closed before reading the greeting (a TCP health
    check) held its fd and per-IP slot until command_timeout; 60 of them
    locked the address out with 421 4.7.0.
    """
    port, mport = free_port(), free_port()
    server: dict[str, Any] = {"max_sessions_per_ip": 50, "command_timeout": 300.0}
    if proxy:
        server.update(
            proxy_protocol=True, proxy_trusted_networks=["127.0.0.0/8"], allowed_networks=["192.0.2.0/24"]
        )
    relay = RelayProcess(_relay_toml(tmp_path, "r", port, mport, **server), tmp_path / "relay.log")
    await relay.astart()
    metrics = f"http://127.0.0.1:{mport}/metrics"
    try:
        pid = relay.proc.pid  # type: ignore[union-attr]
        if not proxy:
            assert (await asyncio.to_thread(_send_plain, port))[0] == 250
        baseline = _fds(pid)
        stages = ["before-greeting", "mid-command", "mid-data"]
        if proxy:
            stages = ["before-proxy", *stages]
        n = 500
        per_batch = 40  # under max_sessions_per_ip: any 421 means slots leaked
        for start in range(0, n, per_batch):
            batch = [
                _half_close(port, stages[i % len(stages)], proxy)
                for i in range(start, min(n, start + per_batch))
            ]
            for got in await asyncio.gather(*batch):
                assert b"421" not in got, got
                assert b"250 2.0.0" not in got  # half a message is never accepted
        await poll(lambda: _metric(metrics, "bccguard_smtp_sessions_active") == 0, "sessions back to 0", 20)
        await poll(lambda: _fds(pid) <= baseline, f"relay fds back to {baseline}", 20)
        # the next client is served, and nothing half-sent was delivered
        before = _delivered(tmp_path, "r")
        if proxy:
            reader, writer = await _open(port)
            writer.write(b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 25\r\n")
            assert (await _reply(reader)).startswith(b"220")
            await _cmd(reader, writer, b"EHLO client.test\r\n")
            await _cmd(reader, writer, b"MAIL FROM:<news@corp.example>\r\n")
            await _cmd(reader, writer, b"RCPT TO:<colleague@corp.example>\r\n")
            await _cmd(reader, writer, b"DATA\r\n")
            assert (await _cmd(reader, writer, message(["colleague@corp.example"]) + b".\r\n")).startswith(
                b"250"
            )
            writer.close()
        else:
            assert (await asyncio.to_thread(_send_plain, port))[0] == 250
        assert _delivered(tmp_path, "r") == before + 1
    finally:
        await relay.astop()
    _assert_log_private(relay)


async def test_half_closed_clients_leave_no_task_behind(start_relay: StartRelay, sink: Sink) -> None:
    """The same in-process: the session gate and the loop's task list return to baseline."""
    app = await start_relay(sink.url, {"server": {"command_timeout": 300.0}})
    await send(app.port, "news@corp.example", ["colleague@corp.example"], message(["colleague@corp.example"]))
    baseline = len(asyncio.all_tasks())
    for stage in ("before-greeting", "mid-command", "mid-data"):
        await asyncio.gather(*(_half_close(app.port, stage, False) for _ in range(30)))
    await poll(lambda: app.gate.total == 0 and not app.sessions, "no session left", 10)
    await poll(lambda: len(asyncio.all_tasks()) <= baseline, "tasks back to baseline", 10)
    await send(app.port, "news@corp.example", ["colleague@corp.example"], message(["colleague@corp.example"]))
    assert len(sink.messages) == 2


# ------------------------------------------------------------------ item 10: PROXY only from trusted hosts


def test_config_check_requires_proxy_trusted_networks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bccguard.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml({"server": {"proxy_protocol": True}}))
    assert main(["config", "check", "--config", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert "server.proxy_trusted_networks: required when server.proxy_protocol = true" in err
    assert "Traceback" not in err
    cfg.write_text(to_toml({"server": {"proxy_protocol": True, "proxy_trusted_networks": ["10.0.0.5/32"]}}))
    assert main(["config", "check", "--config", str(cfg)]) == 0


async def test_proxy_header_from_an_untrusted_host_is_refused_before_the_greeting(tmp_path: Path) -> None:
    """Seen: any host reaching the port sent `PROXY TCP4 <allowed address>` and relayed."""
    port, mport = free_port(), free_port()
    relay = RelayProcess(
        _relay_toml(
            tmp_path, "r", port, mport, listen=f"0.0.0.0:{port}", proxy_protocol=True,
            proxy_trusted_networks=["127.0.0.9/32"], allowed_networks=["192.0.2.0/24"],
        ),
        tmp_path / "relay.log",
    )  # fmt: skip
    await relay.astart()
    metrics = f"http://127.0.0.1:{mport}/metrics"
    refused = 'bccguard_smtp_connections_total{result="refused_proxy_untrusted"}'
    try:
        for _ in range(5):  # a forger: a well-formed header naming an allowed client
            reader, writer = await _open(port, source="127.0.0.2")
            writer.write(
                b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 25\r\nEHLO x\r\nMAIL FROM:<news@corp.example>\r\n"
            )
            assert await _read_to_eof(reader) == b""  # never greeted, never answered
            writer.close()
        assert _metric(metrics, refused) == 5
        # one log line for the address, not one per connection; no traceback
        await poll(lambda: len(relay.events("proxy_untrusted_refused")) == 1, "one refusal line", 10)
        # the balancer (trusted) is served, and relays for the client it names
        reader, writer = await _open(port, source="127.0.0.9")
        writer.write(b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 25\r\n")
        assert (await _reply(reader)).startswith(b"220")
        await _cmd(reader, writer, b"EHLO client.test\r\n")
        await _cmd(reader, writer, b"MAIL FROM:<news@corp.example>\r\n")
        assert (await _cmd(reader, writer, b"RCPT TO:<colleague@corp.example>\r\n")).startswith(b"250")
        await _cmd(reader, writer, b"DATA\r\n")
        assert (await _cmd(reader, writer, message(["colleague@corp.example"]) + b".\r\n")).startswith(b"250")
        writer.close()
        assert _delivered(tmp_path, "r") == 1
        assert _metric(metrics, "bccguard_smtp_sessions_active") in (0, 1)
    finally:
        await relay.astop()
    _assert_log_private(relay)


# ------------------------------------------------------------------ item 11: TLS noise, STARTTLS inside TLS


async def test_failed_tls_handshakes_are_one_info_line_and_a_count(tmp_path: Path) -> None:
    """Seen: each failed handshake logged an ERROR with a traceback; STARTTLS inside TLS broke the session."""
    import ssl

    from sink import self_signed_cert

    (tmp_path / "tls").mkdir()
    cert, key = self_signed_cert(tmp_path / "tls", "127.0.0.1")
    port, mport = free_port(), free_port()
    relay = RelayProcess(
        _relay_toml(tmp_path, "r", port, mport, tls={"cert": str(cert), "key": str(key)}),
        tmp_path / "relay.log",
    )
    await relay.astart()
    metrics = f"http://127.0.0.1:{mport}/metrics"
    n = 30
    try:

        async def plaintext_after_starttls() -> None:
            reader, writer = await _open(port)
            try:
                await _reply(reader)
                await _cmd(reader, writer, b"EHLO scanner.test\r\n")
                assert (await _cmd(reader, writer, b"STARTTLS\r\n")).startswith(b"220")
                writer.write(b"EHLO scanner.test\r\nMAIL FROM:<news@corp.example>\r\n" * 20)
                await _read_to_eof(reader)
            finally:
                writer.close()

        await asyncio.gather(*(plaintext_after_starttls() for _ in range(n)))
        await poll(
            lambda: _metric(metrics, 'bccguard_smtp_connections_total{result="tls_failed"}') == n,
            "every failed handshake counted", 10,
        )  # fmt: skip
        # STARTTLS on an encrypted session: 503, and the session goes on
        reader, writer = await _open(port)
        await _reply(reader)
        await _cmd(reader, writer, b"EHLO client.test\r\n")
        await _cmd(reader, writer, b"STARTTLS\r\n")
        ctx = ssl.create_default_context(cafile=str(cert))
        await writer.start_tls(ctx, server_hostname="127.0.0.1")
        await _cmd(reader, writer, b"EHLO client.test\r\n")
        assert await _cmd(reader, writer, b"STARTTLS\r\n") == b"503 5.5.1 TLS already active\r\n"
        await _cmd(reader, writer, b"MAIL FROM:<news@corp.example>\r\n")
        assert (await _cmd(reader, writer, b"RCPT TO:<colleague@corp.example>\r\n")).startswith(b"250")
        await _cmd(reader, writer, b"DATA\r\n")
        assert (await _cmd(reader, writer, message(["colleague@corp.example"]) + b".\r\n")).startswith(b"250")
        writer.close()
        assert _delivered(tmp_path, "r") == 1
    finally:
        await relay.astop()
    failed = relay.events("tls_handshake_failed")
    assert len(failed) == 1 and failed[0]["level"] == "info"  # one line per client address a minute
    assert not [r for r in relay.logs() if r.get("level") in ("error", "critical")]
    _assert_log_private(relay)


# ------------------------------------------------------------------ item 12: RFC 5321 conformance


def _maildir_messages(tmp_path: Path, name: str) -> list[bytes]:
    """Delivered messages, without the Return-Path/Delivered-To lines the Maildir writer adds."""
    new = tmp_path / name / "outbox" / "new"
    raws = [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)]
    return [raw[raw.index(b"Received: from ") :] for raw in raws]


async def _transaction(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rcpt: bytes, data: bytes
) -> bytes:
    """MAIL, RCPT, DATA on an open session; the reply to the final dot."""
    assert (await _cmd(reader, writer, b"MAIL FROM:<news@corp.example>\r\n")).startswith(b"250")
    assert (await _cmd(reader, writer, b"RCPT TO:<" + rcpt + b">\r\n")).startswith(b"250")
    assert (await _cmd(reader, writer, b"DATA\r\n")).startswith(b"354")
    return await _cmd(reader, writer, data + b".\r\n")


async def test_rfc5321_duties_of_a_relay(tmp_path: Path) -> None:
    """Received on every relayed message, ENHANCEDSTATUSCODES, <postmaster>, NUL and long header lines."""
    from sink import TRACE_FIELD, without_trace

    port, mport = free_port(), free_port()
    relay = RelayProcess(_relay_toml(tmp_path, "r", port, mport), tmp_path / "relay.log")
    await relay.astart()
    try:
        reader, writer = await _open(port)
        await _reply(reader)
        ehlo = await _cmd(reader, writer, b"EHLO client.test\r\n")
        assert b"250-ENHANCEDSTATUSCODES\r\n" in ehlo  # (e)
        data = message(["colleague@corp.example", CUSTOMER])
        # (a) a trace field naming HELO, IP, host, protocol and id; no `for <address>`
        assert (await _transaction(reader, writer, b"colleague@corp.example", data)).startswith(b"250")
        # (c) <postmaster> without a domain, any case, is accepted and relayed as sent
        assert (await _transaction(reader, writer, b"PostMaster", message(["postmaster"]))).startswith(b"250")
        # (d) NUL in DATA: refused after the final dot, nothing relayed
        nul = message(["colleague@corp.example"], body="binary \x00 part\r\n")
        assert await _transaction(reader, writer, b"colleague@corp.example", nul) == (
            b"554 5.6.0 Message contains a NUL character (BINARYMIME is not offered)\r\n"
        )
        # (b) a header line over 998 octets: the same 554 5.6.0 as a body line
        long_header = message(["colleague@corp.example"], extra="X-Long: " + "a" * 995)
        assert (await _transaction(reader, writer, b"colleague@corp.example", long_header)).startswith(
            b"554 5.6.0 Message has a line longer than 998 characters"
        )
        folded = message(["colleague@corp.example"], extra="X-Long: " + "a" * 900 + "\r\n " + "a" * 900)
        assert (await _transaction(reader, writer, b"colleague@corp.example", folded)).startswith(b"250")
        assert await _cmd(reader, writer, b"QUIT\r\n") == b"221 Bye\r\n"
        writer.close()
    finally:
        await relay.astop()
    got = _maildir_messages(tmp_path, "r")
    assert len(got) == 3  # the first, the postmaster one and the folded one; no NUL, no long line
    for raw in got:
        m = TRACE_FIELD.match(raw)
        assert m is not None, raw[:300]
        trace = m.group(0)
        assert trace.startswith(
            b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (bccguard) with ESMTP id "
        )
        assert b" for " not in trace and b"@" not in trace
    # the rest is what the client sent (pass), byte for byte
    assert without_trace(got[0]) == data
    ids = {TRACE_FIELD.match(raw).group(0).split(b" id ")[1].split(b";")[0] for raw in got}  # type: ignore[union-attr]
    assert len(ids) == 3  # one id per message
    _assert_log_private(relay)


async def test_postmaster_is_relayed_upstream_but_only_for_allowed_clients(
    start_relay: StartRelay, sink: Sink
) -> None:
    """RFC 5321 4.5.1 through an SMTP upstream; an outsider still gets 554 5.7.1 at RCPT."""
    app = await start_relay(sink.url, {"server": {"allowed_networks": ["127.0.0.1/32"]}})
    reader, writer = await _open(app.port)
    await _reply(reader)
    await _cmd(reader, writer, b"EHLO client.test\r\n")
    assert (await _transaction(reader, writer, b"postmaster", message(["postmaster"]))).startswith(b"250")
    writer.close()
    assert sink.messages[-1].rcpt_tos == ["postmaster"]
    reader, writer = await _open(app.port, source="127.0.0.2")
    await _reply(reader)
    await _cmd(reader, writer, b"EHLO outsider.test\r\n")
    await _cmd(reader, writer, b"MAIL FROM:<news@corp.example>\r\n")
    assert (await _cmd(reader, writer, b"RCPT TO:<postmaster>\r\n")).startswith(b"554 5.7.1")
    writer.close()
    assert len(sink.messages) == 1


def test_received_field_names_the_protocol_and_keeps_client_text_out() -> None:
    from bccguard.smtp.server import received_field

    for proto in ("SMTP", "ESMTP", "ESMTPS", "ESMTPSA"):
        f = received_field(
            helo="mx.example", ip="::1", hostname="relay.test", protocol=proto, ident="a-1.1", when=0
        )
        assert (
            f
            == (
                f"Received: from mx.example ([IPv6:::1])\r\n\tby relay.test (bccguard) with {proto} id a-1.1;"
                "\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
            ).encode()
        )
    hostile = received_field(
        helo="x (y) <a@b>; \udcff\x01", ip="192.0.2.1", hostname="h", protocol="ESMTP", ident="i", when=0
    )
    assert hostile.startswith(b"Received: from x__y___a_b_____ ([192.0.2.1])") and b"@" not in hostile


# ------------------------------------------------------------------ item 7: shutdown says 421 before the cut


async def test_shutdown_past_its_timeout_says_421_and_abandons_the_upstream(tmp_path: Path) -> None:
    """Seen: sessions in DATA or waiting on the upstream were closed with no reply at shutdown."""
    from sink import RawServer

    upstream_read: list[bytes] = []
    upstream_closed = asyncio.Event()

    async def stalls_at_rcpt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test ESMTP\r\n")
        while line := await reader.readline():
            upstream_read.append(line)
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250 slow.test\r\n")
            elif verb == b"MAIL":
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                pass  # never answered: the relay waits here, before DATA and its final dot
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
        upstream_closed.set()

    async with RawServer(stalls_at_rcpt) as upstream:
        port, mport = free_port(), free_port()
        cfg = _relay_toml(tmp_path, "r", port, mport, shutdown_timeout=1.0)
        cfg.write_text(
            cfg.read_text().replace(
                f'url = "maildir:{tmp_path / "r" / "outbox"}"',
                f'url = "smtp://127.0.0.1:{upstream.port}"\ntimeout = 60.0',
            )
        )
        relay = RelayProcess(cfg, tmp_path / "relay.log")
        await relay.astart()
        try:
            # A: waiting on the upstream after its final dot
            ra, wa = await _open(port)
            await _reply(ra)
            await _cmd(ra, wa, b"EHLO a.test\r\n")
            await _cmd(ra, wa, b"MAIL FROM:<news@corp.example>\r\n")
            await _cmd(ra, wa, b"RCPT TO:<colleague@corp.example>\r\n")
            await _cmd(ra, wa, b"DATA\r\n")
            wa.write(message(["colleague@corp.example"]) + b".\r\n")
            await poll(lambda: any(line.startswith(b"RCPT") for line in upstream_read), "upstream RCPT", 10)
            # B: in the middle of its DATA
            rb, wb = await _open(port)
            await _reply(rb)
            await _cmd(rb, wb, b"EHLO b.test\r\n")
            await _cmd(rb, wb, b"MAIL FROM:<news@corp.example>\r\n")
            await _cmd(rb, wb, b"RCPT TO:<colleague@corp.example>\r\n")
            await _cmd(rb, wb, b"DATA\r\n")
            wb.write(b"Subject: half\r\n\r\nstill typing")
            await wb.drain()
            relay.signal(15)
            for reader in (ra, rb):
                assert (
                    await _read_to_eof(reader, 20) == b"421 4.3.2 Service shutting down, try again later\r\n"
                )
            wa.close()
            wb.close()
            assert await asyncio.to_thread(relay.wait_exit, 20) == 0
            await asyncio.wait_for(upstream_closed.wait(), 10)  # the transaction was abandoned
        finally:
            await relay.astop()
    assert not any(line.startswith(b"DATA") for line in upstream_read)
    assert b".\r\n" not in upstream_read  # no final dot ever reached the upstream
    assert relay.events("shutdown_cut")[0]["sessions"] == 2
    assert relay.events("stopped")[0]["drained"] is False
    _assert_log_private(relay)


# ------------------------------------------------------------------ item 8: stress


async def test_a_real_client_is_served_while_500_slow_sessions_hold_the_slots(tmp_path: Path) -> None:
    """Seen: 500 slow connections from 10 addresses filled max_sessions for as long as they trickled.

    500 attackers from 127.0.0.10-19 (50 each, the per-address limit) against
    max_sessions = 400: every slot taken, 100 more knocking. Half idle after
    the greeting, half trickling a command one byte at a time; each comes
    back 0.2 s after being cut or refused, as a real attacker would.
    """
    port, mport = free_port(), free_port()
    relay = RelayProcess(
        _relay_toml(
            tmp_path, "r", port, mport, max_sessions=400, max_sessions_per_ip=50,
            command_timeout=300.0, stress_timeout=2.0,
        ),
        tmp_path / "relay.log",
    )  # fmt: skip
    await relay.astart()
    stop = asyncio.Event()
    cut = 0

    async def attacker(source: str, trickle: bool) -> None:
        nonlocal cut
        while not stop.is_set():
            try:
                reader, writer = await _open(port, source=source)
            except (TimeoutError, OSError):
                await asyncio.sleep(0.2)
                continue
            try:
                while not stop.is_set():
                    if trickle:
                        writer.write(b"N")
                    try:
                        chunk = await asyncio.wait_for(reader.read(1024), 0.5)
                    except TimeoutError:
                        continue  # still open, still holding its slot
                    if not chunk or b"421 4.4.2" in chunk:
                        cut += 1
                        break
            except OSError:
                pass
            finally:
                writer.close()
            await asyncio.sleep(0.2)

    attackers = [
        asyncio.create_task(attacker(f"127.0.0.{10 + i % 10}", trickle=i % 2 == 1)) for i in range(500)
    ]
    try:
        metrics = f"http://127.0.0.1:{mport}/metrics"
        # every slot taken: before the change, none would free for command_timeout (300 s)
        await poll(lambda: _metric(metrics, "bccguard_smtp_sessions_active") == 400, "every slot taken", 60)

        def legitimate() -> tuple[int, bytes]:
            deadline = time.monotonic() + 60  # a deadline, not a timing assertion
            while time.monotonic() < deadline:  # an MTA retries a 421 greeting
                try:
                    return _send_plain(port)
                except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected):
                    time.sleep(0.1)
            raise AssertionError("the legitimate client was never served")

        code, _ = await asyncio.to_thread(legitimate)
        assert code == 250
        # the attack goes on (the slots refill), and the relay keeps serving beside it
        await poll(lambda: _metric(metrics, "bccguard_smtp_sessions_active") > 300, "the attack on", 20)
        assert (await asyncio.to_thread(legitimate))[0] == 250
        assert _delivered(tmp_path, "r") == 2
        assert cut > 0
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
        await relay.astop()
    assert relay.events("stress_on")
    _assert_log_private(relay)


# ------------------------------------------------------------------ item 9: one relay per port and directory


@pytest.mark.parametrize("workers", [2, 1], ids=["supervisor", "single"])
async def test_a_second_instance_is_refused_and_takes_no_mail(tmp_path: Path, workers: int) -> None:
    """Seen: a second `bccguard serve` joined the first's SO_REUSEPORT port and took 4 of 10 mails."""
    from proc import run_cli

    port, mport = free_port(), free_port()
    first = RelayProcess(_relay_toml(tmp_path, "a", port, mport, workers=2), tmp_path / "a.log")
    await first.astart()
    try:
        a_pid = first.proc.pid  # type: ignore[union-attr]
        own_port, own_mport = free_port(), free_port()
        a_dirs = {"spool": str(tmp_path / "a" / "spool"), "quarantine": str(tmp_path / "a" / "quarantine")}
        spool, quarantine = a_dirs["spool"], a_dirs["quarantine"]
        in_use = f"in use by another bccguard (pid {a_pid}"
        taken = "address already in use (EADDRINUSE) by pid "
        cases = {
            "listen": (port, own_mport, {}, f"server.listen = '127.0.0.1:{port}': {taken}"),
            "metrics": (own_port, mport, {}, f"metrics.listen = '127.0.0.1:{mport}': {taken}"),
            "spool": (own_port, own_mport, {"spool": spool}, f"spool.path = '{spool}': {in_use}"),
            "quarantine": (
                own_port,
                own_mport,
                {"quarantine": quarantine},
                f"quarantine.path = '{quarantine}': {in_use}",
            ),
        }
        for name, (b_port, b_mport, same_dirs, expected) in cases.items():
            cfg = _relay_toml(tmp_path, f"b-{name}", b_port, b_mport, workers=workers)
            text = cfg.read_text()
            for key, path in same_dirs.items():
                text = text.replace(str(tmp_path / f"b-{name}" / key), path)
            cfg.write_text(text)
            rc, _, err = await run_cli("serve", "--config", str(cfg), within=60)
            last = err.strip().splitlines()[-1]
            assert rc == 1 and last.startswith("bccguard: cannot start: " + expected), (name, err)
            assert "Traceback" not in err and "(fix: " in last
            assert _delivered(tmp_path, f"b-{name}") == 0
        # every message still goes to the first relay
        for _ in range(10):
            assert (await asyncio.to_thread(_send_plain, port))[0] == 250
        assert _delivered(tmp_path, "a") == 10
    finally:
        await first.astop()
    # once it is gone, a relay with the same settings starts
    again = RelayProcess(_relay_toml(tmp_path, "a", port, mport, workers=workers), tmp_path / "a2.log")
    await again.astart()
    await again.astop()


async def test_the_trace_field_leaves_dkim_signatures_intact(start_relay: StartRelay, sink: Sink) -> None:
    """The Received field goes on top, unsigned; the signature check and the signed bytes are unchanged.

    A verifier takes the bottom-most instance of each signed header, so one
    more Received on top changes nothing it hashes. (A signer that lists
    Received in h= with none present asserts its absence: every hop breaks
    that, as RFC 5321 4.4 makes every relay add one; signers do not do it.)
    """
    app = await start_relay(sink.url, {"policy": {"on_signed": "reject"}})

    def signed(to: str) -> bytes:
        return (
            "DKIM-Signature: v=1; a=rsa-sha256; d=corp.example; s=s1;\r\n"
            "\th=from:to:subject; bh=abc=;\r\n b=def=\r\n"
            f"From: news@corp.example\r\nTo: {to}\r\nSubject: survey\r\n\r\nbody\r\n"
        ).encode()

    internal = signed("colleague@corp.example")
    assert await send(app.port, "news@corp.example", ["colleague@corp.example"], internal) == {}
    assert sink.messages[-1].original == internal  # the signed bytes, untouched below our field
    customers = [f"c{i}@gmail.com" for i in range(5)]
    with pytest.raises(smtplib.SMTPDataError) as err:  # still seen as signed: on_signed applies
        await send(app.port, "news@corp.example", customers, signed(", ".join(customers)))
    assert err.value.smtp_code == 550 and len(sink.messages) == 1
