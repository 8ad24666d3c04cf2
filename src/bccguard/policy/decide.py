"""Envelope + visible addresses + policy -> Verdict. The whole policy, as one pure function.

Exposure is defined by the issue contract: at least one external envelope
recipient receives the message, and its visible headers show more than
`max_visible_external` distinct external addresses or more than
`max_visible_consumer` distinct consumer-mailbox addresses. Mail among
colleagues and partners never trips it, however long the To line.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from bccguard.config import PolicyConfig, PolicySettings
from bccguard.policy.classify import classify_domain, rcpt_external_test
from bccguard.policy.model import Action, Address, AddressClass, BusinessReplies, Envelope, Verdict

DEFAULT_RULE = "default"


def select_rule(policy: PolicyConfig, envelope: Envelope) -> tuple[str, PolicySettings]:
    """First rule whose criteria all match wins; no match: the [policy] defaults.

    `senders` patterns match the envelope sender or the AUTH user; `users`
    patterns match the AUTH user only, so an unauthenticated session never
    matches a `users` rule, whatever MAIL FROM it claims.
    """
    candidates = [envelope.mail_from.lower()]
    user = envelope.auth_user.lower() if envelope.auth_user else None
    if user is not None:
        candidates.append(user)
    for rule in policy.rules:
        if rule.senders and not any(
            fnmatchcase(c, pattern) for pattern in rule.senders for c in candidates
        ):
            continue
        if rule.users and (
            user is None or not any(fnmatchcase(user, pattern) for pattern in rule.users)
        ):
            continue
        return rule.name, rule.settings
    return DEFAULT_RULE, policy.defaults


def decide(
    envelope: Envelope, visible: Sequence[Address], policy: PolicyConfig, *, reply: bool = False
) -> Verdict:
    rule, settings = select_rule(policy, envelope)
    return decide_with(rule, settings, envelope, visible, reply=reply)


def decide_with(
    rule: str,
    settings: PolicySettings,
    envelope: Envelope,
    visible: Sequence[Address],
    *,
    reply: bool = False,
) -> Verdict:
    """`decide` for a rule already selected: the engine selects once and reuses the settings.

    Addresses are counted once per person (`Address.key`: `Alice@x`,
    `"alice"@x` and `alice@x` are one). Malformed text that holds an '@'
    but no address (the parser passes only such text as invalid) counts as
    one external address each, listed in `unparsed`. `reply`: the message
    has In-Reply-To or References; with `business_replies = "pass"` a reply
    that shows no consumer address is a business thread, not an exposure.
    """
    external: set[str] = set()
    consumer: set[str] = set()
    distinct: set[str] = set()
    unparsed: set[str] = set()
    # `classify` per address, by hand: one classify_domain per distinct domain
    # (its cache key hashes all of `settings`), identity tests on the class.
    classes: dict[str, AddressClass] = {}
    ext_cls, consumer_cls = AddressClass.EXTERNAL, AddressClass.CONSUMER
    for a in visible:
        if not a.valid:  # classify: malformed text counts as external, never consumer
            unparsed.add(a.addr_spec)
            continue
        local = a.local  # Address.key, inlined: this loop runs once per visible address
        key = a.key if '"' in local else f"{local.lower()}@{a.domain}"
        distinct.add(key)
        cls = classes.get(a.domain)
        if cls is None:
            cls = classes[a.domain] = classify_domain(a.domain, settings)
        if cls is ext_cls or cls is consumer_cls:
            external.add(key)
            if cls is consumer_cls:
                consumer.add(key)
    external_rcpts = sum(map(rcpt_external_test(settings), envelope.rcpt_tos))
    n_external = len(external) + len(unparsed)
    too_many = n_external > settings.max_visible_external or len(consumer) > settings.max_visible_consumer
    if reply and not consumer and settings.business_replies is BusinessReplies.PASS:
        too_many = False
    exposure = external_rcpts > 0 and too_many
    common = {
        "rule": rule,
        "exposure": exposure,
        "visible": len(distinct) + len(unparsed),
        "visible_external": tuple(sorted(external)),
        "visible_consumer": len(consumer),
        "external_rcpts": external_rcpts,
        "unparsed": tuple(sorted(unparsed)),
    }
    if not exposure:
        return Verdict(action=Action.PASS, **common)  # type: ignore[arg-type]
    action = settings.action
    reason = exposure_reason(n_external, len(consumer), settings)
    if action is Action.AUDIT:
        return Verdict(
            action=action,
            would=Action.REWRITE,
            hidden=n_external,
            reason=reason,
            **common,  # type: ignore[arg-type]
        )
    hidden = n_external if action in (Action.REWRITE, Action.SPLIT) else 0
    return Verdict(action=action, hidden=hidden, reason=reason, **common)  # type: ignore[arg-type]


def exposure_reason(external: int, consumer: int, settings: PolicySettings) -> str:
    """What the sender did wrong and how to fix it, with counts only: this text reaches SMTP replies."""
    if consumer > settings.max_visible_consumer and external <= settings.max_visible_external:
        what = f"{consumer} personal mailbox addresses are visible in To/Cc"
    else:
        what = f"{external} customer addresses are visible in To/Cc"
    return f"{what}; send them as Bcc"
