"""Message bytes + envelope + policy -> Outcome: what to send, and why. Still pure.

This is the one entry point the SMTP handler and `bccguard check` share, so
a dry run reports exactly what the relay would do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bccguard.config import PolicyConfig, PolicySettings
from bccguard.policy.addresses import (
    Item,
    Mailbox,
    addresses_of,
    first_from,
    late_recipients,
    parse_fields,
)
from bccguard.policy.classify import envelope_domain, external_test, rcpt_external_test
from bccguard.policy.decide import decide_with, select_rule
from bccguard.policy.dkim import breaks_signature, signed_fields
from bccguard.policy.dlp.model import Findings
from bccguard.policy.dlp.verdict import with_findings
from bccguard.policy.headers import HeaderBlock, parse_header
from bccguard.policy.model import Action, Address, Envelope, RewriteTo, Verdict
from bccguard.policy.rewrite import drop_bcc, rewrite_headers
from bccguard.policy.split import SplitPlan, plan_split

UNDISCLOSED = "undisclosed-recipients:;"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    block: HeaderBlock
    visible: tuple[Address, ...]
    # What goes upstream: the original without its Bcc/Resent-Bcc fields (PASS,
    # AUDIT; the very same bytes when it has none), or the rewritten copy
    # (REWRITE/SPLIT); the original itself for QUARANTINE/REJECT. An edge that
    # only edits headers (a milter) applies the difference of the header blocks.
    message: bytes
    split: SplitPlan | None = None  # SPLIT only: the copies, rendered from the original


def _text_of(mb: Mailbox) -> str:
    """A mailbox's header text, or its bare address when its display name shows another one."""
    return f"<{mb.address.addr_spec}>" if mb.seen else mb.address.raw


def to_fallback(block: HeaderBlock, envelope: Envelope, settings: PolicySettings) -> str:
    """What To becomes when every address in it was hidden."""
    if settings.rewrite_to is RewriteTo.SENDER:
        sender = first_from(block)
        if sender is not None and sender.address.valid:
            return _text_of(sender)
        if envelope.mail_from:
            return f"<{envelope.mail_from}>"
    return UNDISCLOSED


def reply_to_for(block: HeaderBlock, settings: PolicySettings) -> str | None:
    """The Reply-To the storm guard adds: the From mailbox, if asked for and none is set."""
    if not settings.reply_to_sender or block.get_all("reply-to"):
        return None
    sender = first_from(block)
    return _text_of(sender) if sender is not None else None


_BCC_FIELDS = frozenset({"bcc", "resent-bcc"})
_REPLY_FIELDS = frozenset({"in-reply-to", "references"})


def evaluate(
    message: bytes, envelope: Envelope, policy: PolicyConfig, findings: Findings | None = None
) -> Outcome:
    """`findings`: what the customer-data scan (bccguard.scan) found; None when it did not run."""
    block = parse_header(message)
    parsed = parse_fields(block)  # once: decide and the rewrite read the same parse
    visible = tuple(addresses_of(parsed))
    late = late_recipients(block)
    if late:
        visible += late
    rule, settings = select_rule(policy, envelope)  # once: every step below uses the same rule
    reply = any(f.lname in _REPLY_FIELDS for f in block.fields)
    verdict = decide_with(rule, settings, envelope, visible, reply=reply)
    if late and verdict.exposure:
        is_external = external_test(settings)
        if any(map(is_external, late)):
            verdict = _on_malformed(verdict, block, settings)
    if findings is not None:  # [dlp]: the stricter of the two verdicts wins
        verdict = with_findings(verdict, findings, settings.dlp)
    out = message
    split = None
    changes = verdict.action in (Action.REWRITE, Action.SPLIT)
    if changes or (verdict.action is Action.AUDIT and verdict.would is Action.REWRITE):
        rewritten, hidden = rewrite_for(message, block, envelope, settings, verdict, parsed=parsed)
        if changes:
            out = rewritten
            verdict = replace(verdict, hidden=hidden)
        if block.get_all("dkim-signature") and _breaks_signature(
            message, block, rewritten, split=verdict.action is Action.SPLIT
        ):
            verdict, out = _on_signed(verdict, message, out, settings)
    if verdict.action is Action.SPLIT:
        split = split_for(block, visible, envelope, settings, verdict)
    elif (
        out is message
        and verdict.action in (Action.PASS, Action.AUDIT)
        and any(f.lname in _BCC_FIELDS for f in block.fields)
    ):
        out = drop_bcc(message, block)  # as Postfix's cleanup: the envelope keeps them
    return Outcome(verdict=verdict, block=block, visible=visible, message=out, split=split)


def _on_malformed(verdict: Verdict, block: HeaderBlock, settings: PolicySettings) -> Verdict:
    """An exposure shows in recipient fields the MTA delivers as body: no rewrite can hide it."""
    instead = Action(settings.on_malformed.value)
    reason = (
        f"{verdict.reason} (the header section is broken at line {block.broken_at}, a line that is "
        "neither a header field nor a continuation: To/Cc after it reach recipients as body text, "
        "which bccguard does not edit)"
    )
    if verdict.action is Action.PASS:
        return verdict
    if verdict.action is Action.AUDIT:
        return replace(verdict, would=instead, reason=reason)
    if verdict.action in (Action.QUARANTINE, Action.REJECT):
        return replace(verdict, reason=reason)
    return replace(verdict, action=instead, hidden=0, reason=reason)


def split_for(
    block: HeaderBlock,
    visible: tuple[Address, ...],
    envelope: Envelope,
    settings: PolicySettings,
    verdict: Verdict,
) -> SplitPlan:
    """One copy per external envelope recipient, one shared copy for the rest."""
    return plan_split(
        visible,
        envelope.rcpt_tos,
        hide=verdict.visible_external + verdict.unparsed,
        is_external=rcpt_external_test(settings),
        domain_of=envelope_domain,
        to_fallback=to_fallback(block, envelope, settings),
        stamp=f"split; hidden={verdict.hidden}",
        reply_to=reply_to_for(block, settings),
    )


def _breaks_signature(original: bytes, block: HeaderBlock, rewritten: bytes, *, split: bool) -> bool:
    """Would our change break a DKIM signature? Split copies also replace To and Cc in each copy."""
    if split and signed_fields(block) & _SPLIT_CHANGES:
        return True
    return breaks_signature(original, block, rewritten)


_SPLIT_CHANGES = frozenset({"to", "cc", "resent-to", "resent-cc", "bcc", "resent-bcc", "x-bccguard"})


def _on_signed(
    verdict: Verdict, original: bytes, rewritten: bytes, settings: PolicySettings
) -> tuple[Verdict, bytes]:
    """A rewrite would break a DKIM signature over the recipient headers: apply `on_signed`."""
    instead = Action(settings.on_signed.value)
    if verdict.action is Action.AUDIT:
        return replace(verdict, signed=True, would=instead), original
    if instead is Action.REWRITE:  # change it anyway (a rewrite, or the split it already is)
        return replace(verdict, signed=True), rewritten
    reason = (
        f"{verdict.reason} (the message is DKIM-signed over To/Cc: "
        "bccguard cannot hide them without breaking the signature)"
    )
    return replace(verdict, action=instead, signed=True, hidden=0, reason=reason), original


def rewrite_for(
    message: bytes,
    block: HeaderBlock,
    envelope: Envelope,
    settings: PolicySettings,
    verdict: Verdict,
    *,
    parsed: dict[int, list[Item]] | None = None,
) -> tuple[bytes, int]:
    """The Bcc-style copy: external addresses out of To/Cc, envelope untouched.

    `parsed` is `parse_fields(block)` when the caller has it (not parsed again).
    """
    n = verdict.hidden or len(verdict.visible_external)
    return rewrite_headers(
        message,
        block,
        external_test(settings),
        to_fallback=to_fallback(block, envelope, settings),
        stamp=f"{'split' if verdict.action is Action.SPLIT else 'rewritten'}; hidden={n}",
        reply_to=reply_to_for(block, settings),
        parsed=parsed,
    )
