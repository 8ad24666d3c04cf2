"""One reader per document format: bytes -> rows and text, under the budget.

- CSV/TSV: the stdlib `csv` module, delimiter sniffed among , ; tab |.
- XLSX, XLSM, XLS, XLSB, ODS: python-calamine (Rust, MIT), streaming rows;
  a ZIP-based workbook is first inflated once under the budget, because
  calamine trusts the archive it is given.
- DOCX: the ZIP and the stdlib XML parser (word/document.xml only):
  paragraphs as lines, table rows as tab-separated lines.
- PDF: pypdf (BSD-3-Clause), the text layer page by page; an encrypted PDF
  that does not open with the empty password is unreadable.

Each raises `Unreadable` for an encrypted or broken document and lets
`LimitReached` through.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from bccguard.extract.archive import Unreadable, inflate_all, open_zip, read_member
from bccguard.extract.limits import Budget, LimitReached

Rows = list[tuple[str, ...]]
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
DOCX_XML_CAP = 32 * 1024 * 1024


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)  # fmt: skip


def decode_text(data: bytes, charset: str | None = None) -> str:
    """Text by its byte-order mark first (Excel saves "Unicode text" as UTF-16 with one, whatever
    the part's charset says), then the declared charset, UTF-8, and Latin-1 as the last word.
    UTF-16 without a mark shows itself by a NUL in every other byte of ASCII text."""
    for bom, marked in _BOMS:
        if data.startswith(bom):
            return data.decode(marked, "replace")
    head = data[:4096]
    if len(head) >= 4 and head.count(0) * 3 >= len(head):
        zeros_odd = head[1::2].count(0)
        zeros_even = head[0::2].count(0)
        return data.decode("utf-16-le" if zeros_odd > zeros_even else "utf-16-be", "replace")
    for enc in (charset, "utf-8"):
        if not enc:
            continue
        try:
            return data.decode(enc)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


def csv_rows(text: str, budget: Budget) -> Rows:
    sample = text[:8192]
    counts = {d: sample.count(d) for d in (",", ";", "\t", "|")}
    delim = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
    rows: Rows = []
    try:
        for i, row in enumerate(csv.reader(io.StringIO(text), delimiter=delim)):
            rows.append(tuple(row))
            if i % 1000 == 0:
                budget.tick()
    except csv.Error as exc:
        raise Unreadable(str(exc)) from None
    return rows


def _cell(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    return "" if v is None else str(v)


def sheet_rows(data: bytes, budget: Budget) -> Iterator[Rows]:
    """One list of rows per sheet."""
    from python_calamine import CalamineError, CalamineWorkbook

    if data[:4] == b"PK\x03\x04":
        inflate_all(data, budget)
    elif data[:8] == OLE_MAGIC and b"E\x00n\x00c\x00r\x00y\x00p\x00t\x00e\x00d\x00P" in data:
        raise Unreadable("password-protected workbook")
    try:
        wb = CalamineWorkbook.from_filelike(io.BytesIO(data))
        for name in wb.sheet_names:
            rows: Rows = []
            for i, row in enumerate(wb.get_sheet_by_name(name).iter_rows()):
                rows.append(tuple(_cell(c) for c in row))
                if i % 1000 == 0:
                    budget.tick()
                    budget.scan(0)
            yield rows
    except LimitReached:
        raise
    except (CalamineError, ValueError, OSError, UnicodeError) as exc:
        raise Unreadable(type(exc).__name__) from None
    except Exception as exc:  # a panic in the Rust reader surfaces as a generic exception
        raise Unreadable(type(exc).__name__) from None


def docx_text(data: bytes, budget: Budget) -> str:
    zf = open_zip(data)
    names = set(zf.namelist())
    if "word/document.xml" not in names:
        raise Unreadable("no word/document.xml")
    xml = read_member(zf, zf.getinfo("word/document.xml"), budget, cap=DOCX_XML_CAP)
    lines: list[str] = []
    para: list[str] = []
    row: list[str] = []
    cell: list[str] = []
    depth_tc = 0
    try:
        # Safe enough without defusedxml: ElementTree never fetches external entities, the
        # bundled expat (>= 2.4.1) stops entity-expansion bombs, and the part is size-capped.
        for event, el in ET.iterparse(io.BytesIO(xml), events=("start", "end")):  # noqa: S314
            tag = el.tag
            if event == "start":
                if tag == f"{_W}tc":
                    depth_tc += 1
                    cell = []
                continue
            if tag == f"{_W}t" and el.text:
                (cell if depth_tc else para).append(el.text)
            elif tag == f"{_W}tab":
                (cell if depth_tc else para).append("\t")
            elif tag == f"{_W}p":
                if depth_tc:
                    cell.append(" ")
                else:
                    lines.append("".join(para))
                    para = []
            elif tag == f"{_W}tc":
                depth_tc -= 1
                row.append(" ".join("".join(cell).split()))
            elif tag == f"{_W}tr":
                lines.append("\t".join(row))
                row = []
            el.clear()
    except ET.ParseError as exc:
        raise Unreadable(str(exc)) from None
    return "\n".join(lines)


def pdf_text(data: bytes, budget: Budget) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about broken files are ours to count
    out: list[str] = []
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    raise Unreadable("encrypted PDF")
            except (PyPdfError, NotImplementedError) as exc:
                raise Unreadable("encrypted PDF") from exc
        for page in reader.pages:
            budget.page()
            out.append(page.extract_text() or "")
    except LimitReached as exc:
        if exc.kind != "pages":
            raise
        budget.note("pages")  # the pages read before the limit still count
        return "\n".join(out)
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError,
            AssertionError, ZeroDivisionError) as exc:  # fmt: skip
        if out:
            return "\n".join(out)
        raise Unreadable(type(exc).__name__) from None
    return "\n".join(out)
