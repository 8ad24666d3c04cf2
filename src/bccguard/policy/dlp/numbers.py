"""Numbers that identify a person or an account, validated before they count.

A pattern alone would count every order number; each candidate here must
pass its own checksum or numbering plan: IBANs their mod-97 check
(python-stdnum), cards the Luhn check and an issuer prefix, phone numbers
Google's numbering plans (phonenumbers) for the configured regions, national
IDs and VAT numbers the python-stdnum module of each configured country.
Each function returns the distinct normalised values and the spans it used,
so that later detectors do not count the same digits again. The values stay
inside this package: callers keep only counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache

import phonenumbers
from stdnum import iban as _iban
from stdnum import luhn
from stdnum.gb import nhs as _nhs_number
from stdnum.util import get_cc_module

Span = tuple[int, int]

_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){10,30}(?![a-z0-9])")
_CARD = re.compile(r"(?<![\d.,])[2-6]\d(?:[ -]?\d){11,17}(?![\d])")
# Phone candidates: digits with the separators people type; no tab or newline,
# so a column of numbers stays one number per cell.
_PHONE = re.compile(r"(?<![\w+/.-])(?:\+|00)?\(?\d(?:[ ().\-\u00a0]{0,2}\d){6,40}(?![\w])")
_PHONE_SEP = re.compile(r"[ .\-\u00a0]+")
_ID = re.compile(r"(?<![\w])(?:[A-Z]{2}[ ]?)?[\dA-Z](?:[ ./-]?[\dA-Z]){6,17}(?![\w])")
_NINO = re.compile(
    r"(?<![\w])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![\w])"
)

# Per country: the python-stdnum modules for personal IDs and VAT numbers.
# Countries not listed get their VAT module and any `personalid` module.
_ID_MODULES: dict[str, tuple[str, ...]] = {
    "GB": ("vat", "nhs"),
    "DE": ("vat", "idnr"),
    "FR": ("tva", "nir"),
    "NL": ("btw", "bsn"),
    "ES": ("vat", "dni", "nie"),
    "IT": ("iva", "codicefiscale"),
    "IE": ("vat", "pps"),
    "BE": ("vat", "nn"),
    "PL": ("vat", "pesel"),
    "SE": ("vat", "personnummer"),
}


def mask(text: str, spans: Iterable[Span]) -> str:
    """`text` with the spans blanked out (same length, so later spans stay valid)."""
    chars = list(text)
    for a, b in spans:
        chars[a:b] = " " * (b - a)
    return "".join(chars)


def ibans(text: str) -> tuple[set[str], list[Span]]:
    found: set[str] = set()
    spans: list[Span] = []
    for m in _IBAN.finditer(text):
        compact = m.group().replace(" ", "")
        # The pattern may run on into the next words; the longest valid prefix wins.
        for end in range(len(compact), 14, -1):
            if _iban.is_valid(compact[:end]):
                found.add(compact[:end])
                spans.append(m.span())
                break
    return found, spans


# Issuer ranges (IIN prefixes) and the lengths their cards have: Luhn alone passes one random
# number in ten, so a 14-digit timestamp or a 16-digit order number must also look issued.
_ISSUERS: tuple[tuple[int, int, frozenset[int]], ...] = (
    (4, 4, frozenset({13, 16, 19})),  # Visa
    (51, 55, frozenset({16})), (2221, 2720, frozenset({16})),  # Mastercard
    (34, 34, frozenset({15})), (37, 37, frozenset({15})),  # American Express
    (6011, 6011, frozenset(range(16, 20))), (644, 649, frozenset(range(16, 20))),  # Discover
    (65, 65, frozenset(range(16, 20))), (62, 62, frozenset(range(16, 20))),  # Discover, UnionPay
    (3528, 3589, frozenset(range(16, 20))),  # JCB
    (300, 305, frozenset(range(14, 20))), (36, 36, frozenset(range(14, 20))),  # Diners Club
    (38, 39, frozenset(range(16, 20))),  # Diners Club
    (50, 50, frozenset(range(13, 20))), (56, 69, frozenset(range(13, 20))),  # Maestro
    (2200, 2204, frozenset(range(16, 20))),  # Mir
)  # fmt: skip


def _issued(digits: str) -> bool:
    for lo, hi, lengths in _ISSUERS:
        width = len(str(lo))
        if lo <= int(digits[:width]) <= hi and len(digits) in lengths:
            return True
    return False


# Dates and times: masked before any number detector, so that "02/12/2026 18:30" is never an
# NHS number and "2026-12-02 18:30:12" never a phone number.
_DATES = re.compile(
    r"(?<![\w.:/-])(?:"
    r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:[.,]\d+)?)?(?:Z|[+-]\d\d:?\d\d)?)?"
    r"|\d{1,2}[./-]\d{1,2}[./-]\d{4}(?:,? \d{1,2}:\d\d(?::\d\d)?)?"
    r"|\d{1,2}:\d\d(?::\d\d(?:[.,]\d+)?)?"
    r")(?![\w/-])"
)


def dates(text: str) -> list[Span]:
    return [m.span() for m in _DATES.finditer(text)]


def cards(text: str) -> tuple[set[str], list[Span]]:
    found: set[str] = set()
    spans: list[Span] = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _issued(digits) and luhn.is_valid(digits):
            found.add(digits)
            spans.append(m.span())
    return found, spans


def phones(text: str, regions: tuple[str, ...]) -> tuple[set[str], list[Span]]:
    """Valid numbers; a run of several (a space-separated list, a number then a house number)
    is split into the longest valid numbers, left to right."""
    found: set[str] = set()
    spans: list[Span] = []
    for m in _PHONE.finditer(text):
        cand = m.group()
        n_digits = sum(c.isdigit() for c in cand)
        if n_digits < 7:
            continue
        e164 = _phone(cand, regions) if n_digits <= 15 else None
        if e164 is not None:
            found.add(e164)
            spans.append(m.span())
            continue
        hits = _split(_PHONE_SEP.split(cand), lambda c: _phone(c, regions) if c[0] in "0+(" else None)
        if hits:
            found |= hits
            spans.append(m.span())
    return found, spans


def _split(groups: list[str], check: Callable[[str], str | None], min_digits: int = 7) -> set[str]:
    """Greedy left to right: the longest run of groups that `check` accepts, then on after it.

    Why: a pattern run may hold several numbers ("07911 123456 07911 654321"),
    or one number with a neighbour ("VAT GB 980 7806 84", a house number after
    a phone number). Splitting numbers written nationally only where the
    piece starts as a national or international number does ("0", "+", "(")
    keeps the tail of a bad IBAN from becoming a phone number.
    """
    out: set[str] = set()
    i = 0
    while i < len(groups):
        for j in range(len(groups), i, -1):
            cand = " ".join(groups[i:j])
            if not min_digits <= sum(c.isdigit() for c in cand) <= 18:
                continue
            hit = check(cand)
            if hit is not None:
                out.add(hit)
                i = j
                break
        else:
            i += 1
    return out


# Dates and times are the commonest digit runs in business text: never phone numbers.
_DATE = re.compile(r"\d{4}-\d\d-\d\d|\d\d?[./-]\d\d?[./-]\d{2,4}|\d\d?[:.]\d\d(?:[:.]\d\d)?")


class _TrunkZero(dict[str, bool]):
    """Region -> whether its national numbers start with the trunk prefix 0 (from phonenumbers)."""

    def __missing__(self, region: str) -> bool:
        meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
        self[region] = bool(meta is not None and meta.national_prefix == "0")
        return self[region]


_TRUNK_ZERO = _TrunkZero()


@lru_cache(maxsize=8192)
def _phone(candidate: str, regions: tuple[str, ...]) -> str | None:
    """E.164 form of a valid number, or None. Cached: lists repeat numbers, and parsing costs ~50 µs."""
    if _DATE.fullmatch(candidate.strip()):
        return None
    if candidate.startswith("00"):
        candidate = "+" + candidate[2:]
    international = candidate.startswith("+")
    national_first = candidate.lstrip("(")[:1]
    for region in (None,) if international else regions:
        if region is not None and _TRUNK_ZERO[region] and national_first != "0":
            # Where numbers are dialled nationally with a leading 0 (GB, DE, FR ...), people write
            # that 0: "2079460018" is an order number, "020 7946 0018" a London phone number.
            continue
        try:
            num = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        # For a national number the region is known: the cheaper check first. The full one
        # after it, as regions share country codes (07911 ... is Guernsey's, +44 too).
        fast = region is not None and phonenumbers.is_valid_number_for_region(num, region)
        if fast or phonenumbers.is_valid_number(num):
            return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
    return None


@lru_cache(maxsize=64)
def _id_validators(regions: tuple[str, ...]) -> tuple[Callable[[str], bool], ...]:
    out: list[Callable[[str], bool]] = []
    for region in regions:
        names = _ID_MODULES.get(region, ("vat", "personalid"))
        for name in names:
            mod = get_cc_module(region.lower(), name)
            if mod is not None and (region, name) != ("GB", "nhs"):  # see _nhs: how it is written counts
                out.append(mod.is_valid)
    return tuple(out)


_NHS_WRITTEN = re.compile(r"\d{3} \d{3} \d{4}")


def _nhs(token: str, nhs_context: bool) -> bool:
    """An NHS number: its mod-11 check passes one random 10-digit number in eleven, so a bare run
    of 10 digits (an order or a tracking number) counts only where the text speaks of the NHS;
    written the NHS way, 3-3-4 ("943 476 5919"), it counts by its check alone."""
    compact = re.sub(r"[ ./-]", "", token)
    if len(compact) != 10 or not _nhs_number.is_valid(compact):
        return False
    return nhs_context or bool(_NHS_WRITTEN.fullmatch(token.strip()))


def national_ids(text: str, regions: tuple[str, ...]) -> tuple[set[str], list[Span]]:
    found: set[str] = set()
    spans: list[Span] = []
    if "GB" in regions:
        for m in _NINO.finditer(text):
            found.add("NINO:" + m.group().replace(" ", ""))
            spans.append(m.span())
        text = mask(text, spans)
    validators = _id_validators(regions)
    if not validators and "GB" not in regions:
        return found, spans
    nhs = "GB" in regions
    nhs_context = nhs and "nhs" in text.lower()

    def check(token: str) -> str | None:
        compact = re.sub(r"[ ./-]", "", token)
        if any(_valid(v, compact) for v in validators) or (nhs and _nhs(token, nhs_context)):
            return compact
        return None

    for m in _ID.finditer(text):
        token = m.group()
        if sum(c.isdigit() for c in token) < 7:
            continue
        hit = check(token)
        hits = {hit} if hit is not None else _split(token.split(" "), check) if " " in token else set()
        if hits:
            found |= hits
            spans.append(m.span())
    return found, spans


def _valid(validator: Callable[[str], bool], value: str) -> bool:
    try:
        return bool(validator(value))
    except Exception:  # a validator that chokes on odd input means "not this number"
        return False
