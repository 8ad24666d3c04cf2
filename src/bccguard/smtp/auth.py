"""SMTP AUTH credentials: a `user:hash` file of salted scrypt hashes, and how to check them.

Why scrypt from hashlib: it is memory-hard (an attacker with the file pays
32 MiB and tens of milliseconds per guess), needs no extra dependency, and
its parameters travel inside each hash string, so they can be raised later
without invalidating old lines. The format is the one passlib and others
use for scrypt:

    alice:$scrypt$ln=15,r=8,p=1$<salt, base64>$<key, base64>

Checking runs in a worker thread (a hash costs ~50 ms of CPU: never on the
event loop), at most `VERIFY_SLOTS` at a time (each one holds 32 MiB), and
an unknown user costs the same as a wrong password, so replies and timing
do not tell which user names exist. Comparison is constant-time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SCHEME = "$scrypt$"
DEFAULT_LN, DEFAULT_R, DEFAULT_P = 15, 8, 1  # n = 2**15: 32 MiB, ~50 ms
KEY_LEN = 32
SALT_LEN = 16
# Bounds on parameters read from a file: a typo must not make one AUTH
# attempt cost gigabytes or minutes.
_LN_RANGE, _R_RANGE, _P_RANGE = range(10, 21), range(1, 33), range(1, 17)
_MAX_MEM = 256 << 20
VERIFY_SLOTS = 2

_HASH = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})")
_BAD_USER = re.compile(r"[\x00-\x20:\x7f]")
MAX_USER = 256


class CredentialsError(Exception):
    """The credentials file cannot be used; one line per problem, never a hash or password."""


def user_problem(user: str) -> str | None:
    """Why `user` cannot be a user name in the file (it is also what AUTH clients send)."""
    if not user:
        return "empty user name"
    if len(user) > MAX_USER:
        return f"user name longer than {MAX_USER} characters"
    if _BAD_USER.search(user):
        return "user names may not contain ':', spaces or control characters"
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=KEY_LEN)


def hash_password(
    password: str | bytes, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """A new salted hash string for `password` (UTF-8 when given as text)."""
    secret = password.encode("utf-8") if isinstance(password, str) else password
    salt = secrets.token_bytes(SALT_LEN)
    key = _scrypt(secret, salt, ln, r, p)
    return f"{SCHEME}ln={ln},r={r},p={p}${_b64(salt)}${_b64(key)}"


@dataclass(frozen=True, slots=True)
class _Hash:
    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes


def parse_hash(encoded: str) -> _Hash:
    """Split a hash string; ValueError (with no secret in it) when it is not one we accept."""
    m = _HASH.fullmatch(encoded)
    if m is None:
        raise ValueError("not a $scrypt$ln=..,r=..,p=..$salt$key hash")
    ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if ln not in _LN_RANGE or r not in _R_RANGE or p not in _P_RANGE or 128 * r << ln > _MAX_MEM:
        raise ValueError("scrypt parameters out of range (ln 10-20, r 1-32, p 1-16, at most 256 MiB)")
    try:
        salt, key = _unb64(m.group(4)), _unb64(m.group(5))
    except (binascii.Error, ValueError):
        raise ValueError("bad base64 in hash") from None
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("salt or key too short")
    return _Hash(ln, r, p, salt, key)


def check_password(password: bytes, h: _Hash) -> bool:
    """Constant-time comparison of scrypt(password) with the stored key."""
    return hmac.compare_digest(_scrypt(password, h.salt, h.ln, h.r, h.p)[: len(h.key)], h.key)


@dataclass
class Credentials:
    """The users of one credentials file, as loaded (a reload builds a new object)."""

    users: dict[str, _Hash]
    source: str = ""
    _dummy: _Hash | None = field(default=None, repr=False)
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Credentials:
        p = Path(path)
        try:
            text = p.read_text("utf-8")
        except FileNotFoundError:
            raise CredentialsError(
                f"{p} does not exist (fix: create it with `bccguard passwd --file {p} USER`)"
            ) from None
        except OSError as exc:
            raise CredentialsError(f"{p}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise CredentialsError(f"{p}: not UTF-8 text") from None
        users: dict[str, _Hash] = {}
        problems: list[str] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, encoded = line.rpartition(":")
            problem = "expected user:hash" if not sep else user_problem(user)
            if problem is None:
                try:
                    users[user] = parse_hash(encoded.strip())
                except ValueError as exc:
                    problem = str(exc)
            if problem is not None:
                problems.append(f"{p} line {n}: {problem} (fix: bccguard passwd --file {p} USER)")
        if problems:
            raise CredentialsError("\n".join(problems))
        return cls(users=users, source=str(p))

    def _dummy_hash(self) -> _Hash:
        """A hash with typical parameters, so an unknown user costs what a known one does."""
        if self._dummy is None:
            sample = next(iter(self.users.values()), None)
            ln, r, pp = (sample.ln, sample.r, sample.p) if sample else (DEFAULT_LN, DEFAULT_R, DEFAULT_P)
            self._dummy = _Hash(ln, r, pp, secrets.token_bytes(SALT_LEN), secrets.token_bytes(KEY_LEN))
        return self._dummy

    async def verify(self, user: str, password: bytes) -> bool:
        """True when `user` exists and `password` matches; runs the hash off the event loop."""
        h = self.users.get(user)
        target = h if h is not None else self._dummy_hash()
        if self._slots is None:
            self._slots = asyncio.Semaphore(VERIFY_SLOTS)
        async with self._slots:
            ok = await asyncio.to_thread(check_password, password, target)
        return ok and h is not None


def set_password(path: str | Path, user: str, password: str) -> bool:
    """Add or replace `user` in the file (created 0600); True when the user existed.

    Written to a temporary file in the same directory, fsync'ed and renamed
    over the old one, so a crash leaves either the old or the new file.
    Other lines (comments, other users) are kept as they are.
    """
    problem = user_problem(user)
    if problem is not None:
        raise CredentialsError(problem)
    p = Path(path)
    try:
        lines = p.read_text("utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    existed = False
    out: list[str] = []
    new_line = f"{user}:{hash_password(password)}"
    for line in lines:
        if line.rpartition(":")[0] == user and not line.lstrip().startswith("#"):
            if not existed:
                out.append(new_line)
            existed = True
        else:
            out.append(line)
    if not existed:
        out.append(new_line)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).chmod(0o600)
        Path(tmp).replace(p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return existed
