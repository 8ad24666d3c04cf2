"""What a mail reader shows of header text, and the address-like strings in it.

Why: RFC 2047 forbids decoding an encoded word into a *routing* address,
and the parser never does. But a recipient's mail reader decodes encoded
words everywhere (display names, comments, even in addr-spec position),
folds look-alike at-signs (U+FF20, U+FE6B) on screen into what a
person reads as `@`, and shows quoted strings without their backslashes.
A customer address written that way is seen by every recipient, so it must
count and the rewrite must remove it. This module turns raw element text
into that reader's view (RFC 2047 decoding, NFKC) and finds every
`local@domain` string in it. Pure and linear: regexes with possessive
quantifiers and a lookbehind, so a long run of text without `@` is read once.
"""

from __future__ import annotations

import binascii
import re
import unicodedata

from bccguard.policy.domains import normalize_domain
from bccguard.policy.model import Address

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
# RFC 2047 6.2: whitespace between two adjacent encoded words is not shown.
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t\r\n]+(?==\?[^?\s]+\?[bBqQ]\?)")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
# Local part characters: RFC 5322 atext (plus '.'), and any Unicode letter or
# digit (RFC 6532); no quote, bracket, space or '@'. The lookbehind makes a
# match start only where a run of them starts (linear time).
_LOCAL = r"[\w.!#$%&'*+/=?^`{|}~-]"
_ADDRESS_LIKE = re.compile(rf"(?<!{_LOCAL})({_LOCAL}++)@([\w-]++(?:\.[\w-]++)++)")
_LOCAL_EDGE = ".'`="


def _decode_word(m: re.Match[str]) -> str:
    charset, enc, text = m.group(1), m.group(2), m.group(3)
    charset = charset.partition("*")[0]  # RFC 2231 language tag
    try:
        raw = text.encode("ascii")
        if enc in "qQ":
            data = binascii.a2b_qp(raw, header=True)
        else:
            data = binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
        return data.decode(charset, "replace")
    except (UnicodeError, LookupError, binascii.Error, ValueError):
        return m.group(0)  # undecodable: a reader shows it as it is


# Every code point NFKC turns into (something holding) '@' (checked over all of Unicode).
_AT_LIKE = ("\uff20", "\ufe6b")


def at_signs(text: str) -> int:
    """How many at-signs a reader sees in `text`: a cheap upper bound for `address_like`.

    Why: most display names and comments show no address at all; counting
    at-signs after decoding encoded words (NFKC only matters for the two
    look-alikes) avoids normalising and scanning them. An element whose
    text shows one at-sign shows only its own routing address.
    """
    n = text.count("@")
    if not text.isascii():
        n += text.count(_AT_LIKE[0]) + text.count(_AT_LIKE[1])
    if "=?" in text and _MAY_HIDE_AT.search(text) is not None:
        n += sum(map(_word_at_signs, _ENCODED_WORD.finditer(text)))
    return n


# An encoded word that may decode to an at-sign: one not Q-encoded in UTF-8 or a
# single-byte charset, or one holding the Q form of '@', U+FF20 or U+FE6B.
# One C-level search clears the usual `=?utf-8?q?J=C3=BCrgen?=` display name.
_MAY_HIDE_AT = re.compile(
    r"=\?(?!(?:utf-?8|us-ascii|iso-8859-\d+|windows-125\d)(?:\*[^?]*)?\?q\?)|=40|=EF=B[9C]=", re.IGNORECASE
)


_SINGLE_BYTE = ("us-ascii", "iso-8859-", "windows-125")


def _word_at_signs(m: re.Match[str]) -> int:
    """At-signs one encoded word shows; Q words in common charsets are read without decoding."""
    charset, enc, text = m.group(1).lower(), m.group(2), m.group(3)
    if enc in "qQ":
        if charset.startswith(_SINGLE_BYTE):
            return text.count("=40")  # no look-alike exists in a single-byte charset
        if charset in ("utf-8", "utf8"):
            up = text.upper()
            return up.count("=40") + up.count("=EF=BC=A0") + up.count("=EF=B9=AB")
    shown = _decode_word(m)
    return shown.count("@") + shown.count(_AT_LIKE[0]) + shown.count(_AT_LIKE[1])


def reader_text(text: str, *, join: bool = True) -> str:
    """`text` as a mail reader displays it: unfolded, RFC 2047 decoded, NFKC-normalised.

    `join=False` keeps the blanks between adjacent encoded words (RFC 2047
    6.2 drops them): see `address_like`.
    """
    if "\n" in text:
        text = _FOLD.sub("", text)
    if "=?" in text:
        text = _ENCODED_WORD.sub(_decode_word, _BETWEEN_WORDS.sub("", text) if join else text)
    if "\\" in text:
        text = _QUOTED_PAIR.sub(r"\1", text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
        if "\u3002" in text:  # NFKC maps the other dot look-alikes (U+FF0E, U+FF61) already
            text = text.replace("\u3002", ".")
    return text


def address_like(text: str) -> list[Address]:
    """Every `local@domain` string a reader sees in raw header `text`, in order.

    Each comes back as a valid Address marked `in_text` (local part
    lower-cased, domain normalised), to be counted and classified by its own
    domain like any other.
    """
    shown = reader_text(text)
    out = _find(shown)
    if "=?" in text and _BETWEEN_WORDS.search(text) is not None:
        # Adjacent encoded words: a reader joins them (`=?..?q?alice?= =?..?q?=40x.example?=`
        # shows alice@x.example), but a list written as `=?..a=40x.example?= =?..b=40x.example?=`
        # joins into odd strings (`a@x.exampleb`) where a person reads two addresses.
        # Take the reading that shows more addresses (joined on a tie, as readers do).
        apart = _find(reader_text(text, join=False))
        if len(apart) > len(out):
            return apart
    return out


def _find(shown: str) -> list[Address]:
    if "@" not in shown:
        return []
    out: list[Address] = []
    for m in _ADDRESS_LIKE.finditer(shown):
        local = m.group(1).strip(_LOCAL_EDGE)
        domain = m.group(2).strip("-_")
        if not local or "." not in domain:
            continue
        out.append(Address(local.lower(), normalize_domain(domain), m.group(0), None, True, True))
    return out
