"""More of issue 12 items 3 to 6, the cases next to the issue's examples.

Multi-line replies broken in their middle, replies of exactly 512 octets
and one more, the same faults inside a pipelined group, a refusal after a
TLS handshake (smtps, and EHLO again after STARTTLS), a refusal on a pooled
connection being reused, 8-bit headers (not body) to a 7-bit upstream, a
client's BODY=8BITMIME over 7-bit content, a UTF-8 envelope, and a slow
reply to the final dot that runs into `delivery_timeout`.

Same invariants as tests/test_upstream_faults.py: no 250 unless the upstream
took the message; no address in a reply or log line; every reply valid RFC
5321 text; a normal message is served afterwards.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from conftest import StartRelay, message
from disk_helpers import assert_no_address
from sink import RawServer, self_signed_cert, server_tls_context
from test_upstream_faults import (
    GOOD_EHLO,
    RCPTS,
    SENDER,
    VALID_REPLY,
    RawUpstream,
    failures,
    final_reply_is_a_protocol_failure,
    send,
    served_afterwards,
)

PIPELINING_EHLO = GOOD_EHLO.replace(b"250-8BITMIME", b"250-PIPELINING\r\n250-8BITMIME")
SEVEN_BIT_EHLO = b"250-raw.test\r\n250 SIZE 52428800\r\n"


@pytest.fixture(params=["one-by-one", "pipelined"])
async def raw(request: pytest.FixtureRequest) -> AsyncIterator[RawUpstream]:
    """The raw upstream, without and with PIPELINING (the relay's brief parser reads groups)."""
    up = RawUpstream()
    if request.param == "pipelined":
        up.ehlo = PIPELINING_EHLO
        behave = up.behave

        def behave_pipelined() -> None:
            behave()
            up.ehlo = PIPELINING_EHLO

        up.behave = behave_pipelined  # type: ignore[method-assign]
    async with up.server:
        yield up


# ---------------------------------------------------------------- item 4: broken multi-line replies

BROKEN_MULTILINE = {
    "codes-disagree": b"250-2.0.0 queued\r\n251 2.0.0 as RAW1\r\n",
    "8-bit-last-line": b"250-2.0.0 queued\r\n250 2.0.0 \xe9t\xe9\r\n",
    "bare-lf-first-line": b"250-2.0.0 queued\n250 2.0.0 as RAW1\r\n",
    "long-continuation": b"250-" + b"c" * 520 + b"\r\n250 2.0.0 ok\r\n",
    "bad-code-last-line": b"250-2.0.0 queued\r\n2x0 2.0.0 ok\r\n",
    "too-many-lines": b"250-x\r\n" * 300 + b"250 2.0.0 ok\r\n",
    "no-separator": b"250-2.0.0 queued\r\n250x2.0.0 ok\r\n",
}


@pytest.mark.parametrize("reply", list(BROKEN_MULTILINE.values()), ids=list(BROKEN_MULTILINE))
async def test_a_multiline_final_reply_broken_midway_is_451_4_4_2(
    start_relay: StartRelay, raw: RawUpstream, reply: bytes
) -> None:
    await final_reply_is_a_protocol_failure(start_relay, raw, reply)


@pytest.mark.parametrize("where", ["greeting", "ehlo", "mail", "rcpt"])
async def test_a_broken_continuation_anywhere_never_passes(
    start_relay: StartRelay, raw: RawUpstream, where: str
) -> None:
    first = {"greeting": b"220", "ehlo": b"250", "mail": b"250", "rcpt": b"250"}[where]
    setattr(raw, where, first + b"-fine\r\n" + first + b" \xff\xfe broken\r\n")
    code, text = await send(app := await start_relay(raw.url))
    assert (code, text[:6]) == (451, b"4.4.2 ")
    assert raw.delivered == []
    await served_afterwards(app, raw)


# ---------------------------------------------------------------- item 4: 512 octets, and 513


def _line(code: bytes, octets: int) -> bytes:
    """A reply line of exactly `octets` octets, CRLF included."""
    head = code + b" " + code[:1] + b".0.0 "
    return head + b"q" * (octets - len(head) - 2) + b"\r\n"


async def test_a_final_reply_of_512_octets_is_taken_and_513_is_not(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    app = await start_relay(raw.url)
    raw.final = _line(b"250", 512)
    code, text = await send(app)  # send() checks the relay's own reply is <= 512 octets
    assert code == 250 and VALID_REPLY.fullmatch(b"250 " + text)
    assert len(raw.delivered) == 1
    raw.final = _line(b"250", 513)
    code, text = await send(app)
    assert (code, text[:6]) == (451, b"4.4.2 ")
    assert failures(app, "protocol") == 1
    await served_afterwards(app, raw)


@pytest.mark.parametrize(("octets", "code"), [(512, 550), (513, 451)])
async def test_a_rcpt_refusal_of_512_octets_is_passed_on_and_513_is_a_protocol_failure(
    start_relay: StartRelay, raw: RawUpstream, octets: int, code: int
) -> None:
    app = await start_relay(raw.url)
    raw.rcpt = _line(b"550", octets)
    got, text = await send(app)
    assert got == code and VALID_REPLY.fullmatch(str(got).encode() + b" " + text)
    assert not any(raw.delivered)  # pipelined: DATA's 354 is answered with a lone dot
    await served_afterwards(app, raw)


async def test_an_ehlo_line_of_513_octets_is_a_protocol_failure(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    raw.ehlo = b"250-raw.test\r\n" + _line(b"250", 513)
    app = await start_relay(raw.url)
    code, text = await send(app)
    assert (code, text[:6]) == (451, b"4.4.2 ")
    await served_afterwards(app, raw)


@pytest.mark.parametrize(
    "reply",
    [b"250\r\n", b"250 \r\n", b"250 2.0.0\r\n", b"250 5.0.0 queued, class wrong\r\n"],
    ids=["bare-code", "code-space", "code-and-enhanced", "enhanced-of-another-class"],
)
async def test_terse_or_odd_successes_give_a_valid_250(
    start_relay: StartRelay, raw: RawUpstream, reply: bytes
) -> None:
    """RFC 5321 4.2: the text is optional. The client still gets `250 2.x.x ...`, one line."""
    app = await start_relay(raw.url)
    raw.final = reply
    code, text = await send(app)
    assert code == 250 and VALID_REPLY.fullmatch(b"250 " + text + b" ")
    assert text.startswith(b"2.")


async def test_a_3xx_to_rcpt_is_a_protocol_failure(start_relay: StartRelay, raw: RawUpstream) -> None:
    app = await start_relay(raw.url)
    raw.rcpt = b"354 go on\r\n"
    code, text = await send(app)
    assert (code, text[:6]) == (451, b"4.4.2 ")
    assert not any(raw.delivered)
    await served_afterwards(app, raw)


async def test_a_refusal_quoting_addresses_on_every_line_leaks_none(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    app = await start_relay(raw.url)
    raw.final = (
        b"554-5.7.1 <news@corp.example> sender refused\r\n"
        b"554-5.7.1 for alice@corp.example, bob@corp.example\r\n"
        b"554 5.7.1 see https://x.example/?u=alice%40corp.example\r\n"
    )
    code, text = await send(app)  # send() refuses any "@" in the reply
    assert code == 554 and VALID_REPLY.fullmatch(b"554 " + text)
    assert b"alice" not in text and b"bob" not in text and b"news" not in text


# ---------------------------------------------------------------- item 3: refusals after TLS


async def test_a_554_greeting_after_the_smtps_handshake_is_451(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    cert, key = self_signed_cert(tmp_path)
    up = RawUpstream()
    up.tls = server_tls_context(cert, key)
    up.server = RawServer(up._converse, tls=up.tls)  # the same conversation, over TLS
    up.greeting = b"554 5.7.1 your certificate is not welcome\r\n"
    async with up.server:
        app = await start_relay(f"smtps://127.0.0.1:{up.server.port}", {"upstream": {"ca_file": str(cert)}})
        with structlog.testing.capture_logs() as logs:
            code, text = await send(app)
            await app.runtime.relay.probe()
        assert (code, text[:6]) == (451, b"4.4.1 ")
        assert failures(app, "session") >= 1 and failures(app, "5xx") == 0
        assert not app.readiness()[0]
        assert_no_address(logs)
        await served_afterwards(app, up)


async def test_a_554_to_ehlo_after_starttls_is_451(start_relay: StartRelay, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    up = RawUpstream()
    up.tls = server_tls_context(cert, key)
    up.ehlo = GOOD_EHLO.replace(b"250 SIZE", b"250-STARTTLS\r\n250 SIZE")
    up.ehlo_tls = b"554 5.7.1 not after TLS either\r\n"
    async with up.server:
        app = await start_relay(
            f"smtp+starttls://127.0.0.1:{up.server.port}", {"upstream": {"ca_file": str(cert)}}
        )
        code, text = await send(app)
        assert (code, text[:6]) == (451, b"4.4.1 ")
        assert failures(app, "session") >= 1 and failures(app, "5xx") == 0
        assert up.delivered == [] and b"MAIL" not in up.commands
        await served_afterwards(app, up)


@pytest.mark.parametrize(
    "starttls", [b"554 5.7.0 no TLS for you\r\n", None], ids=["refused", "not-offered"]
)
async def test_a_refused_or_missing_starttls_is_shown_in_readyz_at_once(
    start_relay: StartRelay, tmp_path: Path, starttls: bytes | None
) -> None:
    """Issue 12 item 3 names STARTTLS among the session refusals "shown in /readyz": like a 554
    greeting, nothing cures it but an admin, so the relay leaves rotation at once, and says why."""
    cert, key = self_signed_cert(tmp_path)
    up = RawUpstream()
    up.tls = server_tls_context(cert, key)
    if starttls is not None:
        up.ehlo = GOOD_EHLO.replace(b"250 SIZE", b"250-STARTTLS\r\n250 SIZE")
        up.starttls = starttls
    async with up.server:
        app = await start_relay(
            f"smtp+starttls://127.0.0.1:{up.server.port}", {"upstream": {"ca_file": str(cert)}}
        )
        code, text = await send(app)
        await app.runtime.relay.probe()
        assert code == 451 and text.startswith(b"4.4.")
        ready, reason = app.readiness()
        assert not ready and "STARTTLS" in reason, reason
        await served_afterwards(app, up)
        assert app.readiness() == (True, "ready")


async def test_a_5xx_to_starttls_on_a_smtp_url_never_sends_in_clear(
    start_relay: StartRelay, raw: RawUpstream, tmp_path: Path
) -> None:
    """smtp+starttls means TLS or nothing: a 554 to STARTTLS must not fall back to clear text."""
    raw.ehlo = GOOD_EHLO.replace(b"250 SIZE", b"250-STARTTLS\r\n250 SIZE")
    raw.starttls = b"502 5.5.1 not implemented after all\r\n"
    cert, _ = self_signed_cert(tmp_path)
    app = await start_relay(
        f"smtp+starttls://127.0.0.1:{raw.server.port}", {"upstream": {"ca_file": str(cert)}}
    )
    code, text = await send(app)
    assert code == 451 and text.startswith(b"4.4.")
    assert b"MAIL" not in raw.commands and raw.delivered == []


# ---------------------------------------------------------------- item 3: a pooled connection


async def test_a_refused_rset_on_a_reused_connection_is_451_not_permanent(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    """Every RCPT refused leaves the pooled connection mid-transaction (without PIPELINING
    no DATA went out); the next message starts with RSET, which the upstream now refuses
    with 5xx: a refusal of the session, not of the message."""
    raw.ehlo = GOOD_EHLO
    app = await start_relay(raw.url, {"upstream": {"pool_size": 2}})
    raw.rcpt = b"550 5.1.1 unknown\r\n"
    assert (await send(app))[0] == 550
    permanent = failures(app, "5xx")
    raw.rcpt = b"250 2.1.5 ok\r\n"
    raw.rset = b"554 5.3.2 no more transactions on this connection\r\n"
    code, text = await send(app)
    assert (code, text[:6]) == (451, b"4.4.1 ")
    assert b"RSET" in raw.commands and failures(app, "5xx") == permanent
    assert failures(app, "session") == 1
    await served_afterwards(app, raw)


# ---------------------------------------------------------------- item 5: 7-bit upstream


async def test_8bit_headers_with_a_7bit_body_are_not_sent_to_a_7bit_upstream(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    raw.ehlo = SEVEN_BIT_EHLO
    app = await start_relay(raw.url)
    data = message(RCPTS, subject="Gr\u00fc\u00dfe aus K\u00f6ln")  # raw UTF-8 in Subject only
    assert data.split(b"\r\n\r\n", 1)[1].isascii()
    code, text = await send(app, data)
    assert (code, text[:6]) == (451, b"4.6.3 ")
    assert raw.delivered == [] and b"MAIL" not in raw.commands
    assert failures(app, "capability") == 1


def _mail_with_params(port: int, params: list[str], data: bytes, sender: str = SENDER) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        assert c.mail(sender, params)[0] == 250
        for r in RCPTS:
            assert c.rcpt(r)[0] == 250
        code, text = c.data(data)
    assert b"@" not in text and text.isascii() and len(text) + 6 <= 512
    return code, text


async def test_body_8bitmime_declared_over_7bit_content_goes_to_a_7bit_upstream(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    """The client may say BODY=8BITMIME for content that is all ASCII: nothing needs 8BITMIME."""
    raw.ehlo = SEVEN_BIT_EHLO
    app = await start_relay(raw.url)
    code, text = await asyncio.to_thread(_mail_with_params, app.port, ["BODY=8BITMIME"], message(RCPTS))
    assert code == 250
    assert len(raw.delivered) == 1


async def test_a_utf8_envelope_to_an_upstream_without_smtputf8_is_refused_without_the_address(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    raw.ehlo = GOOD_EHLO.replace(b"250-SMTPUTF8\r\n", b"")
    app = await start_relay(raw.url)
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(
            _mail_with_params, app.port, ["SMTPUTF8"], message(RCPTS), "j\u00fcrgen@corp.example"
        )
    assert code == 550 and text.startswith(b"5.6.7 ")
    assert b"MAIL" not in raw.commands and raw.delivered == []
    assert_no_address(logs)
    assert all("j\u00fcrgen" not in str(e) for e in logs)


# ---------------------------------------------------------------- item 6: the final dot


async def test_a_slow_reply_to_the_final_dot_hits_delivery_timeout(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    """Within `timeout` (5 s) but past `delivery_timeout` (1 s): 451 4.4.2, and the connection
    is not pooled (its late 250 must never be read as the reply to the next message)."""
    app = await start_relay(raw.url, {"upstream": {"timeout": 5.0, "delivery_timeout": 1.0}})
    raw.final_delay = 2.0
    with structlog.testing.capture_logs() as logs:
        code, text = await send(app)
    assert (code, text[:6]) == (451, b"4.4.2 ")
    assert failures(app, "timeout") == 1
    (processed,) = [e for e in logs if e["event"] == "message_processed"]
    assert processed["upstream_error"] == "timeout"
    assert_no_address(logs)
    connections = raw.server.connections
    await served_afterwards(app, raw)
    assert raw.server.connections == connections + 1  # a fresh connection, not the cut one



# ---------------------------------------------------------------- a pooled connection out of step


async def test_an_extra_line_after_the_final_reply_takes_the_message_but_not_the_connection(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    """The 250 is the upstream's word for this message; the unasked-for line after it would be
    read as the reply to the next message's MAIL on a pooled connection. A new one is used."""
    app = await start_relay(raw.url, {"upstream": {"pool_size": 2}})
    raw.final = b"250 2.0.0 queued as RAW1\r\n250 2.0.0 and this too\r\n"
    code, _ = await send(app)
    assert code == 250 and len(raw.delivered) == 1
    connections = raw.server.connections
    raw.mail = b"550 5.7.1 the next MAIL is refused\r\n"  # what the stale line would hide
    code, text = await send(app)
    assert (code, text[:6]) == (550, b"5.7.1 ")
    assert raw.server.connections == connections + 1
    await served_afterwards(app, raw)
