"""What a Python SMTP receiver costs at the least: three do-nothing servers under smtp-source.

    python3 bench/bench_floor.py [--shape b] [--messages 1000]

Each server answers every command with 2xx, reads DATA to the final dot
and throws the message away; nothing is forwarded or inspected. Side by side
they show where a receiver's CPU goes before any real work:

- `protocol`: an asyncio.Protocol answering in data_received (no tasks);
- `streams`: one task per session reading lines with StreamReader.readuntil;
- `aiosmtpd`: aiosmtpd's SMTP with a handler that accepts every recipient.

All three run on uvloop when installed, in a child process whose CPU comes
from /proc. bccguard's own numbers come from `bench/run`; compare CPU per
message, the figure the shared machine disturbs least.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay_bench

SERVERS = ("protocol", "streams", "aiosmtpd")


class Floor(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.buf = b""
        self.data = False
        transport.write(b"220 floor ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        self.buf += chunk
        while True:
            if self.data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buf, self.data = self.buf[end + 5 :], False
                self.t.write(b"250 2.0.0 Ok\r\n")
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            verb, self.buf = self.buf[:4].upper(), self.buf[end + 2 :]
            if verb == b"QUIT":
                self.t.write(b"221 Bye\r\n")
                self.t.close()
                return
            if verb == b"DATA":
                self.data, self.buf = True, b"\r\n" + self.buf
                self.t.write(b"354 Go ahead\r\n")
            elif verb == b"EHLO":
                self.t.write(b"250-floor\r\n250 PIPELINING\r\n")
            else:
                self.t.write(b"250 2.1.5 Ok\r\n")


async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 floor ESMTP\r\n")
    while True:
        verb = (await reader.readuntil(b"\n"))[:4].upper()
        if verb == b"QUIT":
            writer.write(b"221 Bye\r\n")
            writer.close()
            return
        if verb == b"DATA":
            writer.write(b"354 Go ahead\r\n")
            await reader.readuntil(b"\r\n.\r\n")
            writer.write(b"250 2.0.0 Ok\r\n")
        elif verb == b"EHLO":
            writer.write(b"250-floor\r\n250 PIPELINING\r\n")
        else:
            writer.write(b"250 2.1.5 Ok\r\n")
        await writer.drain()


class AcceptAll:
    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def serve(kind: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if kind == "protocol":
        await loop.create_server(Floor, "127.0.0.1", port, backlog=1024)
    elif kind == "streams":
        await asyncio.start_server(streams, "127.0.0.1", port, backlog=1024)
    else:
        from aiosmtpd.smtp import SMTP

        logging.getLogger("mail.log").setLevel(logging.WARNING)  # as bccguard runs it
        await loop.create_server(lambda: SMTP(AcceptAll()), "127.0.0.1", port, backlog=1024)
    await asyncio.Event().wait()


def child(kind: str, port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(kind, port))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="b", choices=sorted(relay_bench.SHAPES))
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        child(args.serve[0], int(args.serve[1]))
        return 0
    with tempfile.TemporaryDirectory(prefix="bccguard-bench-floor-") as tmp:
        msg = Path(tmp) / "message"
        relay_bench.make_message(args.shape, msg)
        title = relay_bench.SHAPES[args.shape]["title"]
        print(f"shape ({args.shape}) {title}, {args.sessions} sessions, a connection per message")
        for kind in SERVERS:
            port = relay_bench.free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)])
            try:
                relay_bench.wait_banner(port, proc=proc)
                warm = relay_bench.source_cmd(args.shape, args.sessions, "new", 100, msg, port)
                relay_bench.run_source(warm, 120)
                cmd = relay_bench.source_cmd(args.shape, args.sessions, "new", args.messages, msg, port)
                cpu0 = relay_bench.tree_cpu_seconds(proc.pid)
                elapsed = relay_bench.run_source(cmd, 600)
                time.sleep(0.05)
                cpu = relay_bench.tree_cpu_seconds(proc.pid) - cpu0
            finally:
                proc.terminate()
                proc.wait()
            rate = args.messages / elapsed
            print(f"  {kind:9s} {rate:8.0f} msg/s  {cpu * 1000 / args.messages:6.2f} ms CPU/msg")
    print(f"# load: {relay_bench.loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
