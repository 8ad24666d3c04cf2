"""Split delivery end to end: one copy per customer, To them alone, spooled before the 250."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import pytest

from bccguard.app import App
from bccguard.policy.headers import parse_header
from conftest import StartRelay, data_reply, message
from proc import eventually
from sink import Received, Sink

CUSTOMERS = [f"customer{i}@{'gmail.com' if i % 3 else 'clients.example'}" for i in range(300)]
NAMED = {c: f'"Customer {i}, Jr." <{c}>' for i, c in enumerate(CUSTOMERS) if i % 50 == 7}
INTERNAL = ["sales@corp.example", "boss@corp.example"]
SPLIT = {"policy": {"action": "split"}, "spool": {"retry_schedule": ["1s"]}}
CUSTOMER_RE = re.compile(rb"customer\d+@(?:gmail\.com|clients\.example)", re.IGNORECASE)


def survey(customers: list[str] = CUSTOMERS) -> bytes:
    """To lists every customer (some with display names), folded as a mail client would."""
    to = [NAMED.get(c, c) for c in customers]
    data = message(to, cc=["sales@corp.example"])
    return data.replace(b">, ", b">,\r\n ").replace(b".com, ", b".com,\r\n ")


def head(m: Received) -> bytes:
    return m.data[: parse_header(m.data).body_offset]


def field(block: bytes, name: bytes) -> bytes:
    m = re.search(rb"^" + name + rb":(.*(?:\r\n[ \t].*)*)\r\n", block, re.IGNORECASE | re.MULTILINE)
    assert m is not None, name
    return b" ".join(m.group(1).split())


async def split_survey(app: App, mail_from: str = "news@corp.example", customers: list[str] = CUSTOMERS,
                       data: bytes | None = None) -> tuple[int, bytes]:
    rcpts = [*customers, *INTERNAL]
    return await asyncio.to_thread(data_reply, app.port, mail_from, rcpts, data or survey(customers))


async def test_split_survey_gives_each_customer_one_copy_to_them_alone(
    start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(sink.url, SPLIT)
    original = survey()
    code, text = await split_survey(app)
    assert (code, text) == (250, b"2.0.0 Ok: split into 301 copies")
    await eventually(lambda: len(sink.messages) >= 301, what="301 copies delivered")
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    assert len(sink.messages) == 301

    per_rcpt = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert all(per_rcpt[c] == 1 for c in CUSTOMERS)
    body = original.partition(b"\r\n\r\n")[2]
    for m in sink.messages:
        block = head(m)
        assert b"Message-ID: <survey-1@corp.example>" in block
        assert m.data.endswith(body) and m.mail_from == "news@corp.example"
        if m.rcpt_tos[0] in INTERNAL:
            continue
        (c,) = m.rcpt_tos
        # To is this customer alone (display name kept), and no other customer appears anywhere
        assert field(block, b"To") == NAMED.get(c, c).encode()
        assert {x.lower() for x in CUSTOMER_RE.findall(block)} == {c.encode()}
        assert field(block, b"Cc") == b"sales@corp.example"
        assert b"X-BCCGuard: split; hidden=300" in block

    (internal,) = [m for m in sink.messages if m.rcpt_tos[0] in INTERNAL]
    assert internal.rcpt_tos == INTERNAL
    block = head(internal)
    assert CUSTOMER_RE.search(block) is None
    assert field(block, b"To") == b"Marketing <news@corp.example>"
    assert field(block, b"Cc") == b"sales@corp.example"

    v = app.metrics.registry.get_sample_value
    assert v("bccguard_split_copies_total", {"event": "created"}) == 301
    assert v("bccguard_split_copies_total", {"event": "delivered"}) == 301
    assert v("bccguard_messages_total", {"action": "split", "rule": "default"}) == 1
    assert v("bccguard_spool_copies") == 0


async def test_copies_are_retried_per_copy_and_5xx_gets_a_dsn_for_those_only(
    start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(sink.url, SPLIT)
    customers = CUSTOMERS[:30]
    sink.rcpt_replies = {c: "451 4.2.1 Mailbox busy" for c in customers[10:15]}
    sink.rcpt_replies |= {c: "550 5.1.1 User unknown" for c in customers[20:22]}
    code, _ = await split_survey(app, customers=customers)
    assert code == 250
    delivered = lambda: Counter(r for m in sink.messages if m.reply.startswith("2") for r in m.rcpt_tos)  # noqa: E731
    # everything else arrives while the busy mailboxes are still refusing
    await eventually(lambda: len(delivered()) == 30 + 2 - 5 - 2 + 1, what="first pass")  # + the DSN
    (entry,) = [e for e in app.runtime.spool.entries() if e.kind == "split"]
    assert sorted(entry.rcpt_tos) == sorted(customers[10:15])
    assert all(c.attempts >= 1 for c in entry.copies)
    (dsn,) = [m for m in sink.messages if m.mail_from == "<>"]  # how the sink records <>
    assert dsn.rcpt_tos == ["news@corp.example"]
    reported = re.findall(rb"Final-Recipient: rfc822; (\S+)", dsn.data)
    assert sorted(reported) == [b"customer20@gmail.com", b"customer21@clients.example"]
    # one report for both, quoting the rewritten headers: no other customer in it
    assert {x.lower() for x in CUSTOMER_RE.findall(dsn.data)} == set(reported)

    sink.rcpt_replies = {}
    await eventually(lambda: all(delivered()[c] == 1 for c in customers[10:15]), what="retried copies")
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    assert all(n == 1 for n in delivered().values())
    v = app.metrics.registry.get_sample_value
    assert v("bccguard_spool_retries_total", {"kind": "split"}) >= 5
    assert v("bccguard_split_copies_total", {"event": "failed"}) == 2


async def test_null_sender_split_failures_send_no_dsn(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, SPLIT)
    customers = CUSTOMERS[:12]
    sink.rcpt_replies = {customers[0]: "550 5.1.1 User unknown"}
    code, _ = await split_survey(app, mail_from="", customers=customers)
    assert code == 250
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    assert len(sink.messages) == 12  # 11 customers + the internal copy; no DSN
    assert all(m.mail_from == "<>" for m in sink.messages)


async def test_reply_to_guard_on_split_and_rewrite(start_relay: StartRelay, sink: Sink) -> None:
    app = await start_relay(sink.url, {**SPLIT, "policy": {"action": "split", "reply_to_sender": True}})
    customers = CUSTOMERS[:12]
    await split_survey(app, customers=customers)
    await eventually(lambda: len(sink.messages) == 13, what="13 copies")
    assert all(field(head(m), b"Reply-To") == b"Marketing <news@corp.example>" for m in sink.messages)

    sink.messages.clear()  # a Reply-To the sender chose is left alone
    with_reply_to = message(customers, extra="Reply-To: <survey-team@corp.example>")
    await split_survey(app, customers=customers, data=with_reply_to)
    await eventually(lambda: len(sink.messages) == 13, what="13 copies")
    assert all(head(m).count(b"Reply-To:") == 1 for m in sink.messages)
    assert all(field(head(m), b"Reply-To") == b"<survey-team@corp.example>" for m in sink.messages)

    rewrite = await start_relay(sink.url, {"policy": {"action": "rewrite", "reply_to_sender": True}})
    sink.messages.clear()
    await asyncio.to_thread(data_reply, rewrite.port, "news@corp.example", customers, message(customers))
    assert field(head(sink.messages[0]), b"Reply-To") == b"Marketing <news@corp.example>"


def test_plan_split_pure_cases() -> None:
    """Envelope vs header spelling (case, IDN) keeps the display name; a Bcc-only one gets its address."""
    from bccguard.config import from_dict
    from bccguard.policy.engine import evaluate
    from bccguard.policy.model import Envelope
    from bccguard.policy.split import render

    policy = from_dict({"policy": {"internal_domains": ["corp.example"], "action": "split",
                                   "max_visible_external": 1}}).policy
    data = (
        "From: M <news@corp.example>\r\nTo: Bob <Bob@Bücher.example>, x@clients.example\r\n"
        "Cc: Boss <boss@corp.example>, y@clients.example\r\nMessage-ID: <p@corp.example>\r\n\r\nhi\r\n"
    ).encode()
    env = Envelope("news@corp.example", ("bob@xn--bcher-kva.example", "x@clients.example",
                                          "hidden@bcc.example", "x@clients.example", "boss@corp.example"))
    out = evaluate(data, env, policy)
    assert out.split is not None
    assert [(c.rcpts, c.to) for c in out.split.copies] == [
        (("bob@xn--bcher-kva.example",), "Bob <Bob@Bücher.example>"),
        (("x@clients.example",), "x@clients.example"),
        (("hidden@bcc.example",), "hidden@bcc.example"),  # Bcc'd: To is just them
        (("boss@corp.example",), None),
    ]
    spec = out.split.render_json()
    assert render(data, spec, None) == out.message  # the shared copy is the engine's rewrite
    copy = render(data, spec, "hidden@bcc.example")
    assert b"To: hidden@bcc.example\r\nCc: Boss <boss@corp.example>\r\n" in copy
    assert b"clients.example" not in copy and "Bücher".encode() not in copy


def test_issue4_series_exist_at_zero() -> None:
    from prometheus_client import CollectorRegistry

    from bccguard.ops.metrics import NOTICE_RESULTS, RELEASE_RESULTS, SPLIT_COPY_EVENTS, SPOOL_KINDS, Metrics

    r = CollectorRegistry()
    Metrics(r, rules=[], version="t")
    for name, label, values in (
        ("bccguard_spool_retries_total", "kind", SPOOL_KINDS),
        ("bccguard_split_copies_total", "event", SPLIT_COPY_EVENTS),
        ("bccguard_quarantine_releases_total", "result", RELEASE_RESULTS),
        ("bccguard_notices_total", "result", NOTICE_RESULTS),
    ):
        for v in values:
            assert r.get_sample_value(name, {label: v}) == 0, (name, v)
    assert r.get_sample_value("bccguard_spool_entries") == 0
    assert r.get_sample_value("bccguard_spool_copies") == 0


async def test_split_bookkeeping_is_journal_lines_not_rewrites(
    start_relay: StartRelay, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean split never rewrites its entry; a deferral costs one rewrite for the pass."""
    import bccguard.store.spool as spool_mod

    rewrites: list[str] = []
    real = spool_mod.atomic_write

    def counting(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
        rewrites.append(path.name)
        real(path, data, sync_dir=sync_dir)

    monkeypatch.setattr(spool_mod, "atomic_write", counting)
    app = await start_relay(sink.url, SPLIT)
    customers = CUSTOMERS[:30]
    await split_survey(app, customers=customers)
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    assert len(sink.messages) == 31 and rewrites == []
    assert [p.name for p in app.runtime.spool.path.iterdir() if not p.name.startswith(".")] == []

    sink.messages.clear()
    sink.rcpt_replies = {customers[3]: "451 4.2.1 Mailbox busy"}
    await split_survey(app, customers=customers)
    await eventually(lambda: len(sink.messages) == 30, what="all but the busy copy")
    await eventually(lambda: len(rewrites) == 1, what="the pass's one rewrite")
    sink.rcpt_replies = {}
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    # one rewrite per pass that deferred the busy copy, however many copies went meanwhile
    retries = app.metrics.registry.get_sample_value("bccguard_spool_retries_total", {"kind": "split"})
    assert len(rewrites) == retries
    assert Counter(r for m in sink.messages if m.reply.startswith("2") for r in m.rcpt_tos)[customers[3]] == 1


async def test_copy_taken_in_part_never_goes_again_to_those_who_got_it(
    start_relay: StartRelay, sink: Sink
) -> None:
    app = await start_relay(sink.url, SPLIT)
    customers = CUSTOMERS[:5]
    sink.rcpt_replies = {"boss@corp.example": "451 4.2.1 Mailbox busy"}
    await split_survey(app, customers=customers)
    await eventually(lambda: len(sink.messages) == 6, what="the first pass")
    # The sink records a transaction before the relay has written what it means:
    # wait for the spool's own state, not just for the sink.
    await eventually(
        lambda: [e.rcpt_tos for e in app.runtime.spool.entries()] == [("boss@corp.example",)],
        what="only the deferred recipient left",
    )
    (entry,) = app.runtime.spool.entries()
    assert entry.copies[0].attempts == 1
    sink.rcpt_replies = {}
    await eventually(lambda: app.runtime.spool.entries() == [], what="spool empty")
    got = Counter(r for m in sink.messages if m.reply.startswith("2") for r in m.rcpt_tos)
    assert got == Counter([*customers, *INTERNAL])


async def test_entry_whose_journal_names_every_copy_is_removed(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    """Left by a crash while the last copies were recorded: nothing goes, the entry goes."""
    from bccguard.policy.split import CopySpec
    from bccguard.store.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.open()
    specs = [CopySpec(rcpts=(c,), to=c) for c in CUSTOMERS[:2]]
    eid = spool.put_split(survey(CUSTOMERS[:2]), "news@corp.example", specs, {"v": 1})
    for c in spool.entry(eid).copies:
        spool.delivered(eid, c)
    app = await start_relay(sink.url, SPLIT)
    # The runner's thread unlinks .json first and the journal last: wait for both.
    entry, journal = tmp_path / "spool" / f"{eid}.json", tmp_path / "spool" / f"{eid}.done"
    await eventually(lambda: not entry.exists() and not journal.exists(), what="entry removed")
    assert sink.messages == [] and app.runtime.spool.entries() == []
