"""Issue 13: count what a reader sees, hide all of it, agree with the MTA, spare business threads.

Pure core only (evaluate over bytes); the relay-level proofs for items 1 and 3
are in tests/test_relay_leaks.py, the CLI ones at the end here.
"""

from __future__ import annotations

import json
from base64 import b64encode
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bccguard.cli import main
from bccguard.config import from_dict
from bccguard.policy.addresses import parse_address_list, visible_recipients
from bccguard.policy.engine import Outcome, evaluate
from bccguard.policy.headers import parse_header
from bccguard.policy.model import Action, Envelope

CONSUMER = ["gmail.com", "yahoo.com", "orange.fr", "web.de", "mail.ru"]


def policy(**over: object):  # type: ignore[no-untyped-def]
    return from_dict(
        {"policy": {"internal_domains": ["corp.example"], "partner_domains": ["agency.example"], **over}}
    ).policy


ENV = Envelope("news@corp.example", ("team@corp.example", "x@clients.example"))


def run(head: str, *, env: Envelope = ENV, body: str = "Hello\r\n", **over: object) -> Outcome:
    data = (head.replace("\n", "\r\n").rstrip("\r\n") + "\r\n\r\n" + body).encode("utf-8")
    return evaluate(data, env, policy(**over))


def head_of(o: Outcome) -> bytes:
    return o.message[: parse_header(o.message).header_end]


# --- item 1: Bcc and Resent-Bcc never leave -------------------------------------------------

BCC = ", ".join(f"c{i}@gmail.com" for i in range(20))


@pytest.mark.parametrize("action", ["pass", "audit", "rewrite", "split"])
def test_bcc_and_resent_bcc_are_removed_from_a_message_that_is_no_exposure(action: str) -> None:
    o = run(f"From: a@corp.example\nTo: team@corp.example\nBcc: {BCC}\nResent-Bcc: r@yahoo.com\nSubject: s",
            action=action)  # fmt: skip
    assert o.verdict.action is Action.PASS and not o.verdict.exposure
    out = o.message
    assert b"Bcc" not in out and b"gmail.com" not in out and b"yahoo.com" not in out
    want = (b"From: a@corp.example\r\nTo: team@corp.example\r\nSubject: s\r\n\r\nHello\r\n")
    assert out == want  # every other byte kept


def test_audit_forwards_unchanged_but_without_bcc() -> None:
    to = ", ".join(f"u{i}@gmail.com" for i in range(3))
    o = run(f"From: a@corp.example\nTo: {to}\nBcc: hidden@gmail.com\nSubject: s", action="audit")
    assert o.verdict.action is Action.AUDIT and o.verdict.exposure
    assert o.message == f"From: a@corp.example\r\nTo: {to}\r\nSubject: s\r\n\r\nHello\r\n".encode()


def test_a_message_without_bcc_is_forwarded_as_the_very_same_bytes() -> None:
    data = b"From: a@corp.example\r\nTo: team@corp.example\r\n\r\nbody"
    o = evaluate(data, ENV, policy())
    assert o.message is data  # the fast path: no copy at all


def test_quarantine_keeps_the_original_for_review() -> None:
    o = run(f"From: a@corp.example\nTo: a@gmail.com, b@gmail.com\nBcc: {BCC}", action="quarantine")
    assert o.verdict.action is Action.QUARANTINE and b"Bcc: " in o.message


def test_bcc_after_a_broken_header_line_is_body_text_and_stays() -> None:
    o = run("From: a@corp.example\nTo: team@corp.example\nno colon\nBcc: b@corp.example")
    assert o.message.endswith(b"no colon\r\nBcc: b@corp.example\r\n\r\nHello\r\n")


# --- item 2: malformed text ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "consumers"),
    [
        ("<<<a1@gmail.com>>>, a2@gmail.com", 2),
        ('"unterminated a1@gmail.com, a2@gmail.com', 2),
        ("(unterminated a1@gmail.com, a2@gmail.com", 2),
        ("alice@gmail.com <alice@gmail.com>, bob@yahoo.com", 2),
        ("a1@gmail.com a2@gmail.com a3@yahoo.com", 3),
        ("a1@gmail.com; a2@gmail.com a3@web.de", 3),
        (", ".join(f"=?utf-8?q?c{i}=40gmail.com?=" for i in range(10)), 10),
        (", ".join(f"=?utf-8?b?{b64encode(f'k{i}@web.de'.encode()).decode()}?=" for i in range(4)), 4),
        (" ".join(f"=?utf-8?q?w{i}=40gmail.com?=" for i in range(10)), 10),  # no commas either
        ("Foo <x1@gmail.com, x2@mail.ru", 2),
        ("x1@gmail.com>, x2@gmail.com", 2),
    ],
)
def test_every_address_in_malformed_text_counts_by_its_own_domain(to: str, consumers: int) -> None:
    o = run(f"From: a@corp.example\nTo: {to}")
    assert o.verdict.visible_consumer == consumers
    assert o.verdict.exposure


def test_internal_and_partner_addresses_in_malformed_text_do_not_count() -> None:
    o = run("From: a@corp.example\nTo: a@corp.example b@agency.example <<c@corp.example>>")
    assert o.verdict.visible_external == () and o.verdict.unparsed == ()
    assert not o.verdict.exposure


def test_a_malformed_element_with_one_address_counts_once() -> None:
    """Ten business addresses, one of them mangled: ten, not eleven."""
    firms = [f"p{i}@firm{i}.example" for i in range(9)] + ["Q <<q@firm9.example>"]
    o = run(f"From: a@corp.example\nTo: {', '.join(firms)}")
    assert len(o.verdict.visible_external) == 10 and o.verdict.unparsed == ()
    assert not o.verdict.exposure  # 10 is the limit, not over it


def test_text_with_an_at_but_no_address_counts_as_one_external_listed_apart() -> None:
    o = run("From: a@corp.example\nTo: foo@, team@corp.example", max_visible_external=0)
    assert o.verdict.unparsed == ("foo@",) and o.verdict.visible_external == ()
    assert o.verdict.exposure


# --- item 3: what a reader sees outside the addr-spec --------------------------------------------


@pytest.mark.parametrize(
    "to",
    [
        '"alice@gmail.com" <news@corp.example>, bob@yahoo.com',
        "news@corp.example (alice@gmail.com, bob@yahoo.com)",
        "=?utf-8?q?alice=40gmail.com?= <news@corp.example>, bob@yahoo.com",
        "=?utf-8?b?YWxpY2VAZ21haWwuY29t?= <news@corp.example>, "
        "=?utf-8?b?Ym9iQHlhaG9vLmNvbQ==?= <a@corp.example>",
        "=?utf-8?q?alice=40gmail.com?=@corp.example, bob@yahoo.com",
        "alice\uff20gmail.com, bob\ufe6byahoo.com",
        '"alice\uff20gmail.com" <news@corp.example>, "bob\ufe6byahoo\u3002com" <a@corp.example>',
        '"=?utf-8?q?alice=40gmail.com?=" <news@corp.example>, news@corp.example (bob\uff20yahoo.com)',
        "Team (alice@gmail.com): a@corp.example, b@corp.example (bob@yahoo.com);",
        '"alice@gmail.com": a@corp.example;, "bob@yahoo.com" <b@corp.example>',
    ],
)
def test_addresses_in_display_names_comments_and_encoded_words_count_and_are_removed(to: str) -> None:
    o = run(f"From: a@corp.example\nTo: {to}")
    v = o.verdict
    assert v.visible_consumer == 2 and v.exposure and v.action is Action.REWRITE
    head = head_of(o)
    for hidden in (b"alice", b"bob", b"=?utf-8?", "\uff20".encode(), "\ufe6b".encode()):
        assert hidden not in head.lower()
    # the internal mailboxes stay (their routing address only, when the display showed a customer)
    after = visible_recipients(parse_header(o.message))
    assert all(a.domain == "corp.example" for a in after)


def test_a_kept_element_keeps_its_address_and_loses_only_the_text() -> None:
    o = run('From: a@corp.example\nTo: "alice@gmail.com" <news@corp.example>, b@gmail.com, '
            "Sales <s@corp.example>")
    assert b"To: <news@corp.example>, Sales <s@corp.example>\r\n" in o.message


def test_a_kept_address_whose_own_local_part_shows_a_customer_is_dropped_from_the_header() -> None:
    """`"alice@gmail.com"@corp.example` (an MTA qualifying a quoted address with its own domain):
    the reader sees alice@gmail.com in the colleague's address itself, so no text of it can stay.
    Found by the fuzz property (hidden addresses never remain visible); the envelope is untouched."""
    o = run('From: a@corp.example\nTo: "alice@gmail.com"@corp.example, b@gmail.com, s@corp.example')
    assert o.verdict.action is Action.REWRITE
    head = head_of(o)
    assert b"alice" not in head.lower() and b"To: s@corp.example\r\n" in head


def test_encoded_words_never_become_a_routing_address() -> None:
    items = parse_address_list("=?utf-8?q?alice=40gmail.com?= <x@corp.example>, =?utf-8?q?bob=40gmail.com?=")
    routing = [i.address for i in items if i.address.valid]  # type: ignore[union-attr]
    assert [a.addr_spec for a in routing] == ["x@corp.example"]
    shown = [a.addr_spec for i in items for a in i.seen]  # type: ignore[union-attr]
    assert shown == ["alice@gmail.com", "bob@gmail.com"]
    assert all(a.in_text for i in items for a in i.seen)  # type: ignore[union-attr]


def test_outlook_style_display_equal_to_the_address_counts_once() -> None:
    o = run("From: a@corp.example\nTo: 'Alice@Gmail.com' <alice@gmail.com>, "
            '"BOB@corp.example" <bob@corp.example>')
    assert o.verdict.visible_consumer == 1 and not o.verdict.exposure


def test_the_split_copy_of_a_customer_shows_no_other_address() -> None:
    env = Envelope("news@corp.example", ("alice@gmail.com", "carol@gmail.com"))
    o = run('From: a@corp.example\nTo: "carol@gmail.com" <alice@gmail.com>, carol@gmail.com', env=env,
            action="split")  # fmt: skip
    assert o.split is not None
    tos = {c.rcpts: c.to for c in o.split.copies}
    assert tos[("alice@gmail.com",)] == "<alice@gmail.com>"


# --- item 4: distinct to a person ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "n"),
    [
        ("Alice@Gmail.com, alice@gmail.com, ALICE@GMAIL.COM", 1),
        ('"alice"@gmail.com, alice@gmail.com', 1),
        ('"Alice.B"@gmail.com, alice.b@GMAIL.com', 1),
        ('"alice b"@gmail.com, alice@gmail.com', 2),
        ("alice@gmail.com, alice@googlemail.com", 2),
    ],
)
def test_distinct_means_distinct_to_a_person(to: str, n: int) -> None:
    o = run(f"From: a@corp.example\nTo: {to}")
    assert o.verdict.visible_consumer == n
    assert o.verdict.exposure is (n > 1)


# --- item 5: the header section ends where the MTA ends it -----------------------------------------

BROKEN = (
    "From: a@corp.example\nSubject: s\nthis is no header line\nTo: a@gmail.com, b@gmail.com\nCc: c@yahoo.com"
)


def test_recipients_after_a_stray_line_count_and_fall_to_on_malformed() -> None:
    o = run(BROKEN)
    v = o.verdict
    assert v.exposure and v.visible_consumer == 3
    assert v.action is Action.QUARANTINE
    assert "header section is broken at line 3" in v.reason and "@" not in v.reason
    assert o.message.endswith(
        b"this is no header line\r\nTo: a@gmail.com, b@gmail.com\r\nCc: c@yahoo.com\r\n\r\nHello\r\n"
    )


def test_on_malformed_reject() -> None:
    o = run(BROKEN, on_malformed="reject")
    assert o.verdict.action is Action.REJECT and "broken" in o.verdict.reason


def test_audit_says_what_on_malformed_would_do() -> None:
    o = run(BROKEN, action="audit")
    assert o.verdict.action is Action.AUDIT and o.verdict.would is Action.QUARANTINE


def test_a_rewrite_never_edits_text_after_the_end_of_the_header_section() -> None:
    head = "From: a@corp.example\nTo: a@gmail.com, b@gmail.com\njunk\nTo: team@corp.example"
    o = run(head)
    assert o.verdict.action is Action.REWRITE  # the exposure is in the real header: rewritten there
    assert o.message.endswith(
        b"X-BCCGuard: rewritten; hidden=2\r\njunk\r\nTo: team@corp.example\r\n\r\nHello\r\n"
    )
    assert b"gmail" not in o.message


def test_internal_recipients_after_a_stray_line_change_nothing() -> None:
    o = run("From: a@corp.example\nTo: team@corp.example\njunk\nCc: b@corp.example")
    assert o.verdict.action is Action.PASS


# --- items 6, 7: no '@' is no address; groups with odd names ---------------------------------------


def test_an_element_without_at_is_no_address_and_stays() -> None:
    o = run("From: a@corp.example\nTo: Smith, Ann <ann@gmail.com>, bob@gmail.com, team@corp.example")
    v = o.verdict
    assert v.visible_consumer == 2 and v.unparsed == () and v.visible == 3
    assert b"To: Smith, team@corp.example\r\n" in o.message


def test_a_group_whose_name_is_only_a_comment_yields_its_members() -> None:
    items = parse_address_list("(Kunden): a@gmail.com, b@gmail.com;, c@corp.example")
    o = run("From: a@corp.example\nTo: (Kunden): a@gmail.com, b@gmail.com;, c@corp.example")
    assert o.verdict.visible_consumer == 2
    assert [type(i).__name__ for i in items] == ["Group", "Mailbox"]
    assert b"To: (Kunden):;, c@corp.example\r\n" in o.message


# --- item 10: business replies --------------------------------------------------------------------

BUSINESS = ", ".join(f"dev{i}@firm{i}.example" for i in range(15))


@pytest.mark.parametrize("field", ["In-Reply-To: <1@x>", "References: <0@x> <1@x>"])
def test_a_business_reply_passes(field: str) -> None:
    o = run(f"From: a@corp.example\nTo: list@corp.example\nCc: {BUSINESS}\n{field}")
    assert o.verdict.action is Action.PASS and not o.verdict.exposure


def test_business_replies_count_restores_the_threshold() -> None:
    o = run(f"From: a@corp.example\nTo: list@corp.example\nCc: {BUSINESS}\nIn-Reply-To: <1@x>",
            business_replies="count")  # fmt: skip
    assert o.verdict.exposure


def test_consumer_addresses_in_a_reply_still_count() -> None:
    o = run("From: a@corp.example\nTo: a@gmail.com, b@yahoo.com\nIn-Reply-To: <1@x>")
    assert o.verdict.exposure and o.verdict.visible_consumer == 2


def test_business_replies_overridden_per_rule() -> None:
    pol = from_dict({"policy": {"internal_domains": ["corp.example"], "rules": [
        {"name": "bulk", "senders": ["news@corp.example"], "business_replies": "count"}
    ]}}).policy  # fmt: skip
    data = f"From: a@corp.example\r\nTo: {BUSINESS}\r\nIn-Reply-To: <1@x>\r\n\r\nx".encode()
    assert evaluate(data, ENV, pol).verdict.exposure
    other = Envelope("dev@corp.example", ENV.rcpt_tos)
    assert not evaluate(data, other, pol).verdict.exposure


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [("business_replies", "yes", "business_replies"), ("on_malformed", "rewrite", "on_malformed")],
)
def test_new_keys_are_validated(key: str, value: str, problem: str) -> None:
    from bccguard.config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        from_dict({"policy": {key: value}})


# --- the property: N distinct consumer strings anywhere a reader sees them -> count >= N ------------

_LOCALS = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
_PLACES = st.sampled_from(
    [
        "{a}",  # plain
        "<{a}>",
        "Name <{a}>",
        '"{a}" <x@corp.example>',  # display name
        "x@corp.example ({a})",  # comment
        "=?utf-8?q?{q}?= <x@corp.example>",  # encoded display
        "=?utf-8?b?{b}?=",  # encoded word alone
        "{fw}",  # full-width at-sign
        "{sm}",  # small at-sign
        '"{u} <x@corp.example>',  # unterminated quote runs on
        "<<<{a}>>>",  # junk brackets
        "{a} {a2}",  # no comma (a2: the same address, different case)
        "(G {a}): x@corp.example;",  # in a group's odd name
    ]
)


def _render(place: str, local: str, domain: str) -> str:
    import base64

    a = f"{local}@{domain}"
    return place.format(
        a=a,
        a2=a.upper(),
        u=a,
        q=a.replace("@", "=40"),
        b=base64.b64encode(a.encode()).decode(),
        fw=a.replace("@", "\uff20"),
        sm=a.replace("@", "\ufe6b"),
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_LOCALS, st.sampled_from(CONSUMER), _PLACES), min_size=1, max_size=8),
    st.sampled_from([", ", ",\r\n ", "; "]),
    st.booleans(),
)
def test_n_distinct_consumer_strings_anywhere_a_reader_sees_them_count_at_least_n(
    parts: list[tuple[str, str, str]], sep: str, cc: bool
) -> None:
    distinct = {f"{local}@{domain}" for local, domain, _ in parts}
    elements = [_render(place, local, domain) for local, domain, place in parts]
    # an unterminated quote swallows the rest of its field: give it its own field
    plain = [e for e in elements if e.count('"') != 1]
    open_ = [e for e in elements if e.count('"') == 1]
    head = ["From: a@corp.example", f"{'Cc' if cc else 'To'}: {sep.join(plain) or 'x@corp.example'}"]
    head += [f"Resent-Cc: {e}" for e in open_]
    data = ("\r\n".join(head) + "\r\n\r\nbody\r\n").encode("utf-8")
    o = evaluate(data, ENV, policy(max_visible_consumer=100))
    assert o.verdict.visible_consumer >= len(distinct)


# --- items 8, 9: bccguard check answers what the relay would ---------------------------------------


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "c.toml"
    p.write_text('[policy]\ninternal_domains = ["corp.example"]\n')
    return p


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(["check", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.mark.parametrize(
    "data",
    [
        b"From: a@corp.example\r\nTo: b@gmail.com\r\n\r\nline\rmore\r\n",
        b"From: a@corp.example\r\nTo: b@gmail.com\r\n\r\nline\nmore\r\n",
        b"From: a@corp.example\nTo: b@gmail.com\n\nline\rmore\n",
    ],
)
def test_check_reports_bare_line_endings_as_refused(tmp_path: Path, cfg: Path, capsys, data: bytes) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(data)
    code, r = _check(capsys, str(eml), "--config", str(cfg))
    assert code == 1 and r["action"] == "reject" and str(r["reply"]).startswith("550 5.6.0")
    assert main(["check", str(eml), "--config", str(cfg)]) == 1
    assert "550 5.6.0" in capsys.readouterr().out


def test_check_accepts_a_file_with_lf_endings(tmp_path: Path, cfg: Path, capsys) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@corp.example\nTo: team@corp.example\n\nbody\n")
    code, r = _check(capsys, str(eml), "--config", str(cfg))
    assert code == 0 and r["action"] == "pass"


def test_check_default_envelope_includes_resent_recipients(tmp_path: Path, cfg: Path, capsys) -> None:
    customers = ",\r\n ".join(f"c{i}@gmail.com" for i in range(88))  # folded: lines stay under 998
    eml = tmp_path / "m.eml"
    eml.write_bytes(
        f"Resent-From: news@corp.example\r\nResent-To: {customers}\r\nFrom: a@corp.example\r\n"
        "Subject: newsletter\r\n\r\nbody\r\n".encode()
    )
    code, r = _check(capsys, str(eml), "--config", str(cfg))
    assert code == 1 and r["exposure"] is True and r["visible_consumer"] == 88


def test_check_json_lists_each_address_once_canonical_and_text_apart(
    tmp_path: Path, cfg: Path, capsys
) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(
        b"From: a@corp.example\r\nTo: Undisclosed Recipients <>, Alice@Gmail.COM, alice@gmail.com, "
        b'"alice"@gmail.com, bob@, caf\xe9 <\xff@x.example>, "Bob@Yahoo.com" <b@corp.example>\r\n\r\nx\r\n'
    )
    code, r = _check(capsys, str(eml), "--config", str(cfg), "--rcpt", "x@gmail.com")
    assert r["visible_external"] == ["alice@gmail.com", "bob@yahoo.com"]
    assert "bob@" in r["unparsed"]
    assert not any("@x.example@" in t or "Undisclosed" in t for t in r["unparsed"])
    assert all("\ufffd" in t or t.isascii() for t in r["unparsed"])


def test_check_json_is_valid_utf8_whatever_the_bytes(tmp_path: Path, cfg: Path, capfdbinary) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@corp.example\r\nTo: caf\xe9@x\xff.example, \xc3(@y.example\r\n\r\nx\r\n")
    main(["check", str(eml), "--config", str(cfg), "--rcpt", "x@gmail.com", "--json", "--show"])
    out = capfdbinary.readouterr().out
    text = out.decode("utf-8")  # strict: no lone surrogates
    assert "\\udc" not in text
    json.loads(text)


# --- item 12: the consumer list ------------------------------------------------------------------

NAMED = [
    "mail.ru", "inbox.ru", "mail.com", "online.de", "email.cz", "post.cz", "telstra.com", "virgin.net",
    "talk21.com", "compuserve.com", "prodigy.net", "singnet.com.sg", "yahoo.co.th", "yahoo.co.kr",
    "yahoo.co.za", "rediff.com", "mail.bg", "inbox.lv", "mail.ee",
]  # fmt: skip


def test_the_builtin_list_has_the_providers_public_lists_agree_on() -> None:
    from bccguard.config import builtin_consumer_domains

    builtin = builtin_consumer_domains()
    assert set(NAMED) <= builtin
    # corporate domains that public free-mail lists carry must never be "consumers"
    assert not {"facebook.com", "att.com", "bt.com", "cox.com", "google.com", "microsoft.com"} & builtin


def test_every_batch_in_the_list_names_its_source() -> None:
    from importlib import resources

    text = resources.files("bccguard").joinpath("data/consumer_domains.txt").read_text("utf-8")
    batches = [b for b in text.split("# Batch ")[1:]]
    assert batches and all("lists" in b.split("\n", 1)[0] or "issue" in b.split("\n", 1)[0] for b in batches)


# --- the corpus cases with expected verdicts (tests/corpus/i13-*) -----------------------------------

CORPUS = Path(__file__).parent / "corpus"
VERDICT_CASES = sorted(
    p for p in CORPUS.glob("*.expected.json") if "verdict" in json.loads(p.read_text("utf-8"))
)


def test_the_corpus_grew_by_at_least_40_issue_13_cases() -> None:
    assert len(list(CORPUS.glob("i13-*.eml"))) >= 40


@pytest.mark.parametrize("expected", VERDICT_CASES, ids=lambda p: p.name.removesuffix(".expected.json"))
def test_corpus_verdict_and_nothing_hidden_is_left_for_a_reader(expected: Path) -> None:
    from bccguard.policy.reader import address_like

    want = json.loads(expected.read_text("utf-8"))["verdict"]
    data = expected.with_name(expected.name.replace(".expected.json", ".eml")).read_bytes()
    pol = policy()
    o = evaluate(data, Envelope("sender@corp.example", ("someone@outside.example",)), pol)
    v = o.verdict
    got = {"action": v.action.value, "visible_consumer": v.visible_consumer,
           "visible_external": list(v.visible_external), "unparsed": len(v.unparsed)}  # fmt: skip
    assert got == want
    if v.action is Action.REWRITE:
        # read the rewritten header as a mail reader would: no hidden address anywhere in it
        shown = head_of(o).decode("utf-8", "surrogateescape")
        assert not {a.key for a in address_like(shown)} & set(v.visible_external)


_TEXT_PARTS = st.sampled_from(
    ["a", "b.c", "@", "\uff20", "\ufe6b", " ", '"', "(", ")", "<", ">", "x.example", "J\u00fcrgen",
     "=?utf-8?q?a=40b.example?=", "=?utf-8?q?J=C3=BCrgen?=", "=?UTF-8?Q?a=EF=BC=A0b.example?=",
     "=?utf-8?b?YUBiLmV4YW1wbGU=?=", "=?iso-8859-1?q?b=F6rje?=", "=?shift_jis?q?a=81=97b.example?=",
     "=?x-unknown?q?a=40b.example?="]
)  # fmt: skip


@settings(max_examples=500)
@given(st.lists(_TEXT_PARTS, max_size=12).map("".join))
def test_the_at_sign_count_never_misses_an_address_a_reader_sees(text: str) -> None:
    """`at_signs` lets the parser skip reading an element: it must bound what `address_like` finds."""
    from bccguard.policy.reader import address_like, at_signs

    n, found = at_signs(text), address_like(text)
    assert len(found) <= n  # each at-sign shows at most one address
    if n == 0:
        assert found == []


def test_the_to_fallback_never_copies_an_address_shown_in_the_senders_display_name() -> None:
    o = run('From: "alice@gmail.com" <news@corp.example>\nTo: a@gmail.com, b@gmail.com', reply_to_sender=True)
    head = head_of(o)
    assert b"\r\nTo: <news@corp.example>\r\n" in head and b"Reply-To: <news@corp.example>\r\n" in head
    assert b"alice" not in head.replace(b'From: "alice@gmail.com"', b"")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_LOCALS, st.sampled_from(CONSUMER), _PLACES), min_size=2, max_size=8),
    st.sampled_from([", ", ",\r\n ", "; "]),
)
def test_after_a_rewrite_a_reader_sees_no_consumer_address_in_the_header(
    parts: list[tuple[str, str, str]], sep: str
) -> None:
    """Item 3's other half: whatever the rewrite keeps, a reader finds no hidden address in it."""
    from bccguard.policy.reader import address_like

    elements = [_render(place, local, domain) for local, domain, place in parts]
    plain = [e for e in elements if e.count('"') != 1]
    open_ = [e for e in elements if e.count('"') == 1]
    head = ["From: a@corp.example", f"To: {sep.join(plain) or 'x@corp.example'}", "Cc: team@corp.example"]
    head += [f"Resent-Cc: {e}" for e in open_]
    data = ("\r\n".join(head) + "\r\n\r\nbody\r\n").encode("utf-8")
    o = evaluate(data, ENV, policy(max_visible_consumer=0))
    assert o.verdict.action is Action.REWRITE
    block = parse_header(o.message)
    for f in block.fields:
        if f.lname in ("to", "cc", "resent-to", "resent-cc"):
            assert not [a.key for a in address_like(f.value) if a.domain in CONSUMER], f.value
    assert block.get_all("cc")[0].value == " team@corp.example"


def test_check_counts_recipients_after_a_stray_first_line(tmp_path: Path, cfg: Path, capsys) -> None:
    """The relay quarantines this (item 5); check must say the same, not 'no header fields'."""
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"not a header\r\nTo: a@gmail.com, b@gmail.com\r\n\r\nbody\r\n")
    code, r = _check(capsys, str(eml), "--config", str(cfg), "--rcpt", "a@gmail.com")
    assert code == 1 and r["action"] == "quarantine" and "broken at line 1" in str(r["reason"])
