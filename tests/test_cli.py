"""`bccguard check` and `bccguard config check`: what a sender or an admin sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bccguard.cli import main

SURVEY = (
    "From: Marketing <news@corp.example>\r\n"
    "To: " + ", ".join(f"Customer {i} <c{i}@Gmail.COM>" for i in range(12)) + ",\r\n"
    " =?utf-8?q?J=C3=B6rg?= <jorg@b\u00fccher.example>, partner@agency.example\r\n"
    "Cc: boss@corp.example\r\n"
    "Bcc: secret@clients.example\r\n"
    "Subject: survey\r\n\r\nbody\r\n"
)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "bccguard.toml"
    p.write_text(
        '[policy]\ninternal_domains = ["corp.example"]\npartner_domains = ["agency.example"]\n'
        '[[policy.rules]]\nname = "board"\nsenders = ["board@corp.example"]\naction = "reject"\n'
    )
    return p


def run_check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_json_reports_the_exposure_and_exits_1(tmp_path: Path, cfg: Path, capsys) -> None:
    eml = tmp_path / "survey.eml"
    eml.write_bytes(SURVEY.encode())
    code, out, _ = run_check(capsys, str(eml), "--config", str(cfg), "--json")
    assert code == 1
    r = json.loads(out)
    assert r["action"] == "rewrite" and r["exposure"] is True and r["rule"] == "default"
    assert r["visible_external"] == sorted(
        [f"c{i}@gmail.com" for i in range(12)] + ["jorg@xn--bcher-kva.example"]
    )
    assert r["hidden"] == 13
    assert r["visible_consumer"] == 12


def test_check_show_prints_the_headers_as_they_would_leave(tmp_path: Path, cfg: Path, capsys) -> None:
    eml = tmp_path / "survey.eml"
    eml.write_bytes(SURVEY.replace("\r\n", "\n").encode())  # files on disk are often LF
    code, out, _ = run_check(capsys, str(eml), "--config", str(cfg), "--show")
    assert code == 1
    headers = out.split("\n\n", 1)[1]
    assert "gmail" not in headers.lower() and "secret@" not in headers and "Bcc:" not in headers
    assert "partner@agency.example" in headers and "Cc: boss@corp.example" in headers
    assert "X-BCCGuard: rewritten; hidden=13" in headers


def test_check_internal_envelope_means_no_exposure(tmp_path: Path, cfg: Path, capsys) -> None:
    eml = tmp_path / "survey.eml"
    eml.write_bytes(SURVEY.encode())
    code, out, _ = run_check(
        capsys, str(eml), "--config", str(cfg), "--json", "--rcpt", "boss@corp.example"
    )
    assert code == 0
    assert json.loads(out)["action"] == "pass"


def test_check_rule_by_sender(tmp_path: Path, cfg: Path, capsys) -> None:
    eml = tmp_path / "survey.eml"
    eml.write_bytes(SURVEY.encode())
    code, out, _ = run_check(
        capsys, str(eml), "--config", str(cfg), "--json", "--mail-from", "board@corp.example"
    )
    assert code == 1
    r = json.loads(out)
    assert (r["action"], r["rule"]) == ("reject", "board")
    assert "13 customer addresses are visible" in r["reason"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "cannot read"), (b"", "is empty"), (b"no header here\n\nbody", "no header fields")],
)
def test_check_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, content, needle) -> None:
    eml = tmp_path / "x.eml"
    if content is not None:
        eml.write_bytes(content)
    code, out, err = run_check(capsys, str(eml))
    assert code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_config_check_names_every_bad_key_and_the_fix(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nlisten = "nowhere"\nmax_recipents = 5\n[policy]\naction = "nuke"\n'
        'max_visible_external = "ten"\n'
    )
    assert main(["config", "check", "--config", str(bad)]) == 78
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4
    joined = "\n".join(err)
    assert "server.listen" in joined and "fix:" in joined
    assert "server.max_recipents: unknown key (did you mean 'max_recipients'?)" in joined
    assert "policy.action: expected one of pass, audit, rewrite" in joined
    assert 'policy.max_visible_external: expected an integer, got "ten"' in joined


def test_every_shipped_config_is_valid(capsys) -> None:
    root = Path(__file__).parent.parent / "config"
    files = sorted(root.glob("*.toml"))
    assert files
    for f in files:
        code = main(["config", "check", "--config", str(f)])
        err = capsys.readouterr().err
        if code == 78:  # as a user who may not create /var/lib/bccguard: only that may fail
            problems = [line for line in err.splitlines() if "warning:" not in line]
            assert problems and all("cannot create it in" in line for line in problems), err
        else:
            assert code == 0, err


def test_serve_with_bad_config_exits_78_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[upstream]\nurl = 'ftp://x'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bccguard.cli", "serve", "--config", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 78
    assert proc.stderr.startswith("bccguard: config error:") and "upstream.url" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_durations_share_the_purge_syntax_and_numbers_stay_seconds(tmp_path: Path, capsys) -> None:
    from bccguard.config import load

    good = tmp_path / "good.toml"
    good.write_text(
        '[server]\ncommand_timeout = "5m"\nshutdown_timeout = 45\n[upstream]\ntimeout = 60.0\n'
        'pool_idle = "30s"\n[spool]\nretry_schedule = ["1m", 300]\nmax_age = "2w"\n'
    )
    cfg = load(good)
    assert (cfg.server.command_timeout, cfg.server.shutdown_timeout) == (300.0, 45.0)
    assert (cfg.upstream.timeout, cfg.upstream.pool_idle) == (60.0, 30.0)
    assert cfg.spool.retry_schedule == (60.0, 300.0) and cfg.spool.max_age == 14 * 86400.0
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstream]\ntimeout = "60"\n[spool]\nmax_age = "soon"\n')
    assert main(["config", "check", "--config", str(bad)]) == 78
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "upstream.timeout: '60' has no unit" in err[0] and '"1m"' in err[0]
    assert "spool.max_age: 'soon' is not a duration" in err[1]


@pytest.mark.parametrize(("rcpt", "verdict_code"), [(None, 1), ("boss@corp.example", 0)])
@pytest.mark.parametrize("fmt", [[], ["--json"], ["--show"]])
def test_check_into_a_closed_pipe_ends_quietly_with_the_verdict(
    tmp_path: Path, cfg: Path, rcpt: str | None, verdict_code: int, fmt: list[str]
) -> None:
    """`bccguard check m.eml | head -1`: head may be gone before check writes; no traceback, same code."""
    import os

    eml = tmp_path / "survey.eml"
    eml.write_bytes(SURVEY.encode())
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write hits EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bccguard.cli", "check", str(eml), "--config", str(cfg), *fmt,
             *(["--rcpt", rcpt] if rcpt else [])],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == verdict_code


def _with_stdout(stdout: object, *args: str, close_stdout: bool = False) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "bccguard.cli", *args],
        stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60, check=False,  # type: ignore[arg-type]
        preexec_fn=(lambda: os.close(1)) if close_stdout else None,
    )  # fmt: skip


def _commands(tmp_path: Path, cfg: Path) -> dict[str, tuple[list[str], int]]:
    """Commands that write to stdout, with the exit code each has when all goes well."""
    eml = tmp_path / "survey.eml"
    eml.write_bytes(SURVEY.encode())
    (tmp_path / "q").mkdir(exist_ok=True)
    cfg.write_text(cfg.read_text() + f'[quarantine]\npath = "{tmp_path / "q"}"\n')
    c = ["--config", str(cfg)]
    return {
        "check": (["check", str(eml), *c], 1),
        "check-json": (["check", str(eml), "--json", *c], 1),
        "config-check": (["config", "check", *c], 0),
        "quarantine-list": (["quarantine", "list", *c], 0),
    }


@pytest.mark.parametrize("command", ["check", "check-json", "config-check", "quarantine-list"])
def test_a_closed_stdout_is_quiet_with_the_commands_own_code(tmp_path: Path, cfg: Path, command: str) -> None:
    """`bccguard check m.eml >&-` (fd 1 closed, as some cron wrappers leave it): Python has no
    sys.stdout at all, and `check` died with AttributeError on flush."""
    args, code = _commands(tmp_path, cfg)[command]
    proc = _with_stdout(None, *args, close_stdout=True)
    assert (proc.returncode, proc.stderr) == (code, "")


@pytest.mark.parametrize("command", ["check", "check-json", "config-check", "quarantine-list"])
def test_a_full_disk_under_the_output_is_one_line_and_74(tmp_path: Path, cfg: Path, command: str) -> None:
    """`bccguard quarantine list > /dev/full` said "No space left on device on <quarantine path>
    (fix: ... check quarantine.path)", sending the admin to a disk that was fine; `check` and
    `config check` printed a traceback. The output is what failed: one line, exit 74 (EX_IOERR)."""
    args, _ = _commands(tmp_path, cfg)[command]
    with open("/dev/full", "w") as full:
        proc = _with_stdout(full, *args)
    assert proc.returncode == 74
    assert proc.stderr == "bccguard: cannot write the output: no space left on device (ENOSPC)\n"
