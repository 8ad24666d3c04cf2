"""Relay memory: one 50 MB message, and 200 idle sessions.

    python3 bench/bench_memory.py [--size-mb 50] [--idle 200]

Targets (issue 7): a 50 MB message raises the relay's peak RSS (VmHWM) by at
most 3x its size; 200 concurrent idle sessions (connected, EHLO done) cost
less than 50 MB of RSS.

The peak is reset before each message (`/proc/PID/clear_refs`), so each
line is that message's own peak over the RSS the relay had just before.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_bench import _status_kb, free_port, reset_peak_rss, start_sink, wait_banner

REPO = Path(__file__).resolve().parent.parent


def start_relay(workdir: Path, sink: int, max_size: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = workdir / "bccguard.toml"
    cfg.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
hostname = "bccguard.bench"
max_message_size = {max_size}
max_sessions = 1000
max_sessions_per_ip = 1000
# One process: its RSS is the relay's (with "auto" the PID would be the
# supervisor, which handles no mail; each worker costs what this one does).
workers = 1
[upstream]
url = "smtp://127.0.0.1:{sink}"
helo_name = "bccguard.bench"
[quarantine]
path = "{workdir}/q"
[spool]
path = "{workdir}/s"
[metrics]
listen = ""
[logging]
format = "json"
[policy]
internal_domains = ["corp.example"]
"""
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    log = (workdir / "relay.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bccguard.cli", "serve", "--config", str(cfg)], env=env, stdout=log, stderr=log
    )
    wait_banner(port, proc=proc)
    return proc, port


def message(size: int, to: list[str]) -> bytes:
    head = f"From: news@corp.example\r\nTo: {', '.join(to)}\r\nSubject: big\r\n\r\n".encode()
    line = b"0123456789" * 7 + b"abcdef\r\n"  # 78 octets
    return head + line * (size // len(line))


def send(port: int, data: bytes, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
        c.ehlo("client.bench")
        c.sendmail("news@corp.example", rcpts, data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=50.0)
    p.add_argument("--idle", type=int, default=200)
    args = p.parse_args(argv)
    size = int(args.size_mb * 1024 * 1024)
    workdir = Path(tempfile.mkdtemp(prefix="bccguard-mem-"))
    sink_port = free_port()
    sink = start_sink(sink_port, workdir)
    relay, port = start_relay(workdir, sink_port, size + 1024 * 1024)
    ok = True
    try:
        pid = relay.pid
        send(port, message(2000, ["a@corp.example"]), ["a@corp.example"])  # warm-up
        rss = _status_kb(pid, "VmRSS") / 1024
        print(f"relay pid {pid}, RSS after start and one small message: {rss:.1f} MB")
        # Idle sessions: connected and greeted, then silent.
        # (first: after a 50 MB message, freed memory would hide what sessions cost)
        time.sleep(0.5)
        base = _status_kb(pid, "VmRSS")
        socks = []
        for _ in range(args.idle):
            s = socket.create_connection(("127.0.0.1", port))
            s.recv(512)
            s.sendall(b"EHLO client.bench\r\n")
            socks.append(s)
        for s in socks:
            s.recv(4096)
        time.sleep(1.0)
        now = _status_kb(pid, "VmRSS")
        rise = (now - base) / 1024
        verdict = "ok" if rise < 50 else "MISS"
        print(
            f"{args.idle} idle sessions: RSS +{rise:.1f} MB ({rise * 1024 / args.idle:.1f} KB each; "
            f"{verdict}, target < 50 MB)"
        )
        ok &= rise < 50
        for s in socks:
            s.close()
        customers = [f"customer{i}@gmail.com" for i in range(20)]
        for label, to, rcpts in [
            ("pass (internal To)", ["colleague@corp.example"], ["customer@gmail.com"]),
            ("rewrite (20 customers in To)", customers, customers),
        ]:
            data = message(size, to)
            time.sleep(0.3)
            base = _status_kb(pid, "VmRSS")
            reset_peak_rss(pid)
            t0 = time.perf_counter()
            send(port, data, rcpts)
            dt = time.perf_counter() - t0
            peak = _status_kb(pid, "VmHWM")
            rise = (peak - base) / 1024
            ratio = rise * 1024 * 1024 / len(data)
            verdict = "ok" if ratio <= 3 else "MISS"
            print(
                f"{len(data) / 1e6:.1f} MB {label}: peak RSS +{rise:.1f} MB over {base / 1024:.1f} MB "
                f"= {ratio:.2f}x the message ({verdict}, target <= 3x); {dt:.2f} s"
            )
            ok &= ratio <= 3
            del data
    finally:
        relay.terminate()
        relay.wait(20)
        sink.terminate()
        sink.wait(5)
    print(f"# {Path('/proc/loadavg').read_text().strip()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
