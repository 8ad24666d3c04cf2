"""The edge-side customer-data scan: one async call before the policy core decides.

    findings = await scan(message, envelope, config)
    outcome = evaluate(message, envelope, config.policy, findings)

Both protocol edges (SMTP here, a milter beside it) call this one function.
It returns None when [dlp] is off for the rule in force or when every
envelope recipient is a colleague or a partner: then nothing is read at all.

Where the work runs, and why:

- A small single-part text message (the everyday case) is scanned inline:
  the body is taken straight from the bytes without a MIME parse, and the
  detectors' cheap pre-checks make a plain letter cost microseconds.
- Anything else (attachments, HTML, large bodies) goes to a process pool,
  one scanner process per relay process. Document parsers are CPU-bound
  Python: in a thread they would hold the GIL and slow every other session;
  in another process they cannot. The scanner has an address-space limit
  (a zip bomb that slips past the decompression budget dies with MemoryError,
  not the relay), an interval timer (the time limit interrupts a parser stuck
  in Python code) and, past a grace period, the relay kills it outright.
  Either way the message gets a verdict: `over_limit`.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import multiprocessing
import quopri
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from bccguard.config import Config, PolicySettings
from bccguard.extract.limits import LimitReached, Limits
from bccguard.extract.walk import extract
from bccguard.policy.classify import rcpt_external_test
from bccguard.policy.decide import select_rule
from bccguard.policy.dlp.detect import detect
from bccguard.policy.dlp.model import Extraction, Findings, Piece
from bccguard.policy.model import Envelope

LIMITS = Limits()
INLINE_MAX = 8 * 1024  # bytes: a message this small with only a text body is scanned on the loop
GRACE = 5.0  # seconds past the time limit (and detection's quarter) before a stuck scanner is killed

_CHARSET = re.compile(rb"""(?i)charset[ \t]*=[ \t]*"?([A-Za-z0-9_.:-]+)""")


def in_scope(envelope: Envelope, settings: PolicySettings) -> bool:
    """[dlp] on for this rule, and at least one envelope recipient outside internal and partner domains."""
    if not settings.dlp.enabled:
        return False
    return any(map(rcpt_external_test(settings), envelope.rcpt_tos))


def scan_now(message: bytes, settings: PolicySettings, limits: Limits = LIMITS) -> Findings:
    """The whole scan in this process and thread: for `bccguard check` and the scanner processes."""
    body = plain_body(message) if len(message) <= INLINE_MAX * 8 else None
    extraction = (
        Extraction(pieces=(Piece("body", body),), scanned_bytes=len(body))
        if body is not None
        else extract(message, limits)
    )
    return detect(extraction, settings)


async def scan(message: bytes, envelope: Envelope, config: Config) -> Findings | None:
    _, settings = select_rule(config.policy, envelope)
    if not in_scope(envelope, settings):
        return None
    if len(message) <= INLINE_MAX:
        body = plain_body(message)
        if body is not None:
            return detect(Extraction(pieces=(Piece("body", body),), scanned_bytes=len(body)), settings)
    return await POOL.run(message, settings, LIMITS)


def plain_body(message: bytes) -> str | None:
    """The body of a single-part text/plain message, decoded; None for anything else.

    No MIME parse and no regex over the message: `bytes.find` on the
    lower-cased header block and a decode of the body, which is what keeps
    DLP's cost on a plain 2 KB letter at a few microseconds.
    """
    end = message.find(b"\r\n\r\n")
    sep = 4
    if end < 0 or (0 <= message.find(b"\n\n") < end):
        end, sep = message.find(b"\n\n"), 2
        if end < 0:
            return None
    head = b"\n" + message[:end].lower()
    body = message[end + sep :]
    charset = "utf-8"
    ctype = _field(head, b"content-type")
    if ctype is not None:
        value, _, params = ctype.partition(b";")
        if value.strip() != b"text/plain":
            return None
        cs = _CHARSET.search(params)
        if cs is not None:
            charset = cs.group(1).decode("ascii")
    cte = _field(head, b"content-transfer-encoding")
    enc = cte.strip() if cte is not None else b"7bit"
    try:
        if enc == b"base64":
            body = binascii.a2b_base64(body)
        elif enc == b"quoted-printable":
            body = quopri.decodestring(body)
        elif enc not in (b"7bit", b"8bit", b"binary"):
            return None
    except (binascii.Error, ValueError):
        return None
    try:
        return body.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return body.decode("latin-1")


def _field(head: bytes, name: bytes) -> bytes | None:
    """The unfolded value of the first `name:` field in a lower-cased header block starting with LF."""
    at = head.find(b"\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 2
    out = []
    while True:
        nl = head.find(b"\n", start)
        out.append(head[start : nl if nl >= 0 else len(head)])
        if nl < 0 or head[nl + 1 : nl + 2] not in (b" ", b"\t"):
            break
        start = nl + 1
    return b" ".join(x.strip() for x in out)


# ------------------------------------------------------------------ the pool


def _scanner_init(memory: int) -> None:
    """Runs once in each scanner process: cap its address space."""
    import resource
    import signal

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the relay decides when scanners stop
    signal.signal(signal.SIGALRM, _on_alarm)


def _on_alarm(signum: int, frame: Any) -> None:
    raise LimitReached("time")


def _scan_job(message: bytes, settings: PolicySettings, limits: Limits) -> Findings:
    """One message in a scanner process; never raises (a verdict is owed either way).

    Extraction runs under an interval timer (a parser stuck in Python code is
    interrupted) and the budget's own deadline; detection then gets the time
    left, at least a quarter of the limit, and stops between chunks with the
    counts so far: a huge customer list is still held for what it holds.
    """
    import signal
    import time

    deadline = time.monotonic() + limits.seconds
    signal.setitimer(signal.ITIMER_REAL, limits.seconds)
    try:
        body = plain_body(message)
        extraction = (
            Extraction(pieces=(Piece("body", body),), scanned_bytes=len(body))
            if body is not None
            else extract(message, limits)
        )
    except LimitReached as exc:
        return Findings(over_limit=(exc.kind,), detectors=settings.dlp.detectors)
    except MemoryError:
        return Findings(over_limit=("memory",), detectors=settings.dlp.detectors)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    stop_at = max(deadline, time.monotonic() + limits.seconds / 4)
    try:
        return detect(extraction, settings, should_stop=lambda: time.monotonic() > stop_at)
    except MemoryError:
        return Findings(over_limit=("memory",), detectors=settings.dlp.detectors)


class ScanPool:
    """A lazily started, self-healing pool of scanner processes (one per relay process by default)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def _get(self, limits: Limits) -> ProcessPoolExecutor:
        if self._executor is None:
            method = "forkserver" if sys.platform == "linux" else "spawn"
            ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(["bccguard.scan"])
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=ctx, initializer=_scanner_init, initargs=(limits.memory,)
            )
        return self._executor

    async def run(self, message: bytes, settings: PolicySettings, limits: Limits) -> Findings:
        loop = asyncio.get_running_loop()
        executor = self._get(limits)
        try:
            fut = loop.run_in_executor(executor, _scan_job, message, settings, limits)
            return await asyncio.wait_for(fut, limits.seconds * 1.25 + GRACE)
        except TimeoutError:
            self._kill()
            kind = "time"
        except (BrokenProcessPool, MemoryError):  # the scanner died: killed by the OS, most likely
            self._kill()
            kind = "memory"
        return Findings(over_limit=(kind,), detectors=settings.dlp.detectors)

    def _kill(self) -> None:
        """Stop a stuck or broken pool; the next scan starts a fresh one."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # ProcessPoolExecutor cannot cancel a running job (3.14 adds terminate_workers).
        for proc in list(getattr(executor, "_processes", {}).values()):
            with contextlib.suppress(OSError, AttributeError):
                proc.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


POOL = ScanPool()
