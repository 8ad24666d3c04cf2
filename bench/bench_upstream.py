"""Benchmark: CPU of the SMTP upstream client per delivery, on a pooled connection.

Starts Postfix's `smtp-sink` (a C process, so none of the sink's CPU is
counted here) on a free loopback port, builds an `SMTPUpstream` the way the
relay does (`open_upstream(from_dict(...).upstream)`), and times `deliver()`
of a 2 KB message to 1 and to 100 recipients, one delivery after another on
the same pooled connection. Per round it prints this process's CPU time
(`time.process_time`) and wall time per delivery; the summary is the median
over rounds, rounds of both shapes interleaved so load on the shared machine
hits both alike. The same script measures another tree (e.g. a `git archive`
of main unpacked in /tmp) with `PYTHONPATH=/tmp/base/src`:

    PYTHONPATH=src python bench/bench_upstream.py [--rounds 7] [--seconds 1] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from bccguard.config import from_dict
from bccguard.upstream import Upstream, open_upstream

MESSAGE = (
    b"From: Sender <sender@corp.example>\r\nTo: someone@example.com\r\n"
    b"Subject: benchmark\r\nMessage-ID: <bench@corp.example>\r\n\r\n"
    + b"The quick brown fox jumps over the lazy dog, once more, line after line.\r\n" * 26
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def start_sink(port: int) -> subprocess.Popen[bytes]:
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    user = ["-u", "postfix"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([sink, *user, f"127.0.0.1:{port}", "1024"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.02)
    proc.kill()
    raise SystemExit("smtp-sink did not start (apt-get install postfix)")


async def run_round(up: Upstream, rcpts: list[str], seconds: float) -> tuple[int, float, float]:
    """Deliveries for about `seconds`: (count, CPU s, wall s)."""
    n = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = wall0 + seconds
    while True:
        for _ in range(20):
            result = await up.deliver("sender@corp.example", rcpts, MESSAGE)
            assert len(result.accepted) == len(rcpts), result
        n += 20
        if time.perf_counter() >= end:
            break
    return n, time.process_time() - cpu0, time.perf_counter() - wall0


async def bench(port: int, shapes: list[int], rounds: int, seconds: float) -> None:
    cfg = from_dict({"upstream": {"url": f"smtp://127.0.0.1:{port}", "helo_name": "bench"}})
    up = open_upstream(cfg.upstream, hostname="bench")
    recipients = {n: [f"rcpt{i}@example.com" for i in range(n)] for n in shapes}
    try:
        for n in shapes:  # connect and warm up
            await run_round(up, recipients[n], 0.2)
        cpu: dict[int, list[float]] = {n: [] for n in shapes}
        wall: dict[int, list[float]] = {n: [] for n in shapes}
        for r in range(rounds):
            for n in shapes if r % 2 == 0 else shapes[::-1]:
                count, c, w = await run_round(up, recipients[n], seconds)
                cpu[n].append(c / count * 1e6)
                wall[n].append(w / count * 1e6)
                print(f"round {r} rcpts {n:>4}: {count:>6} deliveries, "
                      f"CPU {cpu[n][-1]:7.1f} us, wall {wall[n][-1]:7.1f} us per delivery")  # fmt: skip
        print()
        print("rcpts  CPU us/delivery (median, min)   wall us/delivery (median)")
        for n in shapes:
            print(f"{n:>5}  {statistics.median(cpu[n]):8.1f} {min(cpu[n]):8.1f}"
                  f"                {statistics.median(wall[n]):8.1f}")  # fmt: skip
    finally:
        await up.close()


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0, help="per round and shape")
    ap.add_argument("--rcpts", default="1,100", help="comma-separated recipient counts")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args()
    shapes = [int(x) for x in args.rcpts.split(",")]
    port = free_port()
    sink = start_sink(port)
    print(f"python {sys.version.split()[0]}, loop {args.loop}, message {len(MESSAGE)} bytes, "
          f"smtp-sink on port {port}, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    try:
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            runner.run(bench(port, shapes, args.rounds, args.seconds))
    finally:
        sink.terminate()
        sink.wait()
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
