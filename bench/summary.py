"""Print a bench/results/*.json as a Markdown table (for bench/README.md or an issue comment).

    python3 bench/summary.py bench/results/relay-....json [--only-sessions 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from relay_bench import SHAPES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.add_argument("--only-sessions", type=int, default=None)
    args = p.parse_args(argv)
    record = json.loads(args.file.read_text())
    print(f"`{record['command']}` at commit {record['commit']} ({record.get('label') or 'no label'})  ")
    print(f"load before: `{record['uptime_before']}`  ")
    print(f"load after: `{record['uptime_after']}`\n")
    print("| shape | sessions | connections | path | msg/s | ratio | relay CPU ms/msg | peak RSS MB |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for c in record["cells"]:
        if args.only_sessions is not None and c["sessions"] != args.only_sessions:
            continue
        cpu = f"{c['cpu_ms_per_msg']:.3f}" if c["cpu_ms_per_msg"] is not None else "-"
        rss = f"{c['peak_rss_mb']:.0f}" if c["peak_rss_mb"] is not None else "-"
        conn = "per message" if c["mode"] == "new" else "reused"
        print(
            f"| ({c['shape']}) {SHAPES[c['shape']]['title']} | {c['sessions']} | {conn} | {c['path']} "
            f"| {c['rate']:.0f} | {c['ratio']:.0%} | {cpu} | {rss} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
