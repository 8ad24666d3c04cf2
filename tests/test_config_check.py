"""`bccguard config check`: passes only what `serve` would start with, and creates nothing.

It said "ok" to `listen = "999.1.1.1:10025"` that serve then refused, and
did not look at the directories the relay writes; `--deep` talks to the
upstream, TLS and ca_file included.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from disk_helpers import mounted_small_disk
from proc import cli_env, run_cli
from sink import Sink, closed_port, self_signed_cert, server_tls_context


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(
        f'[quarantine]\npath = "{tmp_path / "q"}"\n[spool]\npath = "{tmp_path / "s"}"\n'
        '[policy]\ninternal_domains = ["corp.example"]\n' + text
    )
    return p


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[server]\nlisten = "999.1.1.1:10025"\n', "server.listen: '999.1.1.1' is not an IPv4 address"),
        ('[metrics]\nlisten = "[::zz]:9465"\n', "metrics.listen: '::zz' is not an IPv6 address"),
        ('[server]\nlisten = "no-such-host.invalid:10025"\n', "server.listen = 'no-such-host.invalid:10025': "
         "host name not found"),
    ],
)
async def test_config_check_refuses_a_listen_address_serve_cannot_bind(
    tmp_path: Path, text: str, needle: str
) -> None:
    cfg = write(tmp_path, text)
    rc, out, err = await run_cli("config", "check", "--config", str(cfg))
    assert rc == 78 and out == ""
    assert len(err.splitlines()) == 1 and needle in err and "fix:" in err, err
    rc, _, err = await run_cli("serve", "--config", str(cfg), within=30)
    assert rc != 0, "serve started with what config check refused"


async def test_config_check_creates_nothing_and_accepts_creatable_paths(tmp_path: Path) -> None:
    """The shipped quarantine-review.toml once made /var/lib/bccguard/quarantine as root."""
    cfg = write(tmp_path, f'[upstream]\nurl = "maildir:{tmp_path / "deep/outbox"}"\n')
    rc, out, err = await run_cli("config", "check", "--config", str(cfg))
    assert (rc, err) == (0, ""), err
    assert "ok" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]  # noqa: ASYNC240 - a tiny listing


def _without_root_powers() -> tuple[str, ...]:
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()


@pytest.mark.parametrize("key", ["quarantine.path", "spool.path", "upstream.url"])
@pytest.mark.parametrize("existing", [True, False], ids=["unwritable", "uncreatable"])
def test_config_check_names_a_directory_this_user_cannot_write(
    tmp_path: Path, key: str, existing: bool
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    target = locked if existing else locked / "sub"
    section, name = key.split(".")
    value = f"maildir:{target}" if key == "upstream.url" else str(target)
    cfg = write(tmp_path, "")
    text = cfg.read_text()
    if section in ("quarantine", "spool"):
        text = text.replace(str(tmp_path / section[0]), str(target))
    else:
        text += f'[upstream]\nurl = "{value}"\n'
    cfg.write_text(text)
    try:
        proc = subprocess.run(
            [*_without_root_powers(), sys.executable, "-m", "bccguard.cli",
             "config", "check", "--config", str(cfg)],
            env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 78, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert f"{key}: {target}" in line and ("not writable" in line or "cannot create" in line)
    assert "fix:" in line
    assert not (locked / "sub").exists()


async def test_config_check_deep_talks_to_the_upstream_with_its_tls_files(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    async with Sink(starttls=server_tls_context(cert, key)) as sink:
        trusted = write(tmp_path, f'[upstream]\nurl = "{sink.url}"\nca_file = "{cert}"\n')
        rc, out, err = await run_cli("config", "check", "--deep", "--config", str(trusted))
        assert (rc, err) == (0, ""), err
        assert f"upstream {sink.url}: answered" in out
        assert b"STARTTLS\r\n" in sink.reads[0] and sink.verbs.count("EHLO") == 2  # EHLO again inside TLS

        untrusted = write(tmp_path, f'[upstream]\nurl = "{sink.url}"\n')
        rc, out, err = await run_cli("config", "check", "--deep", "--config", str(untrusted))
        assert rc == 1 and len(err.splitlines()) == 1 and "upstream.url" in err and "tls" in err.lower()

    down = write(tmp_path, f'[upstream]\nurl = "smtp://127.0.0.1:{closed_port()}"\n')
    rc, out, err = await run_cli("config", "check", "--config", str(down))
    assert rc == 0  # without --deep the upstream is not contacted
    rc, out, err = await run_cli("config", "check", "--deep", "--config", str(down))
    assert rc == 1 and len(err.splitlines()) == 1 and "upstream.url" in err and "Traceback" not in err


async def test_no_internal_domains_is_a_warning_from_serve_check_and_config_check(tmp_path: Path) -> None:
    bare = tmp_path / "bare.toml"
    bare.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nworkers = 1\n[metrics]\nlisten = ""\n'
        f'[quarantine]\npath = "{tmp_path / "q"}"\n[spool]\npath = "{tmp_path / "s"}"\n'
        f'[upstream]\nurl = "maildir:{tmp_path / "o"}"\n'
    )
    memo = tmp_path / "memo.eml"
    memo.write_text("From: a@corp.example\nTo: b@corp.example\nCc: boss@corp.example\nSubject: x\n\nhi\n")

    rc, out, err = await run_cli("config", "check", "--config", str(bare))
    assert rc == 0 and "ok" in out
    assert err.count("policy.internal_domains is empty") == 1 and "--internal-domain" in err

    rc, out, err = await run_cli("check", str(memo), "--config", str(bare))
    assert "policy.internal_domains is empty" in err and len(err.splitlines()) == 1
    rc, out, err = await run_cli("check", str(memo), "--config", str(write(tmp_path, "")))
    assert err == ""

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bccguard.cli", "serve", "--config", str(bare),
        stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    lines = []
    try:
        while not any(b'"started"' in line for line in lines):
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, lines
            lines.append(line)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.communicate(), 30)  # read on: a full stderr pipe would stall it
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    warned = [line for line in lines if b"policy.internal_domains is empty" in line]
    assert len(warned) == 1 and b'"level": "warning"' in warned[0]


# ---------------------------------------------------------------- cases next to the examples


@pytest.mark.parametrize("key", ["server.listen", "metrics.listen"])
@pytest.mark.parametrize("address", ["192.0.2.1:10025", "[fe80::1]:10025"], ids=["not-ours", "no-scope"])
async def test_config_check_refuses_an_address_this_machine_does_not_have(
    tmp_path: Path, key: str, address: str
) -> None:
    """A valid IP of another host (TEST-NET-1 here) is what a copied config carries; serve then
    fails with EADDRNOTAVAIL. The check binds port 0, so a running relay's port is no obstacle."""
    section, name = key.split(".")
    cfg = write(tmp_path, f'[{section}]\n{name} = "{address}"\n')
    rc, out, err = await run_cli("config", "check", "--config", str(cfg))
    assert rc == 78 and out == ""
    (line,) = err.splitlines()
    assert f"{key} = '{address}': cannot bind" in line and "fix:" in line, line
    rc, _, err = await run_cli("serve", "--config", str(cfg), within=30)
    assert rc != 0, "serve started with what config check refused"


async def test_config_check_passes_a_port_a_running_relay_already_holds(tmp_path: Path) -> None:
    """Checking the next config of a running relay: its own port is taken, and that is fine."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = write(tmp_path, f'[server]\nlisten = "127.0.0.1:{port}"\n')
        rc, out, err = await run_cli("config", "check", "--config", str(cfg))
    assert (rc, err) == (0, ""), err


@pytest.mark.parametrize("key", ["quarantine.path", "spool.path", "upstream.url"])
async def test_a_dangling_symlink_is_refused_by_config_check_and_by_serve_alike(
    tmp_path: Path, key: str
) -> None:
    """A state directory that is a link to a volume not mounted yet: config check said ok, and
    serve then failed with "file exists (EEXIST)". Both now name the link and its target."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "volume" / "not-mounted")
    cfg = write(tmp_path, "")
    section = key.partition(".")[0]
    text = cfg.read_text()
    if section in ("quarantine", "spool"):
        text = text.replace(f'"{tmp_path / section[0]}"', f'"{link}"')
    else:
        text += f'[upstream]\nurl = "maildir:{link}"\n'
    cfg.write_text(text)
    rc, out, err = await run_cli("config", "check", "--config", str(cfg))
    assert rc == 78 and out == ""
    (line,) = err.splitlines()
    assert f"{key}: {link} is a symbolic link to" in line and "not-mounted" in line and "fix:" in line
    rc, _, err = await run_cli("serve", "--config", str(cfg), within=30)
    assert rc != 0
    (line,) = [x for x in err.splitlines() if "cannot start" in x]
    assert key in line and "symbolic link" in line
    assert not (tmp_path / "volume").exists()  # nothing created behind the link


@pytest.mark.parametrize("existing", [True, False], ids=["existing", "missing"])
async def test_a_read_only_file_system_is_named_as_such_not_as_permission_denied(
    tmp_path: Path, existing: bool
) -> None:
    """As root, or with a volume mounted :ro, the errno is EROFS: "permission denied (EACCES)"
    sent the admin to chmod, which cannot help."""
    with mounted_small_disk(tmp_path) as disk:
        spool = disk.path / "spool"
        if existing:
            spool.mkdir()
        disk.read_only()
        cfg = write(tmp_path, "")
        cfg.write_text(cfg.read_text().replace(f'"{tmp_path / "s"}"', f'"{spool}"'))
        rc, out, err = await run_cli("config", "check", "--config", str(cfg))
        assert rc == 78 and out == ""
        (line,) = err.splitlines()
        assert f"spool.path: {spool}" in line and "read-only file system (EROFS)" in line, line
        assert "fix: mount it read-write" in line and "EACCES" not in line
        rc, _, err = await run_cli("serve", "--config", str(cfg), within=30)
        assert rc != 0
        (line,) = [x for x in err.splitlines() if "cannot start" in x]
        assert "spool.path" in line and "read-only file system (EROFS)" in line, line


@pytest.mark.parametrize(
    ("text", "clash"),
    [
        ('[server]\nlisten = "127.0.0.1:{p}"\n[metrics]\nlisten = "127.0.0.1:{p}"\n', "metrics.listen"),
        ('[server]\nlisten = "127.0.0.1:{p}"\n[metrics]\nlisten = "0.0.0.0:{p}"\n', "metrics.listen"),
        ('[server]\nlisten = "127.0.0.1:{p}"\n[console]\nlisten = "[::]:{p}"\n', "console.listen"),
        ('[server]\nlisten = "127.0.0.1:{p}"\n[metrics]\nlisten = "127.0.0.2:{p}"\n', None),
        ('[server]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n', None),
    ],
    ids=["same", "wildcard", "console-v6-wildcard", "other-loopback", "both-ephemeral"],
)
async def test_two_of_bccguards_own_sockets_on_one_port_are_a_config_error(
    tmp_path: Path, text: str, clash: str | None
) -> None:
    """config check said "ok"; serve then said "address already in use ... another process
    listens there (`ss -ltnp` names it)", and that other process was itself."""
    cfg = write(tmp_path, text.format(p=closed_port()))
    rc, out, err = await run_cli("config", "check", "--config", str(cfg))
    if clash is None:
        assert (rc, err) == (0, ""), err
        return
    assert rc == 78 and out == ""
    (line,) = err.splitlines()
    assert f"{clash}: port" in line and "server.listen" in line and "fix:" in line, line
    rc, _, err = await run_cli("serve", "--config", str(cfg), within=30)
    assert rc == 78 and "another process" not in err
