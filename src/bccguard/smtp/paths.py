"""Envelope address checks: what aiosmtpd lets through, we refuse ourselves.

aiosmtpd accepted a bare CR inside `RCPT TO:<...>` in a loopback trial, and
parses every argument with the email package's slow header parser. Plain
dot-atom addresses (nearly all real traffic) are checked by one compiled
regex; anything else goes to email-validator, which knows quoted local
parts, address literals and internationalised addresses.
"""

from __future__ import annotations

import re

# aiosmtpd's own path parser, used the same way; only the defects check is ours.
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError, InvalidHeaderDefect

from email_validator import EmailNotValidError, validate_email

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*")
_ANGLE = re.compile(r"<([^<>\s]*)>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, brackets included


def split_path(arg: str) -> tuple[str, str] | None:
    """Fast path for `<addr> params`: (addr, rest), or None to let aiosmtpd parse it."""
    m = _ANGLE.match(arg)
    if m is None:
        return None
    addr = m.group(1)
    if addr.startswith("@") or '"' in addr:  # source routes, quoted parts: the full parser
        return None
    return addr, arg[m.end() :]


def raw_path_with_controls(arg: str) -> tuple[str, str] | None:
    """The path as sent, when it holds control characters; else None.

    aiosmtpd's fallback parser "repairs" such paths into other addresses
    (`<a\tb@x>` becomes `"a b"@x`), so the relay would act on an address
    the client never sent. Handing the raw text on makes `path_problem`
    refuse it instead.
    """
    if arg.startswith("<"):
        end = arg.find(">")
        path, rest = (arg[1:end], arg[end + 1 :]) if end >= 0 else (arg[1:], "")
    else:
        path, _, rest = arg.partition(" ")
    if _CONTROL.search(path):
        return path, rest
    return None


def parse_path(arg: str) -> tuple[str | None, str | None]:
    """What `split_path` leaves over (quoted local parts, source routes, no brackets).

    Like aiosmtpd's `_getaddr`, but a path the parser had to repair is
    refused, (None, None) -> "553 5.1.3", instead of used: it turns
    `<a b@x>` into `"a b"@x`, an address the client never sent. Obsolete
    syntax (source routes, which RFC 5321 4.1.2 says to accept and ignore)
    is not a repair.
    """
    if not arg:
        return "", ""
    try:
        token, rest = (get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec)(arg)
    except (HeaderParseError, IndexError, ValueError):
        return None, None
    if any(isinstance(d, InvalidHeaderDefect) for d in token.all_defects):
        return None, None
    return token.addr_spec, str(rest)


def path_problem(address: str, *, smtputf8: bool) -> str | None:
    """Why `address` may not be used in MAIL/RCPT, or None. Never echoes the address."""
    if len(address) + 2 > MAX_PATH:
        return "501 5.1.3 Address too long (RFC 5321 4.5.3.1.3)"
    if _CONTROL.search(address):
        return "501 5.1.3 Control characters are not allowed in addresses"
    # ASCII (nearly every address) has no surrogate escapes: skip the per-character scan.
    if not address.isascii():
        if any("\udc80" <= c <= "\udcff" for c in address):
            return "501 5.1.3 Address is not valid UTF-8"
        if not smtputf8:
            return "553 5.6.7 Non-ASCII address requires the SMTPUTF8 extension"
    if _PLAIN.fullmatch(address) and len(address.partition("@")[0]) <= 64:
        return None
    try:
        validate_email(
            address,
            check_deliverability=False,
            allow_smtputf8=True,
            allow_quoted_local=True,
            allow_domain_literal=True,
            globally_deliverable=False,
        )
    except EmailNotValidError:
        return "553 5.1.3 Malformed address"
    return None
