"""Customer-table shape: rows of people, whatever the cells hold.

A list of 500 customers is the shape of the O2 and T-Mobile leaks even
when no single cell is a validated number. A table counts when its header
row names at least two kinds of personal data (name, email, phone, address,
customer or contract number, birth date), or when two of its columns hold
email- or phone-shaped values, and it has at least MIN_ROWS data rows. The
count is its data rows: one instance per customer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MIN_ROWS = 3
_KINDS: dict[str, tuple[str, ...]] = {
    "name": ("name", "surname", "first", "last", "forename", "vorname", "nachname", "nom", "prenom",
             "prénom", "full name", "contact"),
    "email": ("email", "e-mail", "mail"),
    "phone": ("phone", "tel", "telephone", "mobile", "msisdn", "cell", "fax", "handy"),
    "address": ("address", "street", "postcode", "post code", "zip", "city", "town", "adresse",
                "strasse", "straße", "county"),
    "id": ("customer", "client", "contract", "account", "member", "policy", "subscriber", "kunde",
           "renewal", "iban"),
    "birth": ("dob", "birth", "born", "geburt"),
}  # fmt: skip
_EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
_PHONE_SHAPE = re.compile(r"\+?[\d ().\-]{7,20}")
_DELIMS = ("\t", ";", "|", ",")


_KIND_OF = {k: kind for kind, keys in _KINDS.items() for k in keys}
_KEYWORD = re.compile(
    r"(?<![a-zà-ÿß])(" + "|".join(re.escape(k) for k in sorted(_KIND_OF, key=len, reverse=True)) + ")"
)


def header_kinds(cells: Sequence[str]) -> set[str]:
    """Which kinds of personal data the header cells name (short cells only)."""
    kinds: set[str] = set()
    for cell in cells:
        c = cell.strip().lower()
        if not c or len(c) > 40 or "@" in c or sum(ch.isdigit() for ch in c) > 2:
            continue  # a value (an address, a number), not a column name
        for m in _KEYWORD.finditer(c.replace("_", " ").replace(".", " ")):
            kinds.add(_KIND_OF[m.group(1)])
    return kinds


def _shaped_columns(rows: Sequence[Sequence[str]]) -> int:
    """Columns where most values look like an email address or a phone number."""
    sample = rows[:200]
    width = max((len(r) for r in sample), default=0)
    shaped = 0
    for col in range(width):
        vals = [r[col].strip() for r in sample if col < len(r) and r[col].strip()]
        if len(vals) < MIN_ROWS:
            continue
        hits = sum(
            1
            for v in vals
            if _EMAIL_SHAPE.fullmatch(v) or (_PHONE_SHAPE.fullmatch(v) and sum(c.isdigit() for c in v) >= 7)
        )
        if hits * 10 >= len(vals) * 6:
            shaped += 1
    return shaped


HEADER_SEARCH = 10


def header_at(rows: Sequence[Sequence[str]]) -> int:
    """Where the header row is: exports often start with a title line and a blank row
    ("Customer export 2 Dec" above "Name, Email, Mobile"). The first of the first rows
    that names two kinds of personal data; else the first row."""
    for i, row in enumerate(rows[:HEADER_SEARCH]):
        if len(header_kinds(row)) >= 2:
            return i
    return 0


def customer_rows(rows: Sequence[Sequence[str]]) -> set[int]:
    """Hashes of the data rows of a customer table, or nothing when `rows` is not one."""
    rows = [r for r in rows if any(c.strip() for c in r)]
    rows = rows[header_at(rows) :]
    if len(rows) < MIN_ROWS + 1:
        return set()
    kinds = header_kinds(rows[0])
    if len(kinds) >= 2 or (kinds and _shaped_columns(rows[1:]) >= 1):
        body = rows[1:]
    elif not kinds and _shaped_columns(rows) >= 2:  # no header row: every row is a customer
        body = rows
    else:
        return set()
    return {hash(tuple(c.strip() for c in r)) for r in body}


def text_rows(text: str) -> set[int]:
    """Rows of customer tables pasted in text (hashes): delimited, or aligned with spaces.

    Delimited: runs of lines split by the same delimiter into the same number
    of cells. Aligned (text from a PDF, a fixed-width export): a header line
    naming two kinds of personal data, then lines that each hold an email or
    phone shape; each such line is one row. Linear: each line is looked at as
    the start of at most one run of each kind.
    """
    lines = text.splitlines()
    found: set[int] = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        delim = next((d for d in _DELIMS if d in line), None)
        if delim is not None:
            n = line.count(delim)
            j = i + 1
            while j < len(lines) and lines[j].count(delim) == n and lines[j].strip():
                j += 1
            if j - i > MIN_ROWS:
                found |= customer_rows([s.split(delim) for s in lines[i:j]])
                i = j
                continue
        if _KEYWORD.search(line.lower()) and len(header_kinds(_CELLS.split(line.strip()))) >= 2:
            j = i + 1
            while j < len(lines) and (_EMAIL_SHAPE.search(lines[j]) or _DIGITS.search(lines[j])):
                j += 1
            if j - i > MIN_ROWS:
                found |= {hash(s.strip()) for s in lines[i + 1 : j]}
                i = j
                continue
        i += 1
    return found


_CELLS = re.compile(r"\s{2,}|\s")
_DIGITS = re.compile(r"\d{3}[ \d]{4,}")
