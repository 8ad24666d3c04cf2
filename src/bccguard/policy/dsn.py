"""RFC 3464 delivery status notifications, built as bytes. Pure.

Used when bccguard has accepted a message (said 250) and later learns that
some recipients can never get it: the upstream refused them permanently, or
their spooled copy expired. The notice goes to the envelope sender only (who
chose those recipients), from the null sender so it can never loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate, make_msgid

from bccguard.policy.headers import parse_header


@dataclass(frozen=True, slots=True)
class Failure:
    recipient: str
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the upstream's reply line, e.g. "550 5.1.1 user unknown"
    action: str = "failed"  # "failed" or "delayed"


def build_dsn(
    original: bytes,
    *,
    sender: str,
    reporting_mta: str,
    failures: Sequence[Failure],
    explanation: str,
) -> bytes:
    """A multipart/report DSN carrying the original's header block (never its body)."""
    boundary = f"bccguard-dsn-{time.time_ns():x}"
    block = parse_header(original)
    original_headers = original[: block.body_offset].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not original_headers.endswith(b"\r\n\r\n"):
        original_headers = original_headers.rstrip(b"\r\n") + b"\r\n\r\n"
    per_rcpt = []
    for f in failures:
        per_rcpt.append(
            "\r\n".join(
                [
                    f"Final-Recipient: rfc822; {f.recipient}",
                    f"Action: {f.action}",
                    f"Status: {f.status}",
                    f"Diagnostic-Code: smtp; {_one_line(f.diagnostic)}",
                ]
            )
        )
    human = (
        f"This is the mail system at {reporting_mta}.\r\n\r\n{explanation}\r\n\r\n"
        + "\r\n".join(f"<{f.recipient}>: {_one_line(f.diagnostic)}" for f in failures)
        + "\r\n"
    )
    head = "\r\n".join(
        [
            f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
            f"To: <{sender}>",
            "Subject: Undelivered Mail Returned to Sender"
            if any(f.action == "failed" for f in failures)
            else "Subject: Delayed Mail (still being retried)",
            f"Date: {formatdate(localtime=False, usegmt=True)}",
            f"Message-ID: {make_msgid(domain=reporting_mta)}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ]
    )
    status = f"Reporting-MTA: dns; {reporting_mta}\r\nArrival-Date: {formatdate(usegmt=True)}\r\n\r\n"
    status += "\r\n\r\n".join(per_rcpt) + "\r\n"
    parts = [
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{human}",
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n{status}",
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n",
    ]
    out = (head + "\r\n\r\n" + "\r\n".join(parts[:2]) + "\r\n" + parts[2]).encode("utf-8", "surrogateescape")
    return out + original_headers + f"--{boundary}--\r\n".encode()


def _one_line(text: str) -> str:
    return " ".join(text.split())
