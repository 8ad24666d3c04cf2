"""A misbehaving upstream, written with raw asyncio sockets, behind a real relay.

Issue 12 items 3 to 6: the upstream refuses the session, answers with
malformed replies, lacks 8BITMIME, or answers each RCPT slowly. Each test
drives the relay over SMTP from a real client and checks the invariants:
no 250 unless the upstream took the message; no address in any reply or log
line; the relay serves a normal message once the upstream behaves.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import string
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from bccguard.app import App
from bccguard.config import ConfigError, from_dict
from bccguard.relay import reply_line
from conftest import StartRelay, data_reply, message
from disk_helpers import assert_no_address
from sink import RawServer, self_signed_cert, server_tls_context

SENDER = "news@corp.example"
RCPTS = ["alice@corp.example", "bob@corp.example"]
GOOD_EHLO = b"250-raw.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 52428800\r\n"
# RFC 5321 4.2 reply line with RFC 3463 code: printable ASCII, <= 512 octets with CRLF.
VALID_REPLY = re.compile(rb"[2-5][0-5][0-9] ([245])\.\d{1,3}\.\d{1,3} [\t\x20-\x7e]*")


class RawUpstream:
    """An SMTP server that says exactly the bytes it is told to, one command at a time.

    No PIPELINING is offered, so the relay sends each command and waits: every
    reply below answers exactly one command. Change the attributes between
    messages; `delivered` holds the content of each transaction it answered 2xx.
    """

    def __init__(self) -> None:
        self.greeting = b"220 raw.test ESMTP\r\n"
        self.ehlo = GOOD_EHLO
        self.helo = b"250 raw.test\r\n"
        self.starttls = b"220 go ahead\r\n"
        self.mail = b"250 2.1.0 ok\r\n"
        self.rcpt = b"250 2.1.5 ok\r\n"
        self.rcpt_delay = 0.0
        self.final = b"250 2.0.0 queued as RAW1\r\n"
        self.final_delay = 0.0
        self.rset = b"250 2.0.0 ok\r\n"
        self.ehlo_tls: bytes | None = None  # EHLO after STARTTLS, when it differs
        self.tls: ssl.SSLContext | None = None  # STARTTLS answered 220 really starts TLS
        self.delivered: list[bytes] = []
        self.commands: list[bytes] = []
        self.server = RawServer(self._converse)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.server.port}"

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.greeting)
        if not self.greeting.startswith(b"220"):
            await reader.read()  # a refusing server waits for QUIT or the hang-up
            return
        while line := await reader.readline():
            verb = line[:4].upper()
            self.commands.append(verb)
            if verb == b"EHLO":
                tls = writer.get_extra_info("ssl_object") is not None
                writer.write(self.ehlo_tls if tls and self.ehlo_tls is not None else self.ehlo)
            elif verb == b"HELO":
                writer.write(self.helo)
            elif verb == b"STAR":
                writer.write(self.starttls)
                if self.tls is not None and self.starttls.startswith(b"220"):
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    continue
            elif verb == b"MAIL":
                writer.write(self.mail)
            elif verb == b"RCPT":
                await asyncio.sleep(self.rcpt_delay)
                writer.write(self.rcpt)
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                content = b""
                while (part := await reader.readline()) not in (b".\r\n", b""):
                    content += part
                if self.final.startswith(b"2"):
                    self.delivered.append(content)
                await asyncio.sleep(self.final_delay)
                writer.write(self.final)
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            elif verb == b"RSET":
                writer.write(self.rset)
            else:  # NOOP
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()

    def behave(self) -> None:
        """Back to a well-behaved server."""
        fresh = RawUpstream()
        names = ("greeting", "ehlo", "helo", "starttls", "mail", "rcpt", "rcpt_delay", "final",
                 "final_delay", "rset", "ehlo_tls")  # fmt: skip
        for name in names:
            setattr(self, name, getattr(fresh, name))
        if self.tls is not None:
            self.ehlo = GOOD_EHLO.replace(b"250 SIZE", b"250-STARTTLS\r\n250 SIZE")


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    async with up.server:
        yield up


def _send(port: int, data: bytes) -> tuple[int, bytes]:
    code, text = data_reply(port, SENDER, RCPTS, data)
    assert b"@" not in text, text
    assert len(text) + 6 <= 512 and text.isascii(), text
    return code, text


async def send(app: App, data: bytes | None = None) -> tuple[int, bytes]:
    """One message through the relay: the DATA reply, checked for addresses and RFC 5321 form."""
    return await asyncio.to_thread(_send, app.port, data or message(RCPTS))


def failures(app: App, kind: str) -> float:
    return app.metrics.registry.get_sample_value("bccguard_upstream_failures_total", {"kind": kind}) or 0.0


async def served_afterwards(app: App, raw: RawUpstream) -> None:
    """The invariant closing every test: a well-behaved upstream gets the next message."""
    raw.behave()
    raw.delivered.clear()
    code, text = await send(app)
    assert (code, text[:6]) == (250, b"2.0.0 ")
    assert len(raw.delivered) == 1


# ---------------------------------------------------------------- item 3: session refusals

SESSION_REFUSALS = {
    "greeting-554": {"greeting": b"554 5.3.2 no service here\r\n"},
    "ehlo-554": {"ehlo": b"554 5.7.1 go away\r\n"},
    "ehlo-and-helo-550": {"ehlo": b"550 5.5.1 what\r\n", "helo": b"550 5.7.1 not you\r\n"},
}


@pytest.mark.parametrize("refusal", list(SESSION_REFUSALS.values()), ids=list(SESSION_REFUSALS))
async def test_refused_session_is_451_and_shown_in_readyz(
    start_relay: StartRelay, raw: RawUpstream, refusal: dict[str, bytes]
) -> None:
    for name, value in refusal.items():
        setattr(raw, name, value)
    app = await start_relay(raw.url)
    with structlog.testing.capture_logs() as logs:
        code, text = await send(app)
        await app.runtime.relay.probe()
    assert code == 451 and text.startswith(b"4.4.1 ")
    assert raw.delivered == [] and b"MAIL" not in raw.commands
    assert failures(app, "session") >= 1
    assert failures(app, "5xx") == 0
    processed = [e for e in logs if e["event"] == "message_processed"]
    assert [(e["upstream_error"], e["reply_code"]) for e in processed] == [("session", 451)]
    assert_no_address(logs)
    ready, reason = app.readiness()
    assert not ready and "refused the session" in reason
    await served_afterwards(app, raw)
    assert app.readiness() == (True, "ready")


async def test_busy_greeting_is_451_and_passes(start_relay: StartRelay, raw: RawUpstream) -> None:
    """421 at the greeting is a passing deferral (kind "4xx"): 451, and /readyz stays up."""
    app = await start_relay(raw.url, {"upstream": {"pool_size": 0}})  # each delivery meets a greeting
    await served_afterwards(app, raw)
    raw.delivered.clear()
    raw.greeting = b"421 4.3.2 busy\r\n"
    code, text = await send(app)
    assert code == 451 and text.startswith(b"4.4.")
    assert raw.delivered == [] and failures(app, "4xx") == 1 and failures(app, "5xx") == 0
    assert app.readiness() == (True, "ready")
    await served_afterwards(app, raw)


async def test_refused_starttls_is_451(start_relay: StartRelay, raw: RawUpstream, tmp_path: Path) -> None:
    raw.ehlo = GOOD_EHLO.replace(b"250 SIZE", b"250-STARTTLS\r\n250 SIZE")
    raw.starttls = b"554 5.7.0 no TLS for you\r\n"
    cert, key = self_signed_cert(tmp_path)
    raw.tls = server_tls_context(cert, key)
    app = await start_relay(
        f"smtp+starttls://127.0.0.1:{raw.server.port}", {"upstream": {"ca_file": str(cert)}}
    )
    with structlog.testing.capture_logs() as logs:
        code, text = await send(app)
    assert code == 451 and text.startswith(b"4.4.")
    assert raw.delivered == [] and failures(app, "session") >= 1 and failures(app, "5xx") == 0
    assert_no_address(logs)
    await served_afterwards(app, raw)
    assert b"STAR" in raw.commands


async def test_refusals_of_the_message_itself_stay_permanent(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    """The other side of item 3: MAIL and DATA refusals of this message are passed on."""
    app = await start_relay(raw.url)
    raw.mail = b"553 5.7.1 <news@corp.example> sender not allowed\r\n"
    assert await send(app) == (553, b"5.7.1 <<address>> sender not allowed")
    raw.mail = b"250 2.1.0 ok\r\n"
    raw.final = b"554 5.6.0 content refused\r\n"
    assert await send(app) == (554, b"5.6.0 content refused")
    await served_afterwards(app, raw)


async def test_spooled_copy_is_not_bounced_for_a_refused_session(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    """The spool runner follows the same rule: a 554 greeting defers a copy, no DSN."""
    app = await start_relay(raw.url)
    spool = app.runtime.spool
    spool.put(message(RCPTS), SENDER, tuple(RCPTS), kind="retry")
    raw.greeting = b"554 5.3.2 no service here\r\n"
    await app.retrier.run_once(force=True)
    (entry,) = spool.entries()
    assert entry.kind == "retry" and entry.attempts == 1 and not any(c.failed for c in entry.copies)


# ---------------------------------------------------------------- item 4: malformed replies

MALFORMED = {
    "606-octets": b"250 " + b"x" * 600 + b"\r\n",
    "8-bit": b"250 2.0.0 queued \xc3\xa9t\xe9\r\n",
    "bare-lf": b"250 2.0.0 queued\n",
    "no-line-end": b"250 2.0.0 queued",
    "code-650": b"650 2.0.0 queued\r\n",
    "code-2500": b"2500 queued\r\n",
}


@pytest.mark.parametrize("reply", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_final_reply_is_a_protocol_failure(
    start_relay: StartRelay, raw: RawUpstream, reply: bytes
) -> None:
    await final_reply_is_a_protocol_failure(start_relay, raw, reply)


async def final_reply_is_a_protocol_failure(start_relay: StartRelay, raw: RawUpstream, reply: bytes) -> None:
    """`reply` to the final dot: 451 4.4.2, counted, no address logged, and the relay serves on."""
    app = await start_relay(raw.url, {"upstream": {"timeout": 1.0}})
    raw.final = reply
    with structlog.testing.capture_logs() as logs:
        code, text = await send(app)
    assert (code, text[:6]) == (451, b"4.4.2 ")
    assert failures(app, "protocol") + failures(app, "timeout") == 1
    assert_no_address(logs)
    await served_afterwards(app, raw)


@pytest.mark.parametrize("where", ["greeting", "ehlo", "rcpt"])
async def test_malformed_replies_anywhere_never_pass(
    start_relay: StartRelay, raw: RawUpstream, where: str
) -> None:
    app = await start_relay(raw.url)
    setattr(raw, where, b"250 " + b"y" * 600 + b"\r\n" if where != "greeting" else b"220 \xff\xfe\r\n")
    code, text = await send(app)
    assert (code, text[:6]) == (451, b"4.4.2 ")
    assert raw.delivered == []
    await served_afterwards(app, raw)


async def test_upstream_text_reaches_the_client_only_as_valid_rfc5321(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    """Refusal texts are passed on, but redacted, on one line, with a code of the right class."""
    app = await start_relay(raw.url)
    raw.rcpt = b"550 4.1.1 <bob@corp.example> unknown\r\n"  # class mismatch, and an address
    assert await send(app) == (550, b"5.0.0 <<address>> unknown")
    raw.rcpt = b"250 2.1.5 ok\r\n"
    raw.final = b"".join(b"554-5.7.1 " + b"z" * 490 + b"\r\n" for _ in range(5)) + b"554 5.7.1 end\r\n"
    code, text = await send(app)  # _send checks <= 512 octets and ASCII
    assert code == 554 and VALID_REPLY.fullmatch(b"554 " + text)
    raw.final = b"250 queued as RAW2\r\n"  # no enhanced code: one is added
    assert await send(app) == (250, b"2.0.0 queued as RAW2")


@given(code=st.sampled_from([250, 421, 451, 452, 550, 553, 554]), text=st.text(max_size=2000))
def test_reply_line_always_gives_valid_rfc5321(code: int, text: str) -> None:
    line = reply_line(code, text).encode("ascii")
    assert len(line) + 2 <= 512
    assert VALID_REPLY.fullmatch(line) or VALID_REPLY.fullmatch(line + b" "), line
    m = VALID_REPLY.match(line + b" ")
    assert m is not None and m.group(1) == str(code)[0].encode()
    assert b"@" not in line


def test_reply_line_keeps_good_text() -> None:
    assert reply_line(550, "5.1.1 unknown\nuser") == "550 5.1.1 unknown user"
    assert reply_line(250, "2.0.0 Ok: queued as 4Xz") == "250 2.0.0 Ok: queued as 4Xz"
    assert set(reply_line(451, "4.3.0 caf\u00e9 \x00\x7f")) <= set(string.printable)


# ---------------------------------------------------------------- item 5: capability mismatch


async def test_eight_bit_mail_to_a_seven_bit_upstream_is_refused_and_warned(
    start_relay: StartRelay, raw: RawUpstream
) -> None:
    raw.ehlo = b"250-raw.test\r\n250 SIZE 1000000\r\n"  # no 8BITMIME, no SMTPUTF8, a small SIZE
    with structlog.testing.capture_logs() as logs:
        app = await start_relay(raw.url)
        await app.runtime.relay.probe()  # start() already runs one; this one makes sure it is done
    (warned,) = {tuple(e["missing"]) for e in logs if e["event"] == "upstream_capability_missing"}
    assert warned == ("8BITMIME", "SMTPUTF8", "SIZE")
    assert_no_address(logs)
    ready, reason = app.readiness()
    assert ready and "8BITMIME" in reason and "SMTPUTF8" in reason and "warning" in reason

    eight_bit = message(RCPTS, body="Gr\u00fc\u00dfe aus K\u00f6ln\r\n")
    assert not eight_bit.isascii()
    code, text = await send(app, eight_bit)
    assert (code, text[:6]) == (451, b"4.6.3 ")
    assert raw.delivered == [] and b"MAIL" not in raw.commands
    assert failures(app, "capability") == 1
    # 7-bit mail still flows to the same upstream.
    code, _ = await send(app)
    assert code == 250 and len(raw.delivered) == 1


# ---------------------------------------------------------------- item 6: one deadline per message


async def test_slow_rcpts_hit_the_delivery_deadline(start_relay: StartRelay, raw: RawUpstream) -> None:
    """Each RCPT is answered well within `timeout`, but all of them together are not within
    `delivery_timeout`: 451 4.4.2, and the content was never sent."""
    app = await start_relay(raw.url, {"upstream": {"timeout": 5.0, "delivery_timeout": 0.5}})
    raw.rcpt_delay = 0.2
    rcpts = [f"user{i}@corp.example" for i in range(10)]
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(data_reply, app.port, SENDER, rcpts, message(rcpts))
    assert (code, text[:6]) == (451, b"4.4.2 ")
    assert raw.delivered == []
    assert failures(app, "timeout") == 1
    assert_no_address(logs)
    await served_afterwards(app, raw)


@pytest.mark.parametrize("value", [0, -1, 600, 3600, "soon"])
def test_delivery_timeout_is_validated(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"upstream": {"delivery_timeout": value}})
    assert "upstream.delivery_timeout" in str(err.value)


def test_delivery_timeout_default_is_well_under_ten_minutes() -> None:
    assert from_dict({}).upstream.delivery_timeout <= 300
