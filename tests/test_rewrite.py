"""Header rewriting: hidden mailboxes gone, every other byte where it was."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bccguard.policy.addresses import (
    RECIPIENT_FIELDS,
    Group,
    first_from,
    parse_address_list,
    visible_recipients,
)
from bccguard.policy.headers import HeaderBlock, parse_header
from bccguard.policy.model import Address
from bccguard.policy.rewrite import personalize, rewrite_headers

CORP = "corp.example"


def hide_external(a: Address) -> bool:
    return not a.valid or a.domain != CORP


def rewrite(message: bytes, fallback: str = "undisclosed-recipients:;") -> tuple[bytes, int]:
    return rewrite_headers(
        message, parse_header(message), hide_external, to_fallback=fallback, stamp="rewritten"
    )


def header_of(message: bytes) -> bytes:
    block = parse_header(message)
    return message[: block.header_end]


def untouched(message: bytes, block: HeaderBlock) -> list[bytes]:
    names = (*RECIPIENT_FIELDS, "bcc", "resent-bcc", "x-bccguard")
    return [message[f.start : f.end] for f in block.fields if f.lname not in names]


def field_bytes(message: bytes, lname: str) -> list[bytes]:
    block = parse_header(message)
    return [message[f.start : f.end] for f in block.get_all(lname)]


MSG = (
    b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Boss <boss@corp.example>\r\n"
    b"To: Alice <alice@ext.example>, Bob <bob@corp.example>,\r\n"
    b"  carol@Ext.Example, ALICE@ext.example\r\n"
    b"Cc: only@ext.example\r\n"
    b"Cc: Team: dan@corp.example,\r\n eve@ext.example;, Empty:;, (c) fay@corp.example\r\n"
    b"Bcc: secret@corp.example\r\n"
    b"Subject: hello alice\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n"
    b"Resent-Bcc: r@ext.example\r\n"
    b"\r\n"
    b"Body mentions alice@ext.example\r\nTo: not-a-header@ext.example\r\n"
)


def test_rewrite_contract() -> None:
    out, n = rewrite(MSG)
    block = parse_header(MSG)
    oblock = parse_header(out)
    # alice (= ALICE: one person, issue 13 item 4), carol, only, eve
    assert n == 4
    assert untouched(out, oblock) == untouched(MSG, block)
    assert out[oblock.body_offset :] == MSG[block.body_offset :]
    assert field_bytes(out, "to") == [b"To: Bob <bob@corp.example>\r\n"]
    assert field_bytes(out, "cc") == [
        b"Cc: Team: dan@corp.example;, Empty:;, (c) fay@corp.example\r\n"
    ]
    assert field_bytes(out, "bcc") == []
    assert field_bytes(out, "resent-bcc") == []
    assert field_bytes(out, "x-bccguard") == [b"X-BCCGuard: rewritten\r\n"]
    assert oblock.fields[-1].lname == "x-bccguard"
    assert b"ext.example" not in header_of(out).lower().replace(b"subject: hello alice", b"")


def test_count_is_distinct_addr_specs() -> None:
    message = b"To: a@x.example, A@X.EXAMPLE, a@x.example\r\nCc: a@x.example, b@x.example\r\n\r\n"
    out, n = rewrite(message)
    assert n == 2  # a@x.example (= A@X.EXAMPLE: one person to a reader), b@x.example
    assert field_bytes(out, "to") == [b"To: undisclosed-recipients:;\r\n"]


def test_nothing_hidden_leaves_fields_exact() -> None:
    message = b"To: a@corp.example,\r\n\tb@corp.example\r\nCc:  (x)  c@corp.example \r\n\r\nbody"
    out, n = rewrite(message)
    assert n == 0
    assert out == message.replace(b"\r\n\r\n", b"\r\nX-BCCGuard: rewritten\r\n\r\n")


def test_fallback_to_takes_the_place_of_the_first_to() -> None:
    message = (
        b"From: Boss <boss@corp.example>\r\nTo: x@ext.example\r\n"
        b"Subject: s\r\nTo: y@ext.example\r\n\r\n"
    )
    block = parse_header(message)
    sender = first_from(block)
    assert sender is not None
    out, n = rewrite_headers(
        message, block, hide_external, to_fallback=sender.address.raw, stamp="s"
    )
    assert n == 2
    assert out == (
        b"From: Boss <boss@corp.example>\r\nTo: Boss <boss@corp.example>\r\nSubject: s\r\n"
        b"X-BCCGuard: s\r\n\r\n"
    )


def test_fallback_to_added_when_there_was_none() -> None:
    out, _ = rewrite(b"Cc: x@ext.example\nSubject: s\n\nbody\n")
    assert out == b"Subject: s\nTo: undisclosed-recipients:;\nX-BCCGuard: rewritten\n\nbody\n"


def test_lf_only_stays_lf() -> None:
    message = MSG.replace(b"\r\n", b"\n")
    out, _ = rewrite(message)
    assert b"\r" not in out
    assert field_bytes(out, "cc") == [
        b"Cc: Team: dan@corp.example;, Empty:;, (c) fay@corp.example\n"
    ]


@pytest.mark.parametrize(
    "message",
    [
        b"To: x@ext.example, a@corp.example",
        b"Subject: s\r\nTo: x@ext.example",
        b"To: x@ext.example\r\nSubject: s",
        b"",
        b"\r\nbody",
    ],
)
def test_header_edges(message: bytes) -> None:
    out, _ = rewrite(message)
    block = parse_header(out)
    assert [a.addr_spec for a in visible_recipients(block)] in (
        [],
        ["a@corp.example"],
    )
    assert block.get_all("x-bccguard")[0].value == " rewritten"
    assert out.endswith(message[parse_header(message).header_end :])


def test_eight_bit_bytes_survive_a_rebuilt_field() -> None:
    message = (
        b'To: Caf\xe9 \xff <a@corp.example>, x\xff@ext.example, "\xfe" <b@corp.example>\r\n\r\n'
    )
    out, n = rewrite(message)
    assert n == 1
    assert field_bytes(out, "to") == [
        b'To: Caf\xe9 \xff <a@corp.example>, "\xfe" <b@corp.example>\r\n'
    ]


def test_stamp_and_fallback_cannot_inject_lines() -> None:
    message = b"To: x@ext.example\r\n\r\n"
    out, _ = rewrite_headers(
        message,
        parse_header(message),
        hide_external,
        to_fallback="a@corp.example\r\nBcc: evil@ext.example",
        stamp="s\r\nX-Evil: 1",
    )
    names = [f.lname for f in parse_header(out).fields]
    assert names == ["to", "x-bccguard"]


def _lines(message: bytes) -> list[bytes]:
    return header_of(message).split(b"\r\n")


def test_folding_at_item_boundaries() -> None:
    kept = [f"Person Number {i} <p{i}@corp.example>" for i in range(300)]
    gone = [f"x{i}@ext.example" for i in range(300)]
    value = ", ".join(a for pair in zip(kept, gone, strict=True) for a in pair)
    message = f"To: {value}\r\n\r\n".encode()
    out, n = rewrite(message)
    assert n == 300
    lines = _lines(out)
    assert all(len(line) <= 78 for line in lines)
    assert [a.addr_spec for a in visible_recipients(parse_header(out))] == [
        f"p{i}@corp.example" for i in range(300)
    ]


def test_long_items_never_pass_998() -> None:
    spaced = "W " * 700  # 1,400 octets of display name with places to fold
    solid = "y" * 1500  # no whitespace at all: cut hard
    message = (
        f'To: "{spaced}" <a@corp.example>, x@ext.example, "{solid}" <b@corp.example>\r\n\r\n'
    ).encode()
    out, _ = rewrite(message)
    assert max(len(line) for line in _lines(out)) <= 998
    seen = visible_recipients(parse_header(out))
    assert seen[0].addr_spec == "a@corp.example"
    assert seen[0].display is not None
    assert " ".join(seen[0].display.split()) == " ".join(f'"{spaced}"'.split())


def test_group_rules() -> None:
    message = b"To: G: x@ext.example;, H: y@ext.example, h@corp.example;\r\n\r\n"
    out, n = rewrite(message)
    assert n == 2
    assert field_bytes(out, "to") == [b"To: G:;, H: h@corp.example;\r\n"]
    items = parse_address_list(parse_header(out).get_all("to")[0].value)
    assert [(i.display, len(i.members)) for i in items if isinstance(i, Group)] == [
        ("G", 0),
        ("H", 1),
    ]


def test_personalize() -> None:
    block = parse_header(MSG)
    alice = visible_recipients(block)[0]
    out = personalize(MSG, block, alice, keep=lambda a: a.valid and a.domain == CORP, stamp="split")
    oblock = parse_header(out)
    assert field_bytes(out, "to") == [b"To: Alice <alice@ext.example>\r\n"]
    assert field_bytes(out, "cc") == [
        b"Cc: Team: dan@corp.example;, Empty:;, (c) fay@corp.example\r\n"
    ]
    assert field_bytes(out, "bcc") == []
    assert untouched(out, oblock) == untouched(MSG, block)
    assert out[oblock.body_offset :] == MSG[block.body_offset :]
    assert [a.addr_spec for a in visible_recipients(oblock)] == [
        "alice@ext.example",
        "dan@corp.example",
        "fay@corp.example",
    ]


def test_personalize_bare_address_and_no_to() -> None:
    message = b"Cc: a@corp.example, b@ext.example\nMessage-ID: <1@x>\n\nbody\n"
    out = personalize(
        message,
        parse_header(message),
        Address("Zed", "ext.example"),
        keep=lambda a: a.domain == CORP,
        stamp="split",
    )
    assert out == (
        b"Cc: a@corp.example\nMessage-ID: <1@x>\nTo: Zed@ext.example\nX-BCCGuard: split\n\nbody\n"
    )


# --- properties ------------------------------------------------------------------

_LOCAL = st.sampled_from(["a", "B", "c.d", '"q, r"', "e+f"])
_DOMAIN = st.sampled_from([CORP, "ext.example", "Corp.Example", "other.example", "x.corp.example"])
_SPEC = st.tuples(_LOCAL, _DOMAIN).map("@".join)
_BOX = st.one_of(
    _SPEC,
    _SPEC.map(lambda s: f"Name <{s}>"),
    _SPEC.map(lambda s: f'"Last, First" <{s}>'),
    _SPEC.map(lambda s: f"{s} (comment)"),
    st.sampled_from(["junk", "<>", "@x", '"open', "Foo <a@corp.example"]),
)
_ITEM = st.one_of(
    _BOX,
    st.lists(_BOX, max_size=3).map(lambda m: "G: " + ", ".join(m) + ";"),
)
_SEP = st.sampled_from([", ", ",\r\n ", ",", ";", ",,"])
_VALUE = st.lists(st.tuples(_ITEM, _SEP), max_size=8).map(
    lambda parts: "".join(i + s for i, s in parts)
)
_NAME = st.sampled_from(["To", "Cc", "Bcc", "Subject", "Resent-To", "Resent-Cc", "X-Other"])


@settings(max_examples=300)
@given(
    st.lists(st.tuples(_NAME, _VALUE), max_size=6),
    st.sampled_from([b"\r\n", b"\n"]),
    st.binary(max_size=20),
)
def test_rewrite_properties(fields: list[tuple[str, str]], eol: bytes, body: bytes) -> None:
    message = b"".join(f"{n}: {v}".encode().replace(b"\r\n", eol) + eol for n, v in fields)
    message += eol + body
    block = parse_header(message)
    out, n = rewrite_headers(
        message, block, hide_external, to_fallback="undisclosed-recipients:;", stamp="s"
    )
    oblock = parse_header(out)
    assert not any(hide_external(a) for a in visible_recipients(oblock))
    assert untouched(out, oblock) == untouched(message, block)
    assert out[oblock.body_offset :] == message[block.body_offset :]
    assert oblock.get_all("bcc") == []
    assert len(oblock.get_all("to")) >= 1
    hidden = {a.key for a in visible_recipients(block) if hide_external(a)}
    assert n == len(hidden)
    assert max(len(line) for line in out[: oblock.header_end].split(eol)) <= 998
    if eol == b"\n":
        assert b"\r" not in out[: oblock.header_end]
    for f in oblock.fields:
        if f.lname in RECIPIENT_FIELDS:
            assert re.search(r"[^\r]\n|\r(?!\n)", f.value) is None or eol == b"\n"


@settings(max_examples=300)
@given(st.binary(max_size=200), st.booleans())
def test_rewrite_never_raises_on_bytes(message: bytes, hide_all: bool) -> None:
    block = parse_header(message)
    out, _ = rewrite_headers(
        message, block, lambda a: hide_all or not a.valid, to_fallback="x@y", stamp="s"
    )
    oblock = parse_header(out)
    assert out[oblock.body_offset :] == message[block.body_offset :]
    if hide_all:
        assert [a.addr_spec for a in visible_recipients(oblock)] == ["x@y"]
