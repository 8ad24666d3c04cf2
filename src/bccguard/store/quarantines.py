"""Several quarantine directories seen as one: what the console reviews.

Why: one relay per quarantine directory (ops/instance.py refuses a second),
so relays on a shared volume each write their own directory under it
(`/var/lib/bccguard/quarantine/relay-a`, `.../relay-b`), and one console
must still see every relay's held mail. `[console] quarantine_paths` lists
directories or globs; a glob is expanded again on every call, so a relay
started later shows up without restarting the console.

Entries stay in the directory that holds them: the console finds an entry's
directory here and runs every action (and its audit line) against that one
`Quarantine`. Ids are unique (time plus 48 random bits), so an id found in
two directories is a copy made by hand: refused rather than guessed.
Blocking file I/O, like Quarantine.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from bccguard.store.durable import check_id
from bccguard.store.quarantine import Entry, Quarantine


class AmbiguousEntry(ValueError):
    """One id held in two directories: no action may pick one of them silently."""

    def __init__(self, entry_id: str, paths: list[Path]) -> None:
        where = " and ".join(str(p) for p in paths)
        super().__init__(
            f"entry {entry_id} is held in {len(paths)} quarantine directories ({where}) "
            f"(fix: keep one copy: bccguard quarantine delete {entry_id} --config <the other relay's config>)"
        )
        self.entry_id = entry_id
        self.paths = paths


class Quarantines:
    """The quarantine directories named by `patterns` (paths or globs), as they are right now."""

    def __init__(self, patterns: Sequence[str], default: str) -> None:
        self.patterns = tuple(patterns) or (default,)
        self.default = default

    def dirs(self) -> list[Quarantine]:
        """Each directory once, in pattern order; a glob's matches sorted, files among them skipped."""
        out: list[Quarantine] = []
        seen: set[Path] = set()
        for pattern in self.patterns:
            if glob.has_magic(pattern):
                found = sorted(glob.glob(pattern))  # noqa: PTH207 - Path.glob refuses absolute patterns
                paths = [Path(p) for p in found if Path(p).is_dir()]
            else:
                paths = [Path(pattern)]  # named outright: shown even before the relay creates it
            for p in paths:
                key = p.resolve()
                if key not in seen:
                    seen.add(key)
                    out.append(Quarantine(p))
        return out

    def home(self) -> Quarantine:
        """Where an action tied to no entry (a refused purge) is audited: the first directory."""
        dirs = self.dirs()
        return dirs[0] if dirs else Quarantine(self.default)

    def entries(self) -> list[tuple[Quarantine, Entry]]:
        """Every readable entry of every directory, each with the directory that holds it."""
        return [(q, e) for q in self.dirs() for e in q.entries()]

    def find(self, entry_id: str) -> Quarantine | None:
        """The directory holding `entry_id`; None if none; AmbiguousEntry if more than one.

        ValueError (from check_id) for anything that is not an id, so a path
        such as `../x` never reaches the file system.
        """
        check_id(entry_id)
        holders = [q for q in self.dirs() if (q.path / f"{entry_id}.json").is_file()]
        if len(holders) > 1:
            raise AmbiguousEntry(entry_id, [q.path for q in holders])
        return holders[0] if holders else None

    def get(self, entry_id: str) -> tuple[Quarantine, Entry] | None:
        """The entry and its directory, or None when no directory holds it (readably)."""
        q = self.find(entry_id)
        if q is None:
            return None
        try:
            return q, q.get(entry_id)
        except (OSError, ValueError):
            return None
