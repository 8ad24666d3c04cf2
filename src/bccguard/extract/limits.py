"""What one message's scan may cost, and the budget that enforces it.

Every reader asks the budget before it reads more: text scanned, bytes
decompressed (zip members, XLSX/DOCX/ODS parts), archive depth, archive
members, PDF pages, and wall time. Past a limit the scan stops that part (or,
for time, the whole message) and records the limit's name; [dlp] over_limit
decides what that means for the message. The numbers protect the relay, not
the policy: a 25 MB message of text is scanned whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    scan_bytes: int = 32 * 1024 * 1024  # text handed to the detectors, per message
    decompressed: int = 64 * 1024 * 1024  # bytes inflated from archives and documents, per message
    depth: int = 3  # nesting: zip in zip in message/rfc822 ...
    members: int = 500  # archive members read, per message
    pages: int = 300  # PDF pages read, per message
    seconds: float = 20.0  # wall time per message
    memory: int = 1024 * 1024 * 1024  # address space of a scanner process (RLIMIT_AS)


class LimitReached(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Budget:
    """The running totals for one message; `charge_*` raise LimitReached when one runs out."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.scanned = 0
        self.inflated = 0
        self.members = 0
        self.pages = 0
        self.reached: list[str] = []

    def note(self, kind: str) -> None:
        if kind not in self.reached:
            self.reached.append(kind)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitReached("time")

    def scan(self, n: int) -> int:
        """How much of `n` more text may be scanned (the rest is cut and noted)."""
        room = max(0, self.limits.scan_bytes - self.scanned)
        if n > room:
            self.note("bytes")
        take = min(n, room)
        self.scanned += take
        return take

    def inflate(self, n: int) -> None:
        self.inflated += n
        if self.inflated > self.limits.decompressed:
            raise LimitReached("decompressed")
        self.tick()

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.members:
            raise LimitReached("members")

    def page(self) -> None:
        self.pages += 1
        if self.pages > self.limits.pages:
            raise LimitReached("pages")
        self.tick()
