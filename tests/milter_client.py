"""A minimal MTA side of the milter protocol, for tests that need to misbehave as Postfix never would.

The well-behaved MTA is the real Postfix (tests/test_milter_postfix.py); this
one sends exactly the bytes a test asks for, including broken ones.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

from bccguard.milter import codec

ALL_ACTIONS = 0x1FF
ALL_PROTOCOL = 0x1FFFFF


@dataclass
class MtaClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: int = 0
    actions: int = 0
    replies: list[tuple[bytes, bytes]] = field(default_factory=list)
    macro_lists: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    async def connect(cls, address: str) -> MtaClient:
        kind, _, rest = address.partition(":")
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(rest)
        else:
            host, _, port = rest.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, command: bytes, data: bytes = b"") -> None:
        await self.send_raw(codec.encode(command, data))

    async def read(self, timeout: float = 10.0) -> tuple[bytes, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        (size,) = struct.unpack(">I", head)
        body = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        return body[:1], body[1:]

    async def closed(self, timeout: float = 10.0) -> bool:
        """True when the filter closed the connection (EOF) without sending anything more."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except ConnectionError:
            data = b""
        finally:
            self.writer.close()
        return data == b""

    async def negotiate(self, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> None:
        await self.send(codec.OPTNEG, struct.pack(">III", 6, actions, protocol))
        cmd, data = await self.read()
        assert cmd == codec.OPTNEG
        _, self.actions, self.protocol = struct.unpack(">III", data[:12])
        rest = data[12:]
        while len(rest) >= 5:  # SMFIF_SETSYMLIST: stage, NUL-terminated macro names
            (stage,) = struct.unpack(">I", rest[:4])
            names, _, rest = rest[4:].partition(b"\0")
            self.macro_lists[stage] = names

    def _expects_reply(self, command: bytes) -> bool:
        flag = codec.NO_REPLY_FLAG.get(command, 0)
        return not (self.protocol & flag)

    async def event(self, command: bytes, data: bytes = b"") -> None:
        """Send an event; read (and check) the CONTINUE it is owed unless NR was negotiated."""
        await self.send(command, data)
        if self._expects_reply(command):
            reply = await self.read()
            assert reply[0] == codec.CONTINUE, reply

    async def envelope(
        self, mail_from: str, rcpts: list[str], *, macros: dict[str, str] | None = None
    ) -> None:
        await self.send(codec.MACRO, b"C" + b"j\0mx.test\0_\0client.test [192.0.2.7]\0")
        await self.event(codec.CONNECT, b"client.test\0" + b"4" + struct.pack(">H", 4321) + b"192.0.2.7\0")
        if macros:
            pairs = b"".join(f"{{{k}}}".encode() + b"\0" + v.encode() + b"\0" for k, v in macros.items())
            await self.send(codec.MACRO, b"M" + pairs)
        await self.event(codec.MAIL, f"<{mail_from}>".encode() + b"\0")
        for r in rcpts:
            await self.event(codec.RCPT, f"<{r}>".encode() + b"\0")

    async def message(self, raw: bytes) -> list[tuple[bytes, bytes]]:
        """Headers, body, end of message; every packet of the final answer, the last one deciding."""
        head, _, body = raw.partition(b"\r\n\r\n")
        leadspc = self.protocol & codec.SMFIP_HDR_LEADSPC
        for line in head.replace(b"\r\n ", b"\n ").replace(b"\r\n\t", b"\n\t").split(b"\r\n"):
            name, _, value = line.partition(b":")
            if not leadspc:
                value = value.lstrip(b" ")
            await self.event(codec.HEADER, name + b"\0" + value + b"\0")
        await self.event(codec.EOH)
        if body:
            await self.event(codec.BODY, body)
        await self.send(codec.BODYEOB)
        out = []
        while True:
            cmd, data = await self.read()
            out.append((cmd, data))
            if cmd in (
                codec.CONTINUE,
                codec.ACCEPT,
                codec.DISCARD,
                codec.REJECT,
                codec.TEMPFAIL,
                codec.REPLYCODE,
            ):
                return out

    def close(self) -> None:
        self.writer.close()
