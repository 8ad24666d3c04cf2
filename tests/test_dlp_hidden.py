"""Customer data (issue 16): the reviewer's "other cases of the same kinds", beyond the examples.

Every listed format in the encodings real mail uses (base64 and
quoted-printable parts, `;` CSV with quoted fields, UTF-8 and UTF-16 CSV
with a BOM, TSV, ODS, XLSX with several sheets, a PDF drawn cell by cell,
DOCX tables, a ZIP in a ZIP, a forwarded message carrying a CSV, an HTML
table, octet-stream with a .CSV name); numbers written the ways people write
them; the thresholds at their edges; mixed envelopes; per-rule overrides;
encrypted documents under each `unreadable` setting; and ordinary business
text (order numbers, dates, timestamps, prices, tracking numbers, UUIDs)
that must count as nothing.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import zipfile
import zlib
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

import dlp_fixtures as fx
from bccguard.cli import main
from bccguard.config import from_dict
from bccguard.policy.decide import select_rule
from bccguard.policy.dlp.detect import detect
from bccguard.policy.dlp.model import Extraction, Piece
from bccguard.policy.engine import evaluate
from bccguard.policy.model import Action, Envelope
from bccguard.scan import in_scope, scan_now

POLICY = {"internal_domains": ["corp.example"], "partner_domains": ["agency.example"]}
N = 40
ROWS = fx.customers(N)
COUNTS = fx.customer_counts(N)


def cfg(dlp: dict[str, Any] | None = None, **policy: Any) -> Any:
    return from_dict({"dlp": {"enabled": True, **(dlp or {})}, "policy": {**POLICY, **policy}})


def counts_of(data: bytes, config: Any = None) -> dict[str, int]:
    findings = scan_now(data, (config or cfg()).policy.defaults)
    assert not findings.unreadable and not findings.over_limit, findings
    return dict(findings.counts)


def text_counts(text: str, **dlp: Any) -> dict[str, int]:
    return dict(detect(Extraction(pieces=(Piece("body", text),)), cfg(dlp).policy.defaults).counts)


def verdict(data: bytes, config: Any, *rcpts: str) -> Any:
    envelope = Envelope(mail_from="sales@corp.example", rcpt_tos=rcpts or ("buyer@other.example",))
    _, settings = select_rule(config.policy, envelope)
    findings = scan_now(data, settings) if in_scope(envelope, settings) else None
    return evaluate(data, envelope, config.policy, findings).verdict


def attach(data: bytes, filename: str, ctype: str, cte: str | None = None) -> bytes:
    m = EmailMessage()
    m["From"] = "sales@corp.example"
    m["To"] = "buyer@other.example"
    m["Subject"] = "the list"
    m.set_content("Attached.")
    maintype, subtype = ctype.split("/", 1)
    kw: dict[str, Any] = {"cte": cte} if cte else {}
    m.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename, **kw)
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def csv_text(delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL) -> str:
    out = io.StringIO()
    w = csv.writer(out, delimiter=delimiter, quoting=quoting)
    w.writerow(fx.HEADER)
    w.writerows(ROWS)
    return out.getvalue()


def two_sheet_xlsx() -> bytes:
    from openpyxl import Workbook

    wb = Workbook()
    wb.active.append(["Notes"])
    wb.active.append(["Q4 renewals, second tab"])
    ws = wb.create_sheet("Customers")
    ws.append(list(fx.HEADER))
    for r in ROWS:
        ws.append(list(r))
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def cell_pdf() -> bytes:
    """A PDF drawn as a grid: each cell its own text object at its own position (as BI tools write)."""
    ops = ["BT /F1 7 Tf ET"]
    y = 800
    for row in (fx.HEADER, *ROWS):
        x = 20
        for cell in row:
            safe = cell.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"BT /F1 6 Tf {x} {y} Td ({safe}) Tj ET")
            x += 95
        y -= 9
        if y < 20:
            break
    stream = "\n".join(ops).encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 620 842] /Resources << /Font << /F1 4 0 R >> >> "
        b"/Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length " + str(len(zlib.compress(stream))).encode() + b" /Filter /FlateDecode >>\nstream\n"
        + zlib.compress(stream) + b"\nendstream",
    ]  # fmt: skip
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer << /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def forwarded_with_csv() -> bytes:
    inner = attach(csv_text().encode(), "export.csv", "text/csv")
    outer = EmailMessage()
    outer["From"] = "sales@corp.example"
    outer["To"] = "buyer@other.example"
    outer["Subject"] = "Fwd: the list"
    outer.set_content("See below.")
    outer.add_attachment(inner, maintype="message", subtype="rfc822")
    data = outer.as_bytes(policy=outer.policy.clone(linesep="\r\n"))
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)  # the stdlib's base64 of a message part ends lines in LF


def nested_zip() -> bytes:
    return fx.zip_bytes({"outer/inner.zip": fx.zip_bytes({"deep/customers.CSV": csv_text().encode()})})


def html_table_body() -> bytes:
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in ROWS)
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in fx.HEADER) + "</tr>"
    return fx.mail("See the HTML version.", html=f"<html><body><table>{head}{cells}</table></body></html>")


FORMATS = {
    "csv-semicolon-quoted": lambda: attach(csv_text(";", csv.QUOTE_ALL).encode(), "list.csv", "text/csv"),
    "csv-base64": lambda: attach(csv_text().encode(), "list.csv", "text/csv", "base64"),
    "csv-quoted-printable": lambda: attach(csv_text().encode(), "list.csv", "text/csv", "quoted-printable"),
    "csv-utf8-bom": lambda: attach(b"\xef\xbb\xbf" + csv_text(";").encode(), "list.csv", "text/csv"),
    "csv-utf16-bom": lambda: attach(csv_text(";").encode("utf-16"), "Liste.csv", "application/octet-stream"),
    "csv-utf16le-excel": lambda: attach(
        b"\xff\xfe" + csv_text("\t").encode("utf-16-le"), "export.csv", "application/vnd.ms-excel"
    ),
    "csv-utf16le-no-bom": lambda: attach(csv_text(";").encode("utf-16-le"), "list.csv", "text/csv"),
    "csv-octet-stream-uppercase": lambda: attach(csv_text().encode(), "LIST.CSV", "application/octet-stream"),
    "tsv": lambda: attach(csv_text("\t").encode(), "list.tsv", "text/tab-separated-values"),
    "xlsx-two-sheets": lambda: attach(two_sheet_xlsx(), "Renewals.XLSX", fx.XLSX),
    "xlsx-as-octet-stream": lambda: attach(two_sheet_xlsx(), "renewals.xlsx", "application/octet-stream"),
    "ods": lambda: attach(fx.ods_bytes(ROWS), "list.ods", "application/vnd.oasis.opendocument.spreadsheet"),
    "docx-table": lambda: attach(fx.docx_bytes(ROWS), "list.DOCX", fx.DOCX),
    "pdf-cells": lambda: attach(cell_pdf(), "report.pdf", "application/pdf"),
    "zip-in-zip": lambda: attach(nested_zip(), "data.zip", "application/zip"),
    "message-rfc822-with-csv": forwarded_with_csv,
    "html-table-body": html_table_body,
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_in_its_real_encodings_is_read(name: str) -> None:
    data = FORMATS[name]()
    counts = counts_of(data)
    assert counts.get("phone") == N, counts
    assert counts.get("customer_table") == N, counts
    if name != "pdf-cells":  # the cell grid PDF may split an address at a cell edge: phones are enough
        assert counts.get("email") == COUNTS["email"], counts
    v = verdict(data, cfg())
    assert v.action is Action.QUARANTINE, v.reason


@pytest.mark.parametrize(
    "text",
    [
        "07400 123456", "07400-123-456", "07400 123 456", "(07400) 123456", "+44 7400 123456",
        "+44 (0)7400 123456", "0044 7400 123456", "+447400123456", "020 7946 0018", "(020) 7946 0018",
        "+44 20 7946 0018", "0161 496 0000", "+33 1 42 68 53 00", "+33 6 12 34 56 78", "+49 30 901820",
        "+49 (0)30 12345678", "+49 151 23456789", "0049 151 23456789",
    ],
)  # fmt: skip
def test_phone_numbers_as_people_write_them(text: str) -> None:
    assert text_counts(f"Call me on {text} tomorrow.") == {"phone": 1}


def test_german_national_numbers_count_with_a_de_region() -> None:
    text = "Kunden:\n030 901820\n0151 23456789\n089 12345678\n"
    assert text_counts(text, regions=["GB"]).get("phone", 0) == 0
    assert text_counts(text, regions=["GB", "DE"])["phone"] == 3


@pytest.mark.parametrize(
    "text",
    [
        "GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765432", "DE89 3704 0044 0532 0130 00",
        "FR14 2004 1010 0505 0001 3M02 606", "NL91 ABNA 0417 1643 00", "ES91 2100 0418 4502 0005 1332",
        "IE29 AIBK 9311 5212 3456 78", "BE71 0961 2345 6769", "IT60 X054 2811 1010 0000 0123 456",
    ],
)  # fmt: skip
def test_ibans_of_several_countries_with_and_without_spaces(text: str) -> None:
    assert text_counts(f"Please pay to {text} by Friday.") == {"iban": 1}


@pytest.mark.parametrize(
    "text",
    ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5500 0000 0000 0004",
     "3782 822463 10005", "6011 1111 1111 1117", "5555-5555-5555-4444"],
)  # fmt: skip
def test_card_numbers_with_spaces_and_dashes(text: str) -> None:
    assert text_counts(f"Card: {text}, exp 12/27") == {"card": 1}


def test_a_card_number_failing_luhn_is_not_a_card() -> None:
    assert "card" not in text_counts("Card: 4111 1111 1111 1112")


BUSINESS_LINES = [
    "Order 2079460018 shipped on 2026-12-02 18:30:12 UTC",
    "Order no. 1234567890, invoice INV-2026-000123, total £1,234,567.89",
    "DHL tracking 1234567890, UPS 1Z999AA10123456784, Royal Mail AB123456789GB",
    "Request id 550e8400-e29b-41d4-a716-446655440000 at 20261202183012",
    "Batch 20261202183012345 closed 02/12/2026 18:30, reopened 12.11.2026 10:20:33",
    "Unix time 1701534612, build 2026.12.02.1830, version 4.2.1",
    "PO 01234567, SKU 400012345678, EAN 5012345678900, qty 12, price 7400.00 GBP",
    "Meeting 2026-12-03T09:15:00Z, room 4.12, dial-in code 123456789",
    "Reference 2026-000123-45, case 987654321, ticket #4459012",
]


@pytest.mark.parametrize("line", BUSINESS_LINES)
def test_order_numbers_dates_timestamps_prices_tracking_and_uuids_are_not_customer_data(line: str) -> None:
    counts = text_counts(line)
    assert not {"phone", "card", "iban", "national_id"} & set(counts), counts


def test_an_order_report_with_many_timestamps_passes_at_the_default_thresholds() -> None:
    lines = ["Order no\tPlaced\tAmount\tTracking"] + [
        f"{2079460000 + i * 37}\t2026-11-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}"
        f"\t£{100 + i * 3}.50\t1Z999AA1{i:010d}"
        for i in range(60)
    ]
    data = fx.mail("Today's orders:\n" + "\n".join(lines))
    counts = counts_of(data)
    assert not {"phone", "card", "iban", "national_id", "customer_table"} & set(counts), counts
    assert verdict(data, cfg()).action is Action.PASS


def phones_mail(n: int) -> bytes:
    return fx.mail(
        "Call list:\n" + "".join(f"Contact {i}: 07400 {300000 + i * 7:06d} (mobile)\n" for i in range(n))
    )


@pytest.mark.parametrize(
    ("n", "dlp", "action"),
    [
        (0, {}, Action.PASS),
        (1, {}, Action.AUDIT),  # exactly low
        (9, {}, Action.AUDIT),  # one below high
        (10, {}, Action.QUARANTINE),  # exactly high
        (4, {"low": 5, "high": 8}, Action.PASS),  # one below a raised low
        (5, {"low": 5, "high": 8}, Action.AUDIT),
        (8, {"low": 5, "high": 8}, Action.QUARANTINE),
        (3, {"low": 3, "high": 3, "low_action": "pass"}, Action.QUARANTINE),  # low == high: high wins
    ],
)
def test_thresholds_at_their_exact_edges(n: int, dlp: dict[str, Any], action: Action) -> None:
    data = phones_mail(n)
    assert counts_of(data, cfg(dlp)).get("phone", 0) == n
    assert verdict(data, cfg(dlp)).action is action


def test_one_outside_recipient_among_colleagues_and_partners_is_scanned() -> None:
    data = phones_mail(12)
    config = cfg()
    inside = ("a@corp.example", "b@sub.corp.example", "c@agency.example")
    assert verdict(data, config, *inside).action is Action.PASS
    assert verdict(data, config, *inside, "someone@gmail.com").action is Action.QUARANTINE
    assert verdict(data, config, "someone@gmail.com", *inside).action is Action.QUARANTINE
    assert verdict(data, config, "C@CORP.EXAMPLE", "X@AGENCY.EXAMPLE").action is Action.PASS


def test_per_rule_overrides_of_every_kind() -> None:
    rules = [
        {"name": "hr", "senders": ["*@hr.corp.example"], "dlp_high_action": "reject", "dlp_high": 5},
        {"name": "finance", "senders": ["*@fin.corp.example"], "dlp_detectors": ["iban"]},
        {"name": "research", "senders": ["*@lab.corp.example"], "dlp_enabled": False},
        {"name": "sales", "senders": ["*@sales.corp.example"], "dlp_low_action": "quarantine"},
    ]
    config = cfg(rules=rules)
    data = phones_mail(6)

    def action(sender: str) -> Action:
        envelope = Envelope(mail_from=sender, rcpt_tos=("buyer@other.example",))
        _, settings = select_rule(config.policy, envelope)
        findings = scan_now(data, settings) if in_scope(envelope, settings) else None
        return evaluate(data, envelope, config.policy, findings).verdict.action

    assert action("x@corp.example") is Action.AUDIT
    assert action("x@hr.corp.example") is Action.REJECT
    assert action("x@fin.corp.example") is Action.PASS  # phones are not its detector
    assert action("x@lab.corp.example") is Action.PASS
    assert action("x@sales.corp.example") is Action.QUARANTINE


def owner_only_pdf() -> bytes:
    """Encrypted with an owner password only: every reader opens it (the text is readable)."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=8)
    pdf.add_page()
    for r in (fx.HEADER, *ROWS):
        pdf.cell(0, 4, "    ".join(r), new_x="LMARGIN", new_y="NEXT")
    pdf.set_encryption(owner_password="owner-only")
    return bytes(pdf.output())


ENCRYPTED = {
    "zip": lambda: attach(fx.encrypted_zip(), "locked.zip", "application/zip"),
    "zip-in-zip": lambda: attach(
        fx.zip_bytes({"inner.zip": fx.encrypted_zip()}), "outer.zip", "application/zip"
    ),
    "pdf": lambda: attach(fx.encrypted_pdf(), "locked.pdf", "application/pdf"),
    "pdf-octet-stream": lambda: attach(fx.encrypted_pdf(), "locked.PDF", "application/octet-stream"),
}


@pytest.mark.parametrize("setting", ["pass", "audit", "quarantine"])
@pytest.mark.parametrize("kind", list(ENCRYPTED))
def test_encrypted_archives_and_documents_under_each_unreadable_setting(kind: str, setting: str) -> None:
    data = ENCRYPTED[kind]()
    config = cfg({"unreadable": setting})
    findings = scan_now(data, config.policy.defaults)
    assert findings.unreadable, findings
    assert verdict(data, config).action is Action(setting)
    # the same message to a partner is not scanned at all
    assert verdict(data, config, "rep@agency.example").action is Action.PASS


def test_a_pdf_locked_only_against_editing_is_read() -> None:
    data = attach(owner_only_pdf(), "report.pdf", "application/pdf")
    counts = counts_of(data)
    assert counts.get("phone") == N


def every_value() -> list[str]:
    out = []
    for r in ROWS:
        out += [r[1], r[2], r[3], r[3].replace(" ", ""), "+44" + r[3].replace(" ", "")[1:], r[4]]
    return out


@pytest.mark.parametrize(
    "name", ["csv-utf16-bom", "xlsx-two-sheets", "zip-in-zip", "message-rfc822-with-csv"]
)
def test_check_json_never_prints_a_value(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(FORMATS[name]())
    config = tmp_path / "bccguard.toml"
    config.write_text('[policy]\ninternal_domains = ["corp.example"]\n[dlp]\nenabled = true\n')
    assert main(["check", str(eml), "--config", str(config), "--json"]) == 1
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["dlp"]["counts"]["phone"] == N
    for value in every_value():
        assert value not in out, value
    for name_part in ("Liste.csv", "Renewals.XLSX", "customers.CSV", "export.csv", "inner.zip"):
        assert name_part not in out


def test_limits_member_count_and_depth_are_defined_verdicts() -> None:
    many = fx.zip_bytes({f"m{i}.txt": b"x" for i in range(600)})
    findings = scan_now(attach(many, "many.zip", "application/zip"), cfg().policy.defaults)
    assert "members" in findings.over_limit
    deep = attach(fx.nested_zip(6), "deep.zip", "application/zip")
    findings = scan_now(deep, cfg().policy.defaults)
    assert "depth" in findings.over_limit
    config = cfg({"over_limit": "quarantine"})
    assert verdict(deep, config).action is Action.QUARANTINE
    assert verdict(deep, cfg({"over_limit": "pass"})).action is Action.PASS


def test_a_zip_member_count_is_not_fooled_by_directories_or_a_bomb_inside_a_docx() -> None:
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", b"<w:document>" + b" " * (80 * 1024 * 1024) + b"</w:document>")
    findings = scan_now(attach(bomb.getvalue(), "big.docx", fx.DOCX), cfg().policy.defaults)
    assert findings.over_limit and not findings.counts


def test_nhs_numbers_count_written_the_nhs_way_or_where_the_nhs_is_named() -> None:
    assert text_counts("Patient 943 476 5919 seen today") == {"national_id": 1}
    assert text_counts("NHS no: 9434765919") == {"national_id": 1}
    assert "national_id" not in text_counts("Order 9434765919 dispatched")


def test_one_instance_however_it_is_written() -> None:
    text = (
        "Alice.Smith@Gmail.com, alice.smith@gmail.com, ALICE.SMITH@GMAIL.COM\n"
        "07400 123456 / +44 7400 123456 / 0044 (0)7400-123-456\n"
        "GB82 WEST 1234 5698 7654 32 and GB82WEST12345698765432\n"
        "4111 1111 1111 1111 or 4111-1111-1111-1111\n"
    )
    assert text_counts(text) == {"email": 2, "phone": 1, "iban": 1, "card": 1}  # a consumer address weighs 2


# ------------------------------------------------------------ through a real relay


@pytest.mark.parametrize("name", ["csv-utf16-bom", "message-rfc822-with-csv", "xlsx-as-octet-stream"])
async def test_one_outsider_among_colleagues_holds_the_message_and_nothing_leaks(
    name: str, start_relay: Any, sink: Any
) -> None:
    import structlog
    from prometheus_client import generate_latest

    from conftest import data_reply

    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", {"dlp": {"enabled": True}})
    rcpts = ["ann@corp.example", "rep@agency.example", "someone@gmail.com", "bob@corp.example"]
    data = FORMATS[name]()
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(data_reply, app.port, "sales@corp.example", rcpts, data)
    assert code == 250 and text.startswith(b"2.6.0 Held for review"), text
    assert [m for m in sink.messages if m.reply.startswith("2")] == []  # nobody gets it, colleagues neither
    dumped = text.decode() + json.dumps(logs, default=str) + generate_latest(app.metrics.registry).decode()
    for value in every_value():
        assert value not in dumped, value
    assert "someone@gmail.com" not in dumped


async def test_reject_reply_names_counts_never_values(start_relay: Any, sink: Any) -> None:
    import smtplib

    from conftest import send

    extra = {"dlp": {"enabled": True, "high_action": "reject"}}
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", extra)
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(app.port, "sales@corp.example", ["buyer@other.example"], FORMATS["csv-utf16-bom"]())
    reply = err.value.smtp_error.decode()
    assert err.value.smtp_code == 550 and f"{N} phone numbers" in reply
    for value in every_value():
        assert value not in reply


def numeric_phone_xlsx(with_country_code: bool) -> bytes:
    """Excel keeps a typed 07400 123456 as the number 7400123456 (and 447400123456 without the +);
    an export starts with a title line and a blank row above its header."""
    from openpyxl import Workbook

    wb = Workbook()
    wb.active.append(["Customer export 2026-12-02"])
    wb.active.append([])
    wb.active.append(list(fx.HEADER))
    for r in ROWS:
        digits = r[3].replace(" ", "")
        phone = int("44" + digits[1:] if with_country_code else digits)
        wb.active.append([r[0], r[1], r[2], phone, r[4], r[5]])
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


@pytest.mark.parametrize("with_country_code", [False, True])
def test_phone_numbers_a_spreadsheet_stored_as_numbers_still_count(with_country_code: bool) -> None:
    data = attach(numeric_phone_xlsx(with_country_code), "list.xlsx", fx.XLSX)
    assert counts_of(data) == COUNTS
    csv_data = "Name;Mobile\n" + "".join(f"{r[1]};{r[3].replace(' ', '')[1:]}\n" for r in ROWS)
    assert counts_of(attach(csv_data.encode(), "excel.csv", "text/csv"))["phone"] == N


def test_bare_numbers_under_a_header_that_is_not_a_phone_do_not_count() -> None:
    lines = "".join(f"{7400100000 + i * 7};{i}.50;2026-11-02\n" for i in range(40))
    csv_data = "Order no;Amount;Placed\n" + lines
    assert "phone" not in counts_of(attach(csv_data.encode(), "orders.csv", "text/csv"))


@pytest.mark.parametrize(
    ("header_action", "dlp", "expect"),
    [
        ("rewrite", {}, Action.QUARANTINE),  # DLP high (quarantine) beats a rewrite
        ("split", {}, Action.QUARANTINE),
        ("quarantine", {"high_action": "reject"}, Action.REJECT),  # DLP reject beats a header hold
        ("reject", {"high_action": "audit"}, Action.REJECT),  # the header's reject stands
        ("rewrite", {"high_action": "pass"}, Action.REWRITE),
        ("audit", {"high_action": "audit"}, Action.AUDIT),
    ],
)
def test_the_stricter_action_wins_with_a_to_cc_exposure(
    header_action: str, dlp: dict[str, Any], expect: Action
) -> None:
    customers = [f"c{i}@gmail.com" for i in range(12)]
    data = fx.mail(
        "Numbers:\n" + "".join(f"Contact {i}: 07400 {400000 + i * 7:06d}\n" for i in range(12)),
        to=", ".join(customers),
    )
    config = cfg(dlp, action=header_action)
    envelope = Envelope(mail_from="sales@corp.example", rcpt_tos=tuple(customers))
    v = evaluate(data, envelope, config.policy, scan_now(data, config.policy.defaults)).verdict
    assert v.action is expect, v.reason
    if expect is not Action.AUDIT:
        assert "12 phone numbers" in v.reason and "To/Cc" in v.reason, v.reason


def aes_owner_only_pdf() -> bytes:
    """AES-256, an owner password only: how bank and CRM exports are 'protected' against editing."""
    from fpdf import FPDF
    from fpdf.enums import EncryptionMethod

    pdf = FPDF()
    pdf.set_font("Helvetica", size=8)
    pdf.add_page()
    for r in (fx.HEADER, *ROWS):
        pdf.cell(0, 4, "    ".join(r), new_x="LMARGIN", new_y="NEXT")
    pdf.set_encryption(owner_password="owner-only", encryption_method=EncryptionMethod.AES_256)
    return bytes(pdf.output())


def test_an_aes_pdf_locked_only_against_editing_is_read_by_the_relay_as_installed() -> None:
    from importlib.metadata import requires

    # pypdf opens AES-encrypted PDFs only with `cryptography`; a relay from `pip install .` must have it,
    # or every such export is merely "unreadable" (audit) instead of counted.
    assert any(
        r.replace(" ", "").startswith("cryptography") for r in requires("bccguard") or [] if "extra" not in r
    )
    counts = counts_of(attach(aes_owner_only_pdf(), "statement.pdf", "application/pdf"))
    assert counts.get("phone") == N


def test_per_rule_regions_unreadable_and_over_limit() -> None:
    rules = [
        {"name": "de", "senders": ["*@de.corp.example"], "dlp_regions": ["DE"]},
        {"name": "strict", "senders": ["*@legal.corp.example"], "dlp_unreadable": "quarantine",
         "dlp_over_limit": "quarantine"},
    ]  # fmt: skip
    config = cfg(rules=rules)
    german = fx.mail("Kunden:\n" + "".join(f"Kunde {i}: 0151 2345{i:04d}\n" for i in range(12)))
    locked = ENCRYPTED["zip"]()
    deep = attach(fx.nested_zip(6), "deep.zip", "application/zip")

    def action(sender: str, data: bytes) -> Action:
        envelope = Envelope(mail_from=sender, rcpt_tos=("buyer@other.example",))
        _, settings = select_rule(config.policy, envelope)
        return evaluate(data, envelope, config.policy, scan_now(data, settings)).verdict.action

    assert action("x@corp.example", german) is Action.PASS  # GB numbers only by default
    assert action("x@de.corp.example", german) is Action.QUARANTINE
    assert action("x@corp.example", locked) is Action.AUDIT
    assert action("x@legal.corp.example", locked) is Action.QUARANTINE
    assert action("x@corp.example", deep) is Action.AUDIT
    assert action("x@legal.corp.example", deep) is Action.QUARANTINE
