"""Server-side sessions and the login rate limit, both in the console's memory.

Why server-side: the cookie carries only a random token, so logging out or
removing an account ends the session at once, and nothing about the user is
readable or forgeable in the cookie. Each session has its own CSRF token,
compared in constant time on every POST. A restart forgets every session,
which for a handful of admins is a feature (a login again), not a loss.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Session:
    name: str
    role: str
    csrf: str
    expires: float
    created: float = field(default_factory=time.time)


class Sessions:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._by_token: dict[str, Session] = {}

    def create(self, name: str, role: str) -> tuple[str, Session]:
        self._sweep()
        token = secrets.token_urlsafe(32)
        s = Session(name=name, role=role, csrf=secrets.token_urlsafe(32), expires=time.time() + self.ttl)
        self._by_token[token] = s
        return token, s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        s = self._by_token.get(token)
        if s is None:
            return None
        if s.expires <= time.time():
            del self._by_token[token]
            return None
        return s

    def __len__(self) -> int:
        return len(self._by_token)

    def end(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)

    def end_user(self, name: str) -> None:
        for t in [t for t, s in self._by_token.items() if s.name == name]:
            del self._by_token[t]

    def _sweep(self) -> None:
        now = time.time()
        for t in [t for t, s in self._by_token.items() if s.expires <= now]:
            del self._by_token[t]


def same(a: str | None, b: str | None) -> bool:
    """Constant-time token comparison; a missing token never matches."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


class LoginLimiter:
    """At most `limit` failed logins per account and per client address within `window` seconds.

    Both keys count: one address guessing many accounts is stopped by the
    address key, many addresses guessing one account by the account key
    (that one can lock an admin out for `window`; the alternative is letting
    a password be guessed). Failures only: a right password resets neither.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def blocked(self, name: str, address: str) -> bool:
        now = time.time()
        return any(len(self._recent(k, now)) >= self.limit for k in (f"u:{name}", f"a:{address}"))

    def failed(self, name: str, address: str) -> None:
        now = time.time()
        for k in (f"u:{name}", f"a:{address}"):
            self._recent(k, now).append(now)
        if len(self._fails) > 100_000:  # a flood of made-up names: forget the idle keys
            for k in [k for k, q in self._fails.items() if not q]:
                del self._fails[k]
