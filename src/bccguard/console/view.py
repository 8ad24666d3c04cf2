"""What the console shows of a held message: summaries, filters, masked headers, a safe body.

Blocking and file-reading (the console calls it in worker threads), but no
HTTP: the routes turn these plain values into pages. Everything a message
says is data: the templates escape it (Jinja2 autoescape), and HTML parts
are shown as their text, never rendered, so no script runs and no remote
image, font or form is ever fetched.
"""

from __future__ import annotations

import calendar
import email
import email.message
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from functools import partial
from html.parser import HTMLParser
from typing import Any

from bccguard.config import Config, PolicySettings
from bccguard.policy.classify import classify_rcpt, envelope_domain
from bccguard.policy.decide import select_rule
from bccguard.policy.headers import parse_header
from bccguard.review import summary
from bccguard.store.quarantine import Entry, Quarantine
from bccguard.store.quarantines import Quarantines

MAX_BODY_CHARS = 100_000
MASK = "\u2022\u2022\u2022"
# An addr-spec as it appears in header and body text: found generously (UTF-8 and quoted
# local parts, IDN domains), since a missed one is a customer address on screen.
_LOCAL = r"[^\s<>()\[\],;:\"@\\]"
_DOMAIN = r"[^\s<>()\[\],;:\"'@\\]"
ADDR = re.compile(rf"(?:\"[^\"\r\n]*\"|{_LOCAL}+)@({_DOMAIN}+)")


def sender_domain(mail_from: str) -> str:
    return envelope_domain(mail_from) if mail_from else "(null sender)"


# ------------------------------------------------------------------ list


def _query_value(q: Any, key: str) -> str:
    """One filter field from the query string: trimmed, at most 200 characters."""
    return str(q.get(key, "")).strip()[:200]


@dataclass(frozen=True)
class Filters:
    since: str = ""  # YYYY-MM-DD, UTC, inclusive
    until: str = ""
    rule: str = ""
    reason: str = ""
    domain: str = ""
    subject: str = ""

    @classmethod
    def from_query(cls, q: Any) -> Filters:
        get = partial(_query_value, q)
        domain = get("domain").rpartition("@")[2].lower()  # an address typed in: its domain only
        return cls(get("since"), get("until"), get("rule"), get("reason"), domain, get("subject"))

    def query(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}

    def match(self, row: dict[str, Any]) -> bool:
        lo, hi = _day(self.since), _day(self.until)
        t = row["time"]
        if lo is not None and t < lo:
            return False
        if hi is not None and t >= hi + 86400:
            return False
        if self.rule and row["rule"] != self.rule:
            return False
        if self.reason and self.reason.lower() not in row["reason"].lower():
            return False
        if self.domain and row["sender_domain"] != self.domain:
            return False
        return not (self.subject and self.subject.lower() not in row["subject"].lower())


def _day(text: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%d")))
    except ValueError:
        return None


def masker(cfg: Config, q: Quarantine, e: Entry) -> Masker:
    """A masker under the rule that matches this message's envelope (as the relay judged it)."""
    _, settings = select_rule(cfg.policy, q.envelope(e.id))
    return Masker(settings)


def rows(qs: Quarantines, f: Filters, cfg: Config) -> list[dict[str, Any]]:
    """Every entry of every directory that matches, newest first, with counts and domains only.

    The filter sees the subject as written (a reviewer searches for words in
    it); the page gets it masked, as the header block is: a subject can name a
    customer by address ("Complaint from jane@...").
    """
    out = []
    for q, e in qs.entries():
        try:
            r = summary(q, e)
            r["sender_domain"] = sender_domain(r.pop("mail_from"))
            if not f.match(r):
                continue
            r["subject"] = masker(cfg, q, e)(r["subject"])
        except OSError:  # released or deleted meanwhile
            continue
        except (AttributeError, KeyError, TypeError, ValueError):  # metadata not as the relay writes it
            r = {"id": e.id, "time": 0.0, "received": "?", "sender_domain": "?", "rcpts": 0,
                 "rule": "", "visible_external": 0, "reason": "unreadable metadata: see "
                 "`bccguard quarantine show`", "size": e.size, "subject": "(unreadable entry)"}  # fmt: skip
            if not f.match(r):
                continue
        out.append(r)
    out.sort(key=lambda r: (r["time"], r["id"]), reverse=True)
    return out


# ------------------------------------------------------------------ one message


@dataclass
class Part:
    kind: str  # "text" or "html"
    text: str
    truncated: bool = False


@dataclass
class Attachment:
    name: str
    content_type: str
    size: int


@dataclass
class Detail:
    row: dict[str, Any]
    rcpt_domains: list[tuple[str, int]]
    external_rcpts: int
    action: str
    headers: str
    parts: list[Part] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    masked: int = 0


class Masker:
    """Hides the local part of every external address in a text (`•••@gmail.com`), counting them.

    External is the relay's own notion (not internal, not partner) under the
    rule that matches the message's envelope. The domain stays: it is what a
    reviewer needs to judge the exposure, and what bccguard logs anyway.
    """

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self.count = 0
        self._memo: dict[str, bool] = {}

    def _one(self, m: re.Match[str]) -> str:
        domain = m.group(1).lower()
        ext = self._memo.get(domain)
        if ext is None:
            ext = self._memo[domain] = classify_rcpt(f"x@{domain}", self.settings).is_external
        if not ext:
            return m.group(0)
        self.count += 1
        return f"{MASK}@{m.group(1)}"

    def __call__(self, text: str) -> str:
        return ADDR.sub(self._one, text)


def detail(cfg: Config, q: Quarantine, e: Entry, *, reveal: bool) -> Detail:
    data = q.message(e.id)
    r = summary(q, e)
    r["sender_domain"] = sender_domain(r.pop("mail_from"))
    m = e.meta
    rcpts = list(m.get("rcpt_tos", []))
    mask = masker(cfg, q, e)
    domains = Counter(envelope_domain(x) or "(none)" for x in rcpts)
    external = sum(1 for x in rcpts if classify_rcpt(x, mask.settings).is_external)
    show: Callable[[str], str] = (lambda t: t) if reveal else mask
    r["subject"] = show(r["subject"])
    block = parse_header(data)
    head = data[: block.body_offset].decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
    d = Detail(
        row=r,
        rcpt_domains=domains.most_common(),
        external_rcpts=external,
        action=str(m.get("verdict", {}).get("action", "")),
        headers=show(head),
    )
    parts, attachments = _walk(data)
    d.parts = [Part(p.kind, show(p.text), p.truncated) for p in parts]
    d.attachments = [Attachment(show(a.name), a.content_type, a.size) for a in attachments]
    d.masked = mask.count
    return d


def _walk(data: bytes) -> tuple[list[Part], list[Attachment]]:
    msg = email.message_from_bytes(data)  # compat32: no costly address parsing
    parts: list[Part] = []
    attachments: list[Attachment] = []
    budget = MAX_BODY_CHARS
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        name = _filename(part)
        disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
        payload = part.get_payload(decode=True)
        raw = payload if isinstance(payload, bytes) else b""
        if name or disposition == "attachment" or ctype not in ("text/plain", "text/html"):
            attachments.append(Attachment(name or "(unnamed)", ctype, len(raw)))
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = raw.decode(charset, "replace")
        except LookupError:
            text = raw.decode("utf-8", "replace")
        kind = "text"
        if ctype == "text/html":
            text, kind = html_to_text(text), "html"
        truncated = len(text) > budget
        text = text[: max(budget, 0)]
        budget -= len(text)
        parts.append(Part(kind, text, truncated))
    return parts, attachments


def _filename(part: email.message.Message) -> str:
    name = part.get_filename() or ""
    try:
        return str(make_header(decode_header(name)))[:200]
    except (ValueError, LookupError, UnicodeError):
        return name[:200]


class _Text(HTMLParser):
    """The text of an HTML document: tags dropped, script and style content skipped."""

    SKIP = frozenset({"script", "style", "head", "title", "template", "noscript"})
    BREAK = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "table", "blockquote", "form"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self._skip += 1
        elif tag in self.BREAK:
            self.out.append("\n")
        elif tag == "img":
            alt = dict(attrs).get("alt") or ""
            self.out.append(f"[image{': ' + alt if alt else ''} (not loaded)]")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        elif tag in self.BREAK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.out.append(data)


def html_to_text(html: str) -> str:
    p = _Text()
    try:
        p.feed(html)
        p.close()
    except (AssertionError, ValueError):  # HTMLParser on hostile input: fall back to the source
        return html
    text = "".join(p.out)
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", text)).strip()


# ------------------------------------------------------------------ audit


@dataclass(frozen=True)
class AuditFilters:
    who: str = ""
    what: str = ""
    id: str = ""
    result: str = ""
    since: str = ""
    until: str = ""

    @classmethod
    def from_query(cls, q: Any) -> AuditFilters:
        get = partial(_query_value, q)
        return cls(get("who"), get("what"), get("id"), get("result"), get("since"), get("until"))

    def query(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}

    def match(self, rec: dict[str, Any]) -> bool:
        lo, hi = _day(self.since), _day(self.until)
        t = float(rec.get("ts", 0.0))
        if (lo is not None and t < lo) or (hi is not None and t >= hi + 86400):
            return False
        for key in ("who", "what", "result"):
            want = getattr(self, key)
            if want and str(rec.get(key, "")) != want:
                return False
        return not (self.id and self.id not in str(rec.get("id", "")))


AUDIT_DETAIL_KEYS = ("mode", "accepted", "refused", "error", "kind", "older_than")


def audit_rows(qs: Quarantines, f: AuditFilters) -> list[dict[str, Any]]:
    """Every directory's audit log merged, newest first (a log's own order breaks ties)."""
    merged: list[tuple[float, int, dict[str, Any]]] = []
    for q in qs.dirs():
        records, _ = q.audit_records(0)
        for n, rec in enumerate(records):
            try:
                ts = float(rec.get("ts", 0.0))
            except (TypeError, ValueError):
                ts = 0.0
            merged.append((ts, n, rec))
    merged.sort(key=lambda t: (t[0], t[1]), reverse=True)
    out = []
    for _, _, rec in merged:
        if not f.match(rec):
            continue
        detail = ", ".join(f"{k}={rec[k]}" for k in AUDIT_DETAIL_KEYS if k in rec)
        out.append({**rec, "via": rec.get("via", "cli"), "detail": detail})
    return out
