"""Address-list parsing: the RFC 5322 corpus, table-driven edge cases, properties."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bccguard.policy import addresses
from bccguard.policy.addresses import (
    Group,
    Mailbox,
    first_from,
    header_recipients,
    parse_address_list,
    visible_recipients,
)
from bccguard.policy.headers import parse_header

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(p for p in CORPUS.iterdir() if p.name.endswith((".eml", ".eml.gz")))


def _load(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _expected(path: Path) -> dict[str, object]:
    stem = path.name.removesuffix(".gz").removesuffix(".eml")
    return json.loads((path.parent / f"{stem}.expected.json").read_text("utf-8"))


def _seen(message: bytes) -> list[dict[str, object]]:
    return [
        {"addr_spec": a.addr_spec, "valid": a.valid} | ({"in_text": True} if a.in_text else {})
        for a in visible_recipients(parse_header(message))
    ]


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_corpus(path: Path) -> None:
    message = _load(path)
    want = _expected(path)
    seen = _seen(message)
    if "visible" in want:
        assert seen == want["visible"], want["why"]
    else:
        head, tail = want["head"], want["tail"]
        assert isinstance(head, list)
        assert isinstance(tail, list)
        assert len(seen) == want["count"]
        assert seen[: len(head)] == head
        assert seen[-len(tail) :] == tail
    if "from" in want:
        mb = first_from(parse_header(message))
        assert mb is not None
        assert mb.address.addr_spec == want["from"]


def _one(value: str) -> Mailbox:
    items = parse_address_list(value)
    assert len(items) == 1
    item = items[0]
    assert isinstance(item, Mailbox)
    return item


@pytest.mark.parametrize(
    ("value", "local", "domain", "display", "raw"),
    [
        ("a@b.com", "a", "b.com", None, "a@b.com"),
        ("  Bob <b@C.com>  ", "b", "c.com", "Bob", "Bob <b@C.com>"),
        ('"Doe, J" <j@x.com>', "j", "x.com", '"Doe, J"', '"Doe, J" <j@x.com>'),
        ("Pete(c) <pete(x)@silly.test(y)>", "pete", "silly.test", "Pete", None),
        ("John Q. Public <jqp@x.com>", "jqp", "x.com", "John Q. Public", None),
        ('"a\\"b"@x.com', '"a\\"b"', "x.com", None, None),
        ('"a b" . c@x.com', '"a b".c', "x.com", None, None),
        ("=?utf-8?q?ceo=40corp.example?= <x@y.example>", "x", "y.example", None, None),
        ("<@r1,@r2:user@host>", "user", "host", None, "<@r1,@r2:user@host>"),
        ("<,@r1,,@r2:user@host>", "user", "host", None, None),
        ("u@bücher.example", "u", "xn--bcher-kva.example", None, None),
        ("u@[1.2.3.4]", "u", "[1.2.3.4]", None, None),
        ("u @ example . com .", "u", "example.com", None, None),
        ("Mary\r\n Smith\r\n <mary@x.test>", "mary", "x.test", "Mary\r\n Smith", None),
    ],
)
def test_mailbox_forms(
    value: str, local: str, domain: str, display: str | None, raw: str | None
) -> None:
    mb = _one(value)
    a = mb.address
    assert a.valid
    assert (a.local, a.domain) == (local, domain)
    if display is not None:
        assert a.display == display
    assert a.raw == value.strip()
    assert value[mb.start : mb.end] == a.raw
    if raw is not None:
        assert a.raw == raw


@pytest.mark.parametrize(
    ("value", "domain"),
    [
        ("plainaddress", ""),
        ("@no-local.example", "no-local.example"),
        ("a@", ""),
        ("a@@b.example", "b.example"),
        ("a..b@x.example", "x.example"),
        (".a@x.example", "x.example"),
        ("a.@x.example", "x.example"),
        ("a@x..example", "x..example"),
        ("Foo <a@b.example", "b.example"),
        ("Foo a@b.example>", "b.example"),
        ("<<a@b.example>>", "b.example"),
        ("A <a@b.example> B", "b.example"),
        ("a b@c.example", "c.example"),
        ('"open@x.example', "x.example"),
        ("(open a@x.example", "x.example"),
        ("a@b.example (open", "b.example"),
        ("a\x00@x.example", "x.example"),
        ("a\udcff@x.example", "x.example"),
        ("=?utf-8?q?a?=@x.example", "x.example"),
        ("a@=?utf-8?q?x?=", "=?utf-8?q?x?="),
        ("<>", ""),
        ("a@[1.2.3.4", "[1.2.3.4"),
        ("a@[1.2[3]", "[1.2[3]"),
        ("a@b@c.example", "c.example"),
        ("<a@b.example:c@d.example>", "d.example"),
    ],
)
def test_invalid_is_never_dropped(value: str, domain: str) -> None:
    mb = _one(value)
    assert not mb.address.valid
    assert mb.address.local == " ".join(value.split())
    assert mb.address.domain == domain


def test_invalid_local_is_whitespace_collapsed() -> None:
    mb = _one("junk \r\n\t text")
    assert mb.address.local == "junk text"
    assert mb.address.raw == "junk \r\n\t text"


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("", 0),
        ("   ", 0),
        (",,,", 0),
        ("(comment)", 0),
        ("a@b.com,,c@d.com", 2),
        ("a@b.com ; c@d.com", 2),
        ('"x, y" <a@b.com>, (p, q) c@d.com', 2),
        ("<@a,@b:c@d.com>, e@f.com", 2),
    ],
)
def test_list_splitting(value: str, count: int) -> None:
    assert len(parse_address_list(value)) == count


def test_groups() -> None:
    value = "x@y.com, Team: a@b.com, Bad>, c@d.com;, Empty:;, z@y.com"
    items = parse_address_list(value)
    assert [type(i).__name__ for i in items] == ["Mailbox", "Group", "Group", "Mailbox"]
    team = items[1]
    assert isinstance(team, Group)
    assert team.display == "Team"
    assert [m.address.valid for m in team.members] == [True, False, True]
    assert value[team.start : team.end] == "Team: a@b.com, Bad>, c@d.com;"
    empty = items[2]
    assert isinstance(empty, Group)
    assert empty.members == ()
    assert value[empty.start : empty.end] == "Empty:;"


def test_colon_after_phrase_opens_a_group_even_without_semicolon() -> None:
    (group,) = parse_address_list("x:y@z.example")
    assert isinstance(group, Group)
    assert [m.address.addr_spec for m in group.members] == ["y@z.example"]


def test_unclosed_angle_swallows_group_end() -> None:
    (group,) = parse_address_list("Team: a@b.com, Bad <, c@d.com;, z@y.com")
    assert isinstance(group, Group)
    assert [m.address.valid for m in group.members] == [True, False]


def test_member_spans_point_into_value() -> None:
    value = " G :\r\n a@b.com (x) ,\r\n C <c@d.com> ;"
    (group,) = parse_address_list(value)
    assert isinstance(group, Group)
    assert [value[m.start : m.end] for m in group.members] == ["a@b.com (x)", "C <c@d.com>"]
    assert value[group.start : group.end] == value.strip()


def test_header_recipients_and_first_from() -> None:
    block = parse_header(
        b"From: junk, Boss <boss@corp.example>\r\nTo: a@x.example\r\n"
        b"Bcc: b@x.example\r\nCC: c@x.example\r\n\r\n"
    )
    assert [a.addr_spec for a in header_recipients(block, ["TO", "bcc"])] == [
        "a@x.example",
        "b@x.example",
    ]
    assert [a.addr_spec for a in visible_recipients(block)] == ["a@x.example", "c@x.example"]
    mb = first_from(block)
    assert mb is not None
    assert mb.address.raw == "Boss <boss@corp.example>"
    assert first_from(parse_header(b"From: junk\r\n\r\n")) is None
    assert first_from(parse_header(b"Subject: x\r\n\r\n")) is None


# --- properties ------------------------------------------------------------------

_ALPHABET = st.sampled_from(list('ab.@<>,;:"()[]\\ \t\r\n=?é\x00\udcff'))


@settings(max_examples=400)
@given(st.text(_ALPHABET, max_size=60) | st.text(max_size=60))
def test_never_raises_and_spans_are_sane(value: str) -> None:
    for item in parse_address_list(value):
        assert 0 <= item.start <= item.end <= len(value)
        boxes = item.members if isinstance(item, Group) else (item,)
        for mb in boxes:
            assert item.start <= mb.start < mb.end <= item.end
            assert value[mb.start : mb.end] == mb.address.raw
            assert mb.address.raw == mb.address.raw.strip(" \t\r\n")


def _mailbox_list(items: list[object]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for item in items:
        if isinstance(item, Group):
            out.append(("group", item.display, item.start, item.end))
            out += [(m.address, m.start, m.end) for m in item.members]
        elif isinstance(item, Mailbox):
            out.append((item.address, item.start, item.end))
    return out


_ATOM = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-é", min_size=1, max_size=5)
_CFWS = st.sampled_from(
    ["", " ", "\r\n ", "(c)", " (a \\) b) ", "((n))", "\t", "(a(b\\)c)d)", "(((n)))", " (x(y)z) ", "((x)"]
)
_DOT = st.tuples(_CFWS, _CFWS).map(lambda t: f"{t[0]}.{t[1]}")
_QUOTED = st.text('ab ,@<>;:.\\"', max_size=6).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
_WORD = _ATOM | _QUOTED
_LOCAL = st.lists(_WORD, min_size=1, max_size=3).flatmap(lambda ws: _DOT.map(lambda d: d.join(ws)))
_DOMAIN = st.tuples(st.lists(_ATOM, min_size=1, max_size=3), _DOT, st.sampled_from(["", "."]))
_DOM = _DOMAIN.map(lambda t: t[1].join(t[0]) + t[2]) | st.just("[1.2.3.4]")
_SPEC = st.tuples(_LOCAL, _CFWS, _CFWS, _DOM).map(lambda t: f"{t[0]}{t[1]}@{t[2]}{t[3]}")
_PHRASE = st.lists(_WORD | st.just("."), min_size=1, max_size=4).map(" ".join)
_MAILBOX = st.one_of(
    _SPEC,
    st.tuples(_CFWS, _SPEC, _CFWS).map("".join),
    _SPEC.map(lambda s: f"<{s}>"),
    st.tuples(_PHRASE, _CFWS, _SPEC).map(lambda t: f"{t[0]}{t[1]}<{t[2]}>"),
    st.sampled_from(["junk", "a b@c", "<>", "x@y>", "=?u?q?a?=@b", "a@b:c", "<@r:a@b>", "(x"]),
)
_GROUP_NAME = st.one_of(
    st.just("G"),
    st.tuples(_CFWS, _PHRASE, _CFWS).map("".join),
    st.sampled_from(['"A; B"', "a@b", "<x>", "=?u?q?G?=", "[x]"]),
)
_ELEMENT = _MAILBOX | st.builds(
    lambda name, members, end: f"{name}: " + ", ".join(members) + end,
    _GROUP_NAME,
    st.lists(_MAILBOX, max_size=3),
    st.sampled_from([";", "", ";,", " ; "]),
)
_SEP = st.sampled_from([",", ", ", " ,", ",\r\n ", ";", ",,", " , ", "(c),"])


@settings(max_examples=1500)
@given(st.lists(st.tuples(_ELEMENT, _SEP), max_size=6))
def test_fast_paths_agree_with_tokenizer(parts: list[tuple[str, str]]) -> None:
    """Every regex tier (mailboxes, group names, group members) == the tokenizer alone."""
    value = "".join(m + s for m, s in parts)
    fast = parse_address_list(value)
    slow: list[addresses.Item] = []
    pos = 0
    while pos < len(value):
        pos = addresses._slow_item(value, pos, slow, fast=False)
    assert _mailbox_list(list(fast)) == _mailbox_list(list(slow))
