"""The console beside the relay: its systemd unit, its compose service, its config, its accounts CLI."""

from __future__ import annotations

import asyncio
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from bccguard.config import load
from console_helpers import cli
from deploy_helpers import SRC, require_binary

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "bccguard-console.service"
DOCKER = ROOT / "deploy" / "docker"
UNIT_BIN = "/opt/bccguard/bin/bccguard"


def test_console_unit_passes_systemd_analyze_verify_and_is_hardened(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", package="systemd")
    shim = tmp_path / "opt" / "bccguard" / "bin" / "bccguard"
    shim.parent.mkdir(parents=True)
    python, src = shlex.quote(sys.executable), shlex.quote(str(SRC))
    shim.write_text(f'#!/bin/sh\nPYTHONPATH={src} exec {python} -m bccguard.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    copy = tmp_path / "bccguard-console.service"
    copy.write_text(UNIT.read_text().replace(UNIT_BIN, str(shim)))
    r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60,
                       check=False)  # fmt: skip
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr
    sec = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(copy)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", sec.stdout + sec.stderr)
    assert m and float(m.group(1)) <= 2.0, sec.stdout + sec.stderr
    text = UNIT.read_text()
    assert f"ExecStart={UNIT_BIN} console --config /etc/bccguard/bccguard.toml" in text
    assert "User=bccguard" in text and "Type=notify" in text and "RestartPreventExitStatus=78" in text


def test_compose_console_shares_the_relays_image_and_quarantine() -> None:
    c = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    relay, console = c["services"]["bccguard"], c["services"]["console"]
    assert console["image"] == relay["image"]
    assert console["command"][:1] == ["console"] and console["user"] == relay["user"]
    q = next(v for v in relay["volumes"] if v.endswith(":/var/lib/bccguard/quarantine"))
    assert q in console["volumes"], "the console must see the relay's quarantine volume"
    assert console["ports"] == ["127.0.0.1:9466:9466"]
    assert console["read_only"] is True and console["cap_drop"] == ["ALL"]
    assert any("9466/healthz" in part for part in console["healthcheck"]["test"])
    mounted = {m.split(":")[1]: m.split(":")[0] for m in console["volumes"]}
    assert (DOCKER / mounted["/etc/bccguard/console.toml"]).is_file()


def test_console_config_agrees_with_the_relays() -> None:
    """A rewritten release uses the console's [policy]: it must be the relay's."""
    relay = tomllib.loads((DOCKER / "bccguard.toml").read_text())
    console = tomllib.loads((DOCKER / "console.toml").read_text())
    for key in ("upstream", "quarantine", "policy"):
        assert console[key] == relay[key], key
    cfg = load(DOCKER / "console.toml")
    assert cfg.console.listen == "0.0.0.0:9466"
    assert Path(cfg.console.users_file).parent == Path(cfg.quarantine.path)
    example = load(ROOT / "config" / "bccguard.toml")
    assert example.console.listen == "127.0.0.1:9466" and example.console.session_ttl == 8 * 3600


async def test_console_user_add_list_change_remove(tmp_path: Path) -> None:
    users = str(tmp_path / "users")
    rc, out, err = await cli("console-user", "add", "rita", "--role", "reviewer", "--file", users,
                             stdin="s3cret-enough-1\n")  # fmt: skip
    assert rc == 0 and "added rita (reviewer)" in out, err
    line = await asyncio.to_thread(Path(users).read_text)
    assert line.startswith("rita:reviewer:$scrypt$ln=15,r=8,p=1$") and "s3cret" not in line
    assert stat.S_IMODE((await asyncio.to_thread(Path(users).stat)).st_mode) == 0o600
    rc, out, _ = await cli("console-user", "add", "rita", "--role", "admin", "--file", users,
                           stdin="x-long-enough\n")  # fmt: skip
    assert rc == 0 and "updated rita (admin)" in out
    rc, out, _ = await cli("console-user", "add", "adam", "--role", "admin", "--file", users,
                           stdin="y-long-enough\n")  # fmt: skip
    rc, out, _ = await cli("console-user", "list", "--file", users)
    assert (rc, out) == (0, "adam\tadmin\nrita\tadmin\n")
    rc, out, _ = await cli("console-user", "remove", "rita", "--file", users)
    assert rc == 0 and "removed rita" in out
    rc, out, _ = await cli("console-user", "list", "--file", users)
    assert out == "adam\tadmin\n"

    for args, stdin, why in (
        (["add", "bob@corp.example", "--role", "admin"], "pw\n", "bad name"),
        (["add", "bob", "--role", "admin"], "\n", "at least 12 are needed"),
        (["add", "bob", "--role", "admin"], "short-pw-11\n", "the password has 11 characters"),
        (["remove", "nobody"], "", "no account nobody"),
        (["list"], "", None),
    ):
        extra = ["--file", users] if why else []
        rc, _, err = await cli("console-user", *args, *extra, stdin=stdin)
        assert rc == 2 and "Traceback" not in err, err
        assert (why or "no users file") in err
    rc, _, err = await cli("console-user", "add", "bob", "--role", "boss", "--file", users, stdin="pw\n")
    assert rc == 2 and "invalid choice" in err
