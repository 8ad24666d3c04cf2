"""Helpers for the deployment tests: real binaries, the relay as a real process, TOML out.

The deployment tests drive what an admin would run: `bccguard serve` as a
subprocess with a config file, Postfix, HAProxy, systemd-analyze. A test that
needs a binary fails in CI (where `.ci/run` installs it) and is skipped with
the reason elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def require_binary(name: str, *, package: str | None = None) -> str:
    """The binary's path; missing: fail under CI (.ci/run installs it), skip elsewhere."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}") if Path(p).exists()), None
    )
    if path:
        return path
    why = f"{name} not installed (Debian package {package or name}; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def require_root(what: str) -> None:
    if os.geteuid() == 0:
        return
    why = f"{what} needs root"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (bound, then released). The race is acceptable on loopback."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


# ------------------------------------------------------------------ TOML out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string for what we write
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for bccguard configs: tables, scalars, lists, arrays of tables."""
    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_aot(v)}
        if prefix and (scalars or not d):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                table(name, v)
            elif _is_aot(v):
                for item in v:
                    lines.append(f"[[{name}]]")
                    lines.extend(f"{ik} = {_toml_value(iv)}" for ik, iv in item.items())

    table("", data)
    return "\n".join(lines) + "\n"


def _is_aot(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


# ------------------------------------------------------------------ the relay as a process


class RelayProcess:
    """`python -m bccguard.cli serve --config FILE`, JSON logs captured to a file."""

    def __init__(
        self, config_path: Path, log_path: Path, *, name: str = "relay", env: dict[str, str] | None = None
    ) -> None:
        self.config_path = config_path
        self.extra_env = env or {}
        self.log_path = log_path
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._starts_before = 0

    def start(self) -> RelayProcess:
        env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.extra_env)
        self._starts_before = len(self.events("started"))
        self._log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bccguard.cli", "serve", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env=env,
        )
        return self

    def logs(self) -> list[dict[str, Any]]:
        out = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"event": "_raw", "line": line}
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == name]

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: timed out waiting for {what}:\n{self.tail()}")

    def wait_started(self, timeout: float = 20.0) -> None:
        """Until this run's "started" line (a restart appends to the same log)."""
        self.wait_for(
            lambda: len(self.events("started")) > self._starts_before, "the 'started' log line", timeout
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end by itself (after a signal the test sent)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL past the timeout. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        rc = self.proc.returncode
        self.proc = None
        return rc

    def tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-n:])

    async def astart(self, within: float = 20.0) -> RelayProcess:
        self.start()
        await asyncio.to_thread(self.wait_started, within)
        return self

    async def astop(self, within: float = 30.0) -> int:
        return await asyncio.to_thread(self.stop, within)


async def poll(predicate: Callable[[], bool], what: str, within: float, interval: float = 0.1) -> None:
    """Wait in the event loop (so in-loop sinks keep serving) until predicate() holds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(interval)
