"""Plain data shared by the policy core and the edges around it.

Nothing here does I/O: the SMTP handler, the CLI and the stores all speak
these types, so a verdict reached in `bccguard check` is the very object the
relay acts on.
"""

from __future__ import annotations

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

    @property
    def addr_spec(self) -> str:
        """The comparable form: local part as written, normalised domain."""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"


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
    sorted, distinct external addr-specs seen in To/Cc/Resent-To/Resent-Cc;
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

    @property
    def changes_message(self) -> bool:
        """True when the message will not go out exactly as submitted."""
        return self.action not in (Action.PASS, Action.AUDIT)
