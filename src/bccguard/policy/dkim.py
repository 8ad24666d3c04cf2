"""Would a rewrite break a DKIM signature the message already carries? Pure, no crypto.

A DKIM-Signature covers the header fields its `h=` tag lists (RFC 6376
3.5), case-insensitively, and a field listed but absent is covered as
absent ("over-signing"). Hiding addresses rebuilds To/Cc and drops Bcc, so a
message signed over those fields arrives with a signature that no longer
verifies; under a DMARC `p=reject` policy of the signing domain the copy may
be refused even though bccguard did the right thing.

Nothing here verifies a signature (that would need DNS, and an invalid
signature is no one's business here): the question is only whether our own
change touches a signed field. That is decided by comparing the signed
fields' bytes before and after the rewrite, so oversigned absent fields, a
To added by the fallback and untouched-but-listed fields are all judged by
what really changed.

Why the default for `[policy] on_signed` is "rewrite": bccguard is a privacy
tool first, and in the usual deployment the corporate MTA behind it signs
outgoing mail itself, so the broken upstream-of-us signature is ignored by
receivers once a valid aligned one is present. Where that is not true (an
application signs and nothing signs after us) the admin chooses
"quarantine" (hold for review) or "reject" (tell the sender to use Bcc);
every case is counted (`bccguard_signed_messages_total`) and logged, so the
choice can be made from data.
"""

from __future__ import annotations

import re

from bccguard.policy.headers import HeaderBlock, parse_header

_FWS = re.compile(r"[ \t\r\n]+")


def signed_fields(block: HeaderBlock) -> frozenset[str]:
    """Lower-case names of every field listed in any DKIM-Signature's h= tag."""
    names: set[str] = set()
    for f in block.get_all("dkim-signature"):
        for tag in _FWS.sub("", f.value).split(";"):
            name, eq, value = tag.partition("=")
            if eq and name == "h":  # tag names are case-sensitive (RFC 6376 3.2)
                names.update(n.lower() for n in value.split(":") if n)
    return frozenset(names)


def _field_bytes(message: bytes, block: HeaderBlock, lname: str) -> list[bytes]:
    return [message[f.start : f.end] for f in block.get_all(lname)]


def breaks_signature(
    original: bytes, block: HeaderBlock, rewritten: bytes, rewritten_block: HeaderBlock | None = None
) -> bool:
    """True when a field some DKIM-Signature covers differs after the rewrite."""
    names = signed_fields(block)
    if not names:
        return False
    after = rewritten_block if rewritten_block is not None else parse_header(rewritten)
    return any(
        _field_bytes(original, block, n) != _field_bytes(rewritten, after, n) for n in sorted(names)
    )
