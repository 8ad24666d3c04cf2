"""The relay end to end: a real client, the relay, and a real upstream sink on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import smtplib
import stat
from pathlib import Path

import pytest

from bccguard.app import App
from bccguard.policy.addresses import visible_recipients
from bccguard.policy.headers import parse_header
from conftest import StartRelay, data_reply, message, send, talk
from sink import Received, Sink, without_trace


def delivered(sink: Sink) -> list[Received]:
    """What the upstream accepted (the sink also records what it refused)."""
    return [m for m in sink.messages if m.reply.startswith("2")]


CUSTOMERS = [f"customer{i}@{'gmail.com' if i % 3 else 'clients.example'}" for i in range(300)]


async def test_survey_to_300_customers_is_delivered_with_no_customer_in_headers(
    relay: App, sink: Sink
) -> None:
    data = message(CUSTOMERS, cc=["sales@corp.example"])
    refused = await send(relay.port, "news@corp.example", [*CUSTOMERS, "sales@corp.example"], data)
    assert refused == {}
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert sorted(got.rcpt_tos) == sorted([*CUSTOMERS, "sales@corp.example"])
    head, _, body = got.data.partition(b"\r\n\r\n")
    for c in CUSTOMERS:
        assert c.encode() not in head
    assert b"gmail.com" not in head and b"clients.example" not in head
    assert b"\r\nX-BCCGuard: rewritten; hidden=300\r\n" in head + b"\r\n"
    assert b"\r\nCc: sales@corp.example\r\n" in head + b"\r\n"
    assert b"To: Marketing <news@corp.example>" in head
    assert body == data.partition(b"\r\n\r\n")[2]
    assert [a.addr_spec for a in visible_recipients(parse_header(got.data))] == [
        "news@corp.example",
        "sales@corp.example",
    ]


async def test_ordinary_mail_passes_byte_for_byte(relay: App, sink: Sink) -> None:
    data = message(["alice@corp.example", "Bob <bob@gmail.com>"], cc=["carol@agency.example"])
    await send(relay.port, "news@corp.example", ["alice@corp.example", "bob@gmail.com"], data)
    assert sink.messages[0].original == data


async def test_upstream_down_gives_451_and_nothing_claimed(start_relay: StartRelay, sink: Sink) -> None:
    port = sink.port
    await sink.stop()
    app = await start_relay(f"smtp://127.0.0.1:{port}")
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(app.port, "news@corp.example", CUSTOMERS[:3], message(CUSTOMERS[:3]))
    assert err.value.smtp_code == 451
    assert err.value.smtp_error.startswith(b"4.4.1")


async def test_upstream_5xx_is_passed_on_without_addresses(relay: App, sink: Sink) -> None:
    sink.data_reply = "554 5.7.0 <news@corp.example> message refused by policy"
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(relay.port, "news@corp.example", ["alice@corp.example"], message(["alice@corp.example"]))
    assert err.value.smtp_code == 554
    assert b"@" not in err.value.smtp_error
    assert delivered(sink) == []


async def test_upstream_4xx_gives_451(relay: App, sink: Sink) -> None:
    sink.data_reply = "452 4.3.1 Insufficient system storage"
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(relay.port, "news@corp.example", ["alice@corp.example"], message(["alice@corp.example"]))
    assert err.value.smtp_code == 451


async def test_partial_refusal_spools_the_rest_and_reports_the_truth(relay: App, sink: Sink) -> None:
    sink.rcpt_replies = {
        "gone@clients.example": "550 5.1.1 User unknown",
        "busy@clients.example": "451 4.2.1 Mailbox busy",
    }
    rcpts = ["ok@clients.example", "gone@clients.example", "busy@clients.example"]
    data = message(rcpts)
    reply = await asyncio.to_thread(data_reply, relay.port, "news@corp.example", rcpts, data)
    assert reply[0] == 250
    assert b"1 of 3" in reply[1]
    assert sink.messages[0].rcpt_tos == ["ok@clients.example"]
    entries = relay.runtime.spool.entries()
    kinds = sorted((e.kind, e.rcpt_tos) for e in entries)
    assert kinds == [("dsn", ("news@corp.example",)), ("retry", ("busy@clients.example",))]
    dsn = next(e for e in entries if e.kind == "dsn")
    assert dsn.mail_from == ""
    dsn_bytes = relay.runtime.spool.message(dsn.id)
    assert b"Final-Recipient: rfc822; gone@clients.example" in dsn_bytes
    assert b"Status: 5.1.1" in dsn_bytes
    # the retried copy goes out once the mailbox is free again
    sink.rcpt_replies = {}
    sink.messages.clear()
    await relay.retrier.run_once(force=True)
    delivered = sorted(tuple(m.rcpt_tos) for m in sink.messages)
    assert delivered == [("busy@clients.example",), ("news@corp.example",)]
    assert relay.runtime.spool.entries() == []


async def test_client_outside_allowed_networks_is_refused_at_rcpt(
    start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(
        f"smtp://127.0.0.1:{sink.port}", {"server": {"allowed_networks": ["127.0.0.1/32"]}}
    )
    with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
        await send(
            app.port,
            "x@outside.example",
            ["alice@corp.example"],
            message(["alice@corp.example"]),
            source="127.0.0.2",
        )
    code, text = err.value.recipients["alice@corp.example"]
    assert code == 554 and text.startswith(b"5.7.1")
    assert delivered(sink) == []
    # the allowed address still relays
    await send(app.port, "x@corp.example", ["alice@corp.example"], message(["alice@corp.example"]))
    assert len(sink.messages) == 1


SMUGGLE = (
    b"From: a@corp.example\r\nTo: b@corp.example\r\nSubject: hi\r\n\r\nfirst\r\n"
    b"\n.\r\nMAIL FROM:<ceo@corp.example>\r\nRCPT TO:<victim@corp.example>\r\nDATA\r\n"
    b"From: ceo@corp.example\r\nTo: victim@corp.example\r\n\r\nsmuggled\r\n"
)


@pytest.mark.parametrize(
    "payload",
    [
        SMUGGLE,
        SMUGGLE.replace(b"\n.\r\n", b"\r\n.\n"),
        SMUGGLE.replace(b"\n.\r\n", b"\r.\r"),
        b"From: a@corp.example\r\nTo: b@corp.example\r\n\r\nbare LF\nline\r\n",
        b"From: a@corp.example\r\nTo: b@corp.example\r\n\r\nbare CR\rline\r\n",
    ],
    ids=["lf-dot-crlf", "crlf-dot-lf", "cr-dot-cr", "bare-lf", "bare-cr"],
)
async def test_smuggling_and_bare_line_endings_are_refused(relay: App, sink: Sink, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        lines = await talk(reader, writer, b"EHLO attacker.test\r\n")
        assert lines[-1].startswith(b"250 ")
        await talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n")
        await talk(reader, writer, b"RCPT TO:<b@corp.example>\r\n")
        assert (await talk(reader, writer, b"DATA\r\n"))[0].startswith(b"354")
        reply = await talk(reader, writer, payload + b"\r\n.\r\n")
        assert reply[0].startswith(b"550 5.6.0"), reply
        # the session is still in a sane state afterwards
        assert (await talk(reader, writer, b"NOOP\r\n"))[0].startswith(b"250")
    finally:
        writer.close()
    await asyncio.sleep(0.05)
    assert delivered(sink) == []


async def test_pipelined_commands_after_data_are_not_lost(relay: App, sink: Sink) -> None:
    """The bytes after CRLF.CRLF belong to the next command, in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    await reader.readline()
    body = message(["b@corp.example"])
    batch = b"EHLO c.test\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<b@corp.example>\r\nDATA\r\n"
    writer.write(batch)
    replies = []
    while len(replies) < 4:
        line = await asyncio.wait_for(reader.readline(), 10)
        if line[3:4] != b"-":
            replies.append(line)
    assert replies[-1].startswith(b"354")
    writer.write(body + b".\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<c@corp.example>\r\nDATA\r\n")
    got = [await asyncio.wait_for(reader.readline(), 10) for _ in range(4)]
    assert [g[:3] for g in got] == [b"250", b"250", b"250", b"354"]
    writer.write(body + b".\r\nQUIT\r\n")
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"250")
    writer.close()
    assert [m.rcpt_tos for m in sink.messages] == [["b@corp.example"], ["c@corp.example"]]
    assert sink.messages[0].original == body


async def test_quarantine_holds_the_original_durably(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", {"policy": {"action": "quarantine"}})
    data = message(CUSTOMERS[:20])
    reply = await asyncio.to_thread(data_reply, app.port, "news@corp.example", CUSTOMERS[:20], data)
    assert reply[0] == 250 and reply[1].startswith(b"2.6.0 Held for review as ")
    assert delivered(sink) == []
    q = app.runtime.quarantine
    (entry_id,) = q.ids()
    assert without_trace(q.message(entry_id)) == data  # as received, after our trace field
    meta = json.loads((q.path / f"{entry_id}.json").read_text())
    assert meta["rcpt_tos"] == CUSTOMERS[:20] and meta["verdict"]["action"] == "quarantine"
    for suffix in (".eml", ".json"):
        assert stat.S_IMODE(os.stat(q.path / f"{entry_id}{suffix}").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(q.path).st_mode) == 0o700


async def test_reject_tells_the_sender_why_without_addresses(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", {"policy": {"action": "reject"}})
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(app.port, "news@corp.example", CUSTOMERS[:40], message(CUSTOMERS[:40]))
    assert err.value.smtp_code == 550
    text = err.value.smtp_error
    assert text.startswith(b"5.7.1 ") and b"40 customer addresses are visible in To/Cc" in text
    assert b"Bcc" in text and b"@" not in text
    assert delivered(sink) == []


async def test_limits_have_defined_replies(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(
        f"smtp://127.0.0.1:{sink.port}", {"server": {"max_recipients": 3, "max_message_size": 2000}}
    )
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await send(app.port, "a@corp.example", ["x\x01y@corp.example"], message(["b@corp.example"]))
    refused = await send(
        app.port, "a@corp.example", [f"u{i}@corp.example" for i in range(5)], message(["u0@corp.example"])
    )
    assert refused == {
        "u3@corp.example": (452, b"4.5.3 Too many recipients"),
        "u4@corp.example": (452, b"4.5.3 Too many recipients"),
    }
    with pytest.raises(smtplib.SMTPSenderRefused) as err:  # SIZE= in MAIL FROM
        await send(
            app.port, "a@corp.example", ["b@corp.example"], message(["b@corp.example"], body="x" * 5000)
        )
    assert err.value.smtp_code == 552
    reply = await asyncio.to_thread(_no_size_send, app.port, message(["b@corp.example"], body="y\r\n" * 2000))
    assert reply == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    reply = await asyncio.to_thread(
        _no_size_send, app.port, message(["b@corp.example"], body="z" * 999 + "\r\n")
    )
    assert reply[0] == 554 and b"998" in reply[1]
    assert len(sink.messages) == 1  # only the 3-recipient message


def _no_size_send(port: int, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.helo("old.client")  # no ESMTP: no SIZE parameter, the limit bites at the end of DATA
        c.mail("a@corp.example")
        c.rcpt("b@corp.example")
        return c.data(data)


async def test_proxy_protocol_client_address_decides_relaying(start_relay: StartRelay, sink: Sink) -> None:
    """Behind HAProxy the TCP peer is the proxy; the PROXY header's source is the client."""
    app = await start_relay(
        f"smtp://127.0.0.1:{sink.port}",
        {
            "server": {
                "proxy_protocol": True,
                "proxy_trusted_networks": ["127.0.0.1/32"],
                "allowed_networks": ["192.0.2.0/24"],
            }
        },
    )
    for src, expected in (("192.0.2.10", b"250"), ("198.51.100.7", b"554")):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        writer.write(f"PROXY TCP4 {src} 127.0.0.1 40000 25\r\n".encode())
        assert (await reader.readline()).startswith(b"220")
        await talk(reader, writer, b"EHLO lb.test\r\n")
        await talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n")
        assert (await talk(reader, writer, b"RCPT TO:<b@corp.example>\r\n"))[0].startswith(expected)
        writer.close()


async def test_readiness_follows_the_upstream(start_relay: StartRelay, sink: Sink, tmp_path: Path) -> None:
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}")
    deadline = asyncio.get_running_loop().time() + 10
    while not app.readiness()[0] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert app.readiness() == (True, "ready")
    port = sink.port
    await sink.stop()
    # a second relay beside the first: its own spool and quarantine (one relay per directory)
    own = {"quarantine": {"path": str(tmp_path / "2" / "q")}, "spool": {"path": str(tmp_path / "2" / "s")}}
    down = await start_relay(f"smtp://127.0.0.1:{port}", own)
    await asyncio.sleep(0.2)
    ok, reason = down.readiness()
    assert not ok and "upstream" in reason


async def test_ehlo_advertises_size_8bitmime_smtputf8_pipelining(relay: App) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        await reader.readline()
        lines = await talk(reader, writer, b"EHLO client.test\r\n")
    finally:
        writer.close()
    keywords = {line[4:].split(b" ")[0] for line in lines[1:]}
    assert {b"SIZE", b"8BITMIME", b"SMTPUTF8", b"PIPELINING"} <= keywords
    assert f"SIZE {relay.runtime.config.server.max_message_size}".encode() in b"\n".join(lines)


async def test_quarantine_write_failure_is_a_451_not_a_loss(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", {"policy": {"action": "quarantine"}})
    qdir = app.runtime.quarantine.path
    shutil.rmtree(qdir)  # its .instance.lock included
    qdir.write_text("not a directory")  # the disk said no
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(app.port, "news@corp.example", CUSTOMERS[:20], message(CUSTOMERS[:20]))
    assert (err.value.smtp_code, err.value.smtp_error[:5]) == (451, b"4.3.0")
    assert delivered(sink) == []


async def test_unexpected_error_is_a_451_with_a_logged_traceback(
    relay: App, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    import structlog

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in a policy module")

    monkeypatch.setattr("bccguard.relay.evaluate", broken)
    with structlog.testing.capture_logs() as logs, pytest.raises(smtplib.SMTPDataError) as err:
        await send(relay.port, "a@corp.example", ["b@corp.example"], message(["b@corp.example"]))
    assert (err.value.smtp_code, err.value.smtp_error) == (451, b"4.3.0 Internal error, try again later")
    failed = [e for e in logs if e["event"] == "message_failed"]
    assert failed and isinstance(failed[0]["exc_info"], RuntimeError)
    assert [e["action"] for e in logs if e["event"] == "message_processed"] == ["tempfail"]
    assert delivered(sink) == []


async def test_a_huge_to_line_is_inspected_and_rewritten(relay: App, sink: Sink) -> None:
    """5,000 addresses (~120 KB of header) take the worker-thread path and still come out clean."""
    crowd = [f"member{i}@clients.example" for i in range(5000)]
    data = message(crowd)
    assert data.find(b"\r\n\r\n") > 64 * 1024
    await send(relay.port, "news@corp.example", crowd[:3], data)
    head = delivered(sink)[0].data.partition(b"\r\n\r\n")[0]
    assert b"clients.example" not in head and b"hidden=5000" in head
