"""Delivers what the spool holds: at start-up at once, then as each copy falls due.

Entries are taken one at a time and their copies in order, one upstream
transaction each. Every copy the upstream takes is recorded before the
next copy goes: one line appended to the entry's journal (store/spool.py),
so a relay killed mid-way repeats at most the one copy whose 250 it had
not yet recorded. What changes a copy's retry state (a deferral, a
failure) is written once at the end of the entry's pass, in one rewrite
of the entry: a crash before it loses nothing but the attempt count, and
the copies are simply tried again. A copy the upstream took only in part
is rewritten at once, since its accepted recipients must not go again.

Failures, per copy: a 4xx or a broken connection reschedules it along
`[spool] retry_schedule`; once the entry is older than `max_age`, or on a
5xx, the sender gets a DSN for those recipients only (never for the null
sender, a DSN or a notice). When the upstream as a whole is failing
(connect, timeout, TLS, protocol, a 4xx to MAIL/DATA), the other due
copies of the entry are rescheduled without being tried, so a dead upstream
costs one connection attempt per entry per retry, not one per copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from bccguard.ops.logs import redact
from bccguard.policy.dsn import Failure, build_dsn
from bccguard.policy.headers import parse_header
from bccguard.policy.split import render
from bccguard.store.spool import Copy, SpoolEntry, runner_lock
from bccguard.upstream import Reply, UpstreamError

if TYPE_CHECKING:
    from pathlib import Path

    from bccguard.relay import Runtime

class Retrier:
    def __init__(self, runtime_ref: Callable[[], Runtime], *, tick: float = 1.0) -> None:
        self._ref = runtime_ref
        self.tick = tick
        self._wake = asyncio.Event()
        self._pass = asyncio.Lock()
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._standby_logged = False
        self._fresh = True

    @property
    def rt(self) -> Runtime:
        return self._ref()

    def wake(self) -> None:
        """New work was spooled: look now rather than at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                if self._hold_lock():
                    # A fresh runner (start-up, restart after a crash, takeover)
                    # retries everything at once: what a crash interrupted is due.
                    fresh = self._fresh
                    self._fresh = False
                    await self.run_once(force=fresh)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the spool moving whatever one entry does
                self.rt.log.error("spool_runner_failed", exc_info=exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick)
            self._wake.clear()

    def _hold_lock(self) -> bool:
        path = self.rt.spool.path
        if self._lock_fd is not None and self._lock_path == path:
            return True
        self.release()
        fd = runner_lock(path)
        if fd is None:
            if not self._standby_logged:
                self.rt.log.info("spool_runner_standby", reason="another process delivers this spool")
                self._standby_logged = True
            return False
        self._lock_fd, self._lock_path, self._fresh = fd, path, True
        return True

    def release(self) -> None:
        """Let another process deliver the spool (called at stop; a crash does it too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = self._lock_path = None

    async def run_once(self, *, force: bool = False) -> int:
        """Attempt every due entry once (every entry when `force`); returns how many."""
        async with self._pass:
            rt = self.rt
            entries = await asyncio.to_thread(rt.spool.entries)
            pending = {e.id: len(e.copies) for e in entries}
            now = time.time()
            n = 0
            for entry in entries:
                if not force and entry.next_attempt > now:
                    continue
                n += 1
                try:
                    pending[entry.id] = await self._attempt(entry, force=force)
                except OSError as exc:
                    # The spool itself cannot be written (a DSN, a journal line, a
                    # retry state): the entry stays as it is on disk and is tried
                    # again, nothing is lost; the other entries still get their turn.
                    self._store_failed(entry, exc)
            rt.metrics.spool_set(sum(1 for v in pending.values() if v), sum(pending.values()))
            return n

    def _store_failed(self, entry: SpoolEntry, exc: OSError) -> None:
        """Counted and logged as the relay's own spool writes are (Relay._store_failed)."""
        rt = self.rt
        rt.metrics.store_write_failure("spool")
        rt.log.error(
            "spool_write_failed",
            spool_id=entry.id,
            path=str(exc.filename or rt.spool.path),
            errno=errno.errorcode.get(exc.errno or 0, ""),
            error=exc.strerror or type(exc).__name__,
        )

    async def _attempt(self, entry: SpoolEntry, *, force: bool) -> int:
        """Try the entry's due copies in order; returns how many copies are left.

        A copy that fails for good is marked failed, and all of the pass's
        failures then go into one DSN before they are dropped: a 300-copy
        split with 40 bad addresses gives the sender one report, not 40. A
        crash before the report is spooled leaves the copies pending (tried
        again, refused again); after it, repeats the report rather than
        losing it.
        """
        spool = self.rt.spool
        message = await asyncio.to_thread(spool.message, entry.id)
        block = parse_header(message) if entry.render is not None else None
        copies = list(entry.copies)
        down: str | None = None  # the upstream as a whole failed during this pass
        dirty = False
        untried = 0
        k = 0
        while k < len(copies):
            c = copies[k]
            if c.failed or (not force and c.next_attempt > time.time()):
                k += 1
                continue
            if down is None:
                data = render(message, entry.render, c.to, block=block)
                new, down = await self._deliver(entry, c, data)
                copies[k : k + 1] = new
                left = {r for x in new for r in x.rcpts}
                if not new:
                    # The one write that closes this copy's duplicate window (the
                    # last copy's is the entry's removal, below).
                    if copies:
                        await asyncio.to_thread(spool.delivered, entry.id, c)
                elif any(r not in left for r in c.rcpts):  # taken in part: record it now
                    copies[:] = await asyncio.to_thread(spool.update, entry.id, copies)
                    dirty = False
                else:  # nothing delivered: the retry state can wait for the pass's one write
                    dirty = True
            else:  # not tried: rescheduled with the rest, one write and one log line at the end
                new = self._defer(entry, c, down, quiet=True)
                copies[k : k + 1] = new
                dirty = True
                untried += 1
            k += len(new)
        if untried:
            self.rt.log.info("spool_deferred_untried", spool_id=entry.id, kind=entry.kind, copies=untried,
                             error=down)  # fmt: skip
        failed = [c for c in copies if c.failed]
        if failed:
            await self._bounce(entry, render(message, entry.render, None, block=block), failed)
            copies = [c for c in copies if not c.failed]
            dirty = True
        if dirty or not copies:
            await asyncio.to_thread(spool.update, entry.id, copies)
        if not copies:
            self.rt.log.info("spool_entry_done", spool_id=entry.id, kind=entry.kind)
        return len(copies)

    async def _deliver(self, entry: SpoolEntry, c: Copy, data: bytes) -> tuple[list[Copy], str | None]:
        """One upstream transaction: what remains of the copy, and an upstream-wide error if any."""
        rt = self.rt
        try:
            result = await rt.upstream.deliver(
                entry.mail_from, c.rcpts, data, smtputf8=entry.smtputf8, eightbit=not data.isascii()
            )
        except UpstreamError as exc:
            rt.metrics.upstream_failure(exc.kind)
            # Only a refusal of this copy's MAIL or DATA is final; a refused
            # session (even a 554 greeting) is retried like any outage.
            if exc.kind == "5xx" and exc.reply is not None and exc.reply.is_permanent:
                return [_failed(c, c.rcpts, exc.reply)], None
            error = f"upstream {exc.kind}" + (f" {exc.reply.code}" if exc.reply is not None else "")
            return self._defer(entry, c, error), error
        rt.metrics.upstream_ok()
        rt.metrics.upstream_delivery(result.elapsed)
        if result.accepted and entry.kind == "split":
            rt.metrics.split_copy("delivered")
        out: list[Copy] = []
        perm = tuple(r for r, rep in result.refused.items() if rep.is_permanent)
        temp = tuple(r for r, rep in result.refused.items() if not rep.is_permanent)
        if perm:
            out.append(_failed(c, perm, result.refused[perm[0]]))
        if temp:
            first = result.refused[temp[0]]
            out += self._defer(entry, replace(c, rcpts=temp), f"{first.code} {redact(first.text, 300)}")
        if result.accepted:
            rt.log.debug(
                "spool_copy_delivered", spool_id=entry.id, kind=entry.kind, rcpts=len(result.accepted)
            )
        return out, None

    def _defer(self, entry: SpoolEntry, c: Copy, error: str, *, quiet: bool = False) -> list[Copy]:
        """Reschedule the copy, or mark it failed when the entry is past `max_age`."""
        rt = self.rt
        if rt.spool.expired(entry):
            return [replace(c, failed=f"4.4.7 451 4.4.7 expired after retries: {error}"[:300])]
        rt.metrics.spool_retry(entry.kind)
        later = rt.spool.deferred(c, error)
        if not quiet:
            rt.log.info(
                "spool_deferred", spool_id=entry.id, kind=entry.kind, attempts=later.attempts, error=error
            )
        return [later]

    async def _bounce(self, entry: SpoolEntry, data: bytes, failed: Sequence[Copy]) -> None:
        """Give up on these copies: one DSN to the sender (never for a DSN, notice or null sender).

        `data` is the message as the shared copy leaves (for a split: the
        rewritten one), so the DSN's header part shows no customer the
        sender did not already report on.
        """
        rt = self.rt
        failures = []
        for c in failed:
            status, _, diagnostic = c.failed.partition(" ")
            failures += [Failure(r, status, diagnostic) for r in c.rcpts]
        if entry.kind == "split":
            rt.metrics.split_copy("failed", len(failed))
        if entry.mail_from and entry.kind not in ("dsn", "notice"):
            dsn = build_dsn(
                data,
                sender=entry.mail_from,
                reporting_mta=rt.config.server.hostname,
                failures=failures,
                explanation="Your message could not be delivered to the recipients below.",
            )
            await asyncio.to_thread(rt.spool.put, dsn, "", (entry.mail_from,), kind="dsn", origin=entry.id)
            self.wake()
        rt.log.warning("spool_failed", spool_id=entry.id, kind=entry.kind, rcpts=len(failures))


def _failed(c: Copy, rcpts: tuple[str, ...], reply: Reply) -> Copy:
    """The copy for `rcpts`, marked as failed for good with the upstream's answer."""
    return replace(c, rcpts=rcpts, failed=f"{reply.enhanced()} {reply.code} {redact(reply.text, 300)}"[:300])
