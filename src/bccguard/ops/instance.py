"""One relay per listen address, metrics address, spool and quarantine.

Why: with `workers = "auto"` every worker binds the port with SO_REUSEPORT,
and Linux lets any process of the same user join such a group. A second
`bccguard serve` with the same settings started without a word and the
kernel handed it 4 of 10 messages meant for the first (into its own local
Maildir). SO_REUSEPORT sharing is meant for one supervisor's own workers.

How, and why this way:
- Spool and quarantine: an flock on `.instance.lock` in each directory, held
  by the single relay or the supervisor for its whole life (its workers are
  covered by it and do not lock). The kernel drops it when the holder dies,
  so a crash never leaves a stale lock, and the file names the holder's pid.
  Admin commands (`bccguard quarantine ...`) do not take it: they are meant
  to run beside the relay.
- Listen address: before its own SO_REUSEPORT socket, the supervisor binds
  the address once *without* SO_REUSEPORT. That bind fails if any socket
  holds the address, with or without SO_REUSEPORT, whoever owns it, so a
  foreign SO_REUSEPORT group cannot be joined by accident. (SO_REUSEADDR is
  set so a previous run's TIME_WAIT connections are no conflict.) A single
  relay binds without SO_REUSEPORT anyway. Two supervisors racing between
  probe and bind would need the microseconds between the two calls, and two
  relays with the same spool are serialised by its lock before either binds.
  Passing one inherited listening socket to the workers would close even
  that window, but gives up SO_REUSEPORT's per-worker accept queues, the
  reason the workers exist.
- Metrics address: its HTTP server binds without SO_REUSEPORT; a taken
  address fails as it always did, now with the same one-line message.
The holding process of an address is looked up in /proc by
`preflight.port_holder`, which names it in every start-up "address in use".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from bccguard.config import parse_hostport
from bccguard.preflight import StartError, address_in_use, process_name
from bccguard.store.durable import ensure_dir

LOCK_NAME = ".instance.lock"


class InstanceConflict(StartError):
    """Another process already uses an address or directory this relay needs (one line).

    A StartError, so it reads like every other start-up failure: key, value,
    what is wrong, the fix.
    """


def lock_dir(path: str, key: str) -> int:
    """Hold `path`/.instance.lock for this process's life; InstanceConflict if another has it."""
    directory = ensure_dir(Path(path))  # as the store would create it: 0700
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise InstanceConflict(
            key, path, f"in use by another bccguard ({holder})", f"stop it, or give this relay its own {key}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f"pid {pid}{process_name(pid)}"
    return "pid unknown"


def release(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def probe_listen(listen: str, key: str = "server.listen") -> None:
    """Bind `listen` once without SO_REUSEPORT: InstanceConflict if anything holds it."""
    host, port = parse_hostport(listen)
    if port == 0:
        return
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise address_in_use(key, listen) from None
            raise


__all__ = ["InstanceConflict", "lock_dir", "probe_listen", "release"]
