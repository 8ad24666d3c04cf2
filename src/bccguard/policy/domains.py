"""One normal form for domains, so that every comparison in bccguard agrees.

RFC 5890 A-labels in lower case are the form DNS itself compares; UTS #46
mapping (what browsers and email-validator use) turns `Bücher.EXAMPLE` and
`xn--bcher-kva.example` into the same string. Results are cached because a
survey repeats the same few domains thousands of times.
"""

from __future__ import annotations

from functools import lru_cache

import idna


@lru_cache(maxsize=65536)
def normalize_domain(domain: str) -> str:
    """Lower-case A-label form of `domain`; the input lower-cased if it is no valid IDN.

    Never raises: a domain that idna refuses (underscores, over-long labels,
    8-bit junk) is still a destination, and policy must count it, so it keeps
    a lower-cased literal form rather than vanishing.
    """
    d = domain.strip().rstrip(".")
    if d.startswith("[") and d.endswith("]"):
        return d.lower()  # address literal: [192.0.2.1] or [IPv6:...]
    if d.isascii():
        low = d.lower()
        if "xn--" not in low:
            return low
    try:
        return idna.encode(d, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return d.lower()


def in_domains(domain: str, domains: frozenset[str]) -> bool:
    """True when `domain` is one of `domains` or a subdomain of one.

    Label-wise, so "evilcorp.example" is not inside "corp.example".
    """
    if not domain:
        return False
    if domain in domains:
        return True
    dot = domain.find(".")
    while dot != -1:
        parent = domain[dot + 1 :]
        if parent in domains:
            return True
        dot = domain.find(".", dot + 1)
    return False
