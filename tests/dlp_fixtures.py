"""Customer-data fixtures, built at run time: nothing real, nothing checked in.

Each builder returns message bytes and the distinct counts `bccguard check`
must report. The phone numbers are valid UK mobile numbers by Google's
numbering plans (07400 range), the IBANs valid by their mod-97 check, the
email addresses split between a personal mailbox provider (gmail.com: counts
twice) and a company domain (counts once).
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from email.message import EmailMessage

from stdnum import iban as iban_mod

N_CUSTOMERS = 500
HEADER = ("Customer no", "Name", "Email", "Mobile", "Address", "Renewal date")
FIRST = ("Alice", "Bob", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Isla", "Jack")
LAST = ("Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Evans", "Thomas", "Roberts", "Khan")


@dataclass(frozen=True)
class Fixture:
    name: str
    data: bytes
    counts: dict[str, int]  # what check must report (detectors with a non-zero count)


def customers(n: int = N_CUSTOMERS) -> list[tuple[str, ...]]:
    rows = []
    for i in range(n):
        first, last = FIRST[i % 10], LAST[(i // 10) % 10]
        domain = "gmail.com" if i % 2 == 0 else "customer-mail.example"
        rows.append((
            f"C{100000 + i}",
            f"{first} {last}",
            f"{first.lower()}.{last.lower()}{i}@{domain}",
            f"07400 {100000 + i * 7:06d}",
            f"{i + 1} High Street, Leeds LS1 {i % 9}AB",
            f"2027-{1 + i % 12:02d}-{1 + i % 28:02d}",
        ))  # fmt: skip
    return rows


def customer_counts(n: int = N_CUSTOMERS) -> dict[str, int]:
    consumer = (n + 1) // 2
    return {"email": 2 * consumer + (n - consumer), "phone": n, "customer_table": n}


def csv_bytes(rows: list[tuple[str, ...]]) -> bytes:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(HEADER)
    w.writerows(rows)
    return out.getvalue().encode()


def xlsx_bytes(rows: list[tuple[str, ...]]) -> bytes:
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append(HEADER)
    for r in rows:
        ws.append(list(r))
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def pdf_bytes(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> bytes:
    """A PDF export of the table: one text line per row, columns apart (as report tools print them)."""
    from fpdf import FPDF

    pdf = FPDF(orientation="L")
    pdf.set_font("Helvetica", size=7)
    pdf.add_page()
    for r in (header, *rows):
        pdf.cell(0, 4, "    ".join(r), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def docx_bytes(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> bytes:
    """A minimal Word document (as Word writes it: one part per concern) with the table in it."""
    w = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'

    def cells(r: tuple[str, ...]) -> str:
        return "".join(f"<w:tc><w:p><w:r><w:t>{c}</w:t></w:r></w:p></w:tc>" for c in r)

    table = "".join(f"<w:tr>{cells(r)}</w:tr>" for r in (header, *rows))
    body = f"<w:p><w:r><w:t>Customer renewals, Q1</w:t></w:r></w:p><w:tbl>{table}</w:tbl>"
    return zip_bytes({
        "[Content_Types].xml": b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/'
        b'package/2006/content-types"><Override PartName="/word/document.xml" ContentType="application/'
        b'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>',
        "word/document.xml": f'<?xml version="1.0"?><w:document {w}><w:body>{body}</w:body></w:document>'
        .encode(),
    })  # fmt: skip


def ods_bytes(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> bytes:
    """A minimal OpenDocument spreadsheet (mimetype first and stored, as the format requires)."""
    ns = (
        'xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
        'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" '
        'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"'
    )

    def row(r: tuple[str, ...]) -> str:
        cells = "".join(
            f'<table:table-cell office:value-type="string"><text:p>{c}</text:p></table:table-cell>' for c in r
        )
        return f"<table:table-row>{cells}</table:table-row>"

    body = "".join(row(r) for r in (header, *rows))
    content = (
        f'<?xml version="1.0" encoding="UTF-8"?><office:document-content {ns} office:version="1.2">'
        f'<office:body><office:spreadsheet><table:table table:name="Customers">{body}</table:table>'
        "</office:spreadsheet></office:body></office:document-content>"
    )
    manifest = (
        '<?xml version="1.0" encoding="UTF-8"?><manifest:manifest '
        'xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
        '<manifest:file-entry manifest:full-path="/" '
        'manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/>'
        '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
        "</manifest:manifest>"
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet", zipfile.ZIP_STORED)
        z.writestr("content.xml", content, zipfile.ZIP_DEFLATED)
        z.writestr("META-INF/manifest.xml", manifest, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def forwarded(inner: bytes) -> bytes:
    """A message with `inner` attached as message/rfc822 (a forward as attachment)."""
    from email import message_from_bytes
    from email import policy as email_policy

    m = EmailMessage()
    m["From"] = "Sales <sales@corp.example>"
    m["To"] = "buyer@other.example"
    m["Subject"] = "Fwd: the list"
    m.set_content("Forwarding as attached.")
    m.add_attachment(message_from_bytes(inner, policy=email_policy.default))
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def zip_bytes(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def mail(
    body: str,
    *,
    to: str = "buyer@other.example",
    attachments: tuple[tuple[str, str, bytes], ...] = (),
    html: str | None = None,
    subject: str = "As discussed",
) -> bytes:
    m = EmailMessage()
    m["From"] = "Sales <sales@corp.example>"
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = "<dlp-1@corp.example>"
    m.set_content(body)
    if html is not None:
        m.add_alternative(html, subtype="html")
    for filename, ctype, data in attachments:
        maintype, subtype = ctype.split("/", 1)
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def gb_iban(i: int) -> str:
    bban = f"NWBK{601613 + i:06d}{31926819 + i * 11:08d}"
    return f"GB{iban_mod.calc_check_digits('GB00' + bban)}{bban}"


XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def attached(body: str, filename: str, ctype: str, data: bytes) -> bytes:
    return mail(body, attachments=((filename, ctype, data),))


def held_set() -> list[Fixture]:
    """Each of these is customer data leaving: held when sent outside."""
    rows = customers()
    counts = customer_counts()
    csv_data = csv_bytes(rows)
    phones = "\n".join(
        f"{FIRST[i % 10]} {LAST[i // 10 % 10]}\t07911 {200000 + i * 13:06d}" for i in range(50)
    )
    ibans = [gb_iban(i) for i in range(20)]
    iban_text = "Refunds to process:\n" + "\n".join(
        f"{i + 1}. {iban_mod.format(x)}  GBP {100 + i}.00" for i, x in enumerate(ibans)
    )
    zipped = zip_bytes({"customers.csv": csv_data})
    return [
        Fixture("csv", attached("List attached.", "customers.csv", "text/csv", csv_data), counts),
        Fixture("xlsx", attached("Renewals attached.", "renewals.xlsx", XLSX, xlsx_bytes(rows)), counts),
        Fixture(
            "pdf", attached("Export attached.", "export.pdf", "application/pdf", pdf_bytes(rows)), counts
        ),
        Fixture("docx", attached("Word version.", "renewals.docx", DOCX, docx_bytes(rows)), counts),
        Fixture("zip", attached("Zipped.", "data.zip", "application/zip", zipped), counts),
        Fixture(
            "phones",
            mail(f"Numbers for the campaign:\nName\tMobile\n{phones}\n"),
            {"phone": 50, "customer_table": 50},
        ),
        Fixture("ibans", mail(iban_text), {"iban": 20}),
    ]


def business_set() -> list[Fixture]:
    """Ordinary business mail: passes at the default thresholds (delivered, at most audited)."""
    invoice = mail(
        "Dear customer,\n\nplease find invoice 2026-1187 for GBP 1,250.00 attached, due 31 December.\n"
        f"Pay to: Corp Ltd, IBAN {iban_mod.format(gb_iban(99))}, reference INV-2026-1187.\n\n"
        "Kind regards,\nAccounts\n",
        subject="Invoice 2026-1187",
    )
    signature = mail(
        "Hi Sam,\n\nthanks for the call; the quote follows on Monday.\n\nBest,\n"
        "Jane Doe | Account Manager | Corp Ltd\nTel +44 20 7123 4567 | Mob 07911 123456\n"
        "1 Market Street, London EC1A 1BB\n",
    )
    note = mail(
        "Meeting notes, project Atlas (12 Nov)\n\nAttendees and numbers for the on-call rota:\n"
        + "".join(f"- {FIRST[i]} {LAST[i]}: 07911 2{i}0{i}00\n" for i in range(5))
        + "\nActions: Dev to send the plan by Friday; next meeting 19 Nov, room 4.12.\n",
    )
    newsletter = mail(
        "Corp Ltd news, December 2026\n\nOur new Leeds office opens on 5 January. Version 4.2 of the app "
        "ships next week with 3 new features.\n\n--\nCorp Ltd, 1 Market Street, London EC1A 1BB, "
        "registered in England no. 01234567.\nUnsubscribe: https://corp.example/unsubscribe\n",
        html="<html><body><h1>Corp Ltd news</h1><p>Our new Leeds office opens on 5 January.</p>"
        "<footer>Corp Ltd, 1 Market Street, London EC1A 1BB</footer></body></html>",
    )
    return [
        Fixture("invoice", invoice, {"iban": 1}),
        Fixture("signature", signature, {"phone": 2}),
        Fixture("meeting-note", note, {"phone": 5, "customer_table": 0}),
        Fixture("newsletter", newsletter, {}),
    ]


# ---------------------------------------------------------------- hostile input


def zip_bomb(size: int = 128 * 1024 * 1024) -> bytes:
    """One member of `size` zero bytes: ~1,000x compression, far past the 64 MB inflate budget."""
    out = io.BytesIO()
    chunk = bytes(1024 * 1024)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z, z.open("customers.csv", "w") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
    return out.getvalue()


def nested_zip(levels: int = 20) -> bytes:
    data = zip_bytes({"customers.csv": csv_bytes(customers(20))})
    for i in range(levels):
        data = zip_bytes({f"level{i}.zip": data})
    return data


def encrypted_zip() -> bytes:
    """A ZIP whose member says it is encrypted (flag bit 0), as a password-protected archive does."""
    data = bytearray(zip_bytes({"customers.csv": csv_bytes(customers(20))}))
    lh = data.find(b"PK\x03\x04")
    cd = data.find(b"PK\x01\x02")
    data[lh + 6] |= 1
    data[cd + 8] |= 1
    return bytes(data)


def malformed_xlsx() -> bytes:
    good = xlsx_bytes(customers(50))
    return good[:200] + b"\x00garbage" * 50 + good[len(good) // 2 :]


def broken_pdf() -> bytes:
    return b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\nendobj\n" + b"\xff\x00stream garbage" * 200


def many_pages_pdf(pages: int = 1000) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=9)
    for i in range(pages):
        pdf.add_page()
        pdf.cell(0, 5, f"Page {i + 1} of the annual report: revenue grew in every region.")
    return bytes(pdf.output())


def encrypted_pdf() -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=9)
    pdf.add_page()
    pdf.cell(0, 5, "Customer list: see next page")
    pdf.set_encryption(owner_password="owner-secret", user_password="user-secret")
    return bytes(pdf.output())


def hostile_set() -> list[tuple[str, bytes, str]]:
    """(name, message, what the scan must record: an over_limit kind or "unreadable")."""
    zip_ct, pdf_ct = "application/zip", "application/pdf"
    return [
        ("zip-bomb", attached("x", "data.zip", zip_ct, zip_bomb()), "decompressed"),
        ("nested-zip", attached("x", "deep.zip", zip_ct, nested_zip()), "depth"),
        ("encrypted-zip", attached("x", "locked.zip", zip_ct, encrypted_zip()), "unreadable"),
        ("malformed-xlsx", attached("x", "list.xlsx", XLSX, malformed_xlsx()), "unreadable"),
        ("broken-pdf", attached("x", "list.pdf", pdf_ct, broken_pdf()), "unreadable"),
        ("encrypted-pdf", attached("x", "list.pdf", pdf_ct, encrypted_pdf()), "unreadable"),
        ("1000-page-pdf", attached("x", "report.pdf", pdf_ct, many_pages_pdf()), "pages"),
    ]
