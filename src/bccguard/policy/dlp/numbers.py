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


def cards(text: str) -> tuple[set[str], list[Span]]:
    found: set[str] = set()
    spans: list[Span] = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn.is_valid(digits):
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


@lru_cache(maxsize=8192)
def _phone(candidate: str, regions: tuple[str, ...]) -> str | None:
    """E.164 form of a valid number, or None. Cached: lists repeat numbers, and parsing costs ~50 µs."""
    if _DATE.fullmatch(candidate.strip()):
        return None
    if candidate.startswith("00"):
        candidate = "+" + candidate[2:]
    international = candidate.startswith("+")
    for region in (None,) if international else regions:
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
            if mod is not None:
                out.append(mod.is_valid)
    return tuple(out)


def national_ids(text: str, regions: tuple[str, ...]) -> tuple[set[str], list[Span]]:
    found: set[str] = set()
    spans: list[Span] = []
    if "GB" in regions:
        for m in _NINO.finditer(text):
            found.add("NINO:" + m.group().replace(" ", ""))
            spans.append(m.span())
        text = mask(text, spans)
    validators = _id_validators(regions)
    if not validators:
        return found, spans
    def check(token: str) -> str | None:
        compact = re.sub(r"[ ./-]", "", token)
        return compact if any(_valid(v, compact) for v in validators) else None

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
