"""Plain data shared by the policy core and the edges around it.

Nothing here does I/O: the SMTP handler, the CLI and the stores all speak
these types, so a verdict reached in `bccguard check` is the very object the
relay acts on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum


class AddressClass(StrEnum):
    """Who an address belongs to, from the company's point of view."""

    INTERNAL = "internal"
    PARTNER = "partner"
    CONSUMER = "consumer"  # a personal mailbox provider: external, and counted twice
    EXTERNAL = "external"

    @property
    def is_external(self) -> bool:
        """Consumer mailboxes are external too; partners are allow-listed, never counted."""
        return self in (AddressClass.CONSUMER, AddressClass.EXTERNAL)


class Action(StrEnum):
    PASS = "pass"  # noqa: S105 - an action, not a password
    AUDIT = "audit"
    REWRITE = "rewrite"
    SPLIT = "split"
    QUARANTINE = "quarantine"
    REJECT = "reject"


class OnSigned(StrEnum):
    """What to do when a rewrite would break a DKIM signature over To/Cc."""

    REWRITE = "rewrite"
    QUARANTINE = "quarantine"
    REJECT = "reject"


class OnMalformed(StrEnum):
    """What to do with an exposure the rewrite cannot reach (recipient fields after a broken header)."""

    QUARANTINE = "quarantine"
    REJECT = "reject"


class BusinessReplies(StrEnum):
    """A reply (In-Reply-To/References) showing no consumer address: a business thread, or bulk mail?"""

    PASS = "pass"  # noqa: S105 - a choice, not a password
    COUNT = "count"


class RewriteTo(StrEnum):
    SENDER = "sender"
    UNDISCLOSED = "undisclosed"


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox as it stands in a header, plus its comparable form.

    `local` is the local part as written (quotes kept, case kept: RFC 5321
    says only the receiving host may interpret it). `domain` is normalised
    to lower-case IDNA A-labels so that `Example.COM`, `bücher.example` and
    `xn--bcher-kva.example` compare equal. An address that could not be
    parsed keeps `valid=False`; policy counts it as external, never drops it.
    """

    local: str
    domain: str
    raw: str = ""
    display: str | None = None
    valid: bool = True
    # Found in text a reader sees (display name, comment, encoded word,
    # unparseable element), not the element's routing address: it counts,
    # but nothing is ever delivered to it.
    in_text: bool = False

    @property
    def addr_spec(self) -> str:
        """Local part as written, normalised domain; malformed text: the text alone."""
        if not self.domain or not self.valid:
            return self.local
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """The form two spellings of one person's mailbox share, for counting.

        RFC 5322 3.2.4/3.4.1: `"alice"` and `alice` are the same local part;
        case is the receiving host's business (RFC 5321 2.4), but no provider
        hands `Alice` and `alice` to two people, and a reader sees one person.
        """
        if not self.valid:
            return self.local
        return person_key(self.local, self.domain)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def person_key(local: str, domain: str) -> str:
    """`local@domain` with the local part unquoted when it is a dot-atom, then lower-cased."""
    if local[:1] == '"' and local[-1:] == '"' and len(local) >= 2:
        inner = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if _DOT_ATOM.fullmatch(inner):
            local = inner
    return f"{local.lower()}@{domain}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope, which bccguard never changes except in split copies."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    smtputf8: bool = False
    auth_user: str | None = None


@dataclass(frozen=True, slots=True)
class DlpVerdict:
    """What the customer-data detectors found and what [dlp] makes of it: counts, never values.

    `level` is "high", "low" or "" (nothing reached `low`); `counts` maps each
    detector that found something to its distinct instances; `unreadable` is
    how many parts could not be read; `over_limit` names the scan limits reached.
    """

    action: Action
    level: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    levels: dict[str, str] = field(default_factory=dict)  # detector -> "low" | "high", those that reached one
    places: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable: int = 0
    over_limit: tuple[str, ...] = ()
    scanned_bytes: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy decided for one message, and the numbers behind it.

    `action` is what the relay does. For `audit` it forwards unchanged and
    `would` names what enforcement would have done. `visible_external` is the
    sorted, distinct external addresses a reader sees in To/Cc/Resent-To/
    Resent-Cc, one per person (`Address.key`); `unparsed` the text there
    that holds an '@' but no address (each counted as one external);
    `hidden` is how many distinct addresses the rewrite removes (or would).
    """

    action: Action
    rule: str
    exposure: bool
    visible: int = 0
    visible_external: tuple[str, ...] = ()
    visible_consumer: int = 0
    external_rcpts: int = 0
    hidden: int = 0
    would: Action | None = None
    reason: str = ""
    signed: bool = False
    dlp: DlpVerdict | None = None  # set when [dlp] scanned the message (enabled, in scope)
    # Text in To/Cc that is not an address but holds an '@' and no address
    # either: each counts as one external address, and is listed apart.
    unparsed: tuple[str, ...] = ()

    @property
    def changes_message(self) -> bool:
        """True when the message will not go out exactly as submitted."""
        return self.action not in (Action.PASS, Action.AUDIT)
