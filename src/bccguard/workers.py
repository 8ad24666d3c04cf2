"""`[server] workers = N`: one supervisor, N relay processes sharing the SMTP port.

Why processes: a relay process is one asyncio loop on one core, and most of
its time per message is Python (SMTP command handling, inspection). Several
processes use several cores. SO_REUSEPORT gives each worker its own listening
socket on the same port and the kernel spreads new connections over them: no
shared accept queue, no file descriptor passing.

The supervisor (this module) does no mail work:

- it reserves the port first (a bound, non-listening SO_REUSEPORT socket), so
  a taken port is the usual one-line error before any worker starts, and
  `:0` is resolved once for every worker;
- it points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before any worker
  imports prometheus_client: each worker's values live in mmap files, and the
  supervisor's `/metrics` aggregates them (counters summed, live sessions
  summed over live workers, last upstream success = the latest). A worker that
  dies is marked dead, so its live gauges leave the sum and its counts stay;
- it starts each worker as `bccguard serve` again (a fresh interpreter, not a
  fork: no locks or threads inherited) with `BCCGUARD_WORKER` set; only worker
  0 runs the spool retrier, so a spooled copy is never retried twice at once;
- a worker that exits is restarted; when workers keep dying at start (a broken
  upstream URL, an unwritable spool) the supervisor gives up with exit 1
  instead of spinning;
- SIGTERM/SIGINT go to every worker (each drains as a single relay does) and
  the supervisor exits 0 once they are gone; SIGHUP goes to every worker,
  which reloads its config as a single relay does;
- each worker holds the read end of a pipe whose write end only the
  supervisor has (its "lifeline"): if the supervisor dies without stopping
  them (SIGKILL, the OOM killer), the pipe reads EOF and the workers drain
  and exit as on SIGTERM, instead of serving on as orphans that a restarted
  supervisor would then run beside.

Limits: `max_sessions` and `max_sessions_per_ip` are totals; each worker
enforces its share (rounded up), so the whole stays close to the configured
numbers while the kernel spreads connections evenly.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bccguard.config import Config, parse_hostport
from bccguard.ops.instance import lock_dir, probe_listen, release
from bccguard.ops.readiness import outbox_path, read_state, upstream_readiness
from bccguard.preflight import binding

ENV_WORKER = "BCCGUARD_WORKER"
# /readyz: ready only if the upstream was reached this recently (the single
# relay's App.readiness uses it too; defined here so workers.py needs no app.py).
READY_UPSTREAM_WINDOW = 60.0
READY_TIMEOUT = 60.0  # seconds a worker may take to import, open stores and bind
CRASH_WINDOW = 10.0  # a worker that dies this soon after start counts as a start failure
MAX_QUICK_CRASHES = 5  # in a row: give up rather than restart in a loop
RESTART_DELAY = 0.5


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process is told by its supervisor (via BCCGUARD_WORKER)."""

    index: int
    count: int
    port: int
    ready_fd: int = -1
    lifeline_fd: int = -1  # EOF here: the supervisor is gone
    milter_fd: int = -1  # the milter listening socket the supervisor bound, shared by every worker

    def encode(self) -> str:
        return f"{self.index},{self.count},{self.port},{self.ready_fd},{self.lifeline_fd},{self.milter_fd}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> WorkerRole | None:
        value = (os.environ if environ is None else environ).get(ENV_WORKER)
        if not value:
            return None
        return cls(*(int(x) for x in value.split(",")))

    @property
    def runs_retrier(self) -> bool:
        return self.index == 0

    def share(self, config: Config) -> Config:
        """This worker's part of the session limits (totals divided, rounded up)."""
        server = config.server
        return replace(
            config,
            server=replace(
                server,
                max_sessions=math.ceil(server.max_sessions / self.count),
                max_sessions_per_ip=math.ceil(server.max_sessions_per_ip / self.count),
            ),
        )

    def signal_ready(self) -> None:
        if self.ready_fd < 0:
            return
        try:
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)
        except OSError:
            pass


class WorkerStartFailed(Exception):
    """A worker exited before it listened; it said why on stderr itself."""

    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"worker {index} exited with code {code} during start (its error is above)")
        self.code = code


def reserve_port(listen: str) -> tuple[socket.socket, str, int]:
    """Bind (no listen) a SO_REUSEPORT socket: holds the port and resolves `:0`."""
    host, port = parse_hostport(listen)
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock, host, int(sock.getsockname()[1])


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready: bool = False
    ready_r: int = -1
    lifeline_w: int = -1  # only the supervisor holds it; closing it tells the worker to stop
    quick_crashes: int = 0


class Supervisor:
    """Starts, watches and stops the workers; serves the aggregated /metrics."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None,
        argv: Sequence[str] | None = None,
        log: Callable[..., None] | None = None,
        serve_args: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.serve_args = list(serve_args)  # `serve --listen ...` overrides, passed on to every worker
        self.count = config.server.workers
        # How to start one worker: this same program, `serve`, same config file.
        self.argv = list(argv) if argv is not None else self._default_argv()
        self._log = log or _stderr_log
        self.workers = [_Worker(i) for i in range(self.count)]
        self.port = 0
        self._stop = False
        self._hup = False
        self._draining = False  # _shutdown() has sent the first SIGTERM
        self._sock: socket.socket | None = None
        self._milter: socket.socket | None = None
        self._ops: Any = None
        self._metrics_dir: str | None = None
        self._own_metrics_dir = False
        self._locks: list[int] = []  # spool and quarantine instance locks, for the workers too

    def _default_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "bccguard.cli", "serve"]
        if self.config_path is not None:
            argv += ["--config", str(Path(self.config_path).resolve())]
        argv += self.serve_args
        return argv

    # ------------------------------------------------------------ start

    def start(self) -> None:
        """Reserve the port, set up metrics, start every worker and wait until each listens.

        First make sure no other process uses this relay's spool, quarantine,
        port or metrics address (ops/instance.py): the workers join the port
        with SO_REUSEPORT, which would otherwise also join another relay's.
        """
        cfg = self.config
        self._locks.append(lock_dir(cfg.spool.path, "spool.path"))
        self._locks.append(lock_dir(cfg.quarantine.path, "quarantine.path"))
        if cfg.server.listen:
            with binding("server.listen", cfg.server.listen):
                probe_listen(cfg.server.listen)
                self._sock, _, self.port = reserve_port(cfg.server.listen)
        if cfg.milter.listen:
            # One listening socket, inherited by every worker: one accept queue, and
            # a unix socket path cannot be shared the SO_REUSEPORT way.
            from bccguard.milter.listener import bind_socket

            with binding("milter.listen", cfg.milter.listen):
                self._milter = bind_socket(cfg.milter)
        self._setup_metrics_dir()
        if cfg.metrics.listen:
            # Before the workers: a taken port fails fast, and /healthz answers during start.
            with binding("metrics.listen", cfg.metrics.listen):
                self._start_ops()
        for w in self.workers:
            self._spawn(w)
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start listening in time")
            self._poll_ready(0.2)
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None and not w.ready:
                    raise WorkerStartFailed(w.index, w.proc.returncode)
        self._log("workers_started", workers=self.count, port=self.port)

    def _setup_metrics_dir(self) -> None:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            # Files left by a previous run would be summed into this one.
            Path(path).mkdir(parents=True, exist_ok=True)
            for file in Path(path).glob("*.db"):
                file.unlink()
        else:
            path = tempfile.mkdtemp(prefix="bccguard-metrics-")
            self._own_metrics_dir = True
        self._metrics_dir = path

    def _worker_env(self, w: _Worker, ready_w: int, lifeline_r: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir)
        milter_fd = self._milter.fileno() if self._milter is not None else -1
        env[ENV_WORKER] = WorkerRole(w.index, self.count, self.port, ready_w, lifeline_r, milter_fd).encode()
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor speaks to systemd
        return env

    def _spawn(self, w: _Worker) -> None:
        # os.pipe() fds are close-on-exec: a worker inherits only its own two
        # (pass_fds), never another worker's lifeline write end.
        ready_r, ready_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        try:
            w.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                self.argv,
                env=self._worker_env(w, ready_w, lifeline_r),
                pass_fds=(ready_w, lifeline_r, *([self._milter.fileno()] if self._milter else [])),
            )
        except BaseException:
            os.close(ready_r)
            os.close(lifeline_w)
            raise
        finally:
            os.close(ready_w)
            os.close(lifeline_r)
        w.ready_r = ready_r
        w.lifeline_w = lifeline_w
        w.ready = False
        w.started = time.monotonic()

    def _poll_ready(self, timeout: float) -> None:
        """Wait up to `timeout` for a worker to report that it listens."""
        fds = [w.ready_r for w in self.workers if not w.ready and w.ready_r >= 0]
        if not fds:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(fds, [], [], timeout)
        for w in self.workers:
            if w.ready_r in readable:
                w.ready = os.read(w.ready_r, 1) == b"1"
                os.close(w.ready_r)
                w.ready_r = -1

    def _start_ops(self) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from bccguard.ops.http import OpsServer

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        self._registry = registry
        self._ops = OpsServer(self.config.metrics.listen, None, self.readiness, registry=registry)
        with binding("metrics.listen", self.config.metrics.listen):
            self._ops.start()

    def readiness(self) -> tuple[bool, str]:
        """Ready when every worker listens and one of them reached the upstream recently."""
        down = [w.index for w in self.workers if not w.ready]
        if down:
            return False, f"workers not running: {down}"
        state = read_state(self._registry.collect())
        return upstream_readiness(state, now=time.time(), outbox=outbox_path(self.config.upstream))

    # ------------------------------------------------------------ run

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self.start()
            from bccguard.systemd import notify

            notify("READY=1")
            while not self._stop:
                if self._hup:
                    self._hup = False
                    self._log("reload_forwarded", workers=self.count)
                    self._signal_all(signal.SIGHUP)
                self._poll_ready(0.2)
                if self._reap() is False:
                    self._stop = True
                    return self._shutdown(failed=True)
            return self._shutdown()
        except BaseException:
            self._shutdown(failed=True)
            raise

    def _on_stop(self, signum: int, frame: object) -> None:
        """First signal: drain (see _shutdown). Another during the drain: pass it on.

        A single relay cuts its drain short on a second SIGTERM (the admin's
        "stop now"); the workers do the same only if they receive it.
        """
        self._stop = True
        if self._draining:
            self._log("stop_forwarded", workers=self.count, signal=signal.Signals(signum).name)
            self._signal_all(signum)

    def _on_hup(self, signum: int, frame: object) -> None:
        self._hup = True

    def _reap(self) -> bool:
        """Restart workers that exited; False when they keep failing at start."""
        for w in self.workers:
            if w.proc is None or w.proc.poll() is None or self._stop:
                continue
            code = w.proc.returncode
            w.ready = False
            self._mark_dead(w.proc.pid)
            _close_fds(w)
            quick = time.monotonic() - w.started < CRASH_WINDOW
            w.quick_crashes = w.quick_crashes + 1 if quick else 0
            self._log(
                "worker_exited", worker=w.index, pid=w.proc.pid, code=code, quick_restarts=w.quick_crashes
            )
            if w.quick_crashes >= MAX_QUICK_CRASHES:
                self._log("workers_failing", worker=w.index, note="giving up after repeated start failures")
                return False
            time.sleep(RESTART_DELAY * w.quick_crashes)
            self._spawn(w)
        return True

    def _mark_dead(self, pid: int) -> None:
        if self._metrics_dir is None:
            return
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    def _signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)

    def _shutdown(self, *, failed: bool = False) -> int:
        """SIGTERM to every worker, wait for their drain, then clean up."""
        from bccguard.systemd import notify

        notify("STOPPING=1")  # as a single relay does: systemd shows "deactivating" during the drain
        self._draining = True
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_timeout + 5.0
        codes = []
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                codes.append(w.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                codes.append(w.proc.wait())
            self._mark_dead(w.proc.pid)
            _close_fds(w)
        if self._ops is not None:
            self._ops.stop()
            self._ops = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._milter is not None:
            self._milter.close()
            self._milter = None
        if self._own_metrics_dir and self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        release(self._locks)
        if codes:  # a start that failed before any worker ran is reported by the caller, not as a stop
            self._log("stopped", workers=self.count, codes=codes)
        return 1 if failed or any(c != 0 for c in codes) else 0


def _close_fds(w: _Worker) -> None:
    """The supervisor's ends of a worker's pipes, once that worker has exited."""
    if w.ready_r >= 0:
        os.close(w.ready_r)
        w.ready_r = -1
    if w.lifeline_w >= 0:
        os.close(w.lifeline_w)
        w.lifeline_w = -1


def _stderr_log(event: str, **fields: Any) -> None:
    from bccguard.ops.logs import get_logger

    get_logger("bccguard.supervisor").info(event, **fields)


__all__ = ["ENV_WORKER", "Supervisor", "WorkerRole", "reserve_port"]
