"""Split a message's header block into fields with exact byte offsets.

The relay must rewrite a few fields and leave every other byte alone (DKIM
signatures and MUA quirks depend on it), so each `Field` remembers where it
starts and ends in the original bytes. Only the header block is read: the
body, and any message/rfc822 part inside it, never counts as headers.

Tolerance rules, chosen so that the scan sees at least every line a
downstream parser might take for a header (over-inspecting is safe,
under-inspecting leaks addresses):

- The block ends at the first empty line (`\\n` or `\\r\\n` alone). A line
  holding only blanks is a continuation line (obs-FWS), not the end.
- A leading mbox `From ` line (and a continuation line at the very top) is
  skipped: it stays byte for byte but is not a field.
- Any other line that is neither a field nor a continuation line (no colon,
  or a name with characters outside RFC 5322 ftext) ends the header section
  there, as Postfix's cleanup and Python's feedparser end it: what follows
  is body to the MTA, so a rewrite must never edit it (`header_end` and
  `body_offset` point at that stray line). But the recipient still reads it:
  the field-shaped lines after it, up to the first empty line, are kept in
  `late` so policy can count the To/Cc a reader sees there.
- Whitespace between name and colon (`To : x`, RFC 5322 4.5) is accepted.
- LF-only files, a missing body and a missing final newline are fine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5322 ftext as bytes for `bytes.translate` to delete: a name is valid when
# nothing is left (one C call, not a generator step per byte).
_FTEXT = bytes(b for b in range(33, 127) if b != ord(":"))
# The end of a line that no continuation line follows: where a field (with all
# its folded lines) or a garbage line (with the continuations it owns) ends.
_UNFOLDED_EOL = re.compile(rb"\n(?![ \t])")


@dataclass(frozen=True, slots=True)
class Field:
    """One header field as it stands in the message."""

    name: str  # field name as written (without obs whitespace before the colon)
    lname: str  # lower-cased name
    start: int  # byte offset of the field's first byte in the message
    end: int  # byte offset just past its final line ending (or end of message)
    value: str  # text after the colon, folding kept, decoded utf-8 surrogateescape


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    """The parsed header block of one message.

    `header_end` (an addition to the original contract) is the offset just
    past the last header line, where new fields are inserted: the blank line
    separating the body starts there. It equals `body_offset` when the
    message has no blank line.
    """

    fields: tuple[Field, ...]
    body_offset: int  # first body byte (after the blank line); len(message) if none
    eol: bytes  # b"\r\n" or b"\n": the message's own line ending style
    header_end: int = -1
    # Set when a stray line ended the header section early: the 1-based line
    # number of that line, and the field-shaped lines after it (up to the
    # first empty line), which the MTA delivers as body text.
    broken_at: int = 0
    late: tuple[Field, ...] = ()

    def get_all(self, lname: str) -> list[Field]:
        """Every field called `lname` (case-insensitive), in message order."""
        want = lname.lower()
        return [f for f in self.fields if f.lname == want]


def _eol_of(message: bytes) -> bytes:
    """The line ending of the first line: files on disk are often LF-only."""
    nl = message.find(b"\n")
    if nl == -1 or (nl > 0 and message[nl - 1] == 0x0D):
        return b"\r\n"  # CRLF, or no line ending at all: SMTP's own style
    return b"\n"


def _field_name(line: bytes) -> tuple[str, int] | None:
    """`(name, colon offset)` when `line` starts a field, else None."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(b" \t")  # obs-optional: WSP before the colon
    if not name or name.translate(None, _FTEXT):
        return None
    return name.decode("ascii"), colon


def parse_header(message: bytes) -> HeaderBlock:
    """Parse the header block of `message`; never raises, linear in its size."""
    eol = _eol_of(message)
    n = len(message)
    fields: list[Field] = []
    late: list[Field] = []
    broken_at = 0
    line_no = 0
    # The field being collected: (name, start, value_start); continuation
    # lines only extend it, so its end is the end of the last line seen.
    cur: tuple[str, int, int] | None = None
    cur_end = 0
    pos = 0
    header_end = n
    body_offset = n

    def close() -> None:
        if cur is None:
            return
        name, start, vstart = cur
        raw = message[vstart:cur_end]
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        value = raw.decode("utf-8", "surrogateescape")
        (late if broken_at else fields).append(Field(name, name.lower(), start, cur_end, value))

    while pos < n:
        nl = message.find(b"\n", pos)
        line_end = n if nl == -1 else nl + 1
        content_end = nl if nl != -1 else n
        if content_end > pos and message[content_end - 1] == 0x0D and nl != -1:
            content_end -= 1
        if content_end == pos and nl != -1:
            # The empty line: the header block ends here, the body follows it.
            if not broken_at:
                header_end = pos
                body_offset = line_end
            break
        line_no += 1
        if message[pos] not in (0x20, 0x09):
            close()
            cur = None
            parsed = _field_name(message[pos:content_end])
            if parsed is not None:
                name, colon = parsed
                cur = (name, pos, pos + colon + 1)
            elif not broken_at and not (line_no == 1 and message.startswith(b"From ", pos)):
                # A stray line: the MTA's header section ends here (an mbox
                # "From sender date" line on top is a file artefact, skipped).
                broken_at = line_no
                header_end = body_offset = pos
        # This line and the continuation lines folded under it, in one search
        # (a 100-address To folded once per address was 100 trips round this
        # loop). So a line starting with WSP only gets here at the very top,
        # where it continues nothing and is skipped as before.
        m = _UNFOLDED_EOL.search(message, line_end - 1 if nl != -1 else n)
        line_end = n if m is None else m.end()
        line_no += message.count(b"\n", pos, line_end - 1) if line_end - pos > 1 else 0
        cur_end = line_end
        pos = line_end
    close()
    return HeaderBlock(tuple(fields), body_offset, eol, header_end, broken_at, tuple(late))
