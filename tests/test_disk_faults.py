"""A full or read-only disk under the spool or the Maildir outbox: 451 4.3.0, never a lost message.

Issue 12 item 1: the upstream took one recipient and refused another; the
copy to retry (4xx) or the DSN to the sender (5xx) could not be written, and
the client still heard 250, so that recipient or that report was lost.
Issue 14 item 6: an unwritable Maildir outbox was reported as an upstream
failure. Real kernel errors (tests/disk_helpers.py), a real relay, a real sink.

Invariants checked in each test: no 250 unless the message is upstream or
fsync'ed in the spool; no address in a reply or a log line; the relay serves
a normal message once the disk is healed.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from bccguard.app import App
from conftest import StartRelay, data_reply, message
from disk_helpers import SmallDisk, assert_no_address, mounted_small_disk, read_only_bind
from sink import Sink

SENDER = "news@corp.example"
OK, OTHER = "ok@clients.example", "other@clients.example"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with mounted_small_disk(tmp_path) as disk:
        yield disk


def _reply(port: int, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """The DATA reply, with every reply line checked for addresses."""
    code, text = data_reply(port, SENDER, rcpts, data)
    assert b"@" not in text, text
    return code, text


def _sample(app: App, name: str, **labels: str) -> float:
    value = app.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.mark.parametrize("fault", ["full", "read-only"])
@pytest.mark.parametrize(
    ("refusal", "kind"),
    [("451 4.2.1 Mailbox busy", "retry"), ("550 5.1.1 User unknown", "dsn")],
    ids=["deferred-copy", "dsn"],
)
async def test_partial_delivery_with_an_unwritable_spool_is_451_not_a_loss(
    start_relay: StartRelay, sink: Sink, small_disk: SmallDisk, fault: str, refusal: str, kind: str
) -> None:
    app = await start_relay(sink.url, {"spool": {"path": str(small_disk.path / "spool")}})
    sink.rcpt_replies = {OTHER: refusal}
    data = message([OK, OTHER])
    small_disk.fill() if fault == "full" else small_disk.read_only()

    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(_reply, app.port, [OK, OTHER], data)

    # The whole message is refused for now: the client sends it again to both
    # (a duplicate for OK, whom the upstream already has; never a loss for OTHER).
    assert (code, text[:6]) == (451, b"4.3.0 ")
    assert [m.rcpt_tos for m in sink.messages if m.reply.startswith("2")] == [[OK]]
    assert app.runtime.spool.entries() == []
    assert _sample(app, "bccguard_store_write_failures_total", store="spool") == 1
    (failed,) = [e for e in logs if e["event"] == "spool_write_failed"]
    assert failed["errno"] == ("ENOSPC" if fault == "full" else "EROFS")
    assert failed["path"].startswith(str(small_disk.path / "spool"))
    assert [e["reply_code"] for e in logs if e["event"] == "message_processed"] == [451]
    assert_no_address(logs)

    # Healed: the same message is now taken, and what the 250 promises is on disk.
    small_disk.heal()
    sink.messages.clear()
    code, text = await asyncio.to_thread(_reply, app.port, [OK, OTHER], data)
    assert code == 250 and b"1 of 2" in text
    assert [m.rcpt_tos for m in sink.messages if m.reply.startswith("2")][:1] == [[OK]]
    spooled = {e.kind for e in app.runtime.spool.entries()}
    # A due DSN may already be on its way out (then the sink has it).
    assert kind in spooled or (kind == "dsn" and any(m.mail_from == "<>" for m in sink.messages))


async def test_split_with_a_full_spool_is_451(
    start_relay: StartRelay, sink: Sink, small_disk: SmallDisk
) -> None:
    """Split copies go to the spool before the 250 (existing behaviour, now counted and logged)."""
    app = await start_relay(
        sink.url, {"spool": {"path": str(small_disk.path / "spool")}, "policy": {"action": "split"}}
    )
    rcpts = [f"c{i}@clients.example" for i in range(30)]
    small_disk.fill()
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(_reply, app.port, rcpts, message(rcpts))
    assert (code, text[:6]) == (451, b"4.3.0 ")
    assert sink.messages == []
    assert _sample(app, "bccguard_store_write_failures_total", store="spool") == 1
    assert [e["errno"] for e in logs if e["event"] == "spool_write_failed"] == ["ENOSPC"]
    assert_no_address(logs)
    small_disk.heal()
    code, _ = await asyncio.to_thread(_reply, app.port, rcpts, message(rcpts))
    assert code == 250


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_unwritable_maildir_outbox_is_could_not_store_and_named_in_readyz(
    start_relay: StartRelay, small_disk: SmallDisk
) -> None:
    """Issue 14 item 6: a read-only outbox is a local store failure, not "upstream deferred"."""
    outbox = small_disk.path / "outbox"
    app = await start_relay(f"maildir:{outbox}", {"metrics": {"listen": "127.0.0.1:0"}})
    rcpts = ["a@corp.example", "b@corp.example"]
    data = message(rcpts)
    assert (await asyncio.to_thread(_reply, app.port, rcpts, data))[0] == 250
    small_disk.read_only()

    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(_reply, app.port, rcpts, data)
        await app.runtime.relay.probe()  # what the idle-time probe finds, now
    assert (code, text) == (451, b"4.3.0 Could not store the message, try again later")
    (failed,) = [e for e in logs if e["event"] == "outbox_write_failed"]
    assert failed["errno"] == "EROFS" and failed["path"].startswith(str(outbox))
    assert [e["kind"] for e in logs if e["event"] == "upstream_probe_failed"] == ["storage"]
    assert_no_address(logs)
    assert _sample(app, "bccguard_store_write_failures_total", store="outbox") == 1
    assert (
        sum(
            _sample(app, "bccguard_upstream_failures_total", kind=k)
            for k in ("4xx", "5xx", "connect", "session")
        )
        == 0
    )
    status, body = await asyncio.to_thread(_readyz, app.ops.port)
    assert status == 503 and f"outbox {outbox} not writable" in body
    assert "upstream not reachable" not in body

    small_disk.heal()
    assert (await asyncio.to_thread(_reply, app.port, rcpts, data))[0] == 250
    assert await asyncio.to_thread(_readyz, app.ops.port) == (200, "ready\n")
    assert len(list((outbox / "new").iterdir())) == 4  # 2 recipients x 2 delivered messages


async def test_quarantine_on_a_read_only_disk_logs_path_and_errno(
    start_relay: StartRelay, sink: Sink, small_disk: SmallDisk
) -> None:
    app = await start_relay(
        sink.url, {"quarantine": {"path": str(small_disk.path / "q")}, "policy": {"action": "quarantine"}}
    )
    rcpts = [f"c{i}@clients.example" for i in range(30)]
    small_disk.read_only()
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(_reply, app.port, rcpts, message(rcpts))
    assert (code, text[:6]) == (451, b"4.3.0 ")
    (failed,) = [e for e in logs if e["event"] == "quarantine_write_failed"]
    assert failed["errno"] == "EROFS"
    assert _sample(app, "bccguard_store_write_failures_total", store="quarantine") == 1
    assert_no_address(logs)


# ---------------------------------------------------------------- cases next to the examples

PAGE = 4096


def _free_pages(disk: SmallDisk, pages: int) -> None:
    """After fill(): give back exactly `pages` pages (tmpfs counts whole pages)."""
    filler = disk.path / "filler"
    size = filler.stat().st_size
    with open(filler, "r+b") as f:
        f.truncate(size - pages * PAGE)


def _leftovers(spool: Path) -> list[str]:
    """Entries or half-written files a failed write left in the spool."""
    return sorted(p.name for p in spool.iterdir() if p.suffix in (".json", ".tmp") or ".tmp" in p.name)


async def test_room_for_the_retry_copy_but_not_the_dsn_is_451_and_leaves_nothing(
    start_relay: StartRelay, sink: Sink, small_disk: SmallDisk
) -> None:
    """One recipient taken, one deferred (4xx), three refused (5xx). The disk has room for
    the retry copy and not for the DSN written after it: 451 for the whole message, and the
    retry copy already written goes too (the client's resend is the only copy)."""
    spool = small_disk.path / "spool"
    app = await start_relay(sink.url, {"spool": {"path": str(spool)}})
    later, bad = "later@clients.example", [f"bad{i}@clients.example" for i in range(3)]
    rcpts = [OK, later, *bad]
    sink.rcpt_replies = {later: "451 4.2.1 Mailbox busy", **{b: "550 5.1.1 User unknown" for b in bad}}
    data = message(rcpts, body="x" * 70 + "\r\n" + ("y" * 70 + "\r\n") * 500)  # ~36 KB: 9 pages
    small_disk.fill()
    _free_pages(small_disk, -(-len(data) // PAGE) + 1)  # the retry's .eml and .json, nothing more

    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(_reply, app.port, rcpts, data)
    assert (code, text[:6]) == (451, b"4.3.0 ")
    assert app.runtime.spool.entries() == []
    assert _leftovers(spool) == []
    assert [e["errno"] for e in logs if e["event"] == "spool_write_failed"] == ["ENOSPC"]
    assert _sample(app, "bccguard_store_write_failures_total", store="spool") == 1
    assert_no_address(logs)

    small_disk.heal()
    code, text = await asyncio.to_thread(_reply, app.port, rcpts, data)
    assert code == 250 and b"1 of 5" in text and b"1 deferred" in text and b"3 refused" in text
    kinds = sorted(e.kind for e in app.runtime.spool.entries())
    assert kinds in (["dsn", "retry"], ["retry"])  # a due DSN may already be on its way out


async def test_split_on_a_read_only_spool_is_451(
    start_relay: StartRelay, sink: Sink, small_disk: SmallDisk
) -> None:
    spool = small_disk.path / "spool"
    app = await start_relay(sink.url, {"spool": {"path": str(spool)}, "policy": {"action": "split"}})
    rcpts = [f"c{i}@clients.example" for i in range(30)]  # enough to hide
    small_disk.read_only()
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(_reply, app.port, rcpts, message(rcpts))
    assert (code, text[:6]) == (451, b"4.3.0 ")
    assert sink.messages == []
    (failed,) = [e for e in logs if e["event"] == "spool_write_failed"]
    assert failed["errno"] == "EROFS" and failed["path"].startswith(str(spool))
    assert_no_address(logs)
    small_disk.heal()
    assert (await asyncio.to_thread(_reply, app.port, rcpts, message(rcpts)))[0] == 250


async def test_quarantine_on_a_full_disk_is_451_and_leaves_nothing(
    start_relay: StartRelay, sink: Sink, small_disk: SmallDisk
) -> None:
    qdir = small_disk.path / "q"
    app = await start_relay(sink.url, {"quarantine": {"path": str(qdir)}, "policy": {"action": "quarantine"}})
    rcpts = [f"c{i}@clients.example" for i in range(30)]  # enough to hide
    small_disk.fill()
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(_reply, app.port, rcpts, message(rcpts))
    assert (code, text[:6]) == (451, b"4.3.0 ")
    assert app.runtime.quarantine.ids() == []
    (failed,) = [e for e in logs if e["event"] == "quarantine_write_failed"]
    assert failed["errno"] == "ENOSPC" and failed["path"].startswith(str(qdir))
    assert_no_address(logs)
    small_disk.heal()
    code, text = await asyncio.to_thread(_reply, app.port, rcpts, message(rcpts))
    assert code == 250 and len(app.runtime.quarantine.ids()) == 1


async def test_a_read_only_maildir_new_only_is_could_not_store(
    start_relay: StartRelay, small_disk: SmallDisk
) -> None:
    """tmp/ writable, new/ read-only (a bind mount): the files staged in tmp/ cannot be
    moved; 451 4.3.0, nothing left in tmp/, new/ unchanged, /readyz names the outbox."""
    outbox = small_disk.path / "outbox"
    app = await start_relay(f"maildir:{outbox}", {"metrics": {"listen": "127.0.0.1:0"}})
    rcpts = ["a@corp.example", "b@corp.example"]
    data = message(rcpts)
    assert (await asyncio.to_thread(_reply, app.port, rcpts, data))[0] == 250
    new = outbox / "new"
    before = sorted(p.name for p in new.iterdir())
    with read_only_bind(new):
        with structlog.testing.capture_logs() as logs:
            code, text = await asyncio.to_thread(_reply, app.port, rcpts, data)
            await app.runtime.relay.probe()
        assert (code, text[:6]) == (451, b"4.3.0 ")
        (failed,) = [e for e in logs if e["event"] == "outbox_write_failed"]
        assert failed["path"].startswith(str(outbox)) and failed["errno"] in ("EROFS", "EXDEV")
        assert list((outbox / "tmp").iterdir()) == []
        assert sorted(p.name for p in new.iterdir()) == before
        assert [e["kind"] for e in logs if e["event"] == "upstream_probe_failed"] == ["storage"]
        assert_no_address(logs)
        status, body = await asyncio.to_thread(_readyz, app.ops.port)
        assert status == 503 and str(outbox) in body
    assert (await asyncio.to_thread(_reply, app.port, rcpts, data))[0] == 250


@pytest.mark.parametrize("fault", ["full", "read-only"])
async def test_the_spool_runner_on_an_unwritable_spool_keeps_the_entry_counts_and_goes_on(
    start_relay: StartRelay, sink: Sink, small_disk: SmallDisk, fault: str
) -> None:
    """A spooled copy the upstream now refuses for good needs a DSN written. With the disk
    full or read-only the runner gave up the whole pass with a traceback ("spool_runner_failed"),
    uncounted, and the entries after it waited. Now: the entry stays as it was (its DSN is
    written once the disk heals, never lost), the failure is counted and logged with path and
    errno, and the next entry is still tried."""
    spool = small_disk.path / "spool"
    app = await start_relay(sink.url, {"spool": {"path": str(spool)}})
    bad, good = "bad@clients.example", "good@clients.example"
    sink.rcpt_replies = {bad: "550 5.1.1 User unknown"}
    while app.retrier._fresh:
        await asyncio.sleep(0.05)
    # Not due for an hour: only the run_once(force=True) below tries them.
    first = app.runtime.spool.put(message([bad]), SENDER, (bad,), kind="retry", delay=3600)
    await asyncio.sleep(1.1)  # ids sort by the second: the good entry comes after the bad one
    app.runtime.spool.put(message([good]), SENDER, (good,), kind="retry", delay=3600)
    app.retrier.release()  # its lock file is open for writing: a remount read-only would be busy
    small_disk.fill() if fault == "full" else small_disk.read_only()

    with structlog.testing.capture_logs() as logs:
        await app.retrier.run_once(force=True)
    errors = [e for e in logs if e["log_level"] == "error"]
    # Read-only, the good entry fails too: delivered, it cannot be removed (sent again later).
    assert errors and {e["event"] for e in errors} == {"spool_write_failed"}
    failed = errors[0]
    assert failed["errno"] == ("ENOSPC" if fault == "full" else "EROFS")
    assert failed["path"].startswith(str(spool)) and failed["spool_id"] == first
    assert _sample(app, "bccguard_store_write_failures_total", store="spool") >= 1
    assert any(m.rcpt_tos == [good] for m in sink.messages)  # the entry after it was tried
    assert first in {e.id for e in app.runtime.spool.entries()}
    assert_no_address(logs)

    small_disk.heal()
    await app.retrier.run_once(force=True)
    kinds = [e.kind for e in app.runtime.spool.entries()]
    assert first not in {e.id for e in app.runtime.spool.entries()}
    assert kinds in (["dsn"], []) and (kinds or any(m.mail_from == "<>" for m in sink.messages))


async def test_a_full_maildir_outbox_is_could_not_store_and_leaves_no_partial_file(
    start_relay: StartRelay, small_disk: SmallDisk
) -> None:
    """Five recipients, room for about two of their files: none may stay in new/ (a reader
    would deliver a part of the message's recipients and the resend would repeat them),
    none in tmp/."""
    outbox = small_disk.path / "outbox"
    app = await start_relay(f"maildir:{outbox}")
    rcpts = [f"r{i}@corp.example" for i in range(5)]
    data = message(rcpts, body="z" * 70 + "\r\n" + ("w" * 70 + "\r\n") * 250)  # ~18 KB a file
    assert (await asyncio.to_thread(_reply, app.port, rcpts[:1], data))[0] == 250
    before = sorted(p.name for p in (outbox / "new").iterdir())
    small_disk.fill()
    _free_pages(small_disk, 10)  # two files' worth
    with structlog.testing.capture_logs() as logs:
        code, text = await asyncio.to_thread(_reply, app.port, rcpts, data)
    assert (code, text[:6]) == (451, b"4.3.0 ")
    (failed,) = [e for e in logs if e["event"] == "outbox_write_failed"]
    assert failed["errno"] == "ENOSPC" and failed["path"].startswith(str(outbox))
    assert sorted(p.name for p in (outbox / "new").iterdir()) == before
    assert list((outbox / "tmp").iterdir()) == []
    assert_no_address(logs)
    small_disk.heal()
    assert (await asyncio.to_thread(_reply, app.port, rcpts, data))[0] == 250
    assert len(list((outbox / "new").iterdir())) == len(before) + 5
