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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TextIO

from bccguard.config import Config, parse_duration
from bccguard.policy.addresses import visible_recipients
from bccguard.policy.classify import classify_rcpt
from bccguard.policy.decide import decide_with, select_rule
from bccguard.policy.engine import rewrite_for, split_for
from bccguard.policy.headers import parse_header
from bccguard.policy.model import Action
from bccguard.policy.notice import display_subject
from bccguard.policy.rewrite import drop_bcc
from bccguard.policy.split import render
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
        # Newest first: the message an admin came to look at is the one just held.
        rows = sorted((summary(q, e) for e in q.entries()), key=lambda r: r["time"], reverse=True)
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


RELEASE_MODES = ("as_is", "rewrite", "split")


@dataclass(frozen=True)
class Released:
    """What a release did: "released" (entry gone) or "partial" (kept for the refused)."""

    result: str
    accepted: int
    refused: int
    total: int
    how: str
    codes: tuple[str, ...] = ()


def cmd_release(
    cfg: Config, entry_id: str, *, rewrite: bool, split: bool = False, out: TextIO = sys.stdout
) -> int:
    mode = "split" if split else "rewrite" if rewrite else "as_is"
    r = release_now(cfg, entry_id, mode)
    if r.result == "partial":
        print(
            f"{entry_id}: released {r.how} to {r.accepted} of {r.total} recipients; "
            f"{r.refused} refused ({', '.join(r.codes)}) stay held (fix: release again later, or delete)",
            file=out,
        )
        return EX_FAILED
    print(f"{entry_id}: released {r.how} to {r.accepted} recipients; removed from quarantine", file=out)
    return EX_OK


def release_now(
    cfg: Config, entry_id: str, mode: str, *, who: str | None = None, via: str | None = None
) -> Released:
    """Release one entry (blocking): lock it, deliver through [upstream], audit, then remove it.

    The one release path of the CLI and the console (which calls it in a
    worker thread), so both keep the same promise and write the same audit
    log. Raises ReviewError when nothing was delivered; the entry is kept.
    """
    if mode not in RELEASE_MODES:
        raise _fail(f"unknown release mode {mode!r} (fix: one of {', '.join(RELEASE_MODES)})")
    q = _store(cfg)
    e = _entry(q, entry_id)
    with _locked(q, e.id):
        return asyncio.run(_release(cfg, q, e, mode=mode, who=who, via=via))


async def _release(
    cfg: Config, q: Quarantine, e: Entry, *, mode: str, who: str | None, via: str | None
) -> Released:
    env = q.envelope(e.id)
    data = q.message(e.id)
    rewrite = mode != "as_is"
    ctx: dict[str, Any] = {"rewrite": rewrite, "mode": mode, "who": who}
    if via:
        ctx["via"] = via
    how = "as it was"
    # As every forwarded message: without Bcc/Resent-Bcc (the envelope keeps those recipients).
    sends: list[tuple[tuple[str, ...], bytes]] = [(env.rcpt_tos, drop_bcc(data, parse_header(data)))]
    if rewrite:
        block = parse_header(data)
        rule, settings = select_rule(cfg.policy, env)
        visible = tuple(visible_recipients(block))
        verdict = decide_with(rule, settings, env, visible)
        rewritten, hidden = rewrite_for(data, block, env, settings, verdict)
        if mode == "rewrite":
            sends = [(env.rcpt_tos, rewritten)]
            how = f"rewritten ({hidden} addresses hidden)"
        else:
            verdict = replace(verdict, action=Action.SPLIT, hidden=hidden)
            plan = split_for(block, visible, env, settings, verdict)
            spec = plan.render_json()
            sends = [(c.rcpts, render(data, spec, c.to, block=block)) for c in plan.copies]
            how = f"split into {len(sends)} copies ({hidden} addresses hidden)"
    accepted: list[str] = []
    refused: dict[str, str] = {}
    error = ""
    upstream = open_upstream(cfg.upstream, hostname=cfg.server.hostname)
    try:
        for rcpts, body in sends:
            try:
                result = await upstream.deliver(
                    env.mail_from, rcpts, body, smtputf8=env.smtputf8, eightbit=not body.isascii()
                )
            except UpstreamError as exc:
                error = exc.kind + (f" ({exc.reply.code})" if exc.reply is not None else "")
                refused.update((r, exc.kind) for r in rcpts)
                continue
            accepted.extend(result.accepted)
            for r in rcpts:
                if r not in result.accepted:
                    rep = result.refused.get(r, result.reply)
                    refused[r] = str(rep.code)
    finally:
        await upstream.close()
    if not accepted:
        q.audit("release", e.id, "failed", error=error or ",".join(sorted(set(refused.values()))), **ctx)
        if error:
            raise _fail(
                f"release of {e.id} failed: upstream {error}; the entry is kept "
                f"(fix: check upstream.url = {cfg.upstream.url!r} and retry)",
                EX_FAILED,
            )
        raise _fail(
            f"release of {e.id} failed: the upstream refused every recipient "
            f"({','.join(sorted(set(refused.values())))}); "
            "the entry is kept (fix: see the upstream's log, then retry or delete it)",
            EX_FAILED,
        )
    if refused:
        left = tuple(r for r in env.rcpt_tos if r in refused)
        codes = tuple(sorted(set(refused.values())))
        # Audit first: the accepted recipients have it now, whatever happens next.
        q.audit("release", e.id, "partial", accepted=len(accepted), refused=len(left), **ctx)
        q.narrow(e.id, left, f"released to {len(accepted)}; refused {','.join(codes)}")
        return Released("partial", len(accepted), len(left), len(env.rcpt_tos), how, codes)
    q.audit("release", e.id, "released", accepted=len(accepted), **ctx)
    q.delete(e.id)
    return Released("released", len(accepted), 0, len(env.rcpt_tos), how)


def cmd_delete(cfg: Config, entry_id: str, *, out: TextIO = sys.stdout) -> int:
    delete_now(cfg, entry_id)
    print(f"{entry_id}: deleted", file=out)
    return EX_OK


def delete_now(cfg: Config, entry_id: str, *, who: str | None = None, via: str | None = None) -> None:
    """Remove one entry without delivering it, under the entry lock, audited (CLI and console)."""
    q = _store(cfg)
    e = _entry(q, entry_id)
    extra = {"via": via} if via else {}
    with _locked(q, e.id):
        q.delete(e.id)
        q.audit("delete", e.id, "deleted", who=who, **extra)


def purge_age(older_than: str) -> float:
    """`--older-than` in seconds; a bare number is refused (30 meant seconds once, and emptied a store)."""
    try:
        return parse_duration(older_than)
    except ValueError as exc:
        raise _fail(f"--older-than: {exc} (fix: e.g. --older-than 30d)") from None


def cmd_purge(
    cfg: Config,
    older_than: str,
    *,
    dry_run: bool = False,
    confirm: Callable[[str], bool] | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Remove what was held longer than `older_than`; list it first.

    `dry_run` lists and stops. `confirm` (the CLI passes a terminal prompt
    unless --yes) sees the summary and may decline: held mail is the only
    copy of a message, so a purge is never a surprise.
    """
    seconds = purge_age(older_than)
    q = _store(cfg)
    if not q.path.is_dir():
        print(f"nothing to purge: {q.path} does not exist", file=out)
        return EX_OK
    plan = q.purge_plan(seconds)
    counts = {"entry": 0, "orphan": 0, "temp": 0}
    for item, kind in plan:
        counts[kind] += 1
        print(_purge_line(q, item, kind), file=out)
    what = (
        f"{counts['entry']} entries older than {older_than}, "
        f"{counts['orphan']} orphan messages, {counts['temp']} temp files"
    )
    if dry_run:
        print(f"would purge {what} (--dry-run: nothing removed)", file=out)
        return EX_OK
    if not plan:
        print(f"nothing to purge in {q.path}: {what}", file=out)
        return EX_OK
    if confirm is not None and not confirm(f"purge {what} from {q.path} for good?"):
        print("nothing purged", file=out)
        return EX_FAILED
    for item, kind in q.purge(plan):
        q.audit("purge", item, "removed", kind=kind, older_than=older_than)
    print(f"purged {what}", file=out)
    return EX_OK


def purge_now(
    cfg: Config, older_than: str, *, who: str | None = None, via: str | None = None
) -> dict[str, int]:
    """Remove entries held longer than `older_than` ("30d"), each removal audited."""
    seconds = purge_age(older_than)
    q = _store(cfg)
    counts = {"entry": 0, "orphan": 0, "temp": 0}
    if not q.path.is_dir():
        return counts
    extra = {"via": via} if via else {}
    for item, kind in q.purge(q.purge_plan(seconds)):
        counts[kind] += 1
        q.audit("purge", item, "removed", who=who, kind=kind, older_than=older_than, **extra)
    return counts


def _purge_line(q: Quarantine, item: str, kind: str) -> str:
    if kind != "entry":
        why = "an interrupted write" if kind == "temp" else "orphan message, never answered 250"
        return f"{item:<30} ({why})"
    try:
        s = summary(q, q.get(item))
    except (OSError, ValueError):
        return f"{item:<30} (unreadable entry)"
    return f"{item:<30} {s['received'][:19]:<19} {s['mail_from'] or '<>'} / {s['subject'][:60]}"
