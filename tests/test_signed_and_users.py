"""DKIM-signed messages meet the rewrite ([policy] on_signed), and rules that match AUTH users.

Pure core tests: the same `evaluate` the relay and `bccguard check` call.
"""

from __future__ import annotations

import pytest

from bccguard.config import ConfigError, from_dict
from bccguard.policy.dkim import breaks_signature, signed_fields
from bccguard.policy.engine import evaluate
from bccguard.policy.headers import parse_header
from bccguard.policy.model import Action, Envelope

CUSTOMERS = [f"c{i}@gmail.com" for i in range(5)]
ENV = Envelope("news@corp.example", tuple(CUSTOMERS))


def signed(h: str, to: str = ", ".join(CUSTOMERS)) -> bytes:
    return (
        "DKIM-Signature: v=1; a=rsa-sha256; d=corp.example; s=s1;\r\n"
        f"\th={h}; bh=abc=;\r\n b=def=\r\n"
        f"From: news@corp.example\r\nTo: {to}\r\nSubject: survey\r\n\r\nbody\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("h", "expected"),
    [
        ("from:to:subject", True),
        ("From : TO :\r\n\tSubject", True),  # case-insensitive, folded, spaces around colons
        ("from:subject", False),
        ("from:subject:bcc", False),  # oversigned absent Bcc: still absent after the rewrite
        ("from:subject:x-bccguard", True),  # oversigning our own stamp: adding it breaks the signature
    ],
)
def test_signature_broken_only_when_a_signed_field_changes(h: str, expected: bool) -> None:
    msg = signed(h)
    block = parse_header(msg)
    out = evaluate(msg, ENV, from_dict({}).policy).message
    assert out != msg
    assert breaks_signature(msg, block, out) is expected


def test_signed_fields_ignores_other_tags_and_non_dkim_fields() -> None:
    msg = b"X-Other: h=to\r\nDKIM-Signature: v=1; H=to; h=Cc:Resent-To\r\n\r\n"
    assert signed_fields(parse_header(msg)) == {"cc", "resent-to"}


@pytest.mark.parametrize("on_signed", ["rewrite", "quarantine", "reject"])
def test_on_signed_decides_what_happens_to_an_exposing_signed_message(on_signed: str) -> None:
    msg = signed("from:to:subject")
    outcome = evaluate(msg, ENV, from_dict({"policy": {"on_signed": on_signed}}).policy)
    v = outcome.verdict
    assert v.signed and v.exposure
    assert v.action is Action(on_signed)
    if on_signed == "rewrite":
        assert b"gmail.com" not in outcome.message.partition(b"\r\n\r\n")[0]
    else:
        assert outcome.message == msg and v.hidden == 0
        assert "DKIM" in v.reason and "@" not in v.reason


def test_signed_but_not_over_recipients_is_rewritten_normally() -> None:
    outcome = evaluate(signed("from:subject"), ENV, from_dict({"policy": {"on_signed": "reject"}}).policy)
    assert outcome.verdict.action is Action.REWRITE and not outcome.verdict.signed


def test_audit_reports_what_on_signed_would_do() -> None:
    policy = from_dict({"policy": {"action": "audit", "on_signed": "quarantine"}}).policy
    msg = signed("to")
    outcome = evaluate(msg, ENV, policy)
    assert outcome.verdict.action is Action.AUDIT and outcome.verdict.would is Action.QUARANTINE
    assert outcome.verdict.signed and outcome.message == msg


def test_unsigned_exposure_is_not_flagged() -> None:
    msg = signed("to").split(b"\r\n", 2)[2]  # drop the two DKIM-Signature lines
    assert b"DKIM" not in msg
    v = evaluate(msg, ENV, from_dict({"policy": {"on_signed": "reject"}}).policy).verdict
    assert v.action is Action.REWRITE and not v.signed


# ------------------------------------------------------------ rules on AUTH users

RULES = {
    "policy": {
        "rules": [
            {"name": "alice", "users": ["alice"], "action": "reject"},
            {"name": "mkt-users", "users": ["*@marketing.corp.example"], "action": "quarantine"},
            {"name": "both", "senders": ["*@hr.corp.example"], "users": ["bob"], "action": "pass"},
        ]
    }
}


@pytest.mark.parametrize(
    ("mail_from", "user", "rule"),
    [
        ("news@corp.example", "alice", "alice"),
        ("news@corp.example", "ALICE", "alice"),
        ("alice@corp.example", None, "default"),  # a users rule needs an authenticated user
        ("news@corp.example", "eve@marketing.corp.example", "mkt-users"),
        ("x@hr.corp.example", "bob", "both"),
        ("x@hr.corp.example", None, "default"),  # both criteria must match
        ("x@corp.example", "bob", "default"),
    ],
)
def test_rules_match_the_authenticated_user(mail_from: str, user: str | None, rule: str) -> None:
    policy = from_dict(RULES).policy
    env = Envelope(mail_from, tuple(CUSTOMERS), auth_user=user)
    assert evaluate(signed("from"), env, policy).verdict.rule == rule


def test_a_rule_needs_senders_or_users() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"policy": {"rules": [{"name": "x", "action": "pass"}]}})
    assert "needs senders or users" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict({"policy": {"rules": [{"name": "x", "users": []}]}})
    assert "policy.rules[0].users" in str(err.value)
