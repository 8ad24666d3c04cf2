"""One console over several relays' quarantine directories (`[console] quarantine_paths`).

One relay per quarantine directory (ops/instance.py refuses a second), so
relays on a shared volume each write their own directory under it; the
console lists, shows, releases, deletes and audits across all of them, each
action in (and audited into) the directory that holds the entry.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from bccguard.app import App
from bccguard.store.quarantines import AmbiguousEntry, Quarantines
from conftest import StartRelay, deep_merge, message, send
from console_helpers import Client, add_users, cli, console_toml, csrf_of, running_console
from sink import Sink
from test_console_release import act
from test_quarantine_review import CUSTOMERS, QUARANTINE


def audit(directory: Path) -> list[dict[str, Any]]:
    path = directory / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def relay_in(start_relay: StartRelay, sink: Sink, directory: Path) -> App:
    return await start_relay(sink.url, deep_merge(QUARANTINE, {"quarantine": {"path": str(directory)}}))


async def hold(app: App, subject: str) -> str:
    """Send a message the relay quarantines; its id."""
    before = set(app.runtime.quarantine.ids())
    await send(app.port, "news@corp.example", CUSTOMERS[:12], message(CUSTOMERS[:12], subject=subject))
    (new,) = set(app.runtime.quarantine.ids()) - before
    return new


async def test_release_and_delete_act_on_the_entrys_own_directory_and_audit_there(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    a_dir, b_dir = tmp_path / "vol" / "relay-a", tmp_path / "vol" / "relay-b"
    a, b = await relay_in(start_relay, sink, a_dir), await relay_in(start_relay, sink, b_dir)
    a1 = await hold(a, "held by a")
    b1, b2 = await hold(b, "first held by b"), await hold(b, "second held by b")
    # named outright this time (the glob form is tested below)
    config = console_toml(tmp_path, sink.url, {"console": {"quarantine_paths": [str(a_dir), str(b_dir)]}})
    await add_users(config)
    async with running_console(config) as console:
        rita, adam = Client(console.base), Client(console.base)
        await rita.login("rita")
        await adam.login("adam")
        page = (await rita.get("/")).body
        assert "3 held" in page and all(i in page for i in (a1, b1, b2))
        shown = await rita.get(f"/message/{b1}")
        assert shown.status == 200 and "first held by b" in shown.body
        text = await act(rita, "release_rewrite", b1)
        assert "released rewritten (12 addresses hidden) to 12 of 12 recipients" in text, text
        text = await act(adam, "delete", b2)
        assert "deleted" in text and "failed" not in text, text
        assert (await rita.get(f"/message/{b2}")).status == 404
    assert len(sink.messages) == 1 and "customer" not in sink.messages[0].data.decode().split("\r\n\r\n")[0]
    assert b.runtime.quarantine.ids() == [] and a.runtime.quarantine.ids() == [a1]
    got = [(r["what"], r["id"], r["result"], r["who"], r["via"]) for r in audit(b_dir)]
    assert got == [
        ("release", b1, "released", "rita", "console"),
        ("delete", b2, "deleted", "adam", "console"),
    ]
    assert audit(a_dir) == [], "nothing happened to relay-a's entries"
    assert not (tmp_path / "quarantine").exists(), "quarantine.path of the console config stays untouched"


async def test_audit_page_merges_every_directorys_log_newest_first(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    vol = tmp_path / "vol"
    a = await relay_in(start_relay, sink, vol / "relay-a")
    b = await relay_in(start_relay, sink, vol / "relay-b")
    a1, a2, b1 = await hold(a, "a one"), await hold(a, "a two"), await hold(b, "b one")
    config = console_toml(tmp_path, sink.url, {"console": {"quarantine_paths": [str(vol / "*")]}})
    await add_users(config)
    async with running_console(config) as console:
        rita = Client(console.base)
        await rita.login("rita")
        page = (await rita.get(f"/message/{a1}")).body
        r = await rita.post(f"/message/{a1}/reveal", {"csrf": csrf_of(page)})
        assert r.status == 200
        await act(rita, "release", b1)
        # the CLI, run against relay-a's own directory, appears on the same page
        (tmp_path / "cli").mkdir()
        relay_a = console_toml(tmp_path / "cli", sink.url, {"quarantine": {"path": str(vol / "relay-a")}})
        rc, out, err = await cli("quarantine", "delete", a2, "--config", str(relay_a))
        assert rc == 0, err
        body = (await rita.get("/audit")).body
        assert "3 records" in body
        cells = re.findall(r"<tr><td[^>]*>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>"
                           r"<td><code>([^<]*)</code></td><td>([^<]*)</td>", body)  # fmt: skip
        assert [(what, i, via, res) for _, via, what, i, res in cells] == [
            ("delete", a2, "cli", "deleted"),
            ("release", b1, "console", "released"),
            ("reveal", a1, "console", "shown"),
        ]
        # filters still apply to the merged log
        assert "1 records" in (await rita.get("/audit?what=release")).body
        only_a = (await rita.get(f"/audit?id={a1}")).body
        assert "1 records" in only_a and b1 not in only_a
    assert [r["what"] for r in audit(vol / "relay-a")] == ["reveal", "delete"]
    assert [r["what"] for r in audit(vol / "relay-b")] == ["release"]


async def test_a_relay_started_after_the_console_shows_up_through_the_glob(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    vol = tmp_path / "vol"
    a = await relay_in(start_relay, sink, vol / "relay-a")
    a1 = await hold(a, "from the first relay")
    (vol / "console-users.bak").write_text("a file on the volume is not a quarantine\n")
    config = console_toml(tmp_path, sink.url, {"console": {"quarantine_paths": [str(vol / "relay-*")]}})
    await add_users(config)
    async with running_console(config) as console:
        adam = Client(console.base)
        await adam.login("adam")
        assert "1 held" in (await adam.get("/")).body
        assert not (vol / "relay-b").exists()
        b = await relay_in(start_relay, sink, vol / "relay-b")  # created now, console running
        b1 = await hold(b, "from the late relay")
        page = (await adam.get("/")).body
        assert "2 held" in page and a1 in page and b1 in page and "from the late relay" in page
        text = await act(adam, "delete", a1, b1)  # one bulk action over both directories
        assert text.count("deleted") == 2 and "failed" not in text
    assert a.runtime.quarantine.ids() == [] and [r["id"] for r in audit(vol / "relay-a")] == [a1]
    assert b.runtime.quarantine.ids() == [] and [r["id"] for r in audit(vol / "relay-b")] == [b1]


async def test_purge_covers_every_directory_and_audits_each_in_its_own(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    vol = tmp_path / "vol"
    a = await relay_in(start_relay, sink, vol / "relay-a")
    b = await relay_in(start_relay, sink, vol / "relay-b")
    a_old, a_new, b_old = await hold(a, "a old"), await hold(a, "a new"), await hold(b, "b old")
    for directory, entry_id in ((vol / "relay-a", a_old), (vol / "relay-b", b_old)):
        meta = directory / f"{entry_id}.json"
        m = json.loads(meta.read_text())
        m["time"] -= 40 * 86400  # held for 40 days
        meta.write_text(json.dumps(m))
    config = console_toml(tmp_path, sink.url, {"console": {"quarantine_paths": [str(vol / "*")]}})
    await add_users(config)
    async with running_console(config) as console:
        rita, adam = Client(console.base), Client(console.base)
        await rita.login("rita")
        token = csrf_of((await rita.get("/")).body)
        assert (await rita.post("/act", {"csrf": token, "action": "purge", "older_than": "1s"})).status == 403
        await adam.login("adam")
        token = csrf_of((await adam.get("/")).body)
        done = await adam.post("/act", {"csrf": token, "action": "purge", "older_than": "30d"})
        assert "2 messages purged" in (await adam.get(done.header("location"))).body
    assert a.runtime.quarantine.ids() == [a_new] and b.runtime.quarantine.ids() == []
    # the refused purge names no entry: it goes to the first directory's log, once
    assert [(r["what"], r["result"], r["id"]) for r in audit(vol / "relay-a")] == [
        ("purge", "forbidden", "-"),
        ("purge", "removed", a_old),
    ]
    in_b = [(r["what"], r["result"], r["id"]) for r in audit(vol / "relay-b")]
    assert in_b == [("purge", "removed", b_old)]


async def test_an_id_held_in_two_directories_is_refused_not_guessed(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    vol = tmp_path / "vol"
    a = await relay_in(start_relay, sink, vol / "relay-a")
    a1 = await hold(a, "copied by hand")
    (vol / "relay-b").mkdir()
    for ext in ("eml", "json"):
        shutil.copy(vol / "relay-a" / f"{a1}.{ext}", vol / "relay-b" / f"{a1}.{ext}")
    qs = Quarantines([str(vol / "*")], str(tmp_path / "unused"))
    try:
        qs.find(a1)
        raise AssertionError("an id in two directories was resolved")
    except AmbiguousEntry as exc:
        assert "relay-a" in str(exc) and "relay-b" in str(exc) and "\n" not in str(exc)
    for bad in ("../relay-a/" + a1, "..", f"..{a1}", "/etc/passwd"):
        try:
            qs.find(bad)
            raise AssertionError(f"{bad!r} accepted as an id")
        except ValueError as exc:
            assert not isinstance(exc, AmbiguousEntry)
    config = console_toml(tmp_path, sink.url, {"console": {"quarantine_paths": [str(vol / "*")]}})
    await add_users(config)
    async with running_console(config) as console:
        adam = Client(console.base)
        await adam.login("adam")
        page = await adam.get(f"/message/{a1}")
        assert page.status == 409 and "2 quarantine directories" in page.body
        text = await act_unconfirmed(adam, "release", a1)
        assert 'class="failed"' in text and "2 quarantine directories" in text
        text = await act_unconfirmed(adam, "delete", a1)
        assert 'class="failed"' in text and "2 quarantine directories" in text
        for bad in ("..%2Frelay-a%2F" + a1, "%2E%2E"):
            assert (await adam.get(f"/message/{bad}")).status == 404
        assert (await adam.get("/")).status == 200  # the list still shows both copies
        metrics = (await adam.get("/metrics")).body
        assert 'bccguard_console_errors_total{kind="ambiguous"} 1.0' in metrics
    assert sink.messages == [], "nothing delivered for an ambiguous id"
    assert (vol / "relay-a" / f"{a1}.json").exists() and (vol / "relay-b" / f"{a1}.json").exists()


async def act_unconfirmed(c: Client, action: str, entry_id: str) -> str:
    """Post /act directly (the confirm page lists no message it cannot place); the outcome page."""
    r = await c.post("/act", {"csrf": csrf_of((await c.get("/")).body), "action": action, "ids": entry_id})
    assert r.status == 303, r.body
    return (await c.get(r.header("location"))).body


async def test_a_bad_quarantine_paths_is_a_one_line_config_error(sink: Sink, tmp_path: Path) -> None:
    bad: list[tuple[object, str]] = [
        ("/vol/*", "expected a list of strings"),
        ([""], "is not a directory or a glob"),
        (["/vol/a", "/vol/a"], "lists a directory twice"),
        ([7], "expected a list of strings"),
    ]
    for value, words in bad:
        config = console_toml(tmp_path, sink.url, {"console": {"quarantine_paths": value}})
        for args in (("config", "check"), ("console",)):
            rc, out, err = await cli(*args, "--config", str(config))
            lines = err.strip().splitlines()
            assert rc == 78 and len(lines) == 1, (args, value, err)
            assert "console.quarantine_paths" in lines[0] and words in lines[0] and "fix:" in lines[0], lines
            assert "Traceback" not in err
    config = console_toml(tmp_path, sink.url, {"console": {"quarantine_path": ["/vol/*"]}})
    rc, _, err = await cli("config", "check", "--config", str(config))
    assert rc == 78 and "did you mean 'quarantine_paths'" in err
