"""Message content -> SMTP DATA bytes, and envelope address checks.

Pure functions, no I/O. They exist as a module of their own because the
encoding is the SMTP-smuggling defence: whatever bytes our client hands us,
the upstream must see exactly one message ending at our own CRLF.CRLF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CRLF = b"\r\n"
_END_AFTER_CRLF = b".\r\n"
_END = b"\r\n.\r\n"

# C0 controls and DEL have no place in an envelope address; CR or LF in one
# would let a client inject SMTP commands (or headers, for Maildir).
_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Encoded:
    """DATA payload as chunks to write in order (no concatenation: no extra copy).

    `size` is the RFC 1870 message size: octets after CRLF normalisation,
    before dot-stuffing and without the terminator.
    """

    chunks: tuple[bytes, ...]
    size: int


def normalize_newlines(data: bytes) -> bytes:
    """Turn every bare LF and bare CR into CRLF; CRLF stays as it is.

    bytes.replace chains run in C at about 1 GB/s, where an equivalent
    regex is ten times slower; the common cases (all CRLF, or LF only) cost
    one scan and at most one copy.
    """
    n_cr = data.count(b"\r")
    if n_cr == 0:
        return data.replace(b"\n", CRLF) if b"\n" in data else data
    n_crlf = data.count(CRLF)
    if n_cr == n_crlf == data.count(b"\n"):
        return data
    # Peak: the caller's buffer plus two transient copies.
    flat = data.replace(CRLF, b"\n")
    flat = flat.replace(b"\r", b"\n")
    return flat.replace(b"\n", CRLF)


def encode_data(message: bytes) -> Encoded:
    """RFC 5321 4.5.2 transparency plus newline normalisation.

    After this, the only CRLF "." CRLF the upstream sees is our terminator,
    so no byte sequence in `message` can end DATA early (SMTP smuggling).
    """
    body = normalize_newlines(message)
    size = len(body)
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    del body
    chunks: list[bytes] = []
    if stuffed.startswith(b"."):
        chunks.append(b".")  # the first line's stuffing dot, without copying the body
    if stuffed:
        chunks.append(stuffed)
    chunks.append(_END_AFTER_CRLF if not stuffed or stuffed.endswith(CRLF) else _END)
    return Encoded(chunks=tuple(chunks), size=size)


def address_ok(address: str) -> bool:
    """False for addresses that must never reach an SMTP command line or a header."""
    return _BAD_ADDRESS.search(address) is None


def needs_smtputf8(*addresses: str) -> bool:
    """True when an envelope address is not ASCII (RFC 6531 requires SMTPUTF8)."""
    return not all(a.isascii() for a in addresses)
