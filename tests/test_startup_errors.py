"""`bccguard serve` that cannot start says which socket or path, why, and the key that sets it.

Each case runs the real command line (a single relay and a supervisor with
two workers) and expects exactly one stderr line: no "stopped" log line
before it, no catch-all naming every port, no traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proc import cli_env
from sink import closed_port

WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["single", "supervisor"])


def serve(cwd: Path, config: Path, *flags: str, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "bccguard.cli", "serve", "--config", str(config), *flags],
        cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return proc.returncode, proc.stderr


def config(tmp_path: Path, workers: int, extra: str = "") -> Path:
    for d in ("q", "s", "o"):
        (tmp_path / d).mkdir(exist_ok=True)  # existing: serve logs no "directory_created"
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nworkers = {workers}\n'
        f'[upstream]\nurl = "maildir:{tmp_path / "o"}"\n'
        f'[quarantine]\npath = "{tmp_path / "q"}"\n[spool]\npath = "{tmp_path / "s"}"\n'
        '[policy]\ninternal_domains = ["corp.example"]\n' + extra  # no warning line either
    )
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr  # no "stopped" line, no traceback, no second guess
    assert lines[0].startswith("bccguard: cannot start: ")
    return lines[0]


@WORKERS
def test_metrics_port_taken_names_metrics_listen_only(tmp_path: Path, busy_port: int, workers: int) -> None:
    rc, err = serve(tmp_path, config(tmp_path, workers, f'[metrics]\nlisten = "127.0.0.1:{busy_port}"\n'))
    line = one_line(err)
    assert rc == 1
    assert f"metrics.listen = '127.0.0.1:{busy_port}': address already in use (EADDRINUSE)" in line
    assert "server.listen" not in line and "--metrics-listen" in line


@WORKERS
def test_smtp_port_taken_names_server_listen_only(tmp_path: Path, busy_port: int, workers: int) -> None:
    rc, err = serve(tmp_path, config(tmp_path, workers, '[metrics]\nlisten = ""\n'),
                    "--listen", f"127.0.0.1:{busy_port}")  # fmt: skip
    line = one_line(err)
    assert rc == 1
    assert f"server.listen = '127.0.0.1:{busy_port}': address already in use (EADDRINUSE)" in line
    assert "metrics.listen" not in line and "attempting to bind" not in line


@WORKERS
@pytest.mark.parametrize("key", ["server.listen", "metrics.listen"])
def test_unknown_host_name_names_the_key(tmp_path: Path, workers: int, key: str) -> None:
    flag = "--listen" if key == "server.listen" else "--metrics-listen"
    rc, err = serve(tmp_path, config(tmp_path, workers), flag, "no-such-host.invalid:2525")
    line = one_line(err)
    assert rc == 1
    assert f"{key} = 'no-such-host.invalid:2525': host name not found" in line


def _without_root_powers() -> tuple[str, ...]:
    """root writes anywhere: drop the capability that lets it, so permissions apply as to anyone."""
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()


@WORKERS
@pytest.mark.parametrize("existing", [True, False], ids=["unwritable", "uncreatable"])
def test_unwritable_quarantine_names_the_path_and_key(tmp_path: Path, workers: int, existing: bool) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    target = locked if existing else locked / "quarantine"
    cfg = config(tmp_path, workers, '[metrics]\nlisten = ""\n')
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "q"), str(target)))
    try:
        rc, err = serve(tmp_path, cfg, prefix=_without_root_powers())
    finally:
        locked.chmod(0o755)
    line = one_line(err)
    assert rc == 1
    assert f"quarantine.path = '{target}'" in line and "permission denied (EACCES)" in line
    assert not (locked / "quarantine").exists()


# ---------------------------------------------------------------- files that exist but do not load

BAD_FILES = {
    "server-cert": ('[server.tls]\ncert = "{bad}"\nkey = "{bad}"\n', "server.tls: cannot load"),
    "upstream-ca": (
        '[upstream]\nurl = "smtps://127.0.0.1:{port}"\nca_file = "{bad}"\n',
        "upstream.ca_file: cannot load",
    ),
}


@WORKERS
@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
@pytest.mark.parametrize("content", [b"", b"not a certificate\n"], ids=["empty", "garbage"])
def test_a_tls_file_that_does_not_load_is_one_config_line_and_78(
    tmp_path: Path, workers: int, case: str, content: bytes
) -> None:
    """A ca_file that is no PEM made serve say "cannot start: unknown error 136" (no key, no
    file); with 2 workers (the default "auto" on two cores), a bad server certificate gave each
    worker's line, a "stopped" line and a RuntimeError traceback, exit 1. And config check
    passed the ca_file that serve then refused."""
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    extra, needle = BAD_FILES[case]
    cfg = config(tmp_path, workers, extra.format(bad=bad, port=closed_port()))
    text = cfg.read_text()
    if case == "upstream-ca":  # the file's own [upstream] (a maildir) gives way to this one
        text = text.replace(f'[upstream]\nurl = "maildir:{tmp_path / "o"}"\n', "")
    cfg.write_text(text)
    rc, err = serve(tmp_path, cfg)
    assert rc == 78, err
    (line,) = err.splitlines()
    assert line.startswith("bccguard: config error: ") and needle in line and "fix:" in line, line
    check = subprocess.run(
        [sys.executable, "-m", "bccguard.cli", "config", "check", "--config", str(cfg)],
        env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 78 and needle in check.stderr
