"""An admin reviews held mail with the real CLI: list, show, release, delete, purge, audited."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import time
from pathlib import Path

from bccguard.app import App
from bccguard.policy.headers import parse_header
from conftest import StartRelay, message, send
from proc import run_cli, write_toml
from sink import Sink, closed_port, without_trace

CUSTOMERS = [f"customer{i}@{'gmail.com' if i % 3 else 'clients.example'}" for i in range(300)]
QUARANTINE = {"policy": {"action": "quarantine"}}


def cli_config(tmp_path: Path, upstream_url: str) -> str:
    """The file an admin would pass: same quarantine path and policy as the relay."""
    return str(
        write_toml(
            tmp_path / "admin.toml",
            {
                "server": {"hostname": "bccguard.test"},
                "upstream": {"url": upstream_url, "timeout": 5.0},
                "quarantine": {"path": str(tmp_path / "quarantine")},
                "policy": {"internal_domains": ["corp.example"], "partner_domains": ["agency.example"],
                           "action": "quarantine"},
            },
        )
    )


def audit(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "quarantine" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def survey() -> bytes:
    """The survey as a mail client writes it: To folded (a 7 KB line would be refused upstream)."""
    return message(CUSTOMERS, cc=["sales@corp.example"]).replace(b".com, ", b".com,\r\n ")


async def hold_survey(app: App, rcpts: list[str] | None = None) -> bytes:
    rcpts = rcpts or [*CUSTOMERS, "sales@corp.example"]
    data = survey()
    await send(app.port, "news@corp.example", rcpts, data)
    return data


async def test_admin_lists_shows_and_releases_rewritten_then_it_is_gone(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    data = await hold_survey(app)
    assert sink.messages == []
    cfg = cli_config(tmp_path, sink.url)

    rc, out, err = await run_cli("quarantine", "list", "--json", "--config", cfg)
    assert (rc, err) == (0, "")
    (row,) = json.loads(out)
    assert row["rcpts"] == 301 and row["visible_external"] == 300 and row["rule"] == "default"
    assert row["mail_from"] == "news@corp.example" and row["subject"] == "Your feedback"
    assert "@gmail.com" not in out and "@clients.example" not in out  # counts, never recipients
    entry_id = row["id"]

    rc, out, err = await run_cli("quarantine", "list", "--config", cfg)
    assert rc == 0 and entry_id in out and "1 held" in out

    rc, out, err = await run_cli("quarantine", "show", entry_id, "--config", cfg)
    assert rc == 0 and err == ""
    assert "recipients: 301 (300 external" in out and "Subject: Your feedback" in out
    assert "send them as Bcc" in out

    rc, out, _ = await run_cli("quarantine", "show", entry_id, "--raw", "--config", cfg)
    assert rc == 0 and without_trace(out.encode()) == data  # as received, after our trace field

    rc, out, err = await run_cli("quarantine", "release", entry_id, "--rewrite", "--config", cfg)
    assert (rc, err) == (0, ""), err
    assert "released rewritten (300 addresses hidden) to 301 recipients" in out
    (got,) = sink.messages
    assert sorted(got.rcpt_tos) == sorted([*CUSTOMERS, "sales@corp.example"])
    head = got.data[: parse_header(got.data).body_offset]
    assert b"customer" not in head and b"gmail.com" not in head and b"clients.example" not in head
    assert b"Message-ID: <survey-1@corp.example>" in head and b"X-BCCGuard: rewritten; hidden=300" in head
    assert got.data[len(head):] == data.partition(b"\r\n\r\n")[2]

    rc, out, _ = await run_cli("quarantine", "list", "--json", "--config", cfg)
    assert json.loads(out) == []
    assert not list((tmp_path / "quarantine").glob(f"{entry_id}.*"))
    (rec,) = audit(tmp_path)
    assert rec["what"] == "release" and rec["id"] == entry_id and rec["result"] == "released"
    assert rec["who"] == (os.environ.get("SUDO_USER") or getpass.getuser()) and rec["rewrite"] is True

    # the relay learns of the release from the audit log: the CLI's counters die with it
    app.refresh_store_metrics()
    registry = app.metrics.registry
    assert registry.get_sample_value("bccguard_quarantine_releases_total", {"result": "released"}) == 1
    assert registry.get_sample_value("bccguard_quarantine_messages") == 0


async def test_release_as_it_was_keeps_the_original_bytes(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    data = await hold_survey(app, CUSTOMERS[:20])
    (entry_id,) = app.runtime.quarantine.ids()
    cfg = cli_config(tmp_path, sink.url)
    rc, _, err = await run_cli("quarantine", "release", entry_id, "--config", cfg)
    assert rc == 0, err
    assert sink.messages[0].original == data and sink.messages[0].rcpt_tos == CUSTOMERS[:20]


async def test_release_with_upstream_down_fails_and_keeps_the_entry(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app)
    (entry_id,) = app.runtime.quarantine.ids()
    down = cli_config(tmp_path, f"smtp://127.0.0.1:{closed_port()}")

    rc, out, err = await run_cli("quarantine", "release", entry_id, "--rewrite", "--config", down)
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1 and "upstream connect" in err and "entry is kept" in err
    assert "Traceback" not in err and "@gmail.com" not in err
    assert app.runtime.quarantine.ids() == [entry_id]
    assert [(r["what"], r["result"]) for r in audit(tmp_path)] == [("release", "failed")]

    rc, out, err = await run_cli("quarantine", "delete", entry_id, "--config", down)
    assert (rc, err) == (0, "") and app.runtime.quarantine.ids() == []
    assert [(r["what"], r["id"], r["result"]) for r in audit(tmp_path)][-1] == ("delete", entry_id, "deleted")
    assert sink.messages == []


async def test_partial_release_keeps_the_entry_for_the_refused(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    rcpts = CUSTOMERS[:12]
    await hold_survey(app, rcpts)
    (entry_id,) = app.runtime.quarantine.ids()
    sink.rcpt_replies = {CUSTOMERS[3]: "550 5.1.1 User unknown"}
    cfg = cli_config(tmp_path, sink.url)
    rc, out, _ = await run_cli("quarantine", "release", entry_id, "--config", cfg)
    assert rc == 1 and "to 11 of 12 recipients; 1 refused (550)" in out
    assert sink.messages[0].rcpt_tos == [r for r in rcpts if r != CUSTOMERS[3]]
    assert app.runtime.quarantine.envelope(entry_id).rcpt_tos == (CUSTOMERS[3],)
    assert audit(tmp_path)[-1]["result"] == "partial"


async def test_bad_ids_and_arguments_get_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = cli_config(tmp_path, "smtp://127.0.0.1:25")
    for args in (
        ("show", "../../etc/passwd"),
        ("release", "20990101T000000-000000000000"),
        ("delete", "no-such-entry"),
        ("purge", "--older-than", "soon"),
    ):
        rc, _, err = await run_cli("quarantine", *args, "--config", cfg)
        assert rc == 2, args
        assert len(err.splitlines()) == 1 and "fix:" in err and "Traceback" not in err, err
    assert audit(tmp_path) == []


async def test_purge_removes_old_entries_and_orphans_only(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app, CUSTOMERS[:20])
    await asyncio.sleep(0.01)  # distinct ids
    await hold_survey(app, CUSTOMERS[:20])
    q = app.runtime.quarantine
    old_id, new_id = q.ids()
    meta_path = q.path / f"{old_id}.json"
    meta = json.loads(meta_path.read_text())
    meta["time"] = time.time() - 40 * 86400
    meta_path.write_text(json.dumps(meta))
    orphan = q.path / "20200101T000000-0123456789ab.eml"  # a crash between .eml and .json
    orphan.write_bytes(b"Subject: half\r\n\r\n")
    long_ago = time.time() - 2 * 86400
    os.utime(orphan, (long_ago, long_ago))

    rc, out, err = await run_cli("quarantine", "purge", "--older-than", "30d", "--yes",
                                 "--config", cli_config(tmp_path, sink.url))
    assert (rc, err) == (0, "")
    assert "purged 1 entries older than 30d, 1 orphan messages" in out
    assert q.ids() == [new_id] and not orphan.exists()
    assert sorted((r["what"], r["id"], r["kind"]) for r in audit(tmp_path)) == sorted([
        ("purge", old_id, "entry"), ("purge", orphan.stem, "orphan"),
    ])


async def _two_held_one_old(start_relay: StartRelay, sink: Sink) -> tuple[App, str, str]:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app, CUSTOMERS[:5])
    await asyncio.sleep(0.01)  # distinct ids
    await hold_survey(app, CUSTOMERS[:5])
    q = app.runtime.quarantine
    old_id, new_id = q.ids()
    meta_path = q.path / f"{old_id}.json"
    meta = json.loads(meta_path.read_text())
    meta["time"] = time.time() - 40 * 86400
    meta_path.write_text(json.dumps(meta))
    return app, old_id, new_id


async def test_purge_refuses_a_bare_number_and_keeps_everything(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    """`--older-than 30` once meant 30 seconds and emptied the quarantine without a question."""
    app, old_id, new_id = await _two_held_one_old(start_relay, sink)
    cfg = cli_config(tmp_path, sink.url)
    for age in ("30", "5", "0.5"):
        rc, out, err = await run_cli("quarantine", "purge", "--older-than", age, "--yes", "--config", cfg)
        assert rc == 2 and out == "", (age, out, err)
        assert len(err.splitlines()) == 1 and "has no unit" in err and '"30d"' in err and "12h" in err
    assert app.runtime.quarantine.ids() == [old_id, new_id]
    assert audit(tmp_path) == []


async def test_purge_dry_run_lists_what_would_go_and_removes_nothing(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app, old_id, new_id = await _two_held_one_old(start_relay, sink)
    cfg = cli_config(tmp_path, sink.url)
    rc, out, err = await run_cli("quarantine", "purge", "--older-than", "30d", "--dry-run", "--config", cfg)
    assert (rc, err) == (0, "")
    assert old_id in out and new_id not in out and "Your feedback" in out
    assert "would purge 1 entries older than 30d" in out and "nothing removed" in out
    assert app.runtime.quarantine.ids() == [old_id, new_id]
    assert audit(tmp_path) == []


async def test_purge_without_a_terminal_needs_yes(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app, old_id, new_id = await _two_held_one_old(start_relay, sink)
    cfg = cli_config(tmp_path, sink.url)
    rc, out, err = await run_cli("quarantine", "purge", "--older-than", "30d", "--config", cfg)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and "--yes" in err and "Traceback" not in err
    assert app.runtime.quarantine.ids() == [old_id, new_id]


def _purge_on_a_terminal(cfg: str, answer: bytes) -> tuple[int, str, str]:
    """Run purge with stdin and stderr on a pseudo-terminal, answer the question, return (rc, out, tty)."""
    import pty
    import select
    import subprocess
    import sys

    from proc import cli_env

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bccguard.cli", "quarantine", "purge", "--older-than", "30d", "--config", cfg],
        stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=cli_env(),
    )  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while b"[y/N]" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
            assert proc.poll() is None, seen
        os.write(master, answer)
        out, _ = proc.communicate(timeout=60)
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode(), seen.decode()


async def test_purge_on_a_terminal_asks_first(start_relay: StartRelay, sink: Sink, tmp_path: Path) -> None:
    app, old_id, new_id = await _two_held_one_old(start_relay, sink)
    cfg = cli_config(tmp_path, sink.url)

    rc, out, tty = await asyncio.to_thread(_purge_on_a_terminal, cfg, b"n\n")
    assert "purge 1 entries older than 30d" in tty and "[y/N]" in tty
    assert rc == 1 and old_id in out and "nothing purged" in out
    assert app.runtime.quarantine.ids() == [old_id, new_id] and audit(tmp_path) == []

    rc, out, tty = await asyncio.to_thread(_purge_on_a_terminal, cfg, b"y\n")
    assert rc == 0 and "purged 1 entries older than 30d" in out
    assert app.runtime.quarantine.ids() == [new_id]
    assert [(r["what"], r["id"]) for r in audit(tmp_path)] == [("purge", old_id)]


async def test_list_shows_the_newest_first_with_its_received_time(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app, old_id, new_id = await _two_held_one_old(start_relay, sink)  # received now, and 40 days ago
    cfg = cli_config(tmp_path, sink.url)
    rc, out, _ = await run_cli("quarantine", "list", "--json", "--config", cfg)
    assert rc == 0 and [r["id"] for r in json.loads(out)] == [new_id, old_id]
    rc, out, _ = await run_cli("quarantine", "list", "--config", cfg)
    lines = out.splitlines()
    assert "RECEIVED (UTC)" in lines[0]
    assert lines[1].startswith(new_id) and lines[2].startswith(old_id)
    assert time.strftime("%Y-%m-%d", time.gmtime(time.time() - 40 * 86400)) in lines[2]
