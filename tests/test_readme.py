"""The README's commands, run as written: a reader who copies them gets what it promises.

The "Try it" smtplib script and the `check` example are cut out of README.md
and run (only the port and the venv path substituted); the quick start's run
and test commands must not share an environment (the test command's
`pip install -e` once replaced the package under a running relay), and
.ci/run must run the README's test command verbatim.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import StartRelay
from proc import cli_env
from sink import Sink

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def sh_blocks(section: str) -> list[str]:
    """The ```sh blocks of one `## section` of the README."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, flags=re.DOTALL)


def test_quick_start_run_and_test_commands_use_separate_environments() -> None:
    run, test = sh_blocks("Quick start")
    run_venv = re.findall(r"-m venv (\S+)", run)
    test_venv = re.findall(r"-m venv (\S+)", test)
    assert run_venv and test_venv and run_venv != test_venv
    assert "--internal-domain" in run
    ignored = (ROOT / ".gitignore").read_text().split()
    assert f"{run_venv[0]}/" in ignored and f"{test_venv[0]}/" in ignored
    ci = (ROOT / ".ci" / "run").read_text()
    assert test.strip() in ci.splitlines(), ".ci/run must run the README's test command verbatim"


async def test_the_readme_smtplib_example_runs_against_a_relay(start_relay: StartRelay, sink: Sink) -> None:
    block = next(b for b in sh_blocks("Try it") if "import smtplib" in b)
    script = block.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    app = await start_relay(sink.url)  # internal_domains = ["corp.example"], as the quick start says
    script = script.replace('"127.0.0.1", 10025', f'"127.0.0.1", {app.port}')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE, env=cli_env()
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    (got,) = sink.messages
    assert sorted(got.rcpt_tos) == sorted(
        ["alice@gmail.com", "bob@orange.fr", "carol@clients.example", "boss@corp.example"]
    )
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert b"alice@" not in head and b"bob@" not in head and b"carol@" not in head
    assert b"Cc: boss@corp.example" in head and b"X-BCCGuard: rewritten; hidden=3" in head


def test_the_readme_check_example_says_what_it_shows(tmp_path: Path) -> None:
    block = next(b for b in sh_blocks("Try it") if "bccguard check" in b)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    bccguard = f"{shlex.quote(sys.executable)} -m bccguard.cli"
    script = "\n".join(c.replace(".venv/bin/bccguard", bccguard) for c in commands)
    proc = subprocess.run(
        ["sh", "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr == ""  # 1: it would be changed; no warning
    result = json.loads(proc.stdout)
    comment = block.split("\n# ", 1)[1]  # abridged with "...": compare the fields it names
    assert result["action"] == "rewrite" and result["exposure"] is True and result["hidden"] == 3
    assert result["visible_external"] == ["alice@gmail.com", "bob@orange.fr", "carol@clients.example"]
    for field in ('"action": "rewrite"', '"hidden": 3', '"visible": 4', '"rule": "default"'):
        assert field in comment and field in proc.stdout


def test_the_postfix_guide_installs_bccguard_and_its_config_as_the_systemd_guide_does() -> None:
    postfix = (ROOT / "deploy" / "postfix" / "README.md").read_text()
    systemd = (ROOT / "deploy" / "systemd" / "README.md").read_text()

    def config_installs(text: str) -> set[str]:
        lines = [x for x in text.splitlines() if "install -m" in x and "/etc/bccguard/bccguard.toml" in x]
        assert lines
        return {line.split("install", 1)[1].split("deploy/", 1)[0].strip() for line in lines}

    # every placement's guide (milter, after-queue, before-queue) installs it the same way
    assert config_installs(postfix) == config_installs(systemd) == {"-m 0640 -o root -g bccguard"}
    assert "/opt/bccguard/bin/pip install" in postfix and "/opt/bccguard/bin/pip install" in systemd


@pytest.mark.postfix
def test_the_postfix_lab_recipe_runs_as_written(tmp_path: Path) -> None:
    """deploy/postfix/README.md's private-Postfix lab, cut out and run (only the ports moved)."""
    from deploy_helpers import free_port, require_binary, require_root

    require_root("a private Postfix instance")
    require_binary("postfix")
    require_binary("smtp-sink", package="postfix")
    guide = (ROOT / "deploy" / "postfix" / "README.md").read_text()
    lab = guide.split("### Try it first on a private Postfix", 1)[1].split("\n### ", 1)[0]
    setup, send = re.findall(r"```sh\n(.*?)```", lab, flags=re.DOTALL)[:2]
    ports = {p: str(free_port()) for p in ("2525", "2526", "10025", "10026")}
    lab_dir = Path(tempfile.mkdtemp(prefix="bccguard-lab-", dir="/var/tmp"))  # maillog must be under /var
    # Send once the relay listens (a reader waits for its "started" line; Postfix would defer for minutes).
    ready = "for _ in $(seq 120); do (exec 3<>/dev/tcp/127.0.0.1/10025) 2>/dev/null && break; sleep 1; done\n"
    script = setup + ready + send
    script = script.replace("LAB=/var/tmp/bccguard-lab", f"LAB={lab_dir}")
    script = re.sub(r"\b(2525|2526|10025|10026)\b", lambda m: ports[m.group(1)], script)
    move = f"s/:10025/:{ports['10025']}/; s/:10026/:{ports['10026']}/"
    for snippet in ("main.cf.after-queue", "master.cf.after-queue"):
        shipped = f"{ROOT}/deploy/postfix/{snippet}"
        script = script.replace(f"cat deploy/postfix/{snippet}", f"sed -e '{move}' {shipped}")
    python = shlex.quote(sys.executable)
    script = script.replace(".venv/bin/python -c", f"{python} -c")
    listen = f"--listen 127.0.0.1:{ports['10025']} --metrics-listen ''"
    script = script.replace(".venv/bin/bccguard serve", f"{python} -m bccguard.cli serve {listen}")
    # A deadline instead of the guide's "sleep 5" (a loaded machine is slower than a reader).
    until_there = "for _ in $(seq 120); do grep -qs X-BCCGuard $LAB/sink/* && break; sleep 1; done; "
    script = script.replace("sleep 5; ", until_there)
    # Whatever happens, the relay and smtp-sink started in the background are stopped.
    script = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    try:
        proc = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
            timeout=180, check=False,
        )  # fmt: skip
    finally:
        subprocess.run(["postfix", "-c", f"{lab_dir}/etc", "stop"], capture_output=True, check=False)
        shutil.rmtree(lab_dir, ignore_errors=True)
    assert "To: news@corp.example" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "X-BCCGuard: rewritten; hidden=3" in proc.stdout
