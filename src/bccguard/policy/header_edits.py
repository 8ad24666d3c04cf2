"""Original header block -> the edits that turn it into the block the relay would forward. Pure.

Why: as a milter, bccguard cannot hand the MTA a new message; it can only ask
for header changes, deletions and insertions (SMFIR_CHGHEADER, SMFIR_ADDHEADER,
SMFIR_INSHEADER). Computing them as the difference between the original block
and `evaluate(...).message` (the relay's own output) means the milter forwards
exactly what the SMTP relay would, and every later change to the rewrite
(Bcc removal, new stamps) reaches the milter with no code of its own.

Edit semantics, the milter's own:
- `change` / `delete`: the `index`-th field (1-based) called `name`
  (case-insensitive) in the ORIGINAL block, a change written with `name`
  as spelled in the edit; all of them are applied before
  any insertion, so one never shifts another's index;
- `insert`: then, in ascending `index` order, a new field placed at that
  0-based position of the resulting block (its final position);
- `add`: appended at the end of the block, in order.

`apply_edits` implements these semantics over field lists; the tests prove
`apply_edits(original, header_edits(original, rewritten)) == rewritten`.
Only fields count: bytes that are not fields (an mbox `From ` line, garbage
lines) are not visible to a milter and are left out of both sides.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from bccguard.policy.headers import parse_header

EditKind = Literal["change", "delete", "insert", "add"]


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One field as a milter sees it: the name, and the raw bytes after the colon."""

    name: str
    value: bytes  # leading space, folding and all, without the final line ending

    @property
    def lname(self) -> str:
        return self.name.lower()

    def render(self, eol: bytes = b"\r\n") -> bytes:
        return self.name.encode("ascii", "surrogateescape") + b":" + self.value + eol


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    kind: EditKind
    name: str
    index: int  # change/delete: 1-based occurrence in the original; insert: 0-based final position
    value: bytes = b""  # change/insert/add: the new raw value (leading space included)


def fields_of(message: bytes) -> list[HeaderField]:
    """The header fields of `message`, in order, each with its raw value."""
    block = parse_header(message)
    out = []
    for f in block.fields:
        raw = message[f.start : f.end]
        colon = raw.index(b":")
        value = raw[colon + 1 :]
        if value.endswith(b"\n"):
            value = value[:-1]
            if value.endswith(b"\r"):
                value = value[:-1]
        out.append(HeaderField(f.name, value))
    return out


def header_edits(original: list[HeaderField], wanted: list[HeaderField]) -> list[HeaderEdit]:
    """The edits that turn the `original` fields into `wanted`, changes first.

    A field is changed in place when the same name survives at that place
    (the relay rewrites To/Cc where they stand); other differences are
    deletions and insertions. Appends at the end are `add` (what the relay
    does with X-BCCGuard and Reply-To), which needs no index at all.
    """
    a = [(f.name, f.value) for f in original]
    b = [(f.name, f.value) for f in wanted]
    occurrence: list[int] = []
    seen: dict[str, int] = defaultdict(int)
    for f in original:
        seen[f.lname] += 1
        occurrence.append(seen[f.lname])
    changes: list[HeaderEdit] = []
    placed: list[int] = []  # indexes into `wanted` of fields that need inserting
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        j = j1
        for i in range(i1, i2):
            # An empty value would read as "delete" to the MTA: that one is re-inserted instead.
            if j < j2 and wanted[j].lname == original[i].lname and wanted[j].value:
                # The new name's spelling: an MTA writes `name:value` as asked, and the
                # relay may respell it (the To fallback is written "To").
                changes.append(HeaderEdit("change", wanted[j].name, occurrence[i], wanted[j].value))
                j += 1
            else:
                changes.append(HeaderEdit("delete", original[i].name, occurrence[i]))
        placed.extend(range(j, j2))
    # Highest occurrence first: an MTA that shifts indexes as it deletes (Sendmail
    # does not, libmilter documents none) still hits the right field.
    changes.sort(key=lambda e: (e.name.lower(), -e.index))
    inserts: list[HeaderEdit] = []
    tail_from = len(wanted)
    while placed and placed[-1] == tail_from - 1:  # a run ending the block: plain appends
        tail_from = placed.pop()
    for j in placed:
        inserts.append(HeaderEdit("insert", wanted[j].name, j, wanted[j].value))
    adds = [HeaderEdit("add", f.name, 0, f.value) for f in wanted[tail_from:]]
    return changes + inserts + adds


def apply_edits(original: list[HeaderField], edits: list[HeaderEdit]) -> list[HeaderField]:
    """What an MTA makes of `original` given `edits` (the semantics in the module docstring)."""
    slots: list[HeaderField | None] = list(original)
    by_name: dict[str, list[int]] = defaultdict(list)
    for pos, f in enumerate(original):
        by_name[f.lname].append(pos)
    for e in edits:
        if e.kind not in ("change", "delete"):
            continue
        positions = by_name.get(e.name.lower(), [])
        if not 1 <= e.index <= len(positions):
            continue  # as an MTA does: a change to a field that is not there is ignored
        pos = positions[e.index - 1]
        slots[pos] = None if e.kind == "delete" or not e.value else HeaderField(e.name, e.value)
    out = [f for f in slots if f is not None]
    for e in sorted((e for e in edits if e.kind == "insert"), key=lambda e: e.index):
        out.insert(e.index, HeaderField(e.name, e.value))
    out += [HeaderField(e.name, e.value) for e in edits if e.kind == "add"]
    return out


def render(fields: list[HeaderField], eol: bytes = b"\r\n") -> bytes:
    return b"".join(f.render(eol) for f in fields)


__all__ = ["HeaderEdit", "HeaderField", "apply_edits", "fields_of", "header_edits", "render"]
