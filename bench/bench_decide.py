"""Inspection end to end (parse, classify, decide; rewrite apart) against the issue 7 targets.

    PYTHONPATH=src python bench/bench_decide.py [--sizes 100,1000,10000,30000] [--mix hard] [--email]
    PYTHONPATH=src python bench/bench_decide.py --per-message   # only the (b) line

bench/bench_inspect.py (the address parser's own benchmark) times the parser
alone over harder address shapes; this one times what the relay does per
message and checks the targets.

Inspection is what the relay does to every message before deciding: split
the header block, parse To/Cc into addresses, classify each, decide. The
rewrite (only for exposures) is timed separately. The body is never parsed,
so a large body costs nothing here (one row shows it).

Targets (issue 7): 10,000 addresses in To inspected in <= 50 ms; 30,000 in
<= 3.5x that. Also printed, without a target: `evaluate` per message on the
relay benchmark's shape (b) (2 KB, 100 recipients all visible in To, the
rewrite path runs), the policy core's share of bench/run's (b) CPU.
`--email` also times Python's `email.policy.default` address parsing for
comparison (quadratic: seconds at 10,000; only run up to 3,000).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable

from bccguard.config import from_dict
from bccguard.policy.addresses import visible_recipients
from bccguard.policy.decide import decide
from bccguard.policy.engine import evaluate
from bccguard.policy.headers import parse_header
from bccguard.policy.model import Envelope

DOMAINS = ["gmail.com", "orange.fr", "clients.example", "corp.example", "partner.example", "yahoo.co.uk"]


def addresses(n: int, mix: str = "survey") -> list[str]:
    """survey: what mail merges and address books write (bare, `Name <a>`, `"Last, First" <a>`).
    hard: adds comments and RFC 2047 display names with IDN domains (2 in 5 addresses)."""
    out = []
    kinds = 3 if mix == "survey" else 5
    for i in range(n):
        dom = DOMAINS[i % len(DOMAINS)]
        kind = i % kinds
        if kind == 0:
            out.append(f"user{i}@{dom}")
        elif kind == 1:
            out.append(f"Customer {i} <user{i}@{dom}>")
        elif kind == 2:
            out.append(f'"Doe, Jane {i}" <jane.doe{i}@{dom}>')
        elif kind == 3:
            out.append(f"user{i}@{dom} (Customer {i})")
        else:
            out.append(f"=?utf-8?q?J=C3=BCrgen_{i}?= <j{i}@b\u00fccher.example>")
    return out


def message(n: int, body: int = 2000, mix: str = "survey") -> bytes:
    to = ",\r\n ".join(addresses(n, mix))
    head = f"From: News <news@corp.example>\r\nTo: {to}\r\nSubject: survey\r\nMIME-Version: 1.0\r\n\r\n"
    return head.encode() + (b"x" * 76 + b"\r\n") * (body // 78)


def message_b() -> tuple[bytes, Envelope]:
    """What bench/run sends for shape (b): 100 external recipients folded one a line in To."""
    rcpts = tuple(f"{i if i > 1 else ''}rcpt@ext.example" for i in range(1, 101))
    to = ",\r\n\t".join(rcpts)
    head = (
        f"From: Marketing <news@corp.example>\r\nTo: {to}\r\nSubject: Your opinion matters\r\n"
        "Message-ID: <bench-b@corp.example>\r\nMIME-Version: 1.0\r\n\r\n"
    )
    return (head + "Lorem ipsum dolor sit amet\r\n" * 60).encode(), Envelope("news@corp.example", rcpts)


def per_message(runs: int = 15, number: int = 500) -> tuple[float, float]:
    """`evaluate` on shape (b) with action=rewrite: (min, median) microseconds per message."""
    cfg = from_dict({"policy": {"internal_domains": ["corp.example"], "action": "rewrite"}})
    raw, env = message_b()
    outcome = evaluate(raw, env, cfg.policy)
    assert outcome.verdict.hidden == 100 and outcome.message != raw  # the rewrite path ran
    times = sorted(
        timeit.timeit(lambda: evaluate(raw, env, cfg.policy), number=number) / number for _ in range(runs)
    )
    return times[0] * 1e6, statistics.median(times) * 1e6


def print_per_message() -> None:
    best_us, median_us = per_message()
    print(
        f"per-message (b) evaluate, 100 visible recipients, rewrite: min {best_us:.0f} us, "
        f"median {median_us:.0f} us"
    )


def best(fn: Callable[[], object], budget: float = 1.0, min_runs: int = 3) -> float:
    """Fastest of several runs (the machine is shared; the minimum is the least noisy)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100,1000,10000,30000")
    p.add_argument("--mix", default="survey", choices=["survey", "hard"], help="see addresses()")
    p.add_argument("--email", action="store_true", help="also time email.policy.default (<= 3000)")
    p.add_argument("--per-message", action="store_true", help="only the shape (b) evaluate line")
    args = p.parse_args(argv)
    if args.per_message:
        print_per_message()
        return 0
    policy = {"internal_domains": ["corp.example"], "partner_domains": ["partner.example"]}
    cfg = from_dict({"policy": policy})
    env = Envelope(mail_from="news@corp.example", rcpt_tos=("someone@gmail.com",), smtputf8=True)
    print(f"mix: {args.mix}")
    print(
        f"{'addresses':>9} {'inspect ms':>10} {'us/addr':>8} {'x prev':>7} {'+rewrite ms':>11}"
        "  email.policy.default ms"
    )
    results: dict[int, float] = {}
    prev = None
    for n in (int(x) for x in args.sizes.split(",")):
        raw = message(n, mix=args.mix)

        def inspect(raw: bytes = raw) -> object:
            block = parse_header(raw)
            return decide(env, visible_recipients(block), cfg.policy)

        verdict = inspect()
        assert verdict.visible == n, (verdict.visible, n)  # type: ignore[attr-defined]
        t = best(inspect)
        full = best(lambda raw=raw: evaluate(raw, env, cfg.policy))
        email_ms = ""
        if args.email and n <= 3000:
            from email import message_from_bytes, policy

            def parse_email(raw: bytes = raw) -> object:
                return message_from_bytes(raw, policy=policy.default)["To"].addresses

            email_ms = f"{best(parse_email, min_runs=1) * 1000:.1f}"
        growth = f"{t / prev[1] / (n / prev[0]):.2f}" if prev else ""
        print(f"{n:>9} {t * 1000:>10.2f} {t / n * 1e6:>8.2f} {growth:>7} {full * 1000:>11.2f}  {email_ms}")
        results[n] = t
        prev = (n, t)
    # A 25 MB body changes nothing: the header block is all that is read.
    big = message(100, body=25 * 1024 * 1024)
    small = message(100)
    def inspect_only(raw: bytes) -> object:
        return decide(env, visible_recipients(parse_header(raw)), cfg.policy)

    tb, ts = best(lambda: inspect_only(big)), best(lambda: inspect_only(small))
    rb = best(lambda: evaluate(big, env, cfg.policy))
    print(
        f"\n100 addresses: inspect with a 25 MB body {tb * 1000:.2f} ms, with 2 KB {ts * 1000:.2f} ms; "
        f"inspect + rewrite with 25 MB {rb * 1000:.1f} ms (the rewritten copy is one body copy)"
    )
    print_per_message()
    ok = True
    if 10000 in results:
        t10 = results[10000] * 1000
        print(f"target 10,000 <= 50 ms: {t10:.1f} ms -> {'ok' if t10 <= 50 else 'MISS'}")
        ok &= t10 <= 50
        if 30000 in results:
            r = results[30000] / results[10000]
            print(f"target 30,000 <= 3.5x 10,000: {r:.2f}x -> {'ok' if r <= 3.5 else 'MISS'}")
            ok &= r <= 3.5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
