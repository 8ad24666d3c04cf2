"""The console under attack over plain HTTP: the cases a reviewer tries beyond the issue's examples.

CSRF on every POST route, session fixation, expiry, role checks by hand-made
POSTs, open redirects, hostile text in every rendered field, path traversal
in message ids, security headers on every status, audit records of every
action with its actor (console and CLI alike). A real relay holds the mail
and a real `bccguard console` process serves it (see console_helpers).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
from pathlib import Path
from urllib.parse import urlencode

from conftest import StartRelay, message, send
from console_helpers import Client, Reply, add_users, cli, console_toml, csrf_of, running_console
from sink import Sink
from test_quarantine_review import CUSTOMERS, QUARANTINE, hold_survey

ADDRESS = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
SECURITY = ("content-security-policy", "referrer-policy", "x-content-type-options", "x-frame-options")


def audit(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "quarantine" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_secured(r: Reply, what: str) -> None:
    for h in SECURITY:
        assert r.header(h), f"{what}: no {h} header (status {r.status})"
    assert "frame-ancestors 'none'" in r.header("content-security-policy"), what
    assert "unsafe-inline" not in r.header("content-security-policy"), what


async def test_every_post_route_refuses_a_missing_or_wrong_csrf_token(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app, CUSTOMERS[:12])
    (entry_id,) = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        a = Client(console.base)
        await a.login("adam")
        token = csrf_of((await a.get("/")).body)
        posts = {
            "/confirm": {"action": "delete", "ids": entry_id},
            "/act": {"action": "delete", "ids": entry_id},
            "/act#purge": {"action": "purge", "older_than": "0s"},
            f"/message/{entry_id}/reveal": {},
            f"/message/{entry_id}/raw": {},
            "/logout": {},
        }
        for path, form in posts.items():
            for bad in (None, "", token[:-1], token + "x", "A" * len(token)):
                sent = dict(form) if bad is None else {**form, "csrf": bad}
                r = await a.post(path.split("#")[0], sent)
                assert r.status == 403 and "security token" in r.body, (path, bad)
                assert_secured(r, f"csrf refusal on {path}")
        # another user's token is not this session's token
        rv = Client(console.base)
        await rv.login("rita")
        other = csrf_of((await rv.get("/")).body)
        r = await a.post("/act", {"action": "delete", "ids": entry_id, "csrf": other})
        assert r.status == 403
        # still logged in (logout without a token did not log out), nothing changed, nothing audited
        assert (await a.get("/")).status == 200
        assert (tmp_path / "quarantine" / f"{entry_id}.eml").exists() and sink.messages == []
        assert audit(tmp_path) == []


async def test_session_fixation_expiry_and_cookie_flags(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    config = console_toml(tmp_path, sink.url, {"console": {"session_ttl": "2s"}})
    await add_users(config)
    async with running_console(config) as console:
        c = Client(console.base)
        planted = "attacker-chosen-token-0123456789abcdefABCDEF"
        c.cookies["bccguard_session"] = planted
        assert (await c.get("/")).status == 303  # a made-up token is no session
        r = await c.login("adam")
        assert r.status == 303
        assert c.cookies["bccguard_session"] != planted
        # the attacker's browser, still holding the planted token, gets nothing
        evil = Client(console.base)
        evil.cookies["bccguard_session"] = planted
        assert (await evil.get("/")).status == 303
        # a login posted with a live session's cookie gets a new token and ends the old session
        first = c.cookies["bccguard_session"]
        c2 = Client(console.base)
        page = await c2.get("/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.body).group(1)  # type: ignore[union-attr]
        c2.cookies["bccguard_session"] = first
        await c2.post("/login", {"nonce": nonce, "name": "adam", "password": "admin-pass-1"})
        assert c2.cookies["bccguard_session"] != first
        assert (await c.get("/")).status == 303
        (cookie,) = {s for s in c.set_cookies if s.startswith("bccguard_session=")}
        low = cookie.lower()
        assert "httponly" in low and "samesite=strict" in low and "path=/" in low and "max-age=2" in low
        # the login nonce cookie is HttpOnly and SameSite too
        (nonce,) = {
            s for s in c.set_cookies if s.startswith("bccguard_login=") and "max-age=1800" in s.lower()
        }
        assert "httponly" in nonce.lower() and "samesite=strict" in nonce.lower()
        # expiry is enforced on the server, whatever the browser keeps
        assert (await c2.get("/")).status == 200
        await asyncio.sleep(2.5)
        assert (await c2.get("/")).status == 303
        assert (await c2.get("/audit")).status == 303


async def test_no_open_redirect_and_no_next_parameter(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        c = Client(console.base)
        for path in ("/?next=https://evil.example/", "//evil.example/", "/%2F%2Fevil.example",
                     "/login?next=//evil.example", "/\\evil.example"):  # fmt: skip
            r = await c.get(path)
            loc = r.header("location")
            assert not loc or (loc.startswith("/") and not loc.startswith("//")), (path, loc)
            assert "evil" not in loc, (path, loc)
        page = await c.get("/login?next=https://evil.example/")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.body).group(1)  # type: ignore[union-attr]
        r = await c.post("/login?next=https://evil.example/",
                         {"nonce": nonce, "name": "adam", "password": "admin-pass-1",
                          "next": "https://evil.example/"})  # fmt: skip
        assert (r.status, r.header("location")) == (303, "/")


NAME = base64.b64encode(b"<iframe src=x>.txt").decode()


NAME = base64.b64encode(b"<iframe src=x>.txt").decode()


def hostile_message() -> bytes:
    encoded = base64.b64encode(b"<script>alert('encoded')</script> Survey").decode()
    body = (
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n<script>alert('text')</script>\r\n"
        '--b1\r\nContent-Type: text/csv; name="x.csv"\r\n'
        'Content-Disposition: attachment; filename="\\"><svg onload=alert(\'file\')>.csv"\r\n\r\n'
        "a,b\r\n"
        "--b1\r\nContent-Type: text/plain\r\n"
        f'Content-Disposition: attachment; filename="=?utf-8?b?{NAME}?="\r\n\r\n'
        "x\r\n--b1--\r\n"
    )
    return message(
        CUSTOMERS[:12],
        subject=f"=?utf-8?b?{encoded}?=",
        sender="\"<img src=x onerror=alert('name')>\" <news@corp.example>",
        extra='Content-Type: multipart/mixed; boundary="b1"\r\nX-Note: <iframe src="javascript:alert(1)">',
        body=body,
    )


MARKUP = re.compile(r"<(script|img|svg|iframe)\b", re.I)


async def test_hostile_text_in_every_rendered_field_is_escaped(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    # rule names cannot carry markup: the config refuses them (letters, digits, _ . -)
    app = await start_relay(sink.url, QUARANTINE)
    await send(app.port, "news@corp.example", CUSTOMERS[:12], hostile_message())
    (entry_id,) = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        a = Client(console.base)
        await a.login("adam")
        listing = await a.get("/")
        token = csrf_of(listing.body)
        assert "&lt;script&gt;alert(&#39;encoded&#39;)" in listing.body  # the decoded subject, escaped
        pages = {
            "list": listing,
            "message": await a.get(f"/message/{entry_id}"),
            "reveal": await a.post(f"/message/{entry_id}/reveal", {"csrf": token}),
            "confirm": await a.post("/confirm", {"csrf": token, "action": "delete", "ids": entry_id}),
            "filters": await a.get("/?subject=%22%3E%3Cscript%3Ealert(3)%3C/script%3E"
                                   "&reason=%3Cimg%20src=x%3E&rule=%3Csvg%3E&since=%3Ciframe%3E"),
            "audit filters": await a.get("/audit?who=%22%3E%3Cscript%3Ealert(4)%3C/script%3E"
                                         "&id=%3Cimg%20src=x%3E&result=%3Csvg%3E"),
            "purge": await a.post("/confirm", {"csrf": token, "action": "purge",
                                               "older_than": "<script>alert(5)</script>"}),
            "purge refused": await a.post("/act", {"csrf": token, "action": "purge",
                                                   "older_than": "<svg onload=alert(6)>"}),
        }  # fmt: skip
        for name, page in pages.items():
            assert page.status in (200, 400), (name, page.status)
            assert not MARKUP.search(page.body), (name, MARKUP.search(page.body))
        msg = pages["message"].body
        assert "&lt;svg onload" in msg and "&lt;iframe src=x&gt;.txt" in msg  # names shown, escaped


async def test_path_traversal_in_message_ids_finds_nothing(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app, CUSTOMERS[:12])
    (entry_id,) = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    secret = tmp_path / "quarantine" / "secret.eml"
    secret.write_text("Subject: not held\r\n\r\nsecret-marker\r\n")
    async with running_console(config) as console:
        a = Client(console.base)
        await a.login("adam")
        token = csrf_of((await a.get("/")).body)
        tries = ("..%2Fconsole-users", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e", f"{entry_id}%00",
                 f"..%2Fquarantine%2F{entry_id}", "%2Fetc%2Fpasswd", "..%5C..%5Cconsole-users",
                 "audit", "audit.log", "secret")  # fmt: skip
        for t in tries:
            r = await a.get(f"/message/{t}")
            assert r.status in (303, 404), (t, r.status)
            assert "root:" not in r.body and "secret-marker" not in r.body and "scrypt" not in r.body, t
            assert_secured(r, f"/message/{t}")
            for action in ("raw", "reveal"):
                r = await a.post(f"/message/{t}/{action}", {"csrf": token})
                assert r.status in (303, 404), (t, action, r.status)
                assert "root:" not in r.body and "secret-marker" not in r.body, (t, action)
        for t in ("../console-users", "/etc/passwd", "secret", "..", "audit"):
            r = await a.post("/act", {"csrf": token, "action": "delete", "ids": t})
            assert r.status == 303
        assert secret.exists() and (tmp_path / "console-users").exists()
        assert (tmp_path / "quarantine" / f"{entry_id}.eml").exists()


async def test_security_headers_on_every_status(start_relay: StartRelay, sink: Sink, tmp_path: Path) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app, CUSTOMERS[:12])
    (entry_id,) = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    (tmp_path / "quarantine" / f"{entry_id}.json").write_text('{"verdict": "not a table"}')
    async with running_console(config) as console:
        anon = Client(console.base)
        for path in (
            "/login",
            "/healthz",
            "/metrics",
            "/static/console.css",
            "/static/nope.css",
            "/",
            "/nope",
        ):
            assert_secured(await anon.get(path), f"anonymous {path}")
        assert_secured(await anon.post("/login", {"name": "x"}), "bad login")
        a = Client(console.base)
        await a.login("rita")
        seen = set()
        for method, path, form in (
            ("GET", "/nope", None),  # 404
            ("GET", "/logout", None),  # 405
            ("GET", "/message/does-not-exist", None),  # 404 page
            ("GET", f"/message/{entry_id}", None),  # 500: broken metadata
            ("POST", f"/message/{entry_id}/raw", {}),  # 403: no token
            ("GET", "/static/../console-users", None),
        ):
            r = await asyncio.to_thread(a.request, method, path, form)
            seen.add(r.status)
            assert_secured(r, f"{method} {path}")
            assert "Traceback" not in r.body
        assert {403, 404, 405, 500} <= seen, seen


async def test_reveal_release_delete_and_cli_actions_are_audited_with_their_actor(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    for _ in range(3):
        await hold_survey(app, CUSTOMERS[:12])
    first, second, third = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        r = Client(console.base)
        await r.login("rita")
        token = csrf_of((await r.get("/")).body)
        await r.post(f"/message/{first}/reveal", {"csrf": token})
        done = await r.post("/act", {"csrf": token, "action": "release_rewrite", "ids": first})
        assert done.status == 303
        a = Client(console.base)
        await a.login("adam")
        atoken = csrf_of((await a.get("/")).body)
        await a.post("/act", {"csrf": atoken, "action": "delete", "ids": second})
        rc, _, err = await cli("quarantine", "delete", third, "--config", str(config))
        assert rc == 0, err
        recs = [(x["what"], x["id"], x["who"], x.get("via", "cli")) for x in audit(tmp_path)]
        assert ("reveal", first, "rita", "console") in recs
        assert ("release", first, "rita", "console") in recs
        assert ("delete", second, "adam", "console") in recs
        assert any(w == "delete" and i == third and via == "cli" for w, i, _, via in recs), recs
        page = (await a.get("/audit")).body
        for entry in (first, second, third):
            assert entry in page
        assert "rita" in page and "adam" in page and "cli" in page
        only_cli = (await a.get(f"/audit?id={third}")).body
        assert third in only_cli and first not in only_cli
        assert not ADDRESS.search(page)
    assert not ADDRESS.search(console.log), "an address in the console's log"


async def test_login_rate_limit_per_address_across_many_account_names(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    config = console_toml(tmp_path, sink.url, {"console": {"max_login_failures": 3, "login_window": "1h"}})
    await add_users(config)
    async with running_console(config) as console:
        c = Client(console.base)
        for name in ("alice", "bob", "carol"):  # names that do not even exist
            assert (await c.login(name, "guess")).status == 401
        assert (await c.login("dave", "guess")).status == 429
        assert (await c.login("adam")).status == 429  # this address is blocked for every account
    assert "guess" not in console.log and "admin-pass-1" not in console.log


async def test_a_customer_address_in_the_subject_or_a_file_name_is_masked_until_revealed(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    body = (
        "--b1\r\nContent-Type: text/plain\r\n\r\nSee the complaint.\r\n"
        "--b1\r\nContent-Type: text/plain\r\n"
        'Content-Disposition: attachment; filename="letter-from-jane.doe@gmail.com.txt"\r\n\r\n'
        "x\r\n--b1--\r\n"
    )
    data = message(CUSTOMERS[:12], subject="Complaint from jane.doe@gmail.com (urgent)",
                   extra='Content-Type: multipart/mixed; boundary="b1"', body=body)  # fmt: skip
    app = await start_relay(sink.url, QUARANTINE)
    await send(app.port, "news@corp.example", CUSTOMERS[:12], data)
    (entry_id,) = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        r = Client(console.base)
        await r.login("rita")
        listing = await r.get("/")
        token = csrf_of(listing.body)
        shown = {
            "list": listing,
            "list filtered": await r.get("/?subject=complaint"),
            "list found by the name": await r.get("/?subject=jane"),
            "message": await r.get(f"/message/{entry_id}"),
            "confirm": await r.post("/confirm", {"csrf": token, "action": "release", "ids": entry_id}),
        }
        for name, page in shown.items():
            assert page.status == 200, name
            assert "jane.doe" not in page.body, name
            assert ADDRESS.search(page.body) is None or "jane" not in page.body, name
        assert f"/message/{entry_id}" in shown["list found by the name"].body  # filters see the subject
        assert "Complaint from" in shown["list filtered"].body and "@gmail.com" in shown["list"].body
        revealed = await r.post(f"/message/{entry_id}/reveal", {"csrf": token})
        assert "jane.doe@gmail.com" in revealed.body  # a reviewer may reveal it (audited)
    assert "jane" not in console.log and not ADDRESS.search(console.log)


class FromAddress(Client):
    """A client whose connections leave from another loopback address (127.0.0.N)."""

    def __init__(self, base: str, source: str) -> None:
        super().__init__(base)
        self.source = source

    def _conn(self) -> http.client.HTTPConnection:
        host, port = self.base.split("://")[1].split(":")
        return http.client.HTTPConnection(host, int(port), timeout=30, source_address=(self.source, 0))


async def test_login_rate_limit_per_account_across_addresses_and_no_forwarded_for_bypass(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    config = console_toml(tmp_path, sink.url, {"console": {"max_login_failures": 3, "login_window": "1h"}})
    await add_users(config)
    async with running_console(config) as console:
        for n in (2, 3, 4):  # one guess each from three addresses at one account
            assert (await FromAddress(console.base, f"127.0.0.{n}").login("adam", "guess")).status == 401
        fresh = FromAddress(console.base, "127.0.0.5")
        assert (await fresh.login("adam")).status == 429  # the account is blocked, from anywhere
        assert (await fresh.login("rita")).status == 303  # another account from a clean address is not

        # a forged X-Forwarded-For does not give a blocked address a new identity
        c = FromAddress(console.base, "127.0.0.6")
        for name in ("x1", "x2", "x3"):
            assert (await c.login(name, "guess")).status == 401
        page = await c.get("/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.body).group(1)  # type: ignore[union-attr]
        form = urlencode({"nonce": nonce, "name": "rita", "password": "reviewer-pass-1"})
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Forwarded-For": "10.9.8.7",
            "Cookie": "; ".join(f"{k}={v}" for k, v in c.cookies.items()),
        }
        conn = c._conn()
        conn.request("POST", "/login", body=form, headers=headers)
        assert conn.getresponse().status == 429
        conn.close()


async def test_a_reviewer_posting_admin_actions_by_hand_is_refused_and_audited(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app, CUSTOMERS[:12])
    (entry_id,) = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        r = Client(console.base)
        await r.login("rita")
        token = csrf_of((await r.get("/")).body)
        for path, form in (
            ("/confirm", {"action": "delete", "ids": entry_id}),
            ("/confirm", {"action": "purge", "older_than": "0s"}),
            ("/act", {"action": "delete", "ids": entry_id}),
            ("/act", {"action": "purge", "older_than": "0s"}),
            (f"/message/{entry_id}/raw", {}),
        ):
            page = await r.post(path, {**form, "csrf": token})
            assert page.status == 403, (path, form)
            assert "customer0" not in page.body
        assert (tmp_path / "quarantine" / f"{entry_id}.eml").exists()
        recs = [(x["what"], x["result"], x["who"]) for x in audit(tmp_path)]
        assert set(recs) == {("delete", "forbidden", "rita"), ("purge", "forbidden", "rita"),
                             ("view_raw", "forbidden", "rita")}  # fmt: skip
        # an unknown action is no action, for either role
        assert (await r.post("/act", {"action": "release_all", "ids": entry_id, "csrf": token})).status == 400


async def test_odd_forms_get_a_clear_answer_never_a_crash(
    start_relay: StartRelay, sink: Sink, tmp_path: Path
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold_survey(app, CUSTOMERS[:12])
    (entry_id,) = app.runtime.quarantine.ids()
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        a = Client(console.base)
        await a.login("adam")
        token = csrf_of((await a.get("/")).body)
        # the same message deleted twice (two admins, one click each): the second is told, not crashed
        for _ in range(2):
            done = await a.post("/act", {"csrf": token, "action": "delete", "ids": entry_id})
            assert done.status == 303
            page = await a.get(done.header("location"))
            assert page.status == 200
        assert "failed" in page.body or "not held" in page.body.lower() or "no such" in page.body.lower()
        many = await a.post(
            "/confirm", {"csrf": token, "action": "delete", "ids": [f"x{i}" for i in range(2000)]}
        )
        assert many.status < 500
        conn = a._conn()
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="f"; filename="x.txt"\r\n\r\nhi\r\n'
            f"--{boundary}--\r\n"
        )
        cookie = "; ".join(f"{k}={v}" for k, v in a.cookies.items())
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Cookie": cookie}
        conn.request("POST", "/act", body=body, headers=headers)
        assert conn.getresponse().status < 500
        conn.close()
        for page_no in ("0", "-1", "999999", "abc", "1e9"):
            assert (await a.get(f"/?page={page_no}")).status == 200
            assert (await a.get(f"/audit?page={page_no}")).status == 200
        assert (await a.get("/?since=2026-13-45&until=x")).status == 200
    assert "console_error" not in console.log
