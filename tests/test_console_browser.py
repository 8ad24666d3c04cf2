"""The quarantine console in a real browser: Debian's Chromium driven by Playwright.

A real relay (action "quarantine") holds the mail, a real `bccguard console`
process serves it, the recording sink stands in for the upstream MTA, and
Chromium clicks through the pages as a reviewer or an admin would. Playwright
only drives /usr/bin/chromium: no browser is ever downloaded.

Screenshots of the list and message pages are saved in the test's tmp dir
(and copied to /tmp/console-shots/ for a human to look at).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bccguard.policy.headers import parse_header
from conftest import StartRelay, message, send
from console_helpers import PASSWORDS, add_users, cli, console_toml, running_console
from deploy_helpers import free_port, require_binary
from sink import Sink
from test_quarantine_review import CUSTOMERS, QUARANTINE, hold_survey

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
SHOTS = Path("/tmp/console-shots")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    path = require_binary("chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


def keep_shots(tmp_path: Path, *names: str) -> None:
    """A copy of the screenshots where a person can look at them after the run."""
    SHOTS.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(tmp_path / name, SHOTS / name)


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "quarantine" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Watch:
    """What the page did behind our back: dialogs (alert), requests to anywhere but the console."""

    def __init__(self, page: Any, base: str) -> None:
        self.dialogs: list[str] = []
        self.foreign: list[str] = []

        async def on_dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            await d.dismiss()

        page.on("dialog", on_dialog)
        page.on("request", lambda r: None if r.url.startswith(base) else self.foreign.append(r.url))


async def log_in(browser: Any, base: str, name: str) -> tuple[Any, Any, Watch]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await ctx.new_page()
    watch = Watch(page, base)
    await page.goto(base + "/")
    assert page.url == base + "/login"  # logged out: the login page
    await page.fill("input[name=name]", name)
    await page.fill("input[name=password]", PASSWORDS[name])
    await page.click("button[type=submit]")
    assert page.url == base + "/", await page.content()
    return ctx, page, watch


async def hold(app: Any, subject: str, rcpts: list[str], **kw: Any) -> None:
    await send(app.port, "news@corp.example", rcpts, message(rcpts, subject=subject, **kw))


def rows(page: Any) -> Any:
    return page.locator("table.held tbody tr")


async def test_reviewer_finds_previews_reveals_and_releases_the_survey_rewritten(
    start_relay: StartRelay, sink: Sink, tmp_path: Path, browser: Any
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold(app, "Quarterly newsletter", CUSTOMERS[:15])
    await hold_survey(app)  # 300 customers + sales@corp.example, "Your feedback"
    await hold(app, "Old promo", CUSTOMERS[20:40])
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    ids = {}
    rc, out, _ = await cli("quarantine", "list", "--json", "--config", str(config))
    for r in json.loads(out):
        ids[r["subject"]] = r["id"]
    # an admin on the server deletes one with the CLI: the console's audit page shows it too
    rc, _, err = await cli("quarantine", "delete", ids["Old promo"], "--config", str(config))
    assert rc == 0, err

    async with running_console(config) as console:
        base = console.base
        ctx, page, watch = await log_in(browser, base, "rita")
        assert await rows(page).count() == 2
        assert await page.locator("button[value=delete]").count() == 0  # a reviewer gets no Delete

        # an address typed into a filter never reaches a URL: the browser refuses to submit it
        await page.fill("input[name=subject]", "customer0@gmail.com")
        await page.click("form.filters button[type=submit]")
        assert page.url == base + "/" and await page.locator("input[name=subject]:invalid").count() == 1
        await page.fill("input[name=subject]", "feedback")
        await page.click("form.filters button[type=submit]")
        assert "subject=feedback" in page.url
        assert await rows(page).count() == 1
        row = await rows(page).first.inner_text()
        assert "Your feedback" in row and "corp.example" in row and "301" in row and "300" in row
        await page.screenshot(path=str(tmp_path / "console-list.png"), full_page=True)

        await page.click("text=Your feedback")
        assert page.url == f"{base}/message/{ids['Your feedback']}"
        head = await page.locator("pre.headers").inner_text()
        assert "\u2022\u2022\u2022@gmail.com" in head and "\u2022\u2022\u2022@clients.example" in head
        html = await page.content()
        assert not re.search(r"customer\d+@", html)  # masked everywhere on the page
        assert "sales@corp.example" in head  # internal addresses are not customer data
        assert "300 customer addresses masked" in html
        await page.screenshot(path=str(tmp_path / "console-message.png"), full_page=True)

        await page.click("text=Reveal addresses (audited)")
        head = await page.locator("pre.headers").inner_text()
        assert "customer0@clients.example" in head and "customer1@gmail.com" in head
        rec = audit(tmp_path)[-1]
        want = ("reveal", "rita", "console", ids["Your feedback"])
        assert (rec["what"], rec["who"], rec["via"], rec["id"]) == want
        assert "@" not in json.dumps(rec)  # the audit log says who looked, not what they saw

        await page.click("button[value=release_rewrite]")
        assert page.url == base + "/confirm"
        assert "Your feedback" in await page.locator("table.held").inner_text()
        assert sink.messages == []  # nothing before the confirmation
        await page.click("text=Yes, release rewritten")
        done = await page.locator("ul.outcomes").inner_text()
        assert "released rewritten (300 addresses hidden) to 301 of 301 recipients" in done

        (got,) = sink.messages
        assert sorted(got.rcpt_tos) == sorted([*CUSTOMERS, "sales@corp.example"])
        got_head = got.data[: parse_header(got.data).body_offset]
        assert b"customer" not in got_head and b"gmail.com" not in got_head
        assert b"X-BCCGuard: rewritten; hidden=300" in got_head
        assert not (tmp_path / "quarantine" / f"{ids['Your feedback']}.eml").exists()

        await page.goto(base + "/audit")
        audit_text = await page.locator("table.audit").inner_text()
        assert re.search(r"rita\s+console\s+release\s+\S+\s+released", audit_text)
        assert re.search(r"\s+cli\s+delete\s+" + ids["Old promo"], audit_text)  # the CLI's action
        await page.fill("input[name=who]", "rita")
        await page.click("form.filters button[type=submit]")
        text = await page.locator("table.audit tbody").inner_text()
        assert "cli" not in text and text.count("rita") == 2  # the reveal and the release
        await page.screenshot(path=str(tmp_path / "console-audit.png"), full_page=True)
        assert watch.dialogs == [] and watch.foreign == []
        await ctx.close()
    keep_shots(tmp_path, "console-list.png", "console-message.png", "console-audit.png")
    assert not re.search(r"customer\d+@", console.log)


async def test_admin_bulk_deletes_two_and_a_reviewer_cannot(
    start_relay: StartRelay, sink: Sink, tmp_path: Path, browser: Any
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    for subject in ("Promo A", "Promo B", "Promo C"):
        await hold(app, subject, CUSTOMERS[:12])
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        base = console.base
        # the reviewer: no Delete button, and a hand-made delete is refused (and audited)
        ctx, page, _ = await log_in(browser, base, "rita")
        await page.check("tr:has-text('Promo A') input[name=ids]")
        await page.locator("button[value=release]").evaluate(
            "b => { b.value = 'delete'; }"  # what a reviewer crafting the form would send
        )
        await page.click("button[value=delete]")
        assert "may not delete" in await page.content()
        assert len(list((tmp_path / "quarantine").glob("*.eml"))) == 3
        assert audit(tmp_path)[-1]["result"] == "forbidden"
        await ctx.close()

        ctx, page, watch = await log_in(browser, base, "adam")
        await page.check("tr:has-text('Promo A') input[name=ids]")
        await page.check("tr:has-text('Promo B') input[name=ids]")
        await page.click("button[value=delete]")
        confirm = await page.locator("table.held").inner_text()
        assert "Promo A" in confirm and "Promo B" in confirm and "Promo C" not in confirm
        assert len(list((tmp_path / "quarantine").glob("*.eml"))) == 3  # not before the confirmation
        await page.click("text=Yes, delete")
        assert (await page.locator("ul.outcomes").inner_text()).count("deleted") == 2
        await page.click("text=Back to held mail")
        assert await rows(page).count() == 1 and "Promo C" in await rows(page).first.inner_text()
        deletes = [r for r in audit(tmp_path) if r["what"] == "delete" and r["result"] == "deleted"]
        assert [(r["who"], r["via"]) for r in deletes] == [("adam", "console")] * 2
        assert sink.messages == [] and watch.dialogs == []
        await ctx.close()


async def test_forms_without_the_csrf_token_are_refused_and_logged_out_pages_redirect(
    start_relay: StartRelay, sink: Sink, tmp_path: Path, browser: Any
) -> None:
    app = await start_relay(sink.url, QUARANTINE)
    await hold(app, "Promo A", CUSTOMERS[:12])
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    async with running_console(config) as console:
        base = console.base
        (entry_id,) = [p.stem for p in (tmp_path / "quarantine").glob("*.eml")]
        ctx = await browser.new_context()
        page = await ctx.new_page()
        for path in ("/", f"/message/{entry_id}", "/audit", "/done/x", "/anything"):
            await page.goto(base + path)
            assert page.url == base + "/login", path
        await ctx.close()

        ctx, page, _ = await log_in(browser, base, "adam")
        await page.click("text=Promo A")
        await page.locator("section.act input[name=csrf]").evaluate("e => e.remove()")
        await page.click("button[value=delete]")
        assert "security token" in await page.content()
        await page.go_back()
        await page.click("button[value=delete]")  # the page as served, token and all: the confirmation
        await page.locator("form[action='/act'] input[name=csrf]").evaluate("e => e.value = 'forged'")
        await page.click("text=Yes, delete")
        assert "security token" in await page.content()
        assert (tmp_path / "quarantine" / f"{entry_id}.eml").exists()
        # logged out, the same pages send the browser back to the login page
        await page.goto(base + "/")
        await page.click("text=Log out")
        assert page.url == base + "/login"
        for path in ("/", f"/message/{entry_id}", "/audit"):
            await page.goto(base + path)
            assert page.url == base + "/login", path
        await ctx.close()


HOSTILE_SUBJECT = "<script>window.__pwned=1;alert('subject')</script>"


def hostile(track: int) -> bytes:
    html = (
        f"<html><head><script>window.__pwned=2;alert('body')</script>"
        f"<link rel=stylesheet href='http://127.0.0.1:{track}/s.css'></head><body>"
        f"<p>Dear customer</p><img src='http://127.0.0.1:{track}/pixel.png' alt='logo'>"
        f"<img src=x onerror=\"window.__pwned=3;alert('img')\">"
        f"<form action='http://127.0.0.1:{track}/phish'><input name=pw><button>Go</button></form>"
        f"<iframe src='http://127.0.0.1:{track}/frame'></iframe>"
        f"<a href=\"javascript:alert('link')\">click</a></body></html>"
    )
    body = (
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlain part <b>not bold</b>\r\n"
        "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n"
        "--b1\r\nContent-Type: application/pdf; name=\"report.pdf\"\r\n"
        "Content-Disposition: attachment; filename=\"report.pdf\"\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        "JVBERi0xLjQK\r\n--b1--\r\n"
    )
    return message(
        CUSTOMERS[:12],
        subject=HOSTILE_SUBJECT,
        sender="\"<img src=x onerror=alert('name')>\" <news@corp.example>",
        extra='Content-Type: multipart/mixed; boundary="b1"',
        body=body,
    )


async def test_hostile_subject_and_html_run_no_script_and_load_nothing(
    start_relay: StartRelay, sink: Sink, tmp_path: Path, browser: Any
) -> None:
    hits: list[bytes] = []

    async def tracker(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hits.append(await r.read(200))
        w.close()

    track = free_port()
    server = await asyncio.start_server(tracker, "127.0.0.1", track)
    app = await start_relay(sink.url, QUARANTINE)
    await send(app.port, "news@corp.example", CUSTOMERS[:12], hostile(track))
    config = console_toml(tmp_path, sink.url)
    await add_users(config)
    try:
        async with running_console(config) as console:
            ctx, page, watch = await log_in(browser, console.base, "adam")
            subject_cell = page.locator("table.held tbody tr td a").first
            assert await subject_cell.inner_text() == HOSTILE_SUBJECT  # shown as text
            await subject_cell.click()
            assert await page.locator("h1.subject").inner_text() == HOSTILE_SUBJECT
            bodies = await page.locator("pre.body").all_inner_texts()
            assert "Plain part <b>not bold</b>" in bodies[0]
            assert "Dear customer" in bodies[1] and "[image: logo (not loaded)]" in bodies[1]
            assert "alert" not in bodies[1]  # the script's text is dropped, not shown
            attachments = await page.locator("table.attachments").inner_text()
            assert "report.pdf" in attachments and "application/pdf" in attachments
            await page.click("text=Reveal addresses (audited)")  # the unmasked page is inert too
            await page.screenshot(path=str(tmp_path / "console-hostile.png"), full_page=True)
            assert await page.evaluate("() => window.__pwned") is None
            assert await page.locator("img, iframe, script, form[action^='http']").count() == 0
            assert watch.dialogs == [] and watch.foreign == [] and hits == []
            await ctx.close()
    finally:
        server.close()
        await server.wait_closed()
    keep_shots(tmp_path, "console-hostile.png")
