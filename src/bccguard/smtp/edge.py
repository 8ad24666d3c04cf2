"""What the SMTP edge needs from the rest of the relay, as protocols.

smtp/server.py answers SMTP; relay.py decides and delivers. The edge must
not import the orchestration (they imported each other, and a change to
either dragged the other into every test of the edge): it is handed an
`EdgeRuntime` per config snapshot, which relay.Runtime satisfies by shape,
and hands each message to `runtime.relay.process`. Anything with these
members (a test double, a different pipeline) can sit behind the edge.
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol

from bccguard.config import Config
from bccguard.ops.metrics import Metrics
from bccguard.smtp.auth import Credentials


class MessageHandler(Protocol):
    """Takes one message after its final dot; returns the one reply line the client gets."""

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
    ) -> str: ...


class EdgeRuntime(Protocol):
    """One config snapshot as the edge sees it (relay.Runtime is one)."""

    config: Config
    metrics: Metrics
    log: Any
    tls_context: ssl.SSLContext | None
    credentials: Credentials | None

    @property
    def relay(self) -> MessageHandler: ...

    def new_session_id(self) -> str: ...

    def client_ip(self, session: Any) -> str: ...
