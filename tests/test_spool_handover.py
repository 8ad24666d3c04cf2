"""A spool outlives its relay: the next relay started on it delivers what it holds at once.

Kubernetes leans on this (deploy/kubernetes/README.md): a StatefulSet's rolling
update replaces `bccguard-1` by a new pod on the same spool PVC only after the
old one exited, and `spool-drain.yaml` delivers a removed replica's spool by
running `bccguard serve` on it. Both are "a fresh relay process on a spool a
previous one wrote": what the previous one had deferred must go out at start,
not when its retry schedule (here an hour) falls due, and with nothing of it
lost or duplicated. Real processes, a real upstream (tests/sink.py).
"""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from deploy_helpers import RelayProcess, free_port, poll
from proc import write_toml
from sink import Sink

BUSY = "customer2@clients.example"


def relay_config(tmp_path: Path, name: str, sink: Sink, spool: Path) -> tuple[Path, int]:
    port = free_port()
    cfg = write_toml(tmp_path / f"{name}.toml", {
        "server": {
            "listen": f"127.0.0.1:{port}", "hostname": "bccguard.test", "shutdown_timeout": 2.0, "workers": 1,
        },
        "upstream": {"url": sink.url, "timeout": 5.0},
        # Each relay its own quarantine directory (one relay per directory), as each pod has.
        "quarantine": {"path": str(tmp_path / name / "quarantine")},
        "spool": {"path": str(spool), "retry_schedule": ["1h"]},
        "metrics": {"listen": ""},
        "logging": {"format": "json"},
        "policy": {"internal_domains": ["corp.example"], "action": "audit"},
    })  # fmt: skip
    return cfg, port


def send(port: int) -> tuple[int, bytes]:
    msg = (
        "From: sales@corp.example\r\nTo: customer1@clients.example, customer2@clients.example\r\n"
        "Subject: Quote\r\nMessage-ID: <handover@corp.example>\r\n\r\nHello\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("sales@corp.example")
        for r in ("customer1@clients.example", BUSY):
            assert c.rcpt(r)[0] == 250
        return c.data(msg.encode())


async def test_next_relay_on_a_spool_delivers_what_the_last_one_deferred_at_once(
    sink: Sink, tmp_path: Path
) -> None:
    spool = tmp_path / "spool-bccguard-1"  # the PVC both pods mount
    sink.rcpt_replies = {BUSY: "451 4.2.1 Mailbox busy, try later"}
    old_cfg, old_port = relay_config(tmp_path, "old", sink, spool)
    old = RelayProcess(old_cfg, tmp_path / "old.log", name="old pod")
    await old.astart()
    try:
        code, text = await asyncio.to_thread(send, old_port)
        assert code == 250 and b"1 deferred" in text, text
        assert len(list(spool.glob("*.json"))) == 1  # the deferred copy waits in the spool
    finally:
        assert await old.astop() == 0  # SIGTERM: the old pod drains and exits, releasing its locks

    sink.rcpt_replies = {}  # the upstream takes it now
    new_cfg, _ = relay_config(tmp_path, "new", sink, spool)
    new = RelayProcess(new_cfg, tmp_path / "new.log", name="new pod")
    await new.astart()
    try:
        # Not in an hour (retry_schedule): at start.
        await poll(lambda: not list(spool.glob("*.json")), "the spool delivered by the new relay", 30)
    finally:
        assert await new.astop() == 0
    delivered = [r for m in sink.messages if m.reply.startswith("2") for r in m.rcpt_tos]
    assert sorted(delivered) == ["customer1@clients.example", BUSY], delivered  # each once, none lost
    for relay in (old, new):
        log = relay.log_path.read_text()
        assert "Traceback" not in log and BUSY not in log
