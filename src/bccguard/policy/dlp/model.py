"""Plain data between extraction (the edge) and the customer-data detectors (the core).

Extraction turns a message into `Piece`s of text (and rows, for tables);
the detectors turn pieces into `Findings`: distinct-instance counts per
detector, where they were found, and what could not be read. Named tuples,
not frozen dataclasses: a plain letter creates three of them, and a frozen
dataclass costs a microsecond each to build. Nothing here
holds a detected value: only counts leave the detectors, so a verdict, a log
line, a metric or `bccguard check` cannot print one.
"""

from __future__ import annotations

from typing import NamedTuple

DETECTORS = ("email", "phone", "iban", "card", "national_id", "customer_table")
# Why a scan stopped early: a closed set, so each is a metric label value.
LIMITS = ("bytes", "decompressed", "depth", "members", "pages", "time", "memory")
LEVELS = ("low", "high")

Counts = tuple[tuple[str, int], ...]


class Piece(NamedTuple):
    """Text from one place in a message: the body, or an attachment by type and hashed name.

    `rows` is set when the source is a table (CSV, a sheet, a DOCX table):
    the table-shape detector reads the cells; the other detectors read `text`.
    """

    where: str
    text: str
    rows: tuple[tuple[str, ...], ...] = ()


class Extraction(NamedTuple):
    """Everything extraction read from one message, and what stopped it."""

    pieces: tuple[Piece, ...] = ()
    unreadable: tuple[str, ...] = ()  # places (as `Piece.where`) that are encrypted or broken
    over_limit: tuple[str, ...] = ()  # limit names from LIMITS that were reached
    scanned_bytes: int = 0


class Place(NamedTuple):
    where: str
    counts: Counts


class Findings(NamedTuple):
    """Distinct instances per detector over the whole message, and per place.

    An instance found in two places counts once in `counts` and once in each
    place. Only detectors that found something appear.
    """

    counts: Counts = ()
    places: tuple[Place, ...] = ()
    unreadable: tuple[str, ...] = ()
    over_limit: tuple[str, ...] = ()
    scanned_bytes: int = 0
    detectors: tuple[str, ...] = ()  # the detectors that ran

    def count(self, detector: str) -> int:
        return dict(self.counts).get(detector, 0)
