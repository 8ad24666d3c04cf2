"""The milter wire protocol (version 6), filter side: packets in, packets out. No I/O.

Written here rather than taken from `kilter.protocol` (MPL-2.0): that library
is a fixed-size-buffer parser plus a state machine whose policy on unknown
commands (raise after consuming) and packet size (left to the caller) we
would have to wrap anyway, and its session layer `kilter.service` runs on
anyio beside our asyncio/uvloop server; the part bccguard needs is about a
dozen commands, described in Sendmail's libmilter documentation
(`include/libmilter/mfdef.h`) and followed by Postfix's `milter8.c`.

A packet is a 4-byte big-endian length (command byte included), one command
byte, then its data. Strings are NUL-terminated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

VERSION = 6

# MTA -> filter commands (SMFIC_*)
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"
KNOWN_COMMANDS = frozenset(
    (ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO, QUIT_NC, HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA)
) | {UNKNOWN}

# filter -> MTA replies (SMFIR_*)
ADDHEADER = b"h"
INSHEADER = b"i"
CHGHEADER = b"m"
QUARANTINE = b"q"
ACCEPT = b"a"
CONTINUE = b"c"
DISCARD = b"d"
REJECT = b"r"
TEMPFAIL = b"t"
REPLYCODE = b"y"
PROGRESS = b"p"

# Action flags (SMFIF_*): what the filter may do at end of message.
SMFIF_ADDHDRS = 0x01
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_SETSYMLIST = 0x100

# Macro stages for SMFIF_SETSYMLIST (SMFIM_*): which macros the MTA sends with which event.
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

# Protocol flags (SMFIP_*): events the MTA should not send (NO*), events it
# should not wait for a reply to (NR_*), and header values with their
# leading space (HDR_LEADSPC: needed to rebuild the header block byte for byte).
SMFIP_NOHELO = 0x02
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_NR_HDR = 0x80
SMFIP_HDR_LEADSPC = 0x100000

# Which protocol flag spares a reply to which command.
NO_REPLY_FLAG = {
    CONNECT: SMFIP_NR_CONN,
    HELO: SMFIP_NR_HELO,
    MAIL: SMFIP_NR_MAIL,
    RCPT: SMFIP_NR_RCPT,
    DATA: SMFIP_NR_DATA,
    UNKNOWN: SMFIP_NR_UNKN,
    HEADER: SMFIP_NR_HDR,
    EOH: SMFIP_NR_EOH,
    BODY: SMFIP_NR_BODY,
}
# Commands that never get a reply, whatever was negotiated.
SILENT = frozenset((MACRO, ABORT, QUIT, QUIT_NC))

_LEN = struct.Struct(">I")


class MilterProtocolError(ValueError):
    """The peer broke the protocol: the session ends (the MTA applies its default action)."""


def encode(command: bytes, data: bytes = b"") -> bytes:
    return _LEN.pack(len(data) + 1) + command + data


@dataclass
class Decoder:
    """Incremental packet splitter with a size limit (a hostile length must not make us buffer)."""

    max_size: int
    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Every complete (command, data) in what arrived so far; raises MilterProtocolError."""
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size == 0:
                raise MilterProtocolError("empty packet")
            if size > self.max_size:
                raise MilterProtocolError(f"packet of {size} bytes over the {self.max_size}-byte limit")
            if len(buf) - pos - 4 < size:
                break
            start = pos + 4
            out.append((bytes(buf[start : start + 1]), bytes(buf[start + 1 : start + size])))
            pos = start + size
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings; a missing final NUL is a protocol error."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError("string not NUL-terminated")
    return data[:-1].split(b"\0")


@dataclass(frozen=True)
class Negotiate:
    version: int
    actions: int
    protocol: int


def parse_optneg(data: bytes) -> Negotiate:
    if len(data) < 12:
        raise MilterProtocolError("short option negotiation")
    version, actions, protocol = struct.unpack_from(">III", data)
    return Negotiate(version, actions, protocol)


def encode_optneg(actions: int, protocol: int, macros: dict[int, str] | None = None) -> bytes:
    """The filter's OPTNEG; `macros` (with SMFIF_SETSYMLIST): stage -> space-separated names."""
    data = struct.pack(">III", VERSION, actions, protocol)
    for stage, names in (macros or {}).items():
        data += struct.pack(">I", stage) + names.encode("ascii") + b"\0"
    return encode(OPTNEG, data)


def parse_macros(data: bytes) -> tuple[bytes, dict[str, str]]:
    """(the command these macros are for, {name: value}); names lose their braces."""
    if not data:
        raise MilterProtocolError("empty macro packet")
    cmd, rest = data[:1], data[1:]
    if not rest:
        return cmd, {}
    items = strings(rest)
    macros = {}
    for i in range(0, len(items) - 1, 2):
        name = items[i].decode("utf-8", "replace").strip("{}")
        macros[name] = items[i + 1].decode("utf-8", "surrogateescape")
    return cmd, macros


def parse_connect(data: bytes) -> tuple[str, str]:
    """(client host name, client address or "")."""
    host, nul, rest = data.partition(b"\0")
    if not nul or not rest:
        raise MilterProtocolError("malformed connect")
    family = rest[:1]
    address = ""
    if family in (b"4", b"6") and len(rest) >= 4:
        address = strings(rest[3:])[0].decode("ascii", "replace")
    elif family == b"L" and len(rest) >= 4:
        address = ""  # a unix socket path says nothing about the client
    return host.decode("utf-8", "replace"), address


def parse_address_args(data: bytes) -> tuple[str, list[str]]:
    """MAIL/RCPT: the address without its angle brackets, and the ESMTP parameters."""
    items = strings(data)
    if not items or not items[0]:
        raise MilterProtocolError("no address")
    addr = items[0].decode("utf-8", "surrogateescape").strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return addr, [i.decode("utf-8", "surrogateescape") for i in items[1:]]


def parse_header(data: bytes) -> tuple[bytes, bytes]:
    items = strings(data)
    if len(items) != 2 or not items[0]:
        raise MilterProtocolError("malformed header")
    return items[0], items[1]


def header_packet(command: bytes, name: str, value: bytes, index: int | None = None) -> bytes:
    """ADDHEADER (no index), CHGHEADER/INSHEADER (with one)."""
    body = name.encode("ascii", "surrogateescape") + b"\0" + value + b"\0"
    if index is not None:
        body = _LEN.pack(index) + body
    return encode(command, body)


def reply_packet(line: str) -> bytes:
    """SMFIR_REPLYCODE: "550 5.7.1 text" (one line; the MTA checks the code's class)."""
    return encode(REPLYCODE, line.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\0")


__all__ = ["Decoder", "MilterProtocolError", "Negotiate", "encode"]
