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

ErrorKind = Literal[
    "connect", "timeout", "tls", "protocol", "session", "capability", "storage", "4xx", "5xx"
]

# What bccguard's own EHLO promises its clients (aiosmtpd with decode_data=False
# offers 8BITMIME; SMTPUTF8 and SIZE are switched on in smtp/protocol_init.py).
ADVERTISED = ("8BITMIME", "SMTPUTF8", "SIZE")


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
      protocol  the upstream's reply was malformed (over 512 octets, not ASCII,
                not ended by CRLF, no valid code), or out of sequence
      session   the upstream refused the session itself with a 5xx (greeting,
                EHLO/HELO, STARTTLS, RSET) or does not offer the STARTTLS the
                url requires: never the message's fault, never passed on
                as permanent
      capability  the message needs what the upstream does not offer (8BITMIME)
      storage   a local store (the Maildir outbox) could not be written;
                `path` and `errno` say which and why
      4xx/5xx   the upstream deferred the session (4xx), or refused MAIL FROM
                or DATA as a whole
                (`reply` holds its answer): the only permanent refusals of a
                message as a whole that may be passed on to the client

    A connection lost after the final "." was sent may still have delivered
    the message; it is reported as an error anyway (a duplicate beats a loss).
    """

    def __init__(
        self,
        kind: ErrorKind,
        reason: str,
        reply: Reply | None = None,
        *,
        path: str = "",
        errno: str = "",
    ) -> None:
        # Only the codes: reply texts often quote the address ("<bob@x>: unknown").
        super().__init__(reason if reply is None else f"{reason} ({reply.status()})")
        self.kind: ErrorKind = kind
        self.reply = reply
        self.path = path  # storage: the file or directory that failed
        self.errno = errno  # storage: "ENOSPC", "EROFS", ...

    @classmethod
    def refused(cls, reason: str, reply: Reply) -> UpstreamError:
        """4xx/5xx error from a reply (codes outside those ranges are protocol errors).

        Only for replies to MAIL, RCPT or DATA of the message: see `session_refused`.
        """
        if reply.is_temporary:
            return cls("4xx", reason, reply)
        if reply.is_permanent:
            return cls("5xx", reason, reply)
        return cls("protocol", f"{reason}: unexpected reply {reply.code}", reply)

    @classmethod
    def session_refused(cls, reason: str, reply: Reply) -> UpstreamError:
        """A refusal of the session (greeting, EHLO/HELO, STARTTLS, RSET).

        A 554 greeting says "not you" to bccguard, not "this message is
        undeliverable": passing it on would make the sender's MTA bounce mail
        nothing was wrong with, so it is kind "session" (the client hears 451,
        /readyz turns 503 at once: it will not cure itself). A 4xx refusal
        ("421 busy") is the ordinary passing kind, "4xx"; anything else is
        not SMTP ("protocol").
        """
        if reply.is_temporary:
            return cls("4xx", reason, reply)
        if reply.is_permanent:
            return cls("session", reason, reply)
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

    def missing_capabilities(self, max_size: int) -> tuple[str, ...] | None:
        """Which of ADVERTISED the upstream lacks ("SIZE": a fixed limit below `max_size`).

        None until a connection told (after the first probe or delivery).
        """

    async def close(self) -> None:
        """Release connections (QUIT pooled ones)."""


def significant_refusal(replies: Sequence[Reply]) -> Reply:
    """The reply to give when nobody was accepted: 5xx only if every refusal was 5xx."""
    for r in replies:
        if not r.is_permanent:
            return r
    return replies[0]


def capability_gaps(extensions: dict[str, str], max_size: int) -> tuple[str, ...]:
    """Of what bccguard advertises, what an upstream with these EHLO keywords lacks.

    A gap means some message bccguard accepts cannot go upstream as it is:
    8-bit content (answered 451 4.6.3), a UTF-8 address (550 5.6.7), or a
    size between the upstream's limit and ours (552 5.3.4).
    """
    gaps = [k for k in ("8BITMIME", "SMTPUTF8") if k not in extensions]
    limit = extensions.get("SIZE", "")
    if limit.isdigit() and 0 < int(limit) < max_size:
        gaps.append("SIZE")
    return tuple(gaps)


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
    "ADVERTISED",
    "DeliveryResult",
    "ErrorKind",
    "Reply",
    "Upstream",
    "UpstreamError",
    "capability_gaps",
    "open_upstream",
]
