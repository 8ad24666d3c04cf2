"""Running the real `bccguard` command line from async tests.

The CLI runs as `sys.executable -m bccguard.cli` with this checkout's `src`
first on PYTHONPATH, so a worktree tests its own code even when another
checkout is installed. It runs through asyncio's subprocess support: the
recording sink lives in the test's event loop, and a blocking call would
stop it from answering the very release the test waits for.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy_helpers import poll, to_toml

SRC = Path(__file__).resolve().parents[1] / "src"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("BCCGUARD_CONFIG", None)
    return env


async def run_cli(*args: str, within: float = 60.0) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one `bccguard ...` run."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bccguard.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A config file from nested dicts (see deploy_helpers.to_toml)."""
    path.write_text(to_toml(data))
    return path


async def eventually(check: Callable[[], bool], *, within: float = 30.0, what: str = "") -> None:
    """Wait for an eventual state (a deadline, not a timing assertion)."""
    await poll(check, what, within, interval=0.02)
