"""Sender notices: once per changed message, never for automatic mail, rate limited."""

from __future__ import annotations

import re
import smtplib

import pytest

from conftest import StartRelay, message, send
from proc import eventually
from sink import Received, Sink

CUSTOMERS = [f"customer{i}@gmail.com" for i in range(40)]
NOTIFY = {"notify": {"enabled": True, "rate_limit": 2}}


def notices(sink: Sink) -> list[Received]:
    return [m for m in sink.messages if b"X-BCCGuard: notice" in m.data]


async def test_a_rewrite_gets_one_notice_to_the_sender(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, NOTIFY)
    await send(app.port, "news@corp.example", CUSTOMERS, message(CUSTOMERS))
    await eventually(lambda: len(notices(sink)) == 1, what="the notice")
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    (n,) = notices(sink)
    assert n.mail_from == "<>" and n.rcpt_tos == ["news@corp.example"]  # null sender: no loops
    text = n.data.decode()
    assert "From: bccguard <postmaster@bccguard.test>" in text
    assert "Auto-Submitted: auto-generated" in text and "In-Reply-To: <survey-1@corp.example>" in text
    assert "removed 40 external" in text and "Policy rule: default" in text and "Bcc" in text
    assert re.search(r"customer\d+@", text) is None and "gmail.com" not in text
    assert len(sink.messages) == 2  # the rewritten message and the notice, nothing else
    v = app.metrics.registry.get_sample_value
    assert v("bccguard_notices_total", {"result": "sent"}) == 1


async def test_no_notice_for_null_sender_or_automatic_mail(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, {**NOTIFY, "policy": {"action": "reject"}})
    automatic = [
        ("", ""),
        ("mailer-daemon@corp.example", ""),
        ("news@corp.example", "Auto-Submitted: auto-replied"),
        ("news@corp.example", "Precedence: bulk"),
    ]
    for mail_from, extra in automatic:
        with pytest.raises(smtplib.SMTPDataError) as err:  # the policy reject
            await send(app.port, mail_from, CUSTOMERS, message(CUSTOMERS, extra=extra))
        assert err.value.smtp_code == 550
    # a real one afterwards proves notices were on, and waiting for it covers the others
    await _reject(app.port, "news@corp.example")
    await eventually(lambda: len(notices(sink)) == 1, what="the one real notice")
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    assert len(notices(sink)) == 1
    assert notices(sink)[0].rcpt_tos == ["news@corp.example"]
    assert "was refused" in notices(sink)[0].data.decode()
    v = app.metrics.registry.get_sample_value
    assert v("bccguard_notices_total", {"result": "suppressed"}) == 4


async def _reject(port: int, mail_from: str) -> None:
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(port, mail_from, CUSTOMERS, message(CUSTOMERS))
    assert err.value.smtp_code == 550


async def test_notices_are_rate_limited_per_sender(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, NOTIFY)  # rate_limit = 2 per sender per hour
    for _ in range(4):
        await send(app.port, "news@corp.example", CUSTOMERS, message(CUSTOMERS))
    await send(app.port, "other@corp.example", CUSTOMERS, message(CUSTOMERS))
    await eventually(lambda: len(notices(sink)) == 3, what="2 + 1 notices")
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    assert sorted(n.rcpt_tos[0] for n in notices(sink)) == [
        "news@corp.example", "news@corp.example", "other@corp.example",
    ]
    v = app.metrics.registry.get_sample_value
    assert v("bccguard_notices_total", {"result": "rate_limited"}) == 2
    assert len(sink.messages) == 5 + 3


async def test_notices_are_off_by_default(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url)
    await send(app.port, "news@corp.example", CUSTOMERS, message(CUSTOMERS))
    assert app.runtime.spool.entries() == [] and notices(sink) == []
