"""`bccguard report`: what the relay would decide for a batch of stored messages.

Why: before switching `action` from "audit" to "rewrite", an admin wants to
know how many of their own sent messages would be changed, and why (which
rule, how many consumer and external addresses), so false positives show up
before anyone's mail is touched. This walks a Maildir, an mbox file, a
directory of message files or single files, runs each message through the
same `evaluate` (and the same DATA refusal check) as the relay and
`bccguard check`, and prints a table or JSON.

Privacy: the output carries counts, actions, rules and reasons (which never
hold an address), plus where each message is stored; never an address.
"""

from __future__ import annotations

import fnmatch
import mailbox
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from bccguard.config import PolicyConfig
from bccguard.policy.addresses import first_from, header_recipients
from bccguard.policy.engine import evaluate
from bccguard.policy.headers import parse_header
from bccguard.policy.model import Envelope

ENVELOPE_FIELDS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")


class ReportError(Exception):
    """A path that cannot be read as mail: one line for the admin."""


@dataclass(frozen=True, slots=True)
class Row:
    """One message's verdict, counts only."""

    source: str
    action: str  # what the relay would do; "reject" for a DATA refusal; "skip" for no recipients
    would: str | None  # audit: what enforcement would do
    rule: str
    exposure: bool
    visible: int
    external: int
    consumer: int
    unparsed: int
    reply: bool
    reason: str

    @property
    def verdict(self) -> str:
        """The action enforcement would take: audit's `would`, else the action."""
        return self.would or self.action


def default_envelope(message: bytes) -> Envelope | None:
    """The envelope a sending client would use: From, and every recipient field's routing address."""
    block = parse_header(message)
    sender = first_from(block)
    mail_from = sender.address.addr_spec if sender is not None and sender.address.valid else ""
    rcpts = tuple(
        dict.fromkeys(
            a.addr_spec for a in header_recipients(block, ENVELOPE_FIELDS) if a.valid and not a.in_text
        )
    )
    if not rcpts:
        return None
    return Envelope(mail_from, rcpts, smtputf8=not message.isascii())


def judge(source: str, data: bytes, policy: PolicyConfig) -> Row:
    """One message: the relay's DATA refusal first, then the policy, as `bccguard check`."""
    from bccguard.smtp.server import check_content  # the relay's own check: one rule, two edges

    wire = data if b"\r" in data else data.replace(b"\n", b"\r\n")
    refused = check_content(wire)
    if refused is not None:
        return Row(source, "reject", None, "smtp", False, 0, 0, 0, 0, False, refused)
    env = default_envelope(data)
    if env is None:
        return Row(source, "skip", None, "-", False, 0, 0, 0, 0, False, "no recipients in the header")
    o = evaluate(data, env, policy)
    v = o.verdict
    reply = any(f.lname in ("in-reply-to", "references") for f in o.block.fields)
    return Row(
        source,
        v.action.value,
        v.would.value if v.would else None,
        v.rule,
        v.exposure,
        v.visible,
        len(v.visible_external) + len(v.unparsed),
        v.visible_consumer,
        len(v.unparsed),
        reply,
        v.reason,
    )


def _is_maildir(path: Path) -> bool:
    return all((path / d).is_dir() for d in ("cur", "new"))


def _is_mbox(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(5) == b"From "


def messages(paths: Sequence[str], glob: str = "*") -> Iterator[tuple[str, bytes]]:
    """(where, bytes) for every message under `paths`: Maildirs, mbox files, directories, files.

    In a plain directory only file names matching `glob` are read (dot files never).
    """
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(
                f"{p}: no such file or directory (fix: pass a Maildir, an mbox file or a directory)"
            )
        if p.is_dir() and _is_maildir(p):
            md = mailbox.Maildir(p, factory=None, create=False)
            for key in sorted(md.keys()):
                yield f"{p}:{key}", md.get_bytes(key)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                here = Path(root)
                if _is_maildir(here) and here != p:
                    continue  # walked as files below anyway; a Maildir's tmp/ holds partial writes
                if here.name == "tmp" and _is_maildir(here.parent):
                    continue
                for name in sorted(files):
                    if not name.startswith(".") and fnmatch.fnmatch(name, glob):
                        yield from _file(here / name)
        else:
            yield from _file(p)


def _file(f: Path) -> Iterator[tuple[str, bytes]]:
    try:
        if _is_mbox(f):
            box = mailbox.mbox(f, factory=None, create=False)
            try:
                for key in box.iterkeys():  # iterating a Mailbox gives messages
                    yield f"{f}#{key}", box.get_bytes(key)
            finally:
                box.close()
            return
        yield str(f), f.read_bytes()
    except OSError as exc:
        raise ReportError(f"{f}: {exc.strerror or exc} (fix: check the path and its permissions)") from None


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """Counts for the whole batch: what enforcement would do, by action and by rule."""
    changed = [r for r in rows if r.verdict not in ("pass", "skip")]
    return {
        "messages": len(rows),
        "by_action": dict(Counter(r.action for r in rows).most_common()),
        "by_verdict": dict(Counter(r.verdict for r in rows).most_common()),
        "exposures": sum(r.exposure for r in rows),
        "exposures_by_rule": dict(Counter(r.rule for r in rows if r.exposure).most_common()),
        "would_change": len(changed),
        "replies_flagged": sum(r.reply for r in changed),
        "refused": sum(r.action == "reject" and r.rule == "smtp" for r in rows),
        "skipped": sum(r.action == "skip" for r in rows),
    }


def render_table(rows: Sequence[Row], out: TextIO, *, all_rows: bool) -> None:
    """One line per message that enforcement would change (or every message), then the summary."""
    shown = rows if all_rows else [r for r in rows if r.verdict not in ("pass", "skip")]
    if shown:
        head = f"{'verdict':<10} {'rule':<12} {'ext':>4} {'cons':>4} {'text':>4} {'reply':<5}  source"
        print(head, file=out)
        for r in shown:
            print(
                f"{r.verdict:<10} {r.rule[:12]:<12} {r.external:>4} {r.consumer:>4} {r.unparsed:>4} "
                f"{'yes' if r.reply else 'no':<5}  {r.source}",
                file=out,
            )
        print(file=out)
    s = summarize(rows)
    n = s["messages"] or 1
    print(f"{s['messages']} messages; enforcement would change {s['would_change']} "
          f"({100 * s['would_change'] / n:.1f}%)", file=out)  # fmt: skip
    print("by verdict: " + ", ".join(f"{k} {v}" for k, v in s["by_verdict"].items()), file=out)
    if s["exposures_by_rule"]:
        by_rule = ", ".join(f"{k} {v}" for k, v in s["exposures_by_rule"].items())
        print(f"exposures by rule: {by_rule}", file=out)
    print(f"refused at DATA (bare CR/LF, long lines): {s['refused']}; no recipients: {s['skipped']}; "
          f"replies among the changed: {s['replies_flagged']}", file=out)  # fmt: skip


def report(paths: Sequence[str], policy: PolicyConfig, glob: str = "*") -> list[Row]:
    return [judge(src, data, policy) for src, data in messages(paths, glob)]


def as_json(rows: Sequence[Row]) -> dict[str, Any]:
    return {"summary": summarize(rows), "messages": [asdict(r) for r in rows]}
