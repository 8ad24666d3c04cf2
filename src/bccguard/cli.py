"""`bccguard` command line: serve, validate config, dry-run a message.

User mistakes (a bad config, a missing file, a port in use) print one line
that names the problem and the fix, never a traceback. Exit codes: 0 ok,
1 "the message would be changed/held/refused" (check) or a runtime failure,
2 bad input, 74 the output could not be written (EX_IOERR), 78 bad configuration
(EX_CONFIG, what systemd and sysexits know).
`config check` exits 78 also for what `serve` would refuse outside the file
(a listen host that does not resolve, a directory it cannot write), and
`--deep` 1 when the upstream does not answer. README.md has the whole table.

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
from typing import Any, TextIO, cast

from bccguard import __version__
from bccguard.config import Config, ConfigError, load

EX_OK, EX_CHANGED, EX_USAGE, EX_CONFIG = 0, 1, 2, 78
EX_IOERR = 74  # sysexits.h: the output could not be written (a full disk under `> file`)
# AUTH lets a client relay from anywhere, and the port answers whoever can connect; the password
# is the only factor. An admin sets it for a mail client (it is typed once, so long costs nothing).
MIN_PASSWORD = 12


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

    serve = sub.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. The flags below override the config file (and are kept on SIGHUP).",
    )
    _config_arg(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="SMTP listen address (server.listen)")
    serve.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help='metrics/health address (metrics.listen; "" disables)'
    )
    serve.add_argument(
        "--upstream", metavar="URL", help="where accepted mail goes (upstream.url), e.g. smtp://127.0.0.1:10026"
    )
    serve.add_argument(
        "--internal-domain", metavar="DOMAIN", action="append", dest="internal_domains",
        help="a colleagues' domain, repeatable; replaces policy.internal_domains",
    )  # fmt: skip

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    check_cfg = cfg_sub.add_parser(
        "check",
        help="validate a config file and what it points at; change nothing",
        description="Exit 0: serve would start with it; 78: it would not (one line per problem); "
        "1: --deep only, the upstream did not answer.",
    )
    _config_arg(check_cfg)
    check_cfg.add_argument(
        "--deep", action="store_true", help="also connect to the upstream (EHLO, TLS, ca_file)"
    )

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
        help="envelope recipient, repeatable (default: every To, Cc, Bcc, Resent-To, Resent-Cc "
        "and Resent-Bcc address)",
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

    check.add_argument(
        "--internal-domain", metavar="DOMAIN", action="append", dest="internal_domains",
        help="a colleagues' domain, repeatable; replaces policy.internal_domains (as serve's flag)",
    )  # fmt: skip
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--show", action="store_true", help="print the header block as it would leave")
    report = sub.add_parser(
        "report",
        help="what the relay would do with a batch of stored messages (Maildir, mbox, directory)",
        description="Each message is checked as `bccguard check` does (envelope: From and every "
        "To/Cc/Bcc/Resent-* address). Prints the messages enforcement would change and a summary; "
        "counts only, never an address. Exit 0; 2: a path cannot be read.",
    )
    report.add_argument("paths", nargs="+", metavar="PATH", help="Maildir, mbox file, directory or .eml")
    _config_arg(report)
    report.add_argument("--json", action="store_true", help="print one JSON object: summary and messages")
    report.add_argument("--all", action="store_true", help="list every message, not only the changed ones")
    report.add_argument(
        "--glob", default="*", metavar="PATTERN", help="in directories, read only these file names"
    )
    _quarantine_parser(sub)
    _console_parser(sub)
    return parser


def _console_parser(sub: Any) -> None:
    c = sub.add_parser("console", help="serve the quarantine console (web) on console.listen")
    _config_arg(c)
    u = sub.add_parser(
        "console-user",
        help="manage console accounts: add, remove, list",
        description="Accounts live in console.users_file (or --file). Roles: reviewer (list, view, "
        "release) and admin (also delete, purge, view raw).",
    )
    u_sub = u.add_subparsers(dest="console_user_command", metavar="SUBCOMMAND")
    add = u_sub.add_parser("add", help="add an account or change its role and password "
                           "(asks twice on a terminal, else reads one line of stdin)")  # fmt: skip
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", required=True, choices=["reviewer", "admin"])
    remove = u_sub.add_parser("remove", help="remove an account (its sessions end at once)")
    remove.add_argument("name", metavar="NAME")
    for p in (add, remove, u_sub.add_parser("list", help="list accounts and roles")):
        _config_arg(p)
        p.add_argument("--file", metavar="F", help="users file (default: console.users_file of --config)")


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
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rewrite", action="store_true", help="hide external addresses first (policy in force)")
    how.add_argument(
        "--split", action="store_true", help="one copy per external recipient, as the split action sends"
    )
    _config_arg(p)
    p = q_sub.add_parser("delete", help="remove a held message without delivering it")
    p.add_argument("id", metavar="ID")
    _config_arg(p)
    p = q_sub.add_parser("purge", help="remove messages held longer than a duration")
    p.add_argument(
        "--older-than", required=True, metavar="AGE",
        help='a duration with its unit: "30d", "12h", "90m", "45s", "2w"',
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (needed without a terminal)")
    _config_arg(p)


class _OutputFailed(Exception):
    """Writing to stdout failed. Not an OSError on purpose: the `except OSError` that
    reports a store's failure ("... on /var/lib/bccguard/quarantine") must not catch
    it, or a full disk under `> listing.txt` reads as a full quarantine."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.exc = exc


class _Guarded:
    """A stream whose write/flush failures become _OutputFailed; the rest is the stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> int:
        try:
            return int(self._stream.write(data))
        except OSError as exc:
            raise _OutputFailed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise _OutputFailed(exc) from None

    @property
    def buffer(self) -> _Guarded:  # `quarantine show --raw` writes bytes
        return _Guarded(self._stream.buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _output_failed(failed: _OutputFailed, code: int) -> int:
    """`code` when the reader closed the pipe (it has what it wanted); else one line and 74."""
    _stdout_closed()
    if isinstance(failed.exc, BrokenPipeError):
        return code
    from bccguard.preflight import errno_words

    print(f"bccguard: cannot write the output: {errno_words(failed.exc)}", file=sys.stderr)
    return EX_IOERR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    saved = sys.stdout
    # Started with stdout closed (`>&-`): nobody reads it, as with a closed pipe.
    stream = saved if saved is not None else Path(os.devnull).open("w")  # noqa: SIM115 - for the process
    sys.stdout = cast(TextIO, _Guarded(stream))
    try:
        code = _run(parser, args)
        try:
            sys.stdout.flush()  # here, not in the interpreter's exit, where a failure is a traceback
        except _OutputFailed as failed:
            return _output_failed(failed, code)
        return code
    finally:
        sys.stdout = saved


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "config" and args.config_command == "check":
            return cmd_config_check(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "passwd":
            return cmd_passwd(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "quarantine" and args.quarantine_command:
            return cmd_quarantine(args)
        if args.command == "console":
            return cmd_console(args)
        if args.command == "console-user" and args.console_user_command:
            return cmd_console_user(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"bccguard: config error: {problem}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except _OutputFailed as failed:  # `bccguard quarantine list | head`: what was asked for is done
        return _output_failed(failed, EX_OK)
    parser.print_help(sys.stderr)
    return EX_USAGE


def cmd_quarantine(args: argparse.Namespace) -> int:
    from bccguard import review  # lazy: serve and check need none of it

    cfg = load(args.config)
    try:
        match args.quarantine_command:
            case "list":
                return review.cmd_list(cfg, as_json=args.json, out=sys.stdout)
            case "show":
                return review.cmd_show(cfg, args.id, raw=args.raw, out=sys.stdout)
            case "release":
                return review.cmd_release(
                    cfg, args.id, rewrite=args.rewrite, split=args.split, out=sys.stdout
                )
            case "delete":
                return review.cmd_delete(cfg, args.id, out=sys.stdout)
            case _:
                return _purge(cfg, args)
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


def cmd_console(args: argparse.Namespace) -> int:
    from bccguard.console.server import run
    from bccguard.ops.logs import configure

    cfg = load(args.config)
    configure(cfg.logging.level, cfg.logging.format, log_addresses=cfg.logging.log_addresses)
    return run(cfg)


def cmd_console_user(args: argparse.Namespace) -> int:
    """Add, remove or list console accounts; the password never touches argv."""

    from bccguard.console import accounts as acc

    path = args.file or (load(args.config).console.users_file if args.config else "")
    if not path:
        print("bccguard: no users file (fix: pass --file F, or --config F with console.users_file set)",
              file=sys.stderr)  # fmt: skip
        return EX_USAGE
    try:
        if args.console_user_command == "list":
            for a in sorted(acc.load(path).values(), key=lambda a: a.name):
                print(f"{a.name}\t{a.role}")
            return EX_OK
        problem = acc.name_problem(args.name)
        if problem is not None:
            print(f"bccguard: bad name {args.name!r}: {problem}", file=sys.stderr)
            return EX_USAGE
        if args.console_user_command == "remove":
            if not acc.remove(path, args.name):
                print(f"bccguard: no account {args.name} in {path} (fix: see console-user list)",
                      file=sys.stderr)  # fmt: skip
                return EX_USAGE
            print(f"{path}: removed {args.name} (their console sessions end at once)")
            return EX_OK
        password = _read_password(args.name)
        if password is None:
            return EX_USAGE
        existed = acc.add(path, args.name, args.role, password)
    except acc.AccountsError as exc:
        print(f"bccguard: {exc}", file=sys.stderr)
        return EX_USAGE
    except OSError as exc:
        print(f"bccguard: cannot update {path}: {exc.strerror or exc} (fix: run as the console's user)",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"{path}: {'updated' if existed else 'added'} {args.name} ({args.role})")
    return EX_OK
def _purge(cfg: Config, args: argparse.Namespace) -> int:
    """Purge with a question on a terminal; without one, only with --yes (or --dry-run)."""
    from bccguard import review

    review.purge_age(args.older_than)  # a bad duration is the first thing to hear about
    confirm = None
    if not (args.dry_run or args.yes):
        if not sys.stdin.isatty():
            print(
                "bccguard: purge deletes held mail for good and there is no terminal to ask "
                "(fix: pass --yes, or --dry-run to list what would go)",
                file=sys.stderr,
            )
            return EX_USAGE
        confirm = _ask
    return review.cmd_purge(cfg, args.older_than, dry_run=args.dry_run, confirm=confirm, out=sys.stdout)


def _ask(question: str) -> bool:
    sys.stdout.flush()
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_config_check(args: argparse.Namespace) -> int:
    """Would `serve` start with this file, as this user, here? Changes nothing.

    Beyond the file itself: the TLS certificate and key load, the AUTH users
    load, the listen host names resolve, and the quarantine, spool and
    Maildir directories exist or can be created, writable by this user.
    `--deep` also talks to the upstream (connect, EHLO, its TLS and ca_file).
    """
    from bccguard import preflight
    from bccguard.app import check_loadable

    cfg = load(args.config)
    check_loadable(cfg)  # a cert, key, ca_file or users file that does not load is a config error
    problems = [
        p
        for p in (
            preflight.listen_problem("server.listen", cfg.server.listen),
            cfg.metrics.listen and preflight.listen_problem("metrics.listen", cfg.metrics.listen),
            *(preflight.dir_problem(key, path) for key, path in preflight.state_dirs(cfg)),
        )
        if p
    ]
    if problems:
        raise ConfigError([f"{cfg.source}: {p}" for p in problems])
    _warn(cfg)
    print(f"{cfg.source}: ok ({len(cfg.policy.rules)} rules, upstream {cfg.upstream.url.partition(':')[0]})")
    if args.deep:
        return _probe_upstream(cfg)
    return EX_OK


def _probe_upstream(cfg: Config) -> int:
    """`config check --deep`: one real conversation with the upstream, as the relay would start it."""
    from bccguard.config import upstream_parts
    from bccguard.upstream import UpstreamError, open_upstream

    if upstream_parts(cfg.upstream.url)[0] == "maildir":
        print("upstream maildir: a directory, checked above (nothing to connect to)")
        return EX_OK

    async def probe() -> None:
        upstream = open_upstream(cfg.upstream, hostname=cfg.server.hostname)
        try:
            await asyncio.wait_for(upstream.probe(), cfg.upstream.timeout)
        finally:
            await upstream.close()

    try:
        asyncio.run(probe())
    except UpstreamError as exc:
        print(f"bccguard: upstream.url = {cfg.upstream.url!r}: {exc} (fix: check the upstream is up, "
              "and upstream.url, ca_file and verify_tls)", file=sys.stderr)  # fmt: skip
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"bccguard: upstream.url = {cfg.upstream.url!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"upstream {cfg.upstream.url}: answered")
    return EX_OK


def serve_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """`serve --listen ...` as TOML-shaped data for config.load, and as flags for the workers."""
    data: dict[str, Any] = {}
    flags: list[str] = []
    for flag, section, key in (
        ("--listen", "server", "listen"),
        ("--metrics-listen", "metrics", "listen"),
        ("--upstream", "upstream", "url"),
    ):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            data.setdefault(section, {})[key] = value
            flags += [flag, value]
    if args.internal_domains:
        data["policy"] = {"internal_domains": args.internal_domains}
        for domain in args.internal_domains:
            flags += ["--internal-domain", domain]
    return data, flags


def cmd_serve(args: argparse.Namespace) -> int:
    from bccguard import preflight
    from bccguard.ops.logs import configure, get_logger
    from bccguard.workers import WorkerRole, WorkerStartFailed

    overrides, flags = serve_overrides(args)
    cfg: Config = load(args.config, overrides)
    configure(cfg.logging.level, cfg.logging.format, log_addresses=cfg.logging.log_addresses)
    worker = WorkerRole.from_env()
    if worker is None:  # said once, by the supervisor or the single relay
        for warning in preflight.policy_warnings(cfg):
            get_logger("bccguard").warning("policy_warning", problem=warning)
    try:
        if worker is None:  # the supervisor or a single relay; workers find them made
            for key, path in preflight.prepare_dirs(cfg):
                get_logger("bccguard").info("directory_created", key=key, path=str(path), uid=os.geteuid())
        if cfg.server.workers > 1 and worker is None:
            from bccguard.app import check_loadable
            from bccguard.workers import Supervisor

            check_loadable(cfg)  # before any worker: one line, exit 78, as a single relay says it
            return Supervisor(cfg, config_path=args.config, serve_args=flags).run()
        return _serve_one(cfg, args.config, worker, overrides)
    except preflight.StartError as exc:
        print(f"bccguard: cannot start: {exc}", file=sys.stderr)
        return 1
    except WorkerStartFailed as exc:
        print(f"bccguard: cannot start: {exc}", file=sys.stderr)
        return EX_CONFIG if exc.code == EX_CONFIG else 1
    except OSError as exc:  # not one of the sockets or paths preflight knows: name what we can
        where = f" on {exc.filename}" if exc.filename else ""
        print(f"bccguard: cannot start: {preflight.errno_words(exc)}{where}", file=sys.stderr)
        return 1


def _serve_one(cfg: Config, config_path: str | None, worker: Any, overrides: dict[str, Any]) -> int:
    from bccguard.app import App, loop_factory

    async def run() -> int:
        app = App(cfg, config_path=config_path, worker=worker, overrides=overrides or None)
        return await app.run()

    with asyncio.Runner(loop_factory=loop_factory(cfg.server.event_loop)) as runner:
        return runner.run(run())


def _read_password(name: str) -> str | None:
    """A new password for `name`: asked twice on a terminal, else one line of stdin; None: refused.

    One rule for SMTP AUTH users (`passwd`) and console accounts (`console-user
    add`): at least MIN_PASSWORD characters, since anyone who reaches either
    port may guess, and the password never touches argv.
    """
    import getpass

    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != password:
            print("bccguard: the passwords differ; nothing changed", file=sys.stderr)
            return None
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        print(
            f"bccguard: the password has {len(password)} characters, at least {MIN_PASSWORD} are needed "
            "(fix: a longer one; anyone who reaches the port may guess); nothing changed",
            file=sys.stderr,
        )
        return None
    return password


def cmd_passwd(args: argparse.Namespace) -> int:
    """Add or update one user of the AUTH credentials file; the password never touches argv."""

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
    password = _read_password(args.user)
    if password is None:
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

    domains = args.internal_domains
    cfg = load(args.config, {"policy": {"internal_domains": domains}} if domains else None)
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
    if not block.fields and not block.late:
        print(f"bccguard: {args.file} has no header fields (fix: pass an RFC 5322 message)", file=sys.stderr)
        return EX_USAGE
    mail_from = args.mail_from
    if mail_from is None:
        sender = first_from(block)
        mail_from = sender.address.addr_spec if sender is not None and sender.address.valid else ""
    rcpts = args.rcpt
    if rcpts is None:
        # Who a sending client would put in RCPT TO: every routing address of
        # the recipient fields (Resent-* too: a re-sent newsletter addresses
        # its Resent-To); never text seen in a display name.
        rcpts = list(
            dict.fromkeys(
                a.addr_spec
                for a in header_recipients(block, ENVELOPE_FIELDS)
                if a.valid and not a.in_text
            )
        )
    if not rcpts:
        print(
            "bccguard: no envelope recipients (fix: pass --rcpt, or give the message To/Cc/Bcc)",
            file=sys.stderr,
        )
        return EX_USAGE
    refused = refusal(data)
    if refused is not None:
        return _print_result(args, _refused_result(refused, len(rcpts)), len(rcpts), EX_CHANGED)
    env = Envelope(mail_from=mail_from, rcpt_tos=tuple(rcpts), smtputf8=not data.isascii())
    outcome = evaluate(data, env, cfg.policy, _scan(data, env, cfg))
    v = outcome.verdict
    result: dict[str, Any] = {
        "action": v.action.value,
        "exposure": v.exposure,
        "rule": v.rule,
        "visible": v.visible,
        "visible_external": list(v.visible_external),
        "unparsed": list(v.unparsed),
        "visible_consumer": v.visible_consumer,
        "external_rcpts": v.external_rcpts,
        "hidden": v.hidden,
        "would": v.would.value if v.would else None,
        "reason": v.reason,
        "signed": v.signed,
    }
    if v.dlp is not None:
        from bccguard.policy.dlp.verdict import summary

        result["dlp"] = summary(v.dlp, places=True)
    if args.show:
        out_block = parse_header(outcome.message)
        result["headers"] = outcome.message[: out_block.body_offset].decode("utf-8", "surrogateescape")
    _warn(cfg)
    return _print_result(args, result, len(rcpts), EX_CHANGED if v.changes_message else EX_OK)


def _warn(cfg: Config) -> None:
    """One stderr line per policy warning (a verdict on stdout stays machine-readable)."""
    from bccguard.preflight import policy_warnings

    for warning in policy_warnings(cfg):
        print(f"bccguard: warning: {warning}", file=sys.stderr)


def _stdout_closed() -> None:
    """The reader closed our stdout: point it at /dev/null so the exit flush stays quiet.

    The recipe of the Python docs (signal module, "Note on SIGPIPE"): Python
    ignores SIGPIPE, so a write raises BrokenPipeError, and the interpreter's
    own flush at exit would raise it again and print a traceback.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _scan(data: bytes, env: Any, cfg: Any) -> Any:
    """The relay's customer-data scan, run here in-process (same extraction, same detectors)."""
    from bccguard.policy.decide import select_rule
    from bccguard.scan import in_scope, scan_now

    _, settings = select_rule(cfg.policy, env)
    return scan_now(data, settings) if in_scope(env, settings) else None


ENVELOPE_FIELDS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")


def refusal(data: bytes) -> str | None:
    """The relay's DATA refusal for these bytes (bare CR/LF, over-long body line), or None.

    A file whose lines all end in LF alone is how mail sits on disk: a client
    sends it with CRLF, so it is judged that way. A CR anywhere means the
    file carries its wire line endings, and a bare CR or LF among them is
    what the relay refuses with `550 5.6.0`.
    """
    from bccguard.smtp.server import check_content

    wire = data if b"\r" in data else data.replace(b"\n", b"\r\n")
    return check_content(wire)


def _refused_result(reply: str, n_rcpts: int) -> dict[str, Any]:
    return {
        "action": "reject",
        "exposure": False,
        "rule": "smtp",
        "visible": 0,
        "visible_external": [],
        "unparsed": [],
        "visible_consumer": 0,
        "external_rcpts": 0,
        "hidden": 0,
        "would": None,
        "reason": f"refused at DATA before any policy: {reply}",
        "reply": reply,
        "signed": False,
    }


def json_text(result: Any) -> str:
    """One JSON document that is valid UTF-8 whatever the message held.

    Header bytes that are not UTF-8 travel as lone surrogates
    (surrogateescape); they become U+FFFD here, never `\\udcxx` escapes
    that strict JSON parsers refuse.
    """
    text = json.dumps(result, ensure_ascii=False)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _print_result(args: argparse.Namespace, result: dict[str, Any], n_rcpts: int, code: int) -> int:
    try:
        if args.json:
            print(json_text(result))
        else:
            _print_human(result, n_rcpts)
        sys.stdout.flush()
    except _OutputFailed as failed:  # `check m.eml | head -1`: the reader has it; the verdict stands
        return _output_failed(failed, code)
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from bccguard.report import ReportError, as_json, render_table, report

    cfg = load(args.config)
    try:
        rows = report(args.paths, cfg.policy, args.glob)
    except ReportError as exc:
        print(f"bccguard: {exc}", file=sys.stderr)
        return EX_USAGE
    if args.json:
        print(json_text(as_json(rows)))
    else:
        render_table(rows, sys.stdout, all_rows=args.all)
    return EX_OK


def _print_human(r: dict[str, Any], n_rcpts: int) -> None:
    verb = {
        "pass": "would go out unchanged",
        "audit": "would go out unchanged (audit mode: recorded"
        + (", it would be rewritten if enforced)" if r["would"] else ")"),
        "rewrite": "would be rewritten: external addresses hidden from To/Cc",
        "split": "would be split into one copy per external recipient",
        "quarantine": "would be held in quarantine for an admin",
        "reject": "would be refused",
    }[r["action"]]
    if "reply" in r:
        verb = f"would be refused by the relay: {r['reply']}"
    print(f"action:   {r['action']} ({verb})")
    print(f"rule:     {r['rule']}")
    print(f"exposure: {'yes' if r['exposure'] else 'no'}" + (f" - {r['reason']}" if r["reason"] else ""))
    print(
        f"visible:  {r['visible']} distinct addresses, {len(r['visible_external'])} external, "
        f"{r['visible_consumer']} personal mailboxes; {n_rcpts} envelope recipients"
    )
    if r.get("unparsed"):
        n = len(r["unparsed"])
        print(f"text:     {n} piece(s) of To/Cc text with an '@' but no address (each counted as external)")
    if r["hidden"]:
        print(f"hidden:   {r['hidden']}")
    if "dlp" in r:
        d = r["dlp"]
        counts = ", ".join(f"{k} {n}" for k, n in d["counts"].items()) or "nothing"
        print(f"customer data: {counts}" + (f" ({d['level']} volume)" if d["level"] else ""))
        for where, c in d["places"].items():
            print(f"  {where}: " + ", ".join(f"{k} {n}" for k, n in c.items()))
        if d.get("unreadable"):
            print(f"  unreadable parts: {d['unreadable']}")
        if d.get("over_limit"):
            print(f"  scan limits reached: {', '.join(d['over_limit'])}")
    if "headers" in r:
        print("\n" + r["headers"].rstrip("\r\n").replace("\r\n", "\n"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
