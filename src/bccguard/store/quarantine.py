"""The quarantine: held messages, durable before the client hears 250.

Each entry is `<id>.eml` (the original bytes, openable in any mail reader)
and `<id>.json` (envelope, time, rule, counts, verdict). Blocking file I/O;
the relay calls it through `asyncio.to_thread` so fsync never stalls the loop.

What admins do to entries (release, delete, purge) is appended to
`audit.log` in the same directory, one JSON object a line, fsync'ed before
the command reports success: who (the OS user, or `$SUDO_USER` when run
through sudo), when, what, which id, and the result.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bccguard.policy.model import Envelope, Verdict
from bccguard.store.durable import (
    atomic_write,
    check_id,
    ensure_dir,
    list_ids,
    new_id,
    read_meta,
    remove_entry,
    write_entry,
)

AUDIT_LOG = "audit.log"
ORPHAN_GRACE = 3600.0  # an .eml without .json younger than this may be a write in progress


@dataclass(frozen=True)
class Entry:
    id: str
    meta: dict[str, Any]
    size: int


class Quarantine:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def open(self) -> None:
        ensure_dir(self.path)

    def put(self, message: bytes, envelope: Envelope, verdict: Verdict, *, session_id: str = "") -> str:
        entry_id = new_id()
        meta = {
            "id": entry_id,
            "time": time.time(),
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "smtputf8": envelope.smtputf8,
            "auth_user": envelope.auth_user,
            "session_id": session_id,
            "size": len(message),
            "verdict": asdict(verdict),
        }
        write_entry(self.path, entry_id, message, meta)
        return entry_id

    def ids(self) -> list[str]:
        return list_ids(self.path)

    def get(self, entry_id: str) -> Entry:
        meta = read_meta(self.path, entry_id)
        return Entry(id=entry_id, meta=meta, size=int(meta.get("size", 0)))

    def message(self, entry_id: str) -> bytes:
        return (self.path / f"{check_id(entry_id)}.eml").read_bytes()

    def envelope(self, entry_id: str) -> Envelope:
        m = read_meta(self.path, entry_id)
        return Envelope(
            mail_from=m["mail_from"],
            rcpt_tos=tuple(m["rcpt_tos"]),
            smtputf8=bool(m.get("smtputf8")),
            auth_user=m.get("auth_user"),
        )

    def delete(self, entry_id: str) -> None:
        remove_entry(self.path, entry_id)

    def depth(self) -> tuple[int, int]:
        """(messages, bytes) for the gauges."""
        ids = self.ids()
        total = 0
        for i in ids:
            p = self.path / f"{i}.eml"
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                continue
        return len(ids), total

    def narrow(self, entry_id: str, rcpt_tos: tuple[str, ...], note: str) -> None:
        """A release reached some recipients: keep the entry for the others only."""
        m = read_meta(self.path, entry_id)
        m["rcpt_tos"] = list(rcpt_tos)
        m.setdefault("history", []).append({"time": time.time(), "note": note})
        atomic_write(self.path / f"{check_id(entry_id)}.json", json.dumps(m, sort_keys=True).encode())

    def entries(self) -> list[Entry]:
        """Every readable entry, oldest first (ids sort by time)."""
        out = []
        for i in self.ids():
            try:
                out.append(self.get(i))
            except (OSError, ValueError):
                continue  # removed meanwhile, or a torn file from an old crash: purge handles it
        return out

    def purge_plan(self, older_than: float, now: float | None = None) -> list[tuple[str, str]]:
        """What `purge` would remove, as (id, what), without removing anything.

        "entry": held longer than `older_than` seconds; "orphan": an .eml whose
        .json was never written (the client got no 250 for it); "temp": a temp
        file from an interrupted write. Leftovers younger than an hour are
        kept, since they may belong to a write in progress right now.
        """
        now = time.time() if now is None else now
        plan = [
            (e.id, "entry") for e in self.entries() if now - float(e.meta.get("time", now)) > older_than
        ]
        grace = min(older_than, ORPHAN_GRACE)
        for p in sorted(self.path.glob("*.eml")):
            if not (self.path / f"{p.stem}.json").exists() and _age(p, now) > grace:
                plan.append((p.stem, "orphan"))
        plan += [(p.name, "temp") for p in sorted(self.path.glob(".*.tmp")) if _age(p, now) > ORPHAN_GRACE]
        return plan

    def purge(self, plan: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        """Remove what `purge_plan` listed, yielding each (id, what) as it goes."""
        for item, kind in plan:
            if kind == "entry":
                remove_entry(self.path, item)
            elif kind == "orphan":
                (self.path / f"{check_id(item)}.eml").unlink(missing_ok=True)
            else:
                (self.path / item).unlink(missing_ok=True)
            yield item, kind

    # ------------------------------------------------------------ audit log
    def audit(self, what: str, entry_id: str, result: str, *, who: str | None = None, **detail: Any) -> None:
        """Append one admin action to the audit log and fsync it before returning.

        `who` is the console account acting; None means the OS user running the CLI.
        """
        ensure_dir(self.path)
        now = time.time()
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "ts": round(now, 3),
            "who": who or admin_user(),
            "what": what,
            "id": entry_id,
            "result": result,
            **detail,
        }
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path / AUDIT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def audit_records(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Complete audit lines from byte `offset` on, and the offset after the last one."""
        try:
            with (self.path / AUDIT_LOG).open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], 0
        end = data.rfind(b"\n") + 1  # a line being written right now is read next time
        records = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
        return records, offset + end

    def audit_size(self) -> int:
        try:
            return (self.path / AUDIT_LOG).stat().st_size
        except FileNotFoundError:
            return 0


def _age(p: Path, now: float) -> float:
    try:
        return now - p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def admin_user() -> str:
    """Who ran the command: the sudo caller when there is one, else the OS user."""
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (containers): the uid still says who
        return f"uid:{os.getuid()}"
