"""Pieces of text -> Findings: distinct instances per detector, never a value.

Pure: the pieces come from extraction at the edge (bccguard/extract), the
settings from the rule in force. Order matters: IBANs, cards and email
addresses are found first and blanked out, so their digits are not counted
again as phone numbers or national IDs.

Email addresses are classified like header addresses: colleagues' and
partners' addresses (signatures, meeting notes) do not count, an external
address counts once, an address at a personal mailbox provider twice (it
is most likely a private customer's).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from bccguard.config import PolicySettings
from bccguard.policy.classify import classify_domain
from bccguard.policy.dlp import numbers, tables
from bccguard.policy.dlp.model import Extraction, Findings, Piece, Place
from bccguard.policy.domains import normalize_domain
from bccguard.policy.model import AddressClass

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}"
)
# Every number detector needs at least this many digits (a UK NINO has 6). Counting
# ASCII digits with bytes.translate costs ~1 µs on 2 KB where a regex pass costs
# ~20 µs: a plain letter skips the number detectors without one.
MIN_DIGITS = 6
_DIGIT_BYTES = b"0123456789"


def _digits(text: str) -> int:
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw) - len(raw.translate(None, _DIGIT_BYTES))


CHUNK = 64 * 1024  # characters: how often a long text asks `should_stop`


def detect(
    extraction: Extraction, settings: PolicySettings, should_stop: Callable[[], bool] | None = None
) -> Findings:
    """Count distinct instances per detector.

    `should_stop` (the scanner's deadline) is asked between chunks of text: when
    it says stop, the counts so far are returned with "time" in `over_limit`, so
    a huge customer list past the time limit is still judged by what was found
    in it, never by nothing.
    """
    enabled = settings.dlp.detectors
    regions = settings.dlp.regions
    total: dict[str, set[object]] = {d: set() for d in enabled}
    places: list[Place] = []
    over_limit = extraction.over_limit
    if all("@" not in p.text and _digits(p.text) < MIN_DIGITS and not p.rows for p in extraction.pieces):
        # The everyday letter: no address, too few digits for any number, no table
        # (a customer table holds numbers or addresses). Nothing to find.
        return Findings(
            unreadable=extraction.unreadable,
            over_limit=over_limit,
            scanned_bytes=extraction.scanned_bytes,
            detectors=enabled,
        )
    stopped = False
    for piece in extraction.pieces:
        found: dict[str, set[object]] = {d: set() for d in enabled}
        if "customer_table" in found:
            found["customer_table"] = _tables(piece)
        for chunk in _chunks(piece.text):
            if should_stop is not None and should_stop():
                stopped = True
                break
            for d, vals in _detect_text(chunk, enabled, regions, settings).items():
                found[d] |= vals
        if "phone" in found and piece.rows:
            found["phone"] |= numbers.phones(_phone_column(piece.rows), regions)[0]
        counts = tuple((d, _weight(d, vals)) for d, vals in found.items() if vals)
        if counts:
            places.append(Place(where=piece.where, counts=counts))
        for d, vals in found.items():
            total[d] |= vals
        if stopped:
            over_limit = (*over_limit, "time") if "time" not in over_limit else over_limit
            break
    return Findings(
        counts=tuple((d, _weight(d, vals)) for d, vals in total.items() if vals),
        places=tuple(places),
        unreadable=extraction.unreadable,
        over_limit=over_limit,
        scanned_bytes=extraction.scanned_bytes,
        detectors=enabled,
    )


def _chunks(text: str) -> list[str]:
    """`text` cut at line ends into pieces of about CHUNK characters (numbers never span lines here)."""
    if len(text) <= CHUNK:
        return [text]
    out = []
    start = 0
    while start < len(text):
        end = text.find("\n", start + CHUNK)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _tables(piece: Piece) -> set[object]:
    if piece.rows:
        return set(tables.customer_rows(piece.rows))
    text = piece.text
    if text.count("\n") > tables.MIN_ROWS and ("@" in text or _digits(text) >= MIN_DIGITS):
        # A customer table has numbers (phones, dates, house numbers) or addresses in it.
        return set(tables.text_rows(text))
    return set()


def _phone_column(rows: tuple[tuple[str, ...], ...]) -> str:
    """The cells of a table's phone columns (by their header), written as dialled.

    A spreadsheet keeps 07400 123456 as the number 7400123456, and 44 7400
    123456 as 447400123456: what said "phone number" (the 0, the +) is gone,
    and bare digit runs alone never count (they are order numbers). Under a
    phone header they are phone numbers; the 0 or + goes back on.
    """
    h = tables.header_at(rows)
    cols = [i for i, cell in enumerate(rows[h]) if "phone" in tables.header_kinds([cell])]
    out: list[str] = []
    for row in rows[h + 1 :] if cols else ():
        for i in cols:
            v = row[i].strip() if i < len(row) else ""
            if v.isdigit() and not v.startswith("0"):
                out.append(("+" if len(v) > 10 else "0") + v)
    return "\n".join(out)


def _weight(detector: str, values: Iterable[object]) -> int:
    if detector != "email":
        return len(set(values))
    return sum(2 if str(v).startswith("c:") else 1 for v in values)


def _detect_text(
    text: str, enabled: tuple[str, ...], regions: tuple[str, ...], settings: PolicySettings
) -> dict[str, set[object]]:
    out: dict[str, set[object]] = {d: set() for d in enabled if d != "customer_table"}
    spans: list[tuple[int, int]] = []
    if "@" in text:
        for m in _EMAIL.finditer(text):
            spans.append(m.span())
            if "email" in out:
                # One customer written Alice@Gmail.com and alice@gmail.com is one instance: every
                # mailbox provider treats the local part without case, so the count does too.
                local, _, domain = m.group().lower().rpartition("@")
                cls = classify_domain(normalize_domain(domain), settings)
                if cls is AddressClass.CONSUMER:
                    out["email"].add(f"c:{local}@{domain}")
                elif cls is AddressClass.EXTERNAL:
                    out["email"].add(f"e:{local}@{domain}")
    if _digits(text) >= MIN_DIGITS:
        text = numbers.mask(text, numbers.dates(text))
        found, used = numbers.ibans(text)
        spans += used
        if "iban" in out:
            out["iban"] |= found
        found, used = numbers.cards(numbers.mask(text, spans))
        spans += used
        if "card" in out:
            out["card"] |= found
        text = numbers.mask(text, spans)
        found, used = numbers.phones(text, regions)
        if "phone" in out:
            out["phone"] |= found
        if "national_id" in out:
            out["national_id"] |= numbers.national_ids(numbers.mask(text, used), regions)[0]
    return out
