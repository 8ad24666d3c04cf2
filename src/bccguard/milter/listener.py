"""Bind the milter socket (`inet:` or `unix:`) and serve a `MilterSession` per MTA connection.

The socket is made here, not by asyncio, so a unix socket gets its mode and
owner before the MTA can try it, and so a supervisor can bind it once and
hand the same listening socket to every worker (they then share one accept
queue, as the SMTP port is shared with SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from bccguard.config import MilterConfig, milter_listen
from bccguard.milter.session import MilterSession
from bccguard.relay import Runtime

BACKLOG = 128


def _answers(path: str) -> bool:
    """Whether a process accepts connections on the unix socket at `path` (a stale one refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def bind_socket(cfg: MilterConfig) -> socket.socket:
    """A bound, listening socket for `[milter] listen`; raises OSError with the reason."""
    kind, where, port = milter_listen(cfg.listen)
    if kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(where).st_mode):
                if _answers(where):  # a live milter there: never steal another process's socket
                    raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), where)
                Path(where).unlink()  # a socket left by a previous run; anything else is not ours to delete
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(where)
            Path(where).chmod(int(cfg.mode, 8))
            if cfg.owner or cfg.group:
                os.chown(where, _uid(cfg.owner), _gid(cfg.group))
        except BaseException:
            sock.close()
            raise
    else:
        infos = socket.getaddrinfo(where or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
    sock.listen(BACKLOG)
    sock.set_inheritable(False)
    return sock


def _uid(owner: str) -> int:
    if not owner:
        return -1
    return int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid


def _gid(group: str) -> int:
    if not group:
        return -1
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def describe(sock: socket.socket) -> str:
    """`inet:127.0.0.1:8891` or `unix:/path`, for the start-up log line (port resolved)."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"inet:{host}:{port}"


class MilterListener:
    def __init__(self, runtime_ref: Callable[[], Runtime]) -> None:
        self._runtime_ref = runtime_ref
        self.sessions: set[MilterSession] = set()
        self.server: asyncio.base_events.Server | None = None
        self.address = ""

    async def start(self, sock: socket.socket) -> None:
        self.address = describe(sock)
        loop = asyncio.get_running_loop()

        def factory() -> MilterSession:
            return MilterSession(self._runtime_ref, self.sessions)

        if sock.family == socket.AF_UNIX:
            self.server = await loop.create_unix_server(factory, sock=sock)
        else:
            self.server = await loop.create_server(factory, sock=sock)

    def is_serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    @property
    def busy(self) -> bool:
        return any(s.busy for s in self.sessions)

    async def close(self) -> None:
        """Stop accepting, then close the idle sessions (busy ones finish their message)."""
        if self.server is not None:
            self.server.close()
        await asyncio.gather(*(s.shutdown() for s in list(self.sessions)), return_exceptions=True)

    def cut(self) -> None:
        """After the drain: close what is left (no answer was given, so the MTA tempfails)."""
        for s in list(self.sessions):
            s.close()
