"""Customer data in bodies and attachments (issue 16): config, detectors, verdicts, `check`.

The fixtures are built at run time (tests/dlp_fixtures.py). These tests run
the same scan the relay runs (`scan_now`: extraction then the pure
detectors) and the one policy entry point (`evaluate`); the relay tests in
test_dlp_relay.py send the same messages through a real relay.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import dlp_fixtures as fx
from bccguard.cli import main
from bccguard.config import ConfigError, DlpSettings, from_dict
from bccguard.extract.html import html_to_text
from bccguard.policy.decide import select_rule
from bccguard.policy.dlp.detect import detect
from bccguard.policy.dlp.model import Extraction, Findings, Piece
from bccguard.policy.dlp.verdict import judge, summary
from bccguard.policy.engine import evaluate
from bccguard.policy.model import Action, Envelope
from bccguard.scan import in_scope, plain_body, scan_now

POLICY = {"internal_domains": ["corp.example"], "partner_domains": ["agency.example"]}
HELD = {f.name: f for f in fx.held_set()}
BUSINESS = {f.name: f for f in fx.business_set()}


def cfg(dlp: dict[str, Any] | None = None, **policy: Any) -> Any:
    return from_dict({"dlp": {"enabled": True, **(dlp or {})}, "policy": {**POLICY, **policy}})


def env(*rcpts: str) -> Envelope:
    return Envelope(mail_from="sales@corp.example", rcpt_tos=rcpts or ("buyer@other.example",))


def run(data: bytes, config: Any, envelope: Envelope | None = None) -> Any:
    envelope = envelope or env()
    _, settings = select_rule(config.policy, envelope)
    findings = scan_now(data, settings) if in_scope(envelope, settings) else None
    return evaluate(data, envelope, config.policy, findings)


# ------------------------------------------------------------------ config


def test_dlp_is_off_by_default_with_the_issue_defaults() -> None:
    d = from_dict({}).dlp
    assert d == DlpSettings()
    assert (d.enabled, d.regions, d.low, d.high) == (False, ("GB",), 1, 10)
    assert d.detectors == ("email", "phone", "iban", "card", "national_id", "customer_table")
    assert (d.low_action, d.high_action, d.unreadable, d.over_limit) == (
        "audit",
        "quarantine",
        "audit",
        "audit",
    )


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"dlp": {"enabeld": True}}, "dlp.enabeld: unknown key (did you mean 'enabled'?)"),
        ({"dlp": {"regions": ["XX"]}}, "dlp.regions: 'XX' is not a region code"),
        ({"dlp": {"detectors": ["ssn"]}}, "dlp.detectors: 'ssn' is not a detector"),
        ({"dlp": {"high_action": "rewrite"}}, "dlp.high_action: 'rewrite' is not one of"),
        ({"dlp": {"unreadable": "reject"}}, "dlp.unreadable: 'reject' is not one of pass, audit, quarantine"),
        ({"dlp": {"low": 0}}, "dlp.low: 0 is not positive"),
        ({"dlp": {"low": 20}}, "dlp.low: 20 is above high (10)"),
        ({"dlp": {"high": "ten"}}, 'dlp.high: expected an integer, got "ten"'),
        ({"policy": {"rules": [{"name": "r", "senders": ["*"], "dlp_hgh": 3}]}}, "did you mean 'dlp_high'?"),
        (
            {"policy": {"rules": [{"name": "r", "senders": ["*"], "dlp_low_action": "x"}]}},
            "dlp_low_action: 'x'",
        ),
        ({"policy": {"dlp": {"enabled": True}}}, "policy.dlp: unknown key"),
    ],
)
def test_bad_dlp_config_is_one_line_naming_key_and_fix(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert len(err.value.problems) == 1 and needle in err.value.problems[0], err.value.problems


def test_a_rule_overrides_dlp_keys_and_inherits_the_rest() -> None:
    c = from_dict({
        "dlp": {"enabled": True, "regions": ["GB", "IE"], "high": 20},
        "policy": {"rules": [{"name": "hr", "senders": ["*@hr.corp.example"], "dlp_high_action": "reject",
                              "dlp_low": 5}]},
    })  # fmt: skip
    rule = c.policy.rules[0].settings.dlp
    assert (rule.high_action, rule.low, rule.high, rule.regions) == ("reject", 5, 20, ("GB", "IE"))
    assert c.policy.defaults.dlp.high_action == "quarantine"


def test_the_example_config_documents_every_dlp_key() -> None:
    text = (Path(__file__).parent.parent / "config" / "bccguard.toml").read_text()
    for key in DlpSettings.__dataclass_fields__:
        assert re.search(rf"^{key} = ", text, re.M), key


# ------------------------------------------------------------- detectors


@pytest.mark.parametrize("name", list(HELD))
def test_customer_data_fixtures_report_their_distinct_counts(name: str) -> None:
    f = HELD[name]
    findings = scan_now(f.data, cfg().policy.defaults)
    assert dict(findings.counts) == f.counts
    assert not findings.unreadable and not findings.over_limit


@pytest.mark.parametrize("name", list(BUSINESS))
def test_ordinary_business_mail_counts_little(name: str) -> None:
    f = BUSINESS[name]
    findings = scan_now(f.data, cfg().policy.defaults)
    assert dict(findings.counts) == {k: v for k, v in f.counts.items() if v}


def detect_text(text: str, **dlp: Any) -> dict[str, int]:
    return dict(detect(Extraction(pieces=(Piece("body", text),)), cfg(dlp).policy.defaults).counts)


def test_instances_are_distinct_and_validated() -> None:
    text = (
        "Call 07911 123456 or 07911123456 or +44 7911 123456 (one number, three spellings).\n"
        "Not numbers: order 12345678, 07700 900123 (reserved for drama), 4111 1111 1111 1112 (bad Luhn),\n"
        "GB82 WEST 1234 5698 7654 33 (bad check digits). Card 4111-1111-1111-1111 twice: 4111111111111111.\n"
        "IBAN GB82WEST12345698765432, NINO AB 12 34 56 C, VAT GB 980 7806 84.\n"
    )
    assert detect_text(text) == {"phone": 1, "card": 1, "iban": 1, "national_id": 2}


def test_email_addresses_of_colleagues_and_partners_do_not_count_consumers_count_twice() -> None:
    text = "Ask ann@corp.example, bob@agency.example, cy@acme.example or dee@gmail.com (dee@GMAIL.com)."
    assert detect_text(text) == {"email": 3}


def test_regions_decide_which_national_numbers_are_phones() -> None:
    text = "Ring 089 1234567 please."  # a Munich number, written nationally
    assert detect_text(text) == {}
    assert detect_text(text, regions=["DE"]) == {"phone": 1}


def test_disabled_detectors_count_nothing() -> None:
    assert detect_text("Mob 07911 123456, IBAN GB82WEST12345698765432", detectors=["iban"]) == {"iban": 1}


def test_html_is_read_as_rendered_text_with_tables_as_rows() -> None:
    html = (
        "<html><head><style>td{}</style><script>var x='07911 123456'</script></head><body>"
        "<p>Hi&nbsp;there</p><table><tr><th>Name</th><th>Mobile</th></tr>"
        + "".join(f"<tr><td>C{i}</td><td>07911 2{i}0{i}00</td></tr>" for i in range(5))
        + "</table></body></html>"
    )
    text = html_to_text(html)
    assert "var x" not in text and "Name\tMobile" in text
    assert detect_text(text) == {"phone": 5, "customer_table": 5}


def test_a_plain_body_is_taken_without_a_mime_parse() -> None:
    assert plain_body(b"Subject: x\r\n\r\nhello\r\n") == "hello\r\n"
    qp = (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=C3=A9\r\n"
    )
    assert plain_body(qp) == "Café\r\n"
    assert plain_body(b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n") is None
    assert plain_body(b"Content-Type: text/html\r\n\r\n<p>x</p>") is None


# --------------------------------------------------------------- verdicts


def test_levels_follow_low_and_high() -> None:
    d = DlpSettings(enabled=True)
    assert judge(Findings(), d).action is Action.PASS
    low = judge(Findings(counts=(("phone", 9),)), d)
    assert (low.action, low.level, low.levels) == (Action.AUDIT, "low", {"phone": "low"})
    high = judge(Findings(counts=(("phone", 10), ("iban", 1))), d)
    assert (high.action, high.level, high.levels) == (
        Action.QUARANTINE,
        "high",
        {"phone": "high", "iban": "low"},
    )
    assert high.reason == "customer data in the message: 10 phone numbers, 1 IBANs (high volume: 10 or more)"
    assert judge(Findings(unreadable=("attachment:zip:-",)), d).action is Action.AUDIT
    assert judge(Findings(over_limit=("time",)), DlpSettings(over_limit="reject")).action is Action.REJECT


@pytest.mark.parametrize("name", list(HELD))
def test_customer_data_to_an_outside_domain_is_held(name: str) -> None:
    v = run(HELD[name].data, cfg()).verdict
    assert v.action is Action.QUARANTINE and v.dlp is not None and v.dlp.level == "high"


@pytest.mark.parametrize("rcpt", ["rep@agency.example", "colleague@corp.example", "x@sub.corp.example"])
@pytest.mark.parametrize("name", list(HELD))
def test_customer_data_to_a_partner_or_colleague_passes_unscanned(name: str, rcpt: str) -> None:
    config = cfg()
    assert not in_scope(env(rcpt), config.policy.defaults)
    v = run(HELD[name].data, config, env(rcpt)).verdict
    assert v.action is Action.PASS and v.dlp is None


@pytest.mark.parametrize("name", list(BUSINESS))
def test_ordinary_business_mail_goes_out_at_the_default_thresholds(name: str) -> None:
    v = run(BUSINESS[name].data, cfg()).verdict
    assert v.action in (Action.PASS, Action.AUDIT) and not v.changes_message


def test_the_stricter_verdict_wins_and_the_reason_names_both() -> None:
    customers = [f"c{i}@gmail.com" for i in range(12)]
    data = fx.mail("Numbers:\nName\tMobile\n" + "\n".join(f"N{i}\t07911 2{i:02d}000" for i in range(12)),
                   to=", ".join(customers))  # fmt: skip
    envelope = Envelope(mail_from="sales@corp.example", rcpt_tos=tuple(customers))
    config = cfg()
    out = evaluate(data, envelope, config.policy, scan_now(data, config.policy.defaults))
    v = out.verdict
    assert v.action is Action.QUARANTINE and v.exposure
    assert "customer addresses are visible in To/Cc" in v.reason and "12 phone numbers" in v.reason
    assert out.message == data  # held as sent: nothing rewritten first
    # header says rewrite, DLP only audits: the rewrite stands, the reason still names both
    out = evaluate(
        data, envelope, cfg({"high_action": "audit"}).policy, scan_now(data, config.policy.defaults)
    )
    assert out.verdict.action is Action.REWRITE and "12 phone numbers" in out.verdict.reason


def test_a_rule_can_reject_where_the_default_holds() -> None:
    config = cfg(rules=[{"name": "sales", "senders": ["sales@*"], "dlp_high_action": "reject"}])
    rule = config.policy.rules[0].settings
    data = HELD["ibans"].data
    v = evaluate(data, env(), config.policy, scan_now(data, rule)).verdict
    assert (v.action, v.rule) == (Action.REJECT, "sales")


def test_without_findings_evaluate_is_unchanged() -> None:
    data = HELD["csv"].data
    assert evaluate(data, env(), cfg().policy).verdict.action is Action.PASS


# ----------------------------------------------------------- hostile input


@pytest.fixture(scope="module")
def hostile() -> list[tuple[str, bytes, str]]:
    return fx.hostile_set()


def test_hostile_attachments_get_a_defined_verdict(hostile: list[tuple[str, bytes, str]]) -> None:
    config = cfg()
    for name, data, expect in hostile:
        findings = scan_now(data, config.policy.defaults)
        if expect == "unreadable":
            assert findings.unreadable and not findings.over_limit, name
        else:
            assert expect in findings.over_limit, (name, findings)
        v = evaluate(data, env(), config.policy, findings).verdict
        assert v.action is Action.AUDIT and v.dlp is not None, name
        held = evaluate(data, env(), cfg({"unreadable": "quarantine", "over_limit": "quarantine"}).policy,
                        findings).verdict  # fmt: skip
        assert held.action is Action.QUARANTINE, name


def test_pages_past_the_limit_are_cut_but_the_first_ones_are_read() -> None:
    rows = fx.customers(120)  # three pages
    data = fx.mail("x", attachments=(("a.pdf", "application/pdf", fx.pdf_bytes(rows)),))
    from bccguard.extract.limits import Limits

    findings = scan_now(data, cfg().policy.defaults, Limits(pages=1))
    assert findings.over_limit == ("pages",) and 10 < findings.count("phone") < 120


# ------------------------------------------------------------ check --json


def write_config(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "bccguard.toml"
    p.write_text(
        '[policy]\ninternal_domains = ["corp.example"]\npartner_domains = ["agency.example"]\n'
        f"[dlp]\nenabled = true\n{extra}"
    )
    return p


def values_of(data: bytes) -> list[str]:
    """Values the fixtures carry that must never be printed: customers' addresses, numbers, IBANs."""
    rows = fx.customers()
    out = [r[2] for r in rows[:40]] + [r[3] for r in rows[:40]] + [r[3].replace(" ", "") for r in rows[:40]]
    out += [fx.gb_iban(i) for i in range(20)] + [f"07911 {200000 + i * 13:06d}" for i in range(50)]
    return out


@pytest.mark.parametrize("name", list(HELD))
def test_check_json_reports_counts_and_places_never_values(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = HELD[name]
    eml = tmp_path / "m.eml"
    eml.write_bytes(f.data)
    code = main(["check", str(eml), "--config", str(write_config(tmp_path)), "--json"])
    out = capsys.readouterr().out
    result = json.loads(out)
    assert code == 1 and result["action"] == "quarantine"
    assert result["dlp"]["counts"] == f.counts and result["dlp"]["level"] == "high"
    places = result["dlp"]["places"]
    assert all(re.fullmatch(r"body|attachment:[a-z]+:[0-9a-f]{8}(/[a-z]+:[0-9a-f]{8})*", p) for p in places)
    for value in values_of(f.data):
        assert value not in out
    assert "customers.csv" not in out and "renewals.xlsx" not in out


def test_check_human_output_shows_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(HELD["zip"].data)
    assert main(["check", str(eml), "--config", str(write_config(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "customer data: email 750, phone 500, customer_table 500 (high volume)" in out
    assert re.search(r"attachment:zip:[0-9a-f]{8}/csv:[0-9a-f]{8}: email 750", out)


def test_check_to_a_partner_scans_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(HELD["csv"].data)
    assert main(["check", str(eml), "--config", str(write_config(tmp_path)), "--rcpt", "x@agency.example",
                 "--json"]) == 0  # fmt: skip
    assert "dlp" not in json.loads(capsys.readouterr().out)


def test_summary_carries_counts_only() -> None:
    f = HELD["csv"]
    config = cfg()
    v = run(f.data, config).verdict
    text = json.dumps(summary(v.dlp, places=True)) + v.reason
    assert "@" not in text and not any(value in text for value in values_of(f.data))


def test_a_table_without_a_header_row_counts_every_row() -> None:
    rows = "\n".join(f"{r[1]}\t{r[2]}\t{r[3]}" for r in fx.customers(8))
    assert detect_text(f"As requested:\n{rows}\n")["customer_table"] == 8


def test_a_scan_stopped_by_time_keeps_what_it_counted() -> None:
    """A huge list past the time limit is judged by what was found, not passed for finding nothing."""
    rows = fx.customers(2000)
    text = "\n".join(f"{r[1]}\t{r[3]}" for r in rows)  # ~50 KB of names and numbers
    piece = Piece("body", text * 3)  # three chunks
    calls = iter([False, True])
    findings = detect(Extraction(pieces=(piece,)), cfg().policy.defaults, should_stop=lambda: next(calls))
    assert findings.over_limit == ("time",)
    assert 500 <= findings.count("phone") <= 2000
    v = judge(findings, DlpSettings(enabled=True))
    assert v.action is Action.QUARANTINE and v.level == "high"


@pytest.mark.parametrize("kind", ["xlsx", "pdf", "docx", "zip"])
def test_truncated_and_corrupted_documents_never_crash_the_scan(kind: str) -> None:
    rows = fx.customers(30)
    ctype, name, good = {
        "xlsx": (fx.XLSX, "a.xlsx", fx.xlsx_bytes(rows)),
        "pdf": ("application/pdf", "a.pdf", fx.pdf_bytes(rows)),
        "docx": (fx.DOCX, "a.docx", fx.docx_bytes(rows)),
        "zip": ("application/zip", "a.zip", fx.zip_bytes({"a.csv": fx.csv_bytes(rows)})),
    }[kind]
    settings = cfg().policy.defaults
    for cut in range(0, len(good), max(1, len(good) // 40)):
        for bad in (good[:cut], good[:cut] + bytes(64) + good[cut + 64 :], good[:cut] + good[cut + 1 :]):
            findings = scan_now(fx.attached("x", name, ctype, bad), settings)
            assert isinstance(findings, Findings)


def test_ods_tsv_and_an_attached_message_are_read_too() -> None:
    rows = fx.customers(40)
    counts = fx.customer_counts(40)
    settings = cfg().policy.defaults
    ods = fx.attached("x", "list.ods", "application/vnd.oasis.opendocument.spreadsheet", fx.ods_bytes(rows))
    tsv = fx.attached("x", "list.tsv", "text/tab-separated-values", fx.csv_bytes(rows).replace(b",", b"\t"))
    inner = fx.attached("x", "list.csv", "text/csv", fx.csv_bytes(rows))
    for data, kind in ((ods, "sheet"), (tsv, "csv"), (fx.forwarded(inner), "eml")):
        findings = scan_now(data, settings)
        assert dict(findings.counts) == counts, kind
        assert [p.where.split(":")[1] for p in findings.places] == [kind]


def test_messages_attached_inside_messages_stop_at_the_depth_limit() -> None:
    data = fx.attached("x", "list.csv", "text/csv", fx.csv_bytes(fx.customers(20)))
    for _ in range(6):
        data = fx.forwarded(data)
    findings = scan_now(data, cfg().policy.defaults)
    assert findings.over_limit == ("depth",) and findings.counts == ()
