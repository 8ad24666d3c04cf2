"""Throughput of bccguard against the direct path, side by side in one run.

    bench/run [--quick] [--with-postfix] [--shapes a,b] [--sessions 20] [--modes new] ...

For every cell (shape x sessions x connection mode) the same smtp-source
command is run against:

  direct    smtp-source -> smtp-sink                 (the limit of the machine)
  bccguard  smtp-source -> bccguard -> smtp-sink
  postfix   smtp-source -> private Postfix -> smtp-sink   (--with-postfix)

and the table shows messages/s, the relay's CPU per message (utime+stime
deltas of its whole process tree from /proc, so workers and Postfix's
daemons count), its peak RSS during the cell (VmHWM, reset per cell) and
the ratio to the direct path. The machine is shared and noisy: ratios
from one run are what to compare, and `uptime` is recorded before and after.

smtp-source aborts on any unexpected reply, so a finished cell also means
every message got a 250. bccguard's own /metrics are scraped at the end to
show which action ran (the 100-recipient shapes must be "rewrite").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Per shape: message size (total bytes), envelope recipients, recipient domain,
# and what the relay should do with it. Addresses in To are exactly the
# envelope recipients smtp-source generates: rcpt@dom, 2rcpt@dom, ... Nrcpt@dom.
SHAPES = {
    "a": {"title": "2 KB, 1 rcpt", "size": 2048, "rcpts": 1, "domain": "ext.example"},
    "b": {"title": "2 KB, 100 rcpts in To", "size": 2048, "rcpts": 100, "domain": "ext.example"},
    "c": {"title": "100 KB, 1 rcpt", "size": 100 * 1024, "rcpts": 1, "domain": "ext.example"},
    "d": {"title": "survey, 1000 customers in To", "size": 2048, "rcpts": 1000, "domain": "gmail.com"},
}
# The targets: 20 sessions, a new connection per message, full inspection.
TARGETS = {"a": 0.20, "b": 0.35, "c": 0.30}
CPU_TARGET_MS = {"a": 0.6}
SENDER = "news@corp.example"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return loadavg()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 220 on port {port} within {timeout}s")


# ------------------------------------------------------------------ /proc


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime ticks) or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); utime..cstime are fields 14..17.
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree(root: int) -> list[int]:
    """root and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU of the tree: live processes' own time plus what their reaped children used."""
    ticks = 0
    for pid in tree(root):
        st = _stat(pid)
        if st is not None:
            ticks += st[1]
    return ticks / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_peak_rss_kb(root: int) -> int:
    """Sum of the peak RSS (VmHWM) of the live processes in the tree."""
    return sum(_status_kb(pid, "VmHWM") for pid in tree(root))


def reset_peak_rss(root: int) -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0, needs privilege)."""
    ok = True
    for pid in tree(root):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


# ------------------------------------------------------------------ messages


def make_message(shape: str, path: Path) -> None:
    """A pre-formatted message for smtp-source -F (it adds CRLF to each line)."""
    spec = SHAPES[shape]
    n, dom = int(spec["rcpts"]), str(spec["domain"])
    addrs = ["rcpt@" + dom] + [f"{i}rcpt@{dom}" for i in range(2, n + 1)]
    lines = [f"From: Marketing <{SENDER}>"]
    # Folded like a mail client would: several addresses per line.
    to = [", ".join(addrs[i : i + 5]) for i in range(0, len(addrs), 5)]
    lines.append("To: " + (",\n\t".join(to)))
    lines += [
        "Subject: Your opinion matters",
        f"Message-ID: <bench-{shape}@corp.example>",
        "Date: Mon, 1 Jan 2024 10:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    head = sum(len(x) + 2 for x in lines)
    body_len = max(200, int(spec["size"]) - head)
    row = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem"  # 76
    body, size = [], 0
    while size < body_len:
        body.append(row)
        size += len(row) + 2
    path.write_text("\n".join(lines + body) + "\n")


# ------------------------------------------------------------------ servers


@dataclass
class Relay:
    name: str
    port: int
    pid: int  # root of the process tree whose CPU and RSS count
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def start_sink(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    cmd = ["smtp-sink"]
    if os.geteuid() == 0:
        cmd += ["-u", os.environ.get("BENCH_SINK_USER", "postfix")]
    # -c: count, so a wrong run is visible; backlog 1024 for 20 sessions x new connections.
    cmd += [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(workdir / "sink.log", "wb"))  # noqa: SIM115
    wait_banner(port, proc=proc)
    return proc


def _toml_workers(value: str) -> str:
    """--workers as a TOML value: a count stays a number, anything else is quoted ("auto")."""
    return value if value.isdigit() else f'"{value}"'


def bccguard_config(
    args: argparse.Namespace, workdir: Path, port: int, sink: int, mport: int, *, name: str = "bccguard"
) -> Path:
    """The relay under test; a --baseline copy gets no keys an older version may not know."""
    cfg = workdir / f"{name}.toml"
    if name != "bccguard":
        workdir = workdir / name
    cfg.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
hostname = "bccguard.bench"
max_recipients = 1000
max_sessions = 1000
max_sessions_per_ip = 1000
{f"workers = {_toml_workers(args.workers)}" if args.workers and name == "bccguard" else ""}
{f'event_loop = "{args.event_loop}"' if args.event_loop and name == "bccguard" else ""}

[upstream]
url = "smtp://127.0.0.1:{sink}"
helo_name = "bccguard.bench"
timeout = 30.0
{f"pool_size = {args.pool_size}" if args.pool_size is not None else ""}

[quarantine]
path = "{workdir}/quarantine"

[spool]
path = "{workdir}/spool"

[metrics]
listen = "127.0.0.1:{mport}"

[logging]
level = "{args.log_level}"
format = "json"

[policy]
internal_domains = ["corp.example"]
action = "{args.action}"
"""
    )
    return cfg


def start_bccguard(
    args: argparse.Namespace, workdir: Path, sink: int, *, name: str = "bccguard", src: Path = REPO / "src"
) -> Relay:
    port, mport = free_port(), free_port()
    cfg = bccguard_config(args, workdir, port, sink, mport, name=name)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Logs go to a file, as in production; the per-message line is part of the cost.
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bccguard.cli", "serve", "--config", str(cfg)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        wait_banner(port, proc=proc)
    except RuntimeError:
        proc.kill()
        sys.stderr.write((workdir / f"{name}.log").read_text()[-3000:])
        raise
    return Relay(name, port, proc.pid, proc, metrics_port=mport)


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {q}
data_directory = {d}
maillog_file = /var/log/bccguard-bench-postfix.log
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
myhostname = postfix.bench
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink}
smtp_dns_support_level = disabled
smtpd_relay_restrictions = permit_mynetworks, reject
default_process_limit = 100
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtp_destination_recipient_limit = 1000
smtpd_recipient_limit = 1000
default_destination_recipient_limit = 1000
smtp_destination_concurrency_limit = 20
"""


def start_postfix(workdir: Path, sink: int) -> Relay:
    """A private Postfix instance relaying everything to the sink (FIELD-NOTES recipe)."""
    base = Path(tempfile.mkdtemp(prefix="bccguard-bench-postfix-", dir="/var/tmp"))
    base.chmod(0o755)
    conf, q, d = base / "etc", base / "queue", base / "data"
    conf.mkdir()
    q.mkdir()
    d.mkdir()
    shutil.copy("/etc/postfix/master.cf", conf / "master.cf")
    port = free_port()
    (conf / "main.cf").write_text(POSTFIX_MAIN.format(q=q, d=d, sink=sink))
    pc = ["postconf", "-c", str(conf)]
    subprocess.run([*pc, "-F", "*/*/chroot=n"], check=True)
    # Move the smtpd listener to our port.
    subprocess.run([*pc, "-M#", "smtp/inet"], check=True)
    subprocess.run([*pc, "-M", f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd"], check=True)
    shutil.chown(d, "postfix")
    subprocess.run(["postfix", "-c", str(conf), "check"], check=False)
    subprocess.run(["postfix", "-c", str(conf), "start"], check=True, capture_output=True)
    pid = int((q / "pid" / "master.pid").read_text().split()[0])
    wait_banner(port)
    return Relay("postfix", port, pid, extra={"conf": str(conf), "base": str(base)})


def stop_relay(r: Relay) -> None:
    if r.name == "postfix":
        subprocess.run(["postfix", "-c", str(r.extra["conf"]), "stop"], check=False, capture_output=True)
        time.sleep(0.5)
        shutil.rmtree(str(r.extra["base"]), ignore_errors=True)
        return
    if r.proc is not None and r.proc.poll() is None:
        r.proc.send_signal(signal.SIGTERM)
        try:
            r.proc.wait(15)
        except subprocess.TimeoutExpired:
            r.proc.kill()


def scrape(port: int) -> dict[str, float]:
    """bccguard_messages_total by action, summed over rules."""
    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("bccguard_messages_total{"):
            labels, value = line.rsplit(" ", 1)
            action = labels.split('action="', 1)[1].split('"', 1)[0]
            out[action] = out.get(action, 0.0) + float(value)
    return out


# ------------------------------------------------------------------ one cell


@dataclass
class Cell:
    shape: str
    sessions: int
    mode: str  # "new": a connection per message; "reuse": smtp-source -d
    path: str
    messages: int
    seconds: float
    rate: float
    cpu_ms_per_msg: float | None
    peak_rss_mb: float | None
    ratio: float | None = None
    runs: list[float] = field(default_factory=list)


def source_cmd(shape: str, sessions: int, mode: str, count: int, msgfile: Path, port: int) -> list[str]:
    spec = SHAPES[shape]
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(count), "-F", str(msgfile)]
    cmd += ["-f", SENDER, "-t", f"rcpt@{spec['domain']}", "-r", str(spec["rcpts"]), "-M", "client.bench"]
    if mode == "reuse":
        cmd.append("-d")
    return [*cmd, f"127.0.0.1:{port}"]


def run_source(cmd: list[str], timeout: float) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    dt = time.perf_counter() - t0
    if p.returncode != 0 or "fatal" in p.stderr:
        raise RuntimeError(f"smtp-source failed ({p.returncode}): {p.stderr.strip()[:500]}")
    return dt


def measure(
    relay: Relay | None, cmd: list[str], count: int, timeout: float
) -> tuple[float, float | None, float | None]:
    if relay is None:
        return run_source(cmd, timeout), None, None
    reset_peak_rss(relay.pid)
    cpu0 = tree_cpu_seconds(relay.pid)
    dt = run_source(cmd, timeout)
    if relay.name == "bccguard":
        time.sleep(0.05)  # the last sessions' QUIT
    cpu = tree_cpu_seconds(relay.pid) - cpu0
    return dt, cpu * 1000 / count, tree_peak_rss_kb(relay.pid) / 1024


def run_cell(
    shape: str,
    sessions: int,
    mode: str,
    relays: list[Relay],
    sink_port: int,
    msgfile: Path,
    args: argparse.Namespace,
) -> list[Cell]:
    """Each path gets a short calibration run (also its warm-up), then enough messages for ~args.seconds."""
    paths: list[tuple[str, Relay | None, int]] = [("direct", None, sink_port)]
    paths += [(r.name, r, r.port) for r in relays]
    counts = {}
    for name, _, port in paths:
        probe = max(sessions * 3, 20 if SHAPES[shape]["rcpts"] < 1000 else 6)
        rate = probe / run_source(source_cmd(shape, sessions, mode, probe, msgfile, port), 120)
        floor = sessions * (10 if int(SHAPES[shape]["rcpts"]) < 1000 else 2)
        counts[name] = int(min(max(rate * args.seconds, floor), 200_000))
    runs: dict[str, list[tuple[float, float | None, float | None]]] = {p[0]: [] for p in paths}
    for i in range(args.repeat):
        # Rotate the order: whoever runs right after another path inherits its
        # leftovers (TIME_WAIT sockets, a busy sink), so no path always goes second.
        for name, relay, port in paths[i % len(paths) :] + paths[: i % len(paths)]:
            cmd = source_cmd(shape, sessions, mode, counts[name], msgfile, port)
            runs[name].append(measure(relay, cmd, counts[name], timeout=max(120.0, args.seconds * 30)))
    cells = []
    for name, _, _ in paths:
        rates = [counts[name] / r[0] for r in runs[name]]
        cpu = [r[1] for r in runs[name] if r[1] is not None]
        rss = [r[2] for r in runs[name] if r[2] is not None]
        rate = statistics.median(rates)
        cells.append(
            Cell(
                shape,
                sessions,
                mode,
                name,
                counts[name],
                round(counts[name] / rate, 3),
                round(rate, 1),
                round(statistics.median(cpu), 3) if cpu else None,
                round(max(rss), 1) if rss else None,
                runs=[round(x, 1) for x in rates],
            )
        )
    direct = cells[0].rate
    for c in cells:
        c.ratio = round(c.rate / direct, 3)
    return cells


# ------------------------------------------------------------------ report


def verdict(c: Cell) -> str:
    if c.path != "bccguard" or c.sessions != 20 or c.mode != "new":
        return ""
    notes = []
    if c.shape in TARGETS and c.ratio is not None:
        t = TARGETS[c.shape]
        notes.append(f"{'ok' if c.ratio >= t else 'MISS'} (>= {t:.0%})")
    if c.shape in CPU_TARGET_MS and c.cpu_ms_per_msg is not None:
        t = CPU_TARGET_MS[c.shape]
        notes.append(f"cpu {'ok' if c.cpu_ms_per_msg <= t else 'MISS'} (<= {t} ms)")
    return ", ".join(notes)


def table(cells: list[Cell]) -> str:
    head = (
        f"{'shape':<32} {'sess':>4} {'conn':<5} {'path':<9} {'msgs':>6} {'msg/s':>8} {'ratio':>6} "
        f"{'cpu ms/msg':>10} {'peak RSS MB':>11}  target"
    )
    out = [head, "-" * len(head)]
    prev = None
    for c in cells:
        key = (c.shape, c.sessions, c.mode)
        if prev is not None and key != prev:
            out.append("")
        prev = key
        title = f"({c.shape}) {SHAPES[c.shape]['title']}"
        cpu = f"{c.cpu_ms_per_msg:.3f}" if c.cpu_ms_per_msg is not None else "-"
        rss = f"{c.peak_rss_mb:.1f}" if c.peak_rss_mb is not None else "-"
        out.append(
            f"{title:<32} {c.sessions:>4} {c.mode:<5} {c.path:<9} {c.messages:>6} {c.rate:>8.1f} "
            f"{c.ratio:>6.1%} {cpu:>10} {rss:>11}  {verdict(c)}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="20 sessions, new connections, shapes a-c, short runs"
    )
    p.add_argument("--shapes", default="a,b,c,d", help="comma list of a,b,c,d")
    p.add_argument("--sessions", default="1,20", help="comma list of session counts")
    p.add_argument(
        "--modes", default="new,reuse", help="new (connection per message), reuse (smtp-source -d)"
    )
    p.add_argument("--seconds", type=float, default=2.0, help="target seconds per bccguard run")
    p.add_argument("--repeat", type=int, default=1, help="runs per path and cell; the median is reported")
    p.add_argument("--with-postfix", action="store_true", help="also a private Postfix instance as relay")
    p.add_argument(
        "--baseline", type=Path, default=None,
        help="also bccguard from this src/ dir, default settings (e.g. src itself, to compare --workers 2)",
    )
    p.add_argument(
        "--workers", default="",
        help='[server] workers: a count or "auto" (default: the relay\'s own default, "auto": one per CPU)',
    )
    p.add_argument("--event-loop", default="", help='[server] event_loop ("auto", "asyncio", "uvloop")')
    p.add_argument("--pool-size", type=int, default=None, help="[upstream] pool_size")
    p.add_argument("--action", default="rewrite", help="[policy] action (rewrite: full inspection + rewrite)")
    p.add_argument("--log-level", default="info", help="[logging] level (info: one line per message)")
    p.add_argument(
        "--json", type=Path, default=None, help="write results here (default bench/results/<time>.json)"
    )
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. the lever under test)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.sessions, args.modes = "a,b,c", "20", "new"
        args.seconds = min(args.seconds, 1.5)
    shapes = [s for s in args.shapes.split(",") if s]
    sessions = [int(s) for s in args.sessions.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]

    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found; run bench/run (installs Debian's postfix)", file=sys.stderr)
            return 2
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load_before = uptime()
    print(f"# {load_before}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bccguard-bench-"))
    sink_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    relays: list[Relay] = []
    cells: list[Cell] = []
    actions: dict[str, float] = {}
    try:
        procs.append(start_sink(sink_port, workdir))
        relays.append(start_bccguard(args, workdir, sink_port))
        if args.baseline:
            # Another bccguard source tree (e.g. `git worktree add /tmp/base main`), same settings.
            relays.append(start_bccguard(args, workdir, sink_port, name="baseline", src=args.baseline))
        if args.with_postfix:
            relays.append(start_postfix(workdir, sink_port))
        for shape in shapes:
            msgfile = workdir / f"shape-{shape}.eml"
            make_message(shape, msgfile)
            for sess in sessions:
                for mode in modes:
                    new = run_cell(shape, sess, mode, relays, sink_port, msgfile, args)
                    text = table(new).split("\n")
                    print("\n".join(text if not cells else ["", *text[2:]]), flush=True)
                    cells += new
        actions = scrape(relays[0].metrics_port)
    finally:
        for r in relays:
            stop_relay(r)
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    load_after = uptime()
    print()
    print(table(cells))
    print(f"\n# bccguard actions: {json.dumps(actions)}")
    print(f"# load before: {load_before}\n# load after:  {load_after}")
    out = args.json or RESULTS / f"relay-{started.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    record = {
        "started": started,
        "command": " ".join(["bench/run", *(argv if argv is not None else sys.argv[1:])]),
        "label": args.label,
        "commit": git.stdout.strip(),
        "cpus": os.cpu_count(),
        "uptime_before": load_before,
        "uptime_after": load_after,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "bccguard_actions": actions,
        "cells": [asdict(c) for c in cells],
    }
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"# JSON: {out}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
