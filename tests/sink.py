"""Recording SMTP sinks for tests: a real aiosmtpd server on a free loopback port.

    async with Sink(rcpt_replies={"bad@x.test": "550 5.1.1 no such user"}) as sink:
        ...deliver to 127.0.0.1:sink.port...
        assert sink.messages[0].rcpt_tos == [...]

The sink runs in the test's own event loop (no thread), records every
transaction that got its final reply, and can be told how to misbehave:
per-recipient replies, a MAIL or DATA reply, a delay before the DATA reply,
hanging up instead of answering, leaving PIPELINING/SMTPUTF8/8BITMIME/SIZE
out of EHLO, STARTTLS or implicit TLS. `RawServer` is for peers that are
not SMTP at all (silent, garbage, scripted). `self_signed_cert` makes a
certificate for TLS tests.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

HOST = "127.0.0.1"


@dataclass
class Received:
    """One transaction the sink answered at the end of DATA."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # after dot-unstuffing, exactly as aiosmtpd hands it to a handler
    mail_options: list[str]
    rcpt_options: list[str]
    peer: Any
    connection: int  # index into Sink.reads: which connection carried it
    reply: str  # what the sink answered
    tls: bool  # the transaction ran over TLS (STARTTLS or implicit)

    @property
    def original(self) -> bytes:
        """`data` without the relay's own trace field: the bytes its client sent, as the
        relay passes them on. Fails the test if the trace field (RFC 5321 4.4) is missing."""
        return without_trace(self.data)


TRACE_FIELD = re.compile(
    rb"Received: from [!-~]+ \(\[[0-9A-Fa-f.:IPv]+\]\)\r\n\tby [!-~]+ \(bccguard\) "
    rb"with E?SMTPS?A? id [!-~]+;\r\n\t[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000\r\n"
)


def without_trace(data: bytes) -> bytes:
    """`data` minus one leading bccguard `Received:` field, which must be there."""
    m = TRACE_FIELD.match(data)
    assert m is not None, f"no bccguard Received field first: {data[:200]!r}"
    assert b"@" not in m.group(0), "an address in the Received field"
    return data[m.end() :]


@dataclass
class Sink:
    """A configurable, recording aiosmtpd server. Every knob can be changed while running."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply; else 250
    mail_reply: str | None = None  # e.g. "550 5.7.1 sender rejected"; None: 250
    data_reply: str = "250 2.0.0 Ok: queued"
    data_delay: float = 0.0  # seconds before answering the end of DATA
    drop_on_data: bool = False  # hang up after the content instead of answering it
    hangup_on_mail: int = 0  # hang up (no reply) on the next N MAIL commands
    pipelining: bool = True
    smtputf8: bool = True
    eightbitmime: bool = True
    size: int | None = 33_554_432  # SIZE limit advertised; None: no SIZE
    ehlo: bool = True  # False: answer EHLO 502 (clients must fall back to HELO)
    starttls: ssl.SSLContext | None = None  # offer STARTTLS with this server context
    implicit_tls: ssl.SSLContext | None = None  # smtps: TLS from the first byte
    hostname: str = "sink.test"

    messages: list[Received] = field(default_factory=list, init=False)
    dropped: list[Received] = field(default_factory=list, init=False)  # content seen, no reply
    # Per connection, each chunk as read (after TLS decryption): shows pipelining.
    reads: list[list[bytes]] = field(default_factory=list, init=False)
    verbs: list[str] = field(default_factory=list, init=False)  # every command, in order
    port: int = field(default=0, init=False)
    host: str = field(default=HOST, init=False)
    _server: asyncio.Server | None = field(default=None, init=False, repr=False)
    _protocols: list[SMTP] = field(default_factory=list, init=False, repr=False)
    _verb_seen: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    @property
    def connections(self) -> int:
        """How many TCP connections were accepted so far."""
        return len(self.reads)

    @property
    def url(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp+starttls" if self.starttls else "smtp"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)

        def factory() -> SMTP:
            return _RecordingSMTP(
                self,
                handler,
                data_size_limit=self.size,
                enable_SMTPUTF8=self.smtputf8,
                hostname=self.hostname,
                tls_context=self.starttls,
                loop=loop,
            )

        self._server = await loop.create_server(factory, HOST, 0, ssl=self.implicit_tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.drop_connections()

    async def drop_connections(self) -> None:
        """Abort every open connection (e.g. to kill a client's pooled one)."""
        for proto in self._protocols:
            _abort(proto)
        self._protocols.clear()
        for _ in range(3):  # let connection_lost and the handler tasks run
            await asyncio.sleep(0)

    def record_verb(self, verb: str) -> None:
        self.verbs.append(verb)
        self._verb_seen.set()

    async def wait_verb(self, verb: str, count: int = 1, within: float = 5.0) -> None:
        """Wait until the sink has seen `verb` `count` times (no sleep-polling in tests)."""
        async with asyncio.timeout(within):
            while self.verbs.count(verb) < count:
                self._verb_seen.clear()
                await self._verb_seen.wait()

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _abort(server: SMTP) -> None:
    transport = server.transport
    if isinstance(transport, asyncio.Transport):
        transport.abort()


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP that counts connections and keeps every chunk it read."""

    def __init__(self, sink: Sink, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._conn_index = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and self._conn_index < 0:  # not the STARTTLS upgrade
            self._conn_index = len(self._sink.reads)
            self._sink.reads.append([])
            self._sink._protocols.append(self)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._sink.reads[self._conn_index].append(bytes(data))
        super().data_received(data)


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.sink.record_verb("EHLO")
        if not self.sink.ehlo:
            return ["502 5.5.1 EHLO not implemented"]
        session.host_name = hostname
        out = [r for r in responses if r != "250-8BITMIME" or self.sink.eightbitmime]
        if self.sink.pipelining:
            out.insert(1, "250-PIPELINING")
        return out

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.sink.record_verb("MAIL")
        if self.sink.hangup_on_mail > 0:
            self.sink.hangup_on_mail -= 1
            _abort(server)
            return "421 4.3.2 hung up"  # never reaches the client
        if self.sink.mail_reply is not None:
            return self.sink.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.sink.record_verb("RCPT")
        reply = self.sink.rcpt_replies.get(address, "250 2.1.5 Ok")
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sink.record_verb("DATA")
        if self.sink.data_delay:
            await asyncio.sleep(self.sink.data_delay)
        assert isinstance(server, _RecordingSMTP)
        assert envelope.mail_from is not None
        assert isinstance(envelope.original_content, bytes)
        assert server.transport is not None
        record = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            peer=session.peer,
            connection=server._conn_index,
            reply=self.sink.data_reply,
            tls=server.transport.get_extra_info("ssl_object") is not None,
        )
        if self.sink.drop_on_data:
            self.sink.dropped.append(record)
            _abort(server)
            return "250 2.0.0 never seen"
        self.sink.messages.append(record)
        return self.sink.data_reply

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> object:
        self.sink.record_verb("RSET")
        return MISSING

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> object:
        self.sink.record_verb("NOOP")
        return MISSING

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> object:
        self.sink.record_verb("QUIT")
        return MISSING


Conversation = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on a free loopback port that runs `conversation` per connection.

    For peers no SMTP library would play: silent, garbage, out of sequence.
    """

    def __init__(self, conversation: Conversation, *, tls: ssl.SSLContext | None = None) -> None:
        self.conversation = conversation
        self.tls = tls  # implicit TLS (smtps): the conversation starts after the handshake
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.conversation(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, HOST, 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for w in self._writers:
            w.transport.abort()
        for _ in range(3):
            await asyncio.sleep(0)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


def self_signed_cert(directory: Path, name: str = HOST) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for `name` (an IP or DNS name), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alt = x509.DNSName(name)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx
