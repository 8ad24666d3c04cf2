"""Maildir delivery: one file per envelope recipient, durable before we say 250.

For tests and small deployments where no MTA sits behind the relay. It acts
like an MDA: `Return-Path:` and `Delivered-To:` lines, then the message as
received. Each delivery is all-or-nothing: every file is written and fsync'd
in tmp/ first, then renamed into new/, then new/ itself is fsync'd; any
failure removes this delivery's files and reports a temporary error, so the
client retries instead of getting a partial (or lost) delivery.

A write that fails is a local storage failure ("storage", with the path and
errno), not an upstream one: the relay answers `451 4.3.0` "could not
store" and /readyz names the outbox, so the admin looks at the disk, not
at a mail server that is not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from bccguard.upstream import DeliveryResult, Reply, UpstreamError, significant_refusal
from bccguard.upstream.wire import address_ok

REPLY_DELIVERED = Reply(250, "2.0.0 Delivered to maildir")
REPLY_STORAGE = Reply(451, "4.3.0 Local storage failure, try again later")
REPLY_BAD_SENDER = Reply(501, "5.1.7 Bad sender address syntax")
REPLY_BAD_RCPT = Reply(501, "5.1.3 Bad recipient address syntax")

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def _safe_hostname(name: str) -> str:
    """Maildir spec: "/" and ":" in the host part are written as octal escapes."""
    return name.replace("/", "\\057").replace(":", "\\072") or "localhost"


def _newline_of(message: bytes) -> bytes:
    """The message's own line ending, so our added lines match it."""
    i = message.find(b"\n")
    return b"\r\n" if i > 0 and message[i - 1 : i] == b"\r" else b"\n"


def storage_error(what: str, exc: OSError, path: Path) -> UpstreamError:
    """An OSError while writing the outbox, as the UpstreamError the relay reports."""
    code = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or type(exc).__name__
    return UpstreamError(
        "storage", f"{what} ({reason})", REPLY_STORAGE, path=str(exc.filename or path), errno=code
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirUpstream:
    """Upstream that writes into a Maildir (created 0700 if missing, files 0600)."""

    def __init__(self, path: str | os.PathLike[str], *, hostname: str) -> None:
        # Resolved now: the relative path means "relative to where we started".
        self.root = Path(path).absolute()
        self._host = _safe_hostname(hostname)
        self._seq = itertools.count()

    async def deliver(
        self,
        mail_from: str,
        rcpt_tos: Sequence[str],
        message: bytes,
        *,
        smtputf8: bool = False,
        eightbit: bool = False,
    ) -> DeliveryResult:
        """Write one file per recipient; every recipient or none (then 451)."""
        del smtputf8, eightbit  # a file stores any bytes
        start = time.monotonic()
        if not rcpt_tos:
            raise ValueError("deliver() needs at least one recipient")
        if not address_ok(mail_from):
            # These lines become headers: a CR or LF would inject new ones.
            raise UpstreamError("5xx", "sender address has control characters", REPLY_BAD_SENDER)
        refused = {r: REPLY_BAD_RCPT for r in rcpt_tos if not address_ok(r)}
        valid = [r for r in rcpt_tos if r not in refused]
        if not valid:
            reply = significant_refusal(list(refused.values()))
            return DeliveryResult((), refused, reply, time.monotonic() - start)
        try:
            await asyncio.to_thread(self._write_all, mail_from, valid, message)
        except OSError as exc:
            raise storage_error("maildir write failed", exc, self.root) from None
        return DeliveryResult(tuple(valid), refused, REPLY_DELIVERED, time.monotonic() - start)

    async def probe(self) -> None:
        """The Maildir exists (or can be created) and a file can be created in it.

        A real create, not os.access(): root passes every permission check,
        and only a write finds a read-only or out-of-inodes file system.
        """
        try:
            await asyncio.to_thread(self._try_write)
        except OSError as exc:
            raise storage_error("maildir not writable", exc, self.root) from None

    def missing_capabilities(self, max_size: int) -> tuple[str, ...]:
        """A file stores any bytes: nothing bccguard advertises is missing."""
        del max_size
        return ()

    async def close(self) -> None:
        """Nothing held open between deliveries."""

    # ---------------------------------------------------------------- in a thread

    def _ensure_dirs(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            (self.root / sub).mkdir(mode=0o700, exist_ok=True)

    def _try_write(self) -> None:
        """Create and remove a file in tmp/ (never new/: readers list it), check new/ too."""
        self._ensure_dirs()
        probe = self.root / "tmp" / f".probe.{os.getpid()}.{secrets.token_hex(4)}"
        os.close(os.open(probe, _OPEN_FLAGS, 0o600))
        probe.unlink()
        new = self.root / "new"
        if not os.access(new, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "new/ not writable", str(new))

    def _unique_name(self) -> str:
        """time.M<usec>P<pid>Q<seq>R<random>.host, as the Maildir convention asks."""
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        rnd = secrets.token_hex(8)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(self._seq)}R{rnd}.{self._host}"

    def _write_all(self, mail_from: str, rcpts: list[str], message: bytes) -> None:
        self._ensure_dirs()
        tmp_dir, new_dir = self.root / "tmp", self.root / "new"
        nl = _newline_of(message)
        return_path = b"Return-Path: <" + mail_from.encode() + b">" + nl
        staged: list[str] = []
        moved: list[Path] = []
        try:
            for rcpt in rcpts:
                name = self._unique_name()
                fd = os.open(tmp_dir / name, _OPEN_FLAGS, 0o600)
                staged.append(name)
                with os.fdopen(fd, "wb") as f:
                    f.write(return_path)
                    f.write(b"Delivered-To: " + rcpt.encode() + nl)
                    f.write(message)
                    f.flush()
                    os.fsync(f.fileno())
            for name in staged:
                (tmp_dir / name).rename(new_dir / name)
                moved.append(new_dir / name)
            _fsync_dir(new_dir)
        except BaseException:
            for path in [*moved, *(tmp_dir / n for n in staged)]:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
