"""Customer data through a real relay (issue 16): held going outside, delivered to partners and colleagues.

The relay runs in-process on a free port in front of a recording sink; the
messages are the generated fixtures of tests/dlp_fixtures.py. Attachments go
through the scanner process pool, plain bodies are scanned inline: both
paths are exercised. Every reply, the `message_processed` log line and the
/metrics exposition are searched for the values the messages carry.
"""

from __future__ import annotations

import asyncio
import json
import smtplib

import pytest
import structlog
from prometheus_client import generate_latest

import dlp_fixtures as fx
from conftest import StartRelay, data_reply, send
from sink import Received, Sink

DLP_ON = {"dlp": {"enabled": True}}
HELD = {f.name: f for f in fx.held_set()}
BUSINESS = {f.name: f for f in fx.business_set()}
OUTSIDE, PARTNER, COLLEAGUE = "buyer@other.example", "rep@agency.example", "ann@corp.example"


def delivered(sink: Sink) -> list[Received]:
    return [m for m in sink.messages if m.reply.startswith("2")]


def values() -> list[str]:
    rows = fx.customers()
    out = [r[2] for r in rows[:30]] + [r[3] for r in rows[:30]] + [r[3].replace(" ", "") for r in rows[:30]]
    return out + [fx.gb_iban(i) for i in range(20)] + [f"07911 {200000 + i * 13:06d}" for i in range(50)]


def assert_no_values(text: str) -> None:
    for v in values():
        assert v not in text, "a detected value leaked"


@pytest.mark.parametrize("name", list(HELD))
async def test_customer_data_is_held_outside_and_delivered_to_partners_and_colleagues(
    name: str, start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", DLP_ON)
    data = HELD[name].data
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(data_reply, app.port, "sales@corp.example", [OUTSIDE], data)
    assert code == 250 and text.startswith(b"2.6.0 Held for review as "), text
    assert b"customer data in the message" in text
    assert_no_values(text.decode())
    assert delivered(sink) == []
    q = app.runtime.quarantine
    (entry_id,) = q.ids()
    meta = json.loads((q.path / f"{entry_id}.json").read_text())
    assert meta["verdict"]["dlp"]["counts"] == HELD[name].counts
    (line,) = [e for e in logs if e["event"] == "message_processed"]
    assert line["action"] == "quarantine" and line["dlp"]["counts"] == HELD[name].counts
    assert_no_values(json.dumps(line, default=str))

    for rcpt in (PARTNER, COLLEAGUE):
        await send(app.port, "sales@corp.example", [rcpt], data)
    assert [m.rcpt_tos for m in delivered(sink)] == [[PARTNER], [COLLEAGUE]]
    assert delivered(sink)[0].original == data  # unchanged (after bccguard's Received field)

    exposition = generate_latest(app.metrics.registry).decode()
    assert_no_values(exposition)
    m = app.metrics.registry.get_sample_value
    level = {"detector": "phone" if name != "ibans" else "iban", "level": "high", "action": "quarantine"}
    assert m("bccguard_dlp_messages_total", level) == 1
    assert m("bccguard_dlp_scanned_bytes_total") > 0


async def test_ordinary_business_mail_is_delivered_at_the_default_thresholds(
    start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", DLP_ON)
    for f in BUSINESS.values():
        await send(app.port, "sales@corp.example", [OUTSIDE], f.data)
    assert [m.original for m in delivered(sink)] == [f.data for f in BUSINESS.values()]
    assert app.runtime.quarantine.ids() == []


async def test_dlp_is_off_unless_enabled(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}")
    with structlog.testing.capture_logs() as logs:
        await send(app.port, "sales@corp.example", [OUTSIDE], HELD["csv"].data)
    assert len(delivered(sink)) == 1
    (line,) = [e for e in logs if e["event"] == "message_processed"]
    assert "dlp" not in line and line["action"] == "pass"


async def test_a_rule_override_rejects_with_a_reason_and_no_values(
    start_relay: StartRelay, sink: Sink
) -> None:
    extra = {
        "dlp": {"enabled": True},
        "policy": {"rules": [{"name": "sales", "senders": ["sales@*"], "dlp_high_action": "reject"}]},
    }
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", extra)
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(app.port, "sales@corp.example", [OUTSIDE], HELD["ibans"].data)
    assert err.value.smtp_code == 550 and b"20 IBANs" in err.value.smtp_error
    assert b"bccguard rule sales" in err.value.smtp_error
    assert_no_values(err.value.smtp_error.decode())
    assert delivered(sink) == []


@pytest.fixture(scope="module")
def hostile() -> list[tuple[str, bytes, str]]:
    return fx.hostile_set()


async def test_hostile_attachments_get_a_defined_reply_through_the_pool(
    start_relay: StartRelay, sink: Sink, hostile: list[tuple[str, bytes, str]]
) -> None:
    app = await start_relay(
        f"smtp://127.0.0.1:{sink.port}", {"dlp": {"enabled": True, "over_limit": "quarantine"}}
    )
    with structlog.testing.capture_logs() as logs:
        for _, data, _ in hostile:
            code, _ = await asyncio.to_thread(data_reply, app.port, "sales@corp.example", [OUTSIDE], data)
            assert code == 250
    lines = [e for e in logs if e["event"] == "message_processed"]
    for (name, _, expect), line in zip(hostile, lines, strict=True):
        if expect == "unreadable":
            assert line["action"] == "audit" and line["dlp"]["unreadable"] == 1, name
        else:
            assert line["action"] == "quarantine" and expect in line["dlp"]["over_limit"], name
    m = app.metrics.registry.get_sample_value
    assert m("bccguard_dlp_over_limit_total", {"limit": "decompressed"}) == 1
    assert m("bccguard_dlp_over_limit_total", {"limit": "depth"}) == 1
    assert m("bccguard_dlp_over_limit_total", {"limit": "pages"}) == 1
    assert m("bccguard_dlp_unreadable_parts_total") == 4


async def test_a_scan_past_its_time_limit_stops_with_over_limit_and_the_pool_goes_on() -> None:
    from bccguard.config import from_dict
    from bccguard.extract.limits import Limits
    from bccguard.scan import ScanPool

    settings = from_dict(DLP_ON).policy.defaults
    pool = ScanPool()
    try:
        slow = await pool.run(HELD["pdf"].data, settings, Limits(seconds=0.001))
        assert slow.over_limit == ("time",) and slow.counts == ()
        ok = await pool.run(HELD["pdf"].data, settings, Limits())
        assert dict(ok.counts) == HELD["pdf"].counts
    finally:
        pool.shutdown()


async def test_a_scanner_that_runs_out_of_address_space_says_memory_and_the_pool_goes_on(
    hostile: list[tuple[str, bytes, str]],
) -> None:
    """The backstop behind the inflate budget: with that budget lifted, the RLIMIT_AS stops the bomb."""
    from bccguard.config import from_dict
    from bccguard.extract.limits import Limits
    from bccguard.scan import ScanPool

    settings = from_dict(DLP_ON).policy.defaults
    bomb = dict((name, data) for name, data, _ in hostile)["zip-bomb"]
    pool = ScanPool()
    try:
        tight = Limits(decompressed=4 * 1024**3, memory=256 * 1024**2)
        f = await pool.run(bomb, settings, tight)
        assert f.over_limit == ("memory",) and f.counts == ()
        ok = await pool.run(HELD["csv"].data, settings, tight)
        assert dict(ok.counts) == HELD["csv"].counts
    finally:
        pool.shutdown()


async def test_a_sender_notice_for_a_customer_data_hold_speaks_of_customer_data(
    start_relay: StartRelay, sink: Sink
) -> None:
    from proc import eventually

    app = await start_relay(sink.url, {**DLP_ON, "notify": {"enabled": True}})
    code, _ = await asyncio.to_thread(
        data_reply, app.port, "sales@corp.example", [OUTSIDE], HELD["ibans"].data
    )
    assert code == 250
    await eventually(lambda: len(delivered(sink)) == 1, what="the notice")
    text = delivered(sink)[0].data.decode()
    assert "X-BCCGuard: notice" in text and "held for review" in text
    assert "20 IBANs" in text and "customer data" in text
    assert "To/Cc" not in text and "Bcc" not in text
    assert_no_values(text)
