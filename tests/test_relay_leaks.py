"""Issue 13 items 1 and 3 through the real relay: a client, the relay, and an upstream sink on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from bccguard.app import App
from bccguard.policy.headers import parse_header
from conftest import StartRelay, message, send
from proc import run_cli, write_toml
from sink import Received, Sink

BLIND = [f"customer{i}@gmail.com" for i in range(20)]


def delivered(sink: Sink) -> list[Received]:
    return [m for m in sink.messages if m.reply.startswith("2")]


def header(data: bytes) -> bytes:
    return data[: parse_header(data).header_end]


@pytest.mark.parametrize("action", ["rewrite", "audit", "pass"])
async def test_bcc_is_removed_from_mail_that_is_no_exposure_and_the_envelope_is_kept(
    start_relay: StartRelay, sink: Sink, action: str
) -> None:
    app = await start_relay(sink.url, {"policy": {"action": action}})
    data = message(["team@corp.example"], extra=f"Bcc: {', '.join(BLIND)}\r\nResent-Bcc: r@yahoo.com")
    rcpts = ["team@corp.example", *BLIND, "r@yahoo.com"]
    assert await send(app.port, "news@corp.example", rcpts, data) == {}
    (got,) = delivered(sink)
    assert sorted(got.rcpt_tos) == sorted(rcpts)  # every blind recipient still gets it
    assert b"Bcc" not in got.data and b"gmail.com" not in got.data and b"yahoo.com" not in got.data
    # byte for byte but for the two removed fields
    assert got.original == message(["team@corp.example"])


async def test_an_exposure_in_audit_mode_still_leaves_without_bcc(
    start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(sink.url, {"policy": {"action": "audit"}})
    to = ["a@gmail.com", "b@gmail.com"]
    data = message(to, extra="Bcc: boss@corp.example")
    await send(app.port, "news@corp.example", [*to, "boss@corp.example"], data)
    (got,) = delivered(sink)
    assert got.original == message(to)


async def test_addresses_in_display_names_comments_and_encoded_words_are_hidden(
    relay: App, sink: Sink
) -> None:
    to = [
        '"alice@gmail.com" <news@corp.example>',
        "sales@corp.example (bob@yahoo.com, carol@orange.fr)",
        "=?utf-8?q?dave=40web.de?= <dave@corp.example>",
        "eve\uff20gmail.com",
        "=?utf-8?q?frank=40gmail.com?=@corp.example",
    ]
    data = message(to, cc=["Team <team@corp.example>"])
    rcpts = ["news@corp.example", "sales@corp.example", "dave@corp.example", "team@corp.example",
             "alice@gmail.com"]  # fmt: skip
    assert await send(relay.port, "boss@corp.example", rcpts, data) == {}
    (got,) = delivered(sink)
    assert sorted(got.rcpt_tos) == sorted(rcpts)  # the envelope is never changed
    head = header(got.data)
    for shown in (b"alice", b"bob", b"carol", b"dave=40", b"web.de", b"eve", b"frank", b"=?utf-8?"):
        assert shown not in head, shown
    assert b"\r\nTo: <news@corp.example>, <sales@corp.example>, <dave@corp.example>\r\n" in head
    assert b"\r\nCc: Team <team@corp.example>\r\n" in head
    assert b"X-BCCGuard: rewritten; hidden=6" in head
    assert got.data.partition(b"\r\n\r\n")[2] == data.partition(b"\r\n\r\n")[2]


async def test_quarantine_release_as_it_was_drops_bcc(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, {"policy": {"action": "quarantine"}})
    to = ["a@gmail.com", "b@gmail.com"]
    data = message(to, extra=f"Bcc: {', '.join(BLIND[:3])}")
    rcpts = [*to, *BLIND[:3]]
    await send(app.port, "news@corp.example", rcpts, data)
    (entry_id,) = app.runtime.quarantine.ids()
    assert b"Bcc: " in app.runtime.quarantine.message(entry_id)  # held as submitted, for review
    cfg = write_toml(
        tmp_path / "admin.toml",
        {
            "server": {"hostname": "bccguard.test"},
            "upstream": {"url": sink.url, "timeout": 5.0},
            "quarantine": {"path": str(tmp_path / "quarantine")},
            "policy": {"internal_domains": ["corp.example"], "action": "quarantine"},
        },
    )
    rc, _, err = await run_cli("quarantine", "release", entry_id, "--config", str(cfg))
    assert rc == 0, err
    (got,) = delivered(sink)
    assert got.rcpt_tos == rcpts
    assert got.original == message(to)


async def test_an_exposure_after_a_broken_header_line_is_refused_naming_the_broken_section(
    start_relay: StartRelay, sink: Sink
) -> None:
    import smtplib

    app = await start_relay(sink.url, {"policy": {"on_malformed": "reject"}})
    data = (
        b"From: news@corp.example\r\nSubject: survey\r\nthis line is no header field\r\n"
        b"To: a@gmail.com, b@gmail.com, c@yahoo.com\r\n\r\nHello\r\n"
    )
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(app.port, "news@corp.example", ["a@gmail.com", "b@gmail.com", "c@yahoo.com"], data)
    assert err.value.smtp_code == 550
    text = err.value.smtp_error
    # Line 6 of the message as relayed: bccguard's own Received field (3 lines) comes first.
    assert b"header section is broken at line 6" in text and b"@" not in text
    assert delivered(sink) == []
