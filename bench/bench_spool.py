"""Benchmark: the spool bookkeeping of delivering one split message, copy by copy.

Creates a split entry of N copies (planned by the real policy engine from a
survey with N-1 customers + 2 internal recipients, so the JSON and its
render spec have their real sizes) in a temporary spool, then records each
copy as delivered the way retry.py does, with no upstream at all:

- `rewrite`: the entry's pending list rewritten after every copy
  (`Spool.update`: atomic write + fsync + directory fsync), the code before
  the journal;
- `journal`: one line appended to `<id>.done` and fsync'ed
  (`Spool.delivered`), the entry removed after the last copy.

Prints per N: bytes handed to write(2) (`wchar` in /proc/self/io), bytes
the kernel sent to storage (`write_bytes`; 0 on tmpfs), fsync calls and
wall time. `journal` is skipped when the code under test predates it, so
the same script measures the old tree:

    PYTHONPATH=src python bench/bench_spool.py [--dir DIR] [--sizes 100,300,1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bccguard.config import from_dict
from bccguard.policy.engine import evaluate
from bccguard.policy.model import Envelope
from bccguard.store.spool import Spool

INTERNAL = ("sales@corp.example", "boss@corp.example")


def survey(n: int) -> tuple[bytes, Envelope]:
    customers = [f"customer{i}@{'gmail.com' if i % 3 else 'clients.example'}" for i in range(n - 1)]
    to = ",\r\n ".join(f'"Customer {i}" <{c}>' if i % 5 == 0 else c for i, c in enumerate(customers))
    data = (
        f"From: Marketing <news@corp.example>\r\nTo: {to}\r\nCc: sales@corp.example\r\n"
        "Subject: Your feedback\r\nMessage-ID: <survey@corp.example>\r\n\r\n" + "Hello!\r\n" * 200
    ).encode()
    return data, Envelope("news@corp.example", (*customers, *INTERNAL))


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


@contextmanager
def counting_fsync() -> Iterator[list[int]]:
    calls = [0]
    real = os.fsync

    def fsync(fd: int) -> None:
        calls[0] += 1
        real(fd)

    os.fsync = fsync  # durable.py calls os.fsync through the module
    try:
        yield calls
    finally:
        os.fsync = real


def by_rewrite(spool: Spool, entry_id: str) -> None:
    copies = list(spool.entry(entry_id).copies)
    while copies:
        copies.pop(0)  # the upstream said 250
        spool.update(entry_id, copies)  # empty: the entry is removed


def by_journal(spool: Spool, entry_id: str) -> None:
    copies = list(spool.entry(entry_id).copies)
    while copies:
        c = copies.pop(0)  # the upstream said 250
        if copies:
            spool.delivered(entry_id, c)  # type: ignore[attr-defined]  # absent before the journal
        else:
            spool.update(entry_id, copies)


def run(directory: str | None, n: int, mode: str, deliver: Callable[[Spool, str], None]) -> None:
    policy = from_dict({"policy": {"internal_domains": ["corp.example"], "action": "split"}}).policy
    data, env = survey(n)
    out = evaluate(data, env, policy)
    assert out.split is not None and len(out.split.copies) == n
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        spool = Spool(Path(tmp) / "spool")
        spool.open()
        entry_id = spool.put_split(data, env.mail_from, out.split.copies, out.split.render_json())
        json_size = (spool.path / f"{entry_id}.json").stat().st_size
        os.sync()  # start from a quiet device, so write_bytes is this run's
        with counting_fsync() as fsyncs:
            before, t0 = io_counters(), time.perf_counter()
            deliver(spool, entry_id)
            elapsed, after = time.perf_counter() - t0, io_counters()
        assert not any(spool.path.iterdir()), "the entry should be gone"
    wchar = after["wchar"] - before["wchar"]
    storage = after["write_bytes"] - before["write_bytes"]
    print(
        f"{mode:8} N={n:5}  entry json {json_size / 1e3:6.1f} kB  write(2) {wchar / 1e3:10.1f} kB"
        f"  to storage {storage / 1e3:10.1f} kB  fsyncs {fsyncs[0]:5}  {elapsed:7.3f} s"
        f"  ({elapsed / n * 1e3:.2f} ms/copy)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where the temporary spool goes (default: the system temp dir)")
    p.add_argument("--sizes", default="100,300,1000", help="copies per message, comma-separated")
    args = p.parse_args()
    where = Path(args.dir or tempfile.gettempdir()).resolve()
    mounts = [m.split()[1:3] for m in Path("/proc/mounts").read_text().splitlines()]
    point, fs = max((m for m in mounts if where.is_relative_to(m[0])), key=lambda m: len(m[0]))
    print(f"spool under {where} ({fs} mounted at {point})")
    modes: list[tuple[str, Callable[[Spool, str], None]]] = [("rewrite", by_rewrite)]
    if hasattr(Spool, "delivered"):
        modes.append(("journal", by_journal))
    else:
        print("journal: not in this tree (before the journal)")
    for n in (int(s) for s in args.sizes.split(",")):
        for mode, deliver in modes:
            run(args.dir, n, mode, deliver)


if __name__ == "__main__":
    main()
