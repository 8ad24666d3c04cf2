"""The milter edge against a misbehaving MTA: negotiation, answers, and every kind of bad input.

A running bccguard (in-process App, milter listener on a free port or a unix
socket) and a raw MTA side (tests/milter_client.py) that can send what
Postfix never would. The well-behaved MTA is the real Postfix:
tests/test_milter_postfix.py.
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bccguard.app import App
from bccguard.config import milter_listen
from bccguard.milter import codec
from bccguard.milter.session import WANTED_ACTIONS
from bccguard.preflight import StartError
from bccguard.store.quarantine import Quarantine
from conftest import StartRelay, message
from deploy_helpers import RelayProcess, free_port, poll, to_toml
from milter_client import MtaClient
from sink import Sink

CUSTOMERS = [f"c{i}@gmail.com" for i in range(12)]
MILTER_ONLY = {
    "server": {"listen": "", "max_message_size": 50_000, "command_timeout": 5.0},
    "milter": {"listen": "inet:127.0.0.1:0"},
    "policy": {
        "rules": [
            {"name": "board", "senders": ["*@board.corp.example"], "action": "reject"},
            {"name": "legal", "senders": ["*@legal.corp.example"], "action": "quarantine"},
            {"name": "authed", "users": ["alice"], "action": "reject"},
        ]
    },
}


def metric(app: App, name: str, **labels: str) -> float:
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def app(sink: Sink, start_relay: StartRelay) -> App:
    return await start_relay(f"smtp://127.0.0.1:{sink.port}", MILTER_ONLY)


async def client(app: App) -> MtaClient:
    assert app.milter is not None
    return await MtaClient.connect(app.milter.address)


async def a_good_session_still_works(app: App) -> None:
    c = await client(app)
    await c.negotiate()
    await c.envelope("news@corp.example", ["boss@corp.example"])
    answer = await c.message(message(["boss@corp.example"]))
    assert answer == [(codec.CONTINUE, b"")]
    c.close()


async def test_negotiation_asks_only_for_what_it_uses(app: App) -> None:
    c = await client(app)
    await c.negotiate()
    assert WANTED_ACTIONS == codec.SMFIF_ADDHDRS | codec.SMFIF_CHGHDRS | codec.SMFIF_QUARANTINE
    assert c.actions == WANTED_ACTIONS | codec.SMFIF_SETSYMLIST
    # Macros: the queue id and the AUTH user at MAIL, nothing at any other stage.
    lists = c.macro_lists
    assert lists[codec.SMFIM_ENVFROM] == b"i {auth_authen}"
    assert all(lists[stage] == b"" for stage in range(7) if stage != codec.SMFIM_ENVFROM)
    assert c.protocol & codec.SMFIP_HDR_LEADSPC
    for no_reply in (codec.SMFIP_NR_CONN, codec.SMFIP_NR_MAIL, codec.SMFIP_NR_RCPT, codec.SMFIP_NR_HDR):
        assert c.protocol & no_reply
    assert not c.protocol & 0x10 and not c.protocol & 0x20, "never NOBODY/NOHDRS: it needs both"
    c.close()


@pytest.mark.parametrize("leadspc", [True, False])
async def test_rewrite_answers_header_edits(app: App, leadspc: bool) -> None:
    c = await client(app)
    protocol = 0x1FFFFF if leadspc else 0x1FFFFF & ~codec.SMFIP_HDR_LEADSPC
    await c.negotiate(protocol=protocol)
    await c.envelope("news@corp.example", CUSTOMERS)
    answer = await c.message(message(CUSTOMERS, extra="Bcc: hidden@gmail.com"))
    assert answer[-1] == (codec.CONTINUE, b"")
    edits = answer[:-1]
    space = b" " if leadspc else b""
    assert (
        codec.CHGHEADER,
        struct.pack(">I", 1) + b"To\0" + space + b"Marketing <news@corp.example>\0",
    ) in edits
    assert (codec.CHGHEADER, struct.pack(">I", 1) + b"Bcc\0\0") in edits
    assert edits[-1] == (codec.ADDHEADER, b"X-BCCGuard\0" + space + b"rewritten; hidden=12\0")
    assert metric(app, "bccguard_milter_responses_total", response="edit") == 1
    assert metric(app, "bccguard_messages_total", action="rewrite", rule="default") == 1
    c.close()


async def test_without_header_change_rights_it_tempfails_rather_than_pass(app: App) -> None:
    """Never accept a message the core did not get its way with."""
    c = await client(app)
    await c.negotiate(actions=codec.SMFIF_QUARANTINE)
    await c.envelope("news@corp.example", CUSTOMERS)
    ((cmd, data),) = await c.message(message(CUSTOMERS))
    assert cmd == codec.REPLYCODE and data.startswith(b"451 4.3.0")
    assert metric(app, "bccguard_milter_responses_total", response="tempfail") == 1
    c.close()


async def test_reject_is_the_relays_550_text(app: App) -> None:
    c = await client(app)
    await c.negotiate()
    await c.envelope("ceo@board.corp.example", CUSTOMERS)
    ((cmd, data),) = await c.message(message(CUSTOMERS, sender="ceo@board.corp.example"))
    assert cmd == codec.REPLYCODE
    assert data.startswith(b"550 5.7.1 ") and data.endswith(b"(bccguard rule board)\0")
    assert b"@" not in data
    c.close()


async def test_quarantine_is_fsynced_in_bccguard_then_discarded(app: App, tmp_path: Path) -> None:
    c = await client(app)
    await c.negotiate()
    await c.envelope(
        "counsel@legal.corp.example", CUSTOMERS, macros={"auth_authen": "counsel", "i": "ABC123"}
    )
    answer = await c.message(message(CUSTOMERS, sender="counsel@legal.corp.example"))
    assert answer == [(codec.DISCARD, b"")]
    q = Quarantine(tmp_path / "quarantine")
    (entry,) = q.ids()
    env = q.envelope(entry)
    assert env.rcpt_tos == tuple(CUSTOMERS) and env.auth_user == "counsel"
    assert metric(app, "bccguard_milter_responses_total", response="discard") == 1
    c.close()


async def test_several_messages_on_one_connection_and_abort(app: App) -> None:
    c = await client(app)
    await c.negotiate()
    await c.envelope("news@corp.example", ["boss@corp.example"])
    await c.event(codec.HEADER, b"To\0 boss@corp.example\0")
    await c.send(codec.ABORT)  # the client said RSET
    await c.event(codec.MAIL, b"<news@corp.example>\0")
    await c.event(codec.RCPT, b"<boss@corp.example>\0")
    assert await c.message(message(["boss@corp.example"])) == [(codec.CONTINUE, b"")]
    await c.event(codec.MAIL, b"<news@corp.example>\0")
    for r in CUSTOMERS:
        await c.event(codec.RCPT, f"<{r}>".encode() + b"\0")
    assert (await c.message(message(CUSTOMERS)))[-1] == (codec.CONTINUE, b"")
    await c.send(codec.QUIT)
    assert await c.closed()


async def test_packets_split_into_single_bytes_still_decode(app: App) -> None:
    c = await client(app)
    for b in codec.encode(codec.OPTNEG, struct.pack(">III", 6, 0x1FF, 0x1FFFFF)):
        await c.send_raw(bytes([b]))
    cmd, _ = await c.read()
    assert cmd == codec.OPTNEG
    c.close()


@pytest.mark.parametrize(
    ("case", "raw"),
    [
        ("oversize length", struct.pack(">I", 2**31) + b"O"),
        ("zero length", struct.pack(">I", 0)),
        ("unknown command", codec.encode(b"Z", b"whatever")),
        ("header without NUL", codec.encode(codec.HEADER, b"To")),
        ("header before MAIL", codec.encode(codec.HEADER, b"To\0 x\0")),
        ("short negotiation", codec.encode(codec.OPTNEG, b"\0\0\0\6")),
        ("old protocol version", codec.encode(codec.OPTNEG, struct.pack(">III", 2, 0x1FF, 0x7F))),
    ],
)
async def test_bad_packets_end_the_session_with_a_log_line(
    app: App, case: str, raw: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    c = await client(app)
    if case not in ("short negotiation", "old protocol version"):
        await c.negotiate(protocol=0)  # replies expected for everything: nothing hides in NR
    await c.send_raw(raw)
    assert await c.closed(), case
    assert metric(app, "bccguard_milter_errors_total", kind="protocol") == 1
    captured = capsys.readouterr()
    assert "milter_protocol_error" in captured.out + captured.err
    await a_good_session_still_works(app)


async def test_disconnect_mid_message_is_counted_and_harmless(app: App) -> None:
    c = await client(app)
    await c.negotiate()
    await c.envelope("news@corp.example", CUSTOMERS)
    await c.event(codec.HEADER, b"To\0 c1@gmail.com\0")
    c.writer.write(codec.encode(codec.BODY, b"half a bo")[:7])  # and a packet cut in the middle
    c.close()
    await a_good_session_still_works(app)
    assert metric(app, "bccguard_milter_errors_total", kind="disconnect") == 1
    await poll(lambda: metric(app, "bccguard_milter_sessions_active") == 0, "every session closed", 10)
    assert metric(app, "bccguard_milter_sessions_total") == 2


async def test_body_over_max_message_size_is_refused_and_not_kept(app: App) -> None:
    c = await client(app)
    await c.negotiate()
    await c.envelope("news@corp.example", CUSTOMERS)
    big = message(CUSTOMERS, body="x" * 998 + "\r\n") + (b"y" * 998 + b"\r\n") * 60
    ((cmd, data),) = await c.message(big)
    assert (cmd, data) == (codec.REPLYCODE, b"552 5.3.4 Message size exceeds fixed limit\0")
    assert metric(app, "bccguard_milter_errors_total", kind="too_big") == 1
    c.close()
    await a_good_session_still_works(app)


async def test_unix_socket_gets_its_mode(sink: Sink, start_relay: StartRelay, tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    path.write_bytes(b"")  # not a socket: never deleted, the bind fails instead
    with pytest.raises(StartError, match=r"milter\.listen = .*: address already in use"):
        await start_relay(
            f"smtp://127.0.0.1:{sink.port}", {**MILTER_ONLY, "milter": {"listen": f"unix:{path}"}}
        )
    path.unlink()
    extra: dict[str, Any] = {**MILTER_ONLY, "milter": {"listen": f"unix:{path}", "mode": "0600"}}
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", extra)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert app.milter is not None and app.milter.address == f"unix:{path}"
    await a_good_session_still_works(app)


# ---------------------------------------------------------------- fuzz


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=12), st.integers(min_value=5, max_value=100))
def test_decoder_fuzz_only_ever_raises_protocol_errors(chunks: list[bytes], limit: int) -> None:
    d = codec.Decoder(max_size=limit)
    try:
        for chunk in chunks:
            for cmd, data in d.feed(chunk):
                assert len(cmd) == 1 and len(data) < limit
    except codec.MilterProtocolError:
        return
    assert d.pending < limit + 4, "never buffers more than one packet's worth"


packets = st.one_of(
    st.builds(codec.encode, st.sampled_from(sorted(codec.KNOWN_COMMANDS)), st.binary(max_size=30)),
    st.binary(max_size=20),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(packets, max_size=8))
async def test_session_fuzz_never_takes_the_listener_down(app: App, stream: list[bytes]) -> None:
    c = await client(app)
    await c.negotiate()
    await c.send_raw(b"".join(stream))
    await c.send(codec.QUIT)
    await c.closed(timeout=5.0)
    await a_good_session_still_works(app)


async def test_two_workers_share_one_unix_milter_socket(sink: Sink, tmp_path: Path) -> None:
    """`bccguard serve` with workers = 2 and no SMTP listener: the supervisor binds, both serve."""
    sock = tmp_path / "milter.sock"
    mport = free_port()
    cfg = tmp_path / "bccguard.toml"
    cfg.write_text(
        to_toml(
            {
                "server": {"listen": "", "workers": 2, "hostname": "bccguard.test", "shutdown_timeout": 5.0},
                "milter": {"listen": f"unix:{sock}", "mode": "0640"},
                "upstream": {"url": f"smtp://127.0.0.1:{sink.port}"},
                "quarantine": {"path": str(tmp_path / "q")},
                "spool": {"path": str(tmp_path / "s")},
                "metrics": {"listen": f"127.0.0.1:{mport}"},
                "logging": {"format": "json"},
                "policy": {"internal_domains": ["corp.example"]},
            }
        )
    )
    relay = RelayProcess(cfg, tmp_path / "log", name="bccguard")
    relay.start()
    try:
        await asyncio.to_thread(relay.wait_for, lambda: len(relay.events("started")) >= 2, "two workers")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o640
        for _ in range(6):
            c = await MtaClient.connect(f"unix:{sock}")
            await c.negotiate()
            await c.envelope("news@corp.example", CUSTOMERS)
            assert (await c.message(message(CUSTOMERS)))[-1] == (codec.CONTINUE, b"")
            c.close()
        await asyncio.to_thread(
            relay.wait_for, lambda: len(relay.events("message_processed")) == 6, "six messages logged"
        )
        assert {e["action"] for e in relay.events("message_processed")} == {"rewrite"}

        def sessions() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("bccguard_milter_sessions_total")
            )

        assert await asyncio.to_thread(sessions) == 6, "the supervisor adds both workers' counts"
    finally:
        assert await relay.astop() == 0
    assert not sock.exists() or stat.S_ISSOCK(os.stat(sock).st_mode)


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ('[milter]\nlisen = "inet:127.0.0.1:8891"\n', "milter.lisen: unknown key (did you mean 'listen'?)"),
        ('[milter]\nlisten = "tcp:8891"\n', "milter.listen: 'tcp' is not inet or unix"),
        ('[milter]\nlisten = "unix:relative.sock"\n', "is not an absolute path"),
        ('[milter]\nlisten = "inet:127.0.0.1:99999"\n', "bad port"),
        ('[milter]\nquarantine = "postfix"\n', "milter.quarantine: 'postfix' is not bccguard or mta"),
        ('[milter]\nmode = "rw"\n', "milter.mode: 'rw' is not an octal mode"),
        ('[milter]\ngroup = "no-such-group-x"\n', "milter.group: no such group"),
        ('[server]\nlisten = ""\n', "server.listen: empty, and no [milter] listen either"),
    ],
)
def test_milter_config_errors_are_one_line_and_exit_78(tmp_path: Path, toml: str, says: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    proc = subprocess.run(
        [sys.executable, "-m", "bccguard.cli", "config", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 78, proc.stderr
    assert says in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_sendmail_style_listen_spelling_is_accepted() -> None:
    assert milter_listen("inet:8891@127.0.0.1") == ("inet", "127.0.0.1", 8891)
    assert milter_listen("inet6:8891@::1") == ("inet", "::1", 8891)
    assert milter_listen("local:/run/m.sock") == ("unix", "/run/m.sock", 0)


async def test_a_silent_mta_is_cut_after_command_timeout(sink: Sink, start_relay: StartRelay) -> None:
    extra: dict[str, Any] = {**MILTER_ONLY, "server": {**MILTER_ONLY["server"], "command_timeout": 0.3}}
    app = await start_relay(f"smtp://127.0.0.1:{sink.port}", extra)
    c = await client(app)
    await c.negotiate()
    await c.envelope("news@corp.example", CUSTOMERS)
    assert await c.closed(timeout=10.0)
    assert metric(app, "bccguard_milter_errors_total", kind="timeout") == 1


async def test_reload_applies_to_the_next_milter_message(app: App, tmp_path: Path, sink: Sink) -> None:
    """SIGHUP's snapshot swap reaches milter sessions already open, from their next message."""
    c = await client(app)
    await c.negotiate()
    await c.envelope("news@corp.example", CUSTOMERS)
    assert (await c.message(message(CUSTOMERS)))[-1] == (codec.CONTINUE, b"")  # rewritten
    cfg = {
        **MILTER_ONLY,
        "upstream": {"url": f"smtp://127.0.0.1:{sink.port}"},
        "quarantine": {"path": str(tmp_path / "quarantine")},
        "spool": {"path": str(tmp_path / "spool")},
        "metrics": {"listen": ""},
        "policy": {"internal_domains": ["corp.example"], "action": "reject"},
    }
    path = tmp_path / "reloaded.toml"
    path.write_text(to_toml(cfg))
    app.config_path = str(path)
    assert await app.reload() is True
    await c.event(codec.MAIL, b"<news@corp.example>\0")
    for r in CUSTOMERS:
        await c.event(codec.RCPT, f"<{r}>".encode() + b"\0")
    ((cmd, data),) = await c.message(message(CUSTOMERS))
    assert cmd == codec.REPLYCODE and data.startswith(b"550 5.7.1")
    c.close()


async def test_stop_closes_idle_milter_sessions_and_the_listener(app: App) -> None:
    c = await client(app)
    await c.negotiate()
    assert app.milter is not None
    address = app.milter.address
    await app.stop(timeout=2.0)
    assert await c.closed(timeout=5.0), "an idle MTA connection is closed at shutdown"
    with pytest.raises(OSError):
        await MtaClient.connect(address)


def test_a_taken_milter_port_is_one_line_at_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[server]\nlisten = ""\nworkers = 1\n[milter]\nlisten = "inet:127.0.0.1:{port}"\n'
            f'[metrics]\nlisten = ""\n[quarantine]\npath = "{tmp_path}/q"\n[spool]\npath = "{tmp_path}/s"\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "bccguard.cli", "serve", "--config", str(cfg)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert proc.returncode == 1
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("bccguard: cannot start")]
    assert f"milter.listen = 'inet:127.0.0.1:{port}'" in line and "Traceback" not in proc.stderr


async def test_auth_macro_feeds_users_rules_and_does_not_outlive_its_message(app: App) -> None:
    """`{auth_authen}` from the MAIL stage is the envelope's AUTH user, for that message only."""
    c = await client(app)
    await c.negotiate()
    await c.envelope("news@corp.example", CUSTOMERS, macros={"auth_authen": "alice"})
    ((cmd, data),) = await c.message(message(CUSTOMERS))
    assert cmd == codec.REPLYCODE and data.endswith(b"(bccguard rule authed)\0")
    await c.send(codec.MACRO, b"M{mail_addr}\0news@corp.example\0")  # the next MAIL: no AUTH
    await c.event(codec.MAIL, b"<news@corp.example>\0")
    for r in CUSTOMERS:
        await c.event(codec.RCPT, f"<{r}>".encode() + b"\0")
    assert (await c.message(message(CUSTOMERS)))[-1] == (codec.CONTINUE, b"")
    c.close()


async def test_a_flood_of_recipients_is_bounded_like_a_big_body(app: App) -> None:
    c = await client(app)
    await c.negotiate()
    await c.envelope("news@corp.example", [])
    rcpt = codec.encode(codec.RCPT, b"<" + b"r" * 990 + b"@gmail.com>\0")
    await c.send_raw(rcpt * 60)  # 60 KB of recipients, over the 50 KB max_message_size
    ((cmd, data),) = await c.message(message(CUSTOMERS))
    assert (cmd, data) == (codec.REPLYCODE, b"552 5.3.4 Message size exceeds fixed limit\0")
    c.close()
