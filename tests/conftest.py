"""Shared fixtures: a real relay and a real upstream sink, both on loopback free ports."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bccguard.app import App, rule_names
from bccguard.config import Config, from_dict
from bccguard.ops.metrics import Metrics
from sink import Sink


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def relay_config(tmp_path: Path, upstream_url: str, extra: dict[str, Any] | None = None) -> Config:
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "hostname": "bccguard.test", "shutdown_timeout": 5.0},
        "upstream": {"url": upstream_url, "timeout": 5.0},
        "quarantine": {"path": str(tmp_path / "quarantine")},
        "spool": {"path": str(tmp_path / "spool")},
        "metrics": {"listen": ""},
        "policy": {"internal_domains": ["corp.example"], "partner_domains": ["agency.example"]},
    }
    return from_dict(deep_merge(data, extra or {}))


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


StartRelay = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_relay(tmp_path: Path) -> AsyncIterator[StartRelay]:
    """start_relay(upstream_url, extra_config) -> a running App on a free port."""
    apps: list[App] = []

    async def start(upstream_url: str, extra: dict[str, Any] | None = None) -> App:
        base = tmp_path
        if any(a._locks for a in apps):
            # One relay per spool and quarantine (ops/instance.py): a relay started
            # beside a running one gets its own, unless the test names them.
            base = tmp_path / f"relay{len(apps)}"
        cfg = relay_config(base, upstream_url, extra)
        metrics = Metrics(registry=CollectorRegistry(), rules=rule_names(cfg), version="test")
        app = App(cfg, metrics=metrics)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop(timeout=2.0)


@pytest.fixture
async def relay(sink: Sink, start_relay: StartRelay) -> App:
    return await start_relay(f"smtp://127.0.0.1:{sink.port}")


def _send(port: int, mail_from: str, rcpts: list[str], data: bytes, source: str | None) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0) if source else None) as c:
        c.ehlo("client.test")
        return c.sendmail(mail_from, rcpts, data)  # refused recipients, or raises


async def send(
    port: int, mail_from: str, rcpts: list[str], data: bytes, *, source: str | None = None
) -> dict[str, Any]:
    """Send one message with the stdlib client over real TCP (in a thread: smtplib blocks)."""
    return await asyncio.to_thread(_send, port, mail_from, rcpts, data, source)


def fold(line: str) -> str:
    """An address header as a mail client writes it: one line, folded after each comma
    only when it would pass 998 octets (RFC 5322 2.1.1; longer lines get 554 5.6.0)."""
    return line if len(line) <= 998 else line.replace(", ", ",\r\n ")


def message(
    to: list[str],
    *,
    cc: list[str] | None = None,
    sender: str = "Marketing <news@corp.example>",
    subject: str = "Your feedback",
    extra: str = "",
    body: str = "Hello,\r\nplease answer our survey.\r\n",
) -> bytes:
    head = [f"From: {sender}", fold(f"To: {', '.join(to)}")]
    if cc:
        head.append(fold(f"Cc: {', '.join(cc)}"))
    head += [f"Subject: {subject}", "Message-ID: <survey-1@corp.example>", "MIME-Version: 1.0"]
    if extra:
        head.append(extra)
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> list[bytes]:
    """Send `data` (if any) and read one whole reply, multi-line included, CRLF stripped.

    Every reply line is also checked for address-like text: the relay never
    puts an address in a reply, whatever the test is about.
    """
    if data:
        writer.write(data)
        await writer.drain()
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line, "connection closed"
        assert b"@" not in line, f"an address-like text leaked into a reply: {line!r}"
        lines.append(line.rstrip(b"\r\n"))
        if line[3:4] != b"-":
            return lines


def data_reply(port: int, mail_from: str, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """One transaction with smtplib (blocking: call it through asyncio.to_thread); the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail(mail_from)
        for r in rcpts:
            assert c.rcpt(r)[0] == 250
        return c.data(data)
