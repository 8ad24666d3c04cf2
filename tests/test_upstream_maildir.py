"""Maildir delivery: real files in tmp_path; os.fsync is wrapped (not replaced) to see it called."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bccguard.config import UpstreamConfig
from bccguard.upstream import Reply, UpstreamError, open_upstream
from bccguard.upstream.maildir import MaildirUpstream

MESSAGE = b"From: a@corp.test\r\nSubject: hi\r\n\r\nhello\r\n"


def _upstream(url: str) -> MaildirUpstream:
    up = open_upstream(UpstreamConfig(url=url), hostname="relay.test")
    assert isinstance(up, MaildirUpstream)
    return up


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths os.fsync was called on (the real fsync still runs)."""
    seen: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


async def test_one_durable_file_per_recipient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsynced: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    up = _upstream("maildir:var/outbox")
    rcpts = ["a@x.test", "b@y.test", "c@y.test"]
    result = await up.deliver("sender@corp.test", rcpts, MESSAGE)
    assert result.accepted == tuple(rcpts)
    assert result.refused == {}
    assert result.reply.code == 250

    root = tmp_path / "var" / "outbox"
    for sub in ("", "tmp", "new", "cur"):
        assert _mode(root / sub) == 0o700
    assert list((root / "tmp").iterdir()) == []
    files = sorted((root / "new").iterdir())
    assert len(files) == 3
    contents = {f.read_bytes() for f in files}
    assert contents == {
        b"Return-Path: <sender@corp.test>\r\nDelivered-To: " + r.encode() + b"\r\n" + MESSAGE
        for r in rcpts
    }
    for f in files:
        assert _mode(f) == 0o600
        assert f.name.endswith(".relay.test")
        assert ":" not in f.name
    # Each file's data, then the directory entry in new/, reached the disk.
    assert len([p for p in fsynced if p.startswith(str(root / "tmp"))]) == 3
    assert fsynced[-1] == str(root / "new")


async def test_relative_path_is_fixed_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    up = _upstream("maildir:box")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    await up.deliver("", ["a@x.test"], MESSAGE)
    (f,) = (tmp_path / "box" / "new").iterdir()
    assert f.read_bytes().startswith(b"Return-Path: <>\r\n")


async def test_lf_message_gets_lf_headers(tmp_path: Path) -> None:
    up = MaildirUpstream(tmp_path / "md", hostname="h/o:st")
    await up.deliver("s@x.test", ["a@x.test"], b"Subject: x\n\nbody\n")
    (f,) = (tmp_path / "md" / "new").iterdir()
    expected = b"Return-Path: <s@x.test>\nDelivered-To: a@x.test\nSubject: x\n\nbody\n"
    assert f.read_bytes() == expected
    assert f.name.endswith(".h\\057o\\072st")


async def test_disk_error_is_temporary(tmp_path: Path) -> None:
    root = tmp_path / "md"
    root.mkdir()
    (root / "tmp").write_text("not a directory")
    up = MaildirUpstream(root, hostname="relay.test")
    with pytest.raises(UpstreamError) as err:
        await up.deliver("s@x.test", ["a@x.test"], MESSAGE)
    assert err.value.kind == "storage"
    assert err.value.reply == Reply(451, "4.3.0 Local storage failure, try again later")
    assert (err.value.path, err.value.errno) == (str(root / "tmp"), "EEXIST")
    assert "@" not in str(err.value)
    with pytest.raises(UpstreamError) as err:
        await up.probe()
    assert err.value.kind == "storage"


async def test_failure_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All or nothing: a failure on the second recipient removes the first one's file."""
    up = MaildirUpstream(tmp_path / "md", hostname="relay.test")
    monkeypatch.setattr(up, "_unique_name", lambda: "same-name")  # second O_EXCL open fails
    with pytest.raises(UpstreamError) as err:
        await up.deliver("s@x.test", ["a@x.test", "b@x.test"], MESSAGE)
    assert err.value.kind == "storage"
    assert list((tmp_path / "md" / "tmp").iterdir()) == []
    assert list((tmp_path / "md" / "new").iterdir()) == []


async def test_header_injection_refused(tmp_path: Path) -> None:
    up = MaildirUpstream(tmp_path / "md", hostname="relay.test")
    evil = "a@x.test\r\nBcc: everyone@x.test"
    result = await up.deliver("s@x.test", ["ok@x.test", evil], MESSAGE)
    assert result.accepted == ("ok@x.test",)
    assert result.refused[evil].code == 501
    assert len(list((tmp_path / "md" / "new").iterdir())) == 1
    with pytest.raises(UpstreamError) as err:
        await up.deliver("s@x.test\nX: y", ["ok@x.test"], MESSAGE)
    assert err.value.kind == "5xx"


async def test_probe_creates_and_checks(tmp_path: Path) -> None:
    up = MaildirUpstream(tmp_path / "md", hostname="relay.test")
    await up.probe()
    assert (tmp_path / "md" / "cur").is_dir()
    await up.close()
