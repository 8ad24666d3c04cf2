"""`[server] workers = 2`: one port, two processes, one /metrics that adds them up.

The relay runs as a real `bccguard serve` subprocess (the supervisor starts
its workers as processes too); the upstream is the test's recording sink.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import bccguard
from conftest import message, send
from sink import Sink

SRC = str(Path(bccguard.__file__).resolve().parent.parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics as {"name{labels}": value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


async def wait_for(pred, within: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


def ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
    except OSError:
        return False


def worker_pids(supervisor: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True, check=False)
    return [int(x) for x in out.stdout.split()]


@pytest.fixture
async def two_workers(tmp_path: Path, sink: Sink):  # type: ignore[no-untyped-def]
    port, mport = free_port(), free_port()
    cfg = tmp_path / "bccguard.toml"
    cfg.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
hostname = "bccguard.test"
workers = 2
shutdown_timeout = 5.0
[upstream]
url = "smtp://127.0.0.1:{sink.port}"
timeout = 5.0
[quarantine]
path = "{tmp_path}/quarantine"
[spool]
path = "{tmp_path}/spool"
[metrics]
listen = "127.0.0.1:{mport}"
[logging]
format = "json"
[policy]
internal_domains = ["corp.example"]
"""
    )
    env = dict(os.environ, PYTHONPATH=SRC, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    log = tmp_path / "relay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, never waited on in the loop
            [sys.executable, "-m", "bccguard.cli", "serve", "--config", str(cfg)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Ready: /readyz says every worker listens (the upstream sink has been probed).
        await wait_for(lambda: ready(mport) or proc.poll() is not None, 30)
        assert proc.poll() is None, log.read_text()
        yield proc, port, mport, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def processed_by(log: Path) -> set[str]:
    """Which processes handled messages: the session id starts with the pid in hex."""
    pids = set()
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"message_processed"' in line:
            rec = json.loads(line)
            pids.add(rec["session_id"].split("-")[0][:-6])
    return pids


async def test_two_workers_counters_add_up_in_one_scrape(two_workers, sink: Sink) -> None:  # type: ignore[no-untyped-def]
    proc, port, mport, log = two_workers
    assert len(worker_pids(proc.pid)) == 2
    n = 24
    data = message(["colleague@corp.example"])
    # Separate connections: SO_REUSEPORT spreads them over both workers.
    for _ in range(n):
        assert await send(port, "news@corp.example", ["customer@gmail.com"], data) == {}
    assert len(sink.messages) == n
    assert len(processed_by(log)) == 2, "every connection went to one worker (odds 2^-23)"
    samples = scrape(mport)
    assert total(samples, 'bccguard_messages_total{action="pass"') == n
    assert total(samples, 'bccguard_smtp_connections_total{result="accepted"}') == n
    assert samples["bccguard_smtp_sessions_active"] == 0
    # Histograms aggregate too: one observation per message.
    assert samples["bccguard_message_size_bytes_count"] == n


async def test_a_killed_worker_is_replaced_and_its_counts_are_kept(two_workers, sink: Sink) -> None:  # type: ignore[no-untyped-def]
    proc, port, mport, log = two_workers
    data = message(["colleague@corp.example"])
    for _ in range(8):
        await send(port, "news@corp.example", ["customer@gmail.com"], data)
    before = total(scrape(mport), 'bccguard_messages_total{action="pass"')
    assert before == 8
    victim = worker_pids(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: len(set(worker_pids(proc.pid)) - {victim}) == 2)
    await wait_for(lambda: ready(mport))  # the replacement listens
    for _ in range(4):
        assert await send(port, "news@corp.example", ["customer@gmail.com"], data) == {}, log.read_text()
    samples = scrape(mport)
    assert total(samples, 'bccguard_messages_total{action="pass"') == 12, log.read_text()
    assert samples["bccguard_smtp_sessions_active"] == 0


async def test_sigterm_stops_every_worker_and_exits_0(two_workers) -> None:  # type: ignore[no-untyped-def]
    proc, port, _, _ = two_workers
    workers = worker_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone (reaped by the supervisor)
    assert not listening(port)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit may wait for whoever reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_workers_of_a_killed_supervisor_drain_and_exit(two_workers) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL (the OOM killer) gives the supervisor no chance to pass SIGTERM on."""
    proc, port, _, log = two_workers
    workers = worker_pids(proc.pid)
    assert len(workers) == 2 and all(running(pid) for pid in workers)
    proc.kill()
    proc.wait()
    await wait_for(lambda: not any(running(pid) for pid in workers), 20)
    assert not listening(port)
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert [e["event"] for e in lines].count("supervisor_gone") == 2
    assert [e.get("drained") for e in lines if e["event"] == "stopped"] == [True, True]


async def test_sighup_reaches_every_worker(two_workers) -> None:  # type: ignore[no-untyped-def]
    proc, _, mport, log = two_workers

    def reloads() -> int:
        return sum('"event": "reloaded"' in line for line in log.read_text().splitlines())

    proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: reloads() == 2, 15)
    assert proc.poll() is None
    # One SIGHUP is one reload for an admin and the FailedReload alert, however many workers ran it.
    samples = await asyncio.to_thread(scrape, mport)
    assert samples['bccguard_config_reloads_total{result="success"}'] == 1
    assert samples['bccguard_config_reloads_total{result="failure"}'] == 0


# ---------------------------------------------------------------- workers = "auto"


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [
        (2, None, 2),  # no cgroup file: the CPUs we may run on
        (2, "max 100000\n", 2),  # a cgroup without a quota
        (64, "150000 100000\n", 2),  # 1.5 CPUs of quota on a big host: rounded up, not 64
        (64, "50000 100000", 1),  # half a CPU: still one process
        (4, "800000 100000", 4),  # a quota above the affinity: the affinity wins
        (64, None, 8),  # capped: a number in the config goes higher
        (0, None, 1),
        (3, "garbage", 3),  # an unreadable quota is ignored, not fatal
        (3, "100000 0", 3),
    ],
)
def test_auto_workers_follow_affinity_and_cgroup_quota(
    affinity: int, cpu_max: str | None, expected: int
) -> None:
    from bccguard.config import auto_worker_count

    assert auto_worker_count(affinity, cpu_max) == expected


def test_workers_setting_accepts_auto_or_a_count_and_names_the_fix_otherwise() -> None:
    from bccguard.config import ConfigError, from_dict, usable_workers

    assert from_dict({"server": {"workers": "auto"}}).server.workers == usable_workers()
    assert from_dict({}).server.workers == usable_workers()  # "auto" is the default
    assert from_dict({"server": {"workers": 3}}).server.workers == 3
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ConfigError) as exc:
            from_dict({"server": {"workers": bad}})
        assert str(exc.value).count("\n") == 0
        assert "server.workers" in str(exc.value) and '"auto" or a process count' in str(exc.value)
