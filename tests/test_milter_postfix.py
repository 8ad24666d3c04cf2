"""bccguard as Postfix's milter, end to end, with the real Postfix 3.7 and a real `bccguard serve`.

    client --SMTP--> Postfix smtpd :P --milter--> bccguard (milter only, no SMTP listener)
                     | header edits / 550 / 4xx / hold / discard
                     v
                     queue --> relayhost = the test's sink
    split copies: bccguard spool --> Postfix re-injection smtpd :R (no milters) --> sink

The Postfix side is deploy/postfix/main.cf.milter and master.cf.milter as
shipped (loopback ports substituted), the bccguard side
deploy/postfix/bccguard-milter.toml's shape. Proven here: the survey is
rewritten for every customer; a reject rule answers 550 5.7.1 in the
session; quarantine (bccguard's store, and Postfix's hold queue) and split
lose nothing; with bccguard stopped the client hears 4xx and the retry after
bccguard is back is delivered; mail from the `sendmail` command goes through
non_smtpd_milters the same way; and for every corpus case that rewrites, the
header block Postfix delivers equals the relay's own output.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import smtplib
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bccguard.config import from_dict
from bccguard.policy.engine import evaluate
from bccguard.policy.headers import parse_header
from bccguard.policy.model import Action, Envelope
from bccguard.store.quarantine import Quarantine
from deploy_helpers import RelayProcess, free_port, poll, require_binary, require_root, to_toml
from sink import Received, Sink
from test_postfix_e2e import (
    CUSTOMERS,
    DEADLINE,
    DEPLOY,
    MASTER_CORE,
    PostfixInstance,
    copies_of,
    header_block,
    submit,
    survey,
    wait_delivered,
)

pytestmark = pytest.mark.postfix

CORPUS = Path(__file__).parent / "corpus"


class MilterPostfix(PostfixInstance):
    """The private Postfix of test_postfix_e2e, with the milter placement's snippets."""

    def __init__(self, root: Path, *, milter_port: int, **kw: Any) -> None:
        super().__init__(root, placement="milter", **kw)
        self.milter_port = milter_port
        self.sendmail = require_binary("sendmail", package="postfix")
        self.postsuper = require_binary("postsuper", package="postfix")
        self.postcat = require_binary("postcat", package="postfix")

    def _snippet(self, name: str) -> str:
        text = (DEPLOY / name).read_text()
        text = text.replace("inet:127.0.0.1:8891", f"inet:127.0.0.1:{self.milter_port}")
        return text.replace("127.0.0.1:10026", f"127.0.0.1:{self.reinject_port}")

    def _main_snippet(self) -> str:
        # Leave headers as the client wrote them (127.0.0.1 is a local interface, so
        # Postfix would otherwise qualify bare addresses in To/Cc with myorigin).
        return (
            "local_header_rewrite_clients =\nalways_add_missing_headers = no\n"
            "# bccguard, from deploy/postfix/main.cf.milter:\n" + self._snippet("main.cf.milter")
        )

    def write(self) -> None:
        super().write()
        master = MASTER_CORE.format(smtpd_listen=f"127.0.0.1:{self.smtpd_port}")
        master += "\n# bccguard, from deploy/postfix/master.cf.milter:\n" + self._snippet("master.cf.milter")
        (self.conf / "master.cf").write_text(master)

    def send_with_sendmail(self, sender: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
        """The `sendmail` command of this instance: -C names its config directory; -t reads To/Cc."""
        return subprocess.run(
            [self.sendmail, "-C", str(self.conf), "-f", sender, "-t", "-i"],
            input=data.replace(b"\r\n", b"\n"),
            capture_output=True,
            timeout=DEADLINE,
            check=False,
        )


def milter_settings(root: Path, milter_port: int, reinject_port: int, quarantine: str) -> dict[str, Any]:
    return {
        "server": {"listen": "", "hostname": "bccguard.localhost", "shutdown_timeout": 5.0, "workers": 1},
        "milter": {"listen": f"inet:127.0.0.1:{milter_port}", "quarantine": quarantine},
        "upstream": {"url": f"smtp://127.0.0.1:{reinject_port}", "timeout": 20.0},
        "quarantine": {"path": str(root / "quarantine")},
        "spool": {"path": str(root / "spool"), "retry_schedule": ["1s"]},
        "metrics": {"listen": ""},
        "logging": {"format": "json"},
        "policy": {
            "internal_domains": ["corp.example"],
            "action": "rewrite",
            "rules": [
                {"name": "board", "senders": ["*@board.corp.example"], "action": "reject"},
                {"name": "legal", "senders": ["*@legal.corp.example"], "action": "quarantine"},
                {"name": "sales", "senders": ["*@sales.corp.example"], "action": "split"},
                {"name": "corpus", "senders": ["corpus@corp.example"], "consumer_domains": [],
                 "max_visible_external": 0},
                {"name": "asis", "senders": ["asis@corp.example"], "action": "pass"},
            ],
        },
    }  # fmt: skip


@pytest.fixture
def quarantine_mode() -> str:
    return "bccguard"


@pytest.fixture
async def stack(sink: Sink, quarantine_mode: str) -> AsyncIterator[tuple[MilterPostfix, RelayProcess, Path]]:
    require_root("a private Postfix instance (postfix start)")
    require_binary("postfix")
    root = Path(tempfile.mkdtemp(prefix="bccguard-milter-", dir="/var/tmp"))
    milter_port, reinject_port, smtpd_port = free_port(), free_port(), free_port()
    cfg = root / "bccguard.toml"
    cfg.write_text(to_toml(milter_settings(root, milter_port, reinject_port, quarantine_mode)))
    relay = RelayProcess(cfg, root / "bccguard.log", name="bccguard")
    pf = MilterPostfix(
        root,
        milter_port=milter_port,
        smtpd_port=smtpd_port,
        reinject_port=reinject_port,
        relay_port=0,
        sink_port=sink.port,
    )
    try:
        await relay.astart()
        await asyncio.to_thread(pf.start)
        yield pf, relay, root
    finally:
        print("---- maillog\n" + pf.log_tail(40) + "\n---- bccguard\n" + relay.tail(20))
        await asyncio.to_thread(pf.stop)
        await relay.astop()
        shutil.rmtree(root, ignore_errors=True)


def everyone() -> list[str]:
    return sorted([*CUSTOMERS, "sales@corp.example"])


async def test_survey_reject_quarantine_split(
    stack: tuple[MilterPostfix, RelayProcess, Path], sink: Sink
) -> None:
    pf, relay, root = stack

    # 1. The survey: rewritten inside Postfix's transaction, delivered to all 301.
    refused = await asyncio.to_thread(
        submit, pf.smtpd_port, "news@corp.example", everyone(), survey("m1@corp.example")
    )
    assert refused == {}
    for m in await wait_delivered(sink, pf, "m1@corp.example", everyone()):
        head = header_block(m.data)
        assert b"X-BCCGuard: rewritten; hidden=300" in head
        assert not any(c.encode() in head for c in CUSTOMERS)
        assert b"gmail.com" not in head and b"clients.example" not in head
        assert b"Cc: sales@corp.example" in head
        assert b"\nTo: Marketing <news@corp.example>\r\n" in head, head.decode()
        assert m.data.endswith(b"please answer our survey.\r\n")
    processed = relay.events("message_processed")
    assert [(e["action"], e["reply_code"]) for e in processed] == [("rewrite", 250)]
    assert processed[0]["client"] == "127.0.0.1"

    # 2. Reject: the client hears bccguard's 550 5.7.1 in the session; nothing is queued.
    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(
            submit, pf.smtpd_port, "ceo@board.corp.example", CUSTOMERS,
            survey("m2@corp.example", sender="CEO <ceo@board.corp.example>"),
        )  # fmt: skip
    assert err.value.smtp_code == 550
    assert b"5.7.1" in err.value.smtp_error and b"bccguard rule board" in err.value.smtp_error
    assert not any(c.encode() in err.value.smtp_error for c in CUSTOMERS)

    # 3. Quarantine (bccguard's store): the client gets 250, the original sits in
    #    bccguard's quarantine, Postfix discards its copy.
    refused = await asyncio.to_thread(
        submit, pf.smtpd_port, "counsel@legal.corp.example", CUSTOMERS,
        survey("m3@corp.example", sender="Counsel <counsel@legal.corp.example>"),
    )  # fmt: skip
    assert refused == {}
    q = Quarantine(root / "quarantine")
    (entry_id,) = q.ids()
    assert q.envelope(entry_id).rcpt_tos == tuple(CUSTOMERS)
    assert q.envelope(entry_id).mail_from == "counsel@legal.corp.example"
    original = q.message(entry_id)
    assert b"Message-ID: <m3@corp.example>" in original
    assert all(c.encode() in original for c in CUSTOMERS), "the original, unchanged, is what is held"

    # 4. Split: one copy per customer through the re-injection port, nothing lost.
    await asyncio.to_thread(
        submit, pf.smtpd_port, "rep@sales.corp.example", everyone(),
        survey("m4@corp.example", sender="Rep <rep@sales.corp.example>"),
    )  # fmt: skip
    copies = await wait_delivered(sink, pf, "m4@corp.example", everyone())
    for m in copies:
        head = header_block(m.data)
        others = [c for c in CUSTOMERS if c not in m.rcpt_tos]
        assert not any(f"{c}\r".encode() in head or f"{c},".encode() in head for c in others)
        assert b"X-BCCGuard: split" in head

    await asyncio.sleep(1.0)
    assert copies_of(sink, "m2@corp.example") == [], "a rejected message reached someone"
    assert copies_of(sink, "m3@corp.example") == [], "a quarantined message was also delivered"
    actions = [(e["action"], e["reply_code"]) for e in relay.events("message_processed")]
    assert actions == [("rewrite", 250), ("reject", 550), ("quarantine", 250), ("split", 250)]
    await poll(lambda: "Mail queue is empty" in pf.queue_listing(), "an empty queue", DEADLINE, interval=0.5)


@pytest.mark.parametrize("quarantine_mode", ["mta"])
async def test_quarantine_in_postfix_hold_queue(
    stack: tuple[MilterPostfix, RelayProcess, Path], sink: Sink
) -> None:
    """`[milter] quarantine = "mta"`: Postfix holds the original; `postsuper -H` releases it."""
    pf, relay, root = stack
    refused = await asyncio.to_thread(
        submit, pf.smtpd_port, "counsel@legal.corp.example", CUSTOMERS,
        survey("h1@corp.example", sender="Counsel <counsel@legal.corp.example>"),
    )  # fmt: skip
    assert refused == {}
    held: list[dict[str, Any]] = []

    def on_hold() -> bool:
        held[:] = [q for q in pf.queue_json() if q.get("queue_name") == "hold"]
        return bool(held)

    await poll(on_hold, "the message in Postfix's hold queue", DEADLINE, interval=0.2)
    (entry,) = held
    assert len(entry["recipients"]) == len(CUSTOMERS)
    shown = pf.run(pf.postcat, "-c", str(pf.conf), "-q", entry["queue_id"], check=False).stdout
    assert "Message-ID: <h1@corp.example>" in shown
    assert f"{entry['queue_id']}: milter-hold" in pf.log_tail(200)
    (event,) = relay.events("message_processed")
    assert (event["action"], event["rule"]) == ("quarantine", "legal")
    assert event["mta_queue_id"] == entry["queue_id"], "bccguard's log names Postfix's queue id"
    assert Quarantine(root / "quarantine").ids() == [], "mode mta: nothing in bccguard's own store"
    await asyncio.sleep(0.5)
    assert copies_of(sink, "h1@corp.example") == []

    pf.run(pf.postsuper, "-c", str(pf.conf), "-H", entry["queue_id"])
    await asyncio.to_thread(pf.flush)
    for m in await wait_delivered(sink, pf, "h1@corp.example", sorted(CUSTOMERS)):
        assert b"X-BCCGuard" not in header_block(m.data), "released as it was held: the original"
    assert [e["action"] for e in relay.events("message_processed")] == ["quarantine"]


def _attempt(port: int, sender: str, rcpts: list[str], data: bytes) -> int:
    """One client attempt: 250, or the SMTP code of the refusal, whatever the stage."""
    try:
        submit(port, sender, rcpts, data)
    except smtplib.SMTPRecipientsRefused as exc:
        return min(code for code, _ in exc.recipients.values())
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    return 250


async def test_bccguard_down_tempfails_then_the_retry_is_delivered(
    stack: tuple[MilterPostfix, RelayProcess, Path], sink: Sink
) -> None:
    """milter_default_action = tempfail: nothing is accepted uninspected while bccguard is down."""
    pf, relay, _ = stack
    assert await relay.astop() == 0
    code = await asyncio.to_thread(
        _attempt, pf.smtpd_port, "news@corp.example", everyone(), survey("d1@corp.example")
    )
    assert 400 <= code < 500, code
    await asyncio.sleep(0.5)
    assert copies_of(sink, "d1@corp.example") == []
    assert "Mail queue is empty" in pf.queue_listing(), "refused in the session: nothing queued"

    await relay.astart()
    code = await asyncio.to_thread(  # the client's retry
        _attempt, pf.smtpd_port, "news@corp.example", everyone(), survey("d1@corp.example")
    )
    assert code == 250
    for m in await wait_delivered(sink, pf, "d1@corp.example", everyone()):
        assert not any(c.encode() in header_block(m.data) for c in CUSTOMERS)


async def test_sendmail_command_goes_through_non_smtpd_milters(
    stack: tuple[MilterPostfix, RelayProcess, Path], sink: Sink
) -> None:
    pf, relay, _ = stack
    done = await asyncio.to_thread(pf.send_with_sendmail, "news@corp.example", survey("p1@corp.example"))
    assert done.returncode == 0, done.stderr
    for m in await wait_delivered(sink, pf, "p1@corp.example", everyone()):
        head = header_block(m.data)
        assert b"X-BCCGuard: rewritten; hidden=300" in head
        assert not any(c.encode() in head for c in CUSTOMERS)
    (event,) = relay.events("message_processed")
    assert (event["action"], event["rcpts"]) == ("rewrite", len(everyone()))


CASES = sorted(p for p in CORPUS.iterdir() if p.name.endswith((".eml", ".eml.gz")))
CORPUS_POLICY = from_dict(
    {"policy": {"internal_domains": ["corp.example"], "consumer_domains": [], "max_visible_external": 0}}
).policy
CORPUS_RCPT = "someone@gmail.com"


def _without_postfix_trace(data: bytes) -> bytes:
    """The message less the Received field Postfix's smtpd prepends (its only trace field here)."""
    block = parse_header(data)
    first = block.fields[0] if block.fields else None
    if first is not None and first.lname == "received" and "mx.postfix.test" in first.value:
        return data[: first.start] + data[first.end :]
    return data


async def test_corpus_postfix_delivers_exactly_the_relays_header_block(
    stack: tuple[MilterPostfix, RelayProcess, Path], sink: Sink
) -> None:
    """For every corpus case that rewrites: milter edits applied by Postfix == the relay's own output.

    Each case goes through Postfix twice: as sent by a pass-rule sender (what
    Postfix itself makes of the bytes: CRLF, its own header-block end), then by
    a sender whose rule rewrites. The relay's output is computed from the
    first copy; the second must carry exactly that header block.
    """
    pf, relay, _ = stack
    compared = []
    for path in CASES:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        name = path.name.split(".eml")[0]

        async def through(sender: str, data: bytes = data, name: str = name) -> Received:
            before = len(sink.messages)
            code = await asyncio.to_thread(_attempt, pf.smtpd_port, sender, [CORPUS_RCPT], data)
            assert code == 250, f"{name}: {code}"
            await poll(lambda: len(sink.messages) > before, f"{name} from {sender}", DEADLINE, interval=0.05)
            (got,) = sink.messages[before:]
            assert got.mail_from == sender
            return got

        as_is = _without_postfix_trace((await through("asis@corp.example")).data)
        env = Envelope(mail_from="corpus@corp.example", rcpt_tos=(CORPUS_RCPT,))
        expected = evaluate(as_is, env, CORPUS_POLICY)
        if expected.verdict.action is not Action.REWRITE:
            continue
        delivered = _without_postfix_trace((await through("corpus@corp.example")).data)
        assert header_block(delivered) == header_block(expected.message), name
        assert delivered == expected.message, f"{name}: the body changed"
        compared.append(name)
    assert len(compared) >= 30, compared
    print(f"corpus cases compared through Postfix: {len(compared)} of {len(CASES)}")
