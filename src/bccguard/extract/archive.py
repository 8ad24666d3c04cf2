"""ZIP members read under the budget: declared sizes are never trusted.

A zip bomb declares small sizes or none; each member is inflated in 64 KiB
steps and charged to the message's decompression budget, so the first step
past the limit stops it whatever the headers claim.
"""

from __future__ import annotations

import io
import zipfile
import zlib

from bccguard.extract.limits import Budget, LimitReached

CHUNK = 64 * 1024
# What a corrupt archive raises from zipfile and zlib (RuntimeError: an encrypted member).
_BROKEN = (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, NotImplementedError, RuntimeError)


class Unreadable(Exception):
    """Encrypted or malformed: the content cannot be read."""


def open_zip(data: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise Unreadable(str(exc)) from None


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget, cap: int | None = None) -> bytes:
    """The member's bytes, inflated under the budget (and at most `cap` bytes if given)."""
    if info.flag_bits & 0x1:
        raise Unreadable("encrypted member")
    out = bytearray()
    try:
        with zf.open(info) as f:
            while chunk := f.read(CHUNK):
                budget.inflate(len(chunk))
                out += chunk
                if cap is not None and len(out) > cap:
                    raise LimitReached("decompressed")
    except LimitReached:
        raise
    except _BROKEN as exc:
        raise Unreadable(str(exc)) from None
    return bytes(out)


def inflate_all(data: bytes, budget: Budget) -> None:
    """Inflate every member once, charging the budget: a bomb inside an XLSX stops here."""
    zf = open_zip(data)
    for info in zf.infolist():
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise Unreadable("encrypted member")
        try:
            with zf.open(info) as f:
                while chunk := f.read(CHUNK):
                    budget.inflate(len(chunk))
        except LimitReached:
            raise
        except _BROKEN as exc:
            raise Unreadable(str(exc)) from None
