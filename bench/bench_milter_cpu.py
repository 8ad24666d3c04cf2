"""bccguard's own CPU per milter session, shape (a): no Postfix, no root, seconds to run.

    PYTHONPATH=src:bench python3 bench/bench_milter_cpu.py [--sessions 2000] [--repeat 3] [--profile FILE]

Why: on a 2-core box the milter's share of Postfix's throughput (bench_milter.py,
issue 15's >= 80% goal) tracks bccguard's CPU per message, and the wall clock
of a loaded machine hides a 0.1 ms change; `time.process_time` of the filter's
process does not. So this runs a real `App` (milter listener on loopback, json
logs to a file as in production, metrics on) in this process, and a client in
a child process plays Postfix's part for N sessions in a row, one connection
each, packet by packet as Postfix's milter8.c writes them: OPTNEG (answered),
CONNECT, the MAIL macros, MAIL, RCPT, the headers (Postfix's Received first),
EOH, BODY, EOM (answered), QUIT. Only this process's CPU is counted.

`--profile out.pstats` runs one pass under cProfile (read it with
`python -m pstats`); CPU numbers from that pass are not comparable.

Where the time goes: `--part edge` answers every message without deciding
(Relay.process replaced by a stub: the milter edge alone), `--part floor`
serves the same client with a bare uvloop Protocol that only answers
OPTNEG and EOM (the event loop and the kernel: what no Python change removes).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SENDER = "news@corp.example"
RCPT = "rcpt@ext.example"


def _packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def session_packets() -> tuple[bytes, list[bytes], bytes]:
    """(OPTNEG, the packets of one message up to and including EOM, QUIT) — shape (a)."""
    optneg = _packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
    headers = [
        (b"Received", b" from client.bench (localhost [127.0.0.1])\n\tby postfix.bench (Postfix) with"
                      b" ESMTP id 4Xk2Lq0Zz9z1\n\tfor <rcpt@ext.example>; Mon, 1 Jan 2024 10:00:00 +0000"),
        (b"From", b" Marketing <news@corp.example>"),
        (b"To", b" rcpt@ext.example"),
        (b"Subject", b" Your opinion matters"),
        (b"Message-ID", b" <bench-a@corp.example>"),
        (b"Date", b" Mon, 1 Jan 2024 10:00:00 +0000"),
        (b"MIME-Version", b" 1.0"),
        (b"Content-Type", b" text/plain; charset=us-ascii"),
    ]  # fmt: skip
    body = (b"We would like to hear what you think of our service. " * 40)[:1700] + b"\r\n"
    pkts = [
        _packet(b"C", b"client.bench\x004" + struct.pack(">H", 40000) + b"127.0.0.1\0"),
        _packet(b"D", b"M" + b"i\x004Xk2Lq0Zz9z1\0{auth_authen}\0\0"),
        _packet(b"M", f"<{SENDER}>".encode() + b"\0SIZE=2048\0BODY=8BITMIME\0"),
        _packet(b"R", f"<{RCPT}>".encode() + b"\0"),
        *(_packet(b"L", n + b"\0" + v + b"\0") for n, v in headers),
        _packet(b"N"),
        _packet(b"B", body),
        _packet(b"E"),
    ]
    return optneg, pkts, _packet(b"Q")


def _read_packet(sock: socket.socket) -> tuple[bytes, bytes]:
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        raise ConnectionError("filter closed the connection")
    (size,) = struct.unpack(">I", head)
    body = sock.recv(size, socket.MSG_WAITALL)
    return body[:1], body[1:]


def client(port: int, sessions: int, gap: float) -> int:
    """Child process: `sessions` milter sessions, one after the other.

    `gap` seconds between packets: Postfix writes each event as its client's
    SMTP command arrives, so the filter reads them one by one; sent back to
    back they would coalesce into a few reads and hide the per-read cost.
    """
    optneg, pkts, quit_ = session_packets()
    for _ in range(sessions):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(optneg)
            if _read_packet(s)[0] != b"O":
                return 2
            for p in pkts:
                s.sendall(p)
                if gap:
                    time.sleep(gap)
            cmd, data = _read_packet(s)
            if cmd != b"c":  # shape (a) passes unchanged: CONTINUE
                print(f"unexpected answer {cmd!r} {data[:80]!r}", file=sys.stderr)
                return 3
            s.sendall(quit_)
            s.recv(1)  # the filter closes after QUIT
    return 0


def _config(workdir: Path) -> object:
    from bccguard.config import from_dict

    return from_dict({
        "server": {"listen": "", "hostname": "bccguard.bench", "max_sessions": 1000},
        "milter": {"listen": "inet:127.0.0.1:0"},
        "upstream": {"url": "smtp://127.0.0.1:9"},  # unused by the milter; its probe fails quietly
        "quarantine": {"path": str(workdir / "q")},
        "spool": {"path": str(workdir / "s")},
        "metrics": {"listen": ""},
        "logging": {"format": "json"},
        "policy": {"internal_domains": ["corp.example"], "action": "rewrite"},
    })  # fmt: skip


class _Floor(asyncio.Protocol):
    """The least a milter can do per packet: split them, answer OPTNEG and EOM, close on QUIT."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            (size,) = struct.unpack_from(">I", self.buf)
            if len(self.buf) < 4 + size:
                break
            cmd, self.buf = self.buf[4:5], self.buf[4 + size :]
            if cmd == b"O":
                self.t.write(_packet(b"O", struct.pack(">III", 6, 0, 0)))
            elif cmd == b"E":
                self.t.write(_packet(b"c"))
            elif cmd == b"Q":
                self.t.close()


async def run_floor(sessions: int, repeat: int, gap: float) -> list[float]:
    server = await asyncio.get_running_loop().create_server(_Floor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await _pass(port, 50, gap)
        return [await _pass(port, sessions, gap) * 1000 / sessions for _ in range(repeat)]
    finally:
        server.close()


def stub_decisions() -> None:
    """`--part edge`: every message passes unchanged without being decided (never in production)."""
    from bccguard.relay import Relay

    async def process(self: Relay, **kw: Any) -> str:
        kw["handoff"].edits = []
        return "250 2.0.0 Ok"

    Relay.process = process  # type: ignore[method-assign]


async def run(sessions: int, repeat: int, profile: str, gap: float) -> list[float]:
    from bccguard.app import App
    from bccguard.ops.logs import configure

    workdir = Path(tempfile.mkdtemp(prefix="bccguard-bench-milter-cpu-"))
    log = workdir / "bccguard.log"
    stream = log.open("w")
    configure("info", "json", stream=stream)
    app = App(_config(workdir))  # type: ignore[arg-type]
    await app.start()
    assert app.milter is not None
    port = int(app.milter.address.rsplit(":", 1)[1])
    results = []
    try:
        await _pass(port, 50, gap)  # warm-up: imports, caches, first-use paths
        for _ in range(repeat):
            results.append(await _pass(port, sessions, gap) * 1000 / sessions)
        if profile:
            prof = cProfile.Profile(time.process_time)
            prof.enable()
            await _pass(port, sessions, gap)
            prof.disable()
            prof.dump_stats(profile)
    finally:
        await app.stop(timeout=2.0)
        stream.close()
    lines = log.read_bytes().count(b'"message_processed"')
    print(f"log: {lines} message_processed lines in {log}", file=sys.stderr)
    return results


async def _pass(port: int, sessions: int, gap: float) -> float:
    """CPU seconds this process spent while the child ran `sessions` sessions."""
    cmd = [sys.executable, __file__, "--client", str(port), "--sessions", str(sessions), "--gap", str(gap)]
    t0 = os.times()
    proc = await asyncio.create_subprocess_exec(*cmd)
    rc = await proc.wait()
    t1 = os.times()
    used = t1.user - t0.user + t1.system - t0.system
    print(
        f"  user {(t1.user - t0.user) * 1000 / sessions:.3f} ms, system "
        f"{(t1.system - t0.system) * 1000 / sessions:.3f} ms per session",
        file=sys.stderr,
    )
    if rc != 0:
        raise RuntimeError(f"client failed ({rc})")
    return used


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", default="", help="also write a cProfile of one pass to this file")
    ap.add_argument("--gap", type=float, default=0.0002, help="seconds between packets (default 0.0002)")
    ap.add_argument("--part", choices=("all", "edge", "floor"), default="all", help="see above")
    ap.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client(args.client, args.sessions, args.gap)
    from bccguard.app import loop_factory

    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:  # uvloop, as `serve` runs
        if args.part == "floor":
            results = runner.run(run_floor(args.sessions, args.repeat, args.gap))
        else:
            if args.part == "edge":
                stub_decisions()
            results = runner.run(run(args.sessions, args.repeat, args.profile, args.gap))
    runs = ", ".join(f"{r:.3f}" for r in results)
    print(f"{args.part}: CPU per milter session, shape (a): min {min(results):.3f} ms (runs: {runs}; "
          f"{args.sessions} sessions each)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
