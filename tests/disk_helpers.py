"""Real disk faults for tests: a tiny tmpfs that fills up, or one remounted read-only.

No mocks: the relay's own open/write/fsync calls meet ENOSPC or EROFS from
the kernel. Mounting needs root (CI runs as root); elsewhere the test is
skipped with one line saying why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class SmallDisk:
    """A mounted tmpfs of a few hundred KiB: fill() it, make it read_only(), then heal()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> None:
        """Write until the kernel says ENOSPC: every later data write fails the same way."""
        with open(self._filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        probe = self.path / "probe"
        try:
            probe.write_bytes(b"x" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        else:  # pragma: no cover - the fill must leave no room
            raise AssertionError("the tmpfs still has room after fill()")
        finally:
            probe.unlink(missing_ok=True)

    def read_only(self) -> None:
        """Every later open for writing under the path meets EROFS.

        A read-only bind mount over the tmpfs, not a remount of the tmpfs
        itself: the relay holds its instance lock open for writing there
        (ops/instance.py), and the kernel refuses to remount a filesystem
        read-only under an open writer (EBUSY), as it would on a real disk.
        The lock stays on the mount below; new opens go through the top one.
        """
        _mount("--bind", str(self.path), str(self.path))
        _mount("-o", "remount,bind,ro", str(self.path))
        self._bound = True

    def heal(self) -> None:
        """Writable again, with room."""
        if getattr(self, "_bound", False):
            subprocess.run(["umount", str(self.path)], capture_output=True, check=True)
            self._bound = False
        self._filler.unlink(missing_ok=True)


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=True)


@contextlib.contextmanager
def mounted_small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 256 KiB tmpfs under `tmp_path`, unmounted afterwards; skips where mounting is impossible."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield SmallDisk(mnt)
    finally:
        for _ in range(3):  # the read-only bind, if any, then the tmpfs itself
            if subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False).returncode:
                break


def assert_no_address(logs: list[dict[str, Any]]) -> None:
    """No log event, whatever its fields, carries an address-like token."""
    for event in logs:
        text = json.dumps(event, default=str)
        assert "@" not in text, f"an address-like text leaked into a log line: {text}"


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[None]:
    """`path` alone read-only (a read-only bind mount over itself); writable again afterwards."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
