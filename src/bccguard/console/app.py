"""The console's web application: routes, auth, CSRF, security headers (Starlette + Jinja2).

Why Starlette with Jinja2 (both BSD-3-Clause) served by uvicorn (BSD-3-Clause):
small, well kept, ASGI like the rest of bccguard's asyncio world, and the
anchors in STYLE.md already include uvicorn. Pages are server-rendered and
every action is a plain form, so the console works without JavaScript and
ships no script at all (the CSP forbids scripts outright).

Request flow: `_Guard` (pure ASGI middleware) adds the security headers to
every response and sends anyone without a live session to /login; each POST
route checks the session's CSRF token before it reads anything else.
Blocking work (the store, scrypt, a release through the upstream) runs in
worker threads so one slow release never stalls other pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bccguard import review
from bccguard.config import Config
from bccguard.console import accounts as acc
from bccguard.console import view
from bccguard.console.metrics import ConsoleMetrics
from bccguard.console.sessions import LoginLimiter, Session, Sessions, same
from bccguard.store.durable import check_id
from bccguard.store.quarantine import Entry, Quarantine
from bccguard.store.quarantines import AmbiguousEntry, Quarantines

log = structlog.get_logger("bccguard.console")

MAX_BODY = 1 << 20  # a form of 500 ids is ~25 KB; nothing posted here is bigger
PUBLIC = ("/login", "/healthz", "/metrics", "/favicon.ico")
MAX_IDS = 500
AUDIT_PAGE = 100

# What each action is called on a button and in a sentence, and who may do it.
ACTIONS: dict[str, tuple[str, str]] = {
    "release": ("Release as is", "reviewer"),
    "release_rewrite": ("Release rewritten (Bcc-style)", "reviewer"),
    "release_split": ("Release split (one copy per customer)", "reviewer"),
    "delete": ("Delete", "admin"),
    "purge": ("Purge", "admin"),
}
MODES = {"release": "as_is", "release_rewrite": "rewrite", "release_split": "split"}

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    (b"cache-control", b"no-store"),
]


class Accounts:
    """The users file, read again when it changes (console-user add/remove need no restart)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp: tuple[float, int] | None = None
        self.verifier = acc.Verifier({})
        self.current()

    def current(self) -> dict[str, acc.Account]:
        st = self.path.stat()
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            self.verifier = acc.Verifier(acc.load(self.path))
            self._stamp = stamp
        return self.verifier.accounts


@dataclass
class Console:
    cfg: Config
    accounts: Accounts
    metrics: ConsoleMetrics
    sessions: Sessions = field(init=False)
    limiter: LoginLimiter = field(init=False)
    qs: Quarantines = field(init=False)
    flashes: dict[str, tuple[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.cfg.console
        self.sessions = Sessions(c.session_ttl)
        self.limiter = LoginLimiter(c.max_login_failures, c.login_window)
        self.qs = Quarantines(c.quarantine_paths, self.cfg.quarantine.path)

    def cfg_for(self, q: Quarantine) -> Config:
        """The config with `q` as quarantine.path: review.py then acts on (and audits into) that one."""
        own = dataclasses.replace(self.cfg.quarantine, path=str(q.path))
        return dataclasses.replace(self.cfg, quarantine=own)

    @property
    def secure(self) -> bool:
        return bool(self.cfg.console.tls.cert)

    @property
    def cookie(self) -> str:
        # __Host-: the browser refuses it without Secure, from another path or a subdomain.
        return "__Host-bccguard_session" if self.secure else "bccguard_session"

    @property
    def login_cookie(self) -> str:
        return "__Host-bccguard_login" if self.secure else "bccguard_login"

    def session_of(self, request: Request | Scope) -> tuple[str | None, Session | None]:
        cookies = request.cookies if isinstance(request, Request) else Request(request).cookies
        token = cookies.get(self.cookie)
        s = self.sessions.get(token)
        if s is not None:
            try:
                a = self.accounts.current().get(s.name)
            except (OSError, acc.AccountsError):
                a = None
            if a is None or a.role != s.role:  # removed, or its role changed: log in again
                self.sessions.end(token)
                return token, None
        return token, s


# ---------------------------------------------------------------- middleware


class _Guard:
    """Security headers on every response; no session, no page (but the public paths)."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in HEADERS if k not in names]
                if self.console.secure:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        path = scope["path"]
        length = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            await PlainTextResponse("request too large", 413)(scope, receive, send_with_headers)
            return
        receive = _capped(receive)
        if not (path in PUBLIC or path.startswith("/static/")):
            _, session = self.console.session_of(scope)
            if session is None:
                await RedirectResponse("/login", status_code=303)(scope, receive, send_with_headers)
                return
            scope.setdefault("state", {})["session"] = session
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            self.console.metrics.errors.labels(kind="internal").inc()
            log.exception("console_error", path="/".join(path.split("/")[:3]))
            if not started:  # Starlette's own error handler may have answered 500 already
                await PlainTextResponse("internal error (see the console's log)", 500)(
                    scope, receive, send_with_headers
                )


def _capped(receive: Receive) -> Receive:
    """A body without Content-Length (chunked) is cut off after MAX_BODY bytes, as a disconnect."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                return {"type": "http.disconnect"}
        return message

    return capped


# ---------------------------------------------------------------- helpers


def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("bccguard.console", "templates"),
        autoescape=select_autoescape(["html"], default=True),
    )
    env.filters["qs"] = urlencode
    return env


def build_app(cfg: Config, metrics: ConsoleMetrics | None = None) -> ASGIApp:
    from bccguard import __version__

    console = Console(cfg, Accounts(cfg.console.users_file), metrics or ConsoleMetrics(version=__version__))
    env = _env()

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        s: Session | None = request.scope.get("state", {}).get("session")
        html = env.get_template(name).render(user=s, actions=ACTIONS, **ctx)
        return HTMLResponse(html, status_code=status)

    def session(request: Request) -> Session:
        s: Session = request.scope["state"]["session"]
        return s

    async def checked_form(request: Request) -> FormData:
        """The POSTed form, after its CSRF token matched the session's; else a 403 page."""
        form = await request.form(max_files=0, max_fields=MAX_IDS + 20)
        if not same(str(form.get("csrf", "")), session(request).csrf):
            console.metrics.errors.labels(kind="csrf").inc()
            log.warning("console_csrf_refused", user=session(request).name)
            raise _Refused(page(request, "error.html", 403, title="Refused",
                                text="The form had no valid security token. Go back, reload the page "
                                     "and try again."))  # fmt: skip
        return form

    def audit(what: str, entry_id: str, result: str, s: Session) -> None:
        """Into the audit log of the directory holding the entry (the first one if none does)."""
        try:
            q = console.qs.find(entry_id) or console.qs.home()
        except ValueError:  # not an id, or held twice
            q = console.qs.home()
        q.audit(what, entry_id, result, who=s.name, via="console")

    # ------------------------------------------------------------ login
    async def login_form(request: Request, error: str = "", status: int = 200) -> Response:
        # One nonce per browser, kept while it is valid: a second tab (or the browser's own
        # favicon request bounced here) must not invalidate the form already on screen.
        nonce = request.cookies.get(console.login_cookie, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{32}", nonce):
            nonce = secrets.token_urlsafe(24)
        r = page(request, "login.html", status, nonce=nonce, error=error)
        r.set_cookie(console.login_cookie, nonce, max_age=1800, httponly=True, samesite="strict",
                     secure=console.secure, path="/")  # fmt: skip
        return r

    async def login(request: Request) -> Response:
        if request.method == "GET":
            _, s = console.session_of(request)
            if s is not None:
                return RedirectResponse("/", status_code=303)
            return await login_form(request)
        form = await request.form(max_files=0, max_fields=10)
        address = request.client.host if request.client else "?"
        if not same(str(form.get("nonce", "")), request.cookies.get(console.login_cookie)):
            console.metrics.logins.labels(result="bad_request").inc()
            return await login_form(request, "The login form expired. Please try again.", 400)
        name = str(form.get("name", ""))[:64]
        password = str(form.get("password", ""))[:1024]
        if console.limiter.blocked(name, address):
            console.metrics.logins.labels(result="rate_limited").inc()
            log.warning("console_login", result="rate_limited", client=address)
            return await login_form(request, "Too many failed attempts. Wait a few minutes, then try again.",
                                    429)  # fmt: skip
        try:
            console.accounts.current()
        except (OSError, acc.AccountsError) as exc:
            log.error("console_users_file", error=str(exc))
            return await login_form(request, "The console's users file cannot be read.", 503)
        account = await console.accounts.verifier.verify(name, password)
        if account is None:
            console.limiter.failed(name, address)
            console.metrics.logins.labels(result="failed").inc()
            log.info("console_login", result="failed", client=address)
            return await login_form(request, "Wrong name or password.", 401)
        old = request.cookies.get(console.cookie)
        console.sessions.end(old)  # a fresh token at login: no session fixation
        token, _ = console.sessions.create(account.name, account.role)
        console.metrics.logins.labels(result="ok").inc()
        console.metrics.sessions.set(len(console.sessions))
        log.info("console_login", result="ok", user=account.name, role=account.role, client=address)
        r = RedirectResponse("/", status_code=303)
        r.set_cookie(console.cookie, token, max_age=int(cfg.console.session_ttl), httponly=True,
                     samesite="strict", secure=console.secure, path="/")  # fmt: skip
        r.delete_cookie(console.login_cookie, path="/", secure=console.secure, httponly=True,
                        samesite="strict")  # fmt: skip
        return r

    async def logout(request: Request) -> Response:
        await checked_form(request)
        token, s = console.session_of(request)
        console.sessions.end(token)
        log.info("console_logout", user=s.name if s else "")
        r = RedirectResponse("/login", status_code=303)
        r.delete_cookie(console.cookie, path="/", secure=console.secure, httponly=True, samesite="strict")
        return r

    # ------------------------------------------------------------ pages
    async def listing(request: Request) -> Response:
        f = view.Filters.from_query(request.query_params)
        rows = await asyncio.to_thread(view.rows, console.qs, f, cfg)
        size = cfg.console.page_size
        pages = max(1, math.ceil(len(rows) / size))
        try:
            n = min(max(1, int(request.query_params.get("page", "1"))), pages)
        except ValueError:
            n = 1
        rules = sorted({r["rule"] for r in rows} | {r.name for r in cfg.policy.rules} | {"default"})
        return page(request, "list.html", rows=rows[(n - 1) * size : n * size], total=len(rows),
                    page=n, pages=pages, f=f, query=f.query(), rules=rules,
                    csrf=session(request).csrf)  # fmt: skip

    def _entry_or_404(entry_id: str) -> tuple[Quarantine, Entry] | None:
        """The entry and its directory; None if not held; AmbiguousEntry if held twice."""
        try:
            return console.qs.get(entry_id)
        except AmbiguousEntry:
            raise
        except (ValueError, OSError):
            return None

    async def _held(request: Request, entry_id: str) -> tuple[Quarantine, Entry] | None:
        """As _entry_or_404, an id held in two directories refused with a page that says where."""
        try:
            return await asyncio.to_thread(_entry_or_404, entry_id)
        except AmbiguousEntry as exc:
            console.metrics.errors.labels(kind="ambiguous").inc()
            log.error("console_ambiguous_id", id=entry_id, dirs=len(exc.paths))
            raise _Refused(page(request, "error.html", 409, title="Held twice", text=str(exc))) from None

    async def message(request: Request, reveal: bool = False) -> Response:
        entry_id = request.path_params["id"]
        held = await _held(request, entry_id)
        if held is None:
            return page(request, "error.html", 404, title="Not held",
                        text="No such message in the quarantine: it was released or deleted.")  # fmt: skip
        q, e = held
        try:
            d = await asyncio.to_thread(view.detail, cfg, q, e, reveal=reveal)
        except FileNotFoundError:
            return page(request, "error.html", 404, title="Not held", text="The message file is gone.")
        return page(request, "message.html", d=d, id=e.id, reveal=reveal, csrf=session(request).csrf)

    async def reveal(request: Request) -> Response:
        await checked_form(request)
        s = session(request)
        entry_id = request.path_params["id"]
        if await _held(request, entry_id) is None:
            return await message(request)
        await asyncio.to_thread(audit, "reveal", entry_id, "shown", s)
        console.metrics.actions.labels(kind="reveal", result="done").inc()
        log.info("console_action", kind="reveal", id=entry_id, user=s.name)
        return await message(request, reveal=True)

    async def raw(request: Request) -> Response:
        await checked_form(request)
        s = session(request)
        entry_id = request.path_params["id"]
        if s.role != "admin":
            console.metrics.actions.labels(kind="raw", result="forbidden").inc()
            await asyncio.to_thread(audit, "view_raw", entry_id, "forbidden", s)
            return page(request, "error.html", 403, title="Not allowed",
                        text="Only an admin may view a message's raw source.")  # fmt: skip
        held = await _held(request, entry_id)
        if held is None:
            return await message(request)
        q, e = held
        data = await asyncio.to_thread(q.message, e.id)
        await asyncio.to_thread(audit, "view_raw", e.id, "shown", s)
        console.metrics.actions.labels(kind="raw", result="done").inc()
        log.info("console_action", kind="raw", id=e.id, user=s.name)
        return Response(data.decode("utf-8", "replace"), media_type="text/plain; charset=utf-8",
                        headers={"content-security-policy": "sandbox; default-src 'none'"})  # fmt: skip

    def _ids(form: FormData) -> list[str]:
        ids = []
        for v in form.getlist("ids")[:MAX_IDS]:
            try:
                ids.append(check_id(str(v)))
            except ValueError:
                continue
        return list(dict.fromkeys(ids))

    def _may(s: Session, action: str) -> bool:
        return action in ACTIONS and (ACTIONS[action][1] == "reviewer" or s.role == "admin")

    async def confirm(request: Request) -> Response:
        form = await checked_form(request)
        s = session(request)
        action = str(form.get("action", ""))
        if action not in ACTIONS:
            return page(request, "error.html", 400, title="No action", text="Pick an action.")
        if not _may(s, action):
            return await _forbidden(request, s, action, _ids(form))
        if action == "purge":
            older = str(form.get("older_than", "30d"))[:20]
            return page(request, "confirm.html", action=action, rows=[], older_than=older, csrf=s.csrf)
        ids = _ids(form)
        if not ids:
            return page(request, "error.html", 400, title="Nothing selected",
                        text="Tick at least one message, then choose an action.")  # fmt: skip
        found = await asyncio.to_thread(_summaries, ids)
        return page(request, "confirm.html", action=action, rows=found, csrf=s.csrf, older_than="")

    def _summaries(ids: list[str]) -> list[dict[str, Any]]:
        out = []
        for i in ids:
            try:
                held = _entry_or_404(i)
            except AmbiguousEntry:  # left off the confirm page; acting on it says why not
                held = None
            if held is not None:
                q, e = held
                r = review.summary(q, e)
                r["sender_domain"] = view.sender_domain(r.pop("mail_from"))
                r["subject"] = view.masker(cfg, q, e)(r["subject"])
                out.append(r)
        return out

    async def _forbidden(request: Request, s: Session, action: str, ids: list[str]) -> Response:
        for i in ids or ["-"]:
            await asyncio.to_thread(audit, action, i, "forbidden", s)
        kind = action if action in ("delete", "purge") else "delete"
        console.metrics.actions.labels(kind=kind, result="forbidden").inc(max(1, len(ids)))
        log.warning("console_forbidden", kind=action, user=s.name, role=s.role, count=len(ids))
        return page(request, "error.html", 403, title="Not allowed",
                    text=f"Your role ({s.role}) may not {ACTIONS[action][0].lower()} messages; "
                         "ask an admin.")  # fmt: skip

    async def act(request: Request) -> Response:
        form = await checked_form(request)
        s = session(request)
        action = str(form.get("action", ""))
        if action not in ACTIONS:
            return page(request, "error.html", 400, title="No action", text="Pick an action.")
        ids = _ids(form)
        if not _may(s, action):
            return await _forbidden(request, s, action, ids)
        outcomes: list[dict[str, Any]] = []
        if action == "purge":
            older = str(form.get("older_than", ""))[:20]
            try:
                counts = await asyncio.to_thread(_purge_all, older, s)
            except review.ReviewError as exc:
                return page(request, "error.html", 400, title="Purge refused", text=str(exc))
            console.metrics.actions.labels(kind="purge", result="done").inc(counts["entry"])
            log.info("console_action", kind="purge", user=s.name, count=counts["entry"])
            outcomes.append({"id": f"older than {older}", "result": "done",
                             "text": f"{counts['entry']} messages purged"})  # fmt: skip
        for i in ids:
            outcomes.append(await _one(action, i, s))
        token = secrets.token_urlsafe(12)
        console.flashes[token] = (s.name, outcomes)
        while len(console.flashes) > 100:
            console.flashes.pop(next(iter(console.flashes)))
        return RedirectResponse(f"/done/{token}", status_code=303)

    def _purge_all(older: str, s: Session) -> dict[str, int]:
        """review.purge_now on every directory, each purge audited in its own directory."""
        review.purge_age(older)  # a bad age is refused once, before any directory is touched
        total = {"entry": 0, "orphan": 0, "temp": 0}
        for q in console.qs.dirs():
            for kind, n in review.purge_now(console.cfg_for(q), older, who=s.name, via="console").items():
                total[kind] = total.get(kind, 0) + n
        return total

    def _own_cfg(entry_id: str) -> Config:
        """The config whose quarantine.path is the directory holding the entry."""
        try:
            q = console.qs.find(entry_id)
        except AmbiguousEntry as exc:
            raise review.ReviewError(str(exc)) from None
        if q is None:
            raise review.ReviewError(f"no entry {entry_id} (fix: it was released or deleted meanwhile)")
        return console.cfg_for(q)

    async def _one(action: str, entry_id: str, s: Session) -> dict[str, Any]:
        try:
            own = await asyncio.to_thread(_own_cfg, entry_id)
            if action == "delete":
                await asyncio.to_thread(review.delete_now, own, entry_id, who=s.name, via="console")
                result, text = "done", "deleted"
            else:
                r = await asyncio.to_thread(review.release_now, own, entry_id, MODES[action], who=s.name,
                                            via="console")  # fmt: skip
                result = "done" if r.result == "released" else "partial"
                text = f"released {r.how} to {r.accepted} of {r.total} recipients"
                if r.refused:
                    text += f"; {r.refused} refused ({', '.join(r.codes)}) stay held"
        except review.ReviewError as exc:
            result, text = "failed", view.ADDR.sub("<address>", str(exc))
        console.metrics.actions.labels(kind=action, result=result).inc()
        log.info("console_action", kind=action, id=entry_id, user=s.name, result=result)
        return {"id": entry_id, "result": result, "text": text}

    async def done(request: Request) -> Response:
        flash = console.flashes.get(request.path_params["token"])
        if flash is None or flash[0] != session(request).name:  # another user's outcome: not yours to see
            return RedirectResponse("/", status_code=303)
        del console.flashes[request.path_params["token"]]
        return page(request, "done.html", outcomes=flash[1])

    async def audit_page(request: Request) -> Response:
        f = view.AuditFilters.from_query(request.query_params)
        rows = await asyncio.to_thread(view.audit_rows, console.qs, f)
        pages = max(1, math.ceil(len(rows) / AUDIT_PAGE))
        try:
            n = min(max(1, int(request.query_params.get("page", "1"))), pages)
        except ValueError:
            n = 1
        return page(request, "audit.html", rows=rows[(n - 1) * AUDIT_PAGE : n * AUDIT_PAGE], total=len(rows),
                    page=n, pages=pages, f=f, query=f.query())  # fmt: skip

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)  # asked for by every browser; none to give

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def metrics_page(request: Request) -> Response:
        console.metrics.sessions.set(len(console.sessions))
        return Response(generate_latest(console.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def refusing(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except _Refused as r:
                return r.response

        return wrapped

    routes = [
        Route("/login", refusing(login), methods=["GET", "POST"]),
        Route("/logout", refusing(logout), methods=["POST"]),
        Route("/", listing),
        Route("/message/{id}", refusing(message)),
        Route("/message/{id}/reveal", refusing(reveal), methods=["POST"]),
        Route("/message/{id}/raw", refusing(raw), methods=["POST"]),
        Route("/confirm", refusing(confirm), methods=["POST"]),
        Route("/act", refusing(act), methods=["POST"]),
        Route("/done/{token}", done),
        Route("/audit", audit_page),
        Route("/healthz", healthz),
        Route("/favicon.ico", favicon),
        Route("/metrics", metrics_page),
        Mount("/static", app=StaticFiles(directory=str(files("bccguard.console") / "static")), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.console = console
    return _Guard(app, console)


class _Refused(Exception):
    """Carries the refusal page out of a helper to the route that returns it."""

    def __init__(self, response: Response) -> None:
        super().__init__("refused")
        self.response = response
