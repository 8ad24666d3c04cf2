"""Wires config, stores, upstream, metrics and the SMTP listener; owns the lifecycle.

Start: stores opened, upstream client built, listener bound, ops HTTP up,
spool retried, then READY=1. SIGTERM: stop accepting, say 421 to idle
sessions, let DATA in flight finish within `shutdown_timeout`, then cut the
rest (they got no 250, so they retry), exit 0. SIGHUP: load and validate the
file again beside the running config, swap the snapshot, or keep the old one
and log why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bccguard import __version__
from bccguard.config import Config, ConfigError, load, parse_hostport
from bccguard.notify import Notifier
from bccguard.ops.instance import lock_dir, release
from bccguard.ops.logs import get_logger
from bccguard.ops.metrics import Metrics
from bccguard.ops.readiness import outbox_path, read_state, upstream_readiness
from bccguard.preflight import binding
from bccguard.relay import Runtime
from bccguard.retry import Retrier
from bccguard.smtp.auth import Credentials, CredentialsError
from bccguard.smtp.server import RelayHandler, RelaySMTP, SessionGate
from bccguard.smtp.tls import server_context
from bccguard.store.quarantine import Quarantine
from bccguard.store.spool import Spool
from bccguard.systemd import notify
from bccguard.upstream import open_upstream
from bccguard.workers import WorkerRole

if TYPE_CHECKING:
    from bccguard.milter.listener import MilterListener

PROBE_INTERVAL = 15.0


def rule_names(config: Config) -> list[str]:
    return ["default", *(r.name for r in config.policy.rules)]


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """`[server] event_loop`: uvloop for "uvloop", and for "auto" when it is installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


class App:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        metrics: Metrics | None = None,
        worker: WorkerRole | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config_path = config_path
        self.overrides = overrides  # `serve --listen ...`: laid over the file again on each reload
        # Under a supervisor: share the port, leave /metrics to it, enforce a share of the limits.
        self.worker = worker
        self.log = get_logger("bccguard")
        self.metrics = metrics or Metrics(rules=rule_names(config), version=__version__)
        self.notifier = Notifier()  # one per process: the rate limit survives reloads
        self.runtime = self._build_runtime(config)
        self.gate = SessionGate()
        self.sessions: set[RelaySMTP] = set()
        self.server: asyncio.base_events.Server | None = None
        self.milter: MilterListener | None = None
        self.ops: Any = None
        self.retrier = Retrier(lambda: self.runtime)
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._last_upstream_ok = 0.0
        self._retired: list[Runtime] = []
        self._force = asyncio.Event()  # a second SIGTERM: stop draining now
        self._audit_offset = 0
        self.port = 0
        self._bound_listen = config.server.listen  # what start() binds; a reload cannot move it
        self._locks: list[int] = []  # spool/quarantine instance locks (single relay only)

    def _build_runtime(self, config: Config) -> Runtime:
        if self.worker is not None:
            config = self.worker.share(config)
        # Certificate and credentials first: a reload that cannot read them keeps the old runtime.
        tls_context = server_context(config.server.tls)
        credentials = load_credentials(config)
        q = Quarantine(config.quarantine.path)
        q.open()
        spool = Spool(config.spool.path, schedule=config.spool.retry_schedule, max_age=config.spool.max_age)
        spool.open()
        upstream = open_upstream(config.upstream, hostname=config.server.hostname)
        return Runtime(
            config=config, upstream=upstream, quarantine=q, spool=spool, metrics=self.metrics, log=self.log,
            notifier=self.notifier, wake=self._wake_spool,
            tls_context=tls_context, credentials=credentials,
        )  # fmt: skip

    def _wake_spool(self) -> None:
        """A method, not `self.retrier.wake`: the first runtime is built before the retrier."""
        self.retrier.wake()

    # ------------------------------------------------------------ start/stop
    async def start(self) -> None:
        cfg = self.runtime.config
        if self.worker is None:
            # One relay per spool and quarantine (ops/instance.py); a supervisor
            # holds these locks for its workers.
            self._locks.append(lock_dir(cfg.spool.path, "spool.path"))
            self._locks.append(lock_dir(cfg.quarantine.path, "quarantine.path"))
        host = ""
        try:
            if cfg.server.listen:  # empty: a milter-only deployment
                host = await self._start_smtp(cfg)
            if cfg.milter.listen:
                await self._start_milter(cfg)
            if cfg.metrics.listen and self.worker is None:
                from bccguard.ops.http import OpsServer

                self.ops = OpsServer(cfg.metrics.listen, self.metrics, self.readiness)
                with binding("metrics.listen", cfg.metrics.listen):
                    self.ops.start()
        except BaseException:
            if self.server is not None:
                self.server.close()
            if self.milter is not None:
                await self.milter.close()
            release(self._locks)
            raise
        self.metrics.quarantine_set(*self.runtime.quarantine.depth())
        self._audit_offset = self.runtime.quarantine.audit_size()  # count releases from now on
        if self.worker is None or self.worker.runs_retrier:
            # One worker only: two would retry the same spooled copy, and each
            # would count every release in the audit log (the sum doubles).
            self._tasks.append(asyncio.create_task(self.retrier.run(), name="spool"))
            self._tasks.append(asyncio.create_task(self._watch_stores(), name="store-metrics"))
        self._tasks.append(asyncio.create_task(self._watch_upstream(), name="upstream-probe"))
        self.log.info(
            "started",
            version=__version__,
            listen=f"{host}:{self.port}" if cfg.server.listen else "",
            milter=self.milter.address if self.milter is not None else "",
            upstream=_scheme(cfg.upstream.url),
            config=cfg.source,
            rules=len(cfg.policy.rules),
            worker=self.worker.index if self.worker is not None else None,
        )
        if cfg.logging.log_addresses:
            self.log.warning("address_logging_enabled", note="logs will contain full email addresses")
        if self.worker is not None:
            self.worker.signal_ready()
        else:
            notify("READY=1")

    async def _start_smtp(self, cfg: Config) -> str:
        host, port = parse_hostport(cfg.server.listen)
        handler = RelayHandler(lambda: self.runtime)
        loop = asyncio.get_running_loop()

        def factory() -> RelaySMTP:
            return RelaySMTP(
                handler,
                runtime_ref=lambda: self.runtime,
                gate=self.gate,
                sessions=self.sessions,
                loop=loop,
            )

        if self.worker is not None:
            # The supervisor reserved the port (and resolved ":0"); every worker joins it.
            port = self.worker.port
        with binding("server.listen", cfg.server.listen):
            self.server = await loop.create_server(
                factory, host=host or None, port=port, reuse_port=self.worker is not None
            )
        sock = self.server.sockets[0]
        self.port = sock.getsockname()[1]
        return host

    async def _start_milter(self, cfg: Config) -> None:
        """The milter listener: the worker's inherited socket, or one bound here."""
        from bccguard.milter.listener import MilterListener, bind_socket

        fd = self.worker.milter_fd if self.worker is not None else -1
        if fd >= 0:
            sock = socket.socket(fileno=fd)
        else:
            with binding("milter.listen", cfg.milter.listen):
                sock = bind_socket(cfg.milter)
        self.milter = MilterListener(lambda: self.runtime)
        await self.milter.start(sock)

    def readiness(self) -> tuple[bool, str]:
        if self.runtime.config.server.listen and (self.server is None or not self.server.is_serving()):
            return False, "SMTP listener not up"
        if self.runtime.config.milter.listen and (self.milter is None or not self.milter.is_serving()):
            return False, "milter listener not up"
        state = read_state(self.metrics.registry.collect())
        return upstream_readiness(state, now=time.time(), outbox=outbox_path(self.runtime.config.upstream))

    async def _watch_upstream(self) -> None:
        """Probe the upstream when traffic has not shown it alive lately.

        A delivery that succeeded is the best probe there is; probing a busy
        pool would only queue behind real mail and make /readyz flap.
        """
        while True:
            last_ok = getattr(self.metrics, "upstream_last_ok", 0.0) or 0.0
            if time.monotonic() - last_ok < PROBE_INTERVAL:
                await asyncio.sleep(PROBE_INTERVAL)
                continue
            await self.runtime.relay.probe()  # logs and records what it finds (/readyz)
            await asyncio.sleep(PROBE_INTERVAL)

    async def _watch_stores(self) -> None:
        """Keep the quarantine gauges and release counter true while the admin CLI works.

        Releases and deletes happen in `bccguard quarantine`, a separate
        short-lived process whose counters nobody scrapes; the relay reads
        their outcome back from the audit log instead.
        """
        while True:
            try:
                await asyncio.to_thread(self.refresh_store_metrics)
            except Exception as exc:  # a metrics refresh must never take the relay down
                self.log.warning("store_metrics_failed", error=type(exc).__name__)
            await asyncio.sleep(15.0)

    def refresh_store_metrics(self) -> None:
        q = self.runtime.quarantine
        self.metrics.quarantine_set(*q.depth())
        records, self._audit_offset = q.audit_records(self._audit_offset)
        for rec in records:
            if rec.get("what") == "release" and rec.get("result") in ("released", "partial", "failed"):
                self.metrics.quarantine_release(str(rec["result"]))

    async def stop(self, timeout: float | None = None) -> None:
        timeout = self.runtime.config.server.shutdown_timeout if timeout is None else timeout
        notify("STOPPING=1")
        if self.server is not None:
            self.server.close()
        if self.milter is not None:
            await self.milter.close()
        await asyncio.gather(*(s.shutdown() for s in list(self.sessions)), return_exceptions=True)
        deadline = time.monotonic() + timeout
        while self._busy() and time.monotonic() < deadline and not self._force.is_set():  # noqa: ASYNC110 - a few flags, bounded by shutdown_timeout
            await asyncio.sleep(0.05)
        # Still in DATA or waiting on the upstream: 421 4.3.2 before the close,
        # and the upstream transaction abandoned (see RelaySMTP.cut_for_shutdown).
        deliveries = [s.delivery for s in self.sessions if s.delivery is not None]
        cut = sum(s.cut_for_shutdown() for s in list(self.sessions))
        if deliveries:  # let the cancelled deliveries drop their upstream connections
            await asyncio.wait(deliveries, timeout=2.0)
        if cut:
            self.log.warning("shutdown_cut", sessions=cut, note="421 4.3.2 sent; clients retry")
        if self.milter is not None:
            self.milter.cut()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.retrier.release()
        if self.ops is not None:
            self.ops.stop()
        # Snapshots replaced by a reload may still hold pooled upstream connections.
        for old in self._retired:
            await old.upstream.close()
        self._retired.clear()
        await self.runtime.upstream.close()
        release(self._locks)
        worker = self.worker.index if self.worker is not None else None
        self.log.info("stopped", drained=not cut, worker=worker)

    def _busy(self) -> bool:
        """A message being decided on either edge: the drain waits for it."""
        return any(s.busy for s in self.sessions) or (self.milter is not None and self.milter.busy)

    # ------------------------------------------------------------ reload
    def _count_reload(self, ok: bool) -> None:
        """One SIGHUP is one reload, however many workers apply it: worker 0 counts for all.

        Every worker reads the same file, so their outcomes agree; summing
        them made one reload read as two (and a broken file as two failures).
        """
        if self.worker is None or self.worker.index == 0:
            self.metrics.config_reload(ok)

    async def reload(self) -> bool:
        """SIGHUP: new snapshot if the file is valid, else keep serving the old one."""
        if self.config_path is None:
            self.log.info("reload_skipped", reason="running on embedded defaults")
            return False
        try:
            new = load(self.config_path, self.overrides)
            # Against the address actually bound, not the last file: a listen change
            # reverted before any restart needs none.
            if _listen_key(new.server.listen) != _listen_key(self._bound_listen):
                self.log.warning(
                    "reload_listen_unchanged",
                    reason="server.listen needs a restart",
                    listening=self._bound_listen,
                    configured=new.server.listen,
                )
            if new.milter.listen != self.runtime.config.milter.listen:
                self.log.warning("reload_listen_unchanged", reason="milter.listen needs a restart")
            runtime = self._build_runtime(new)
        except ConfigError as exc:
            self._count_reload(False)
            for p in exc.problems:
                self.log.error("reload_failed", problem=p)
            return False
        except Exception as exc:
            self._count_reload(False)
            self.log.error("reload_failed", error=type(exc).__name__, problem=str(exc))
            return False
        old = self.runtime
        self.runtime = runtime
        self.metrics.set_rules(rule_names(new))
        self._count_reload(True)
        self.log.info(
            "reloaded",
            config=new.source,
            rules=len(new.policy.rules),
            tls=runtime.tls_context is not None,
            auth_users=len(runtime.credentials.users) if runtime.credentials else 0,
        )
        self._retired.append(old)

        def retire() -> None:
            if old in self._retired:
                self._retired.remove(old)
                self._tasks.append(asyncio.ensure_future(old.upstream.close()))

        asyncio.get_running_loop().call_later(new.upstream.timeout * 6, retire)
        return True

    # ------------------------------------------------------------ main
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Handlers first: start() sends READY=1, and systemd may send SIGTERM the
        # moment it sees it; with the default action that would kill us mid-start.
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        try:
            await self.start()
        except BaseException:
            for sig in signals:
                loop.remove_signal_handler(sig)
            raise
        self._watch_supervisor(loop)
        try:
            await self._stop.wait()
            # A second SIGTERM/SIGINT during the drain cuts it short (like uvicorn's
            # second Ctrl-C): sessions still in DATA got no 250, so their clients retry.
            loop.add_signal_handler(signal.SIGTERM, self._force.set)
            loop.add_signal_handler(signal.SIGINT, self._force.set)
            await self.stop()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        return 0


    def _watch_supervisor(self, loop: asyncio.AbstractEventLoop) -> None:
        """A worker whose supervisor died (its lifeline pipe reads EOF) stops as on SIGTERM.

        Why: a SIGKILLed supervisor cannot pass SIGTERM on, and orphaned
        workers would keep the port and run beside the next supervisor's.
        """
        fd = self.worker.lifeline_fd if self.worker is not None else -1
        if fd < 0:
            return

        def on_readable() -> None:
            try:
                data = os.read(fd, 64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                return  # nothing writes here; EOF is the only message
            loop.remove_reader(fd)
            os.close(fd)
            self.log.warning("supervisor_gone", note="draining and exiting as on SIGTERM")
            self._stop.set()

        os.set_blocking(fd, False)
        loop.add_reader(fd, on_readable)


def check_loadable(config: Config) -> None:
    """Load what building a Runtime reads from files (TLS certificate and key, AUTH users,
    the upstream's ca_file), and throw it away; a problem is a ConfigError (exit 78).

    `config check` and the supervisor call it, so a file that does not load is one
    line before any worker starts, not each worker's error and a "worker exited".
    """
    server_context(config.server.tls)
    load_credentials(config)
    open_upstream(config.upstream, hostname=config.server.hostname)  # its TLS context; connects nowhere


def load_credentials(config: Config) -> Credentials | None:
    """The AUTH users of `server.auth_file`, or None; problems are config errors (exit 78)."""
    if not config.server.auth_file:
        return None
    try:
        return Credentials.load(config.server.auth_file)
    except CredentialsError as exc:
        raise ConfigError([f"server.auth_file: {p}" for p in str(exc).splitlines()]) from None


def _listen_key(listen: str) -> tuple[str, int] | None:
    """`server.listen` normalised for comparison; "" (no SMTP listener) is None."""
    return parse_hostport(listen) if listen else None


def _scheme(url: str) -> str:
    return url.partition(":")[0]
