"""Checks of the world a config points at, and start-up errors that name what failed.

`config check` asks "would `serve` start with this file, as this user, here?"
without changing anything; `serve` asks the same while creating its state
directories. Both go through this module, so they cannot disagree. A failure
is one line naming the one socket or path, the errno in words and the config
key (and `serve` flag) that sets it: "address already in use" alone does not
say which of two ports is taken.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from bccguard.config import Config, milter_listen, parse_hostport, upstream_parts

# The `serve` flag that overrides each key (see cli.py), for the fix of a start-up error.
FLAGS = {
    "server.listen": "--listen",
    "metrics.listen": "--metrics-listen",
    "upstream.url": "--upstream",
}


class StartError(Exception):
    """Something outside the config file stops the relay: a port, a path, a name."""

    def __init__(self, key: str, value: str, reason: str, fix: str) -> None:
        super().__init__(f"{key} = {value!r}: {reason} (fix: {fix})")
        self.key = key
        self.value = value


def errno_words(exc: OSError) -> str:
    """'address already in use (EADDRINUSE)': the text and the name an admin can search for."""
    # asyncio's create_server wraps the text ("error while attempting to bind on address ..."):
    # the errno's own words are what the admin needs.
    text = (os.strerror(exc.errno) if exc.errno else str(exc)).rstrip(".")
    text = text[:1].lower() + text[1:]
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{text} ({name})" if name else text


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container with an arbitrary UID)
        return f"uid {os.geteuid()}"


def key_hint(key: str) -> str:
    """Where an admin changes `key`: the config key, and the `serve` flag if there is one."""
    flag = FLAGS.get(key)
    return f"in {key}" + (f" or with `serve {flag}`" if flag else "")


@contextlib.contextmanager
def binding(key: str, value: str) -> Iterator[None]:
    """Turn a bind/resolve failure of the socket that `key` configures into a StartError."""
    try:
        yield
    except StartError:
        raise
    except socket.gaierror as exc:
        raise StartError(
            key, value, f"host name not found ({exc.strerror})",
            f"use an IP address, or a name this host resolves, {key_hint(key)}",
        ) from None  # fmt: skip
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise address_in_use(key, value) from None
        raise StartError(key, value, errno_words(exc), _bind_fix(exc, key, value)) from None


def address_in_use(key: str, value: str) -> StartError:
    """The one-line refusal for a taken address, naming the holder when /proc tells it.

    Why the holder: with SO_REUSEPORT a second relay used to join the first
    silently; now it is refused, and the admin needs to know by whom.
    """
    if value.startswith(("unix:", "local:")):  # a path: a live socket, or a file that is no socket
        return StartError(
            key,
            value,
            "address already in use (EADDRINUSE): something answers there, or a file that is not a socket",
            f"stop that process or move the file, or set another path {key_hint(key)}",
        )
    return StartError(
        key,
        value,
        f"address already in use (EADDRINUSE) by {port_holder(_port_of(value))}",
        f"stop it, or set a free port {key_hint(key)}",
    )


def _port_of(value: str) -> int:
    """The TCP port of a listen value: "host:port", or the milter's "inet:host:port"; 0 for a path."""
    if value.startswith(("inet:", "inet6:", "unix:", "local:")):
        return milter_listen(value)[2]
    return parse_hostport(value)[1]


def port_holder(port: int) -> str:
    """'pid N (command)' of a process listening on TCP `port`, else 'another process'.

    Looked up in /proc (Linux; only processes this user may inspect).
    """
    if port == 0:
        return "another process"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if inodes:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                for fd in (proc / "fd").iterdir():
                    if str(fd.readlink()) in inodes:
                        return f"pid {proc.name}{process_name(int(proc.name))}"
    return "another process"


def process_name(pid: int) -> str:
    """' (command line)' of `pid`, cut to 80 characters; '' when /proc does not tell."""
    with contextlib.suppress(OSError):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        text = " ".join(a.decode("utf-8", "replace") for a in args if a)[:80]
        return f" ({text})" if text else ""
    return ""


def _bind_fix(exc: OSError, key: str, value: str) -> str:
    hint = key_hint(key)
    if exc.errno == errno.EACCES:
        return f"ports below 1024 need root or CAP_NET_BIND_SERVICE: set a port from 1024 up {hint}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"that address is not one of this machine's (`ip addr` lists them): change it {hint}"
    return f"change it {hint}"


def listen_problem(key: str, value: str) -> str | None:
    """Why `serve` could not bind `value` (a name that does not resolve, an address
    that is not this machine's); None if fine.

    Each resolved address is bound with port 0: that finds EADDRNOTAVAIL (a typo
    in an IP, an address of another host, IPv6 switched off) without touching
    the configured port, which a running relay may hold while its next config
    is checked. Whether that port is free is for `serve` to find.
    """
    host, port = parse_hostport(value)
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{key} = {value!r}: host name not found ({exc.strerror}) (fix: use an IP address)"
    for family, kind, proto, _, address in found:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((address[0], 0, *address[2:]))
        except OSError as exc:
            fix = _bind_fix(exc, key, value)
            return f"{key} = {value!r}: cannot bind {address[0]}: {errno_words(exc)} (fix: {fix})"
    return None


# ------------------------------------------------------------------ paths


def state_dirs(cfg: Config) -> list[tuple[str, Path]]:
    """The directories the relay writes, with the key that sets each."""
    dirs = [("quarantine.path", Path(cfg.quarantine.path)), ("spool.path", Path(cfg.spool.path))]
    scheme, _, _, path = upstream_parts(cfg.upstream.url)
    if scheme == "maildir":
        dirs.append(("upstream.url", Path(path)))
    return dirs


def dir_problem(key: str, path: Path) -> str | None:
    """Why `serve` could not use `path` as this user, or None; creates nothing.

    A missing directory is fine when `serve` could create it: its nearest
    existing parent must be a directory this user may write into.
    """
    dangling = _dangling_link(key, path)
    if dangling is not None:
        reason, fix = dangling
        return f"{key}: {path} {reason} (fix: {fix})"
    if path.exists():
        if not path.is_dir():
            return f"{key}: {path} is not a directory (fix: point {key} at a directory)"
        if not os.access(path, os.W_OK | os.X_OK):
            if _read_only(path):
                return f"{key}: {path} is on a read-only file system (EROFS) (fix: {_remount_fix(key)})"
            return (
                f"{key}: {path} is not writable by {_user()} (fix: run as the relay's user, "
                f"or chown/chmod it, or point {key} elsewhere)"
            )
        return None
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if parent.is_dir() and _read_only(parent):
        return (
            f"{key}: {path} does not exist and cannot be created: {parent} is on a read-only "
            f"file system (EROFS) (fix: {_remount_fix(key)})"
        )
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return (
            f"{key}: {path} does not exist and {_user()} cannot create it in {parent} "
            f"(fix: create it for the relay's user, e.g. install -d -m 0700 -o bccguard {path}; "
            f"or point {key} elsewhere)"
        )
    return None


def _read_only(path: Path) -> bool:
    """True when `path` sits on a file system mounted read-only: EROFS, not a permission."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _remount_fix(key: str) -> str:
    return f"mount it read-write (a volume mounted :ro?), or point {key} elsewhere"


def _dangling_link(key: str, path: Path) -> tuple[str, str] | None:
    """Why a symbolic link whose target is missing cannot be used, and the fix; or None.

    mkdir() refuses to create through it (EEXIST), and creating the target
    would be wrong anyway: it is most often a volume not mounted yet.
    """
    if not path.is_symlink() or path.exists():
        return None
    return (
        f"is a symbolic link to {path.readlink()}, which does not exist",
        f"create the target or mount its volume, or point {key} elsewhere",
    )


def prepare_dirs(cfg: Config) -> list[tuple[str, Path]]:
    """`serve` only: create the state directories (0700) that are missing; the created ones.

    Raises StartError naming the key when one cannot be created or written.
    """
    created = []
    for key, path in state_dirs(cfg):
        existed = path.is_dir()
        dangling = _dangling_link(key, path)
        if dangling is not None:
            raise StartError(key, str(path), *dangling)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StartError(
                key, str(path), f"cannot create {exc.filename or path}: {errno_words(exc)}",
                f"create it for the relay's user, or point {key} elsewhere",
            ) from None  # fmt: skip
        if not os.access(path, os.W_OK | os.X_OK):
            if _read_only(path):
                raise StartError(key, str(path), "read-only file system (EROFS)", _remount_fix(key))
            raise StartError(
                key, str(path), f"not writable by {_user()}: permission denied (EACCES)",
                f"run as the relay's user, or chown it, or point {key} elsewhere",
            )  # fmt: skip
        if not existed:
            created.append((key, path))
    return created


NO_INTERNAL_DOMAINS = (
    "policy.internal_domains is empty: colleagues' addresses count as customers' and are hidden "
    "or counted as exposed (fix: internal_domains = [\"corp.example\"] in [policy], "
    "or serve --internal-domain corp.example)"
)


def policy_warnings(cfg: Config) -> list[str]:
    """Legal configs that probably do not do what the admin wants; said by serve, check and config check."""
    return [NO_INTERNAL_DOMAINS] if not cfg.policy.defaults.internal_domains else []
