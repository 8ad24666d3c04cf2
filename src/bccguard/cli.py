"""`bccguard` command line: serve, validate config, dry-run a message.

User mistakes (a bad config, a missing file, a port in use) print one line
that names the problem and the fix, never a traceback. Exit codes: 0 ok,
1 "the message would be changed/held/refused" (check) or a runtime failure,
2 bad input, 78 bad configuration (EX_CONFIG, what systemd and sysexits know).

`bccguard quarantine ...` (review.py): 0 done; 1 the store or the upstream
failed (a release that did not reach every recipient keeps the entry);
2 a bad id, an unknown entry or a bad argument.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bccguard import __version__
from bccguard.config import Config, ConfigError, load

EX_OK, EX_CHANGED, EX_USAGE, EX_CONFIG = 0, 1, 2, 78


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=os.environ.get("BCCGUARD_CONFIG"),
        help="TOML config file (default: $BCCGUARD_CONFIG, else the embedded defaults)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bccguard",
        description="SMTP relay that hides exposed customer addresses before mail leaves.",
    )
    parser.add_argument("--version", action="version", version=f"bccguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the relay")
    _config_arg(serve)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    check_cfg = cfg_sub.add_parser("check", help="validate a config file and exit")
    _config_arg(check_cfg)

    check = sub.add_parser(
        "check",
        help="dry-run one message: print what the relay would do, send nothing",
        description="Exit 0: would go out unchanged; 1: would be changed, held or refused; 2: bad input.",
    )
    check.add_argument(
        "file", metavar="FILE.eml", help="the message (RFC 5322, CRLF or LF line endings); - for stdin"
    )
    _config_arg(check)
    check.add_argument("--mail-from", metavar="A", help="envelope sender (default: the From address)")
    check.add_argument(
        "--rcpt",
        metavar="A",
        action="append",
        default=None,
        help="envelope recipient, repeatable (default: every To, Cc and Bcc address)",
    )
    passwd = sub.add_parser(
        "passwd",
        help="add an AUTH user or change a password (asks twice on a terminal, else reads stdin)",
    )
    passwd.add_argument("user", metavar="USER")
    _config_arg(passwd)
    passwd.add_argument(
        "--file", metavar="F", help="credentials file (default: server.auth_file of --config)"
    )

    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--show", action="store_true", help="print the header block as it would leave")
    _quarantine_parser(sub)
    return parser


def _quarantine_parser(sub: Any) -> None:
    q = sub.add_parser(
        "quarantine",
        help="review held messages: list, show, release, delete, purge",
        description="Exit 0: done; 1: store or upstream failure (entry kept); 2: bad id or argument. "
        "Release, delete and purge are recorded in <quarantine path>/audit.log.",
    )
    q_sub = q.add_subparsers(dest="quarantine_command", metavar="SUBCOMMAND")
    p = q_sub.add_parser("list", help="list held messages (sender, counts, subject)")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    _config_arg(p)
    p = q_sub.add_parser("show", help="summary and header block of one message")
    p.add_argument("id", metavar="ID")
    p.add_argument("--raw", action="store_true", help="print the message bytes as held")
    _config_arg(p)
    p = q_sub.add_parser("release", help="deliver through the configured upstream, then remove")
    p.add_argument("id", metavar="ID")
    p.add_argument("--rewrite", action="store_true", help="hide external addresses first (policy in force)")
    _config_arg(p)
    p = q_sub.add_parser("delete", help="remove a held message without delivering it")
    p.add_argument("id", metavar="ID")
    _config_arg(p)
    p = q_sub.add_parser("purge", help="remove messages held longer than a duration")
    p.add_argument("--older-than", required=True, metavar="AGE", help='e.g. "30d", "12h"')
    _config_arg(p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "config" and args.config_command == "check":
            return cmd_config_check(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "passwd":
            return cmd_passwd(args)
        if args.command == "quarantine" and args.quarantine_command:
            return cmd_quarantine(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"bccguard: config error: {problem}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    parser.print_help(sys.stderr)
    return EX_USAGE


def cmd_quarantine(args: argparse.Namespace) -> int:
    from bccguard import review  # lazy: serve and check need none of it

    cfg = load(args.config)
    try:
        match args.quarantine_command:
            case "list":
                return review.cmd_list(cfg, as_json=args.json)
            case "show":
                return review.cmd_show(cfg, args.id, raw=args.raw)
            case "release":
                return review.cmd_release(cfg, args.id, rewrite=args.rewrite)
            case "delete":
                return review.cmd_delete(cfg, args.id)
            case _:
                return review.cmd_purge(cfg, args.older_than)
    except review.ReviewError as exc:
        print(f"bccguard: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        print(
            f"bccguard: {exc.strerror or exc} on {exc.filename or cfg.quarantine.path} "
            "(fix: run as the relay's user, or check quarantine.path)",
            file=sys.stderr,
        )
        return 1


def cmd_config_check(args: argparse.Namespace) -> int:
    from bccguard.app import load_credentials
    from bccguard.smtp.tls import server_context

    cfg = load(args.config)
    server_context(cfg.server.tls)  # a cert/key that does not load is a config error
    load_credentials(cfg)
    print(f"{cfg.source}: ok ({len(cfg.policy.rules)} rules, upstream {cfg.upstream.url.partition(':')[0]})")
    return EX_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from bccguard.ops.logs import configure
    from bccguard.workers import WorkerRole

    cfg: Config = load(args.config)
    configure(cfg.logging.level, cfg.logging.format, log_addresses=cfg.logging.log_addresses)
    worker = WorkerRole.from_env()
    try:
        if cfg.server.workers > 1 and worker is None:
            from bccguard.workers import Supervisor

            return Supervisor(cfg, config_path=args.config).run()
        return _serve_one(cfg, args.config, worker)
    except OSError as exc:
        # Binding is the usual culprit: port taken or privileged.
        print(
            f"bccguard: cannot start: {exc.strerror or exc} "
            f"(fix: check server.listen = {cfg.server.listen!r}"
            f"{f', milter.listen = {cfg.milter.listen!r}' if cfg.milter.listen else ''} and metrics.listen = "
            f"{cfg.metrics.listen!r} are free and allowed; or the quarantine/spool paths are writable)",
            file=sys.stderr,
        )
        return 1


def _serve_one(cfg: Config, config_path: str | None, worker: Any) -> int:
    from bccguard.app import App, loop_factory

    async def run() -> int:
        app = App(cfg, config_path=config_path, worker=worker)
        return await app.run()

    with asyncio.Runner(loop_factory=loop_factory(cfg.server.event_loop)) as runner:
        return runner.run(run())


def cmd_passwd(args: argparse.Namespace) -> int:
    """Add or update one user of the AUTH credentials file; the password never touches argv."""
    import getpass

    from bccguard.smtp.auth import CredentialsError, set_password, user_problem

    path = args.file or (load(args.config).server.auth_file if args.config else "")
    if not path:
        print("bccguard: no credentials file (fix: pass --file F, or --config F with server.auth_file set)",
              file=sys.stderr)
        return EX_USAGE
    problem = user_problem(args.user)
    if problem is not None:
        print(f"bccguard: bad user name: {problem}", file=sys.stderr)
        return EX_USAGE
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            print("bccguard: the passwords differ; nothing changed", file=sys.stderr)
            return EX_USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("bccguard: empty password; nothing changed", file=sys.stderr)
        return EX_USAGE
    try:
        existed = set_password(path, args.user, password)
    except (CredentialsError, OSError) as exc:
        print(f"bccguard: cannot update {path}: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {'password changed for' if existed else 'added user'} {args.user}"
          " (send SIGHUP to a running relay to load it)")
    return EX_OK


def cmd_check(args: argparse.Namespace) -> int:
    from bccguard.policy.addresses import first_from, header_recipients
    from bccguard.policy.engine import evaluate
    from bccguard.policy.headers import parse_header
    from bccguard.policy.model import Envelope

    cfg = load(args.config)
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        print(
            f"bccguard: cannot read {args.file}: {exc.strerror} (fix: pass an existing .eml file)",
            file=sys.stderr,
        )
        return EX_USAGE
    if not data.strip():
        print(
            f"bccguard: {args.file} is empty (fix: pass a whole message, headers and body)", file=sys.stderr
        )
        return EX_USAGE
    block = parse_header(data)
    if not block.fields:
        print(f"bccguard: {args.file} has no header fields (fix: pass an RFC 5322 message)", file=sys.stderr)
        return EX_USAGE
    mail_from = args.mail_from
    if mail_from is None:
        sender = first_from(block)
        mail_from = sender.address.addr_spec if sender is not None and sender.address.valid else ""
    rcpts = args.rcpt
    if rcpts is None:
        rcpts = list(
            dict.fromkeys(a.addr_spec for a in header_recipients(block, ("to", "cc", "bcc")) if a.valid)
        )
    if not rcpts:
        print(
            "bccguard: no envelope recipients (fix: pass --rcpt, or give the message To/Cc/Bcc)",
            file=sys.stderr,
        )
        return EX_USAGE
    env = Envelope(mail_from=mail_from, rcpt_tos=tuple(rcpts), smtputf8=not data.isascii())
    outcome = evaluate(data, env, cfg.policy)
    v = outcome.verdict
    result: dict[str, Any] = {
        "action": v.action.value,
        "exposure": v.exposure,
        "rule": v.rule,
        "visible": v.visible,
        "visible_external": list(v.visible_external),
        "visible_consumer": v.visible_consumer,
        "external_rcpts": v.external_rcpts,
        "hidden": v.hidden,
        "would": v.would.value if v.would else None,
        "reason": v.reason,
        "signed": v.signed,
    }
    if args.show:
        out_block = parse_header(outcome.message)
        result["headers"] = outcome.message[: out_block.body_offset].decode("utf-8", "surrogateescape")
    if args.json:
        text = json.dumps(result, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable 8-bit bytes in the message: escape, stay valid JSON
            text = json.dumps(result, ensure_ascii=True)
        print(text)
    else:
        _print_human(result, len(rcpts))
    return EX_CHANGED if v.changes_message else EX_OK


def _print_human(r: dict[str, Any], n_rcpts: int) -> None:
    verb = {
        "pass": "would go out unchanged",
        "audit": "would go out unchanged (audit mode: it would be rewritten if enforced)",
        "rewrite": "would be rewritten: external addresses hidden from To/Cc",
        "split": "would be split into one copy per external recipient",
        "quarantine": "would be held in quarantine for an admin",
        "reject": "would be refused",
    }[r["action"]]
    print(f"action:   {r['action']} ({verb})")
    print(f"rule:     {r['rule']}")
    print(f"exposure: {'yes' if r['exposure'] else 'no'}" + (f" - {r['reason']}" if r["reason"] else ""))
    print(
        f"visible:  {r['visible']} distinct addresses, {len(r['visible_external'])} external, "
        f"{r['visible_consumer']} personal mailboxes; {n_rcpts} envelope recipients"
    )
    if r["hidden"]:
        print(f"hidden:   {r['hidden']}")
    if "headers" in r:
        print("\n" + r["headers"].rstrip("\r\n").replace("\r\n", "\n"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
