"""Crash-safe files: the only way bccguard writes anything it has promised to keep.

temp file in the same directory -> write -> fsync -> rename -> fsync the
directory. After a crash a reader sees either the old state or the whole new
file, never a torn one; the directory fsync makes the rename itself durable
(ext4/xfs may otherwise lose it). Files are 0600, directories 0700: held mail
is customer data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

ID_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")
JOURNAL = ".done"  # an entry's append-only journal, next to its .json (see spool.py)


def new_id() -> str:
    """Sortable by time, unguessable, and safe as a file name."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(6)


def check_id(entry_id: str) -> str:
    """Refuse anything that could name a path outside the store (`../x`, `/etc/passwd`)."""
    if not ID_RE.fullmatch(entry_id) or ".." in entry_id:
        raise ValueError(f"not a valid id: {entry_id!r}")
    return entry_id


def ensure_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):  # a failing disk may refuse this too
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(tmp)  # os.write/fsync name no file: the log must
        raise
    os.close(fd)
    tmp.replace(path)
    if sync_dir:
        fsync_dir(path.parent)


def append_record(path: Path, record: bytes) -> None:
    """Append one newline-terminated record to `path`; durable once this returns.

    O_APPEND + fsync: one small write, whatever the file's size. The file is
    created by its first record, and only then is the directory fsync'ed, so
    the file itself survives a crash. A record an earlier crash tore (no
    final newline) is cut off first: glued to this one it would read as a
    different, complete record ("12" + "7\n" -> "127\n").
    """
    if not record.endswith(b"\n") or b"\n" in record[:-1]:
        raise ValueError("a record is one line, newline-terminated")
    created = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        created = False
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        if not created:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.ftruncate(fd, os.pread(fd, size, 0).rfind(b"\n") + 1)
        view = memoryview(record)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def read_records(path: Path) -> list[bytes]:
    """The complete records of an append-only file: a torn last one (no newline) is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].splitlines()


def write_entry(directory: Path, entry_id: str, message: bytes, meta: dict[str, Any]) -> None:
    """Message first, metadata last: an entry exists once its .json does.

    A crash between the two leaves an orphan .eml that no listing shows and
    `purge` removes; the client got no 250 for it, so it retries.
    """
    ensure_dir(directory)
    atomic_write(directory / f"{entry_id}.eml", message, sync_dir=False)
    atomic_write(directory / f"{entry_id}.json", json.dumps(meta, sort_keys=True).encode())


def read_meta(directory: Path, entry_id: str) -> dict[str, Any]:
    return dict(json.loads((directory / f"{check_id(entry_id)}.json").read_bytes()))


def remove_entry(directory: Path, entry_id: str) -> None:
    """Metadata first, so a crash mid-way leaves an orphan, not a half entry.

    The journal goes last: an entry whose journal vanished before its
    metadata would send again every copy the journal recorded.
    """
    check_id(entry_id)
    (directory / f"{entry_id}.json").unlink(missing_ok=True)
    (directory / f"{entry_id}.eml").unlink(missing_ok=True)
    (directory / f"{entry_id}{JOURNAL}").unlink(missing_ok=True)
    fsync_dir(directory)


def list_ids(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json") if ID_RE.fullmatch(p.stem))
