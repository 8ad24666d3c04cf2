"""The quarantine: held messages, durable before the client hears 250.

Each entry is `<id>.eml` (the original bytes, openable in any mail reader)
and `<id>.json` (envelope, time, rule, counts, verdict). Blocking file I/O;
the relay calls it through `asyncio.to_thread` so fsync never stalls the loop.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bccguard.policy.model import Envelope, Verdict
from bccguard.store.durable import (
    check_id,
    ensure_dir,
    list_ids,
    new_id,
    read_meta,
    remove_entry,
    write_entry,
)


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
            "verdict": {k: v for k, v in asdict(verdict).items() if k != "extra"},
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
