"""Console releases keep the CLI's promise (same code): split, partial refusals, shared volume, sessions."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from bccguard.policy.headers import parse_header
from conftest import StartRelay, deep_merge, message, send
from console_helpers import Client, add_users, cli, console_toml, csrf_of, running_console
from sink import Sink
from test_quarantine_review import CUSTOMERS, QUARANTINE


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "quarantine" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def act(c: Client, action: str, *ids: str) -> str:
    """Confirm, then act, as the two forms do; the text of the outcome page."""
    token = csrf_of((await c.get("/")).body)
    page = await c.post("/confirm", {"csrf": token, "action": action, "ids": list(ids)})
    assert page.status == 200 and "Yes," in page.body
    r = await c.post("/act", {"csrf": csrf_of(page.body), "action": action, "ids": list(ids)})
    assert r.status == 303, r.body
    done = await c.get(r.header("location"))
    return re.sub(r"<[^>]+>", "", done.body)


async def test_release_split_from_the_console_and_the_cli(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    rcpts = [*CUSTOMERS[:6], "sales@corp.example"]
    for subject in ("one", "two"):
        await send(app.port, "news@corp.example", rcpts, message(rcpts, subject=subject))
    first, second = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        c, other = Client(console.base), Client(console.base)
        await c.login("rita")
        await other.login("adam")
        token = csrf_of((await c.get("/")).body)
        r = await c.post("/act", {"csrf": token, "action": "release_split", "ids": first})
        where = r.header("location")
        assert (await other.get(where)).header("location") == "/"  # not adam's outcome to read
        text = (await c.get(where)).body
        assert "released split into 7 copies (6 addresses hidden) to 7 of 7 recipients" in text
    rc, out, err = await cli("quarantine", "release", second, "--split", "--config", str(config))
    assert rc == 0 and "split into 7 copies" in out, err
    assert len(sink.messages) == 14
    for got in sink.messages:
        head = got.data[: parse_header(got.data).body_offset].decode().replace("\r\n", "\n")
        to = re.search(r"^To: (.*)$", head, re.M).group(1)  # type: ignore[union-attr]
        if got.rcpt_tos == ["sales@corp.example"]:  # the shared copy: every customer hidden
            assert "customer" not in head
        else:  # a personal copy: its own customer alone
            (rcpt,) = got.rcpt_tos
            assert to == rcpt and head.count("customer") == 1
    modes = [(r["mode"], r.get("via", "cli"), r["result"]) for r in audit(tmp_path)]
    assert modes == [("split", "console", "released"), ("split", "cli", "released")]


async def test_partial_release_keeps_the_refused_and_says_so(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    rcpts = CUSTOMERS[:12]
    await send(app.port, "news@corp.example", rcpts, message(rcpts))
    (entry_id,) = app.runtime.quarantine.ids()
    sink.rcpt_replies[CUSTOMERS[0]] = "550 5.1.1 no such user"
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        c = Client(console.base)
        await c.login("rita")
        text = await act(c, "release_rewrite", entry_id)
        assert "to 11 of 12 recipients; 1 refused (550) stay held" in text
        assert "@" not in text
        page = await c.get(f"/message/{entry_id}")
        assert "1 (1 external" in page.body
        # the upstream is gone: nothing is delivered, nothing is lost, the page says why
        await sink.stop()
        text = await act(c, "release", entry_id)
        assert "failed" in text and "the entry is kept" in text
        metrics = (await c.get("/metrics")).body
        assert 'bccguard_console_actions_total{kind="release_rewrite",result="partial"} 1.0' in metrics
        assert 'bccguard_console_actions_total{kind="release",result="failed"} 1.0' in metrics
    assert [r["result"] for r in audit(tmp_path)] == ["partial", "failed"]
    assert app.runtime.quarantine.ids() == [entry_id]


async def test_one_console_sees_every_relay_and_sessions_end(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    # two relays on one shared volume, each with its own quarantine directory (one relay per
    # directory: ops/instance.py refuses a second); the console reads both through a glob
    vol = tmp_path / "vol"
    relays = [await start_relay(sink.url, deep_merge(QUARANTINE, {"quarantine": {"path": str(vol / name)}}))
              for name in ("relay-a", "relay-b")]  # fmt: skip
    for i, app in enumerate(relays):
        data = message(CUSTOMERS[:12], subject=f"relay {i}")
        await send(app.port, "news@corp.example", CUSTOMERS[:12], data)
    assert [len(app.runtime.quarantine.ids()) for app in relays] == [1, 1]
    settings = {"session_ttl": "3s", "page_size": 1, "quarantine_paths": [str(vol / "*")]}
    config = console_toml(tmp_path, sink.url, {"console": settings})
    await add_users(config)
    async with running_console(config) as console:
        a, r = Client(console.base), Client(console.base)
        await a.login("adam")
        await r.login("rita")
        page = (await a.get("/")).body
        assert "2 held" in page and "relay 1" in page and "relay 0" not in page  # newest first
        assert "Page 1 of 2" in page and 'href="/?page=2"' in page
        page = (await a.get("/?page=2")).body
        assert "relay 0" in page and "relay 1" not in page
        # filters: sender domain, rule, reason, date range, subject (an address typed in: its domain)
        for query, hits in (("domain=corp.example", 2), ("domain=news%40corp.example", 2),
                            ("domain=other.example", 0), ("rule=default", 2), ("rule=board", 0),
                            ("reason=visible", 2), ("reason=nothing+like+it", 0), ("since=2099-01-01", 0),
                            ("until=2000-01-01", 0), ("subject=RELAY+1", 1)):  # fmt: skip
            body = (await a.get(f"/?{query}")).body
            assert f"{hits} held matching" in body, query
        # an account removed: its session ends at its next request
        rc, _, err = await cli("console-user", "remove", "rita", "--config", str(config))
        assert rc == 0, err
        assert (await r.get("/")).status == 303

        # and every session ends after session_ttl
        async def expired() -> bool:
            return (await a.get("/")).status == 303

        deadline = asyncio.get_running_loop().time() + 30
        while not await expired():
            assert asyncio.get_running_loop().time() < deadline, "session never expired"
            await asyncio.sleep(0.2)
