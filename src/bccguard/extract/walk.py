"""The MIME walk: message bytes -> Extraction (pieces of text, unreadable parts, limits reached).

Every leaf part is routed by its declared type, its file name and its first
bytes (a CSV sent as application/octet-stream is still a CSV). Archives and
attached messages recurse, one level deeper each, under the same budget.
Places are named by kind and a hash of the file name, never the name
itself: a file name can be a customer's.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import quopri
from email.message import Message
from typing import Any

from bccguard.extract import documents
from bccguard.extract.archive import Unreadable, open_zip, read_member
from bccguard.extract.html import html_to_text
from bccguard.extract.limits import Budget, LimitReached, Limits
from bccguard.policy.dlp.model import Extraction, Piece

KINDS = ("txt", "html", "csv", "sheet", "pdf", "docx", "zip", "eml", "encrypted", "other")
_BY_TYPE = {
    "text/plain": "txt",
    "text/html": "html",
    "text/csv": "csv",
    "text/comma-separated-values": "csv",
    "application/csv": "csv",
    "text/tab-separated-values": "csv",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "sheet",
    "application/vnd.ms-excel": "sheet",
    "application/vnd.ms-excel.sheet.macroenabled.12": "sheet",
    "application/vnd.oasis.opendocument.spreadsheet": "sheet",
    "application/pdf": "pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
    "message/rfc822": "eml",
    "application/pgp-encrypted": "encrypted",
    "application/x-7z-compressed": "encrypted",
    "application/vnd.rar": "encrypted",
    "application/x-rar-compressed": "encrypted",
}
_BY_EXT = {
    "txt": "txt", "htm": "html", "html": "html", "csv": "csv", "tsv": "csv",
    "xlsx": "sheet", "xlsm": "sheet", "xls": "sheet", "xlsb": "sheet", "ods": "sheet",
    "pdf": "pdf", "docx": "docx", "zip": "zip", "eml": "eml",
    "7z": "encrypted", "rar": "encrypted", "gpg": "encrypted", "pgp": "encrypted", "p7m": "encrypted",
}  # fmt: skip


def extract(message: bytes, limits: Limits | None = None) -> Extraction:
    budget = Budget(limits or Limits())
    acc = _Acc()
    try:
        _message(message, "", budget, acc, depth=0)
    except LimitReached as exc:
        budget.note(exc.kind)
    except MemoryError:
        acc.pieces.clear()  # free what we can; the verdict says why it stopped
        budget.note("memory")
    except RecursionError:
        budget.note("depth")
    return Extraction(
        pieces=tuple(acc.pieces),
        unreadable=tuple(acc.unreadable),
        over_limit=tuple(budget.reached),
        scanned_bytes=budget.scanned,
    )


class _Acc:
    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.unreadable: list[str] = []


def place(kind: str, name: str | None, parent: str) -> str:
    tag = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8] if name else "-"
    here = f"{kind}:{tag}"
    return f"{parent}/{here}" if parent else f"attachment:{here}"


def _message(data: bytes, parent: str, budget: Budget, acc: _Acc, depth: int) -> None:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    for part in _leaves(msg):
        budget.tick()
        _part(part, parent, budget, acc, depth)


def _leaves(msg: Message) -> list[Message]:
    """Leaf parts in order; an attached message is a leaf (read one level deeper, under the depth limit)."""
    out: list[Message] = []
    stack = [msg]
    while stack:
        part = stack.pop()
        if part.get_content_type() != "message/rfc822" and part.is_multipart():
            payload = part.get_payload()
            subparts = [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []
            stack.extend(reversed(subparts))
        else:
            out.append(part)
    return out


def _part(part: Message, parent: str, budget: Budget, acc: _Acc, depth: int) -> None:
    ctype = part.get_content_type().lower()
    filename = part.get_filename()
    disposition = (part.get("content-disposition") or "").split(";", 1)[0].strip().lower()
    if ctype == "message/rfc822":
        inner: Any = part.get_payload()
        data = inner[0].as_bytes() if isinstance(inner, list) and inner else b""
        data = _undo_transfer_encoding(data, part)
    else:
        try:
            raw = part.get_payload(decode=True)
        except (ValueError, TypeError, AssertionError):
            raw = None
        data = raw if isinstance(raw, bytes) else b""
    kind = _kind(ctype, filename, data)
    is_body = not parent and kind in ("txt", "html") and disposition != "attachment" and not filename
    where = (parent or "body") if is_body else place(kind, filename, parent)
    charset = part.get_content_charset()
    _route(kind, data, where, charset, budget, acc, depth)


def _undo_transfer_encoding(data: bytes, part: Message) -> bytes:
    """An attached message sent base64- or QP-encoded (RFC 2046 forbids it; Python's own
    EmailMessage and some clients do it) was parsed as if plain: decode what the parser kept."""
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        try:  # the base64 alphabet has no ':', so the parser kept it all as body: line breaks are skipped
            return base64.b64decode(data, validate=False)
        except ValueError:
            return data
    if cte == "quoted-printable":
        return quopri.decodestring(data)
    return data


def _kind(ctype: str, filename: str | None, data: bytes) -> str:
    ext = filename.rsplit(".", 1)[-1].lower() if filename and "." in filename else ""
    kind = _BY_EXT.get(ext) or _BY_TYPE.get(ctype)
    if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime") and "signed" not in ctype:
        kind = "encrypted"
    if kind is None or kind == "other":
        if data.startswith(b"%PDF"):
            kind = "pdf"
        elif data.startswith(b"PK\x03\x04"):
            kind = "zip"
        elif data.startswith(documents.OLE_MAGIC):
            kind = "sheet"
        elif ctype.startswith("text/"):
            kind = "txt"
        else:
            kind = "other"
    if kind == "zip" and data.startswith(b"PK\x03\x04"):
        kind = _office_kind(data) or "zip"
    return kind


def _office_kind(data: bytes) -> str | None:
    """An OOXML or ODF file sent as a bare zip (or under a .zip name) is read as the document it is."""
    head = data[:4096]
    if b"mimetypeapplication/vnd.oasis.opendocument.spreadsheet" in head:
        return "sheet"
    if b"[Content_Types].xml" in data[:65536] or b"[Content_Types].xml" in data[-65536:]:
        if b"xl/" in data[-65536:]:
            return "sheet"
        if b"word/" in data[-65536:]:
            return "docx"
    return None


def _route(  # noqa: PLR0917 - one call site, each argument a different thing
    kind: str, data: bytes, where: str, charset: str | None, budget: Budget, acc: _Acc, depth: int
) -> None:
    try:
        if kind in ("txt", "html", "csv"):
            text = documents.decode_text(data, charset)
            if kind == "html":
                text = html_to_text(text)
            _add_text(text, where, budget, acc, rows=kind == "csv")
        elif kind == "sheet":
            for rows in documents.sheet_rows(data, budget):
                _add_rows(rows, where, budget, acc)
        elif kind == "docx":
            _add_text(documents.docx_text(data, budget), where, budget, acc)
        elif kind == "pdf":
            _add_text(documents.pdf_text(data, budget), where, budget, acc)
        elif kind in ("zip", "eml"):
            if depth >= budget.limits.depth:
                budget.note("depth")
                return
            if kind == "eml":
                _message(data, where, budget, acc, depth + 1)
            else:
                _zip(data, where, budget, acc, depth + 1)
        elif kind == "encrypted":
            acc.unreadable.append(where)
    except Unreadable:
        acc.unreadable.append(where)
    except LimitReached as exc:
        if exc.kind == "time":
            raise
        budget.note(exc.kind)
    except (MemoryError, RecursionError):
        raise
    except Exception:  # a document that crashes its parser is one we cannot read: a defined verdict
        acc.unreadable.append(where)


def _zip(data: bytes, where: str, budget: Budget, acc: _Acc, depth: int) -> None:
    zf = open_zip(data)
    for info in zf.infolist():
        if info.is_dir():
            continue
        budget.member()
        name = info.filename.rsplit("/", 1)[-1]
        if info.flag_bits & 0x1:
            acc.unreadable.append(place("encrypted", name, where))
            continue
        member = read_member(zf, info, budget)
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        kind = _kind("application/octet-stream" if ext else "", name, member)
        _route(kind, member, place(kind, name, where), None, budget, acc, depth)


def _add_text(text: str, where: str, budget: Budget, acc: _Acc, *, rows: bool = False) -> None:
    take = budget.scan(len(text))
    text = text[:take]
    if not text.strip():
        return
    if rows:
        table = documents.csv_rows(text, budget)
        acc.pieces.append(Piece(where=where, text=text, rows=tuple(table)))
    else:
        acc.pieces.append(Piece(where=where, text=text))


def _add_rows(rows: documents.Rows, where: str, budget: Budget, acc: _Acc) -> None:
    text = "\n".join("\t".join(r) for r in rows)
    take = budget.scan(len(text))
    if take < len(text):
        text = text[:take]
        rows = rows[: text.count("\n") + 1]
    if text.strip():
        acc.pieces.append(Piece(where=where, text=text, rows=tuple(rows)))
