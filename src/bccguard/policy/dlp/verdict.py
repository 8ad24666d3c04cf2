"""Findings + [dlp] settings -> a DlpVerdict, and its combination with the header verdict.

Levels follow the vendors' sensitive-information templates: `low` to
`high - 1` distinct instances of one detector is low volume, `high` or more
high volume; the message takes the action of the worst detector. Parts that
could not be read (encrypted) take `unreadable`, a scan stopped by a limit
takes `over_limit`. The stricter of this and the header verdict wins and
the reason names both; reasons carry counts only, as they reach SMTP replies.
"""

from __future__ import annotations

from dataclasses import replace

from bccguard.config import DlpSettings
from bccguard.policy.dlp.model import Findings
from bccguard.policy.model import Action, DlpVerdict, Verdict

STRICTNESS = {
    Action.PASS: 0,
    Action.AUDIT: 1,
    Action.REWRITE: 2,
    Action.SPLIT: 3,
    Action.QUARANTINE: 4,
    Action.REJECT: 5,
}
_NOUNS = {
    "email": "external email addresses",
    "phone": "phone numbers",
    "iban": "IBANs",
    "card": "payment card numbers",
    "national_id": "national ID or VAT numbers",
    "customer_table": "customer-table rows",
}


def stricter(a: Action, b: Action) -> Action:
    return a if STRICTNESS[a] >= STRICTNESS[b] else b


def judge(findings: Findings, dlp: DlpSettings) -> DlpVerdict:
    action = Action.PASS
    level = ""
    counts = {d: n for d, n in findings.counts if d in dlp.detectors}
    what: list[str] = []
    levels: dict[str, str] = {}
    for d, n in counts.items():
        if n >= dlp.high:
            level = levels[d] = "high"
            action = stricter(action, Action(dlp.high_action))
        elif n >= dlp.low:
            level = level or "low"
            levels[d] = "low"
            action = stricter(action, Action(dlp.low_action))
        else:
            continue
        what.append(f"{n} {_NOUNS[d]}")
    if findings.unreadable:
        action = stricter(action, Action(dlp.unreadable))
        what.append(f"{len(findings.unreadable)} encrypted or unreadable parts")
    if findings.over_limit:
        action = stricter(action, Action(dlp.over_limit))
        what.append(f"a scan limit reached ({', '.join(findings.over_limit)})")
    reason = ""
    if what:
        volume = {"high": f" (high volume: {dlp.high} or more)", "low": " (low volume)"}.get(level, "")
        reason = f"customer data in the message: {', '.join(what)}{volume}"
    return DlpVerdict(
        action=action,
        level=level,
        counts=counts,
        levels=levels,
        places={p.where: dict(p.counts) for p in findings.places},
        unreadable=len(findings.unreadable),
        over_limit=findings.over_limit,
        scanned_bytes=findings.scanned_bytes,
        reason=reason,
    )


def combine(verdict: Verdict, dlp: DlpVerdict) -> Verdict:
    """The stricter action wins; the reason names both when both found something."""
    header_acts = verdict.action is not Action.PASS
    reasons = [r for r in (verdict.reason if header_acts else "", dlp.reason) if r]
    reason = "; and ".join(reasons)
    if STRICTNESS[dlp.action] <= STRICTNESS[verdict.action]:
        return replace(verdict, dlp=dlp, reason=reason if header_acts else verdict.reason)
    if dlp.action is Action.AUDIT:  # header said pass: forwarded unchanged, recorded
        return replace(verdict, action=Action.AUDIT, dlp=dlp, reason=reason)
    # Held or refused as a whole: nothing is rewritten or split first.
    return replace(verdict, action=dlp.action, hidden=0, would=None, dlp=dlp, reason=reason)


def with_findings(verdict: Verdict, findings: Findings, dlp: DlpSettings) -> Verdict:
    """Apply [dlp] when it is on for this rule and an envelope recipient is outside.

    Partners and colleagues are trusted with customer data: a message whose
    every envelope recipient is internal or a partner is never held for it.
    """
    if not dlp.enabled or verdict.external_rcpts == 0:
        return verdict
    return combine(verdict, judge(findings, dlp))


def summary(dlp: DlpVerdict, *, places: bool = False) -> dict[str, object]:
    """Counts only, for the `message_processed` line and `bccguard check --json`."""
    out: dict[str, object] = {
        "action": dlp.action.value,
        "level": dlp.level,
        "counts": dict(dlp.counts),
        "levels": dict(dlp.levels),
        "scanned_bytes": dlp.scanned_bytes,
    }
    if dlp.unreadable:
        out["unreadable"] = dlp.unreadable
    if dlp.over_limit:
        out["over_limit"] = list(dlp.over_limit)
    if places:
        out["places"] = {k: dict(v) for k, v in dlp.places.items()}
    return out
