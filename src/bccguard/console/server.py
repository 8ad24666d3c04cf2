"""`bccguard console`: check what the console needs, then serve it with uvicorn.

Problems an admin can fix (no users file, a port in use, a certificate that
does not load) end in one line naming the fix, like every other command.
"""

from __future__ import annotations

import ipaddress
import signal
import ssl
import sys
from types import FrameType

import structlog

from bccguard.config import Config, parse_hostport
from bccguard.console import accounts as acc
from bccguard.systemd import notify

log = structlog.get_logger("bccguard.console")


def preflight(cfg: Config) -> str | None:
    """Why the console cannot start, as one line with the fix; None when it can."""
    c = cfg.console
    if not c.users_file:
        return (
            "console.users_file is not set (fix: set it in [console], then "
            "`bccguard console-user add NAME --role admin --config FILE`)"
        )
    try:
        users = acc.load(c.users_file)
    except acc.AccountsError as exc:
        return str(exc)
    if not users:
        return f"{c.users_file} has no accounts (fix: bccguard console-user add NAME --role admin)"
    if c.tls.cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(c.tls.cert, c.tls.key)
        except (OSError, ssl.SSLError) as exc:
            return f"console.tls: cannot load {c.tls.cert} / {c.tls.key}: {exc} (fix: PEM cert and key)"
    return None


def _server_class() -> type:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, ending with exit status 0 after a graceful SIGTERM/SIGINT.

        uvicorn re-raises the signal once it has shut down, so the process dies
        of it (-15); systemd would accept that, but "stopped cleanly" is easier
        to check, for us and for any supervisor, as a plain 0.
        """

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            notify("STOPPING=1")

    return _Server


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(cfg: Config) -> int:
    import uvicorn

    from bccguard.console.app import build_app

    problem = preflight(cfg)
    if problem:
        print(f"bccguard: console: {problem}", file=sys.stderr)
        return 78
    host, port = parse_hostport(cfg.console.listen)
    tls = cfg.console.tls
    config = uvicorn.Config(
        build_app(cfg),
        host=host,
        port=port,
        ssl_certfile=tls.cert or None,
        ssl_keyfile=tls.key or None,
        log_config=None,  # our structlog set-up, not uvicorn's
        access_log=False,  # a URL may carry a search term; the console logs what it did instead
        server_header=False,
        proxy_headers=False,  # the rate limit keys on the real peer
        lifespan="off",
        loop="asyncio",
        timeout_graceful_shutdown=10,
    )
    server = _server_class()(config)
    server.config.load()
    try:
        sock = server.config.bind_socket()
    except SystemExit:  # uvicorn exits when it cannot bind; say why in our words
        print(
            f"bccguard: console: cannot listen on {cfg.console.listen} "
            "(fix: pick a free port in console.listen)",
            file=sys.stderr,
        )
        return 1
    log.info("console_started", listen=cfg.console.listen, tls=bool(tls.cert),
             quarantine=list(cfg.console.quarantine_paths) or cfg.quarantine.path)  # fmt: skip
    if not tls.cert and not _loopback(host):
        # Passwords and session cookies would cross the network in clear text (fine behind a
        # TLS proxy on the same host; then the login rate limit sees the proxy's address).
        log.warning("console_plain_http", listen=cfg.console.listen, fix="set [console.tls] cert and key")
    notify("READY=1")
    server.run(sockets=[sock])
    log.info("console_stopped")
    return 0
