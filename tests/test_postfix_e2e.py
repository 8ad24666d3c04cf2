"""Postfix with bccguard as its after-queue content filter, end to end, with the real Postfix.

    client --SMTP--> Postfix smtpd :P --queue--> [bccguard transport] --> bccguard (a real process)
        --> Postfix re-injection smtpd :R (no filter) --queue--> relayhost = the test's sink

The Postfix side is deploy/postfix/main.cf.after-queue and master.cf.after-queue
exactly as shipped, with only the loopback port numbers substituted: what the
guide tells an admin to paste is what runs here. The instance is private: its
own config directory, queue and data directory under /var/tmp (the postfix user
must be able to read the config path, and maillog_file must sit under /var),
chroot off, no DNS, listening on 127.0.0.1 only. It never touches /etc/postfix.

Proven here:
- a 300-customer survey arrives at the sink for every recipient, in however many
  transactions Postfix splits it into (default recipient limit 50), with no
  customer address anywhere in any copy's header block;
- with bccguard stopped, mail stays deferred in Postfix's queue, and after
  bccguard is back and the queue is flushed it is delivered: nothing lost;
- a message bccguard rejects is bounced by Postfix to its sender, and the
  bounce carries bccguard's 5.7.1 reason.
And for deploy/postfix/master.cf.before-queue (smtpd_proxy_filter): the survey
is rewritten the same way, and a rejected message is refused to the client
in the SMTP session itself (550 5.7.1), with nothing queued and no bounce.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deploy_helpers import RelayProcess, free_port, poll, require_binary, require_root, to_toml
from sink import Received, Sink

pytestmark = pytest.mark.postfix

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "postfix"
CUSTOMERS = [f"customer{i}@{'gmail.com' if i % 3 else 'clients.example'}" for i in range(300)]
DEADLINE = 60.0  # seconds any one step may take before the test says which step hung

# The services Postfix needs to receive, queue, bounce and relay; chroot off (the
# private queue directory is not a chroot jail), everything else Debian's defaults.
MASTER_CORE = """\
{smtpd_listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix: `postfix -c DIR start`, its own queue, loopback only."""

    def __init__(
        self,
        root: Path,
        *,
        smtpd_port: int,
        reinject_port: int,
        relay_port: int,
        sink_port: int,
        placement: str = "after-queue",
    ):
        self.placement = placement
        self.root = root
        self.conf = root / "etc"
        self.queue = root / "queue"
        self.data = root / "data"
        self.maillog = root / "maillog"
        self.smtpd_port = smtpd_port
        self.reinject_port = reinject_port
        self.relay_port = relay_port
        self.sink_port = sink_port
        self.postfix = require_binary("postfix")
        self.postqueue = require_binary("postqueue", package="postfix")
        self.started = False

    def _snippet(self, name: str) -> str:
        """A deploy/postfix file as shipped, with this test's loopback ports."""
        text = (DEPLOY / name).read_text()
        text = text.replace("127.0.0.1]:10025", f"127.0.0.1]:{self.relay_port}")  # content_filter
        text = text.replace("=127.0.0.1:10025", f"=127.0.0.1:{self.relay_port}")  # smtpd_proxy_filter
        text = text.replace("127.0.0.1:10026", f"127.0.0.1:{self.reinject_port}")
        # The before-queue snippet replaces the public `smtp inet` service: ours is on a test port.
        return re.sub(r"^smtp(\s+inet)", rf"127.0.0.1:{self.smtpd_port}\1", text, flags=re.MULTILINE)

    def write(self) -> None:
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o755)
        self.conf.chmod(0o755)
        main = f"""\
# Private test instance (tests/test_postfix_e2e.py)
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
maillog_file = {self.maillog}
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix.test
mydomain = postfix.test
myorigin = corp.example
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relayhost = [127.0.0.1]:{self.sink_port}
smtp_dns_support_level = disabled
smtputf8_enable = yes
biff = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# Retry deferred mail quickly; the test flushes anyway.
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 10s
{self._main_snippet()}
"""
        (self.conf / "main.cf").write_text(main)
        if self.placement == "after-queue":
            master = MASTER_CORE.format(smtpd_listen=f"127.0.0.1:{self.smtpd_port}")
        else:  # the snippet brings the public smtpd itself
            master = MASTER_CORE.split("\n", 1)[1]
        master += f"\n# bccguard, from deploy/postfix/master.cf.{self.placement}:\n"
        master += self._snippet(f"master.cf.{self.placement}")
        (self.conf / "master.cf").write_text(master)

    def _main_snippet(self) -> str:
        if self.placement == "after-queue":
            return "# bccguard, from deploy/postfix/main.cf.after-queue:\n" + self._snippet(
                "main.cf.after-queue"
            )
        return "# before-queue: no main.cf change (deploy/postfix/master.cf.before-queue only)"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=DEADLINE, check=check)

    def start(self) -> None:
        self.write()
        check = self.run(self.postfix, "-c", str(self.conf), "check", check=False)
        assert check.returncode == 0, (
            f"postfix check failed:\n{check.stdout}{check.stderr}\n{self.log_tail()}"
        )
        started = self.run(self.postfix, "-c", str(self.conf), "start", check=False)
        self.started = True
        assert started.returncode == 0, (
            f"postfix start failed:\n{started.stdout}{started.stderr}\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if not self.started:
            return
        stopped = self.run(self.postfix, "-c", str(self.conf), "stop", check=False)
        if stopped.returncode != 0:
            self.run(self.postfix, "-c", str(self.conf), "abort", check=False)
        self.started = False

    def queue_listing(self) -> str:
        return self.run(self.postqueue, "-c", str(self.conf), "-p", check=False).stdout

    def queue_json(self) -> list[dict[str, Any]]:
        """`postqueue -j`: one JSON object per queued message (queue_name, sender, recipients)."""
        out = self.run(self.postqueue, "-c", str(self.conf), "-j", check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        self.run(self.postqueue, "-c", str(self.conf), "-f")

    def log_tail(self, n: int = 40) -> str:
        if not self.maillog.exists():
            return "(no maillog yet)"
        return "\n".join(line[:300] for line in self.maillog.read_text("utf-8", "replace").splitlines()[-n:])


def survey(
    message_id: str, sender: str = "Marketing <news@corp.example>", subject: str = "Your feedback"
) -> bytes:
    """A survey as a mail client writes it: To folded over many lines (RFC 5322 2.2.3)."""
    to = ",\r\n ".join(CUSTOMERS)
    return (
        f"From: {sender}\r\nTo: {to}\r\nCc: sales@corp.example\r\nSubject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        "Hello,\r\nplease answer our survey.\r\n"
    ).encode()


def submit(port: int, mail_from: str, rcpts: list[str], data: bytes) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as c:
        c.ehlo("client.test")
        return c.sendmail(mail_from, rcpts, data)


def header_block(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0]


def copies_of(sink: Sink, message_id: str) -> list[Received]:
    tag = f"Message-ID: <{message_id}>".encode()
    return [m for m in sink.messages if m.reply.startswith("2") and tag in header_block(m.data)]


def recipients_of(copies: list[Received]) -> list[str]:
    return sorted(r for m in copies for r in m.rcpt_tos)


def relay_settings(root: Path, relay_port: int, reinject_port: int) -> dict[str, Any]:
    """deploy/postfix/bccguard.toml's shape, on test ports and paths, plus a reject rule."""
    return {
        "server": {
            "listen": f"127.0.0.1:{relay_port}",
            "hostname": "bccguard.localhost",
            "max_recipients": 1000,
            "shutdown_timeout": 5.0,
        },
        "upstream": {"url": f"smtp://127.0.0.1:{reinject_port}", "timeout": 20.0},
        "quarantine": {"path": str(root / "quarantine")},
        "spool": {"path": str(root / "spool")},
        "metrics": {"listen": ""},
        "logging": {"format": "json"},
        "policy": {
            "internal_domains": ["corp.example"],
            "action": "rewrite",
            "rules": [{"name": "board", "senders": ["*@board.corp.example"], "action": "reject"}],
        },
    }


@pytest.fixture
def placement() -> str:
    return "after-queue"


@pytest.fixture
async def stack(sink: Sink, placement: str) -> AsyncIterator[tuple[PostfixInstance, RelayProcess]]:
    require_root("a private Postfix instance (postfix start)")
    require_binary("postfix")
    root = Path(tempfile.mkdtemp(prefix="bccguard-postfix-", dir="/var/tmp"))
    relay_port, reinject_port, smtpd_port = free_port(), free_port(), free_port()
    cfg = root / "bccguard.toml"
    cfg.write_text(to_toml(relay_settings(root, relay_port, reinject_port)))
    relay = RelayProcess(cfg, root / "bccguard.log", name="bccguard")
    pf = PostfixInstance(
        root,
        smtpd_port=smtpd_port,
        reinject_port=reinject_port,
        relay_port=relay_port,
        sink_port=sink.port,
        placement=placement,
    )
    try:
        await relay.astart()
        await asyncio.to_thread(pf.start)
        yield pf, relay
    finally:
        # Shown by pytest only when the test failed: what Postfix and bccguard said.
        print("---- maillog\n" + pf.log_tail(40) + "\n---- bccguard\n" + relay.tail(20))
        await asyncio.to_thread(pf.stop)
        await relay.astop()
        shutil.rmtree(root, ignore_errors=True)


async def wait_delivered(
    sink: Sink, pf: PostfixInstance, message_id: str, expected: list[str]
) -> list[Received]:
    def done() -> bool:
        return recipients_of(copies_of(sink, message_id)) == expected

    try:
        await poll(done, f"{message_id} delivered to all {len(expected)} recipients", DEADLINE)
    except AssertionError:
        got = len(recipients_of(copies_of(sink, message_id)))
        raise AssertionError(
            f"{got}/{len(expected)} delivered\n{pf.queue_listing()}\n{pf.log_tail()}"
        ) from None
    return copies_of(sink, message_id)


async def test_postfix_after_queue_filter_end_to_end(
    stack: tuple[PostfixInstance, RelayProcess], sink: Sink
) -> None:
    pf, relay = stack
    t0 = time.monotonic()
    everyone = sorted([*CUSTOMERS, "sales@corp.example"])

    # 1. A 300-customer survey, rewritten on its way through.
    refused = await asyncio.to_thread(
        submit,
        pf.smtpd_port,
        "news@corp.example",
        [*CUSTOMERS, "sales@corp.example"],
        survey("s1@corp.example"),
    )
    assert refused == {}
    copies = await wait_delivered(sink, pf, "s1@corp.example", everyone)
    assert len(copies) >= 2, "Postfix's default recipient limit of 50 should have split the relayed copies"
    for m in copies:
        head = header_block(m.data)
        assert b"X-BCCGuard: rewritten; hidden=300" in head
        for c in CUSTOMERS:
            assert c.encode() not in head
        assert b"gmail.com" not in head and b"clients.example" not in head
        assert b"Cc: sales@corp.example" in head
        assert m.data.endswith(b"please answer our survey.\r\n")
    processed = relay.events("message_processed")
    assert [(e["action"], e["reply_code"]) for e in processed] == [("rewrite", 250)]
    t_survey = time.monotonic() - t0

    # 2. bccguard down: Postfix keeps the mail deferred in its queue.
    assert await relay.astop() == 0
    await asyncio.to_thread(
        submit,
        pf.smtpd_port,
        "news@corp.example",
        [*CUSTOMERS, "sales@corp.example"],
        survey("s2@corp.example"),
    )
    held: list[dict[str, Any]] = []

    def deferred() -> bool:
        held[:] = [
            q
            for q in pf.queue_json()
            if q.get("sender") == "news@corp.example"
            and any(f":{pf.relay_port}" in r.get("delay_reason", "") for r in q.get("recipients", []))
        ]
        return bool(held)

    await poll(
        deferred, "the survey held in Postfix's queue with bccguard unreachable", DEADLINE, interval=0.5
    )
    (entry,) = held
    assert entry["queue_name"] in ("deferred", "active")  # active: being retried right now
    assert len(entry["recipients"]) == len(everyone)
    assert "refused" in entry["recipients"][0]["delay_reason"].lower()
    assert copies_of(sink, "s2@corp.example") == []

    # bccguard back on the same port; flush: delivered, nothing lost, queue empty.
    await relay.astart()
    await asyncio.to_thread(pf.flush)
    copies = await wait_delivered(sink, pf, "s2@corp.example", everyone)
    for m in copies:
        assert not any(c.encode() in header_block(m.data) for c in CUSTOMERS)
    await poll(lambda: "Mail queue is empty" in pf.queue_listing(), "an empty queue", DEADLINE, interval=0.5)

    # 3. A message the policy rejects bounces to its sender with bccguard's reason.
    await asyncio.to_thread(
        submit,
        pf.smtpd_port,
        "ceo@board.corp.example",
        CUSTOMERS,
        survey("r1@corp.example", sender="CEO <ceo@board.corp.example>", subject="Apology"),
    )

    def bounce() -> Received | None:
        return next(
            (
                m
                for m in sink.messages
                if m.mail_from in ("", "<>") and m.rcpt_tos == ["ceo@board.corp.example"]
            ),
            None,
        )

    await poll(lambda: bounce() is not None, "the bounce to ceo@board.corp.example", DEADLINE, interval=0.2)
    b = bounce()
    assert b is not None
    text = b.data.decode("utf-8", "replace")
    assert "5.7.1" in text
    assert "customer addresses are visible in To/Cc" in text
    assert "bccguard rule board" in text
    assert copies_of(sink, "r1@corp.example") == [], "a rejected message must not reach any recipient"
    for c in CUSTOMERS:
        assert c.encode() not in header_block(b.data)
    reject = [e for e in relay.events("message_processed") if e["action"] == "reject"]
    assert [(e["rule"], e["reply_code"]) for e in reject] == [("board", 550)]
    total = time.monotonic() - t0
    print(f"postfix e2e: survey through Postfix and bccguard in {t_survey:.2f}s, whole test {total:.2f}s")


@pytest.mark.parametrize("placement", ["before-queue"])
async def test_postfix_before_queue_proxy_filter(
    stack: tuple[PostfixInstance, RelayProcess], sink: Sink
) -> None:
    """deploy/postfix/master.cf.before-queue: the sender's client gets bccguard's refusal in the session."""
    pf, relay = stack
    everyone = sorted([*CUSTOMERS, "sales@corp.example"])
    await asyncio.to_thread(
        submit,
        pf.smtpd_port,
        "news@corp.example",
        [*CUSTOMERS, "sales@corp.example"],
        survey("b1@corp.example"),
    )
    for m in await wait_delivered(sink, pf, "b1@corp.example", everyone):
        head = header_block(m.data)
        assert b"X-BCCGuard: rewritten; hidden=300" in head
        assert not any(c.encode() in head for c in CUSTOMERS)

    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(
            submit,
            pf.smtpd_port,
            "ceo@board.corp.example",
            CUSTOMERS,
            survey("b2@corp.example", sender="CEO <ceo@board.corp.example>"),
        )
    assert err.value.smtp_code == 550
    assert b"5.7.1" in err.value.smtp_error and b"bccguard rule board" in err.value.smtp_error
    assert b"customer addresses are visible in To/Cc" in err.value.smtp_error
    await asyncio.sleep(1.0)  # nothing queued, so nothing can arrive later: give it a moment to prove it
    assert copies_of(sink, "b2@corp.example") == []
    assert not any(m.mail_from in ("", "<>") for m in sink.messages), (
        "no bounce: the client was told directly"
    )
    assert [e["action"] for e in relay.events("message_processed")] == ["rewrite", "reject"]
