"""Tolerant, linear-time RFC 5322 address-list parsing.

Why not the `email` package: `policy.default` is quadratic (2.3 s for a
10,000-address To), raises on some obsolete-but-valid syntax and decodes
RFC 2047 encoded words into address text, which RFC 2047 section 5 forbids
and which would let `=?utf-8?q?ceo=40corp.example?=` pass for an address.

How it works: a regex fast path takes the common shapes (`a@b`, `<a@b>`,
`Name <a@b>`, `"Name, Quoted" <a@b>`) one list element at a time; anything
else falls back to a small tokenizer that reads just that one element (a
mailbox, or a whole group) and then hands back to the fast path. Both paths
move strictly forward, so the cost is linear in the header size.

Safety rules, because policy counts what this returns:
- Malformed text is never dropped: each malformed element between commas
  becomes an `Address(valid=False)` (kept for the rewrite), and every
  `local@domain` string a reader sees in it counts as an address of its own
  (`Mailbox.seen`, see reader.py); one with an '@' but no such string counts
  as one external address; one with no '@' at all (`Smith` of an unquoted
  `Smith, Ann <ann@x>`) is not an address and counts as nothing.
- Display names, comments and encoded words are read as a mail reader shows
  them: an address-like string there is visible too (`Mailbox.seen`), though
  never the element's routing address.
- Elements holding only whitespace or comments (obs-addr-list) are skipped.
- Unterminated quoted strings and comments run to the end of the value (so
  commas inside them never split), as do unclosed angle brackets; the
  element holding them is invalid.
- Encoded words are never decoded; an addr-spec part that looks like one is
  invalid (RFC 2047 section 5 (3)).
- Obsolete syntax is accepted: CFWS around '.' and '@', obs-phrase with
  dots, routes `<@a,@b:user@host>`, empty list elements; a trailing dot on
  the domain is accepted (normalize_domain drops it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from bccguard.policy.domains import normalize_domain
from bccguard.policy.headers import HeaderBlock
from bccguard.policy.model import Address
from bccguard.policy.reader import address_like, at_signs, reader_text

RECIPIENT_FIELDS = ("to", "cc", "resent-to", "resent-cc")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One mailbox and where its raw text sits in the field value."""

    address: Address
    start: int
    end: int
    # What else a reader sees in this element and counts: address-like text
    # in its display name or comments (never the routing address again), or,
    # for a malformed element, each address in it (or the element itself
    # when it holds an '@' but no address).
    seen: tuple[Address, ...] = ()


@dataclass(frozen=True, slots=True)
class Group:
    """An RFC 5322 group; `start`/`end` span the display name through ';'."""

    display: str
    members: tuple[Mailbox, ...]
    start: int
    end: int
    seen: tuple[Address, ...] = ()  # address-like text in the display name


def _seen(address: Address, raw: str) -> tuple[Address, ...]:
    """`Mailbox.seen` for an element: distinct address-like strings, minus the routing address."""
    if address.valid and at_signs(raw) <= 1:
        return ()  # the one at-sign a reader sees is the routing address's own
    found = address_like(raw)
    keys = {address.key} if address.valid else set()
    out: list[Address] = []
    for a in found:
        k = a.key
        if k not in keys:
            keys.add(k)
            out.append(a)
    if not address.valid and not out and "@" in reader_text(raw):
        out.append(address)  # an '@' but no address: one external destination nobody vouched for
    return tuple(out)


def _needs_reading(raw: str) -> bool:
    """True when a well-formed element may show more than its routing address.

    The one '@' of a plain ASCII element is its addr-spec's; anything else
    (a second '@', an encoded word, non-ASCII text that may hold a look-alike
    at-sign) is read as a reader would. Cheap: the 10,000-address To of a
    mail merge takes the False branch for every element.
    """
    return raw.count("@") > 1 or "=?" in raw or not raw.isascii()


Item = Mailbox | Group

# --- fast paths --------------------------------------------------------------
# Tier 1 (_FAST): ASCII only, no comments, no dots in the display name. Tier 2
# (_MEDIUM): the same grammar as the tokenizer for everything but groups,
# routes, domain literals and comments nested more than two deep: CFWS
# anywhere, obs-phrase, quoted strings with escapes, an optional trailing dot
# on the domain. A group's `display:` has its own regex (_GROUP_START); its
# members then go through _MEDIUM one by one. All use possessive
# quantifiers, so a failed match cannot backtrack exponentially. Whatever
# they accept the tokenizer parses the same way (a property test checks);
# whatever they refuse, it parses instead.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}++(?:\.{_ATEXT}++)*+"
# No '@' and no non-ASCII in tier 1's quoted words: a display name that may
# show an address goes to tier 2, which reads it as a mail reader would.
_QWORD = r'"[^"\\\r\n@\x80-\U0010ffff]*+"'
_WORD = rf"(?:{_ATEXT}++|{_QWORD})"
_FWS = r"[ \t\r\n]*+"
_FAST = re.compile(
    rf"""{_FWS}
    (?P<mb>
      (?P<display>{_WORD}(?:[ \t]++{_WORD})*+)?[ \t]*+<(?P<l1>{_DOT_ATOM})@(?P<d1>{_DOT_ATOM})>
    | (?P<l2>{_DOT_ATOM})@(?P<d2>{_DOT_ATOM})
    )
    {_FWS}(?:,|\Z)""",
    re.VERBOSE,
)
_MATOM = r"[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]++"
_MQUOTED = r'"(?:[^"\\]++|\\.)*+"'
# A comment nested at most two deep, e.g. `((c))`: deeper ones go to the tokenizer.
_MCOMMENT = r"\((?:[^()\\]++|\\.|\((?:[^()\\]++|\\.)*+\))*+\)"
_MCFWS = rf"(?:[ \t\r\n]++|{_MCOMMENT})*+"
_MWORD = rf"(?:{_MATOM}|{_MQUOTED})"
_MPHRASE = rf"{_MWORD}(?:{_MCFWS}(?:{_MWORD}|\.))*+"


def _mspec(n: int) -> str:
    local = rf"(?P<l{n}>{_MWORD}(?:{_MCFWS}\.{_MCFWS}{_MWORD})*+)"
    domain = rf"(?P<d{n}>{_MATOM}(?:{_MCFWS}\.{_MCFWS}{_MATOM})*+(?:{_MCFWS}\.)?+)"
    return rf"{local}{_MCFWS}@{_MCFWS}{domain}"


_MEDIUM = re.compile(
    rf"""[ \t\r\n]*+
    (?P<mb>{_MCFWS}
      (?:(?P<display>{_MPHRASE}){_MCFWS})?<{_MCFWS}{_mspec(1)}{_MCFWS}>{_MCFWS}
    | {_MCFWS}{_mspec(2)}{_MCFWS}
    )(?:[,;]|\Z)""",
    re.VERBOSE | re.DOTALL,
)
# Inside a matched local part or domain: keep quoted strings (unfolded),
# drop comments and blanks.
_MSTRIP = re.compile(rf'("(?:[^"\\]++|\\.)*+")|{_MCOMMENT}|[ \t\r\n]++', re.DOTALL)
_MDIRTY = re.compile(r'[ \t\r\n"(]')
_MREFUSE = re.compile(r"=\?|[\ud800-\udfff]")
# `display:` opening a group, as the tokenizer would accept it: an obs-phrase
# that starts the element (no comment before it), then CFWS and the colon.
_GROUP_START = re.compile(rf"[ \t\r\n]*+({_MPHRASE}){_MCFWS}:", re.DOTALL)


def _mclean(text: str) -> str:
    if _MDIRTY.search(text) is None:
        return text
    return _MSTRIP.sub(lambda m: _FOLD.sub("", m.group(1)) if m.group(1) else "", text)


# --- tokenizer -------------------------------------------------------------
_WS, _ATOM, _SPECIAL, _OPEN, _JUNK = 1, 2, 3, 4, 5
_QUOTED, _COMMENT, _LITERAL = 6, 7, 8
_TOKEN = re.compile(
    r"([ \t\r\n]+)"  # FWS; a stray CR counts as blank too (never as a line end)
    # atext; UTF-8 is allowed (RFC 6532) and so are undecodable bytes (surrogates):
    # legacy Latin-1 display names are common, but _addr_spec refuses them.
    r"|([^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+)"
    r"|([<>:;@,.])"
    r"|([\"(\[])"
    r"|(.)",
    re.DOTALL,
)
# Friedl's unrolled loops: no nested quantifiers, so no backtracking blow-up.
_QUOTED_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_LITERAL_RE = re.compile(r"\[[^\[\]\\]*(?:\\.[^\[\]\\]*)*\]", re.DOTALL)
_CTEXT_RE = re.compile(r"[^()\\]*")
_DTEXT_OK = re.compile(r"\[(?:[\x21-\x5a\x5e-\x7e]|[ \t]|\r?\n)*\]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_GROUP_TAIL = re.compile(r"[ \t\r\n]*+,")
_DOMAIN_JUNK = re.compile(r"[\s<>(),;:\"\\]")

Token = tuple[int, int, int, bool]  # kind, start, end, well-formed


def _next_token(value: str, pos: int) -> Token:
    """The token at `pos` (which must be < len(value))."""
    m = _TOKEN.match(value, pos)
    assert m is not None  # the last alternative matches any character
    kind = m.lastindex or _JUNK
    if kind != _OPEN:
        return kind, pos, m.end(), kind != _JUNK
    ch = value[pos]
    n = len(value)
    if ch == '"':
        q = _QUOTED_RE.match(value, pos)
        if q is None:
            return _QUOTED, pos, n, False
        return _QUOTED, pos, q.end(), True
    if ch == "[":
        lit = _LITERAL_RE.match(value, pos)
        if lit is None:
            return _JUNK, pos, pos + 1, False  # a stray '[' swallows nothing
        return _LITERAL, pos, lit.end(), True
    # A comment: nested, with quoted-pairs; unterminated runs to the end.
    depth = 1
    i = pos + 1
    while True:
        c = _CTEXT_RE.match(value, i)
        i = c.end() if c is not None else i
        if i >= n:
            return _COMMENT, pos, n, False
        ch = value[i]
        if ch == "\\":
            i += 2
            if i > n:
                return _COMMENT, pos, n, False
        elif ch == "(":
            depth += 1
            i += 1
        else:
            depth -= 1
            i += 1
            if depth == 0:
                return _COMMENT, pos, i, True


# --- element parsing ---------------------------------------------------------


def _is_sig(tok: Token) -> bool:
    return tok[0] not in (_WS, _COMMENT)


def _text(value: str, tok: Token) -> str:
    return value[tok[1] : tok[2]]


def _is_char(value: str, tok: Token, ch: str) -> bool:
    return tok[0] == _SPECIAL and value[tok[1]] == ch


def _phrase_ok(value: str, toks: list[Token]) -> bool:
    """obs-phrase: word *(word / "." ); comments already removed."""
    if not toks or toks[0][0] not in (_ATOM, _QUOTED):
        return False
    return all(t[0] in (_ATOM, _QUOTED) or _is_char(value, t, ".") for t in toks)


def _dotted(value: str, toks: list[Token], kinds: tuple[int, ...]) -> str | None:
    """Join `word *("." word)` without the CFWS between them; None if not that shape."""
    if not toks or len(toks) % 2 == 0:
        return None
    parts: list[str] = []
    for i, t in enumerate(toks):
        if i % 2 == 0:
            if t[0] not in kinds:
                return None
            parts.append(_FOLD.sub("", _text(value, t)))
        elif not _is_char(value, t, "."):
            return None
    return ".".join(parts)


def _domain(value: str, toks: list[Token]) -> str | None:
    """A domain as written (CFWS removed), or None when it is not one."""
    if len(toks) == 1 and toks[0][0] == _LITERAL:
        lit = _text(value, toks[0])
        if _DTEXT_OK.fullmatch(lit) is None:
            return None
        return "".join(lit.split())
    if len(toks) >= 2 and _is_char(value, toks[-1], "."):
        toks = toks[:-1]  # the absolute form `example.com.`
    return _dotted(value, toks, (_ATOM,))


def _addr_spec(value: str, toks: list[Token]) -> tuple[str, str] | None:
    """`(local, domain as written)` for `local-part "@" domain`, else None."""
    at = [i for i, t in enumerate(toks) if _is_char(value, t, "@")]
    if len(at) != 1:
        return None
    local = _dotted(value, toks[: at[0]], (_ATOM, _QUOTED))
    domain = _domain(value, toks[at[0] + 1 :])
    if local is None or domain is None:
        return None
    if _ENCODED_WORD.search(local) or _ENCODED_WORD.search(domain):
        return None
    if _SURROGATE.search(local) or _SURROGATE.search(domain):
        return None  # bytes that are not UTF-8: no mail system can route them
    return local, domain


def _route_ok(value: str, toks: list[Token]) -> bool:
    """obs-domain-list: *(CFWS / ",") "@" domain *("," [CFWS] ["@" domain])."""
    seen = False
    i = 0
    while i < len(toks):
        t = toks[i]
        if _is_char(value, t, ","):
            i += 1
            continue
        if not _is_char(value, t, "@"):
            return False
        j = i + 1
        while j < len(toks) and not _is_char(value, toks[j], ","):
            j += 1
        if _domain(value, toks[i + 1 : j]) is None:
            return False
        seen = True
        i = j
    return seen


def _invalid(value: str, start: int, end: int) -> Address:
    """The address that stands for a malformed element: never dropped, always external."""
    raw = value[start:end]
    domain = ""
    at = raw.rfind("@")
    if at != -1:
        rest = raw[at + 1 :].lstrip()
        if rest.startswith("["):
            close = rest.find("]")
            rest = rest[: close + 1] if close != -1 else rest
        else:
            cut = _DOMAIN_JUNK.search(rest)
            rest = rest[: cut.start()] if cut is not None else rest
        domain = normalize_domain(rest)
    return Address(local=" ".join(raw.split()), domain=domain, raw=raw, valid=False)


def _mailbox(value: str, toks: list[Token], ok: bool) -> Mailbox | None:
    """Parse one list element; None when it holds only whitespace and comments."""
    lo = 0
    hi = len(toks)
    while lo < hi and toks[lo][0] == _WS:
        lo += 1
    while hi > lo and toks[hi - 1][0] == _WS:
        hi -= 1
    if lo == hi:
        return None
    start, end = toks[lo][1], toks[hi - 1][2]
    while value[end - 1] in " \t\r\n":  # an unterminated comment took the blanks too
        end -= 1
    sig = [t for t in toks[lo:hi] if _is_sig(t)]
    if not sig and all(t[3] for t in toks[lo:hi]):
        return None  # only comments: an empty obs-addr-list element
    # An unterminated comment or quote anywhere makes the element invalid:
    # what it swallowed may still be shown to recipients.
    ok = ok and all(t[3] for t in toks[lo:hi])
    parsed = _parse_mailbox(value, sig) if ok else None
    if parsed is None:
        bad = _invalid(value, start, end)
        return Mailbox(bad, start, end, _seen(bad, bad.raw))
    local, domain, display = parsed
    raw = value[start:end]
    address = Address(local, normalize_domain(domain), raw, display, True)
    return Mailbox(address, start, end, _seen(address, raw) if _needs_reading(raw) else ())


def _parse_mailbox(value: str, sig: list[Token]) -> tuple[str, str, str | None] | None:
    """`(local, domain, display)` for a well-formed mailbox, else None."""
    lt = [i for i, t in enumerate(sig) if _is_char(value, t, "<")]
    if not lt:
        spec = _addr_spec(value, sig)
        return None if spec is None else (spec[0], spec[1], None)
    gt = [i for i, t in enumerate(sig) if _is_char(value, t, ">")]
    if len(lt) != 1 or len(gt) != 1 or gt[0] != len(sig) - 1 or gt[0] < lt[0]:
        return None
    phrase = sig[: lt[0]]
    display: str | None = None
    if phrase:
        if not _phrase_ok(value, phrase):
            return None
        display = value[phrase[0][1] : phrase[-1][2]]
    inner = sig[lt[0] + 1 : gt[0]]
    colons = [i for i, t in enumerate(inner) if _is_char(value, t, ":")]
    if len(colons) > 1:
        return None
    if colons:
        if not _route_ok(value, inner[: colons[0]]):
            return None
        inner = inner[colons[0] + 1 :]
    spec = _addr_spec(value, inner)
    return None if spec is None else (spec[0], spec[1], display)


def _medium(value: str, pos: int) -> tuple[Mailbox, int] | None:
    """The tier-2 regex at `pos`: the mailbox and where its separator ends, or None."""
    m = _MEDIUM.match(value, pos)
    if m is None:
        return None
    raw, display, l1, d1, l2, d2 = m.groups()  # one call, not six (see parse_address_list)
    local, domain = (l1, d1) if l1 is not None else (l2, d2)
    if _MREFUSE.search(local) is not None or _MREFUSE.search(domain) is not None:
        return None  # the tokenizer knows how to refuse these
    start = m.start(1)
    raw = raw.rstrip(" \t\r\n")  # the trailing CFWS may end in blanks
    domain = _mclean(domain).removesuffix(".")
    address = Address(_mclean(local), normalize_domain(domain), raw, display, True)
    # _needs_reading, inlined: tier 2 takes most elements of a mixed list
    if raw.count("@") > 1 or "=?" in raw or not raw.isascii():
        return Mailbox(address, start, start + len(raw), _seen(address, raw)), m.end()
    return Mailbox(address, start, start + len(raw)), m.end()


def _group_seen(text: str) -> tuple[Address, ...]:
    """What a group's name (with its comments, up to the ':') shows."""
    return tuple(address_like(text)) if at_signs(text) else ()


def _slow_item(value: str, pos: int, items: list[Item], fast: bool = True) -> int:
    """Parse one top-level element (a mailbox or a whole group) from `pos`.

    Appends what it found to `items` and returns where the next element
    starts (after the separating comma, or after the group's ';').
    `fast=False` uses the tokenizer alone: the reference the tests hold the
    regex tiers to.
    """
    n = len(value)
    toks: list[Token] = []
    angle = False
    ok = True
    group: tuple[str, int, int, list[Mailbox]] | None = None  # display, start, ':' end
    if fast:
        # The usual `Name: ...;`: the state the tokenizer reaches at the ':',
        # without tokenizing the name.
        g = _GROUP_START.match(value, pos)
        if g is not None:
            pos = g.end()
            group = (g.group(1), g.start(1), pos, [])

    def flush() -> None:
        nonlocal toks, ok
        mb = _mailbox(value, toks, ok and not angle)
        if mb is not None:
            if group is not None:
                group[3].append(mb)
            else:
                items.append(mb)
        toks = []
        ok = True

    while pos < n:
        if fast and group is not None and not toks:
            # A group member: the regex tier handles the usual shapes here too.
            found = _medium(value, pos)
            if found is not None:
                group[3].append(found[0])
                pos = found[1]
                if value[pos - 1] != ";":
                    continue
                display, gstart, colon_end, members = group
                seen = _group_seen(value[gstart:colon_end])
                items.append(Group(display, tuple(members), gstart, pos, seen))
                sep = _GROUP_TAIL.match(value, pos)
                return sep.end() if sep is not None else pos
        tok = _next_token(value, pos)
        pos = tok[2]
        if tok[0] == _SPECIAL:
            ch = value[tok[1]]
            if ch == "," and not angle:
                flush()
                if group is None:
                    return pos
                continue
            if ch == "<":
                ok = ok and not angle  # nested '<' is junk
                angle = True
            elif ch == ">":
                ok = ok and angle  # stray '>' is junk
                angle = False
            elif ch == ":" and not angle and group is None:
                sig = [t for t in toks if _is_sig(t)]
                # A display name that is no phrase (only a comment, say) still
                # makes a group: its members are what the reader sees listed.
                if ok and (not sig or _phrase_ok(value, sig)) and all(t[3] for t in toks):
                    shown = [t for t in toks if t[0] != _WS]
                    gstart = shown[0][1] if shown else tok[1]
                    last = sig or shown  # the phrase's end; a comment when it is all there is
                    display = value[gstart : last[-1][2]] if last else ""
                    group = (display, gstart, pos, [])
                    toks = []
                    continue
            elif ch == ";" and not angle:
                flush()
                if group is not None:
                    display, gstart, colon_end, members = group
                    seen = _group_seen(value[gstart:colon_end])
                    items.append(Group(display, tuple(members), gstart, pos, seen))
                    # Take the comma after the group too, so the fast path resumes.
                    sep = _GROUP_TAIL.match(value, pos)
                    if sep is not None:
                        return sep.end()
                # Outside a group a ';' is what Outlook users type between
                # addresses: split there, or `a@x;b@y;...` would count as one.
                return pos
        toks.append(tok)
    flush()
    if group is not None:
        # No closing ';': the group runs to the end of the value.
        display, gstart, colon_end, members = group
        gend = members[-1].end if members else colon_end
        items.append(Group(display, tuple(members), gstart, gend, _group_seen(value[gstart:colon_end])))
    return n


def parse_address_list(value: str) -> list[Item]:
    """Parse an address-list field value into mailboxes and groups; never raises."""
    items: list[Item] = []
    n = len(value)
    pos = 0
    fast = _FAST.match
    while pos < n:
        m = fast(value, pos)
        if m is not None:
            # One groups() call instead of six group()/span() calls: this loop
            # runs once per address, and the calls were a third of its cost.
            raw, display, l1, d1, l2, d2 = m.groups()
            if "=?" not in raw:
                start = m.start(1)
                if l1 is not None:
                    address = Address(l1, normalize_domain(d1), raw, display, True)
                else:
                    address = Address(l2, normalize_domain(d2), raw, None, True)
                items.append(Mailbox(address, start, start + len(raw)))
                pos = m.end()
                continue
        found = _medium(value, pos)
        if found is not None:
            items.append(found[0])
            pos = found[1]
            continue
        pos = _slow_item(value, pos, items)
    return items


# --- header-level helpers ------------------------------------------------------


def _mailboxes(items: Iterable[Item]) -> Iterable[Mailbox]:
    for item in items:
        if isinstance(item, Group):
            yield from item.members
        else:
            yield item


def parse_fields(block: HeaderBlock, names: Iterable[str] = RECIPIENT_FIELDS) -> dict[int, list[Item]]:
    """The fields called `names`, each parsed once: index in `block.fields` -> its items.

    Why: the engine needs the same parse twice (who is visible, then what the
    rewrite keeps); parsing a 100-address To was a third of `evaluate`.
    The dict keeps message order.
    """
    wanted = {n.lower() for n in names}
    return {i: parse_address_list(f.value) for i, f in enumerate(block.fields) if f.lname in wanted}


def addresses_of(parsed: dict[int, list[Item]]) -> list[Address]:
    """Every address a reader sees in `parse_fields` output, in message order, duplicates kept.

    A well-formed mailbox gives its routing address, then whatever its
    display name and comments show (`Mailbox.seen`); a malformed one gives
    only what it shows; a group's display name counts too.
    """
    out: list[Address] = []
    append = out.append
    for items in parsed.values():
        for item in items:
            if type(item) is Mailbox:
                if item.address.valid:
                    append(item.address)
                if item.seen:
                    out.extend(item.seen)
            else:
                assert isinstance(item, Group)
                if item.seen:
                    out.extend(item.seen)
                for mb in item.members:
                    if mb.address.valid:
                        append(mb.address)
                    if mb.seen:
                        out.extend(mb.seen)
    return out


def header_recipients(block: HeaderBlock, names: Iterable[str]) -> list[Address]:
    """Every mailbox in the fields called `names`, in message order, duplicates kept."""
    return addresses_of(parse_fields(block, names))


def late_recipients(block: HeaderBlock) -> tuple[Address, ...]:
    """What To/Cc/Resent-To/Resent-Cc after a broken header line show (body text to the MTA)."""
    if not block.late:
        return ()
    late = {i: parse_address_list(f.value) for i, f in enumerate(block.late) if f.lname in RECIPIENT_FIELDS}
    return tuple(addresses_of(late))


def visible_recipients(block: HeaderBlock) -> list[Address]:
    """Every address To/Cc/Resent-To/Resent-Cc show the recipients, after a stray line too."""
    return header_recipients(block, RECIPIENT_FIELDS) + list(late_recipients(block))


def first_from(block: HeaderBlock) -> Mailbox | None:
    """The first well-formed mailbox of the first From field that has one.

    Invalid ones are skipped because the caller puts this text into a To
    field ("To becomes the sender"); junk there would help no one.
    """
    for f in block.get_all("from"):
        for mb in _mailboxes(parse_address_list(f.value)):
            if mb.address.valid:
                return mb
    return None
