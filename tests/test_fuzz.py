"""Property tests: generated header blocks and address lists against the pure core and the relay.

How many examples: 2,000 per property by default (the CI budget, a few
seconds each). For a deep run set `BCCGUARD_FUZZ_EXAMPLES`, e.g.

    BCCGUARD_FUZZ_EXAMPLES=50000 PYTHONPATH=src python -m pytest -q tests/test_fuzz.py

The relay-level property sends real SMTP transactions, so it runs a
twentieth of that (100 by default).

Properties:
- parsing arbitrary bytes/text never raises, and offsets stay inside the message;
- `evaluate` never raises on generated messages;
- after a rewrite no hidden address is visible in To/Cc/Resent-To/Resent-Cc
  (re-parsed with the same tolerant parser), and no external one either;
- every field the rewrite does not own, and the body, stay byte for byte, in order;
- through the running relay the envelope reaches the upstream unchanged.
"""

from __future__ import annotations

import asyncio
import os
import smtplib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bccguard.config import from_dict
from bccguard.policy.addresses import (
    RECIPIENT_FIELDS,
    addresses_of,
    parse_address_list,
    parse_fields,
    visible_recipients,
)
from bccguard.policy.classify import classify, external_test
from bccguard.policy.engine import evaluate
from bccguard.policy.headers import parse_header
from bccguard.policy.model import Action, Envelope
from bccguard.policy.rewrite import rewrite_headers

EXAMPLES = int(os.environ.get("BCCGUARD_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
RELAY_FUZZ = settings(
    max_examples=max(20, EXAMPLES // 20),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Any visible external address with an external recipient is an exposure: every case rewrites.
POLICY = from_dict(
    {
        "policy": {
            "internal_domains": ["corp.example"],
            "partner_domains": ["agency.example"],
            "max_visible_external": 0,
            "max_visible_consumer": 0,
        }
    }
).policy
SETTINGS = POLICY.defaults
OWNED = {*RECIPIENT_FIELDS, "bcc", "resent-bcc"}

DOMAINS = [
    "corp.example", "Sub.CORP.example", "agency.example", "evilcorp.example", "gmail.com",
    "GMAIL.COM", "orange.fr", "clients.example", "bücher.example", "xn--bcher-kva.example",
    "[192.0.2.1]", "corp.example.",
]  # fmt: skip
# st.text with an alphabet, not st.from_regex: regex strategies filter, and
# generation then costs more than the properties themselves.
def _text(alphabet: str, lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=lo, max_size=hi)


locals_ = st.one_of(
    _text("abz09._+-", 1, 10),
    _text("abz ,@<>;:.", 1, 10).map(lambda t: f'"{t}"'),
    st.sampled_from(["josé", "a..b", ".x", "=?utf-8?q?a=40b?=", "x(y)"]),
)
addr_specs = st.builds(lambda lp, d: f"{lp}@{d}", locals_, st.sampled_from(DOMAINS))
names = st.one_of(
    _text("ABab .", 1, 12),
    _text("Ab ,@<>;:.()", 0, 12).map(lambda t: f'"{t}"'),
    st.just("=?utf-8?B?w6l0w6k=?="),
)
mailboxes = st.one_of(
    addr_specs,
    addr_specs.map(lambda a: f"<{a}>"),
    st.builds(lambda n, a: f"{n} <{a}>", names, addr_specs),
    st.builds(lambda a, c: f"{a} ({c})", addr_specs, _text("ab @,", 0, 8)),
    st.builds(lambda a: f"<@relay.example:{a}>", addr_specs),
    st.text(alphabet="ab@<>\",;:() .\\", max_size=12),  # garbage
)


def _join(items: list[str], seps: list[str]) -> str:
    out = items[0] if items else ""
    for item, sep in zip(items[1:], seps, strict=False):
        out += sep + item
    return out


SEPS = st.sampled_from([", ", ",", " , ", ",\r\n\t", ",\r\n ", ", ,"])
groups = st.builds(
    lambda n, ms, seps: f"{n}: {_join(ms, seps)};",
    st.sampled_from(["Team", "undisclosed-recipients", '"A; B"']),
    st.lists(mailboxes, max_size=4),
    st.lists(SEPS, max_size=4),
)
address_lists = st.builds(
    _join, st.lists(st.one_of(mailboxes, groups), min_size=1, max_size=8), st.lists(SEPS, max_size=8)
)
other_values = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=40),
    st.just("folded\r\n\tcontinuation"),
    st.just("v=1; d=corp.example; h=from:subject; b=x"),
)
recipient_field = st.tuples(
    st.sampled_from(["To", "Cc", "TO", "cc", "Resent-To", "Resent-Cc", "Bcc", "Resent-Bcc"]),
    address_lists,
)
other_field = st.tuples(
    st.sampled_from(["Subject", "Message-ID", "X-Mailer", "Reply-To", "DKIM-Signature", "Received", "Date"]),
    other_values,
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(st.one_of(recipient_field, other_field), min_size=1, max_size=8))
    lines = ["From: News <news@corp.example>"] + [f"{n}: {v}" for n, v in fields]
    body = draw(st.sampled_from(["", "hi\r\n", "To: body@gmail.com\r\n\r\nmore\r\n", "x" * 50 + "\r\n"]))
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8", "surrogateescape")


ENVELOPE = Envelope("news@corp.example", ("customer@gmail.com", "alice@corp.example"))


@FUZZ
@given(st.binary(max_size=600))
def test_parse_header_never_raises_on_bytes(data: bytes) -> None:
    block = parse_header(data)
    assert 0 <= block.body_offset <= len(data)
    for f in block.fields:
        assert 0 <= f.start < f.end <= len(data)
    visible_recipients(block)


@FUZZ
@given(st.one_of(address_lists, st.text(max_size=200)))
def test_address_list_parsing_never_raises(value: str) -> None:
    for item in parse_address_list(value):
        assert item.start <= item.end


@FUZZ
@given(messages())
def test_rewrite_hides_every_exposed_address_and_touches_nothing_else(msg: bytes) -> None:
    outcome = evaluate(msg, ENVELOPE, POLICY)
    v = outcome.verdict
    out = outcome.message
    if v.action is Action.PASS:
        # no external address was visible at all
        before = parse_header(msg)
        assert not any(classify(a, SETTINGS).is_external for a in visible_recipients(before))
        # byte for byte, but for the Bcc and Resent-Bcc fields (issue 13 item 1)
        want, prev = b"", 0
        for f in before.fields:
            if f.lname in ("bcc", "resent-bcc"):
                want, prev = want + msg[prev : f.start], f.end
        assert out == want + msg[prev:]
        return
    assert v.action is Action.REWRITE
    hidden = set(v.visible_external)
    after = parse_header(out)
    still = visible_recipients(after)
    assert not hidden & {a.key for a in still}
    assert not [a.addr_spec for a in still if classify(a, SETTINGS).is_external]
    assert not after.get_all("bcc") and not after.get_all("resent-bcc")
    # untouched fields: same bytes, same order; the body is identical
    before = parse_header(msg)
    kept_before = [msg[f.start : f.end] for f in before.fields if f.lname not in OWNED]
    kept_after = [out[f.start : f.end] for f in after.fields if f.lname not in OWNED | {"x-bccguard"}]
    assert kept_before == kept_after
    assert out[after.body_offset :] == msg[before.body_offset :]
    assert len(after.get_all("x-bccguard")) == 1


@FUZZ
@given(messages())
def test_one_parse_per_message_gives_what_parsing_again_gives(msg: bytes) -> None:
    """evaluate parses To/Cc once and hands the parse to the rewrite: same bytes as parsing again."""
    block = parse_header(msg)
    parsed = parse_fields(block)
    assert addresses_of(parsed) == visible_recipients(block)
    assert evaluate(msg, ENVELOPE, POLICY).visible == tuple(visible_recipients(block))
    fallback, stamp = "<news@corp.example>", "rewritten; hidden=1"
    again = rewrite_headers(msg, block, external_test(SETTINGS), to_fallback=fallback, stamp=stamp)
    once = rewrite_headers(
        msg, block, external_test(SETTINGS), to_fallback=fallback, stamp=stamp, parsed=parsed
    )
    assert once == again


# ------------------------------------------------------------ through the relay


def _deliver(port: int, rcpts: list[str], data: bytes) -> dict[str, object]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        return c.sendmail("news@corp.example", rcpts, data)


rcpt_lists = st.lists(
    st.builds(lambda lp, d: f"{lp}@{d}", _text("abcxyz019", 1, 8),
              st.sampled_from(["corp.example", "gmail.com", "clients.example", "agency.example"])),
    min_size=1, max_size=8, unique=True,
)  # fmt: skip


def test_relay_keeps_the_envelope_and_hides_what_it_must(tmp_path_factory: object) -> None:
    """The envelope the upstream sees is the client's, whatever the headers say."""
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from bccguard.app import App
    from bccguard.ops.metrics import Metrics
    from conftest import relay_config
    from sink import Sink

    loop = asyncio.new_event_loop()
    sink = Sink()
    loop.run_until_complete(sink.start())
    tmp = Path(tmp_path_factory.mktemp("fuzzrelay"))  # type: ignore[attr-defined]
    cfg = relay_config(tmp, sink.url, {"policy": {"max_visible_external": 0, "max_visible_consumer": 0}})
    app = App(cfg, metrics=Metrics(registry=CollectorRegistry(), rules=["default"]))
    loop.run_until_complete(app.start())

    @RELAY_FUZZ
    @given(messages(), rcpt_lists)
    def prop(msg: bytes, rcpts: list[str]) -> None:
        sink.messages.clear()
        refused = loop.run_until_complete(asyncio.to_thread(_deliver, app.port, rcpts, msg))
        assert refused == {}
        (got,) = sink.messages
        assert got.mail_from == "news@corp.example"
        assert got.rcpt_tos == rcpts
        visible = visible_recipients(parse_header(got.data))
        external_rcpt = any(not r.endswith(("@corp.example", "@agency.example")) for r in rcpts)
        if external_rcpt:
            assert not [a for a in visible if classify(a, SETTINGS).is_external]

    try:
        prop()
    finally:
        loop.run_until_complete(app.stop(timeout=2.0))
        loop.run_until_complete(sink.stop())
        loop.close()
