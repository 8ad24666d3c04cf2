"""The policy decision as a table: envelope + visible headers + config -> action."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bccguard.config import PolicySettings, from_dict
from bccguard.policy.classify import classify, classify_rcpt, external_test, rcpt_external_test
from bccguard.policy.decide import decide_with
from bccguard.policy.engine import evaluate
from bccguard.policy.model import Action, Address, AddressClass, Envelope

POLICY = from_dict(
    {
        "policy": {
            "internal_domains": ["corp.example"],
            "partner_domains": ["agency.example"],
            "rules": [
                {"name": "marketing", "senders": ["*@marketing.corp.example"], "max_visible_external": 1},
                {"name": "board", "senders": ["board@corp.example"], "action": "reject"},
            ],
        }
    }
).policy


def verdict(to: str, rcpts: tuple[str, ...], sender: str = "staff@corp.example", cc: str = ""):
    head = f"From: {sender}\r\nTo: {to}\r\n" + (f"Cc: {cc}\r\n" if cc else "") + "\r\nbody\r\n"
    return evaluate(head.encode(), Envelope(sender, rcpts), POLICY).verdict


EXT = [f"client{i}@firm{i}.example" for i in range(11)]


@pytest.mark.parametrize(
    ("to", "rcpts", "sender", "action", "exposure"),
    [
        # 11 distinct externals > 10: exposure
        (", ".join(EXT), tuple(EXT), "staff@corp.example", Action.REWRITE, True),
        # exactly 10: fine
        (", ".join(EXT[:10]), tuple(EXT[:10]), "staff@corp.example", Action.PASS, False),
        # the same address twice is one address, whatever the case of its domain
        (
            ", ".join([*EXT[:10], EXT[0].replace("firm0.example", "FIRM0.Example")]),
            tuple(EXT[:1]),
            "staff@corp.example",
            Action.PASS,
            False,
        ),
        # two personal mailboxes visible to each other: exposure
        ("a@gmail.com, b@orange.fr", ("a@gmail.com",), "staff@corp.example", Action.REWRITE, True),
        # one is fine
        ("a@gmail.com, colleague@corp.example", ("a@gmail.com",), "staff@corp.example", Action.PASS, False),
        # a huge internal/partner list never trips it
        (
            ", ".join(f"u{i}@corp.example" for i in range(50))
            + ", "
            + ", ".join(f"p{i}@agency.example" for i in range(50)),
            ("u1@corp.example", "p1@agency.example"),
            "staff@corp.example",
            Action.PASS,
            False,
        ),
        # subdomains are internal; lookalikes are not
        (
            ", ".join(f"u{i}@mail.corp.example" for i in range(20)),
            ("x@gmail.com",),
            "staff@corp.example",
            Action.PASS,
            False,
        ),
        (
            ", ".join(f"u{i}@evilcorp.example" for i in range(20)),
            ("x@evilcorp.example",),
            "staff@corp.example",
            Action.REWRITE,
            True,
        ),
        # every envelope recipient internal: nobody outside sees anything
        (", ".join(EXT), ("boss@corp.example",), "staff@corp.example", Action.PASS, False),
        # rules: marketing is stricter, the board is refused
        (
            "a@firm.example, b@other.example",
            ("a@firm.example",),
            "news@marketing.corp.example",
            Action.REWRITE,
            True,
        ),
        (", ".join(EXT), tuple(EXT), "board@corp.example", Action.REJECT, True),
        # 20 addresses mangled into one element without commas still count as many
        (
            " ".join(f"c{i}@firm.example" for i in range(20)),
            ("c1@firm.example",),
            "staff@corp.example",
            Action.REWRITE,
            True,
        ),
    ],
)
def test_decision_table(to, rcpts, sender, action, exposure) -> None:
    v = verdict(to, rcpts, sender)
    assert (v.action, v.exposure) == (action, exposure)


def test_rule_reported_and_reject_reason_has_counts_only() -> None:
    v = verdict(", ".join(EXT), tuple(EXT), "board@corp.example")
    assert v.rule == "board"
    assert v.reason == "11 customer addresses are visible in To/Cc; send them as Bcc"


def test_consumer_reason() -> None:
    v = verdict("a@gmail.com, b@orange.fr", ("a@gmail.com",))
    assert v.reason == "2 personal mailbox addresses are visible in To/Cc; send them as Bcc"


def test_audit_forwards_but_says_what_it_would_do() -> None:
    policy = from_dict({"policy": {"action": "audit"}}).policy
    head = "From: a@corp.example\r\nTo: " + ", ".join(EXT) + "\r\n\r\nx\r\n"
    outcome = evaluate(head.encode(), Envelope("a@corp.example", tuple(EXT)), policy)
    assert outcome.verdict.action is Action.AUDIT and outcome.verdict.would is Action.REWRITE
    assert outcome.verdict.hidden == 11
    assert outcome.message == head.encode()


# --- the memoised classification against plain classify() ------------------------

_DOMAINS = [
    "corp.example", "sub.corp.example", "evilcorp.example", "agency.example", "gmail.com",
    "orange.fr", "firm.example", "", "[192.0.2.1]",
]  # fmt: skip
_ADDRESSES = st.builds(
    Address,
    st.sampled_from(["a", "b", "A", "a b@c", "x@y z@w"]),
    st.sampled_from(_DOMAINS),
    st.sampled_from(["", "a@b", "a@b c@d e@f"]),
    st.none(),
    st.booleans(),
)
_RCPTS = st.sampled_from(
    [
        "a@corp.example", "b@CORP.example.", "c@sub.corp.example", "d@agency.example", "e@gmail.com",
        "f@firm.example", "noat", "g@", '"x@corp.example"@firm.example', "h@bücher.example", "@gmail.com",
    ]
)  # fmt: skip
_SETTINGS = PolicySettings(
    internal_domains=frozenset({"corp.example"}),
    partner_domains=frozenset({"agency.example"}),
    consumer_domains=frozenset({"gmail.com", "orange.fr"}),
    max_visible_external=1,
    max_visible_consumer=0,
)


@settings(max_examples=500)
@given(st.lists(_ADDRESSES, max_size=12), st.lists(_RCPTS, max_size=8))
def test_memoised_classification_agrees_with_classify(addresses: list[Address], rcpts: list[str]) -> None:
    is_external, rcpt_is_external = external_test(_SETTINGS), rcpt_external_test(_SETTINGS)
    assert [is_external(a) for a in addresses] == [classify(a, _SETTINGS).is_external for a in addresses]
    assert [rcpt_is_external(r) for r in rcpts] == [classify_rcpt(r, _SETTINGS).is_external for r in rcpts]


@settings(max_examples=500)
@given(st.lists(_ADDRESSES, max_size=12), st.lists(_RCPTS, max_size=8))
def test_decide_counts_as_classify_says(visible: list[Address], rcpts: list[str]) -> None:
    """decide_with classifies by hand (a memo per domain); these are the counts classify() gives."""
    external: set[str] = set()
    consumer: set[str] = set()
    junk: set[str] = set()
    for a in visible:
        cls = classify(a, _SETTINGS)
        if not a.valid:  # text with an '@' and no address: one external each, listed apart
            junk.add(a.addr_spec)
        elif cls.is_external:
            external.add(a.key)
            if cls is AddressClass.CONSUMER:
                consumer.add(a.key)
    external_rcpts = sum(1 for r in rcpts if classify_rcpt(r, _SETTINGS).is_external)
    exposure = external_rcpts > 0 and (len(external) + len(junk) > 1 or len(consumer) > 0)
    v = decide_with("r", _SETTINGS, Envelope("s@corp.example", tuple(rcpts)), visible)
    assert v.visible == len({a.key for a in visible})
    assert v.visible_external == tuple(sorted(external))
    assert v.unparsed == tuple(sorted(junk))
    assert (v.visible_consumer, v.external_rcpts, v.exposure) == (len(consumer), external_rcpts, exposure)
