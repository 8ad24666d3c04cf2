"""`bccguard serve` as a real process: embedded defaults, SIGTERM drain, log privacy."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import message
from sink import Sink

CUSTOMERS = [f"person{i}@gmail.com" for i in range(50)]


class Proc:
    """A relay subprocess whose JSON log lines we read as they come."""

    def __init__(self, cwd: Path, config: Path) -> None:
        env = {**os.environ, "BCCGUARD_CONFIG": str(config)}
        self.p = subprocess.Popen(
            [sys.executable, "-m", "bccguard.cli", "serve"],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.lines: list[dict] = []
        self.raw: list[bytes] = []
        started = self.wait_for("started")
        self.port = int(started["listen"].rsplit(":", 1)[1])

    def wait_for(self, event: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        assert self.p.stderr is not None
        for rec in self.lines:
            if rec.get("event") == event:
                return rec
        while time.monotonic() < deadline:
            line = self.p.stderr.readline()
            if not line:
                break
            self.raw.append(line)
            rec = json.loads(line)  # every line is one JSON object
            self.lines.append(rec)
            if rec.get("event") == event:
                return rec
        raise AssertionError(f"no {event!r} log line; got {self.lines}")

    def finish(self, timeout: float = 30) -> tuple[int, bytes]:
        out, err = self.p.communicate(timeout=timeout)
        self.raw.append(err)
        for line in err.splitlines():
            self.lines.append(json.loads(line))
        return self.p.returncode, b"".join(self.raw) + out


def write_config(path: Path, extra: str = "") -> Path:
    # Everything else is the embedded defaults (maildir:var/outbox, var/quarantine ...).
    path.write_text('[server]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = ""\n' + extra)
    return path


def test_embedded_defaults_deliver_into_the_maildir(tmp_path: Path) -> None:
    proc = Proc(tmp_path, write_config(tmp_path / "c.toml"))
    try:
        with smtplib.SMTP("127.0.0.1", proc.port, timeout=20) as c:
            c.sendmail("news@corp.example", CUSTOMERS, message(CUSTOMERS))
        proc.wait_for("message_processed")
    finally:
        proc.p.send_signal(signal.SIGTERM)
        code, logs = proc.finish()
    assert code == 0
    files = sorted((tmp_path / "var/outbox/new").iterdir())
    assert len(files) == len(CUSTOMERS)  # one per envelope recipient, like an MDA
    for f in files:
        head = f.read_bytes().partition(b"\r\n\r\n")[0]
        delivered_to = head.split(b"Delivered-To: ", 1)[1].split(b"\r\n", 1)[0].decode()
        others = [c for c in CUSTOMERS if c != delivered_to]
        assert delivered_to in CUSTOMERS
        assert not any(o.encode() in head for o in others)
    rec = next(r for r in proc.lines if r["event"] == "message_processed")
    assert rec["action"] == "rewrite" and rec["hidden"] == 50 and rec["reply_code"] == 250
    assert b"@" not in logs  # no address at the default level, not even a domain-less one


async def test_sigterm_lets_the_message_in_flight_finish(tmp_path: Path) -> None:
    sink = Sink(data_delay=1.5)
    await sink.start()
    try:
        cfg = write_config(
            tmp_path / "c.toml",
            f'[upstream]\nurl = "smtp://127.0.0.1:{sink.port}"\n',
        )
        proc = await asyncio.to_thread(Proc, tmp_path, cfg)

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", proc.port, timeout=20) as c:
                c.ehlo("client.test")
                c.mail("news@corp.example")
                c.rcpt("alice@clients.example")
                return c.data(message(["alice@clients.example"]))

        sending = asyncio.create_task(asyncio.to_thread(send))
        deadline = time.monotonic() + 10
        while not sink.verbs.count("DATA") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        proc.p.send_signal(signal.SIGTERM)  # the upstream is still chewing on it
        reply = await sending
        code, logs = await asyncio.to_thread(proc.finish)
    finally:
        await sink.stop()
    assert reply[0] == 250
    assert code == 0
    assert [m.rcpt_tos for m in sink.messages] == [["alice@clients.example"]]
    # a new client is no longer served
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", proc.port, timeout=2)
    assert b"@" not in logs


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "supervisor"])
async def test_a_second_sigterm_cuts_the_drain_short_and_still_exits_0(tmp_path: Path, workers: int) -> None:
    sink = Sink(data_delay=20.0)  # an upstream far slower than anyone wants to wait for
    await sink.start()
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\nshutdown_timeout = 60.0\nworkers = {workers}\n'
            '[metrics]\nlisten = ""\n'
            f'[upstream]\nurl = "smtp://127.0.0.1:{sink.port}"\n'
        )
        proc = await asyncio.to_thread(Proc, tmp_path, cfg)

        def send() -> tuple[int, bytes] | str:
            try:
                with smtplib.SMTP("127.0.0.1", proc.port, timeout=30) as c:
                    c.ehlo("client.test")
                    c.mail("news@corp.example")
                    c.rcpt("alice@clients.example")
                    return c.data(message(["alice@clients.example"]))
            except smtplib.SMTPServerDisconnected as exc:
                return f"disconnected: {exc}"

        sending = asyncio.create_task(asyncio.to_thread(send))
        deadline = time.monotonic() + 10
        while not sink.verbs.count("DATA") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        proc.p.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert proc.p.poll() is None  # draining: waiting for the message in flight
        proc.p.send_signal(signal.SIGTERM)
        code, out = await asyncio.to_thread(proc.finish, 15)
        outcome = await sending
    finally:
        await sink.stop()
    assert code == 0, out.decode()[-3000:]
    # no 250, and a reply before the cut (issue 12): the client retries
    assert outcome == (421, b"4.3.2 Service shutting down, try again later")
