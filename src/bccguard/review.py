"""`bccguard quarantine ...`: what an admin does with held mail, each step audited.

list, show, release (as it was, or rewritten by the policy in force),
delete and purge. Release keeps the promise the relay made: an entry leaves
the store only after the upstream accepted it, so a failed release changes
nothing but the audit log. Release and delete take an exclusive lock on the
entry, so two admins cannot release the same message twice at once.

Each command returns an exit code (see cli.py) and prints one line per
problem, naming it and the fix; tracebacks are for bugs only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from bccguard.config import Config, parse_duration
from bccguard.policy.addresses import visible_recipients
from bccguard.policy.classify import classify_rcpt
from bccguard.policy.decide import decide_with, select_rule
from bccguard.policy.engine import rewrite_for
from bccguard.policy.headers import parse_header
from bccguard.policy.notice import display_subject
from bccguard.policy.rewrite import drop_bcc
from bccguard.store.durable import check_id
from bccguard.store.quarantine import Entry, Quarantine
from bccguard.upstream import UpstreamError, open_upstream

EX_OK, EX_FAILED, EX_USAGE = 0, 1, 2


class ReviewError(Exception):
    """A problem the admin can fix; `code` is the exit status."""

    def __init__(self, message: str, code: int = EX_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _fail(msg: str, code: int = EX_USAGE) -> ReviewError:
    return ReviewError(msg, code)


def _store(cfg: Config) -> Quarantine:
    return Quarantine(cfg.quarantine.path)


def _entry(q: Quarantine, entry_id: str) -> Entry:
    try:
        check_id(entry_id)
    except ValueError:
        raise _fail(
            f"{entry_id!r} is not a quarantine id (fix: copy an ID from `bccguard quarantine list`)"
        ) from None
    try:
        return q.get(entry_id)
    except FileNotFoundError:
        raise _fail(
            f"no entry {entry_id} in {q.path} (fix: check `bccguard quarantine list`, "
            "and --config if the relay uses another quarantine path)"
        ) from None
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot read entry {entry_id}: {_why(exc)}", EX_FAILED) from None


def _why(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


@contextlib.contextmanager
def _locked(q: Quarantine, entry_id: str) -> Iterator[None]:
    """Exclusive lock on the entry's metadata for the time of a release or delete."""
    try:
        fd = os.open(q.path / f"{entry_id}.json", os.O_RDONLY)
    except FileNotFoundError:
        raise _fail(f"no entry {entry_id} (fix: it was released or deleted meanwhile)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _fail(
                f"entry {entry_id} is being handled by another command (fix: try again)", EX_FAILED
            ) from None
        if not (q.path / f"{entry_id}.json").exists():  # released by the lock holder before us
            raise _fail(f"no entry {entry_id} (fix: it was released or deleted meanwhile)")
        yield
    finally:
        os.close(fd)


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def summary(q: Quarantine, e: Entry) -> dict[str, Any]:
    """What `list --json` prints per entry: counts and the sender, never the recipients."""
    m = e.meta
    verdict = m.get("verdict", {})
    try:
        subject = display_subject(parse_header(q.message(e.id)[:65536]))
    except OSError:
        subject = "(message file missing)"
    return {
        "id": e.id,
        "time": float(m.get("time", 0.0)),
        "received": _utc(float(m.get("time", 0.0))) + " UTC",
        "mail_from": m.get("mail_from", ""),
        "rcpts": len(m.get("rcpt_tos", [])),
        "rule": verdict.get("rule", ""),
        "visible_external": len(verdict.get("visible_external", ())),
        "reason": verdict.get("reason", ""),
        "size": e.size,
        "subject": subject,
    }


# ---------------------------------------------------------------- commands


def cmd_list(cfg: Config, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    q = _store(cfg)
    try:
        rows = [summary(q, e) for e in q.entries()]
    except OSError as exc:
        raise _fail(f"cannot read {q.path}: {_why(exc)} (fix: run as the relay's user)", EX_FAILED) from None
    if as_json:
        print(json.dumps(rows, ensure_ascii=False), file=out)
        return EX_OK
    if not rows:
        print(f"no messages held in {q.path}", file=out)
        return EX_OK
    head = f"{'ID':<30} {'RECEIVED (UTC)':<19} {'RULE':<12} {'RCPTS':>5} {'SHOWN':>5}  SENDER / SUBJECT"
    print(head, file=out)
    for r in rows:
        print(
            f"{r['id']:<30} {r['received'][:19]:<19} {r['rule'][:12]:<12} {r['rcpts']:>5} "
            f"{r['visible_external']:>5}  {r['mail_from'] or '<>'} / {r['subject'][:60]}",
            file=out,
        )
    print(f"{len(rows)} held; SHOWN = external addresses visible in To/Cc", file=out)
    return EX_OK


def cmd_show(cfg: Config, entry_id: str, *, raw: bool, out: TextIO = sys.stdout) -> int:
    q = _store(cfg)
    e = _entry(q, entry_id)
    try:
        message = q.message(e.id)
    except OSError as exc:
        raise _fail(f"cannot read the message of {e.id}: {_why(exc)}", EX_FAILED) from None
    if raw:  # the bytes as held, for a mail reader or a diff
        sys.stdout.flush()
        sys.stdout.buffer.write(message)
        sys.stdout.buffer.flush()
        return EX_OK
    s = summary(q, e)
    m = e.meta
    _, settings = select_rule(cfg.policy, q.envelope(e.id))
    external = sum(1 for r in m.get("rcpt_tos", []) if classify_rcpt(r, settings).is_external)
    lines = [
        f"id:         {e.id}",
        f"received:   {s['received']}",
        f"sender:     {s['mail_from'] or '<>'}",
        f"recipients: {s['rcpts']} ({external} external by the current policy)",
        f"rule:       {s['rule']}: {s['reason']}",
        f"size:       {e.size} bytes",
        "",
    ]
    block = parse_header(message)
    head = message[: block.body_offset].decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
    print("\n".join(lines) + "\n" + head, file=out)
    return EX_OK


def cmd_release(cfg: Config, entry_id: str, *, rewrite: bool, out: TextIO = sys.stdout) -> int:
    q = _store(cfg)
    e = _entry(q, entry_id)
    with _locked(q, e.id):
        return asyncio.run(_release(cfg, q, e, rewrite=rewrite, out=out))


async def _release(cfg: Config, q: Quarantine, e: Entry, *, rewrite: bool, out: TextIO) -> int:
    env = q.envelope(e.id)
    data = q.message(e.id)
    how = "rewritten" if rewrite else "as it was"
    if rewrite:
        block = parse_header(data)
        rule, settings = select_rule(cfg.policy, env)
        verdict = decide_with(rule, settings, env, visible_recipients(block))
        data, hidden = rewrite_for(data, block, env, settings, verdict)
        how = f"rewritten ({hidden} addresses hidden)"
    else:
        data = drop_bcc(data, parse_header(data))  # as every forwarded message: the envelope keeps them
    upstream = open_upstream(cfg.upstream, hostname=cfg.server.hostname)
    try:
        result = await upstream.deliver(
            env.mail_from, env.rcpt_tos, data, smtputf8=env.smtputf8, eightbit=not data.isascii()
        )
    except UpstreamError as exc:
        q.audit("release", e.id, "failed", rewrite=rewrite, error=exc.kind)
        raise _fail(
            f"release of {e.id} failed: upstream {exc.kind}"
            + (f" ({exc.reply.code})" if exc.reply is not None else "")
            + f"; the entry is kept (fix: check upstream.url = {cfg.upstream.url!r} and retry)",
            EX_FAILED,
        ) from None
    finally:
        await upstream.close()
    if not result.accepted:
        q.audit("release", e.id, "failed", rewrite=rewrite, error=f"{result.reply.code}")
        raise _fail(
            f"release of {e.id} failed: the upstream refused every recipient ({result.reply.code}); "
            "the entry is kept (fix: see the upstream's log, then retry or delete it)",
            EX_FAILED,
        )
    if result.refused:
        refused = tuple(r for r in env.rcpt_tos if r in result.refused)
        codes = sorted({str(rep.code) for rep in result.refused.values()})
        # Audit first: the accepted recipients have it now, whatever happens next.
        q.audit("release", e.id, "partial", rewrite=rewrite, accepted=len(result.accepted),
                refused=len(refused))  # fmt: skip
        q.narrow(e.id, refused, f"released to {len(result.accepted)}; refused {','.join(codes)}")
        print(
            f"{e.id}: released {how} to {len(result.accepted)} of {len(env.rcpt_tos)} recipients; "
            f"{len(refused)} refused ({', '.join(codes)}) stay held (fix: release again later, or delete)",
            file=out,
        )
        return EX_FAILED
    q.audit("release", e.id, "released", rewrite=rewrite, accepted=len(result.accepted))
    q.delete(e.id)
    print(f"{e.id}: released {how} to {len(result.accepted)} recipients; removed from quarantine", file=out)
    return EX_OK


def cmd_delete(cfg: Config, entry_id: str, *, out: TextIO = sys.stdout) -> int:
    q = _store(cfg)
    e = _entry(q, entry_id)
    with _locked(q, e.id):
        q.delete(e.id)
        q.audit("delete", e.id, "deleted")
    print(f"{e.id}: deleted", file=out)
    return EX_OK


def cmd_purge(cfg: Config, older_than: str, *, out: TextIO = sys.stdout) -> int:
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise _fail(f"--older-than: {exc} (fix: e.g. --older-than 30d)") from None
    q = _store(cfg)
    if not q.path.is_dir():
        print(f"nothing to purge: {q.path} does not exist", file=out)
        return EX_OK
    counts = {"entry": 0, "orphan": 0, "temp": 0}
    for item, kind in q.purge(seconds):
        counts[kind] += 1
        q.audit("purge", item, "removed", kind=kind, older_than=older_than)
    print(
        f"purged {counts['entry']} entries older than {older_than}, "
        f"{counts['orphan']} orphan messages, {counts['temp']} temp files",
        file=out,
    )
    return EX_OK
