"""The console's list page at scale: how long view.rows() takes over N held messages.

The list reads every entry's metadata and the first 64 KB of its message on
each request (no index): this shows where that starts to hurt.

    PYTHONPATH=src python bench/bench_console.py [N ...]
"""

from __future__ import annotations

import sys
import tempfile
import time

from bccguard.console.view import Filters, rows
from bccguard.policy.model import Action, Envelope, Verdict
from bccguard.store.quarantine import Quarantine


def main(sizes: list[int]) -> None:
    rcpts = tuple(f"customer{i}@gmail.com" for i in range(300))
    head = "From: news@corp.example\r\nTo: " + ",\r\n ".join(rcpts) + "\r\nSubject: Survey {n}\r\n\r\nHi\r\n"
    verdict = Verdict(action=Action.QUARANTINE, exposure=True, rule="default", reason="300 visible")
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            q = Quarantine(d)
            q.open()
            for i in range(n):
                q.put(head.replace("{n}", str(i)).encode(), Envelope("news@corp.example", rcpts), verdict)
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                all_rows = rows(q, Filters())
                best = min(best, time.perf_counter() - t)
            hit = rows(q, Filters(subject="Survey 7"))
            print(f"{n:>6} held: list {best * 1000:8.1f} ms ({best / n * 1e6:6.1f} us/entry), "
                  f"{len(all_rows)} rows, subject filter {len(hit)} hits")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 1000, 5000])
