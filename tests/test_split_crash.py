"""A split survey, the upstream failing part way, the relay SIGKILLed twice: nothing lost.

The relay runs as the real `bccguard serve` in a subprocess, so SIGKILL is a
real crash (no finally blocks, no flush). The recording sink is the judge:
every customer must receive at least one copy, and the copies received
twice may number at most the kills (the duplicate window is one write).
"""

from __future__ import annotations

import asyncio
import signal
import smtplib
import sys
from collections import Counter
from pathlib import Path

from proc import cli_env, eventually, write_toml
from sink import Sink, closed_port

CUSTOMERS = [f"customer{i}@{'gmail.com' if i % 3 else 'clients.example'}" for i in range(300)]
INTERNAL = ["sales@corp.example", "boss@corp.example"]
BUSY = CUSTOMERS[100:130]  # refused with 451 until the test lets them through


class Relay:
    """`python -m bccguard.cli serve --config F`, logs to a file."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bccguard.cli", "serve", "--config", str(self.config),
                stdout=log, stderr=log, env=cli_env(),
            )  # fmt: skip
        await eventually(self._listening, within=20, what="relay listening")

    def _listening(self) -> bool:
        assert self.proc is not None and self.proc.returncode is None, self.log.read_text()[-2000:]
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=2) as c:
                return c.noop()[0] == 250
        except OSError:
            return False

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 20)


def survey() -> bytes:
    to = ",\r\n ".join(CUSTOMERS)
    return (
        f"From: Marketing <news@corp.example>\r\nTo: {to}\r\nCc: sales@corp.example\r\n"
        "Subject: Your feedback\r\nMessage-ID: <survey-crash@corp.example>\r\n\r\nHello!\r\n"
    ).encode()


def submit(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("news@corp.example")
        for r in [*CUSTOMERS, *INTERNAL]:
            assert c.rcpt(r)[0] == 250
        return c.data(survey())


async def test_split_survives_sigkill_and_a_failing_upstream(sink: Sink, tmp_path: Path) -> None:
    port = closed_port()
    config = write_toml(tmp_path / "relay.toml", {
        "server": {"listen": f"127.0.0.1:{port}", "hostname": "bccguard.test", "shutdown_timeout": 2.0},
        "upstream": {"url": sink.url, "timeout": 5.0},
        "quarantine": {"path": str(tmp_path / "quarantine")},
        "spool": {"path": str(tmp_path / "spool"), "retry_schedule": ["1s"]},
        "metrics": {"listen": ""},
        "logging": {"format": "json"},
        "policy": {"internal_domains": ["corp.example"], "action": "split"},
    })  # fmt: skip
    relay = Relay(config, port, tmp_path / "relay.log")
    received: Counter[str] = Counter()

    def got() -> Counter[str]:
        received.clear()
        received.update(r for m in sink.messages if m.reply.startswith("2") for r in m.rcpt_tos)
        return received

    sink.data_delay = 0.002  # a little upstream latency, so the kills land mid-delivery
    sink.rcpt_replies = {c: "451 4.2.1 Mailbox busy, try later" for c in BUSY}
    await relay.start()
    assert await asyncio.to_thread(submit, port) == (250, b"2.0.0 Ok: split into 301 copies")

    kills = 0
    await eventually(lambda: len(got()) >= 60, what="first copies")
    await relay.kill()
    kills += 1
    sink.hangup_on_mail = 3  # the upstream breaks the next connections at once
    await relay.start()  # a restarted relay resumes from the spool at once
    await eventually(lambda: len(got()) >= 180, what="more copies after the restart")
    await relay.kill()
    kills += 1
    await relay.start()
    await eventually(lambda: len(got()) >= 300 - len(BUSY), within=60, what="all but the busy ones")
    assert not any(received[c] for c in BUSY)  # still refused: retried, not lost, not faked
    sink.rcpt_replies = {}
    await eventually(lambda: all(got()[r] for r in [*CUSTOMERS, *INTERNAL]), within=60, what="every copy")
    await eventually(lambda: not list((tmp_path / "spool").glob("*.json")), what="spool drained")
    assert await relay.terminate() == 0

    got()
    assert set(received) == {*CUSTOMERS, *INTERNAL}
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= kills, received.most_common(5)
    for m in sink.messages:  # every customer copy still addressed to that customer alone
        if m.rcpt_tos[0] in CUSTOMERS:
            head = m.data.partition(b"\r\n\r\n")[0]
            assert head.count(b"customer") == 1 and f"To: {m.rcpt_tos[0]}\r\n".encode() in head + b"\r\n"
    log = (tmp_path / "relay.log").read_text()
    assert "Traceback" not in log
    assert "customer1@" not in log and "customer2@" not in log  # no addresses at the default level
