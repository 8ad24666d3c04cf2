"""Address -> who it belongs to. Pure: the sets come from the policy in force."""

from __future__ import annotations

from functools import lru_cache

from bccguard.config import PolicySettings
from bccguard.policy.domains import in_domains, normalize_domain
from bccguard.policy.model import Address, AddressClass


@lru_cache(maxsize=16384)
def classify_domain(domain: str, settings: PolicySettings) -> AddressClass:
    """Internal beats partner beats consumer: a company may list its own webmail domain.

    Cached: a survey repeats a few domains hundreds of times, and each message
    classifies every address twice (decide, rewrite) plus every envelope recipient.
    """
    if in_domains(domain, settings.internal_domains):
        return AddressClass.INTERNAL
    if in_domains(domain, settings.partner_domains):
        return AddressClass.PARTNER
    if in_domains(domain, settings.consumer_domains):
        return AddressClass.CONSUMER
    return AddressClass.EXTERNAL


def classify(address: Address, settings: PolicySettings) -> AddressClass:
    """Malformed address text is a destination nobody vouched for: it counts as external."""
    if not address.valid:
        return AddressClass.EXTERNAL
    return classify_domain(address.domain, settings)


def envelope_domain(rcpt: str) -> str:
    """Normalised domain of an envelope address (`local@domain`, local may contain '@' if quoted)."""
    _, at, domain = rcpt.rpartition("@")
    return normalize_domain(domain) if at else ""


def classify_rcpt(rcpt: str, settings: PolicySettings) -> AddressClass:
    domain = envelope_domain(rcpt)
    if not domain:
        return AddressClass.EXTERNAL
    return classify_domain(domain, settings)
