"""From verdict to SMTP reply, keeping the promise: 250 means upstream has it or disk has it.

`Relay.process` is called once per message with the bytes the client sent.
It asks the pure policy core what to do, does it through the upstream, the
quarantine or the spool, counts and logs it once, and returns the one reply
line the client gets. Every branch ends in exactly one of:

- 250 after the upstream accepted every recipient, or accepted some and the
  rest sit fsync'ed in the spool (4xx refusals, retried) or as a DSN there
  (5xx refusals, reported to the sender);
- 250 after the quarantine entry is on disk;
- 451 4.x.x when anything upstream or local failed temporarily (client
  retries): 451 4.3.0 when a store could not be written, 451 4.4.x when the
  upstream refused the session, broke the protocol or missed the deadline;
- the upstream's own 5xx to MAIL, RCPT or DATA (never to its greeting or
  EHLO), or our 550 5.7.1 for a policy reject.

Every reply carrying text bccguard did not write (the upstream's, a rule's
reason) leaves through `reply_line`, the one place that makes it valid RFC
5321 text.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bccguard.config import Config
from bccguard.notify import Notifier
from bccguard.ops.logs import domain_of, redact
from bccguard.ops.metrics import Metrics
from bccguard.policy.dlp.verdict import summary as dlp_log_fields
from bccguard.policy.dsn import Failure, build_dsn
from bccguard.policy.engine import Outcome, evaluate
from bccguard.policy.model import Action, Envelope
from bccguard.scan import scan
from bccguard.smtp.auth import Credentials
from bccguard.smtp.peers import client_ip
from bccguard.store.quarantine import Quarantine
from bccguard.store.spool import Spool
from bccguard.upstream import DeliveryResult, Reply, Upstream, UpstreamError

TEMPFAIL = {
    "connect": "451 4.4.1 Upstream mail server unreachable, try again later",
    # RFC 3463 X.4.1: the remote system was "busy, or otherwise unable to take a call".
    "session": "451 4.4.1 Upstream mail server refused the session, try again later",
    "timeout": "451 4.4.2 Upstream mail server timed out, try again later",
    "tls": "451 4.4.1 Upstream TLS negotiation failed, try again later",
    "protocol": "451 4.4.2 Upstream mail server connection broken, try again later",
    "4xx": "451 4.4.0 Upstream mail server deferred the message, try again later",
}
BIG_HEADER = 64 * 1024
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
DISK_ERROR = "451 4.3.0 Could not store the message, try again later"


# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
MAX_REPLY = 510
_NOT_TEXT = re.compile(r"[^\t\x20-\x7e]")  # RFC 5321 4.2 textstring: HT and printable ASCII
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?=\s|$)")


def reply_line(code: int, text: str) -> str:
    """The one door for reply text bccguard did not write itself: valid RFC 5321, no address.

    Upstream texts (and rule reasons from the config) may quote addresses,
    carry 8-bit bytes, several lines, or an enhanced code of another class
    ("550 4.1.1"); the client must get none of that. The result is one line
    of printable ASCII, at most 512 octets with the CRLF, whose enhanced
    status code (RFC 3463/2034) has the basic code's class.
    """
    if not (200 <= code <= 599 and code // 10 % 10 <= 5):
        raise ValueError(f"{code} is not an SMTP reply code")
    cls = str(code // 100)
    text = _NOT_TEXT.sub("?", redact(text))
    m = _ENHANCED.match(text)
    if m is None:
        text = f"{cls}.0.0 {text}"
    elif m.group(1) != cls:
        text = f"{cls}.0.0 {text[m.end() :].lstrip()}"
    return f"{code} {text}".rstrip()[:MAX_REPLY]


class Handoff(Protocol):
    """Where a decided message goes when the caller, not the upstream, delivers it.

    The milter edge (milter/session.py) passes one to `Relay.process`: the
    MTA keeps the message, so "forward" becomes header edits handed back to
    it, and with `[milter] quarantine = "mta"` a quarantine verdict goes to
    the MTA's hold queue. Reject, split and bccguard's own quarantine run
    exactly as for the SMTP edge: one decision path for both edges.
    """

    async def forward(
        self, outcome: Outcome, env: Envelope, content: bytes, session_id: str
    ) -> tuple[str, dict[str, Any]]: ...

    async def hold(
        self, outcome: Outcome, env: Envelope, session_id: str
    ) -> tuple[str, dict[str, Any]] | None:
        """A reply when the MTA holds the message itself; None: bccguard's quarantine."""
        ...


@dataclass
class Runtime:
    """One immutable-by-convention snapshot: config and the objects built from it.

    SIGHUP builds a new one beside the old and swaps the reference; sessions
    already open keep reading the one they started with via `runtime_ref`.
    """

    config: Config
    upstream: Upstream
    quarantine: Quarantine
    spool: Spool
    metrics: Metrics
    log: Any
    notifier: Notifier = field(default_factory=Notifier)  # the app passes one across reloads
    wake: Callable[[], None] = lambda: None  # tell the spool runner new work is due now
    # Inbound STARTTLS and AUTH (smtp/tls.py, smtp/auth.py): None when not configured.
    tls_context: ssl.SSLContext | None = None
    credentials: Credentials | None = None
    relay: Relay = field(init=False)
    _ids: itertools.count[int] = field(default_factory=itertools.count, init=False)

    def __post_init__(self) -> None:
        self.relay = Relay(self)
        self._prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"

    def new_session_id(self) -> str:
        return f"{self._prefix}-{next(self._ids):x}"

    def client_ip(self, session: Any) -> str:
        """The real client: the PROXY protocol source when one was received."""
        return client_ip(session)


class Relay:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._missing_warned: tuple[str, ...] = ()

    async def process(
        self,
        *,
        mail_from: str,
        rcpt_tos: tuple[str, ...],
        content: bytes,
        smtputf8: bool,
        auth_user: str | None,
        session_id: str,
        client: str,
        started: float,
        handoff: Handoff | None = None,
    ) -> str:
        rt = self.rt
        env = Envelope(mail_from=mail_from, rcpt_tos=rcpt_tos, smtputf8=smtputf8, auth_user=auth_user)
        log_fields: dict[str, Any] = {
            "session_id": session_id,
            "client": client,
            "size": len(content),
            "rcpts": len(rcpt_tos),
            "sender_domain": domain_of(mail_from) if mail_from else "",
            "rcpt_domains": _top_domains(rcpt_tos),
        }
        action = "tempfail"
        rule = "default"
        outcome: Outcome | None = None
        inspect_s = 0.0
        try:
            problem = self._header_problem(content)
            if problem is not None:
                reply = problem
                action = "reject"
            else:
                t0 = time.perf_counter()
                findings = await scan(content, env, rt.config)  # customer data ([dlp]); None when off
                if content.find(b"\r\n\r\n", 0, BIG_HEADER) < 0 and len(content) > BIG_HEADER:
                    # A header block this large takes tens of ms or more to parse:
                    # in a thread, the other sessions keep being served meanwhile.
                    outcome = await asyncio.to_thread(evaluate, content, env, rt.config.policy, findings)
                else:
                    outcome = evaluate(content, env, rt.config.policy, findings)
                inspect_s = time.perf_counter() - t0
                v = outcome.verdict
                if v.dlp is not None:
                    log_fields["dlp"] = dlp_log_fields(v.dlp)
                    rt.metrics.dlp(v.dlp, action=v.action.value)
                rule = v.rule
                action = v.action.value
                log_fields.update(
                    exposure=v.exposure,
                    visible=v.visible,
                    visible_external=len(v.visible_external),
                    visible_consumer=v.visible_consumer,
                    hidden=v.hidden,
                )
                if v.would is not None:
                    log_fields["would"] = v.would.value
                if v.signed:
                    log_fields["dkim_signed"] = True
                reply, upstream_fields = await self._act(outcome, env, content, session_id, handoff)
                log_fields.update(upstream_fields)
                try:
                    await rt.notifier.after(rt, outcome, env, reply, session_id)
                except Exception as exc:  # the reply is owed as it is; a notice never changes it
                    rt.log.error("notice_failed", session_id=session_id, exc_info=exc)
                if reply[0] == "4":
                    action = "tempfail"
        except Exception as exc:  # the promise: never a crash, never a 250 by accident
            rt.log.error("message_failed", session_id=session_id, exc_info=exc)
            reply = INTERNAL_ERROR
            action = "tempfail"
        verdict = outcome.verdict if outcome is not None else None
        rt.metrics.message(
            action=action,
            rule=rule,
            exposure=bool(verdict and verdict.exposure),
            hidden=verdict.hidden if verdict and action in ("rewrite", "split") else 0,
            visible=verdict.visible if verdict else 0,
            visible_external=len(verdict.visible_external) if verdict else 0,
            envelope_rcpts=len(rcpt_tos),
            size=len(content),
            inspect_seconds=inspect_s,
        )
        if verdict is not None and verdict.signed:
            rt.metrics.signed_message(action)
        rt.log.info(
            "message_processed",
            action=action,
            rule=rule,
            reply_code=int(reply[:3]),
            inspect_ms=round(inspect_s * 1000, 3),
            total_ms=round((time.perf_counter() - started) * 1000, 3),
            **log_fields,
        )
        return reply

    def _header_problem(self, content: bytes) -> str | None:
        limit = self.rt.config.server.max_header_size
        if len(content) <= limit:
            return None
        if content.find(b"\r\n\r\n", 0, limit + 4) < 0 and not content.startswith(b"\r\n"):
            return "552 5.3.4 Message header block too large"
        return None

    async def _act(
        self, outcome: Outcome, env: Envelope, content: bytes, session_id: str, handoff: Handoff | None = None
    ) -> tuple[str, dict[str, Any]]:
        v = outcome.verdict
        rt = self.rt
        if v.action is Action.REJECT:
            return reply_line(550, f"5.7.1 {v.reason} (bccguard rule {v.rule})"), {}
        if v.action is Action.QUARANTINE and handoff is not None:
            held = await handoff.hold(outcome, env, session_id)
            if held is not None:
                return held
        if v.action is Action.QUARANTINE:
            try:
                entry_id = await asyncio.to_thread(
                    rt.quarantine.put, outcome.message, env, v, session_id=session_id
                )
            except OSError as exc:
                self._store_failed("quarantine", exc, session_id)
                return DISK_ERROR, {}
            rt.metrics.quarantine_set(*await asyncio.to_thread(rt.quarantine.depth))
            return (
                reply_line(250, f"2.6.0 Held for review as {entry_id}: {v.reason}"),
                {"quarantine_id": entry_id},
            )
        if v.action is Action.SPLIT:
            return await self._split(outcome, env, content, session_id)
        if handoff is not None:
            return await handoff.forward(outcome, env, content, session_id)
        return await self.forward(outcome.message, env, session_id)

    async def _split(
        self, outcome: Outcome, env: Envelope, content: bytes, session_id: str
    ) -> tuple[str, dict[str, Any]]:
        """Spool first: every copy is on disk before the client hears 250.

        Several upstream transactions cannot be one atomic answer, so the
        client's 250 means "bccguard holds every copy"; the spool runner
        then delivers them in order and reports failures by DSN.
        """
        rt = self.rt
        plan = outcome.split
        if plan is None:  # evaluate() always plans a split; a bug, not the client's fault
            raise RuntimeError("split verdict without a split plan")
        try:
            entry_id = await asyncio.to_thread(
                rt.spool.put_split, content, env.mail_from, plan.copies, plan.render_json(),
                smtputf8=env.smtputf8, origin=session_id,
            )  # fmt: skip
        except OSError as exc:
            self._store_failed("spool", exc, session_id)
            return DISK_ERROR, {}
        n = len(plan.copies)
        rt.metrics.split_copy("created", n)
        rt.wake()
        return f"250 2.0.0 Ok: split into {n} copies", {"spool_id": entry_id, "copies": n}

    async def forward(self, message: bytes, env: Envelope, session_id: str) -> tuple[str, dict[str, Any]]:
        """Deliver `message` to every envelope recipient; the reply tells only the truth."""
        rt = self.rt
        t0 = time.perf_counter()
        try:
            result = await rt.upstream.deliver(
                env.mail_from,
                env.rcpt_tos,
                message,
                smtputf8=env.smtputf8,
                eightbit=not message.isascii(),
            )
        except UpstreamError as exc:
            return self._upstream_failed(exc, session_id, t0)
        rt.metrics.upstream_delivery(result.elapsed)
        rt.metrics.upstream_ok()
        fields = {
            "upstream_code": result.reply.code,
            "upstream_ms": _ms(t0),
            "accepted": len(result.accepted),
            "refused": len(result.refused),
        }
        if not result.accepted:
            if result.reply.is_permanent:
                rt.metrics.upstream_failure("5xx")
                return reply_line(result.reply.code, result.reply.text), fields
            rt.metrics.upstream_failure("4xx")
            return TEMPFAIL["4xx"], fields
        if result.refused:
            return await self._partial(message, env, result, session_id, fields)
        return reply_line(250, _ok_text(result.reply)), fields

    def _upstream_failed(self, exc: UpstreamError, session_id: str, t0: float) -> tuple[str, dict[str, Any]]:
        """The reply for a delivery that failed as a whole.

        Only a refusal of this message's MAIL or DATA ("5xx") is passed on
        as permanent; a refused session, a broken protocol or a missed
        deadline is the relay's or upstream's trouble, not the message's.
        """
        rt = self.rt
        fields: dict[str, Any] = {"upstream_error": exc.kind, "upstream_ms": _ms(t0)}
        if exc.reply is not None:
            fields["upstream_code"] = exc.reply.code
        rt.metrics.upstream_failure(exc.kind)
        if exc.kind == "storage":  # the Maildir outbox: a store, not an upstream
            rt.log.error("outbox_write_failed", session_id=session_id, path=exc.path, errno=exc.errno,
                         error=str(exc))  # fmt: skip
            return DISK_ERROR, fields
        if exc.kind == "capability":
            self.check_capabilities()
        if exc.kind in ("5xx", "capability") and exc.reply is not None and exc.reply.code >= 400:
            return reply_line(exc.reply.code, exc.reply.text), fields
        return TEMPFAIL.get(exc.kind, TEMPFAIL["protocol"]), fields

    def _store_failed(self, store: str, exc: OSError, session_id: str) -> None:
        """A write bccguard's 250 would have depended on failed: count it, name path and errno."""
        rt = self.rt
        rt.metrics.store_write_failure(store)
        rt.log.error(
            f"{store}_write_failed",
            session_id=session_id,
            path=str(exc.filename or ""),
            errno=errno.errorcode.get(exc.errno or 0, ""),
            error=exc.strerror or type(exc).__name__,
        )

    async def probe(self) -> None:
        """Check the upstream (when traffic has not shown it alive): feeds /readyz and warnings."""
        rt = self.rt
        try:
            await asyncio.wait_for(rt.upstream.probe(), rt.config.upstream.timeout)
        except UpstreamError as exc:
            rt.metrics.upstream_failure_seen(exc.kind)
            extra = {"path": exc.path, "errno": exc.errno} if exc.kind == "storage" else {}
            rt.log.warning("upstream_probe_failed", error=str(exc), kind=exc.kind, **extra)
            return
        except Exception as exc:  # any failure means "not ready"; the reason is logged
            if isinstance(exc, TimeoutError):
                rt.metrics.upstream_failure_seen("timeout")
            rt.log.warning("upstream_probe_failed", error=type(exc).__name__, kind="")
            return
        rt.metrics.upstream_ok()
        self.check_capabilities()

    def check_capabilities(self) -> None:
        """Warn (log and /readyz) when the upstream lacks what bccguard advertises to clients.

        Once per change, not per probe: the first probe runs at start-up, so a
        mismatch shows there; a reload builds a new Relay and warns again.
        """
        rt = self.rt
        missing = rt.upstream.missing_capabilities(rt.config.server.max_message_size)
        if missing is None:
            return
        rt.metrics.upstream_capabilities(missing)
        if missing and missing != self._missing_warned:
            rt.log.warning(
                "upstream_capability_missing",
                missing=list(missing),
                note="bccguard advertises these to its clients; mail needing them is refused "
                "(8-bit: 451 4.6.3, UTF-8 addresses: 550 5.6.7, size: 552 5.3.4)",
            )
        self._missing_warned = missing

    async def _partial(
        self,
        message: bytes,
        env: Envelope,
        result: DeliveryResult,
        session_id: str,
        fields: dict[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """Some recipients accepted: 250 is owed, so the rest must go to disk first.

        Temporarily refused recipients get a spooled copy that is retried;
        permanently refused ones get a DSN to the sender (none for a null
        sender: a bounce must not bounce).
        """
        rt = self.rt
        temp = tuple(r for r, rep in result.refused.items() if not rep.is_permanent)
        perm = [(r, rep) for r, rep in result.refused.items() if rep.is_permanent]
        fields.update(deferred=len(temp), bounced=len(perm))
        retry_id = ""
        try:
            if temp:
                first = result.refused[temp[0]]
                retry_id = await asyncio.to_thread(
                    rt.spool.put,
                    message,
                    env.mail_from,
                    temp,
                    kind="retry",
                    smtputf8=env.smtputf8,
                    origin=session_id,
                    last_error=f"{first.code} {redact(first.text)}",
                    delay=rt.config.spool.retry_schedule[0],
                )
            if perm and env.mail_from:
                dsn = build_dsn(
                    message,
                    sender=env.mail_from,
                    reporting_mta=rt.config.server.hostname,
                    failures=[Failure(r, rep.enhanced(), f"{rep.code} {rep.text}") for r, rep in perm],
                    explanation="Your message could not be delivered to the recipients below.",
                )
                await asyncio.to_thread(
                    rt.spool.put, dsn, "", (env.mail_from,), kind="dsn", origin=session_id
                )
        except OSError as exc:
            # A 250 now would lose mail: the deferred recipients would never
            # get it, or the sender never learn of the refusal. 451 makes the
            # client send the whole message again: a duplicate for those the
            # upstream took, never a loss. The retry copy already written
            # goes, so the resend is the only copy (best effort: the disk is failing).
            self._store_failed("spool", exc, session_id)
            if retry_id:
                with contextlib.suppress(OSError, ValueError):
                    await asyncio.to_thread(rt.spool.done, retry_id)
            return DISK_ERROR, fields
        text = (
            f"2.0.0 Ok: accepted for {len(result.accepted)} of {len(env.rcpt_tos)} recipients; "
            f"{len(temp)} deferred and retried, {len(perm)} refused (the sender gets a report)"
        )
        return f"250 {text}", fields


def _ok_text(reply: Reply) -> str:
    text = reply.text.splitlines()[0] if reply.text else ""
    if not re.match(r"2\.\d{1,3}\.\d{1,3}\b", text):
        text = f"2.0.0 {text}".rstrip()
    return text


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _top_domains(rcpts: tuple[str, ...], n: int = 5) -> dict[str, int]:
    return dict(Counter(domain_of(r) for r in rcpts).most_common(n))

