"""Sender notices, the pure half: whether a message may get one, and its bytes.

The point of a notice is teaching: the sender learns what bccguard did and
to use Bcc next time. So it says what happened, how many addresses, which
rule, and what to do; it names no recipient (the sender knows whom they
wrote to, and a notice is one more copy of mail that may be forwarded).

A notice must never answer automatic mail: that is how mail loops and
backscatter start (RFC 3834 section 2). So no notice for the null sender,
MAILER-DAEMON, delivery reports, `Auto-Submitted` other than `no`, or
`Precedence: bulk/list/junk`.
"""

from __future__ import annotations

import re
from email.header import decode_header, make_header
from email.utils import formatdate, make_msgid

from bccguard.policy.headers import HeaderBlock
from bccguard.policy.model import Action

_AUTO_LOCALS = ("mailer-daemon", "postmaster")
_CTRL = re.compile(r"[\x00-\x1f\x7f]+")


def _value(block: HeaderBlock, name: str) -> str:
    fields = block.get_all(name)
    return " ".join(fields[0].value.split()) if fields else ""


def is_automatic(block: HeaderBlock, mail_from: str) -> bool:
    """True for bounces and other automatic mail, which must never be answered."""
    if not mail_from:
        return True
    local = mail_from.rpartition("@")[0].lower()
    if local in _AUTO_LOCALS or local.startswith("owner-") or local.endswith("-request"):
        return True
    auto = _value(block, "auto-submitted").lower()
    if auto and not auto.startswith("no"):
        return True
    if _value(block, "precedence").lower() in ("bulk", "list", "junk"):
        return True
    ctype = _value(block, "content-type").lower()
    return ctype.startswith("multipart/report")


def display_subject(block: HeaderBlock) -> str:
    """The original subject, decoded for display; never trusted to be well-formed."""
    raw = _value(block, "subject")
    try:
        text = str(make_header(decode_header(raw)))
    except (ValueError, LookupError, UnicodeError):
        text = raw
    text = _CTRL.sub(" ", text).strip()
    return text[:200] or "(no subject)"


_WHAT = {
    Action.REWRITE: (
        "rewritten",
        "It was delivered to every recipient, but bccguard removed {n} external "
        "addresses from To/Cc first, so the recipients could not see each other.",
    ),
    Action.SPLIT: (
        "split into personal copies",
        "It was delivered as separate copies: each external recipient got one "
        "addressed to them alone, so {n} external addresses were not shown to anyone else.",
    ),
    Action.QUARANTINE: (
        "held for review",
        "It showed {n} external addresses in To/Cc and is held for an administrator, "
        "who will release or delete it. Nobody has received it yet.",
    ),
    Action.REJECT: (
        "refused",
        "It showed {n} external addresses in To/Cc and was refused; nobody received it.",
    ),
}


def notice_subject(action: Action) -> str:
    return f"Your message was {_WHAT[action][0]} by bccguard"


def build_notice(
    block: HeaderBlock,
    *,
    action: Action,
    sender: str,
    from_addr: str,
    hostname: str,
    count: int,
    rule: str,
    customer_data: str = "",
) -> bytes:
    """A short text/plain message for `sender` about one processed message.

    `customer_data`: the [dlp] reason (counts only) when customer data in the
    body or attachments, not To/Cc, is why the message was held or refused.
    """
    _, what = _WHAT[action]
    subject = display_subject(block)
    msgid = _value(block, "message-id")
    if customer_data:
        lines = [
            f'Your message "{subject}" was going outside the company with {customer_data}.',
            "",
            "It is held for an administrator, who will release or delete it. Nobody has received it yet."
            if action is Action.QUARANTINE
            else "It was refused; nobody received it.",
            "",
            f"Policy rule: {rule}",
            "",
            "Customer lists go to colleagues and trusted partners only; ask your",
            "data-protection contact before sending customers' data to anyone else.",
        ]
    else:
        lines = [
            f'Your message "{subject}" exposed customer addresses to each other.',
            "",
            what.format(n=count),
            "",
            f"Policy rule: {rule}",
            "",
            "Next time: put customer addresses in Bcc, not in To or Cc. Each",
            "customer still gets the message, and nobody sees the others.",
        ]
    if action is Action.REJECT and not customer_data:
        lines += ["", "To send this message, move the customer addresses to Bcc and send it again."]
    body = "\r\n".join([*lines, "", f"-- bccguard at {hostname}", ""])
    head = [
        f"From: bccguard <{from_addr}>",
        f"To: <{sender}>",
        f"Subject: {notice_subject(action)}",
        f"Date: {formatdate(usegmt=True)}",
        f"Message-ID: {make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-generated",
        "X-BCCGuard: notice",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    if re.fullmatch(r"<[^<>\s]+>", msgid):
        head += [f"In-Reply-To: {msgid}", f"References: {msgid}"]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode("utf-8", "surrogateescape")
