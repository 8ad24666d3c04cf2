"""Address -> who it belongs to. Pure: the sets come from the policy in force."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from bccguard.config import PolicySettings
from bccguard.policy.domains import in_domains, normalize_domain
from bccguard.policy.model import Address, AddressClass


@lru_cache(maxsize=16384)
def classify_domain(domain: str, settings: PolicySettings) -> AddressClass:
    """Internal beats partner beats consumer: a company may list its own webmail domain.

    Cached: a survey repeats a few domains hundreds of times, across messages
    too. Within one message the callers go through `external_test` and friends,
    which ask here once per distinct domain (this cache key hashes `settings`).
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


def external_test(settings: PolicySettings) -> Callable[[Address], bool]:
    """`classify(a, settings).is_external` with a memo by domain, for the addresses of one message.

    Why: `classify_domain`'s cache key hashes the whole PolicySettings on every
    call, which cost more than the lookup itself (a 100-address To called it
    200 times). A message repeats few domains, so a dict keyed by the domain
    alone, living only as long as the returned function, does that hashing
    once per distinct domain. Pure: same answers as `classify`.
    """
    memo: dict[str, bool] = {}

    def is_external(address: Address) -> bool:
        if not address.valid:
            return True
        domain = address.domain
        ext = memo.get(domain)
        if ext is None:
            ext = memo[domain] = classify_domain(domain, settings).is_external
        return ext

    return is_external


def rcpt_external_test(settings: PolicySettings) -> Callable[[str], bool]:
    """`classify_rcpt(r, settings).is_external`, memoised by the text after the last '@'.

    Why: as for `external_test`; the (b) bench has 100 envelope recipients.
    """
    memo: dict[str, bool] = {}

    def is_external(rcpt: str) -> bool:
        _, at, raw = rcpt.rpartition("@")
        if not at:
            return True
        ext = memo.get(raw)
        if ext is None:
            domain = normalize_domain(raw)
            ext = memo[raw] = not domain or classify_domain(domain, settings).is_external
        return ext

    return is_external
