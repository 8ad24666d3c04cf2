"""Header splitting: offsets must be exact, since rewrite copies everything else by them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bccguard.policy.headers import parse_header


@pytest.mark.parametrize(
    ("message", "names", "body_offset", "eol"),
    [
        (b"", [], 0, b"\r\n"),
        (b"To: a\r\n\r\nbody", ["To"], 9, b"\r\n"),
        (b"To: a\n\nbody", ["To"], 7, b"\n"),
        (b"To: a\r\nCc: b", ["To", "Cc"], 12, b"\r\n"),
        (b"To: a\n", ["To"], 6, b"\n"),
        (b"\r\nTo: a\r\n", [], 2, b"\r\n"),
        (b"From x@y Mon Jan 1 00:00:00 2024\nTo: a\n\n", ["To"], 40, b"\n"),
        (b"To : a\nCC\t:b\n\n", ["To", "CC"], 14, b"\n"),
        (b"garbage\nTo: a\nbad name: x\n: empty\n\n", [], 0, b"\n"),
        (b"X: 1\ngarbage\nTo: a\n\nbody", ["X"], 5, b"\n"),
        (b" cont\nTo: a\n \t\n b\n\nTo: body\n", ["To"], 19, b"\n"),
        (b"X: \x00\xff\r\n\r\n", ["X"], 9, b"\r\n"),
    ],
)
def test_fields_and_offsets(message: bytes, names: list[str], body_offset: int, eol: bytes) -> None:
    block = parse_header(message)
    assert [f.name for f in block.fields] == names
    assert block.body_offset == body_offset
    assert block.eol == eol


def test_value_keeps_folding_and_offsets_cover_the_field() -> None:
    message = b"Subject: x\r\nTo: a@b,\r\n\tc@d\r\nCc:\r\n\r\nTo: e@f\r\n"
    block = parse_header(message)
    to = block.get_all("TO")
    assert len(to) == 1
    assert to[0].value == " a@b,\r\n\tc@d"
    assert message[to[0].start : to[0].end] == b"To: a@b,\r\n\tc@d\r\n"
    assert block.get_all("cc")[0].value == ""
    assert block.header_end == message.index(b"\r\n\r\n") + 2
    assert message[block.body_offset :] == b"To: e@f\r\n"


def test_undecodable_bytes_survive_as_surrogates() -> None:
    block = parse_header(b"To: caf\xe9 <x@y>\n\n")
    value = block.fields[0].value
    assert value.encode("utf-8", "surrogateescape") == b" caf\xe9 <x@y>"


def test_huge_single_line_is_linear() -> None:
    message = b"To: " + b"a@b.example, " * 100_000 + b"\r\n\r\n"
    block = parse_header(message)
    assert block.fields[0].end == len(message) - 2


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_never_raises_and_fields_are_in_the_header(message: bytes) -> None:
    block = parse_header(message)
    assert block.eol in (b"\r\n", b"\n")
    assert 0 <= block.header_end <= block.body_offset <= len(message)
    prev = 0
    for f in block.fields:
        assert prev <= f.start < f.end <= block.header_end
        assert f.lname == f.name.lower()
        assert message[f.start :].startswith(f.name.encode())
        prev = f.end


@settings(max_examples=200)
@given(st.lists(st.sampled_from([b"To: a@b", b" c@d", b"X:y", b"junk", b"", b"\t"]), max_size=12))
def test_lines_round_trip(lines: list[bytes]) -> None:
    for eol in (b"\r\n", b"\n"):
        message = eol.join(lines)
        block = parse_header(message)
        for f in block.fields:
            raw = message[f.start : f.end]
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            assert raw.split(b":", 1)[1] == f.value.encode("utf-8", "surrogateescape")


def _line_by_line(message: bytes) -> tuple[list[tuple[str, int, int, str]], int, int]:
    """The parser as it was before it skipped folded lines in one search: the reference.

    `(fields as (name, start, end, value), header_end, body_offset)`.
    """
    n = len(message)
    fields: list[tuple[str, int, int, str]] = []
    cur: tuple[str, int, int] | None = None
    cur_end = 0
    pos = 0
    header_end = body_offset = n
    late: list[tuple[str, int, int, str]] = []
    broken = False
    first = True

    def close() -> None:
        if cur is not None:
            name, start, vstart = cur
            raw = message[vstart:cur_end]
            if raw.endswith(b"\n"):
                raw = raw[:-1].removesuffix(b"\r")
            text = raw.decode("utf-8", "surrogateescape")
            (late if broken else fields).append((name, start, cur_end, text))

    while pos < n:
        nl = message.find(b"\n", pos)
        line_end = n if nl == -1 else nl + 1
        content_end = nl if nl != -1 else n
        if content_end > pos and message[content_end - 1] == 0x0D and nl != -1:
            content_end -= 1
        if content_end == pos and nl != -1:
            if not broken:
                header_end, body_offset = pos, line_end
            break
        if message[pos] in (0x20, 0x09):
            if cur is not None:
                cur_end = line_end
        else:
            close()
            cur = None
            line = message[pos:content_end]
            colon = line.find(b":")
            name = line[:colon].rstrip(b" \t") if colon > 0 else b""
            if name and all(33 <= b < 127 and b != 58 for b in name):
                cur = (name.decode("ascii"), pos, pos + colon + 1)
                cur_end = line_end
            elif not broken and not (first and line.startswith(b"From ")):
                broken = True  # a stray line: the MTA's header section ends here
                header_end = body_offset = pos
        first = False
        pos = line_end
    close()
    return fields, header_end, body_offset


_HEADER_BYTES = st.lists(
    st.sampled_from(
        [b"To: a", b"X :y", b"junk", b"From x", b" ", b"\t", b"\r", b"\n", b"\r\n", b":", b"\xff"]
    ),
    max_size=20,
).map(b"".join)


@settings(max_examples=1000)
@given(_HEADER_BYTES | st.binary(max_size=200))
def test_skipping_folded_lines_agrees_with_reading_line_by_line(message: bytes) -> None:
    block = parse_header(message)
    fields, header_end, body_offset = _line_by_line(message)
    assert [(f.name, f.start, f.end, f.value) for f in block.fields] == fields
    assert (block.header_end, block.body_offset) == (header_end, body_offset)


@pytest.mark.parametrize(
    ("message", "fields", "late", "broken_at", "header_end"),
    [
        # Issue 13 item 5: the header section ends where the MTA ends it ...
        (b"From: a\r\njunk line\r\nTo: b\r\nCc: c\r\n\r\nTo: body\r\n", ["From"], ["To", "Cc"], 2, 9),
        (
            b"From: a\nSubject: s\n folded\nno colon here\n cont\nTo: b\n\n",
            ["From", "Subject"], ["To"], 4, 27,
        ),
        (b"X: 1\nbad name: x\nTo: y\n", ["X"], ["To"], 2, 5),
        # ... but a leading mbox From line is a file artefact, not a broken header
        (b"From x@y Mon Jan 1 00:00:00 2024\nTo: a\n\n", ["To"], [], 0, 39),
        (b"To: a\n\njunk\nCc: b\n", ["To"], [], 0, 6),
    ],
)
def test_a_stray_line_ends_the_header_section_and_keeps_what_follows_apart(
    message: bytes, fields: list[str], late: list[str], broken_at: int, header_end: int
) -> None:
    block = parse_header(message)
    assert [f.name for f in block.fields] == fields
    assert [f.name for f in block.late] == late
    assert block.broken_at == broken_at
    assert block.header_end == header_end
    if broken_at:
        assert block.body_offset == header_end
        for f in block.late:
            assert message[f.start :].startswith(f.name.encode())
