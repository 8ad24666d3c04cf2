"""`serve --listen/--metrics-listen/--upstream/--internal-domain` move a relay without editing its file.

The flags override the file, reach every worker of a supervisor, and stay in
force after SIGHUP (a reload reads the file again and lays the flags over it).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import message
from proc import cli_env
from sink import Sink, closed_port

CUSTOMERS = [f"person{i}@gmail.com" for i in range(12)]


class Relay:
    """`bccguard serve` with flags; its JSON log lines, read as they come."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "bccguard.cli", "serve", *args],
            cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.lines: list[dict[str, object]] = []

    def wait_for(self, event: str, count: int = 1, timeout: float = 30) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        assert self.p.stderr is not None
        while time.monotonic() < deadline:
            found = [r for r in self.lines if r.get("event") == event]
            if len(found) >= count:
                return found
            line = self.p.stderr.readline()
            if not line:
                break
            self.lines.append(json.loads(line))
        raise AssertionError(f"no {count} {event!r} log lines; got {self.lines}")

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            self.p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
        return self.p.returncode


def send(port: int, rcpts: list[str]) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail("news@corp.example", rcpts, message(rcpts, cc=["boss@corp.example"]))


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "supervisor"])
async def test_serve_flags_override_the_file_and_survive_a_reload(tmp_path: Path, workers: int) -> None:
    cfg = tmp_path / "c.toml"
    # The file points at places the relay must not use: a closed upstream, other ports,
    # and an internal domain that is not the colleagues' one.
    cfg.write_text(
        f'[server]\nlisten = "127.0.0.1:{closed_port()}"\nworkers = {workers}\n'
        f'[metrics]\nlisten = "127.0.0.1:{closed_port()}"\n'
        f'[upstream]\nurl = "smtp://127.0.0.1:{closed_port()}"\n'
        '[policy]\ninternal_domains = ["elsewhere.example"]\n'
    )
    metrics_port = closed_port()
    sink = Sink()
    await sink.start()
    relay = Relay(
        tmp_path, "--config", str(cfg), "--listen", "127.0.0.1:0",
        "--metrics-listen", f"127.0.0.1:{metrics_port}", "--upstream", sink.url,
        "--internal-domain", "corp.example", "--internal-domain", "agency.example",
    )  # fmt: skip
    try:
        started = await asyncio.to_thread(relay.wait_for, "started", workers)
        port = int(str(started[0]["listen"]).rsplit(":", 1)[1])
        health = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10).read()
        )
        assert health == b"ok\n"
        for round_ in range(2):
            await asyncio.to_thread(send, port, [*CUSTOMERS, "boss@corp.example"])
            got = sink.messages[round_]
            head = got.data.split(b"\r\n\r\n", 1)[0]
            assert b"Cc: boss@corp.example" in head  # a colleague, by --internal-domain
            assert b"X-BCCGuard: rewritten; hidden=12" in head
            if round_ == 0:
                relay.p.send_signal(signal.SIGHUP)
                await asyncio.to_thread(relay.wait_for, "reloaded", workers)
    finally:
        code = await asyncio.to_thread(relay.stop)
        await sink.stop()
    assert code == 0


def test_a_bad_flag_is_reported_as_the_command_lines(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bccguard.cli", "serve", "--listen", "127.0.0.1:99999"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 78
    assert proc.stderr.startswith("bccguard: config error: command line: server.listen:")
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("domain", "hint"),
    [
        ("corp.example,partner.example", "one domain per entry"),
        ("corp.example partner.example", "one domain per entry"),
        ("*.corp.example", "subdomains are included: write 'corp.example'"),
        ("corp.example/24", "is not a domain"),
    ],
)
def test_an_internal_domain_that_matches_no_address_is_refused(
    tmp_path: Path, domain: str, hint: str
) -> None:
    """"a,b" or "*.a" would match no address at all: the colleagues meant would silently count
    as customers, the trap of issue 14 item 4 again. Refused, from the flag and from the file."""
    proc = subprocess.run(
        [sys.executable, "-m", "bccguard.cli", "serve", "--internal-domain", "ok.example",
         "--internal-domain", domain],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 78
    (line,) = proc.stderr.splitlines()
    assert line.startswith("bccguard: config error: command line: policy.internal_domains:")
    assert repr(domain) in line and hint in line
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[policy]\ninternal_domains = [{json.dumps(domain)}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bccguard.cli", "config", "check", "--config", str(cfg)],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 78 and hint in proc.stderr


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "supervisor"])
async def test_a_file_edited_under_the_flags_then_broken_keeps_the_flags_on_sighup(
    tmp_path: Path, workers: int
) -> None:
    """SIGHUP after the file's own listen moved (the flag still wins: no "needs a restart"
    warning), then after the file broke (the old snapshot, flags included, keeps serving)."""
    cfg = tmp_path / "c.toml"
    body = (
        '[server]\nlisten = "127.0.0.1:{port}"\nworkers = {workers}\n[metrics]\nlisten = ""\n'
        '[upstream]\nurl = "smtp://127.0.0.1:{port}"\n[policy]\ninternal_domains = ["elsewhere.example"]\n'
    )
    cfg.write_text(body.format(port=closed_port(), workers=workers))
    sink = Sink()
    await sink.start()
    relay = Relay(tmp_path, "--config", str(cfg), "--listen", "127.0.0.1:0", "--upstream", sink.url,
                  "--internal-domain", "corp.example")  # fmt: skip
    try:
        started = await asyncio.to_thread(relay.wait_for, "started", workers)
        port = int(str(started[0]["listen"]).rsplit(":", 1)[1])
        cfg.write_text(body.format(port=closed_port(), workers=workers))  # the file's listen moved
        relay.p.send_signal(signal.SIGHUP)
        await asyncio.to_thread(relay.wait_for, "reloaded", workers)
        cfg.write_text(cfg.read_text() + "[policy.typo]\n")  # now the file does not load
        relay.p.send_signal(signal.SIGHUP)
        await asyncio.to_thread(relay.wait_for, "reload_failed", workers)
        await asyncio.to_thread(send, port, [*CUSTOMERS, "boss@corp.example"])
        head = sink.messages[0].data.split(b"\r\n\r\n", 1)[0]
        assert b"Cc: boss@corp.example" in head  # --internal-domain still in force
        assert [r for r in relay.lines if r.get("event") == "reload_listen_unchanged"] == []
    finally:
        code = await asyncio.to_thread(relay.stop)
        await sink.stop()
    assert code == 0
