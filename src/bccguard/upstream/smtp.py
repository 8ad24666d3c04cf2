"""A small async SMTP client with RFC 2920 pipelining and a bounded connection pool.

Why not aiosmtplib: it sends RCPT one round trip at a time and looks up our
host name on every connection. Here MAIL, every RCPT and DATA go out in one
write, the EHLO name is fixed, and connections are reused.

Correctness rules this module keeps:
- every reply is read (so the connection stays in sync) and checked; a reply
  that is malformed, too long or unexpected is a "protocol" UpstreamError;
- content is sent only when at least one RCPT was accepted and DATA got 354;
- success is reported only after the upstream's 2xx to the final ".";
- a connection whose state is unknown (error, timeout, cancellation) is
  aborted, never pooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import ssl
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from bccguard.config import ConfigError, UpstreamConfig
from bccguard.upstream import (
    DeliveryResult,
    Reply,
    UpstreamError,
    capability_gaps,
    significant_refusal,
)
from bccguard.upstream.wire import Encoded, address_ok, encode_data, needs_smtputf8

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, CRLF included.
# A longer one, 8-bit text, a bare LF or a code outside 2xx-5xx is not SMTP,
# and nothing in it may be taken for success (or reach our client).
MAX_LINE = 512
MAX_REPLY_LINES = 256
_STREAM_LIMIT = 64 * 1024
# Content goes out in slices with a drain after each, so the transport buffer
# never holds another full copy of a big message.
_WRITE_SLICE = 1 << 20
# Content up to this size goes out in one writelines, without a drain.
_SMALL_CONTENT = 64 * 1024
# One read takes whatever the socket has, up to this much.
_READ_SIZE = _STREAM_LIMIT
# QUIT is a courtesy: never let it hold up shutdown.
_QUIT_TIMEOUT = 5.0

# RFC 5321 4.2: Reply-code [ SP / "-" textstring ] CRLF, textstring = HT / printable ASCII.
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])([\t\x20-\x7e]*))?\r\n\Z")
# Inside a pipelined group, a run of single-line successes (2xx) and DATA's
# go-ahead (354) is not parsed line by line: one regex match finds where the
# run ends (each line: such a code, a space, RFC 5321 text, CRLF, at most
# MAX_LINE octets, so _REPLY_LINE would accept it too) and bytes.count tells
# the common codes apart, all in C. Their text is dropped: nothing reads the
# text of a success inside a group. Refusals, 421, multi-line and malformed
# replies end the run and go through the careful parser, which keeps it.
_BRIEF_RUN = re.compile(rb"(?:(?:2[0-5][0-9]|354) [\t\x20-\x7e]{0,%d}+\r\n)+" % (MAX_LINE - 6))
_BRIEF = {f"{code} ".encode(): Reply(code, "") for code in (*range(200, 260), 354)}
REPLY_OK = _BRIEF[b"250 "]
REPLY_GO_AHEAD = _BRIEF[b"354 "]

REPLY_BAD_SENDER = Reply(501, "5.1.7 Bad sender address syntax")
REPLY_BAD_RCPT = Reply(501, "5.1.3 Bad recipient address syntax")
REPLY_NO_SMTPUTF8 = Reply(550, "5.6.7 Upstream does not support SMTPUTF8")
REPLY_TOO_BIG = Reply(552, "5.3.4 Message size exceeds upstream's fixed maximum")
# RFC 6152 3: 8-bit content must not go to a server without 8BITMIME. bccguard
# does not downgrade (that would break DKIM and change what was inspected), so
# the message waits: 4.6.3 "conversion required but not supported", temporary
# because the fault is the relay's configuration, which an admin can fix
# within the client's retry period; a 5xx would bounce mail nothing was wrong with.
REPLY_NO_8BITMIME = Reply(451, "4.6.3 Upstream cannot take 8-bit content, try again later")


class _Stale(Exception):
    """A pooled connection was dead at the first command: nothing was accepted, retry."""


def _transport_error(exc: BaseException, seconds: float, what: str) -> UpstreamError | None:
    """The UpstreamError a transport exception stands for; None if it is none of ours."""
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return UpstreamError("timeout", f"no progress within {seconds:g}s during {what}")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        return UpstreamError("tls", f"TLS failure during {what} ({reason})")
    if isinstance(exc, asyncio.IncompleteReadError):
        return UpstreamError("connect", f"connection closed by upstream during {what}")
    if isinstance(exc, asyncio.LimitOverrunError):
        return UpstreamError("protocol", f"reply line too long during {what}")
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return UpstreamError("connect", f"connection failed during {what} ({reason})")
    return None


@contextlib.asynccontextmanager
async def _step(seconds: float, what: str) -> AsyncIterator[asyncio.Timeout]:
    """One network step under `seconds`, with transport exceptions mapped to UpstreamError."""
    try:
        async with asyncio.timeout(seconds) as limit:
            yield limit
    except UpstreamError:
        raise
    except Exception as exc:
        err = _transport_error(exc, seconds, what)
        if err is None:
            raise
        raise err from None


def parse_reply_line(raw: bytes) -> tuple[int, bool, str]:
    """b"250-SIZE 100\\r\\n" -> (250, more_lines_follow, "SIZE 100"); ValueError if not SMTP."""
    m = _REPLY_LINE.match(raw)
    if m is None:
        raise ValueError("malformed reply line")
    text = (m.group(3) or b"").decode("ascii")
    return int(m.group(1)), m.group(2) == b"-", text


def _brief_replies(buf: bytes, pos: int, end: int, most: int, replies: list[Reply]) -> int:
    """Append the replies of a _BRIEF_RUN match buf[pos:end], at most `most`; where they end.

    All "250" (RCPTs), or all "250" then one "354" (DATA), is told by counting;
    other mixes take a split.
    """
    lines = buf.count(b"\n", pos, end)
    if lines > most:  # the server said more than it was asked: take `most`
        end = pos
        for _ in range(most):
            end = buf.index(b"\n", end) + 1
        lines = most
    ok = buf.startswith(b"250 ", pos) + buf.count(b"\n250 ", pos, end)
    if ok == lines:
        replies += [REPLY_OK] * lines
    elif ok == lines - 1 and buf.startswith(b"354 ", max(pos, buf.rfind(b"\n", pos, end - 1) + 1)):
        replies += [REPLY_OK] * ok
        replies.append(REPLY_GO_AHEAD)
    else:
        replies += [_BRIEF[line[:4]] for line in buf[pos : end - 1].split(b"\n")]
    return end


class Connection:
    """One SMTP session after EHLO (and STARTTLS). Not shared between tasks."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        # Loop time by which the delivery in progress must be done (see
        # SMTPUpstream.deliver); every wait is cut to it. inf between deliveries.
        self.deadline = math.inf
        self.extensions: dict[str, str] = {}
        # True only while the protocol is known to be in sync (safe to pool).
        self.usable = False
        # A mail transaction may be open (MAIL accepted, no final reply): RSET first.
        self.dirty = False
        # The server said 421: it is closing the channel.
        self.closing = False
        self.reused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        # Received, not yet parsed. Reads take whatever the socket has (a
        # pipelined group's replies come in one or two segments) instead of
        # awaiting one line at a time; whatever is left after the replies
        # asked for stays here, and makes the connection unfit for the pool.
        self._buf = b""
        # The lines so far of a multi-line reply still coming in, and their code.
        self._lines: list[str] = []
        self._code = 0

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def pending(self) -> bool:
        """Bytes received beyond the replies read so far: the peer said more than it was asked."""
        return bool(self._buf)

    async def read_reply(self, what: str) -> Reply:
        """Read one complete (possibly multi-line) reply within the timeout."""
        return (await self.read_replies(1, what))[0]

    async def read_replies(
        self, count: int, what: str, *, brief: bool = False, into: list[Reply] | None = None
    ) -> list[Reply]:
        """Up to `count` replies (of a pipelined group), stopping after a 421.

        brief=True: single-line 2xx and 354 replies come back as shared Reply
        objects without text (see _BRIEF_RUN). A regex match, a decode and a
        Reply per line, and an await per line, cost more than all the rest of
        a 100-recipient transaction. `into`: the list to append to, so that
        after an error the caller knows how many replies came.

        The timeout bounds the wait for each reply, as one timer per reply
        would, but one timer serves the call (moved on, within a second of
        slack, when replies come in), and none is set when the bytes already
        received hold every reply asked for.
        """
        replies: list[Reply] = [] if into is None else into
        count += len(replies)
        if self._parse(replies, count, brief, what):
            return replies
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(loop.time() + self.timeout, self.deadline)) as limit:
                moved = loop.time()
                seen = len(replies)
                while True:
                    data = await self.reader.read(_READ_SIZE)
                    if not data:
                        raise asyncio.IncompleteReadError(self._buf, None)
                    self._buf += data
                    if self._parse(replies, count, brief, what):
                        return replies
                    if len(replies) > seen:
                        seen = len(replies)
                        now = loop.time()
                        if now - moved > 1.0:
                            limit.reschedule(min(now + self.timeout, self.deadline))
                            moved = now
        except UpstreamError:
            raise
        except Exception as exc:
            err = _transport_error(exc, self.timeout, what)
            if err is None:
                raise
            raise err from None

    def _parse(self, replies: list[Reply], count: int, brief: bool, what: str) -> bool:
        """Move complete replies from the buffer to `replies`; True once there are `count`, or a 421.

        Every line outside a brief run is checked by parse_reply_line; the
        lines of a multi-line reply are taken as they come (kept in _lines),
        so a reply trickling in is never parsed twice.
        """
        buf = self._buf
        pos = 0
        done = False
        while len(replies) < count:
            if brief and not self._lines and (run := _BRIEF_RUN.match(buf, pos)) is not None:
                pos = _brief_replies(buf, pos, run.end(), count - len(replies), replies)
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0 and len(buf) - pos < MAX_LINE:
                break  # the rest of the line is still to come
            if nl < 0 or nl - pos >= MAX_LINE:
                raise UpstreamError("protocol", f"reply line too long during {what}")
            try:
                code, more, text = parse_reply_line(buf[pos : nl + 1])
            except ValueError:
                raise UpstreamError("protocol", f"malformed reply during {what}") from None
            pos = nl + 1
            lines = self._lines
            if lines and code != self._code:
                raise UpstreamError("protocol", f"reply lines disagree on the code ({what})")
            lines.append(text)
            if more:
                if len(lines) >= MAX_REPLY_LINES:
                    raise UpstreamError("protocol", f"reply has too many lines during {what}")
                self._code = code
                continue
            self._lines = []
            replies.append(Reply(code, "\n".join(lines) if len(lines) > 1 else text))
            if code == 421:
                self.closing = True
                done = True
                break
        else:
            done = True
        if pos:
            self._buf = buf[pos:]
        return done

    async def command(self, line: bytes, what: str) -> Reply:
        self.write(line)
        return await self.read_reply(what)

    async def send_content(self, encoded: Encoded) -> None:
        """Write the DATA payload, waiting for the transport only when it holds bytes back.

        Small content goes out in one writelines (one send on uvloop, where the
        terminator used to be a write and a syscall of its own). Bigger content
        goes in slices with a drain after each, so the transport buffer never
        holds another full copy of a big message. A peer that stops reading
        is caught either by a drain or by the timeout on the final reply.
        """
        if encoded.size <= _SMALL_CONTENT:
            self.writer.writelines(encoded.chunks)
            if self.writer.transport.get_write_buffer_size():
                await self._drain()
            return
        for chunk in encoded.chunks:
            view = memoryview(chunk)
            for i in range(0, len(view), _WRITE_SLICE):
                self.writer.write(view[i : i + _WRITE_SLICE])
                await self._drain()

    async def _drain(self) -> None:
        async with _step(self.budget(), "message content"):
            await self.writer.drain()

    def budget(self) -> float:
        """Seconds the next wait may take: `timeout`, or less when the delivery's deadline is nearer."""
        return min(self.timeout, self.deadline - asyncio.get_running_loop().time())

    def alive(self) -> bool:
        """Cheap local check before reusing: no EOF, no error, no 421 seen, nothing unasked-for."""
        return not (
            self.closing
            or self._buf
            or self.writer.is_closing()
            or self.reader.at_eof()
            or self.reader.exception() is not None
        )

    def abort(self) -> None:
        """Drop the connection without a goodbye: its protocol state is unknown."""
        self.usable = False
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.writer.transport.abort()  # idempotent, and works after close()

    async def quit(self) -> None:
        """Polite goodbye; errors ignored (the connection is going away anyway)."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        try:
            async with asyncio.timeout(min(self.timeout, _QUIT_TIMEOUT)):
                if self.usable and not self.closing:
                    self.usable = False
                    self.writer.write(b"QUIT\r\n")
                    await self.read_reply("QUIT")
                self.writer.close()
                await self.writer.wait_closed()
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:  # nothing to report about a goodbye
            self.abort()


def _parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> parameters; the first line is the greeting."""
    ext: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        key, _, param = line.strip().partition(" ")
        if key:
            ext[key.upper()] = param.strip()
    return ext


def make_tls_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    """Verification on by default (system CAs or cfg.ca_file); verify_tls=false opts out.

    A ca_file that does not load (empty, not PEM, unreadable) is a ConfigError,
    as a server certificate that does not load is (smtp/tls.py): exit 78 with
    one line naming the key, and a reload keeps the old upstream.
    """
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(
            [f"upstream.ca_file: cannot load {cfg.ca_file} ({reason}) (fix: a PEM file of CA certificates)"]
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not cfg.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SMTPUpstream:
    """Upstream over SMTP: pipelined transactions on pooled connections.

    At most `pool_size` connections are in use by deliveries at once (others
    wait for a free one); idle connections are closed after `pool_idle`
    seconds. pool_size=0: a new connection per delivery, closed with QUIT.
    """

    def __init__(
        self, cfg: UpstreamConfig, *, scheme: str, host: str, port: int, helo_name: str
    ) -> None:
        if scheme not in ("smtp", "smtp+starttls", "smtps"):
            raise ValueError(f"not an SMTP scheme: {scheme!r}")
        self.scheme = scheme
        self.host = host
        self.port = port
        self.helo_name = helo_name
        self.timeout = cfg.timeout
        self.pool_size = cfg.pool_size
        self.pool_idle = cfg.pool_idle
        # Built once: loading the CA store costs milliseconds.
        self._tls = make_tls_context(cfg) if scheme != "smtp" else None
        self._slots = asyncio.Semaphore(cfg.pool_size) if cfg.pool_size > 0 else None
        self._idle: list[Connection] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.delivery_timeout = cfg.delivery_timeout
        # EHLO keywords of the latest connection: what the upstream offers.
        self.extensions: dict[str, str] | None = None

    # ------------------------------------------------------------ public API

    async def deliver(
        self,
        mail_from: str,
        rcpt_tos: Sequence[str],
        message: bytes,
        *,
        smtputf8: bool = False,
        eightbit: bool = False,
    ) -> DeliveryResult:
        """Send one transaction; see DeliveryResult and UpstreamError for the outcomes.

        Recipients with control characters are refused locally (501) and never
        sent; non-ASCII envelope addresses imply SMTPUTF8 even if not asked for.
        """
        start = time.monotonic()
        if not rcpt_tos:
            raise ValueError("deliver() needs at least one recipient")
        if not address_ok(mail_from):
            raise UpstreamError("5xx", "sender address has control characters", REPLY_BAD_SENDER)
        refused: dict[str, Reply] = {}
        # One scan over all recipients, as a control character is one character;
        # a scan per recipient cost 0.5 us each.
        everyone = "".join(rcpt_tos)
        if address_ok(everyone):
            valid = list(rcpt_tos)
        else:
            valid = []
            for rcpt in rcpt_tos:
                if address_ok(rcpt):
                    valid.append(rcpt)
                else:
                    refused[rcpt] = REPLY_BAD_RCPT
            if not valid:
                reply = significant_refusal(list(refused.values()))
                return DeliveryResult((), refused, reply, time.monotonic() - start)
            everyone = "".join(valid)
        utf8 = smtputf8 or needs_smtputf8(mail_from, everyone)
        encoded = encode_data(message)
        # One deadline for the whole delivery (waiting for a pool slot included):
        # `timeout` bounds each step, but 30 RCPTs each answered just in time
        # would keep the client waiting past the 10 minutes RFC 5321 4.5.3.2.6
        # gives it for the reply to its final dot. No timer of its own (an
        # asyncio.timeout costs ~5 us a delivery): every wait's own timer is
        # cut to the deadline (Connection.deadline, budget()). A connection
        # cut by it is aborted by `_put_back` (not usable mid-transaction).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.delivery_timeout
        try:
            accepted, reply = await self._deliver(
                mail_from, valid, encoded, refused, deadline, utf8=utf8, eightbit=eightbit
            )
        except UpstreamError as exc:
            if exc.kind == "timeout" and loop.time() >= deadline:
                what = f"delivery not done within delivery_timeout {self.delivery_timeout:g}s"
                raise UpstreamError("timeout", what) from None
            raise
        return DeliveryResult(tuple(accepted), refused, reply, time.monotonic() - start)

    async def _deliver(
        self,
        mail_from: str,
        valid: list[str],
        encoded: Encoded,
        refused: dict[str, Reply],
        deadline: float,
        *,
        utf8: bool,
        eightbit: bool,
    ) -> tuple[list[str], Reply]:
        await self._acquire(deadline)  # not `async with self._slot()`: that costs 2 us a delivery
        try:
            conn = self._take_idle() or await self._connect(deadline)
            conn.deadline = deadline
            try:
                try:
                    return await self._transact(
                        conn, mail_from, valid, encoded, refused, utf8=utf8, eightbit=eightbit
                    )
                except _Stale:
                    conn.abort()
                    conn = await self._connect(deadline)
                    conn.deadline = deadline
                    return await self._transact(
                        conn, mail_from, valid, encoded, refused, utf8=utf8, eightbit=eightbit
                    )
            finally:
                self._put_back(conn)
        finally:
            self._release()

    async def probe(self) -> None:
        """NOOP on an idle pooled connection, else connect + EHLO (kept in the pool if allowed)."""
        async with self._slot():
            conn = self._take_idle()
            if conn is not None:
                conn.usable = False
                with contextlib.suppress(UpstreamError):
                    conn.usable = (await conn.command(b"NOOP\r\n", "NOOP")).is_ok
                healthy = conn.usable
                self._put_back(conn)
                if healthy:
                    return
            self._put_back(await self._connect())

    def missing_capabilities(self, max_size: int) -> tuple[str, ...] | None:
        """See Upstream.missing_capabilities: from the latest connection's EHLO."""
        return None if self.extensions is None else capability_gaps(self.extensions, max_size)

    async def close(self) -> None:
        """QUIT idle connections; connections in use are closed when their delivery ends."""
        self._closed = True
        while self._idle:
            self._spawn(self._idle.pop().quit())
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------ the pool

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, deadline: float = math.inf) -> None:
        if self._closed:
            raise UpstreamError("connect", "upstream client is closed")
        if self._slots is None:
            return
        if not self._slots.locked():
            # Free: acquire() returns without waiting, so no timer is needed
            # (a timer costs 5 us a delivery).
            await self._slots.acquire()
            return
        # Back-pressure: at most pool_size transactions go upstream at once;
        # the others wait here, but no longer than one upstream step, then
        # their clients get 451 and retry later (the session limits bound
        # how many wait, and so the memory their messages hold).
        try:
            async with asyncio.timeout(min(self.timeout, deadline - asyncio.get_running_loop().time())):
                await self._slots.acquire()
        except TimeoutError:
            what = f"no upstream connection free within {self.timeout:g}s (pool_size {self.pool_size})"
            raise UpstreamError("timeout", what) from None

    def _release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()  # most recent first: the oldest ones expire
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn.alive():
                conn.reused = True
                return conn
            conn.abort()
        return None

    def _put_back(self, conn: Connection) -> None:
        conn.deadline = math.inf
        if not conn.usable or not conn.alive():
            conn.abort()
        elif self._slots is None or self._closed:
            self._spawn(conn.quit())
        else:
            loop = asyncio.get_running_loop()
            conn.idle_timer = loop.call_later(self.pool_idle, self._expire, conn)
            self._idle.append(conn)

    def _expire(self, conn: Connection) -> None:
        conn.idle_timer = None
        if conn in self._idle:
            self._idle.remove(conn)
            self._spawn(conn.quit())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ session setup

    async def _connect(self, deadline: float = math.inf) -> Connection:
        """TCP (or implicit TLS) connect, greeting, EHLO, STARTTLS when required, by `deadline`."""
        implicit = self._tls if self.scheme == "smtps" else None
        budget = min(self.timeout, deadline - asyncio.get_running_loop().time())
        async with _step(budget, "connect"):
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=implicit,
                server_hostname=self.host if implicit else None,
                ssl_handshake_timeout=max(budget, 0.001) if implicit else None,
                limit=_STREAM_LIMIT,
            )
        conn = Connection(reader, writer, self.timeout)
        conn.deadline = deadline
        try:
            greeting = await conn.read_reply("greeting")
            if greeting.code != 220:
                raise UpstreamError.session_refused("upstream refused the session", greeting)
            await self._ehlo(conn)
            if self.scheme == "smtp+starttls":
                await self._starttls(conn)
        except BaseException:
            conn.abort()
            raise
        conn.usable = True
        self.extensions = conn.extensions
        return conn

    async def _ehlo(self, conn: Connection) -> None:
        name = self.helo_name.encode("ascii", "replace")
        reply = await conn.command(b"EHLO " + name + b"\r\n", "EHLO")
        if reply.is_ok:
            conn.extensions = _parse_ehlo(reply)
            return
        if reply.is_permanent and reply.code != 554:
            # RFC 5321 4.1.4: a server that does not know EHLO gets HELO.
            reply = await conn.command(b"HELO " + name + b"\r\n", "HELO")
            if reply.is_ok:
                conn.extensions = {}
                return
        raise UpstreamError.session_refused("upstream refused EHLO", reply)

    async def _starttls(self, conn: Connection) -> None:
        assert self._tls is not None  # set for every TLS scheme
        # Required TLS the upstream will not give is a refusal of the session, as a
        # 554 greeting is: nothing but an admin cures it (kind "session": 451 4.4.1
        # and /readyz at once). A 454 is the passing kind; a failed handshake "tls".
        if "STARTTLS" not in conn.extensions:
            raise UpstreamError("session", "upstream does not offer STARTTLS, which the url requires")
        reply = await conn.command(b"STARTTLS\r\n", "STARTTLS")
        if reply.code != 220:
            if reply.is_temporary or reply.is_permanent:
                raise UpstreamError.session_refused("upstream refused STARTTLS", reply)
            raise UpstreamError("protocol", "STARTTLS answered with neither 220 nor a refusal", reply)
        # Anything already buffered was sent before the handshake and could be
        # injected by a man in the middle (CVE-2011-0411 style): refuse it.
        if conn.pending() or bool(getattr(conn.reader, "_buffer", b"")):
            raise UpstreamError("protocol", "data after the STARTTLS reply")
        budget = conn.budget()
        async with _step(budget, "STARTTLS handshake"):
            await conn.writer.start_tls(
                self._tls, server_hostname=self.host, ssl_handshake_timeout=max(budget, 0.001)
            )
        conn.extensions = {}
        await self._ehlo(conn)  # RFC 3207 4.2: forget what was learnt in clear text

    # ------------------------------------------------------------ one transaction

    def _mail_command(
        self, conn: Connection, mail_from: str, encoded: Encoded, *, utf8: bool, eightbit: bool
    ) -> bytes:
        """MAIL FROM with the parameters the upstream advertised; refuse what it cannot take."""
        ext = conn.extensions
        params = []
        if "SIZE" in ext:
            limit = ext["SIZE"]
            if limit.isdigit() and int(limit) > 0 and encoded.size > int(limit):
                raise UpstreamError("5xx", "message larger than upstream's SIZE", REPLY_TOO_BIG)
            params.append(f" SIZE={encoded.size}")
        if eightbit:
            if "8BITMIME" not in ext:
                raise UpstreamError("capability", "upstream does not offer 8BITMIME", REPLY_NO_8BITMIME)
            params.append(" BODY=8BITMIME")
        if utf8:
            if "SMTPUTF8" not in ext:
                raise UpstreamError("5xx", "upstream does not offer SMTPUTF8", REPLY_NO_SMTPUTF8)
            params.append(" SMTPUTF8")
        return f"MAIL FROM:<{mail_from}>{''.join(params)}\r\n".encode()

    async def _first_reply(self, conn: Connection, what: str) -> Reply:
        """The first reply of a transaction; on a reused connection, death means retry."""
        return (await self._first_replies(conn, 1, what))[0]

    async def _first_replies(
        self, conn: Connection, count: int, what: str, *, brief: bool = False
    ) -> list[Reply]:
        """The replies of a transaction's first group (see read_replies).

        On a reused connection, dying or saying 421 before the first reply
        means the pool kept a dead connection: nothing was accepted, retry.
        Fewer than `count` replies when a 421 later in the group cut it short.
        """
        replies: list[Reply] = []
        try:
            await conn.read_replies(count, what, brief=brief, into=replies)
        except UpstreamError as exc:
            if conn.reused and not replies and exc.kind == "connect":
                raise _Stale from exc
            raise
        if conn.reused and replies[0].code == 421:
            raise _Stale
        return replies

    async def _transact(
        self,
        conn: Connection,
        mail_from: str,
        rcpts: list[str],
        encoded: Encoded,
        refused: dict[str, Reply],
        *,
        utf8: bool,
        eightbit: bool,
    ) -> tuple[list[str], Reply]:
        """MAIL/RCPT/DATA/content on `conn`. Returns (accepted, final reply) or raises.

        `refused` is filled in place with the RCPT refusals. conn.usable is set
        back to True only where the session is known to be in sync.
        """
        mail = self._mail_command(conn, mail_from, encoded, utf8=utf8, eightbit=eightbit)
        conn.usable = False
        if conn.dirty:
            conn.write(b"RSET\r\n")  # nothing of this transaction sent yet
            reply = await self._first_reply(conn, "RSET")
            if not reply.is_ok:
                raise UpstreamError.session_refused("upstream refused RSET", reply)
            conn.dirty = False
            conn.reused = False  # it just proved alive: later failures are not "stale"
        rcpt_replies: list[Reply] = []
        data_reply: Reply | None = None

        if "PIPELINING" in conn.extensions:
            # RFC 2920 3.1: MAIL, RCPTs and DATA in one group; then every reply
            # is read before deciding anything, so the session stays in sync.
            rcpt_block = ("RCPT TO:<" + ">\r\nRCPT TO:<".join(rcpts) + ">\r\n").encode()
            conn.write(b"".join((mail, rcpt_block, b"DATA\r\n")))
            # All replies in one call, in brief: only refusals keep their text.
            group = await self._first_replies(conn, len(rcpts) + 2, "MAIL FROM/RCPT TO/DATA", brief=True)
            last = mail_reply = group[0]
            conn.dirty = mail_reply.is_ok
            rcpt_replies = group[1 : len(rcpts) + 1]
            if len(group) == len(rcpts) + 2:
                data_reply = group[-1]
            last = group[-1]
        else:
            conn.write(mail)
            last = mail_reply = await self._first_reply(conn, "MAIL FROM")
            conn.dirty = mail_reply.is_ok
            if mail_reply.is_ok:
                for rcpt in rcpts:
                    last = await conn.command(f"RCPT TO:<{rcpt}>\r\n".encode(), "RCPT TO")
                    rcpt_replies.append(last)
                    if conn.closing:
                        break

        if conn.closing:  # a 421 anywhere: the server is hanging up
            raise UpstreamError.refused("upstream closed the session", last)
        if not mail_reply.is_ok:
            if data_reply is not None and data_reply.code == 354:
                await self._empty_data(conn)
            conn.usable = True
            raise UpstreamError.refused("upstream refused the sender", mail_reply)

        accepted: list[str] = []
        if rcpt_replies.count(REPLY_OK) == len(rcpts):  # the common case, counted in C
            accepted = rcpts
        else:
            for rcpt, reply in zip(rcpts, rcpt_replies, strict=True):
                code = reply.code  # 200-599: the parser lets nothing else through
                if code < 300:
                    accepted.append(rcpt)
                elif code < 400:
                    raise UpstreamError("protocol", "RCPT answered with a 3xx code")
                else:
                    refused[rcpt] = reply

        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # RFC 2920 3.1: DATA accepted despite no recipient: send a lone dot.
                await self._empty_data(conn)
            conn.usable = True
            return [], significant_refusal(list(refused.values()))

        if data_reply is None:
            data_reply = await conn.command(b"DATA\r\n", "DATA")
            if conn.closing:
                raise UpstreamError.refused("upstream closed the session", data_reply)
        if data_reply.code != 354:
            if data_reply.is_ok:
                raise UpstreamError("protocol", "DATA answered 2xx instead of 354")
            conn.usable = not conn.closing
            raise UpstreamError.refused("upstream refused DATA", data_reply)

        if conn.pending():
            # Bytes after the 354 answer nothing we sent: the server is out of
            # sync, and what it said could be taken for the reply to our ".".
            raise UpstreamError("protocol", "data after the DATA reply")
        await conn.send_content(encoded)
        final = await conn.read_reply("end of DATA")
        conn.dirty = False  # the final reply ends the transaction, whatever it says
        conn.usable = not conn.closing
        if final.is_ok:
            return accepted, final
        raise UpstreamError.refused("upstream refused the message", final)

    async def _empty_data(self, conn: Connection) -> None:
        reply = await conn.command(b".\r\n", "empty DATA")
        del reply  # whatever it says, no recipient was accepted
        conn.dirty = False
