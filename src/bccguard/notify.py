"""Sender notices, the edge half: when to send one, the rate limit, and the spool.

The text and the "is this automatic mail?" test are pure (policy/notice.py).
Here a notice is decided after the relay has acted, and spooled like any
other copy, so it is durable and retried. It goes from the null sender
(RFC 3834: an automatic message must not provoke another).

The rate limit (`[notify] rate_limit` per sender per hour) is kept in this
process's memory: a restart or a second worker process starts counting
afresh, so a sender may get a few more than the limit; nobody gets a flood.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from bccguard.policy.model import Action, Verdict
from bccguard.policy.notice import build_notice, is_automatic

if TYPE_CHECKING:
    from bccguard.config import Config
    from bccguard.ops.metrics import Metrics
    from bccguard.policy.engine import Outcome
    from bccguard.policy.model import Envelope
    from bccguard.store.spool import Spool


class NoticeRuntime(Protocol):
    """What a notice needs of the config snapshot (relay.Runtime is one). A protocol, not
    relay.Runtime itself: relay.py uses the Notifier, and must not be imported back."""

    config: Config
    metrics: Metrics
    log: Any
    spool: Spool

    def wake(self) -> None: ...  # tell the spool runner new work is due

WINDOW = 3600.0
MAX_TRACKED = 100_000  # senders remembered; past this the oldest are forgotten


class Notifier:
    """One per process, kept across config reloads so the rate limit holds."""

    def __init__(self) -> None:
        self._sent: dict[str, deque[float]] = {}

    def allow(self, sender: str, limit: int, now: float | None = None) -> bool:
        """Count one notice for `sender` if it is under `limit` in the last hour."""
        now = time.monotonic() if now is None else now
        key = sender.lower()
        times = self._sent.get(key)
        if times is None:
            if len(self._sent) >= MAX_TRACKED:
                self._forget(now)
            times = self._sent[key] = deque()
        while times and now - times[0] >= WINDOW:
            times.popleft()
        if len(times) >= limit:
            return False
        times.append(now)
        return True

    def _forget(self, now: float) -> None:
        for key in [k for k, t in self._sent.items() if not t or now - t[-1] >= WINDOW]:
            del self._sent[key]
        while len(self._sent) >= MAX_TRACKED:  # still full: drop the oldest-inserted
            del self._sent[next(iter(self._sent))]

    async def after(
        self, rt: NoticeRuntime, outcome: Outcome, env: Envelope, reply: str, session_id: str
    ) -> None:
        """Spool a notice if this message was changed, held or refused by policy."""
        cfg = rt.config.notify
        v = outcome.verdict
        if not cfg.enabled:
            return
        acted = (v.action in (Action.REWRITE, Action.SPLIT, Action.QUARANTINE) and reply[:1] == "2") or (
            v.action is Action.REJECT and reply.startswith("550 5.7.1")
        )
        if not acted:
            return
        if is_automatic(outcome.block, env.mail_from):
            rt.metrics.notice("suppressed")
            return
        if not self.allow(env.mail_from, cfg.rate_limit):
            rt.metrics.notice("rate_limited")
            rt.log.info("notice_rate_limited", session_id=session_id, rule=v.rule)
            return
        hostname = rt.config.server.hostname
        count = v.hidden if v.action in (Action.REWRITE, Action.SPLIT) else len(v.visible_external)
        notice = build_notice(
            outcome.block,
            action=v.action,
            sender=env.mail_from,
            from_addr=cfg.from_ or f"postmaster@{hostname}",
            hostname=hostname,
            count=count,
            rule=v.rule,
            # held or refused for customer data alone ([dlp]), not for To/Cc: say so
            customer_data=_customer_data(v),
        )
        try:
            await asyncio.to_thread(
                rt.spool.put, notice, "", (env.mail_from,), kind="notice", origin=session_id,
                smtputf8=not env.mail_from.isascii(),
            )  # fmt: skip
        except OSError as exc:  # the message itself is handled; a lost notice is logged, not fatal
            rt.log.error("notice_spool_failed", session_id=session_id, error=exc.strerror)
            return
        rt.metrics.notice("sent")
        rt.wake()


def _customer_data(v: Verdict) -> str:
    if v.dlp is None or v.exposure or v.dlp.action is not v.action:
        return ""
    return "customer data: " + v.dlp.reason.removeprefix("customer data in the message: ")
