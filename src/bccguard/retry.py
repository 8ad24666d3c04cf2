"""Delivers what the spool holds: at start-up at once, then as each entry falls due.

One entry is delivered at a time per tick, in order, so that a relay killed
mid-way repeats at most the one copy whose 250 it had not yet recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from bccguard.policy.dsn import Failure, build_dsn
from bccguard.upstream import UpstreamError

if TYPE_CHECKING:
    from bccguard.relay import Runtime
    from bccguard.store.spool import SpoolEntry


class Retrier:
    def __init__(self, runtime_ref: object, *, tick: float = 1.0) -> None:
        self._ref = runtime_ref
        self.tick = tick
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New work was spooled: look now rather than at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the spool moving whatever one entry does
                self.rt.log.error("spool_runner_failed", exc_info=exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick)
            self._wake.clear()

    @property
    def rt(self) -> Runtime:
        return self._ref()  # type: ignore[operator, no-any-return]

    async def run_once(self, *, force: bool = False) -> int:
        """Attempt every due entry once; returns how many were attempted."""
        rt = self.rt
        entries = await asyncio.to_thread(rt.spool.entries)
        now = time.time()
        n = 0
        for entry in entries:
            if not force and entry.next_attempt > now:
                continue
            n += 1
            await self._attempt(entry)
        return n

    async def _attempt(self, entry: SpoolEntry) -> None:
        rt = self.rt
        spool = rt.spool
        message = await asyncio.to_thread(spool.message, entry.id)
        try:
            result = await rt.upstream.deliver(
                entry.mail_from,
                entry.rcpt_tos,
                message,
                smtputf8=entry.smtputf8,
                eightbit=not message.isascii(),
            )
        except UpstreamError as exc:
            rt.metrics.upstream_failure(exc.kind)
            if exc.kind == "5xx" and exc.reply is not None:
                await self._fail(entry, message, list(entry.rcpt_tos), f"{exc.reply.code} {exc.reply.text}")
                return
            await self._defer(entry, message, f"upstream {exc.kind}")
            return
        rt.metrics.upstream_ok()
        perm = [r for r, rep in result.refused.items() if rep.is_permanent]
        temp = tuple(r for r, rep in result.refused.items() if not rep.is_permanent)
        if perm:
            first = result.refused[perm[0]]
            await self._fail(entry, message, perm, f"{first.code} {first.text}", keep=temp)
        if temp:
            if not perm:
                await asyncio.to_thread(spool.narrow, entry.id, temp, "partial")
            await self._defer(entry, message, "4xx")
        elif not perm:
            await asyncio.to_thread(spool.done, entry.id)
            rt.log.info("spool_delivered", spool_id=entry.id, kind=entry.kind, rcpts=len(entry.rcpt_tos))

    async def _defer(self, entry: SpoolEntry, message: bytes, error: str) -> None:
        spool = self.rt.spool
        if spool.expired(entry):
            await self._fail(
                entry, message, list(entry.rcpt_tos), f"451 4.4.7 expired after retries: {error}"
            )
            return
        updated = await asyncio.to_thread(spool.reschedule, entry.id, error)
        self.rt.log.info("spool_deferred", spool_id=entry.id, attempts=updated.attempts, error=error)

    async def _fail(
        self,
        entry: SpoolEntry,
        message: bytes,
        rcpts: list[str],
        diagnostic: str,
        *,
        keep: tuple[str, ...] = (),
    ) -> None:
        """Give up on `rcpts`: a DSN to the sender (never for a DSN or null sender)."""
        rt = self.rt
        if entry.mail_from and entry.kind != "dsn":
            status = "4.4.7" if diagnostic.startswith("451 4.4.7") else "5.0.0"
            parts = diagnostic.split()
            if len(parts) > 1 and parts[1][:1] in "45" and parts[1].count(".") == 2:
                status = parts[1]
            dsn = build_dsn(
                message,
                sender=entry.mail_from,
                reporting_mta=rt.config.server.hostname,
                failures=[Failure(r, status, diagnostic) for r in rcpts],
                explanation="Your message could not be delivered to the recipients below.",
            )
            await asyncio.to_thread(rt.spool.put, dsn, "", (entry.mail_from,), kind="dsn", origin=entry.id)
        if keep:
            await asyncio.to_thread(rt.spool.narrow, entry.id, keep, diagnostic[:200])
        else:
            await asyncio.to_thread(rt.spool.done, entry.id)
        rt.log.warning("spool_failed", spool_id=entry.id, kind=entry.kind, rcpts=len(rcpts))
