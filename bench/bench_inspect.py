"""Micro-benchmark: split a header and parse every recipient field.

Prints N vs milliseconds for a To header of N addresses, in four shapes:
`plain` (the tier-1 regex), `mixed` (quoted names, obs-phrase, comments,
groups, encoded words, IDN), `cfws` (comments inside every addr-spec: the
tier-2 regex) and `nested` (nested comments: every element goes through the
tokenizer, the worst case a sender can force). Timing lives here, never in
tests.

    PYTHONPATH=src python bench/bench_inspect.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bccguard.policy.addresses import visible_recipients
from bccguard.policy.headers import parse_header

SIZES = (100, 1_000, 3_000, 10_000, 30_000)


def plain(i: int) -> str:
    return f'"User {i}" <user{i}@example{i % 50}.com>' if i % 2 else f"u{i}@d{i % 7}.example"


def mixed(i: int) -> str:
    shapes = (
        f"u{i}@d{i % 7}.example",
        f'"Doe, J {i}" <j{i}@x.example>',
        f"John Q. Public {i} <jqp{i}@x.example>",
        f"j{i}@x.example (J {i})",
        f"G{i}: a{i}@x.example, b{i}@y.example;",
        f"=?utf-8?q?n=40{i}?= <e{i}@bücher.example>",
    )
    return shapes[i % len(shapes)]


def cfws(i: int) -> str:
    return f"Pete {i} (c) <pete{i}(x)@silly{i % 9}.test(y)>"


def nested(i: int) -> str:
    return f"Pete {i} ((c)) <pete{i}@silly{i % 9}.test>"


def message(n: int, shape: Callable[[int], str]) -> bytes:
    value = ",\r\n ".join(shape(i) for i in range(n))
    head = f"From: a@corp.example\r\nTo: {value}\r\nSubject: x\r\n\r\nbody\r\n"
    return head.encode()


def best_ms(data: bytes, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        visible_recipients(parse_header(data))
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main() -> None:
    shapes = {"plain": plain, "mixed": mixed, "cfws": cfws, "nested": nested}
    print(f"{'N':>7} " + " ".join(f"{name + ' ms':>10}" for name in shapes))
    for n in SIZES:
        cells = [best_ms(message(n, fn), 3 if n >= 10_000 else 7) for fn in shapes.values()]
        print(f"{n:>7} " + " ".join(f"{c:>10.1f}" for c in cells))


if __name__ == "__main__":
    main()
