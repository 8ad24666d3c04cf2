"""Message bytes + envelope + policy -> Outcome: what to send, and why. Still pure.

This is the one entry point the SMTP handler and `bccguard check` share, so
a dry run reports exactly what the relay would do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bccguard.config import PolicyConfig, PolicySettings
from bccguard.policy.addresses import first_from, visible_recipients
from bccguard.policy.classify import classify
from bccguard.policy.decide import decide, select_rule
from bccguard.policy.dkim import breaks_signature
from bccguard.policy.headers import HeaderBlock, parse_header
from bccguard.policy.model import Action, Address, Envelope, RewriteTo, Verdict
from bccguard.policy.rewrite import rewrite_headers

UNDISCLOSED = "undisclosed-recipients:;"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    block: HeaderBlock
    visible: tuple[Address, ...]
    message: bytes  # what goes upstream: the original, or the rewritten copy for REWRITE


def to_fallback(block: HeaderBlock, envelope: Envelope, settings: PolicySettings) -> str:
    """What To becomes when every address in it was hidden."""
    if settings.rewrite_to is RewriteTo.SENDER:
        sender = first_from(block)
        if sender is not None and sender.address.valid:
            return sender.address.raw
        if envelope.mail_from:
            return f"<{envelope.mail_from}>"
    return UNDISCLOSED


def evaluate(message: bytes, envelope: Envelope, policy: PolicyConfig) -> Outcome:
    block = parse_header(message)
    visible = tuple(visible_recipients(block))
    verdict = decide(envelope, visible, policy)
    out = message
    rewrites = verdict.action is Action.REWRITE
    if rewrites or (verdict.action is Action.AUDIT and verdict.would is Action.REWRITE):
        rewritten, hidden = rewrite_for(message, block, envelope, policy, verdict)
        if rewrites:
            out = rewritten
            verdict = replace(verdict, hidden=hidden)
        if block.get_all("dkim-signature") and breaks_signature(message, block, rewritten):
            verdict, out = _on_signed(verdict, message, out, select_rule(policy, envelope)[1])
    return Outcome(verdict=verdict, block=block, visible=visible, message=out)


def _on_signed(
    verdict: Verdict, original: bytes, rewritten: bytes, settings: PolicySettings
) -> tuple[Verdict, bytes]:
    """A rewrite would break a DKIM signature over the recipient headers: apply `on_signed`."""
    instead = Action(settings.on_signed.value)
    if verdict.action is Action.AUDIT:
        return replace(verdict, signed=True, would=instead), original
    if instead is Action.REWRITE:
        return replace(verdict, signed=True), rewritten
    reason = (
        f"{verdict.reason} (the message is DKIM-signed over To/Cc: "
        "bccguard cannot hide them without breaking the signature)"
    )
    return replace(verdict, action=instead, signed=True, hidden=0, reason=reason), original


def rewrite_for(
    message: bytes, block: HeaderBlock, envelope: Envelope, policy: PolicyConfig, verdict: Verdict
) -> tuple[bytes, int]:
    """The Bcc-style copy: external addresses out of To/Cc, envelope untouched."""
    _, settings = select_rule(policy, envelope)
    n = verdict.hidden or len(verdict.visible_external)
    return rewrite_headers(
        message,
        block,
        lambda a: classify(a, settings).is_external,
        to_fallback=to_fallback(block, envelope, settings),
        stamp=f"rewritten; hidden={n}",
    )
