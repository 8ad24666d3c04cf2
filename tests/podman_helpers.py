"""Podman for the container tests: the flags this kind of machine needs, stand-in base images, cleanup.

Why podman: no Docker daemon where the tests run, and Debian's podman with the
`runc` runtime runs real containers (FIELD-NOTES "Containers"). Every call gets
`--runtime runc` (crun refuses the hybrid cgroup layout) and containers get
`--ulimit nofile/nproc=1024` (podman's defaults are refused here).

Networking: each bccguard container gets its own network namespace
(`slirp4netns`, with the host's loopback reachable as 10.0.2.2), and its ports
are published on free host loopback ports. With `--network host` instead, the
image's fixed ports (10025, and 9465 that HEALTHCHECK probes) would be the
host's: a quick-start relay on the same machine would answer the health check.

Names: every container and volume is named `bccguard-test-<run>-<what>`, and
only what this run created is removed. Base images are shared and kept: their
tags are the names the Dockerfiles use (`python:3.11-slim`, `debian:12-slim`),
built once per machine by base-images.sh when no image has that tag.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE_SCRIPT = ROOT / "tests" / "containers" / "base-images.sh"
RUNTIME = ["--runtime", "runc"]  # global flag: every podman call uses it
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# docker format: podman's default OCI format silently drops HEALTHCHECK.
# --layers=false: no intermediate images left behind by each run's build.
BUILD = ["build", "--pull=never", "--format", "docker", "--layers=false", "--network", "host", *LIMITS]
HOST_FROM_CONTAINER = "10.0.2.2"  # slirp4netns allow_host_loopback: the host's 127.0.0.1
NETWORK = "slirp4netns:allow_host_loopback=true"
BASE_IMAGES = ("python:3.11-slim", "debian:12-slim")


class PodmanError(AssertionError):
    pass


class Podman:
    """One test session's podman: runs commands, names and cleans up what it creates."""

    def __init__(self, exe: str) -> None:
        self.exe = exe
        self.run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.images: list[str] = []

    def name(self, what: str) -> str:
        return f"bccguard-test-{self.run_id}-{what}"

    def argv(self, *args: str) -> list[str]:
        return [self.exe, *RUNTIME, *args]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A podman command, blocking (session fixtures; tests use `arun`)."""
        r = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise PodmanError(f"podman {' '.join(args[:3])}... exited {r.returncode}:\n{tail(r.stderr)}")
        return r

    async def arun(self, *args: str, timeout: float = 120, check: bool = True) -> tuple[int, str, str]:
        """A podman command from a test: asyncio's subprocess, so the in-loop sink keeps answering."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise PodmanError(f"podman {' '.join(args[:3])}... did not finish in {timeout:.0f}s") from None
        rc = proc.returncode
        assert rc is not None
        if check and rc != 0:
            raise PodmanError(f"podman {' '.join(args[:3])}... exited {rc}:\n{tail(err.decode())}")
        return rc, out.decode(), err.decode()

    def build(self, dockerfile: str, what: str) -> str:
        """Build a Dockerfile of this repository (context: its root), as shipped; the image's tag."""
        tag = f"localhost/{self.name(what)}:test"
        self.run(*BUILD, "-f", str(ROOT / dockerfile), "-t", tag, str(ROOT), timeout=900)
        self.images.append(tag)
        return tag

    def remove_images(self) -> None:
        for tag in reversed(self.images):
            self.run("rmi", "--force", tag, check=False)
        self.images.clear()


def tail(text: str, n: int = 25) -> str:
    lines = [line for line in text.splitlines() if "systemd" not in line]  # no systemd timers here
    return "\n".join(lines[-n:])


def ensure_base_images(podman: Podman) -> None:
    """The stand-in base images (about a minute, once per machine; kept afterwards)."""
    if all(podman.run("image", "exists", b, check=False).returncode == 0 for b in BASE_IMAGES):
        return
    r = subprocess.run(
        ["sh", str(BASE_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
        env={**os.environ, "PODMAN": podman.exe},
    )
    if r.returncode != 0:
        raise PodmanError(f"tests/containers/base-images.sh failed:\n{tail(r.stdout + r.stderr)}")


def can_run_containers(podman: Podman) -> str | None:
    """None if podman runs a container here, else the one-line reason it cannot.

    Asked before any image exists: the probe runs the host's own `true` on an
    overlay of the host's root (`--rootfs /:O`, nothing written through).
    """
    r = podman.run(
        "run", "--rm", *LIMITS, "--network", "none", "--rootfs", "/:O", "true", timeout=120, check=False
    )
    if r.returncode == 0:
        return None
    lines = [line for line in tail(r.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else f"podman run exited {r.returncode}"


class Containers:
    """The containers and volumes one test starts; all removed at the end, logs kept for failures."""

    def __init__(self, podman: Podman) -> None:
        self.podman = podman
        self.names: list[str] = []
        self.volumes: list[str] = []

    async def volume(self, what: str) -> str:
        name = self.podman.name(what)
        await self.podman.arun("volume", "create", name)
        self.volumes.append(name)
        return name

    async def start(self, what: str, *args: str) -> tuple[str, float]:
        """`podman run -d --name <unique> ARGS`; (name, the time it was started)."""
        name = self.podman.name(what)
        self.names.append(name)
        started = time.monotonic()
        await self.podman.arun("run", "-d", "--name", name, *LIMITS, *args, timeout=120)
        return name, started

    async def inspect(self, name: str) -> dict[str, Any]:
        _, out, _ = await self.podman.arun("inspect", name)
        data = json.loads(out)
        assert isinstance(data, list) and data
        first: dict[str, Any] = data[0]
        return first

    async def logs(self, name: str) -> str:
        _, out, err = await self.podman.arun("logs", name, check=False)
        return out + err

    async def events(self, name: str, event: str) -> list[dict[str, Any]]:
        """bccguard's JSON log lines with this event name."""
        out = []
        for line in (await self.logs(name)).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == event:
                out.append(rec)
        return out

    async def healthy(self, name: str) -> bool:
        """Run the image's HEALTHCHECK now (no systemd timers here to run it on its interval)."""
        rc, _, _ = await self.podman.arun("healthcheck", "run", name, check=False, timeout=30)
        return rc == 0

    async def exec(self, name: str, *argv: str) -> tuple[int, str, str]:
        return await self.podman.arun("exec", name, *argv, check=False, timeout=60)

    async def remove(self, name: str) -> None:
        """Remove a container now (its anonymous volumes too; named ones stay for the next container)."""
        await self.podman.arun("rm", "--force", "--volumes", "--time", "2", name, check=False, timeout=60)
        if name in self.names:
            self.names.remove(name)

    async def cleanup(self) -> None:
        for name in list(reversed(self.names)):  # dependents (joined network namespaces) first
            print(f"---- podman logs {name}\n{tail(await self.logs(name), 40)}")
            await self.remove(name)
        self.names.clear()
        for vol in self.volumes:
            await self.podman.arun("volume", "rm", "--force", vol, check=False)
        self.volumes.clear()
