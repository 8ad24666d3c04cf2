"""Postfix alone vs Postfix + bccguard milter vs Postfix + bccguard content_filter.

    PYTHONPATH=src python3 bench/bench_milter.py [--shapes a,b] [--sessions 20] [--seconds 4] [--repeat 3]

Three paths, each a private Postfix (relay_bench's recipe) relaying to smtp-sink:

  postfix        smtp-source -> Postfix -> smtp-sink
  milter         smtp-source -> Postfix (smtpd_milters = bccguard) -> smtp-sink
  content_filter smtp-source -> Postfix -> bccguard -> Postfix :R -> smtp-sink

The Postfix side of both bccguard paths is deploy/postfix's shipped snippets.
A run counts end to end: from the first connection until smtp-source is done
AND Postfix's queue is empty again (for the content filter, the mail has been
through bccguard and back). CPU per message covers Postfix's and bccguard's
whole process trees. Shapes (a) and (b) are relay_bench's: (b) is rewritten.
The goal (issue 15): the milter path keeps >= 80% of Postfix's own throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay_bench import (
    POSTFIX_MAIN,
    REPO,
    SHAPES,
    free_port,
    loadavg,
    make_message,
    source_cmd,
    start_sink,
    tree_cpu_seconds,
    wait_banner,
)

DEPLOY = REPO / "deploy" / "postfix"
GOAL = 0.80


class Stack:
    """One private Postfix (+ bccguard for the two filtered paths)."""

    def __init__(self, path: str, sink: int, workdir: Path, workers: str, unix: bool = False) -> None:
        self.path = path
        self.base = Path(tempfile.mkdtemp(prefix=f"bccguard-bench-{path}-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.conf, self.queue, data = self.base / "etc", self.base / "queue", self.base / "data"
        for d in (self.conf, self.queue, data):
            d.mkdir()
        shutil.chown(data, "postfix")
        self.port = free_port()
        self.bccguard: subprocess.Popen[bytes] | None = None
        milter_port, relay_port, reinject = free_port(), free_port(), free_port()
        main = POSTFIX_MAIN.format(q=self.queue, d=data, sink=sink)
        main = main.replace("/var/log/bccguard-bench-postfix.log", f"/var/log/bccguard-bench-{path}.log")
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        master_extra = ""
        self.milter_listen = f"inet:127.0.0.1:{milter_port}"
        if path == "milter":
            main += _snippet("main.cf.milter", milter=milter_port, reinject=reinject)
            if unix:  # --unix: the milter on a unix socket instead (no TCP on the path)
                self.milter_listen = f"unix:{self.base}/milter.sock"
                main = main.replace(f"inet:127.0.0.1:{milter_port}", self.milter_listen)
            master_extra = _snippet("master.cf.milter", milter=milter_port, reinject=reinject)
        elif path == "content_filter":
            main += _snippet("main.cf.after-queue", relay=relay_port, reinject=reinject)
            master_extra = _snippet("master.cf.after-queue", relay=relay_port, reinject=reinject)
        (self.conf / "main.cf").write_text(main)
        pc = ["postconf", "-c", str(self.conf)]
        subprocess.run([*pc, "-M#", "smtp/inet"], check=True)
        subprocess.run(
            [*pc, "-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd"], check=True
        )
        with (self.conf / "master.cf").open("a") as f:
            f.write("\n" + master_extra)
        subprocess.run([*pc, "-F", "*/*/chroot=n"], check=True)
        if path != "postfix":
            self._start_bccguard(workdir, milter_port, relay_port, reinject, workers)
        subprocess.run(["postfix", "-c", str(self.conf), "check"], check=False)
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True, capture_output=True)
        self.master_pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        wait_banner(self.port)

    def _start_bccguard(self, workdir: Path, milter: int, relay: int, reinject: int, workers: str) -> None:
        cfg = workdir / f"{self.path}.toml"
        listen = f'listen = "127.0.0.1:{relay}"' if self.path == "content_filter" else 'listen = ""'
        milter_section = (
            f'[milter]\nlisten = "{self.milter_listen}"\nmode = "0666"\n' if self.path == "milter" else ""
        )
        cfg.write_text(f"""
[server]
{listen}
hostname = "bccguard.bench"
max_recipients = 1000
max_sessions = 1000
max_sessions_per_ip = 1000
workers = {workers if workers.isdigit() else f'"{workers}"'}
{milter_section}
[upstream]
url = "smtp://127.0.0.1:{reinject}"
helo_name = "bccguard.bench"
[quarantine]
path = "{workdir}/{self.path}-q"
[spool]
path = "{workdir}/{self.path}-s"
[metrics]
listen = ""
[logging]
format = "json"
[policy]
internal_domains = ["corp.example"]
action = "rewrite"
""")
        log = (workdir / f"{self.path}.log").open("wb")
        self.bccguard = subprocess.Popen(
            [sys.executable, "-m", "bccguard.cli", "serve", "--config", str(cfg)],
            cwd=workdir, stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while b'"started"' not in (workdir / f"{self.path}.log").read_bytes():
            if time.monotonic() > deadline or self.bccguard.poll() is not None:
                raise RuntimeError(f"bccguard ({self.path}) did not start")
            time.sleep(0.1)
        if self.path == "content_filter":
            wait_banner(relay)

    def cpu(self) -> tuple[float, float]:
        """(Postfix's CPU seconds, bccguard's), whole process trees."""
        own = tree_cpu_seconds(self.bccguard.pid) if self.bccguard is not None else 0.0
        return tree_cpu_seconds(self.master_pid), own

    def queue_empty(self) -> bool:
        return not any(
            files for sub in ("maildrop", "incoming", "active", "deferred")
            for _, _, files in os.walk(self.queue / sub)
        )  # fmt: skip

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False, capture_output=True)
        if self.bccguard is not None:
            self.bccguard.terminate()
            self.bccguard.wait(30)
        time.sleep(0.3)
        shutil.rmtree(self.base, ignore_errors=True)


def _snippet(name: str, *, milter: int = 0, relay: int = 0, reinject: int = 0) -> str:
    text = (DEPLOY / name).read_text()
    text = text.replace("inet:127.0.0.1:8891", f"inet:127.0.0.1:{milter}")
    text = text.replace("127.0.0.1]:10025", f"127.0.0.1]:{relay}")
    return "\n" + text.replace("127.0.0.1:10026", f"127.0.0.1:{reinject}")


def run_once(stack: Stack, cmd: list[str], count: int) -> tuple[float, float, float]:
    """(messages per second end to end, Postfix CPU ms per message, bccguard CPU ms per message)."""
    pf0, own0 = stack.cpu()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if p.returncode != 0 or "fatal" in p.stderr:
        raise RuntimeError(f"{stack.path}: smtp-source failed: {p.stderr.strip()[:400]}")
    deadline = time.monotonic() + 300
    while not stack.queue_empty():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stack.path}: queue not drained")
        time.sleep(0.02)
    dt = time.perf_counter() - t0
    pf1, own1 = stack.cpu()
    return count / dt, (pf1 - pf0) * 1000 / count, (own1 - own0) * 1000 / count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="a,b")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--count", type=int, default=0, help="messages per run (default: by shape)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", default="auto", help="bccguard's [server] workers")
    ap.add_argument("--unix", action="store_true", help="the milter on a unix socket, not inet")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bccguard-bench-milter-"))
    sink_port = free_port()
    sink = start_sink(sink_port, workdir)
    paths = ("postfix", "milter", "content_filter")
    results: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    load_before = loadavg()
    try:
        stacks = {p: Stack(p, sink_port, workdir, args.workers, args.unix) for p in paths}
        for shape in args.shapes.split(","):
            msgfile = workdir / f"shape-{shape}.eml"
            make_message(shape, msgfile)
            count = args.count or (1000 if SHAPES[shape]["rcpts"] == 1 else 150)
            results[shape] = {p: [] for p in paths}
            for p in paths:  # warm-up
                run_once(stacks[p], source_cmd(shape, args.sessions, "new", 40, msgfile, stacks[p].port), 40)
            for i in range(args.repeat):
                for p in paths[i % 3 :] + paths[: i % 3]:  # rotate: nobody always runs second
                    cmd = source_cmd(shape, args.sessions, "new", count, msgfile, stacks[p].port)
                    results[shape][p].append(run_once(stacks[p], cmd, count))
    finally:
        for s in locals().get("stacks", {}).values():
            s.stop()
        sink.terminate()
    print(f"load before: {load_before}; after: {loadavg()}")
    print("| shape | path | msg/s (median) | runs | ÷ Postfix alone | CPU ms/msg: Postfix | bccguard |")
    print("|---|---|---:|---|---:|---:|---:|")
    out = {}
    for shape, by_path in results.items():
        alone = statistics.median(r[0] for r in by_path["postfix"])
        for p, runs in by_path.items():
            rate = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            own = statistics.median(r[2] for r in runs)
            mark = ""
            if p == "milter":
                mark = " ✓" if rate / alone >= GOAL else " ✗"
            print(
                f"| ({shape}) {SHAPES[shape]['title']} | {p} | {rate:,.0f} | "
                f"{', '.join(f'{r[0]:.0f}' for r in runs)} | {rate / alone:.0%}{mark} | "
                f"{cpu:.2f} | {own:.2f} |"
            )
            out[f"{shape}/{p}"] = {"rate": rate, "ratio": rate / alone, "postfix_cpu_ms": cpu,
                                   "bccguard_cpu_ms": own, "runs": runs}  # fmt: skip
    print(json.dumps({"argv": sys.argv, "results": out}))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
