"""The spool: copies bccguard has answered 250 for but the upstream has not yet taken.

One entry is one message as received (`<id>.eml`) plus its pending copies
(`<id>.json`). A copy is one upstream transaction: its envelope recipients,
how to render it (as is, or a split copy: see policy/split.py), and its own
retry state. Kinds:

- "retry":  recipients the upstream refused with 4xx after accepting others;
- "split":  the copies of a split message, delivered one by one, in order;
- "dsn":    a delivery report to a sender (from the null sender);
- "notice": a sender notice (from the null sender).

Entries are durable (see durable.py) before the client hears 250. Each
copy carries `n`, its index in the entry's original copy list, and after
each copy the upstream accepts one line naming it ("17\n") is appended to
the entry's journal `<id>.done` and fsync'ed (or the entry is removed when
nothing is left). So the only way a copy goes out twice is the relay dying
between the upstream's 250 and that one small write: at most one copy per
crash, and a 1,000-copy split writes ~4 KB of journal, not ~100 MB of JSON
(bench/bench_spool.py).

Reading an entry: the copies in `<id>.json` minus those its journal names.
A torn last line (a crash mid-append) names nothing, so that copy is sent
again: the same one-write window. When the JSON must change anyway
(retry state, failures, a copy partly accepted), it is rewritten without
the delivered copies first, atomically, and the journal removed after: a
crash between leaves lines naming copies the JSON no longer has, which
match nothing. A copy written without `n` gets a fresh one (`next_n` only
grows, so never a number a stale line names), and a copy marked failed was
never delivered, so no line applies to it (its retried remainder keeps the
same `n`). Entries written before the journal (no `n`) are numbered by
position, which holds until the first rewrite records the numbers.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bccguard.policy.split import CopySpec
from bccguard.store.durable import (
    JOURNAL,
    append_record,
    atomic_write,
    check_id,
    ensure_dir,
    list_ids,
    new_id,
    read_meta,
    read_records,
    remove_entry,
    write_entry,
)

DEFAULT_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0)  # then every hour, like an MTA
DEFAULT_MAX_AGE = 5 * 24 * 3600.0
KINDS = ("retry", "split", "dsn", "notice")
_RECORD_RE = re.compile(rb"[0-9]{1,9}")


@dataclass(frozen=True)
class Copy:
    """One pending upstream transaction of an entry."""

    rcpts: tuple[str, ...]
    to: str | None = None  # split copies: the personalised To; None: shared/as-is
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    # Given up ("5.1.1 550 5.1.1 User unknown": status, then the diagnostic):
    # kept until the DSN that reports it is spooled, then dropped.
    failed: str = ""
    # What the journal names this copy by: its index in the entry's original
    # list (a retried remainder keeps it). None: not yet written to an entry.
    n: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "rcpts": list(self.rcpts),
            "to": self.to,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "failed": self.failed,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Copy:
        to = d.get("to")
        n = d.get("n")
        return cls(
            n=int(n) if n is not None else None,
            rcpts=tuple(str(r) for r in d["rcpts"]),
            to=str(to) if to is not None else None,
            attempts=int(d.get("attempts", 0)),
            next_attempt=float(d.get("next_attempt", 0.0)),
            last_error=str(d.get("last_error", "")),
            failed=str(d.get("failed", "")),
        )


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    mail_from: str
    created: float
    kind: str  # one of KINDS
    smtputf8: bool
    origin: str  # session id or quarantine id, for the logs
    copies: tuple[Copy, ...]
    render: dict[str, Any] | None  # policy.split render spec; None: copies go as is

    @property
    def rcpt_tos(self) -> tuple[str, ...]:
        """Every recipient still pending, in copy order."""
        return tuple(r for c in self.copies for r in c.rcpts)

    @property
    def next_attempt(self) -> float:
        """When the runner should look again; now, if a failure still awaits its DSN."""
        return min((0.0 if c.failed else c.next_attempt for c in self.copies), default=0.0)

    @property
    def attempts(self) -> int:
        return max((c.attempts for c in self.copies), default=0)

    @property
    def last_error(self) -> str:
        return next((c.last_error for c in reversed(self.copies) if c.last_error), "")


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

    # ------------------------------------------------------------ writing
    def _put(
        self,
        message: bytes,
        *,
        kind: str,
        mail_from: str,
        copies: Sequence[Copy],
        smtputf8: bool,
        origin: str,
        render: dict[str, Any] | None,
    ) -> str:
        entry_id = new_id()
        copies = [replace(c, n=i) for i, c in enumerate(copies)]
        meta = {
            "id": entry_id,
            "version": 2,
            "next_n": len(copies),
            "kind": kind,
            "mail_from": mail_from,
            "created": time.time(),
            "smtputf8": smtputf8,
            "origin": origin,
            "render": render,
            "copies": [c.to_json() for c in copies],
        }
        write_entry(self.path, entry_id, message, meta)
        return entry_id

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
        """One copy of `message` as it is, for `rcpt_tos`; first attempt after `delay`."""
        copy = Copy(rcpts=tuple(rcpt_tos), next_attempt=time.time() + delay, last_error=last_error)
        return self._put(
            message, kind=kind, mail_from=mail_from, copies=[copy], smtputf8=smtputf8,
            origin=origin, render=None,
        )  # fmt: skip

    def put_split(
        self,
        message: bytes,
        mail_from: str,
        copies: Sequence[CopySpec],
        render: dict[str, Any],
        *,
        smtputf8: bool = False,
        origin: str = "",
    ) -> str:
        """The original once, plus every split copy pending and due now."""
        now = time.time()
        pending = [Copy(rcpts=c.rcpts, to=c.to, next_attempt=now) for c in copies]
        return self._put(
            message, kind="split", mail_from=mail_from, copies=pending, smtputf8=smtputf8,
            origin=origin, render=render,
        )  # fmt: skip

    def update(self, entry_id: str, copies: Sequence[Copy]) -> list[Copy]:
        """Rewrite what is still pending (one atomic write), or remove the entry when nothing is.

        `copies` must not include delivered ones. The JSON goes first, then
        the journal: its lines name copies no longer listed. A copy without
        `n` gets a new one. Returns the copies as written.
        """
        if not copies:
            self.done(entry_id)
            return []
        m = read_meta(self.path, entry_id)
        on_disk = m.get("copies")
        next_n = int(m.get("next_n", len(on_disk) if isinstance(on_disk, list) else 1))
        written = []
        for c in copies:
            written.append(c if c.n is not None else replace(c, n=next_n))
            next_n += c.n is None
        m.pop("rcpt_tos", None)  # a version-1 entry becomes version 2 on its first update
        m.update(version=2, next_n=next_n, copies=[c.to_json() for c in written])
        atomic_write(self.path / f"{entry_id}.json", json.dumps(m, sort_keys=True).encode())
        (self.path / f"{entry_id}{JOURNAL}").unlink(missing_ok=True)
        return written

    def delivered(self, entry_id: str, copy: Copy) -> None:
        """The upstream took `copy`: one line appended to the journal and fsync'ed."""
        if copy.n is None:
            raise ValueError("a copy not read from the spool has no journal number")
        append_record(self.path / f"{check_id(entry_id)}{JOURNAL}", b"%d\n" % copy.n)

    def _journal(self, entry_id: str) -> set[int]:
        """The copies the journal names; a torn or garbled line names none."""
        done = read_records(self.path / f"{entry_id}{JOURNAL}")
        return {int(r) for r in done if _RECORD_RE.fullmatch(r)}

    def done(self, entry_id: str) -> None:
        remove_entry(self.path, entry_id)

    # ------------------------------------------------------------ reading
    def entries(self) -> list[SpoolEntry]:
        out = []
        for i in list_ids(self.path):
            try:
                out.append(self.entry(i))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # vanished meanwhile, or unreadable: never stop the others
        return out

    def entry(self, entry_id: str) -> SpoolEntry:
        m = read_meta(self.path, entry_id)
        if "copies" in m:
            listed = [Copy.from_json(c) for c in m["copies"]]
        else:  # version 1 (before split): one copy, its state at the top level
            listed = [
                Copy(
                    rcpts=tuple(m["rcpt_tos"]),
                    attempts=int(m.get("attempts", 0)),
                    next_attempt=float(m.get("next_attempt", 0.0)),
                    last_error=str(m.get("last_error", "")),
                )
            ]
        # Before the journal: numbered by position until the first rewrite records it.
        listed = [c if c.n is not None else replace(c, n=i) for i, c in enumerate(listed)]
        done = self._journal(entry_id)
        copies = tuple(c for c in listed if c.failed or c.n not in done)
        render = m.get("render")
        return SpoolEntry(
            id=entry_id,
            mail_from=str(m["mail_from"]),
            created=float(m["created"]),
            kind=str(m.get("kind", "retry")),
            smtputf8=bool(m.get("smtputf8")),
            origin=str(m.get("origin", "")),
            copies=copies,
            render=dict(render) if isinstance(render, dict) else None,
        )

    def message(self, entry_id: str) -> bytes:
        return (self.path / f"{check_id(entry_id)}.eml").read_bytes()

    # ------------------------------------------------------------ retry policy
    def deferred(self, copy: Copy, error: str, now: float | None = None) -> Copy:
        """`copy` after one more failed attempt: next try per `retry_schedule` (last step repeats)."""
        attempts = copy.attempts + 1
        step = self.schedule[min(attempts - 1, len(self.schedule) - 1)] if self.schedule else 3600.0
        return replace(
            copy, attempts=attempts, next_attempt=(now or time.time()) + step, last_error=error[:300]
        )

    def expired(self, entry: SpoolEntry, now: float | None = None) -> bool:
        return (now or time.time()) - entry.created > self.max_age

    def depth(self) -> int:
        return len(list_ids(self.path))


def runner_lock(path: Path) -> int | None:
    """Become the one process delivering the spool at `path`: an flock fd, or None if taken.

    Two runners on one spool would both deliver the same copy; with several
    relay processes sharing a spool directory, only the holder of this lock
    runs, and a survivor takes over when it dies (the kernel drops the lock).
    """
    fd = os.open(path / ".runner.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
