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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_toml(path: Path, data: dict[str, dict[str, Any]]) -> Path:
    """A config file from {section: {key: value}} (one level of tables is all tests need)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


async def eventually(check: Callable[[], bool], *, within: float = 30.0, what: str = "") -> None:
    """Wait for an eventual state (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s: {what}")
        await asyncio.sleep(0.02)
