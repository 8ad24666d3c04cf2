"""Split delivery, the pure half: which copies a message becomes, and the bytes of each.

A split message is spooled once, as its original bytes plus a `SplitPlan`
(small, JSON-able), and each copy is rendered from those two when it is
delivered. Storing 300 rendered copies would multiply a large message by
300 on disk before the client even hears 250; rendering is cheap and, being
a pure function of what is stored, gives the same bytes after a restart.

Copies:
- every external envelope recipient gets its own copy, To = that recipient
  alone (its header text, so a display name is kept; its bare address when
  it was only in Bcc), with every hidden address removed from Cc and
  Resent-*;
- the internal and partner envelope recipients together get one copy with
  the ordinary rewrite (hidden addresses out of To/Cc, the To fallback).
Message-ID and every other field stay byte for byte in all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bccguard.policy.headers import HeaderBlock, parse_header
from bccguard.policy.model import Address, person_key
from bccguard.policy.reader import address_like
from bccguard.policy.rewrite import personalize, rewrite_headers


@dataclass(frozen=True, slots=True)
class CopySpec:
    """One upstream transaction of a split: its recipients and its To.

    `to` is the personalised To text; None marks the shared copy for the
    internal and partner recipients (the rewritten message).
    """

    rcpts: tuple[str, ...]
    to: str | None


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """Everything needed to render any copy from the original bytes."""

    hide: frozenset[str]  # `Address.key`s removed from every copy's To/Cc (the visible externals)
    to_fallback: str  # To of the shared copy when nothing visible is left in it
    stamp: str  # X-BCCGuard value
    reply_to: str | None  # Reply-To to add when absent (storm guard), or None
    copies: tuple[CopySpec, ...]

    def render_json(self) -> dict[str, Any]:
        """The rendering half as stored in a spool entry (copies are stored per copy)."""
        return {
            "hide": sorted(self.hide),
            "to_fallback": self.to_fallback,
            "stamp": self.stamp,
            "reply_to": self.reply_to,
        }


def _to_text(a: Address) -> str:
    """The To of a personal copy: the header text, unless it shows another address too."""
    raw = a.raw
    if not raw:
        return a.addr_spec
    if any(x.key != a.key for x in address_like(raw)):
        return f"<{a.addr_spec}>"
    return raw


def plan_split(
    visible: Sequence[Address],
    rcpts: Sequence[str],
    *,
    hide: Iterable[str],
    is_external: Callable[[str], bool],
    domain_of: Callable[[str], str],
    to_fallback: str,
    stamp: str,
    reply_to: str | None,
) -> SplitPlan:
    """The copies of one message, in envelope order (personal copies first, shared copy last).

    `is_external(rcpt)` classifies an envelope recipient; `domain_of(rcpt)`
    normalises its domain the way header addresses are (IDNA, lower case),
    so `Bob <bob@Example.COM>` gives its display name to `bob@example.com`.
    """
    headers: dict[str, str] = {}
    for a in visible:
        if a.valid and a.domain and not a.in_text:
            key = a.key
            if key not in headers:
                headers[key] = _to_text(a)
    copies: list[CopySpec] = []
    shared: list[str] = []
    seen: set[str] = set()
    for r in rcpts:
        if r in seen:
            continue
        seen.add(r)
        if is_external(r):
            local, _, _ = r.rpartition("@")
            to = headers.get(person_key(local, domain_of(r)), r)
            copies.append(CopySpec(rcpts=(r,), to=to))
        else:
            shared.append(r)
    if shared:
        copies.append(CopySpec(rcpts=tuple(shared), to=None))
    return SplitPlan(
        hide=frozenset(hide), to_fallback=to_fallback, stamp=stamp, reply_to=reply_to, copies=tuple(copies)
    )


def render(
    message: bytes,
    render_spec: dict[str, Any] | None,
    to: str | None,
    *,
    block: HeaderBlock | None = None,
) -> bytes:
    """The bytes of one copy. No spec: the message as it is (retries, DSNs, notices).

    `block` may be passed to parse the original's header once for many copies.
    """
    if render_spec is None:
        return message
    if block is None:
        block = parse_header(message)
    hide = frozenset(render_spec["hide"])  # keys; entries spooled before 2026-12 hold addr-specs

    def hidden(a: Address) -> bool:
        return a.key in hide or a.addr_spec in hide

    reply_to = render_spec.get("reply_to")
    stamp = str(render_spec["stamp"])
    if to is None:
        out, _ = rewrite_headers(
            message,
            block,
            hidden,
            to_fallback=str(render_spec["to_fallback"]),
            stamp=stamp,
            reply_to=reply_to,
        )
        return out
    return personalize(
        message, block, to, keep=lambda a: not hidden(a), stamp=stamp, reply_to=reply_to
    )
