"""Correctness of the fast paths (issue 7): nothing here is timed.

- the upstream gets MAIL, every RCPT and DATA in one pipelined write;
- upstream connections are pooled: reused across messages, never more at
  once than pool_size, and clients wait for a free one (back-pressure);
- a client that waits longer than the upstream timeout gets 451, not a hang;
- the chunked DATA reader's dot-unstuffing is exact, also across chunks.
"""

from __future__ import annotations

import asyncio
import random
import re
import smtplib
from collections.abc import AsyncIterator

import pytest

from bccguard.smtp import server
from bccguard.smtp.server import READ_CHUNK
from conftest import StartRelay, message, send, talk
from sink import Sink


class Watch:
    """Samples how many upstream connections the sink has open at once."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def open_now(self) -> int:
        return sum(1 for p in self.sink._protocols if p.transport is not None)

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.open_now())
            await asyncio.sleep(0.002)

    def __enter__(self) -> Watch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture
async def slow_sink() -> AsyncIterator[Sink]:
    s = Sink(data_delay=0.2)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def test_upstream_gets_mail_rcpts_and_data_in_one_write(start_relay: StartRelay, sink: Sink) -> None:
    relay = await start_relay(f"smtp://127.0.0.1:{sink.port}")
    rcpts = [f"user{i}@corp.example" for i in range(5)]
    assert await send(relay.port, "news@corp.example", rcpts, message(rcpts)) == {}
    got = sink.messages[-1]
    assert got.rcpt_tos == rcpts
    reads = sink.reads[got.connection]
    group = next(chunk for chunk in reads if b"MAIL FROM:" in chunk)
    assert group.count(b"RCPT TO:") == 5
    assert group.endswith(b"DATA\r\n")


async def test_pipelined_group_with_refusals_stays_in_sync(start_relay: StartRelay, sink: Sink) -> None:
    """Refused RCPTs in the middle of the group: the replies still line up with the recipients."""
    sink.rcpt_replies = {"user1@corp.example": "550 5.1.1 unknown", "user3@corp.example": "550 5.1.1 no"}
    relay = await start_relay(f"smtp://127.0.0.1:{sink.port}")
    rcpts = [f"user{i}@corp.example" for i in range(5)]
    for _ in range(3):  # and the pooled connection stays usable for the next ones
        await send(relay.port, "news@corp.example", rcpts, message(rcpts))
        assert sink.messages[-1].rcpt_tos == [rcpts[0], rcpts[2], rcpts[4]]
    assert sink.connections == 1


async def test_connections_are_reused_across_messages(start_relay: StartRelay, sink: Sink) -> None:
    relay = await start_relay(f"smtp://127.0.0.1:{sink.port}")
    for i in range(6):
        data = message(["colleague@corp.example"], subject=f"n{i}")
        assert await send(relay.port, "news@corp.example", ["colleague@corp.example"], data) == {}
        assert sink.messages[-1].original == data
    assert len(sink.messages) == 6
    assert sink.connections == 1


async def test_clients_wait_for_the_pool_and_upstream_connections_stay_bounded(
    start_relay: StartRelay, slow_sink: Sink
) -> None:
    relay = await start_relay(f"smtp://127.0.0.1:{slow_sink.port}", {"upstream": {"pool_size": 3}})
    data = message(["colleague@corp.example"])
    with Watch(slow_sink) as watch:
        results = await asyncio.gather(
            *(send(relay.port, "news@corp.example", [f"c{i}@corp.example"], data) for i in range(15))
        )
    assert results == [{}] * 15  # every client got its 250, some after waiting
    assert len(slow_sink.messages) == 15
    assert watch.peak <= 3
    assert slow_sink.connections <= 3


async def test_a_client_waiting_past_the_upstream_timeout_gets_451(
    start_relay: StartRelay, sink: Sink
) -> None:
    # One connection, each delivery 1.5 s (under the 2.5 s step timeout): the
    # second client gets the connection after 1.5 s, the third would wait 3 s.
    sink.data_delay = 1.5
    relay = await start_relay(f"smtp://127.0.0.1:{sink.port}", {"upstream": {"pool_size": 1, "timeout": 2.5}})
    data = message(["colleague@corp.example"])

    async def one(i: int) -> str:
        await asyncio.sleep(0.2 * i)  # in this order
        try:
            await send(relay.port, "news@corp.example", [f"c{i}@corp.example"], data)
        except smtplib.SMTPDataError as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"
        return "250"

    with Watch(sink) as watch:
        replies = await asyncio.gather(*(one(i) for i in range(3)))
    assert replies[:2] == ["250", "250"]
    assert replies[2].startswith("451 4.4.2")
    assert len(sink.messages) == 2
    assert watch.peak <= 1


@pytest.mark.parametrize("size", [300, READ_CHUNK * 2 + 77])
async def test_dot_unstuffing_is_exact(relay, sink: Sink, size: int) -> None:  # type: ignore[no-untyped-def]
    """Lines starting with '.', including the first body line and lines on chunk borders."""
    lines = [b"From: news@corp.example", b"To: colleague@corp.example", b"Subject: dots", b""]
    lines += [b".first body line starts with a dot", b"..two dots", b"."]
    filler = b".x" + b"y" * 70
    while sum(len(x) + 2 for x in lines) < size:
        lines.append(filler)
    lines.append(b"last")
    data = b"\r\n".join(lines) + b"\r\n"
    assert await send(relay.port, "news@corp.example", ["colleague@corp.example"], data) == {}
    assert sink.messages[-1].original == data


async def test_message_starting_with_a_dot_line(relay, sink: Sink) -> None:  # type: ignore[no-untyped-def]
    """The very first line of DATA is dot-stuffed too (no header block at all)."""
    data = b".lonely\r\n"
    assert await send(relay.port, "news@corp.example", ["colleague@corp.example"], data) == {}
    assert sink.messages[-1].original == data


async def test_ehlo_reply_is_one_write_and_counted_once(relay, sink: Sink) -> None:  # type: ignore[no-untyped-def]
    def replies_2xx() -> float:
        value = relay.metrics.registry.get_sample_value("bccguard_smtp_replies_total", {"class": "2xx"})
        return float(value or 0.0)

    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        before = replies_2xx()
        writer.write(b"EHLO client.test\r\n")
        chunk = await asyncio.wait_for(reader.read(4096), 5)
        lines = chunk.split(b"\r\n")
        assert lines[0] == b"250-bccguard.test"
        assert b"250-PIPELINING" in lines
        assert chunk.endswith(b"250 HELP\r\n")  # the whole reply in the first read
        assert replies_2xx() == before + 1
    finally:
        writer.close()


# Each RCPT form, and the reply it gets inside a MAIL transaction. The plain
# form takes RelaySMTP's fast path; every other form goes to aiosmtpd's parser.
# Both must agree on what a form means.
RCPT_FORMS = [
    (b"RCPT TO:<one@ext.example>", b"250 2.1.5 Ok"),
    (b"rcpt to:<two@ext.example>", b"250 2.1.5 Ok"),
    (b"RCPT TO: <three@ext.example>", b"250 2.1.5 Ok"),
    (b"RCPT TO:four@ext.example", b"250 2.1.5 Ok"),
    (
        b"RCPT TO:<five@ext.example> NOTIFY=NEVER",
        b"555 5.0.0 RCPT TO parameters not recognized or not implemented",
    ),
    (b"RCPT TO:<>", b"553 5.1.3 Malformed address"),
    (b"RCPT TO:<six@ext.example> junk=", b"501 5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]"),
    (b"RCPT <seven@ext.example>", b"501 5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]"),
    (b"RCPT TO:<a b@ext.example>", b"553 5.1.3 Error: malformed address"),  # never repaired to "a b"@
    (b'RCPT TO:<"q u"@ext.example>', b"250 2.1.5 Ok"),
]


async def test_rcpt_forms_get_the_same_replies_on_the_fast_path_and_off_it(relay, sink: Sink) -> None:  # type: ignore[no-untyped-def]
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        await talk(reader, writer, b"")
        # Before EHLO and before MAIL the fast path stands aside: aiosmtpd's own checks answer.
        rcpt = b"RCPT TO:<x@ext.example>\r\n"
        assert await talk(reader, writer, rcpt) == [b"503 5.5.1 Error: send HELO first"]
        await talk(reader, writer, b"EHLO client.test\r\n")
        assert await talk(reader, writer, rcpt) == [b"503 5.5.1 Error: need MAIL command"]
        assert (await talk(reader, writer, b"MAIL FROM:<news@corp.example>\r\n"))[0].startswith(b"250")
        for line, expected in RCPT_FORMS:
            assert await talk(reader, writer, line + b"\r\n") == [expected], line
        accepted = sum(1 for _, reply in RCPT_FORMS if reply.startswith(b"250"))
        assert (await talk(reader, writer, b"DATA\r\n"))[0].startswith(b"354")
        assert (await talk(reader, writer, message(["one@ext.example"]) + b".\r\n"))[0].startswith(b"250")
    finally:
        writer.close()
    assert len(sink.messages[-1].rcpt_tos) == accepted


async def test_repeated_ehlo_does_not_raise_the_mail_line_limit(relay, sink: Sink) -> None:  # type: ignore[no-untyped-def]
    """aiosmtpd keeps line limits in a class-wide table and adds 36 to MAIL's at every EHLO
    of any session; the limit must stay RFC 5321's 512 (+ SIZE and SMTPUTF8's 36)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    padded = b"MAIL FROM:<news@corp.example>" + b" " * 600 + b"\r\n"
    try:
        await talk(reader, writer, b"")
        for _ in range(20):
            await talk(reader, writer, b"EHLO client.test\r\n")
        assert await talk(reader, writer, padded) == [b"500 5.5.2 Command line too long"]
        longest = b"MAIL FROM:<news@corp.example>".ljust(548) + b"\r\n"
        assert (await talk(reader, writer, longest))[0].startswith(b"250")
    finally:
        writer.close()


def _reference(content: bytes) -> str | None:
    """The rule, written the slow obvious way."""
    if re.search(rb"\r(?!\n)|(?<!\r)\n", content):
        return "550"
    if b"\x00" in content:
        return "554"
    if any(len(line) > 998 for line in content.split(b"\r\n")):  # header lines too (RFC 5322 2.1.1)
        return "554"
    return None


@pytest.mark.parametrize("slice_size", [16, 64, 1 << 20])
def test_content_check_matches_the_rule(monkeypatch: pytest.MonkeyPatch, slice_size: int) -> None:
    """The sliced C-speed check agrees with the obvious one, also when slices cut lines and CRLFs."""
    monkeypatch.setattr(server, "_SCAN_SLICE", slice_size)
    rng = random.Random(slice_size)
    pieces = [
        b"\r\n",
        b"\n",
        b"\r",
        b"a",
        b"b" * 500,
        b"c" * 998,
        b"d" * 999,
        b"\r\n\r\n",
        b".",
        b"x" * 40,
        b"\x00",
    ]
    for _ in range(3000):
        content = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        got = server.check_content(content)
        assert (got[:3] if got else None) == _reference(content), content


async def test_protocol_setup_matches_aiosmtpd_init(relay) -> None:  # type: ignore[no-untyped-def]
    """RelaySMTP sets itself up without SMTP.__init__'s per-connection introspection
    (smtp/protocol_init.py); it must leave exactly the state SMTP.__init__ would."""
    from aiosmtpd.smtp import SMTP

    from bccguard.smtp.server import RelayHandler, RelaySMTP, SessionGate

    loop = asyncio.get_running_loop()
    handler = RelayHandler(lambda: relay.runtime)
    server = relay.runtime.config.server
    for credentials in (None, object()):  # without and with an auth_file: PLAIN/LOGIN excluded or not
        relay.runtime.credentials = credentials
        ours = RelaySMTP(
            handler, runtime_ref=lambda: relay.runtime, gate=SessionGate(), sessions=set(), loop=loop
        )
        theirs = RelaySMTP.__new__(RelaySMTP)  # the same class, set up by aiosmtpd's own __init__
        SMTP.__init__(
            theirs,
            handler,
            data_size_limit=server.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=server.hostname,
            ident="bccguard ESMTP",
            timeout=server.command_timeout,
            tls_context=None,
            require_starttls=False,
            auth_require_tls=True,
            auth_exclude_mechanism=[] if credentials is not None else ["PLAIN", "LOGIN"],
            loop=loop,
        )
        mine, base = vars(ours), vars(theirs)
        assert set(base) <= set(mine), set(base) - set(mine)
        bound = {"_smtp_methods", "_handle_hooks", "_auth_methods"}
        fresh = {"_stream_reader_wr", "_source_traceback", "_strong_reader", "_closed", "_drain_waiter"}
        for key in set(base) - bound - fresh:
            if key in ("loop", "_loop", "event_handler"):
                assert mine[key] is base[key], key
            elif callable(base[key]):  # bound methods: the same function
                assert getattr(mine[key], "__func__", None) is getattr(base[key], "__func__", None), key
            else:
                assert mine[key] == base[key], key
        assert {k: m.__func__ for k, m in mine["_smtp_methods"].items()} == {
            k: m.__func__ for k, m in base["_smtp_methods"].items()
        }
        assert mine["_handle_hooks"] == base["_handle_hooks"]
        assert {k: v.is_builtin for k, v in mine["_auth_methods"].items()} == {
            k: v.is_builtin for k, v in base["_auth_methods"].items()
        }
        assert {k: v.method.__func__ for k, v in mine["_auth_methods"].items()} == {
            k: v.method.__func__ for k, v in base["_auth_methods"].items()
        }
