"""Console accounts: `name:role:hash` lines, the hash being the scrypt of `bccguard passwd`.

Why a file and not a database: a handful of admins, managed with
`bccguard console-user`, readable by the console's user only (0600), written
atomically like everything bccguard keeps. Names are a boring alphabet
(letters, digits, `_ . -`): they appear in the audit log, log lines and
pages, and must never be an e-mail address.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path

from bccguard.config import CONSOLE_USER_RE
from bccguard.smtp.auth import (
    DEFAULT_LN,
    DEFAULT_P,
    DEFAULT_R,
    KEY_LEN,
    SALT_LEN,
    _Hash,
    check_password,
    hash_password,
    parse_hash,
)
from bccguard.store.durable import atomic_write

ROLES = ("reviewer", "admin")


class AccountsError(Exception):
    """The users file cannot be used or changed; the message names the fix, never a hash."""


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    hash: _Hash

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def name_problem(name: str) -> str | None:
    if not CONSOLE_USER_RE.fullmatch(name):
        return "names are 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise AccountsError(f"{path}: not UTF-8 text") from None


def _parse(path: Path, lines: list[str]) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(":")
        role, _, encoded = rest.partition(":")
        problem = name_problem(name) or (None if role in ROLES else f"role {role!r} is not reviewer or admin")
        if problem is None:
            try:
                accounts[name] = Account(name, role, parse_hash(encoded.strip()))
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            raise AccountsError(
                f"{path} line {n}: {problem} (fix: bccguard console-user add NAME --role reviewer)"
            )
    return accounts


def load(path: str | Path) -> dict[str, Account]:
    p = Path(path)
    if not p.is_file():
        raise AccountsError(
            f"{p} does not exist (fix: bccguard console-user add NAME --role admin --config FILE)"
        )
    try:
        return _parse(p, _read_lines(p))
    except OSError as exc:
        raise AccountsError(f"{p}: cannot read ({exc.strerror})") from None


def _write(p: Path, lines: list[str]) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, ("\n".join(lines) + "\n").encode("utf-8") if lines else b"")


def add(path: str | Path, name: str, role: str, password: str) -> bool:
    """Add `name` or replace its role and password; True when it existed."""
    problem = name_problem(name)
    if problem:
        raise AccountsError(f"bad name {name!r}: {problem}")
    if role not in ROLES:
        raise AccountsError(f"role {role!r} is not reviewer or admin")
    p = Path(path)
    lines = _read_lines(p)
    _parse(p, lines)  # refuse to rewrite a file we cannot read back
    new = f"{name}:{role}:{hash_password(password)}"
    out, existed = [], False
    for line in lines:
        if line.partition(":")[0] == name and not line.lstrip().startswith("#"):
            if not existed:
                out.append(new)
            existed = True
        else:
            out.append(line)
    if not existed:
        out.append(new)
    _write(p, out)
    return existed


def remove(path: str | Path, name: str) -> bool:
    """Remove `name`; False when there was no such account."""
    p = Path(path)
    lines = _read_lines(p)
    out = [ln for ln in lines if ln.partition(":")[0] != name or ln.lstrip().startswith("#")]
    if len(out) == len(lines):
        return False
    _write(p, out)
    return True


class Verifier:
    """Password checks off the event loop; an unknown name costs what a known one does."""

    def __init__(self, accounts: dict[str, Account]) -> None:
        self.accounts = accounts
        sample = next(iter(accounts.values()), None)
        ln, r, p = (DEFAULT_LN, DEFAULT_R, DEFAULT_P)
        if sample is not None:
            ln, r, p = sample.hash.ln, sample.hash.r, sample.hash.p
        self._dummy = _Hash(ln, r, p, secrets.token_bytes(SALT_LEN), secrets.token_bytes(KEY_LEN))
        self._slots = asyncio.Semaphore(2)  # each check holds 32 MiB

    async def verify(self, name: str, password: str) -> Account | None:
        acc = self.accounts.get(name)
        target = acc.hash if acc is not None else self._dummy
        async with self._slots:
            ok = await asyncio.to_thread(check_password, password.encode("utf-8"), target)
        return acc if ok and acc is not None else None
