"""The quarantine console over plain HTTP: what a browser hides (headers, cookies, codes).

A real relay holds mail, a real `bccguard console` process serves it; the
client here is stdlib http.client keeping cookies. The browser-driven tests
are in test_console_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import StartRelay
from console_helpers import Client, add_users, cli, console_toml, csrf_of, running_console
from sink import Sink, self_signed_cert
from test_quarantine_review import CUSTOMERS, QUARANTINE, hold_survey


def audit(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "quarantine" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_headers_cookies_roles_and_csrf(start_relay: StartRelay, sink: Sink, tmp_path: Path) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app, CUSTOMERS[:30])
    (entry_id,) = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        c = Client(console.base)
        # logged out: every page (and every form target) sends the browser to the login page
        for path in ("/", f"/message/{entry_id}", "/audit", "/done/x", "/nope"):
            r = await c.get(path)
            assert (r.status, r.header("location")) == (303, "/login"), path
        forms = ("/confirm", "/act", f"/message/{entry_id}/reveal", f"/message/{entry_id}/raw", "/logout")
        for path in forms:
            r = await c.post(path, {"action": "delete", "ids": entry_id})
            assert (r.status, r.header("location")) == (303, "/login"), path
        assert (tmp_path / "quarantine" / f"{entry_id}.eml").exists()

        huge = await c.post("/login", {"name": "x", "password": "p" * (2 << 20)})
        assert huge.status == 413  # refused before anything reads it

        page = await c.get("/login")
        assert page.status == 200
        assert page.header("content-security-policy").startswith("default-src 'none'")
        assert "frame-ancestors 'none'" in page.header("content-security-policy")
        assert "script-src" not in page.header("content-security-policy")  # default-src 'none': no script
        assert page.header("referrer-policy") == "no-referrer"
        assert page.header("x-content-type-options") == "nosniff"
        assert "<script" not in page.body

        r = await c.login("rita", "wrong")
        assert r.status == 401 and "Wrong name or password" in r.body
        r = await c.login("rita")
        assert (r.status, r.header("location")) == (303, "/")
        (session_cookie,) = [s for s in c.set_cookies if s.startswith("bccguard_session=")]
        low = session_cookie.lower()
        assert "httponly" in low and "samesite=strict" in low and "max-age=28800" in low
        assert "secure" not in low  # plain HTTP here; see the TLS test

        listing = await c.get("/")
        assert listing.status == 200 and "Your feedback" in listing.body
        assert "customer0" not in listing.body and not re.search(r"\w@gmail\.com", listing.body)
        token = csrf_of(listing.body)

        # a form post without the token, or with another, changes nothing
        for form in ({"action": "release", "ids": entry_id},
                     {"action": "release", "ids": entry_id, "csrf": "x" + token}):  # fmt: skip
            for path in ("/confirm", "/act", f"/message/{entry_id}/reveal"):
                r = await c.post(path, form)
                assert r.status == 403 and "security token" in r.body, path
        assert sink.messages == [] and (tmp_path / "quarantine" / f"{entry_id}.eml").exists()

        # a reviewer may not delete, even with a valid token and a hand-made form
        r = await c.post("/act", {"action": "delete", "ids": entry_id, "csrf": token})
        assert r.status == 403 and "may not delete" in r.body
        r = await c.post(f"/message/{entry_id}/raw", {"csrf": token})
        assert r.status == 403
        assert (tmp_path / "quarantine" / f"{entry_id}.eml").exists()
        recs = audit(tmp_path)
        assert [(x["what"], x["result"], x["who"]) for x in recs] == [
            ("delete", "forbidden", "rita"), ("view_raw", "forbidden", "rita")]  # fmt: skip

        # an admin may view the raw source: served as inert text, audited
        a = Client(console.base)
        await a.login("adam")
        atoken = csrf_of((await a.get(f"/message/{entry_id}")).body)
        raw = await a.post(f"/message/{entry_id}/raw", {"csrf": atoken})
        assert raw.status == 200 and raw.header("content-type").startswith("text/plain")
        assert "customer0@clients.example" in raw.body
        assert "sandbox" in raw.header("content-security-policy")
        assert audit(tmp_path)[-1]["what"] == "view_raw" and audit(tmp_path)[-1]["who"] == "adam"

        # logout ends the session on the server: the old cookie is worth nothing
        old = dict(c.cookies)
        r = await c.post("/logout", {"csrf": token})
        assert (r.status, r.header("location")) == (303, "/login")
        c.cookies = old
        assert (await c.get("/")).status == 303

        metrics = (await c.get("/metrics")).body
        assert 'bccguard_console_logins_total{result="ok"} 2.0' in metrics
        assert 'bccguard_console_logins_total{result="failed"} 1.0' in metrics
        assert 'bccguard_console_errors_total{kind="csrf"} 6.0' in metrics
        assert 'bccguard_console_actions_total{kind="delete",result="forbidden"} 1.0' in metrics
        assert (await c.get("/healthz")).body == "ok\n"
    assert "console_login" in console.log and "console_forbidden" in console.log
    assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", console.log), "an address in the console's log"


async def test_admin_purges_old_mail_and_a_reviewer_cannot(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    for _ in range(2):
        await hold_survey(app, CUSTOMERS[:12])
    old, new = app.runtime.quarantine.ids()
    meta = tmp_path / "quarantine" / f"{old}.json"
    m = json.loads(meta.read_text())
    m["time"] -= 40 * 86400  # held for 40 days
    meta.write_text(json.dumps(m))
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        r = Client(console.base)
        await r.login("rita")
        token = csrf_of((await r.get("/")).body)
        assert "Purge" not in (await r.get("/")).body
        assert (await r.post("/act", {"csrf": token, "action": "purge", "older_than": "1s"})).status == 403
        a = Client(console.base)
        await a.login("adam")
        token = csrf_of((await a.get("/")).body)
        page = await a.post("/confirm", {"csrf": token, "action": "purge", "older_than": "30d"})
        assert "held longer than <b>30d</b>" in page.body
        done = await a.post("/act", {"csrf": token, "action": "purge", "older_than": "30d"})
        assert "1 messages purged" in (await a.get(done.header("location"))).body
        bad = await a.post("/act", {"csrf": token, "action": "purge", "older_than": "soon"})
        assert bad.status == 400 and "not a duration" in bad.body
    assert app.runtime.quarantine.ids() == [new]
    whats = [(x["what"], x["result"], x["who"], x["id"]) for x in audit(tmp_path)]
    assert whats == [("purge", "forbidden", "rita", "-"), ("purge", "removed", "adam", old)]


async def test_a_broken_entry_neither_hides_the_others_nor_leaks(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    for _ in range(2):
        await hold_survey(app, CUSTOMERS[:12])
    broken, fine = app.runtime.quarantine.ids()
    (tmp_path / "quarantine" / f"{broken}.json").write_text('{"verdict": "not a table"}')
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        c = Client(console.base)
        await c.login("adam")
        page = await c.get("/")
        assert page.status == 200 and "(unreadable entry)" in page.body and f"/message/{fine}" in page.body
        r = await c.get(f"/message/{broken}")
        assert r.status == 500 and "Traceback" not in r.body and "@" not in r.body
        assert r.header("content-security-policy")  # the headers are on error pages too
        metrics = (await c.get("/metrics")).body
        assert 'bccguard_console_errors_total{kind="internal"} 1.0' in metrics
    assert "console_error" in console.log


async def test_login_is_rate_limited_per_account_and_per_address(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    config = console_toml(tmp_path, sink.url, {"console": {"max_login_failures": 3, "login_window": "1h"}})
    await add_users(config)
    async with running_console(config) as console:
        c = Client(console.base)
        for _ in range(3):
            assert (await c.login("adam", "guess")).status == 401
        r = await c.login("adam")  # the right password, too late
        assert r.status == 429 and "Too many failed attempts" in r.body
        r = await c.login("rita")  # same address, another account: the address is blocked too
        assert r.status == 429
        metrics = (await c.get("/metrics")).body
        assert 'bccguard_console_logins_total{result="rate_limited"} 2.0' in metrics


async def test_console_over_tls_sets_secure_host_cookie(sink: Sink, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    config = console_toml(tmp_path, sink.url, {"console": {}})
    text = config.read_text() + f'\n[console.tls]\ncert = "{cert}"\nkey = "{key}"\n'
    config.write_text(text)
    await add_users(config)
    async with running_console(config, https=True) as console:
        c = Client(console.base)
        r = await c.login("adam")
        assert r.status == 303
        (cookie,) = [s for s in c.set_cookies if s.startswith("__Host-bccguard_session=")]
        assert "secure" in cookie.lower() and "path=/" in cookie.lower()
        page = await c.get("/")
        assert page.status == 200 and page.header("strict-transport-security")


async def test_console_refuses_to_start_without_accounts(sink: Sink, tmp_path: Path) -> None:
    config = console_toml(tmp_path, sink.url)
    rc, _, err = await cli("console", "--config", str(config))
    assert rc == 78 and "console-user add" in err and "Traceback" not in err
    rc, _, err = await cli("config", "check", "--config", str(
        console_toml(tmp_path, sink.url, {"console": {"listen": "nowhere", "page_size": 0}})))  # fmt: skip
    assert rc == 78 and "console.listen" in err and "console.page_size" in err
