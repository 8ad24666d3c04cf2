"""The quarantine console as an admin runs it: `bccguard console` as a real process, real accounts.

Accounts are made with the real `bccguard console-user add` (password on
stdin), the console is started with a config file beside the relay's
quarantine, and it is stopped with SIGTERM. A small cookie-keeping HTTP
client (stdlib, in a thread) checks what a browser cannot see: headers,
cookie flags, status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from deploy_helpers import free_port
from proc import cli_env, write_toml

PASSWORDS = {"rita": "reviewer-pass-1", "adam": "admin-pass-1"}


def console_toml(tmp_path: Path, upstream_url: str, extra: dict[str, Any] | None = None) -> Path:
    """Same quarantine and policy as the relay of conftest.relay_config; the console on a free port."""
    data: dict[str, Any] = {
        "server": {"hostname": "bccguard.test"},
        "upstream": {"url": upstream_url, "timeout": 5.0},
        "quarantine": {"path": str(tmp_path / "quarantine")},
        "logging": {"format": "json"},
        "policy": {"internal_domains": ["corp.example"], "partner_domains": ["agency.example"],
                   "action": "quarantine"},
        "console": {"listen": f"127.0.0.1:{free_port()}", "users_file": str(tmp_path / "console-users")},
    }  # fmt: skip
    for k, v in (extra or {}).items():
        data[k] = {**data.get(k, {}), **v}
    return write_toml(tmp_path / "console.toml", data)


async def cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bccguard.cli", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def add_users(config: Path) -> None:
    for name, role in (("rita", "reviewer"), ("adam", "admin")):
        rc, _, err = await cli("console-user", "add", name, "--role", role, "--config", str(config),
                               stdin=PASSWORDS[name] + "\n")  # fmt: skip
        assert rc == 0, err


@dataclass
class Console:
    proc: asyncio.subprocess.Process
    base: str
    stderr: list[bytes] = field(default_factory=list)

    @property
    def log(self) -> str:
        return b"".join(self.stderr).decode("utf-8", "replace")


@contextlib.asynccontextmanager
async def running_console(config: Path, *, https: bool = False) -> AsyncIterator[Console]:
    text = (await asyncio.to_thread(config.read_text)).split("[console]", 1)[1]
    port = int(re.search(r'listen = "127\.0\.0\.1:(\d+)"', text).group(1))  # type: ignore[union-attr]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bccguard.cli", "console", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    c = Console(proc, f"{'https' if https else 'http'}://127.0.0.1:{port}")

    async def drain(stream: asyncio.StreamReader | None) -> None:
        while stream is not None and (line := await stream.readline()):
            c.stderr.append(line)

    readers = [asyncio.create_task(drain(proc.stderr)), asyncio.create_task(drain(proc.stdout))]
    try:
        for _ in range(300):
            if proc.returncode is not None:
                raise AssertionError(f"console exited {proc.returncode}: {c.log}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"console did not listen: {c.log}")
        yield c
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            await asyncio.gather(*readers, return_exceptions=True)
            assert proc.returncode == 0, f"console exited {proc.returncode} on SIGTERM: {c.log[-3000:]}"
        await asyncio.gather(*readers, return_exceptions=True)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: str

    def header(self, name: str) -> str:
        return self.headers.get(name) or ""


class Client:
    """Cookies kept like a browser's (no SameSite logic: same-site requests only)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies: dict[str, str] = {}
        self.set_cookies: list[str] = []

    def _conn(self) -> http.client.HTTPConnection:
        host, port = self.base.split("://")[1].split(":")
        if self.base.startswith("https"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(host, int(port), timeout=30, context=ctx)
        return http.client.HTTPConnection(host, int(port), timeout=30)

    def request(self, method: str, path: str, form: dict[str, Any] | None = None) -> Reply:
        conn = self._conn()
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            body = urlencode(form, doseq=True)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        text = r.read().decode("utf-8", "replace")
        for raw in r.headers.get_all("set-cookie") or []:
            self.set_cookies.append(raw)
            jar: SimpleCookie = SimpleCookie()
            jar.load(raw)
            for k, morsel in jar.items():
                if morsel.value and morsel["max-age"] != "0":
                    self.cookies[k] = morsel.value
                else:
                    self.cookies.pop(k, None)
        conn.close()
        return Reply(r.status, r.headers, text)

    async def get(self, path: str) -> Reply:
        return await asyncio.to_thread(self.request, "GET", path)

    async def post(self, path: str, form: dict[str, Any]) -> Reply:
        return await asyncio.to_thread(self.request, "POST", path, form)

    async def login(self, name: str, password: str | None = None) -> Reply:
        page = await self.get("/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.body).group(1)  # type: ignore[union-attr]
        secret = PASSWORDS.get(name, "") if password is None else password
        return await self.post("/login", {"nonce": nonce, "name": name, "password": secret})


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token on the page"
    return m.group(1)
