"""The bad-input catalogue, thrown at a running relay over raw sockets.

Each attack ends with the same proof: the relay still serves a normal
message correctly (`assert_still_serves`). Every reply any test here reads
goes through `_talk`/`_lines`, which fail on an '@' in a reply: the relay
must never echo an address back.
"""

from __future__ import annotations

import asyncio
import smtplib
import struct
from ipaddress import IPv4Address
from typing import Any

import pytest

from bccguard.app import App
from conftest import StartRelay, message, send
from sink import Sink

NORMAL = message(["alice@corp.example"], cc=["Bob <bob@gmail.com>"])


def _check_reply(line: bytes) -> bytes:
    assert b"@" not in line, f"an address-like text leaked into a reply: {line!r}"
    return line


async def _lines(reader: asyncio.StreamReader) -> list[bytes]:
    """One (possibly multi-line) reply."""
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line, "connection closed"
        lines.append(_check_reply(line.rstrip(b"\r\n")))
        if line[3:4] != b"-":
            return lines


async def _talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> list[bytes]:
    writer.write(data)
    await writer.drain()
    return await _lines(reader)


async def _rest(reader: asyncio.StreamReader) -> list[bytes]:
    """Everything until the relay closes the connection (bounded wait)."""
    data = await asyncio.wait_for(reader.read(), 15)
    return [_check_reply(x) for x in data.splitlines()]


async def _trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, pause: float
) -> list[bytes]:
    """Send `data` a byte at a time while reading replies, until the relay hangs up."""
    lines: list[bytes] = []

    async def collect() -> None:
        while True:
            try:
                line = await reader.readline()
            except ConnectionError:
                return
            if not line:
                return
            lines.append(_check_reply(line.rstrip(b"\r\n")))

    task = asyncio.create_task(collect())
    try:
        for i in range(len(data)):
            if task.done():
                break
            try:
                writer.write(data[i : i + 1])
            except ConnectionError:
                break
            await asyncio.sleep(pause)
        await asyncio.wait_for(task, 15)
    finally:
        task.cancel()
    return lines


async def _open(port: int, source: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0) if source else None
    )
    return reader, writer


async def _session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _open(port)
    assert (await _lines(reader))[0].startswith(b"220 ")
    await _talk(reader, writer, b"EHLO attacker.test\r\n")
    return reader, writer


async def assert_still_serves(app: App, sink: Sink) -> None:
    """A normal client gets a normal message delivered, byte for byte (nothing rewritten here)."""
    before = len(sink.messages)
    refused = await send(app.port, "news@corp.example", ["alice@corp.example", "bob@gmail.com"], NORMAL)
    assert refused == {}
    assert len(sink.messages) == before + 1
    got = sink.messages[-1]
    assert got.original == NORMAL and sorted(got.rcpt_tos) == ["alice@corp.example", "bob@gmail.com"]


# ------------------------------------------------------------ envelope smuggling


@pytest.mark.parametrize(
    ("address", "code"),
    [
        (b"a\x00b@corp.example", b"501 5.1.3"),  # NUL
        (b"a\rb@corp.example", b"501 5.1.3"),  # bare CR inside the command line
        (b"a\x01b@corp.example", b"501 5.1.3"),
        (b"a\x1bb@corp.example", b"501 5.1.3"),  # ESC
        (b"a\x7fb@corp.example", b"501 5.1.3"),  # DEL
        (b"a\tb@corp.example", b"5"),  # TAB: a control character, whichever parser sees it
        (b"\xff\xfe@corp.example", b"501 5.1.3"),  # not UTF-8
        ("jos\u00e9@corp.example".encode(), b"553 5.6.7"),  # UTF-8 without SMTPUTF8
    ],
    ids=["nul", "cr", "soh", "esc", "del", "tab", "invalid-utf8", "8bit-no-smtputf8"],
)
@pytest.mark.parametrize("verb", ["MAIL FROM", "RCPT TO"])
async def test_control_characters_in_envelope_addresses_are_refused(
    relay: App, sink: Sink, address: bytes, code: bytes, verb: str
) -> None:
    reader, writer = await _session(relay.port)
    try:
        if verb == "RCPT TO":
            assert (await _talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n"))[0].startswith(b"250")
        reply = await _talk(reader, writer, f"{verb}:<".encode() + address + b">\r\n")
        assert reply[0].startswith(code), reply
        assert (await _talk(reader, writer, b"NOOP\r\n"))[0].startswith(b"250")
    finally:
        writer.close()
    await assert_still_serves(relay, sink)


# ------------------------------------------------------------ DATA smuggling

# The SEC Consult SMTP smuggling probes (Dec 2023) and friends: end-of-data
# look-alikes that some receivers take for <CRLF>.<CRLF>.
PROBES = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-lf": b"\r.\n",
    "lf-dot-cr": b"\n.\r",
    "crlf-nul-dot-crlf": b"\r\n\x00.\r\n",
    "crlf-dot-nul-crlf": b"\r\n.\x00\r\n",
    "crlf-dot-space-crlf": b"\r\n. \r\n",
    "crlf-dotdot-crlf": b"\r\n..\r\n",
}
SMUGGLED = (
    b"MAIL FROM:<ceo@corp.example>\r\nRCPT TO:<victim@corp.example>\r\nDATA\r\n"
    b"From: ceo@corp.example\r\nTo: victim@corp.example\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)


@pytest.mark.parametrize("probe", list(PROBES.values()), ids=list(PROBES))
async def test_smuggling_probes_deliver_nothing_extra(relay: App, sink: Sink, probe: bytes) -> None:
    head = b"From: a@corp.example\r\nTo: b@corp.example\r\nSubject: hi\r\n\r\nfirst line\r\n"
    reader, writer = await _session(relay.port)
    try:
        await _talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n")
        await _talk(reader, writer, b"RCPT TO:<b@corp.example>\r\n")
        assert (await _talk(reader, writer, b"DATA\r\n"))[0].startswith(b"354")
        reply = await _talk(reader, writer, head + probe + SMUGGLED + b"\r\n.\r\n")
        # Either refused as bare CR/LF, or accepted as ONE message whose body holds the probe.
        # 554 5.6.0: a NUL (no BINARYMIME), refused like bare CR/LF
        assert reply[0].startswith((b"550 5.6.0", b"554 5.6.0", b"250")), reply
        assert (await _talk(reader, writer, b"QUIT\r\n"))[0].startswith(b"221")
    finally:
        writer.close()
    await asyncio.sleep(0)  # let the sink record
    # The upstream saw at most one transaction, for the one real recipient.
    assert sink.verbs.count("MAIL") <= 1
    assert all(m.rcpt_tos == ["b@corp.example"] for m in sink.messages)
    assert all(m.mail_from == "a@corp.example" for m in sink.messages)
    if reply[0].startswith(b"250"):
        (got,) = sink.messages
        # exactly what the client sent, dot-unstuffed: the probe is body text of the one message
        assert got.original == (head + probe + SMUGGLED + b"\r\n").replace(b"\r\n.", b"\r\n")
    else:
        assert sink.messages == []
    await assert_still_serves(relay, sink)
    assert sink.verbs.count("MAIL") == (2 if reply[0].startswith(b"250") else 1)


# ------------------------------------------------------------ commands


async def test_nul_8bit_junk_and_megabyte_command_lines_get_defined_replies(relay: App, sink: Sink) -> None:
    reader, writer = await _session(relay.port)
    try:
        unknown = [b"500 5.5.2 Error: command not recognized"]
        assert await _talk(reader, writer, b"\x00\x00\x00\r\n") == unknown
        assert (await _talk(reader, writer, b"\xff\xfe\xfd junk\r\n"))[0].startswith(b"500 5.5.2")
        assert await _talk(reader, writer, b"MA\x00IL FROM:<a@corp.example>\r\n") == unknown
        reply = await _talk(reader, writer, b"NOOP " + b"x" * (1 << 20) + b"\r\n")
        assert reply == [b"500 5.5.2 Command line too long"]
        reply = await _talk(reader, writer, b"MAIL FROM:<" + b"a" * 600 + b"@corp.example>\r\n")
        assert reply[0].startswith(b"500 5.5.2")
        # the junk above was not fatal: a transaction works in the same session
        assert (await _talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n"))[0].startswith(b"250")
        assert (await _talk(reader, writer, b"RSET\r\n"))[0].startswith(b"250")
    finally:
        writer.close()
    await assert_still_serves(relay, sink)


async def test_unknown_commands_echo_nothing(relay: App, sink: Sink) -> None:
    reader, writer = await _session(relay.port)
    try:
        reply = await _talk(reader, writer, b"VICTIM@CORP.EXAMPLE hello\r\n")
        assert reply == [b"500 5.5.2 Error: command not recognized"]
        # unparseable: aiosmtpd answers "502 Could not VRFY <what was sent>"
        reply = await _talk(reader, writer, b"VRFY <some body@corp.example\r\n")
        assert reply[0][:1] in (b"2", b"5")
    finally:
        writer.close()


async def test_pipelined_garbage_is_cut_after_max_bad_commands(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, {"server": {"max_bad_commands": 5}})
    reader, writer = await _session(app.port)
    try:
        writer.write(b"FOO\r\nBAR x\r\nDATA\r\nRCPT TO:<b@corp.example>\r\nHELO\r\nNOOP\r\nNOOP\r\n")
        got = await _rest(reader)
    finally:
        writer.close()
    assert got == [
        b"500 5.5.2 Error: command not recognized",
        b"500 5.5.2 Error: command not recognized",
        b"503 5.5.1 Error: need RCPT command",
        b"503 5.5.1 Error: need MAIL command",
        b"501 5.5.4 Syntax: HELO hostname",
        b"421 4.7.0 Too many errors, closing connection",
    ]
    assert (
        app.metrics.registry.get_sample_value("bccguard_smtp_connections_total", {"result": "protocol_error"})
        == 1
    )
    await assert_still_serves(app, sink)


async def test_relay_probes_count_as_bad_commands(start_relay: StartRelay, sink: Sink) -> None:
    """An open-relay prober from outside gets its 554s, then the door."""
    app = await start_relay(
        sink.url, {"server": {"max_bad_commands": 3, "allowed_networks": ["127.0.0.1/32"]}}
    )
    reader, writer = await _open(app.port, source="127.0.0.2")
    try:
        await _lines(reader)
        await _talk(reader, writer, b"EHLO prober.test\r\nMAIL FROM:<x@outside.example>\r\n")
        writer.write(b"".join(b"RCPT TO:<v%d@corp.example>\r\n" % i for i in range(10)))
        got = await _rest(reader)
    finally:
        writer.close()
    assert [g[:9] for g in got[1:]] == [b"554 5.7.1"] * 3 + [b"421 4.7.0"]
    assert sink.messages == []
    await assert_still_serves(app, sink)


# ------------------------------------------------------------ DATA


async def test_disconnect_mid_data_delivers_nothing(relay: App, sink: Sink) -> None:
    for cut in (0, 10, len(NORMAL) - 1):
        reader, writer = await _session(relay.port)
        await _talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n")
        await _talk(reader, writer, b"RCPT TO:<alice@corp.example>\r\n")
        await _talk(reader, writer, b"DATA\r\n")
        writer.write(NORMAL[:cut])
        await writer.drain()
        writer.transport.abort()
    for _ in range(20):
        await asyncio.sleep(0)
    assert sink.messages == []
    assert relay.gate.total == 0  # every aborted session was released
    await assert_still_serves(relay, sink)


async def test_header_block_over_max_header_size_is_552(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, {"server": {"max_header_size": 2000}})
    big = message(["alice@corp.example"], extra="X-Junk: " + "y" * 70 + ("\r\n " + "y" * 70) * 40)
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(app.port, "a@corp.example", ["alice@corp.example"], big)
    assert err.value.smtp_code == 552 and err.value.smtp_error.startswith(b"5.3.4")
    # a long body with a small header block is fine
    ok = message(["alice@corp.example"], body="line\r\n" * 2000)
    assert await send(app.port, "a@corp.example", ["alice@corp.example"], ok) == {}
    assert [m.original for m in sink.messages] == [ok]


# ------------------------------------------------------------ slowloris and floods


async def test_slowloris_command_is_cut_with_421(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, {"server": {"command_timeout": 0.5}})
    reader, writer = await _open(app.port)
    try:
        await _lines(reader)
        # one byte every 50 ms, never a line end: no command ever completes
        got = await _trickle(reader, writer, b"EHLO slow.example" * 100, 0.05)
        assert got == [b"421 4.4.2 Timeout exceeded, closing connection"]
    finally:
        writer.close()
    await assert_still_serves(app, sink)


async def test_slowloris_data_is_cut_with_421_but_a_fast_big_upload_is_not(
    start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(
        sink.url, {"server": {"data_timeout": 1.0, "min_data_rate": 100_000, "command_timeout": 30.0}}
    )
    reader, writer = await _session(app.port)
    try:
        await _talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n")
        await _talk(reader, writer, b"RCPT TO:<alice@corp.example>\r\n")
        await _talk(reader, writer, b"DATA\r\n")
        # 1 byte every 50 ms (~20 bytes/s against 100 kB/s required), never the final dot
        got = await _trickle(reader, writer, NORMAL * 10, 0.05)
        assert got == [b"421 4.4.2 Timeout waiting for data, closing connection"]
    finally:
        writer.close()
    assert sink.messages == []
    # 2 MB in 100 kB steps with pauses: each chunk buys a second, so it outlasts data_timeout safely
    body = ("q" * 76 + "\r\n") * 26_000
    big = message(["alice@corp.example"], body=body)
    reader, writer = await _session(app.port)
    try:
        await _talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n")
        await _talk(reader, writer, b"RCPT TO:<alice@corp.example>\r\n")
        await _talk(reader, writer, b"DATA\r\n")
        step = 100_000
        for i in range(0, len(big), step):
            writer.write(big[i : i + step])
            await writer.drain()
            await asyncio.sleep(0.06)
        reply = await _talk(reader, writer, b".\r\n")
        assert reply[0].startswith(b"250"), reply
    finally:
        writer.close()
    assert [m.original for m in sink.messages] == [big]


async def test_connection_flood_does_not_lock_out_other_clients(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, {"server": {"max_sessions": 6, "max_sessions_per_ip": 3}})
    flood: list[Any] = []
    try:
        for _ in range(3):
            r, w = await _open(app.port, source="127.0.0.2")
            assert (await _lines(r))[0].startswith(b"220")
            flood.append(w)
        r, w = await _open(app.port, source="127.0.0.2")
        flood.append(w)
        assert await _rest(r) == [b"421 4.7.0 Too many connections from your address, try again later"]
        # a normal client from another address is served while the flood holds its share
        await assert_still_serves(app, sink)
        # fill the rest of the total from more addresses: past max_sessions everyone gets 421
        for src in ("127.0.0.3", "127.0.0.3", "127.0.0.4"):
            r, w = await _open(app.port, source=src)
            assert (await _lines(r))[0].startswith(b"220")
            flood.append(w)
        r, w = await _open(app.port, source="127.0.0.5")
        flood.append(w)
        assert await _rest(r) == [b"421 4.7.0 Too many connections, try again later"]
    finally:
        for w in flood:
            w.transport.abort()
    for _ in range(20):
        await asyncio.sleep(0)
    assert app.gate.total == 0 and not app.gate.per_ip
    await assert_still_serves(app, sink)


async def test_idle_flood_is_timed_out_and_the_slots_come_back(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, {"server": {"max_sessions": 3, "command_timeout": 0.5}})
    idle = []
    for _ in range(3):
        r, w = await _open(app.port)
        assert (await _lines(r))[0].startswith(b"220")
        idle.append((r, w))
    for r, w in idle:  # each idle session is cut, with a reason
        assert await _rest(r) == [b"421 4.4.2 Timeout exceeded, closing connection"]
        w.close()
    await assert_still_serves(app, sink)


# ------------------------------------------------------------ PROXY protocol


def proxy_v2(src: str, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 25) -> bytes:
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    body = IPv4Address(src).packed + IPv4Address(dst).packed + struct.pack("!HH", sport, dport)
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


async def test_proxy_v2_client_address_decides_relaying(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(
        sink.url,
        {
            "server": {
                "proxy_protocol": True,
                "proxy_trusted_networks": ["127.0.0.1/32"],
                "allowed_networks": ["192.0.2.0/24"],
            }
        },
    )
    for src, expected in (("192.0.2.10", b"250"), ("198.51.100.7", b"554")):
        reader, writer = await _open(app.port)
        writer.write(proxy_v2(src))
        assert (await _lines(reader))[0].startswith(b"220")
        await _talk(reader, writer, b"EHLO lb.test\r\n")
        await _talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n")
        assert (await _talk(reader, writer, b"RCPT TO:<b@corp.example>\r\n"))[0].startswith(expected)
        writer.close()


@pytest.mark.parametrize(
    "header",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.1\r\n",
        b"PROXY " + b"A" * 200 + b"\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",  # v2 claiming 64 KB of addresses
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ],
    ids=["http", "bad-ip", "short-v1", "long-v1", "v2-huge-length", "tls-hello"],
)
async def test_garbage_proxy_header_is_dropped_without_a_greeting(
    start_relay: StartRelay, sink: Sink, header: bytes
) -> None:
    app = await start_relay(
        sink.url,
        {
            "server": {
                "proxy_protocol": True,
                "proxy_trusted_networks": ["127.0.0.1/32"],
                "allowed_networks": ["192.0.2.0/24"],
                "command_timeout": 3.0,
            }
        },
    )
    reader, writer = await _open(app.port)
    writer.write(header)
    try:
        # closed, never greeted, nothing relayed (an incomplete header waits for the timeout: 421)
        assert all(line.startswith(b"421 4.4.2") for line in await _rest(reader))
    finally:
        writer.close()
    for _ in range(10):
        await asyncio.sleep(0)
    assert app.gate.total == 0 and sink.messages == []
    # the listener is fine: a proper PROXY client is served
    reader, writer = await _open(app.port)
    writer.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 25\r\n")
    assert (await _lines(reader))[0].startswith(b"220")
    writer.close()


async def test_per_ip_limit_applies_to_the_proxied_client_not_the_balancer(
    start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(
        sink.url,
        {
            "server": {
                "proxy_protocol": True,
                "proxy_trusted_networks": ["127.0.0.1/32"],
                "max_sessions_per_ip": 1,
                "max_sessions": 10,
            }
        },
    )
    writers = []
    try:
        # three clients through the same balancer address: each has its own share
        for src in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            r, w = await _open(app.port)
            w.write(f"PROXY TCP4 {src} 127.0.0.1 40000 25\r\n".encode())
            assert (await _lines(r))[0].startswith(b"220")
            writers.append(w)
        # a second session of the same real client is over its share
        r, w = await _open(app.port)
        writers.append(w)
        w.write(b"PROXY TCP4 192.0.2.1 127.0.0.1 40001 25\r\n")
        assert await _rest(r) == [b"421 4.7.0 Too many connections from your address, try again later"]
    finally:
        for w in writers:
            w.transport.abort()
    for _ in range(20):
        await asyncio.sleep(0)
    assert app.gate.total == 0 and not app.gate.per_ip


async def test_noop_forever_does_not_hold_a_session_slot(start_relay: StartRelay, sink: Sink) -> None:
    """One NOOP inside each command timeout would keep a slot for ever; the junk limit ends it."""
    from bccguard.smtp.server import JUNK_LIMIT

    app = await start_relay(sink.url, {"server": {"max_bad_commands": 3}})
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    await reader.readline()
    writer.write(b"EHLO c.test\r\n" + b"NOOP\r\n" * (JUNK_LIMIT + 10))
    await writer.drain()
    replies = []
    while line := await asyncio.wait_for(reader.readline(), 10):
        replies.append(line)
    writer.close()
    noops = [r for r in replies if r.startswith(b"250 ")]
    assert len(noops) == 1 + JUNK_LIMIT + 3  # EHLO's last line; NOOPs up to the third strike
    assert replies[-1].startswith(b"421 4.7.0")


async def test_the_junk_count_resets_after_each_delivered_message(
    start_relay: StartRelay, sink: Sink
) -> None:
    """A Postfix client reusing a cached connection sends RSET before every message: never cut off."""
    from bccguard.smtp.server import JUNK_LIMIT

    app = await start_relay(sink.url, {"server": {"max_bad_commands": 3}})

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", app.port, timeout=20) as c:
            c.ehlo("c.test")
            for i in range(3):
                for _ in range(JUNK_LIMIT):
                    assert c.rset()[0] == 250
                c.sendmail("a@corp.example", [f"b{i}@corp.example"], b"Subject: x\r\n\r\nhi\r\n")

    await asyncio.to_thread(client)  # blocking smtplib must not block the relay's loop
    assert len(sink.messages) == 3
