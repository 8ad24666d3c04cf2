"""`/metrics`, `/healthz` and `/readyz` over plain HTTP, served from a daemon thread.

Why a thread and not the asyncio loop: a scrape renders the whole registry
(milliseconds, more with many rules or in multiprocess mode where it reads
every worker's files). Doing that on the SMTP event loop would stall every
session for the duration; in a thread it only contends for the GIL. Each
request gets its own thread (`ThreadingHTTPServer`) so a slow or stuck client
cannot block the next scrape, and a socket timeout bounds how long it can try.

`readiness` is the app's callable and is invoked from that thread: it must
only read state (flags, timestamps), never touch the event loop.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from bccguard.config import parse_hostport
from bccguard.ops.metrics import Metrics, exposition_registry

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]

REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # never keep the relay alive for a scrape in progress
    allow_reuse_address = True  # restart right after a stop without TIME_WAIT errors
    registry: CollectorRegistry
    readiness: Readiness

    def server_bind(self) -> None:
        """Bind without HTTPServer's `getfqdn()`, a reverse DNS lookup that can hang start-up."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    # HTTP/1.0: one request per connection. Keep-alive would save Prometheus one
    # handshake per scrape, but a kept-alive connection is served by its own
    # thread even after stop(), so a stopped relay would keep answering scrapes.
    protocol_version = "HTTP/1.0"
    server_version = "bccguard"
    sys_version = ""

    _routes: ClassVar[dict[str, str]] = {
        "/metrics": "_metrics",
        "/healthz": "_healthz",
        "/readyz": "_readyz",
    }

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def _dispatch(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        name = self._routes.get(path)
        if name is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", body=body)
            return
        getattr(self, name)(body)

    def _metrics(self, body: bool) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            output = encoder(self.server.registry)
        except Exception:  # a broken collector must not kill the thread silently
            log.exception("rendering /metrics failed")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"metrics unavailable\n", body=body)
            return
        self._send(HTTPStatus.OK, output, content_type=content_type, body=body)

    def _healthz(self, body: bool) -> None:
        # Alive means this thread answers; readiness is a separate question.
        self._send(HTTPStatus.OK, b"ok\n", body=body)

    def _readyz(self, body: bool) -> None:
        try:
            ready, reason = self.server.readiness()
        except Exception as exc:
            # Type and message in the line itself: a traceback may be dropped by a log pipeline,
            # and "ModuleNotFoundError: No module named 'bccguard.app'" is the whole diagnosis.
            log.exception("readiness check raised %s: %s", type(exc).__name__, exc)
            ready, reason = False, f"readiness check raised an error ({type(exc).__name__})"
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        text = reason or ("ready" if ready else "not ready")
        self._send(status, text.encode("utf-8", "replace") + b"\n", body=body)

    def _send(
        self,
        status: HTTPStatus,
        payload: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        body: bool = True,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the stdlib's per-request stderr line; scrapes every few seconds are noise."""


class OpsServer:
    """The ops HTTP endpoint of one relay process.

    `start()` binds synchronously so that a taken or forbidden port is an
    `OSError` the CLI can report as one line before any mail is accepted;
    serving then happens in a daemon thread. `port` is the bound port, which
    is how tests using `listen="127.0.0.1:0"` find it.
    """

    def __init__(
        self,
        listen: str,
        metrics: Metrics | None,
        readiness: Readiness,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.listen = listen
        self.metrics = metrics
        self.readiness = readiness
        self._registry = registry
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> None:
        """Bind now (OSError on failure), then serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("OpsServer already started")
        host, port = parse_hostport(self.listen)
        family, sockaddr = _resolve(host, port)
        server_cls = _Server6 if family == socket.AF_INET6 else _Server
        server = server_cls(sockaddr, _Handler)
        if self._registry is None and self.metrics is None:
            raise ValueError("OpsServer needs metrics or a registry")
        server.registry = self._registry or exposition_registry(self.metrics)  # type: ignore[arg-type]
        server.readiness = self.readiness
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name=f"bccguard-ops:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice or before start."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """Pick IPv4 or IPv6 from the listen host ("::1" needs an AF_INET6 socket)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


__all__ = ["OpsServer", "Readiness"]
