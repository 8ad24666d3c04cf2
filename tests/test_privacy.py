"""The relay's own output leaks no address: logs at the default level, /metrics, SMTP replies.

A real `bccguard serve` process (so the real logging set-up, aiosmtpd's
`mail.log` included) gets a mixed day of traffic — rewrites, rejects, relay
probes, AUTH failures with address-like user names, malformed commands that
quote addresses, smuggling attempts — and then its stderr, its /metrics page
and every reply it sent are searched for '@'.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import smtplib
import ssl
import sys
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest

from bccguard.smtp.auth import hash_password
from conftest import message
from sink import Sink, closed_port, self_signed_cert

SRC = str(Path(__file__).resolve().parents[1] / "src")
CUSTOMERS = [f"customer{i}@gmail.com" for i in range(30)]


async def _wait_port(port: int, proc: asyncio.subprocess.Process) -> None:
    for _ in range(200):
        if proc.returncode is not None:
            raise AssertionError("relay exited early")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        return
    raise AssertionError("relay did not start")


class Conversation:
    """A raw client that records every reply line it ever reads."""

    replies: ClassVar[list[bytes]] = []
    writers: ClassVar[list[asyncio.StreamWriter]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        Conversation.writers.append(writer)

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Conversation:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        c = cls(r, w)
        await c.reply()
        return c

    async def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if not line:
                return lines
            lines.append(line)
            Conversation.replies.append(line)
            if line[3:4] != b"-":
                return lines

    async def say(self, data: bytes) -> list[bytes]:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()


async def _traffic(port: int, cert: Path) -> None:
    loop_send = asyncio.to_thread
    # a survey that gets rewritten, a normal message, a rejected one (rule on the sender)
    await loop_send(_smtplib_send, port, "news@corp.example", CUSTOMERS, message(CUSTOMERS))
    normal = message(["alice@corp.example"])
    await loop_send(_smtplib_send, port, "news@corp.example", ["alice@corp.example"], normal)
    await loop_send(_smtplib_send, port, "boss@strict.corp.example", CUSTOMERS, message(CUSTOMERS))
    # a relay probe from a disallowed address
    c = await Conversation.open(port, source="127.0.0.2")
    await c.say(b"EHLO probe.test\r\n")
    await c.say(b"MAIL FROM:<spammer@evil.example>\r\n")
    await c.say(b"RCPT TO:<victim@gmail.com>\r\n")
    # junk that quotes addresses, VRFY, smuggling, control characters
    c = await Conversation.open(port)
    await c.say(b"EHLO junk.test\r\n")
    await c.say(b"VICTIM@CORP.EXAMPLE\r\n")
    await c.say(b"VRFY <a b@corp.example\r\n")
    await c.say(b"MAIL FROM:<a\x00b@corp.example>\r\n")
    await c.say(b"MAIL FROM:<a@corp.example> BOGUS=x@y.example\r\n")
    await c.say(b"MAIL FROM:<a@corp.example>\r\n")
    await c.say(b"RCPT TO:<jos\xc3\xa9@gmail.com>\r\n")
    await c.say(b"RCPT TO:<b@corp.example>\r\n")
    await c.say(b"DATA\r\n")
    await c.say(
        b"From: a@corp.example\r\nTo: b@corp.example\r\n\r\nx\n.\r\nMAIL FROM:<x@y.example>\r\n\r\n.\r\n"
    )
    await c.say(b"QUIT\r\n")
    # AUTH: with an address-like user name, wrong password, then right
    c = await Conversation.open(port)
    await c.say(b"EHLO auth.test\r\n")
    await c.say(b"AUTH PLAIN " + base64.b64encode(b"\0eve@marketing.corp.example\0x") + b"\r\n")
    await c.say(b"STARTTLS\r\n")
    await c.writer.start_tls(ssl.create_default_context(cafile=str(cert)), server_hostname="127.0.0.1")
    await c.say(b"EHLO auth.test\r\n")
    await c.say(b"AUTH PLAIN " + base64.b64encode(b"\0eve@marketing.corp.example\0wrong") + b"\r\n")
    await c.say(b"AUTH PLAIN " + base64.b64encode(b"\0eve@marketing.corp.example\0s3cret") + b"\r\n")
    await c.say(b"MAIL FROM:<eve@marketing.corp.example>\r\n")
    await c.say(b"RCPT TO:<friend@gmail.com>\r\n")
    await c.say(b"QUIT\r\n")


def _smtplib_send(port: int, mail_from: str, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        try:
            c.sendmail(mail_from, rcpts, data)
        except smtplib.SMTPResponseException as exc:
            Conversation.replies.append(f"{exc.smtp_code} ".encode() + exc.smtp_error)


@pytest.mark.parametrize("log_addresses", [False, True], ids=["default", "log_addresses"])
async def test_no_address_in_logs_metrics_or_replies(tmp_path: Path, sink: Sink, log_addresses: bool) -> None:
    Conversation.replies, Conversation.writers = [], []
    cert, key = self_signed_cert(tmp_path, "127.0.0.1")
    users = tmp_path / "users"
    users.write_text(f"eve@marketing.corp.example:{hash_password('s3cret', ln=10)}\n")
    port, metrics_port = closed_port(), closed_port()
    conf = tmp_path / "bccguard.toml"
    conf.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nhostname = "bccguard.test"\n'
        f'allowed_networks = ["127.0.0.1/32"]\nauth_file = "{users}"\n'
        f'[server.tls]\ncert = "{cert}"\nkey = "{key}"\n'
        f'[upstream]\nurl = "{sink.url}"\ntimeout = 5.0\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        f'[logging]\nformat = "json"\nlog_addresses = {"true" if log_addresses else "false"}\n'
        f'[quarantine]\npath = "{tmp_path / "q"}"\n[spool]\npath = "{tmp_path / "s"}"\n'
        '[policy]\ninternal_domains = ["corp.example"]\n'
        '[[policy.rules]]\nname = "strict"\nsenders = ["*@strict.corp.example"]\naction = "reject"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bccguard.cli", "serve", "--config", str(conf),
        env={**os.environ, "PYTHONPATH": SRC}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await _wait_port(port, proc)
        await _traffic(port, cert)
        page = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        )
    finally:
        for w in Conversation.writers:
            w.close()
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    logs = (out + err).decode("utf-8", "replace")
    # the traffic really happened: the survey was rewritten, the probe refused, AUTH failed once
    assert '"action": "rewrite"' in logs and '"event": "relay_refused"' in logs
    assert '"event": "auth_failed"' in logs and '"event": "auth_ok"' in logs
    assert len(sink.messages) == 2  # the survey and the normal one; the smuggling attempt was refused
    assert b'bccguard_smtp_connections_total{result="refused_auth"} 1.0' in page
    # privacy
    assert b"@" not in page
    replies = b"".join(Conversation.replies)
    assert replies.count(b"\n") > 30
    assert b"@" not in replies, [r for r in Conversation.replies if b"@" in r]
    if log_addresses:
        # the explicit debug switch says so at start, and then addresses do appear:
        # proof that the scan below would see a leak
        assert "address_logging_enabled" in logs
        assert "@" in logs
    else:
        assert "@" not in logs, [line for line in logs.splitlines() if "@" in line][:5]
