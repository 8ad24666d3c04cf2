"""The SMTP upstream client against real servers on loopback (tests/sink.py), no mocks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bccguard.config import UpstreamConfig
from bccguard.upstream import Reply, Upstream, UpstreamError, open_upstream
from bccguard.upstream.smtp import parse_reply_line
from bccguard.upstream.wire import encode_data, normalize_newlines
from sink import RawServer, Sink, closed_port, self_signed_cert, server_tls_context

SENDER = "sender@corp.test"
MESSAGE = b"From: a@corp.test\r\nSubject: hi\r\n\r\nhello\r\n"

MakeUpstream = Callable[..., Upstream]


@pytest.fixture
async def make_upstream() -> AsyncIterator[MakeUpstream]:
    """open_upstream with test defaults; every upstream made is closed at teardown."""
    made: list[Upstream] = []

    def make(url: str, **kw: object) -> Upstream:
        opts: dict[str, object] = {"timeout": 5.0, "pool_size": 4, "pool_idle": 30.0}
        opts.update(kw)
        up = open_upstream(UpstreamConfig(url=url, **opts), hostname="relay.test")  # type: ignore[arg-type]
        made.append(up)
        return up

    yield make
    for up in made:
        await up.close()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink() as s:
        yield s


def unstuffed(message: bytes) -> bytes:
    """What a correct server hands its handler for `message`: CRLF-normalised, CRLF-terminated."""
    body = normalize_newlines(message)
    return body if not body or body.endswith(b"\r\n") else body + b"\r\n"


def no_address(exc: BaseException) -> None:
    assert "@" not in str(exc), str(exc)


# ---------------------------------------------------------------- content


async def test_300_recipients_arrive_once_with_exact_bytes(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    rcpts = [f"user{i}@dest{i % 7}.test" for i in range(300)]
    message = (
        b"From: a@corp.test\r\nTo: undisclosed-recipients:;\r\nSubject: bulk\r\n\r\n"
        + b"".join(b"line %d \xc3\xa9 with some text\r\n" % i for i in range(2000))
        + b".starts with a dot\r\n..two dots\r\n.\r\nend\r\n"
    )
    up = make_upstream(sink.url)
    result = await up.deliver(SENDER, rcpts, message)
    assert result.accepted == tuple(rcpts)
    assert result.refused == {}
    assert result.reply == Reply(250, "2.0.0 Ok: queued")
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.mail_from == SENDER
    assert got.rcpt_tos == rcpts
    assert got.data == message


async def test_dot_stuffing_round_trips(sink: Sink, make_upstream: MakeUpstream) -> None:
    message = b".first\r\n.\r\n..\r\n...three\r\nmid.dle\r\n. space\r\n.\r\n"
    await make_upstream(sink.url).deliver(SENDER, ["r@x.test"], message)
    assert sink.messages[0].data == message
    wire = b"".join(sink.reads[0])
    assert b"\r\n..first\r\n..\r\n...\r\n....three\r\n" in wire


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"a\nb\rc\r\n\r\rd", b"a\r\nb\r\nc\r\n\r\n\r\nd\r\n"),
        (b"only\nlf\n", b"only\r\nlf\r\n"),
        (b"cr\r\r\n", b"cr\r\n\r\n"),
        (b"no newline at end", b"no newline at end\r\n"),
        (b"", b""),
    ],
)
async def test_bare_lf_and_cr_are_normalised(
    sink: Sink, make_upstream: MakeUpstream, message: bytes, expected: bytes
) -> None:
    await make_upstream(sink.url).deliver(SENDER, ["r@x.test"], message)
    assert sink.messages[0].data == expected


@pytest.mark.parametrize(
    "end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n"]
)
async def test_smuggled_end_of_data_stays_inside_one_message(
    sink: Sink, make_upstream: MakeUpstream, end: bytes
) -> None:
    body = (
        b"Subject: innocent\r\n\r\nhello"
        + end
        + b"MAIL FROM:<ceo@corp.test>\r\nRCPT TO:<victim@x.test>\r\nDATA\r\n"
        + b"Subject: forged\r\n\r\nsend money\r\n.\r\n"
    )
    result = await make_upstream(sink.url).deliver(SENDER, ["r@x.test"], body)
    assert result.accepted == ("r@x.test",)
    assert len(sink.messages) == 1
    assert sink.verbs.count("MAIL") == 1
    assert sink.messages[0].data == unstuffed(body)
    assert sink.messages[0].rcpt_tos == ["r@x.test"]


@given(st.binary(max_size=300))
def test_encoding_ends_data_exactly_once(message: bytes) -> None:
    """Property: a server splitting on CRLF.CRLF finds our terminator and only it."""
    enc = encode_data(message)
    wire = b"\r\n" + b"".join(enc.chunks)  # DATA's own CRLF precedes the content
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5
    lines = wire[2:-3].split(b"\r\n")[:-1]
    assert all(b"\r" not in ln and b"\n" not in ln for ln in lines)
    content = b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    assert content == unstuffed(message)
    assert enc.size == len(normalize_newlines(message))


def test_encoding_does_not_copy_clean_messages() -> None:
    message = b"clean\r\nmessage\r\n" * 1000
    assert encode_data(message).chunks[0] is message


def test_reply_line_parsing() -> None:
    assert parse_reply_line(b"250-SIZE 100\r\n") == (250, True, "SIZE 100")
    assert parse_reply_line(b"550 5.1.1 unknown\r\n") == (550, False, "5.1.1 unknown")
    assert parse_reply_line(b"250\r\n") == (250, False, "")
    for bad in (b"25 short\r\n", b"250x\r\n", b"hello\r\n", b"150 ok\r\n", b"650 no\r\n"):
        with pytest.raises(ValueError, match="malformed"):
            parse_reply_line(bad)
    assert Reply(550, "5.1.1 unknown\nsecond").line() == "550 5.1.1 unknown"
    assert Reply(250, "").line() == "250"
    assert Reply(550, "5.1.1 <bob@x.test> unknown").status() == "550 5.1.1"
    assert Reply(550, "no enhanced code").status() == "550"


# ---------------------------------------------------------------- refusals


async def test_per_recipient_refusals_are_reported_exactly(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    sink.rcpt_replies = {
        "gone@x.test": "550 5.1.1 no such user",
        "full@x.test": "452 4.2.2 mailbox full",
        "later@y.test": "451 4.7.1 greylisted",
    }
    rcpts = ["ok1@x.test", "gone@x.test", "full@x.test", "ok2@y.test", "later@y.test"]
    result = await make_upstream(sink.url).deliver(SENDER, rcpts, MESSAGE)
    assert result.accepted == ("ok1@x.test", "ok2@y.test")
    assert result.refused == {
        "gone@x.test": Reply(550, "5.1.1 no such user"),
        "full@x.test": Reply(452, "4.2.2 mailbox full"),
        "later@y.test": Reply(451, "4.7.1 greylisted"),
    }
    assert result.reply.is_ok
    assert [m.rcpt_tos for m in sink.messages] == [["ok1@x.test", "ok2@y.test"]]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_all_refused_sends_no_content(
    sink: Sink, make_upstream: MakeUpstream, pipelining: bool
) -> None:
    sink.pipelining = pipelining
    sink.rcpt_replies = {"a@x.test": "550 5.1.1 no", "b@x.test": "553 5.1.3 bad"}
    up = make_upstream(sink.url)
    result = await up.deliver(SENDER, ["a@x.test", "b@x.test"], b"SECRET-BODY\r\n")
    assert result.accepted == ()
    assert result.reply == Reply(550, "5.1.1 no")
    assert set(result.refused) == {"a@x.test", "b@x.test"}
    assert sink.messages == []
    assert b"SECRET-BODY" not in b"".join(sink.reads[0])
    # The same connection is still good for the next transaction.
    sink.rcpt_replies = {}
    assert (await up.deliver(SENDER, ["a@x.test"], MESSAGE)).accepted == ("a@x.test",)
    assert sink.connections == 1
    assert len(sink.messages) == 1


async def test_all_refused_prefers_temporary_reply(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    sink.rcpt_replies = {"a@x.test": "550 5.1.1 no", "b@x.test": "451 4.3.0 try later"}
    result = await make_upstream(sink.url).deliver(SENDER, ["a@x.test", "b@x.test"], MESSAGE)
    assert result.accepted == ()
    assert result.reply == Reply(451, "4.3.0 try later")


async def test_data_accepted_despite_no_recipient_gets_a_lone_dot(
    make_upstream: MakeUpstream,
) -> None:
    """RFC 2920 3.1: if DATA got 354 although every RCPT failed, send just "."."""
    after_data: list[bytes] = []

    async def lenient(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw\r\n")
        assert (await reader.readline()).startswith(b"EHLO")
        writer.write(b"250-raw\r\n250 PIPELINING\r\n")
        replies = {b"MAIL": b"250 ok\r\n", b"RCPT": b"550 5.1.1 no\r\n", b"DATA": b"354 go\r\n"}
        while True:
            line = await reader.readline()
            writer.write(replies[line[:4]])
            if line.startswith(b"DATA"):
                break
        after_data.append(await reader.readline())
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        await reader.read()

    async with RawServer(lenient) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        result = await up.deliver(SENDER, ["a@x.test"], b"SECRET-BODY\r\n")
    assert result.accepted == ()
    assert result.reply.code == 550
    assert after_data == [b".\r\n"]


@pytest.mark.parametrize(
    ("reply", "kind"),
    [("550 5.7.1 <sender@corp.test> blocked", "5xx"), ("451 4.3.0 busy", "4xx")],
)
async def test_mail_from_refused_is_an_error(
    sink: Sink, make_upstream: MakeUpstream, reply: str, kind: str
) -> None:
    sink.mail_reply = reply
    with pytest.raises(UpstreamError) as err:
        await make_upstream(sink.url).deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == kind
    assert err.value.reply is not None
    assert err.value.reply.line() == reply
    assert sink.messages == []
    no_address(err.value)


@pytest.mark.parametrize(("reply", "kind"), [("554 5.7.1 spam", "5xx"), ("452 4.3.1 full", "4xx")])
async def test_final_data_refusal_is_an_error(
    sink: Sink, make_upstream: MakeUpstream, reply: str, kind: str
) -> None:
    sink.data_reply = reply
    up = make_upstream(sink.url)
    with pytest.raises(UpstreamError) as err:
        await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == kind
    assert err.value.reply == Reply(int(reply[:3]), reply[4:])
    # The transaction ended cleanly: the connection is reused without RSET.
    sink.data_reply = "250 ok"
    await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert sink.connections == 1
    assert "RSET" not in sink.verbs


async def test_control_characters_in_addresses_are_never_sent(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    up = make_upstream(sink.url)
    evil = "x@y.test>\r\nRCPT TO:<injected@z.test"
    result = await up.deliver(SENDER, ["ok@x.test", evil], MESSAGE)
    assert result.accepted == ("ok@x.test",)
    assert result.refused[evil].code == 501
    assert sink.verbs.count("RCPT") == 1
    with pytest.raises(UpstreamError) as err:
        await up.deliver("a@b.test\r\nRSET", ["ok@x.test"], MESSAGE)
    assert err.value.kind == "5xx"
    no_address(err.value)


# ---------------------------------------------------------------- transport failures


async def test_closed_port_is_connect_error(make_upstream: MakeUpstream) -> None:
    up = make_upstream(f"smtp://127.0.0.1:{closed_port()}")
    with pytest.raises(UpstreamError) as err:
        await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == "connect"
    with pytest.raises(UpstreamError) as err:
        await up.probe()
    assert err.value.kind == "connect"


async def test_silent_server_is_timeout(make_upstream: MakeUpstream) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with RawServer(silent) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}", timeout=0.3)
        with pytest.raises(UpstreamError) as err:
            await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == "timeout"


async def test_slow_data_reply_is_timeout_not_success(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    sink.data_delay = 2.0
    up = make_upstream(sink.url, timeout=0.3)
    with pytest.raises(UpstreamError) as err:
        await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == "timeout"


async def test_delivery_deadline_bounds_the_whole_transaction(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    """Every step within `timeout`, the whole past `delivery_timeout`: a timeout, and the
    connection (mid-transaction) is dropped, never pooled."""
    sink.data_delay = 1.0
    up = make_upstream(sink.url, timeout=5.0, delivery_timeout=0.3)
    with pytest.raises(UpstreamError) as err:
        await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == "timeout" and "delivery_timeout" in str(err.value)
    sink.data_delay = 0.0
    await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert sink.connections == 2


@pytest.mark.parametrize(
    "script",
    [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"220 " + b"x" * 5000 + b"\r\n",
        b"220-first\r\n221 second\r\n",
        b"220-x\r\n" * 300,
        b"\x00\xff\xfe garbage\r\n",
    ],
    ids=["http", "long-line", "code-mismatch", "too-many-lines", "binary"],
)
async def test_garbage_is_protocol_error(make_upstream: MakeUpstream, script: bytes) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(script)
        await reader.read()

    async with RawServer(garbage) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        with pytest.raises(UpstreamError) as err:
            await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == "protocol"


@pytest.mark.parametrize(
    ("greeting", "kind"),
    [(b"421 4.3.2 too busy\r\n", "4xx"), (b"554 5.3.2 no service\r\n", "session")],
)
async def test_greeting_refusal_is_a_session_refusal(
    make_upstream: MakeUpstream, greeting: bytes, kind: str
) -> None:
    """A refused greeting says nothing about the message: never "5xx"."""

    async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)

    async with RawServer(busy) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        with pytest.raises(UpstreamError) as err:
            await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == kind
    assert err.value.reply == Reply(int(greeting[:3]), greeting[4:-2].decode())


async def test_drop_before_data_reply_is_never_success(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    sink.drop_on_data = True
    up = make_upstream(sink.url)
    with pytest.raises(UpstreamError) as err:
        await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == "connect"
    assert len(sink.dropped) == 1
    assert sink.messages == []
    # The dead connection is not pooled: the next delivery uses a new one.
    sink.drop_on_data = False
    await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert sink.connections == 2


async def test_drop_in_the_middle_of_content(make_upstream: MakeUpstream) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw\r\n")
        await reader.readline()
        writer.write(b"250-raw\r\n250 PIPELINING\r\n")
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            await reader.readline()
            writer.write(reply)
        await reader.readexactly(100_000)
        writer.transport.abort()

    async with RawServer(cut) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        with pytest.raises(UpstreamError) as err:
            await up.deliver(SENDER, ["r@x.test"], b"x" * 78 + b"\r\n" * 200_000)
    assert err.value.kind == "connect"


# ---------------------------------------------------------------- pipelining


def _command_chunks(sink: Sink) -> list[bytes]:
    return [c for c in sink.reads[0] if b"MAIL FROM" in c or b"RCPT TO" in c or b"DATA" in c]


async def test_pipelining_sends_mail_rcpts_and_data_in_one_write(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    rcpts = [f"r{i}@x.test" for i in range(20)]
    await make_upstream(sink.url).deliver(SENDER, rcpts, MESSAGE)
    (chunk,) = [c for c in sink.reads[0] if b"MAIL FROM" in c]
    assert chunk.count(b"RCPT TO") == 20
    assert chunk.endswith(b"DATA\r\n")


async def test_without_pipelining_one_command_at_a_time(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    """The same observation fails for a client that waits: the check above can fail."""
    sink.pipelining = False
    rcpts = [f"r{i}@x.test" for i in range(5)]
    result = await make_upstream(sink.url).deliver(SENDER, rcpts, MESSAGE)
    assert result.accepted == tuple(rcpts)
    assert sink.messages[0].rcpt_tos == rcpts
    chunks = _command_chunks(sink)
    assert len(chunks) == 7  # MAIL, 5 x RCPT, DATA: one round trip each


async def test_helo_fallback(sink: Sink, make_upstream: MakeUpstream) -> None:
    sink.ehlo = False
    result = await make_upstream(sink.url).deliver(SENDER, ["r@x.test"], MESSAGE)
    assert result.accepted == ("r@x.test",)
    assert sink.messages[0].mail_options == []  # HELO: no extensions, no parameters


# ---------------------------------------------------------------- pool


async def test_pool_reuses_one_connection(sink: Sink, make_upstream: MakeUpstream) -> None:
    up = make_upstream(sink.url)
    for i in range(3):
        await up.deliver(SENDER, [f"r{i}@x.test"], MESSAGE)
    assert sink.connections == 1
    assert sink.verbs.count("EHLO") == 1
    assert "RSET" not in sink.verbs
    assert len(sink.messages) == 3


async def test_unclean_transaction_is_reset_before_reuse(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    up = make_upstream(sink.url)
    sink.rcpt_replies = {"no@x.test": "550 5.1.1 no"}
    await up.deliver(SENDER, ["no@x.test"], MESSAGE)  # MAIL accepted, DATA refused: open
    await up.deliver(SENDER, ["yes@x.test"], MESSAGE)
    assert sink.connections == 1
    assert sink.verbs.index("RSET") > sink.verbs.index("RCPT")
    assert [m.rcpt_tos for m in sink.messages] == [["yes@x.test"]]


async def test_pool_replaces_connection_closed_while_idle(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    up = make_upstream(sink.url)
    await up.deliver(SENDER, ["a@x.test"], MESSAGE)
    await sink.drop_connections()
    result = await up.deliver(SENDER, ["b@x.test"], MESSAGE)
    assert result.accepted == ("b@x.test",)
    assert sink.connections == 2
    assert [m.rcpt_tos for m in sink.messages] == [["a@x.test"], ["b@x.test"]]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_pool_retries_once_when_pooled_connection_dies_at_first_command(
    sink: Sink, make_upstream: MakeUpstream, pipelining: bool
) -> None:
    sink.pipelining = pipelining
    up = make_upstream(sink.url)
    await up.deliver(SENDER, ["a@x.test"], MESSAGE)
    sink.hangup_on_mail = 1  # the pooled connection dies when MAIL arrives
    result = await up.deliver(SENDER, ["b@x.test"], MESSAGE)
    assert result.accepted == ("b@x.test",)
    assert sink.connections == 2
    assert [m.rcpt_tos for m in sink.messages] == [["a@x.test"], ["b@x.test"]]


async def test_fresh_connection_dying_is_not_retried(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    sink.hangup_on_mail = 2
    with pytest.raises(UpstreamError) as err:
        await make_upstream(sink.url).deliver(SENDER, ["a@x.test"], MESSAGE)
    assert err.value.kind == "connect"
    assert sink.connections == 1


async def test_pool_concurrency_is_bounded_and_never_shares(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    sink.data_delay = 0.01  # keep connections busy so deliveries really overlap
    up = make_upstream(sink.url, pool_size=5)

    async def one(i: int) -> None:
        body = b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)
        result = await up.deliver(SENDER, [f"r{i}@x.test"], body)
        assert result.accepted == (f"r{i}@x.test",)

    await asyncio.gather(*(one(i) for i in range(50)))
    assert len(sink.messages) == 50
    assert 1 < sink.connections <= 5
    for m in sink.messages:
        (rcpt,) = m.rcpt_tos
        i = int(rcpt[1:].split("@")[0])
        assert m.data == b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)


async def test_pool_size_zero_connects_per_delivery_and_quits(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    up = make_upstream(sink.url, pool_size=0)
    await up.deliver(SENDER, ["a@x.test"], MESSAGE)
    await up.deliver(SENDER, ["b@x.test"], MESSAGE)
    await up.close()
    assert sink.connections == 2
    assert sink.verbs.count("QUIT") == 2


async def test_idle_connections_are_closed(sink: Sink, make_upstream: MakeUpstream) -> None:
    up = make_upstream(sink.url, pool_idle=0.05)
    await up.deliver(SENDER, ["a@x.test"], MESSAGE)
    await sink.wait_verb("QUIT")
    await up.deliver(SENDER, ["b@x.test"], MESSAGE)
    assert sink.connections == 2


async def test_close_quits_pooled_connections(sink: Sink, make_upstream: MakeUpstream) -> None:
    up = make_upstream(sink.url)
    await up.deliver(SENDER, ["a@x.test"], MESSAGE)
    await up.close()
    assert sink.verbs[-1] == "QUIT"
    with pytest.raises(UpstreamError) as err:
        await up.deliver(SENDER, ["a@x.test"], MESSAGE)
    assert err.value.kind == "connect"


async def test_probe_connects_then_reuses_with_noop(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    up = make_upstream(sink.url)
    await up.probe()
    await up.probe()
    assert sink.connections == 1
    assert sink.verbs == ["EHLO", "NOOP"]
    await up.deliver(SENDER, ["a@x.test"], MESSAGE)
    assert sink.connections == 1


async def test_cancelled_delivery_does_not_pool_its_connection(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    sink.data_delay = 5
    up = make_upstream(sink.url)
    task = asyncio.create_task(up.deliver(SENDER, ["a@x.test"], MESSAGE))
    await sink.wait_verb("DATA")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sink.data_delay = 0
    await up.deliver(SENDER, ["b@x.test"], MESSAGE)
    assert sink.connections == 2


# ---------------------------------------------------------------- ESMTP parameters


async def test_size_8bitmime_smtputf8_parameters(sink: Sink, make_upstream: MakeUpstream) -> None:
    up = make_upstream(sink.url)
    message = "Subject: caf\u00e9\n\nbody\n".encode()
    await up.deliver("s\u00e9nder@corp.test", ["r@x.test"], message, smtputf8=True, eightbit=True)
    opts = sink.messages[0].mail_options
    assert opts == [f"SIZE={len(normalize_newlines(message))}", "BODY=8BITMIME", "SMTPUTF8"]
    assert sink.messages[0].mail_from == "s\u00e9nder@corp.test"
    await up.deliver(SENDER, ["r@x.test"], MESSAGE)
    assert sink.messages[1].mail_options == [f"SIZE={len(MESSAGE)}"]


async def test_parameters_only_when_advertised(sink: Sink, make_upstream: MakeUpstream) -> None:
    await sink.stop()
    async with Sink(size=None, eightbitmime=False) as bare:
        await make_upstream(bare.url).deliver(SENDER, ["r@x.test"], MESSAGE)
        assert bare.messages[0].mail_options == []


async def test_eight_bit_content_never_goes_to_a_seven_bit_upstream(make_upstream: MakeUpstream) -> None:
    """RFC 6152: no 8BITMIME, no 8-bit body; refused before MAIL, the connection stays usable."""
    async with Sink(eightbitmime=False) as bare:
        up = make_upstream(bare.url)
        with pytest.raises(UpstreamError) as err:
            await up.deliver(SENDER, ["r@x.test"], b"Subject: caf\xc3\xa9\r\n\r\n\xc3\xa9\r\n", eightbit=True)
        assert err.value.kind == "capability"
        assert err.value.reply is not None
        assert err.value.reply.line().startswith("451 4.6.3 ")
        assert "MAIL" not in bare.verbs and bare.messages == []
        assert up.missing_capabilities(25 * 1024 * 1024) == ("8BITMIME",)
        await up.deliver(SENDER, ["r@x.test"], MESSAGE)
        assert bare.connections == 1


async def test_smtputf8_needed_but_not_offered_fails_permanently(
    make_upstream: MakeUpstream,
) -> None:
    async with Sink(smtputf8=False) as plain:
        up = make_upstream(plain.url)
        for kwargs, rcpt in (({"smtputf8": True}, "r@x.test"), ({}, "r\u00e9@x.test")):
            with pytest.raises(UpstreamError) as err:
                await up.deliver(SENDER, [rcpt], MESSAGE, **kwargs)
            assert err.value.kind == "5xx"
            assert err.value.reply is not None
            assert err.value.reply.line().startswith("550 5.6.7")
            no_address(err.value)
        assert "MAIL" not in plain.verbs
        # Nothing was sent: the connection stays usable.
        await up.deliver(SENDER, ["r@x.test"], MESSAGE)
        assert plain.connections == 1


async def test_message_over_advertised_size_is_refused_locally(
    make_upstream: MakeUpstream,
) -> None:
    async with Sink(size=1000) as small:
        with pytest.raises(UpstreamError) as err:
            await make_upstream(small.url).deliver(SENDER, ["r@x.test"], b"x" * 2000)
        assert err.value.kind == "5xx"
        assert err.value.reply is not None
        assert err.value.reply.code == 552
        assert "MAIL" not in small.verbs


async def test_null_sender(sink: Sink, make_upstream: MakeUpstream) -> None:
    await make_upstream(sink.url).deliver("", ["r@x.test"], MESSAGE)
    assert sink.messages[0].mail_from == "<>"


# ---------------------------------------------------------------- TLS


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path)


@pytest.mark.parametrize("mode", ["no-verify", "ca-file"])
async def test_starttls(cert: tuple[Path, Path], make_upstream: MakeUpstream, mode: str) -> None:
    async with Sink(starttls=server_tls_context(*cert)) as tls_sink:
        assert tls_sink.url.startswith("smtp+starttls://")
        opts = {"verify_tls": False} if mode == "no-verify" else {"ca_file": str(cert[0])}
        up = make_upstream(tls_sink.url, **opts)
        result = await up.deliver(SENDER, ["r@x.test"], MESSAGE)
        assert result.accepted == ("r@x.test",)
        assert tls_sink.messages[0].data == MESSAGE
        assert tls_sink.verbs.count("EHLO") == 2  # again after the handshake
        assert tls_sink.messages[0].tls


async def test_starttls_unverified_certificate_fails(
    cert: tuple[Path, Path], make_upstream: MakeUpstream
) -> None:
    async with Sink(starttls=server_tls_context(*cert)) as tls_sink:
        with pytest.raises(UpstreamError) as err:
            await make_upstream(tls_sink.url).deliver(SENDER, ["r@x.test"], MESSAGE)
        assert err.value.kind == "tls"
        assert tls_sink.messages == []


async def test_starttls_required_but_not_offered(
    sink: Sink, make_upstream: MakeUpstream
) -> None:
    url = f"smtp+starttls://127.0.0.1:{sink.port}"
    with pytest.raises(UpstreamError) as err:
        await make_upstream(url, verify_tls=False).deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == "session"  # required TLS refused: the session, not a handshake
    assert "MAIL" not in sink.verbs


async def test_plaintext_after_the_starttls_reply_is_refused(make_upstream: MakeUpstream) -> None:
    """Bytes sent with the 220 to STARTTLS could come from a man in the middle (CVE-2011-0411)."""
    seen: list[bytes] = []

    async def injector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw\r\n")
        await reader.readline()
        writer.write(b"250-raw\r\n250 STARTTLS\r\n")
        seen.append(await reader.readline())
        writer.write(b"220 go ahead\r\n250-injected\r\n250 PIPELINING\r\n")
        seen.append(await reader.read())

    async with RawServer(injector) as srv:
        url = f"smtp+starttls://127.0.0.1:{srv.port}"
        with pytest.raises(UpstreamError) as err:
            await make_upstream(url, verify_tls=False).deliver(SENDER, ["r@x.test"], MESSAGE)
    assert err.value.kind == "protocol"
    assert seen == [b"STARTTLS\r\n", b""]  # no handshake, nothing else sent


async def test_plain_smtp_does_not_do_opportunistic_starttls(
    cert: tuple[Path, Path], make_upstream: MakeUpstream
) -> None:
    async with Sink(starttls=server_tls_context(*cert)) as tls_sink:
        url = f"smtp://127.0.0.1:{tls_sink.port}"
        await make_upstream(url).deliver(SENDER, ["r@x.test"], MESSAGE)
        assert not tls_sink.messages[0].tls
        assert "STARTTLS" not in b"".join(tls_sink.reads[0]).decode()


async def test_smtps_implicit_tls(cert: tuple[Path, Path], make_upstream: MakeUpstream) -> None:
    async with Sink(implicit_tls=server_tls_context(*cert)) as tls_sink:
        assert tls_sink.url.startswith("smtps://")
        up = make_upstream(tls_sink.url, ca_file=str(cert[0]))
        result = await up.deliver(SENDER, ["r@x.test"], MESSAGE)
        assert result.accepted == ("r@x.test",)
        assert tls_sink.messages[0].tls
        with pytest.raises(UpstreamError) as err:
            await make_upstream(tls_sink.url).deliver(SENDER, ["r@x.test"], MESSAGE)
        assert err.value.kind == "tls"
        assert len(tls_sink.messages) == 1


# ---------------------------------------------------------------- pipelined replies, read in bulk


def _whole(data: bytes) -> list[bytes]:
    return [data]


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _awkward(data: bytes) -> list[bytes]:
    """Cut inside every reply code and between every CR and its LF."""
    cuts = {i + 3 for i in range(len(data)) if i == 0 or data[i - 1 : i] == b"\n"}
    cuts |= {i + 1 for i in range(len(data)) if data[i : i + 1] == b"\r"}
    edges = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


class GroupPeer:
    """A pipelining server that answers each MAIL..DATA group with scripted bytes.

    `groups`: the replies to MAIL, each RCPT and DATA, one entry per
    transaction across connections, written in the pieces `cut` makes (each
    piece its own TCP segment, the loop turning in between), so that the
    client's reads end in awkward places. After a 354 it collects content up
    to the lone dot, or up to the client hanging up, into `contents`; after a
    421 it hangs up.
    """

    def __init__(
        self,
        groups: list[bytes],
        cut: Callable[[bytes], list[bytes]] = _whole,
        final: bytes = b"250 2.0.0 queued as X\r\n",
    ) -> None:
        self.groups = list(groups)
        self.cut = cut
        self.final = final
        self.contents: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw\r\n")
        assert (await reader.readline()).startswith(b"EHLO")
        writer.write(b"250-raw\r\n250 PIPELINING\r\n")
        while line := await reader.readline():
            if line.startswith(b"RSET"):
                writer.write(b"250 2.0.0 reset\r\n")
                continue
            if line.startswith(b"QUIT"):
                writer.write(b"221 2.0.0 bye\r\n")
                return
            assert line.startswith(b"MAIL")
            while not (await reader.readline()).startswith(b"DATA"):
                pass
            group = self.groups.pop(0)
            for piece in self.cut(group):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)
            if b"421 " in group:
                return
            if b"354 " in group:
                content = b""
                while (line := await reader.readline()) and line != b".\r\n":
                    content += line
                self.contents.append(content)
                if line:
                    writer.write(self.final)


GROUP_OK_1 = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"  # MAIL, one RCPT, DATA


@pytest.mark.parametrize("cut", [_whole, _bytewise, _awkward])
async def test_group_replies_of_every_shape_in_any_segments(
    make_upstream: MakeUpstream, cut: Callable[[bytes], list[bytes]]
) -> None:
    rcpts = [f"r{i}@x.test" for i in range(10)]
    rcpt_replies = [
        b"250 2.1.5 ok\r\n",
        b"550-5.1.1 no such\r\n550 5.1.1 user here\r\n",  # multi-line refusal
        b"251 2.1.5 will forward\r\n",
        b"250-2.1.5 ok\r\n250 2.1.5 really\r\n",  # multi-line success
        b"452 4.2.2 full\r\n",
        b"250 ok\r\n",
        b"250\r\n",  # no text at all
        b"250 " + b"x" * 506 + b"\r\n",  # 512 octets: the longest line RFC 5321 allows
        b"252 2.1.5 cannot verify\r\n",
        b"250 2.1.5 ok\tand a tab\r\n",  # HT is text too (RFC 5321 4.2)
    ]
    group = b"250 2.1.0 ok\r\n" + b"".join(rcpt_replies) + b"354 go ahead\r\n"
    peer = GroupPeer([group], cut)
    async with RawServer(peer) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        result = await up.deliver(SENDER, rcpts, MESSAGE)
    assert result.accepted == tuple(r for i, r in enumerate(rcpts) if i not in (1, 4))
    assert result.refused == {
        "r1@x.test": Reply(550, "5.1.1 no such\n5.1.1 user here"),
        "r4@x.test": Reply(452, "4.2.2 full"),
    }
    assert result.reply == Reply(250, "2.0.0 queued as X")
    assert peer.contents == [MESSAGE]


@pytest.mark.parametrize("cut", [_whole, _bytewise])
async def test_hundred_recipient_group_with_odd_ones_in_the_runs(
    make_upstream: MakeUpstream, cut: Callable[[bytes], list[bytes]]
) -> None:
    """Long runs of 250 with a 251, a refusal and the 354 at their ends, as a real MTA sends them."""
    rcpts = [f"r{i}@x.test" for i in range(100)]
    odd = {37: b"251 2.1.5 forwarded\r\n", 60: b"550 5.1.1 <r60@x.test> unknown\r\n", 99: b"251 ok\r\n"}
    group = b"250 2.1.0 ok\r\n"
    group += b"".join(odd.get(i, b"250 2.1.5 ok\r\n") for i in range(100))
    group += b"354 go ahead\r\n"
    peer = GroupPeer([group, group], cut)
    async with RawServer(peer) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        for _ in range(2):
            result = await up.deliver(SENDER, rcpts, MESSAGE)
            assert result.accepted == tuple(r for i, r in enumerate(rcpts) if i != 60)
            assert result.refused == {"r60@x.test": Reply(550, "5.1.1 <r60@x.test> unknown")}
        assert srv.connections == 1
    assert peer.contents == [MESSAGE, MESSAGE]


@pytest.mark.parametrize(
    "bad",
    [
        b"2500 ok\r\n",
        b"250ok\r\n",
        b"25O ok\r\n",
        b"350 ok\r\n",  # 3xx to RCPT
        b"650 5.0.0 no\r\n",
        b"\x00\xff garbage\r\n",
        b"250-2.1.5 first\r\n251 2.1.5 second\r\n",  # lines disagree on the code
        b"250 " + b"x" * 2043 + b"\r\n",  # 2049 octets
        b"250 " + b"x" * 70_000,  # no end of line at all
    ],
    ids=["long-code", "no-space", "letter", "3xx", "650", "binary", "code-mismatch", "long", "endless"],
)
@pytest.mark.parametrize("cut", [_whole, _awkward])
async def test_bad_reply_inside_the_group_is_protocol_error_and_not_pooled(
    make_upstream: MakeUpstream, bad: bytes, cut: Callable[[bytes], list[bytes]]
) -> None:
    rcpts = ["a@x.test", "b@x.test", "c@x.test"]
    group = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n" + bad + b"250 2.1.5 ok\r\n354 go ahead\r\n"
    peer = GroupPeer([group, GROUP_OK_1], cut)
    async with RawServer(peer) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        with pytest.raises(UpstreamError) as err:
            await up.deliver(SENDER, rcpts, b"SECRET-BODY\r\n")
        assert err.value.kind == "protocol"
        result = await up.deliver(SENDER, ["d@x.test"], MESSAGE)
        assert result.accepted == ("d@x.test",)
        assert srv.connections == 2
    assert all(b"SECRET-BODY" not in c for c in peer.contents)


async def test_reply_after_the_354_means_out_of_sync_and_no_content(
    make_upstream: MakeUpstream,
) -> None:
    """A reply nobody asked for could pass for the answer to our "."; nothing is sent.

    (Only when it comes with the 354, as here: one arriving after the content
    went out cannot be told from the real answer.)
    """
    group = GROUP_OK_1 + b"250 2.0.0 queued (not really)\r\n"
    peer = GroupPeer([group, GROUP_OK_1])
    async with RawServer(peer) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        with pytest.raises(UpstreamError) as err:
            await up.deliver(SENDER, ["a@x.test"], b"SECRET-BODY\r\n")
        assert err.value.kind == "protocol"
        await up.deliver(SENDER, ["a@x.test"], MESSAGE)
        assert srv.connections == 2
    assert peer.contents == [b"", MESSAGE]


async def test_421_inside_the_group_ends_it_and_the_connection(make_upstream: MakeUpstream) -> None:
    group = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n421 4.3.2 shutting down\r\n"
    peer = GroupPeer([group, GROUP_OK_1], _bytewise)
    async with RawServer(peer) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        with pytest.raises(UpstreamError) as err:
            await up.deliver(SENDER, ["a@x.test", "b@x.test", "c@x.test"], MESSAGE)
        assert err.value.kind == "4xx"
        assert err.value.reply == Reply(421, "4.3.2 shutting down")
        await up.deliver(SENDER, ["a@x.test"], MESSAGE)
        assert srv.connections == 2
    assert peer.contents == [MESSAGE]


async def test_pooled_connection_answering_421_to_mail_is_retried(
    make_upstream: MakeUpstream,
) -> None:
    peer = GroupPeer([GROUP_OK_1, b"421 4.3.2 restarting\r\n", GROUP_OK_1])
    async with RawServer(peer) as srv:
        up = make_upstream(f"smtp://127.0.0.1:{srv.port}")
        await up.deliver(SENDER, ["a@x.test"], MESSAGE)
        result = await up.deliver(SENDER, ["b@x.test"], MESSAGE)
        assert result.accepted == ("b@x.test",)
        assert srv.connections == 2
    assert peer.contents == [MESSAGE, MESSAGE]
