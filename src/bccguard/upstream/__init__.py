"""Upstream delivery: hand a message to the corporate MTA (or a Maildir) and report the truth.

"Nothing is lost": the relay answers its client 250 only after the upstream
accepted the message, so everything here reports per recipient what the
upstream actually said, and every transport failure is an `UpstreamError`,
never a silent success. No full address ever appears in an exception text
or a log line of this package.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from bccguard.config import UpstreamConfig, upstream_parts

# RFC 3463 class.subject.detail at the start of the text.
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?=\s|$)")

ErrorKind = Literal["connect", "timeout", "tls", "protocol", "4xx", "5xx"]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code plus text (lines joined with "\\n", enhanced code kept)."""

    code: int
    text: str

    @property
    def is_ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def status(self) -> str:
        """Code plus enhanced status code if any ("550 5.1.1"): loggable, no address."""
        m = _ENHANCED.match(self.text)
        return f"{self.code} {m.group(0)}" if m else str(self.code)

    def enhanced(self) -> str:
        """The enhanced status code ("5.1.1"), or the class default ("5.0.0"/"4.0.0") for DSNs."""
        m = _ENHANCED.match(self.text)
        if m:
            return m.group(0)
        return "5.0.0" if self.is_permanent else "4.0.0"

    def line(self) -> str:
        """First line as "550 5.1.1 unknown user", ready to relay to our own client."""
        first = self.text.split("\n", 1)[0]
        return f"{self.code} {first}" if first else str(self.code)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What the upstream did with one transaction.

    `accepted` is non-empty only when the upstream accepted the content, and
    then `reply` is its 2xx answer to the end of DATA. When no recipient was
    accepted, `accepted` is empty, no content was sent and `reply` is the most
    significant refusal (a 4xx if any refusal was temporary, so the client retries).
    """

    accepted: tuple[str, ...]
    refused: dict[str, Reply]
    reply: Reply
    elapsed: float


class UpstreamError(Exception):
    """The message was not delivered, as a whole.

    kind:
      connect   could not connect, or the connection was lost mid-session
      timeout   a network step took longer than upstream.timeout
      tls       TLS handshake/verification failed, or STARTTLS required but unavailable
      protocol  the upstream's reply was malformed, too long, or out of sequence
      4xx/5xx   the upstream refused the session, MAIL FROM, or DATA as a whole
                (`reply` holds its answer)

    A connection lost after the final "." was sent may still have delivered
    the message; it is reported as an error anyway (a duplicate beats a loss).
    """

    def __init__(self, kind: ErrorKind, reason: str, reply: Reply | None = None) -> None:
        # Only the codes: reply texts often quote the address ("<bob@x>: unknown").
        super().__init__(reason if reply is None else f"{reason} ({reply.status()})")
        self.kind: ErrorKind = kind
        self.reply = reply

    @classmethod
    def refused(cls, reason: str, reply: Reply) -> UpstreamError:
        """4xx/5xx error from a reply (codes outside those ranges are protocol errors)."""
        if reply.is_temporary:
            return cls("4xx", reason, reply)
        if reply.is_permanent:
            return cls("5xx", reason, reply)
        return cls("protocol", f"{reason}: unexpected reply {reply.code}", reply)


class Upstream(Protocol):
    """Where accepted mail goes. Implementations are safe for concurrent deliveries."""

    async def deliver(
        self,
        mail_from: str,
        rcpt_tos: Sequence[str],
        message: bytes,
        *,
        smtputf8: bool = False,
        eightbit: bool = False,
    ) -> DeliveryResult: ...

    async def probe(self) -> None:
        """Cheap reachability check for /readyz; raises UpstreamError."""

    async def close(self) -> None:
        """Release connections (QUIT pooled ones)."""


def significant_refusal(replies: Sequence[Reply]) -> Reply:
    """The reply to give when nobody was accepted: 5xx only if every refusal was 5xx."""
    for r in replies:
        if not r.is_permanent:
            return r
    return replies[0]


def open_upstream(cfg: UpstreamConfig, *, hostname: str) -> Upstream:
    """Build the upstream for `cfg.url`; `hostname` is our EHLO name unless cfg.helo_name is set.

    Nothing connects here: the first delivery or probe does.
    """
    scheme, host, port, path = upstream_parts(cfg.url)
    if scheme == "maildir":
        from bccguard.upstream.maildir import MaildirUpstream

        return MaildirUpstream(path, hostname=hostname)
    from bccguard.upstream.smtp import SMTPUpstream

    return SMTPUpstream(
        cfg,
        scheme=scheme,
        host=host,
        port=port,
        helo_name=cfg.helo_name or hostname,
    )


__all__ = [
    "DeliveryResult",
    "ErrorKind",
    "Reply",
    "Upstream",
    "UpstreamError",
    "open_upstream",
]
