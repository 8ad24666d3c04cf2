"""The spool: copies bccguard has answered 250 for but the upstream has not yet taken.

Entries are durable (see durable.py) before the client hears 250, retried
with backoff while the relay runs, retried at once when it restarts, and
turned into a DSN to the sender when they expire. The window in which a copy
can be sent twice is exactly one write: the upstream said 250, and the relay
died before `done()` unlinked the entry.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

DEFAULT_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0)  # then every hour, like an MTA
DEFAULT_MAX_AGE = 5 * 24 * 3600.0


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    created: float
    attempts: int
    next_attempt: float
    kind: str  # "retry" | "dsn" | "split" | "notice"
    smtputf8: bool
    origin: str  # session id or quarantine id, for the logs
    last_error: str


class Spool:
    def __init__(
        self,
        path: str | Path,
        *,
        schedule: tuple[float, ...] = DEFAULT_SCHEDULE,
        max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        self.path = Path(path)
        self.schedule = schedule
        self.max_age = max_age

    def open(self) -> None:
        ensure_dir(self.path)

    def put(
        self,
        message: bytes,
        mail_from: str,
        rcpt_tos: tuple[str, ...],
        *,
        kind: str = "retry",
        smtputf8: bool = False,
        origin: str = "",
        last_error: str = "",
        delay: float = 0.0,
    ) -> str:
        entry_id = new_id()
        now = time.time()
        meta = {
            "id": entry_id,
            "mail_from": mail_from,
            "rcpt_tos": list(rcpt_tos),
            "created": now,
            "attempts": 0,
            "next_attempt": now + delay,
            "kind": kind,
            "smtputf8": smtputf8,
            "origin": origin,
            "last_error": last_error,
        }
        write_entry(self.path, entry_id, message, meta)
        return entry_id

    def entries(self) -> list[SpoolEntry]:
        out = []
        for i in list_ids(self.path):
            try:
                out.append(self.entry(i))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def entry(self, entry_id: str) -> SpoolEntry:
        m = read_meta(self.path, entry_id)
        return SpoolEntry(
            id=entry_id,
            mail_from=m["mail_from"],
            rcpt_tos=tuple(m["rcpt_tos"]),
            created=float(m["created"]),
            attempts=int(m["attempts"]),
            next_attempt=float(m["next_attempt"]),
            kind=str(m.get("kind", "retry")),
            smtputf8=bool(m.get("smtputf8")),
            origin=str(m.get("origin", "")),
            last_error=str(m.get("last_error", "")),
        )

    def message(self, entry_id: str) -> bytes:
        return (self.path / f"{check_id(entry_id)}.eml").read_bytes()

    def done(self, entry_id: str) -> None:
        remove_entry(self.path, entry_id)

    def narrow(self, entry_id: str, rcpt_tos: tuple[str, ...], error: str) -> None:
        """Some recipients were taken or failed for good: keep retrying only the rest."""
        m = read_meta(self.path, entry_id)
        m["rcpt_tos"] = list(rcpt_tos)
        m["last_error"] = error
        atomic_write(self.path / f"{entry_id}.json", json.dumps(m, sort_keys=True).encode())

    def reschedule(self, entry_id: str, error: str) -> SpoolEntry:
        m: dict[str, Any] = read_meta(self.path, entry_id)
        attempts = int(m["attempts"]) + 1
        step = self.schedule[min(attempts - 1, len(self.schedule) - 1)] if self.schedule else 3600.0
        m["attempts"] = attempts
        m["next_attempt"] = time.time() + step
        m["last_error"] = error
        atomic_write(self.path / f"{entry_id}.json", json.dumps(m, sort_keys=True).encode())
        return self.entry(entry_id)

    def expired(self, entry: SpoolEntry, now: float | None = None) -> bool:
        return (now or time.time()) - entry.created > self.max_age

    def depth(self) -> int:
        return len(list_ids(self.path))
