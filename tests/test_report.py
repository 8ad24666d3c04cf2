"""`bccguard report` (issue 13 item 11): verdicts for a batch of stored messages, table and JSON."""

from __future__ import annotations

import json
import mailbox
from pathlib import Path

import pytest

from bccguard.cli import main

CUSTOMERS = ", ".join(f"c{i}@gmail.com" for i in range(5))
BUSINESS = ", ".join(f"dev{i}@firm{i}.example" for i in range(12))
MESSAGES = {
    "survey": f"From: news@corp.example\nTo: {CUSTOMERS}\nSubject: survey\n\nhi\n",
    "colleague": "From: a@corp.example\nTo: b@corp.example\nSubject: lunch\n\nhi\n",
    "thread": f"From: a@corp.example\nTo: {BUSINESS}\nIn-Reply-To: <1@x>\nSubject: Re: bug\n\nhi\n",
    "no-rcpt": "From: a@corp.example\nSubject: draft\n\nhi\n",
}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "c.toml"
    p.write_text('[policy]\ninternal_domains = ["corp.example"]\naction = "audit"\n')
    return p


def _maildir(root: Path) -> Path:
    md = mailbox.Maildir(root / "Sent", create=True)
    for text in MESSAGES.values():
        md.add(text.encode())
    return root / "Sent"


def _mbox(root: Path) -> Path:
    box = mailbox.mbox(root / "sent.mbox", create=True)
    for text in MESSAGES.values():
        box.add(text.encode())
    box.flush()
    box.close()
    return root / "sent.mbox"


def _directory(root: Path) -> Path:
    d = root / "emls"
    d.mkdir()
    for name, text in MESSAGES.items():
        (d / f"{name}.eml").write_bytes(text.replace("\n", "\r\n").encode())
    (d / ".hidden").write_text("not mail")
    (d / "bare.eml").write_bytes(b"From: a@corp.example\r\nTo: b@gmail.com\r\n\r\nbare\nLF\r\n")
    return d


@pytest.mark.parametrize("make", [_maildir, _mbox, _directory])
def test_report_json_over_maildir_mbox_and_directory(tmp_path: Path, cfg: Path, capsys, make) -> None:
    path = make(tmp_path)
    assert main(["report", str(path), "--config", str(cfg), "--json"]) == 0
    out = capsys.readouterr().out
    assert "@" not in out.replace(str(tmp_path), "")  # counts, never an address
    r = json.loads(out)
    s = r["summary"]
    extra = 1 if make is _directory else 0  # the bare-LF file: refused at DATA
    assert s["messages"] == 4 + extra
    assert s["by_action"] == {"audit": 1, "pass": 2, "skip": 1} | ({"reject": 1} if extra else {})
    assert s["by_verdict"]["rewrite"] == 1 and s["would_change"] == 1 + extra and s["refused"] == extra
    survey = next(m for m in r["messages"] if m["consumer"] == 5)
    assert survey["would"] == "rewrite" and survey["rule"] == "default" and survey["external"] == 5
    thread = next(m for m in r["messages"] if m["reply"])
    assert thread["action"] == "pass" and thread["external"] == 12  # a business reply (item 10)


def test_report_table(tmp_path: Path, cfg: Path, capsys) -> None:
    path = _directory(tmp_path)
    assert main(["report", str(path), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["verdict", "rule", "ext"]
    assert any(line.startswith("rewrite") and line.endswith("survey.eml") for line in lines)
    assert any(line.startswith("reject") and line.endswith("bare.eml") for line in lines)
    assert "5 messages; enforcement would change 2 (40.0%)" in out


def test_report_bad_path_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err and "fix:" in err
