"""One MTA connection speaking milter: events -> (envelope, message bytes) -> the relay's decision.

Kept thin on purpose (as OpenDKIM's callbacks are): the session only
collects what the MTA sends, rebuilds the message the SMTP relay would have
received, and calls `Relay.process` — the same path, the same policy, the
same log line and counters as the SMTP edge. What differs is the hand-off:
instead of delivering, the answer goes back to the MTA as header edits
(rewrite), DISCARD (bccguard holds it: quarantine or split spool, fsync'ed
first), QUARANTINE (the MTA's hold queue), or a reply code (reject, tempfail).

Anything unexpected answers tempfail: the MTA says 4xx and the client
retries; a broken packet ends the session, and Postfix applies
`milter_default_action` (the guide sets tempfail).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bccguard.milter import codec
from bccguard.policy.engine import Outcome
from bccguard.policy.header_edits import HeaderEdit, fields_of, header_edits
from bccguard.policy.model import Envelope
from bccguard.relay import INTERNAL_ERROR, Runtime

# What we ask the MTA for (intersected with what it offers): no HELO/DATA/unknown
# events, no replies expected except where we may answer (end of message), and
# header values with their leading space so the block is rebuilt byte for byte.
WANTED_PROTOCOL = (
    codec.SMFIP_NOHELO
    | codec.SMFIP_NOUNKNOWN
    | codec.SMFIP_NODATA
    | codec.SMFIP_NR_CONN
    | codec.SMFIP_NR_HELO
    | codec.SMFIP_NR_MAIL
    | codec.SMFIP_NR_RCPT
    | codec.SMFIP_NR_DATA
    | codec.SMFIP_NR_UNKN
    | codec.SMFIP_NR_HDR
    | codec.SMFIP_NR_EOH
    | codec.SMFIP_NR_BODY
    | codec.SMFIP_HDR_LEADSPC
)
WANTED_ACTIONS = codec.SMFIF_ADDHDRS | codec.SMFIF_CHGHDRS | codec.SMFIF_QUARANTINE
# The only macros used: the MTA's queue id (for the log) and the AUTH user (for `users =`
# rules), both known at MAIL. Every other stage gets an empty list: the MTA need not
# expand and send, per recipient, macros nobody reads (Postfix's defaults).
WANTED_MACROS = {
    codec.SMFIM_CONNECT: "",
    codec.SMFIM_HELO: "",
    codec.SMFIM_ENVFROM: "i {auth_authen}",
    codec.SMFIM_ENVRCPT: "",
    codec.SMFIM_DATA: "",
    codec.SMFIM_EOH: "",
    codec.SMFIM_EOM: "",
}
MACRO_STAGES = (codec.CONNECT, codec.HELO, codec.MAIL, codec.RCPT, codec.DATA, codec.EOH, codec.BODYEOB)
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"


class CannotEdit(RuntimeError):
    """The MTA did not grant header changes, and this message needs them."""


@dataclass
class MilterHandoff:
    """What `Relay.process` decided, turned into milter answers (see relay.Handoff)."""

    can_edit: bool
    quarantine_in_mta: bool
    queue_id: str = ""  # the MTA's (macro `i`): logged, so its log and ours meet
    edits: list[HeaderEdit] | None = None
    held: str | None = None

    async def forward(
        self, outcome: Outcome, env: Envelope, content: bytes, session_id: str
    ) -> tuple[str, dict[str, Any]]:
        edits = []
        if outcome.message is not content:  # evaluate() returns the very same bytes when unchanged
            edits = header_edits(fields_of(content), fields_of(outcome.message))
        if edits and not self.can_edit:
            raise CannotEdit("the MTA did not grant SMFIF_CHGHDRS/SMFIF_ADDHDRS")
        self.edits = edits
        fields = {"milter_edits": len(edits), "mta_queue_id": self.queue_id}
        return "250 2.0.0 Ok: returned to the MTA", fields

    async def hold(
        self, outcome: Outcome, env: Envelope, session_id: str
    ) -> tuple[str, dict[str, Any]] | None:
        if not self.quarantine_in_mta:
            return None
        self.held = f"bccguard rule {outcome.verdict.rule}: {outcome.verdict.reason}"
        return "250 2.6.0 Held in the MTA's hold queue", {"held_by": "mta", "mta_queue_id": self.queue_id}


@dataclass
class _Message:
    mail_from: str = ""
    smtputf8: bool = False
    rcpts: list[str] = field(default_factory=list)
    headers: list[bytes] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    size: int = 0
    too_big: bool = False
    started: float = 0.0


class MilterSession(asyncio.Protocol):
    """One MTA connection, as an asyncio Protocol.

    A Protocol rather than streams: a milter message is a dozen small
    packets, most of which need no reply (NR_* negotiated); handling them
    synchronously in `data_received` costs a fraction of a stream read per
    packet. Only end of message awaits anything (the relay's decision);
    reading is paused meanwhile, so packets cannot pile up.
    """

    def __init__(self, runtime_ref: Callable[[], Runtime], sessions: set[MilterSession]) -> None:
        self._runtime_ref = runtime_ref
        self._sessions = sessions
        rt = runtime_ref()
        self.session_id = rt.new_session_id()
        self.busy = False  # deciding a message: a drain waits for it
        self.closing = False
        # Per stage (the command they come with), replaced at each stage: a value
        # from an earlier message on this connection never leaks into the next.
        self._macros: dict[bytes, dict[str, str]] = {}
        self._client = ""
        self._protocol = 0  # negotiated SMFIP_* flags
        self._actions = 0
        self._msg: _Message | None = None
        server = rt.config.server
        self._decoder = codec.Decoder(max_size=max(server.max_header_size, 65535) + 1024)
        self._timeout = server.command_timeout
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._deciding: asyncio.Task[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._ended = False  # the reason the session ended is logged already
        self.transport: asyncio.Transport | None = None

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._sessions.add(self)
        self._runtime_ref().metrics.milter_session_opened()
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._timeout
        self._timer = loop.call_at(self._deadline, self._on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        rt = self._runtime_ref()
        if self._timer is not None:
            self._timer.cancel()
        if not self._ended and self._msg is not None and self._msg.started:
            self._error(rt, "disconnect", "milter_disconnect_mid_message")
        self._ended = True
        self._sessions.discard(self)
        rt.metrics.milter_session_closed()

    def _on_timer(self) -> None:
        """One timer per session, moved forward lazily (not re-armed on every packet)."""
        loop = asyncio.get_running_loop()
        if self.busy:  # deciding: the MTA waits for us, not we for it
            self._deadline = loop.time() + self._timeout
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timer)
            return
        self._end("timeout", "milter_timeout")

    def _end(self, kind: str, event: str, **fields: Any) -> None:
        if not self._ended:
            self._error(self._runtime_ref(), kind, event, **fields)
            self._ended = True
        if self.transport is not None:
            self.transport.close()

    def _error(self, rt: Runtime, kind: str, event: str, **fields: Any) -> None:
        rt.metrics.milter_error(kind)
        rt.log.warning(event, session_id=self.session_id, client=self._client, **fields)

    async def shutdown(self) -> None:
        """SIGTERM: an idle session closes now (the MTA reconnects or tempfails); a busy one finishes."""
        self.closing = True
        if not self.busy and self.transport is not None:
            self._ended = True
            self.transport.close()

    def close(self) -> None:
        self._ended = True
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ data

    def data_received(self, data: bytes) -> None:
        self._deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            self._queue.extend(self._decoder.feed(data))
        except codec.MilterProtocolError as exc:
            self._end("protocol", "milter_protocol_error", problem=str(exc)[:200])
            return
        if self._deciding is None:
            self._work()

    def eof_received(self) -> bool:
        return False  # close our side too

    def _work(self) -> None:
        """Handle queued packets up to an end of message, which starts the (async) decision."""
        assert self.transport is not None
        out: list[bytes] = []
        try:
            while self._queue and not self.closing:
                command, payload = self._queue.popleft()
                if command == codec.BODYEOB:
                    if payload:
                        self._body(payload)
                    self.busy = True
                    self.transport.pause_reading()
                    self._deciding = asyncio.get_running_loop().create_task(self._decide())
                    break
                reply = self._handle(command, payload)
                if reply:
                    out.append(reply)
        except codec.MilterProtocolError as exc:
            self._end("protocol", "milter_protocol_error", problem=str(exc)[:200])
            return
        except Exception as exc:  # never crash the listener; the MTA applies its default action
            self._runtime_ref().log.error("milter_session_failed", session_id=self.session_id, exc_info=exc)
            self.close()
            return
        if out:
            self.transport.write(b"".join(out))
        if self.closing and self._deciding is None:
            self.close()

    async def _decide(self) -> None:
        assert self.transport is not None
        try:
            answer = await self._end_of_message()
        except Exception as exc:  # _end_of_message promises an answer; belt and braces
            self._runtime_ref().log.error("milter_message_failed", session_id=self.session_id, exc_info=exc)
            answer = codec.reply_packet(INTERNAL_ERROR)
        self.busy = False
        self._deciding = None
        if self.transport.is_closing():
            return
        self.transport.write(answer)
        if self.closing:
            self.close()
            return
        self.transport.resume_reading()
        self._work()

    # -------------------------------------------------------------- commands

    def _macro(self, name: str) -> str:
        """A macro's value as of now: the latest stage that sent it wins."""
        value = ""
        for stage in MACRO_STAGES:
            value = self._macros.get(stage, {}).get(name, value)
        return value

    def _needs_reply(self, command: bytes) -> bool:
        flag = codec.NO_REPLY_FLAG.get(command)
        return command not in codec.SILENT and not (flag and self._protocol & flag)

    def _handle(self, command: bytes, data: bytes) -> bytes:
        """Every command but end of message (see `_work`): the bytes to answer, maybe none."""
        if command == codec.OPTNEG:
            return self._negotiate(data)
        if command == codec.MACRO:
            stage, macros = codec.parse_macros(data)
            self._macros[stage] = macros
            return b""
        if command == codec.CONNECT:
            _, self._client = codec.parse_connect(data)
        elif command == codec.MAIL:
            sender, params = codec.parse_address_args(data)
            self._msg = _Message(
                mail_from=sender,
                smtputf8=any(p.upper() == "SMTPUTF8" for p in params),
                started=time.perf_counter(),
            )
        elif command == codec.RCPT:
            rcpt, _ = codec.parse_address_args(data)
            msg = self._current()
            self._grow(msg, len(rcpt))  # recipients count toward the size too: memory stays bounded
            if not msg.too_big:
                msg.rcpts.append(rcpt)
        elif command == codec.HEADER:
            name, value = codec.parse_header(data)
            self._header(name, value)
        elif command == codec.BODY:
            self._body(data)
        elif command == codec.ABORT:
            self._msg = None
            self._macros = {k: v for k, v in self._macros.items() if k in (codec.CONNECT, codec.HELO)}
            return b""
        elif command == codec.QUIT:
            self._ended = True
            self.closing = True
            return b""
        elif command == codec.QUIT_NC:  # the MTA reuses this connection for a new client
            self._msg = None
            self._macros.clear()
            self._client = ""
            return b""
        elif command not in codec.KNOWN_COMMANDS:
            raise codec.MilterProtocolError(f"unknown command {command!r}")
        return codec.encode(codec.CONTINUE) if self._needs_reply(command) else b""

    def _negotiate(self, data: bytes) -> bytes:
        offer = codec.parse_optneg(data)
        if offer.version < codec.VERSION:
            raise codec.MilterProtocolError(f"MTA speaks milter protocol {offer.version}, bccguard needs 6")
        self._protocol = WANTED_PROTOCOL & offer.protocol
        self._actions = WANTED_ACTIONS & offer.actions
        macros = None
        if offer.actions & codec.SMFIF_SETSYMLIST:
            self._actions |= codec.SMFIF_SETSYMLIST
            macros = WANTED_MACROS
        rt = self._runtime_ref()
        if rt.config.milter.quarantine == "mta" and not self._actions & codec.SMFIF_QUARANTINE:
            # Nothing is lost: quarantined mail goes to bccguard's own store instead.
            rt.log.warning("milter_no_mta_quarantine", session_id=self.session_id)
        return codec.encode_optneg(self._actions, self._protocol, macros)

    def _current(self) -> _Message:
        if self._msg is None:  # headers before MAIL: Postfix never does this; a broken peer might
            raise codec.MilterProtocolError("message event before MAIL")
        return self._msg

    def _header(self, name: bytes, value: bytes) -> None:
        msg = self._current()
        # Without HDR_LEADSPC the MTA strips the space after the colon: put one back.
        if not self._protocol & codec.SMFIP_HDR_LEADSPC:
            value = b" " + value
        line = name + b":" + value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
        self._grow(msg, len(line))
        if not msg.too_big:
            msg.headers.append(line)

    def _body(self, chunk: bytes) -> None:
        msg = self._current()
        self._grow(msg, len(chunk))
        if not msg.too_big:
            msg.body.append(chunk)

    def _grow(self, msg: _Message, n: int) -> None:
        msg.size += n
        if not msg.too_big and msg.size > self._runtime_ref().config.server.max_message_size:
            msg.too_big = True  # keep counting, stop keeping: memory stays bounded
            msg.headers.clear()
            msg.body.clear()
            msg.rcpts.clear()

    # ---------------------------------------------------------- end of message

    async def _end_of_message(self) -> bytes:
        msg = self._current()
        self._msg = _Message()  # the next message on this connection starts with MAIL
        rt = self._runtime_ref()
        if msg.too_big:
            self._error(rt, "too_big", "milter_message_too_big", size=msg.size)
            rt.metrics.milter_response("reject")
            return codec.reply_packet(TOO_BIG)
        content = b"".join((*msg.headers, b"\r\n", *msg.body))
        handoff = MilterHandoff(
            can_edit=self._actions & (codec.SMFIF_CHGHDRS | codec.SMFIF_ADDHDRS)
            == codec.SMFIF_CHGHDRS | codec.SMFIF_ADDHDRS,
            quarantine_in_mta=rt.config.milter.quarantine == "mta"
            and bool(self._actions & codec.SMFIF_QUARANTINE),
            queue_id=self._macro("i"),
        )
        auth = self._macro("auth_authen") or None
        try:
            reply = await rt.relay.process(
                mail_from=msg.mail_from,
                rcpt_tos=tuple(msg.rcpts),
                content=content,
                smtputf8=msg.smtputf8,
                auth_user=auth,
                session_id=self.session_id,
                client=self._client,
                started=msg.started or time.perf_counter(),
                handoff=handoff,
            )
        except Exception as exc:  # process() promises a reply; this is belt and braces
            rt.log.error("milter_message_failed", session_id=self.session_id, exc_info=exc)
            reply = INTERNAL_ERROR
        return self._answer(rt, reply, handoff)

    def _answer(self, rt: Runtime, reply: str, handoff: MilterHandoff) -> bytes:
        """The relay's one reply line -> the milter packets that mean the same to the MTA."""
        if reply[:1] != "2":
            rt.metrics.milter_response("tempfail" if reply[:1] == "4" else "reject")
            return codec.reply_packet(reply)
        if handoff.held is not None:
            rt.metrics.milter_response("quarantine")
            reason = handoff.held.encode("utf-8", "replace") + b"\0"
            return codec.encode(codec.QUARANTINE, reason) + codec.encode(codec.CONTINUE)
        if handoff.edits is None:
            # 250 without a hand-back: the message sits fsync'ed in bccguard's
            # quarantine or split spool; the MTA must not deliver it as well.
            rt.metrics.milter_response("discard")
            return codec.encode(codec.DISCARD)
        rt.metrics.milter_response("edit" if handoff.edits else "continue")
        leadspc = bool(self._protocol & codec.SMFIP_HDR_LEADSPC)
        packets = b"".join(_edit_packet(e, leadspc=leadspc) for e in handoff.edits)
        return packets + codec.encode(codec.CONTINUE)


def _edit_packet(e: HeaderEdit, *, leadspc: bool) -> bytes:
    # Folded values travel with bare LF, as the MTA stores them (Postfix, Sendmail).
    value = e.value.replace(b"\r\n", b"\n")
    if not leadspc and value.startswith(b" "):
        value = value[1:]  # the MTA puts "name: " itself
    if e.kind == "add":
        return codec.header_packet(codec.ADDHEADER, e.name, value)
    if e.kind == "insert":
        return codec.header_packet(codec.INSHEADER, e.name, value, e.index)
    return codec.header_packet(codec.CHGHEADER, e.name, b"" if e.kind == "delete" else value, e.index)
