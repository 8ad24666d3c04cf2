"""TLS in and out, and SMTP AUTH: tried as an attacker on loopback would, with real servers.

The relay listens with a self-signed certificate; clients are the stdlib's
smtplib (in a thread) or raw sockets when the exact bytes matter.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import smtplib
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bccguard.app import App
from bccguard.smtp.auth import Credentials, hash_password
from conftest import StartRelay, message, send, talk
from sink import Sink, self_signed_cert, server_tls_context

SRC = str(Path(__file__).resolve().parents[1] / "src")
CUSTOMERS = [f"c{i}@gmail.com" for i in range(5)]


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "tls"
    d.mkdir()
    return self_signed_cert(d, "127.0.0.1")


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    # ln=10: the cheapest parameters the loader accepts, so tests stay fast.
    p = tmp_path / "users"
    p.write_text(
        f"alice:{hash_password('wonderland', ln=10)}\n"
        f"eve@marketing.corp.example:{hash_password('s3cret', ln=10)}\n"
    )
    return p


def tls_extra(tls_files: tuple[Path, Path], auth_file: Path | None = None, **server: Any) -> dict[str, Any]:
    cert, key = tls_files
    srv: dict[str, Any] = {"tls": {"cert": str(cert), "key": str(key)}, **server}
    if auth_file is not None:
        srv["auth_file"] = str(auth_file)
    return {"server": srv}


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def _open(port: int, source: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0) if source else None
    )
    assert (await reader.readline()).startswith(b"220 ")
    return reader, writer


async def _starttls(writer: asyncio.StreamWriter, cert: Path) -> None:
    await writer.start_tls(client_context(cert), server_hostname="127.0.0.1")


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


# ------------------------------------------------------------------ STARTTLS and AUTH


async def test_auth_before_starttls_is_refused_with_538(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path], auth_file: Path
) -> None:
    app = await start_relay(sink.url, tls_extra(tls_files, auth_file))
    reader, writer = await _open(app.port)
    try:
        ehlo = await talk(reader, writer, b"EHLO c.test\r\n")
        assert b"250-STARTTLS" in ehlo
        assert not any(b"AUTH" in line for line in ehlo), "AUTH must not be offered in clear text"
        reply = await talk(reader, writer, b"AUTH PLAIN " + plain("alice", "wonderland") + b"\r\n")
        assert reply == [b"538 5.7.11 Encryption required for requested authentication mechanism"]
        assert (await talk(reader, writer, b"STARTTLS\r\n"))[0].startswith(b"220")
        await _starttls(writer, tls_files[0])
        ehlo = await talk(reader, writer, b"EHLO c.test\r\n")
        assert b"250-AUTH LOGIN PLAIN" in ehlo and b"250-STARTTLS" not in ehlo
        reply = await talk(reader, writer, b"AUTH PLAIN " + plain("alice", "wonderland") + b"\r\n")
        assert reply == [b"235 2.7.0 Authentication successful"]
    finally:
        writer.close()


async def test_no_auth_file_means_no_auth_offered_even_over_tls(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path]
) -> None:
    app = await start_relay(sink.url, tls_extra(tls_files))
    reader, writer = await _open(app.port)
    try:
        await talk(reader, writer, b"EHLO c.test\r\n")
        await talk(reader, writer, b"STARTTLS\r\n")
        await _starttls(writer, tls_files[0])
        ehlo = await talk(reader, writer, b"EHLO c.test\r\n")
        assert not any(b"AUTH" in line for line in ehlo)
        reply = await talk(reader, writer, b"AUTH PLAIN " + plain("alice", "wonderland") + b"\r\n")
        assert reply[0].startswith(b"504 5.5.4")
    finally:
        writer.close()


def _auth_send(port: int, cert: Path, user: str, password: str, source: str, data: bytes,
               rcpts: list[str]) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0)) as c:
        c.ehlo("client.test")
        c.starttls(context=client_context(cert))
        c.ehlo("client.test")
        c.login(user, password)
        return c.sendmail("news@corp.example", rcpts, data)


async def test_outsider_relays_only_after_auth_over_tls(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path], auth_file: Path
) -> None:
    """permit_mynetworks + permit_sasl_authenticated: 127.0.0.2 is outside allowed_networks."""
    app = await start_relay(
        sink.url, tls_extra(tls_files, auth_file, allowed_networks=["127.0.0.1/32"])
    )
    data = message(["alice@corp.example"])
    with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
        await send(app.port, "news@corp.example", ["alice@corp.example"], data, source="127.0.0.2")
    code, text = err.value.recipients["alice@corp.example"]
    assert code == 554 and text.startswith(b"5.7.1") and b"@" not in text
    assert sink.messages == []
    refused = await asyncio.to_thread(
        _auth_send, app.port, tls_files[0], "alice", "wonderland", "127.0.0.2", data, ["alice@corp.example"]
    )
    assert refused == {}
    assert [m.rcpt_tos for m in sink.messages] == [["alice@corp.example"]]
    assert sink.messages[0].original == data


async def test_policy_rules_match_the_authenticated_user(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path], auth_file: Path
) -> None:
    extra = tls_extra(tls_files, auth_file)
    extra["policy"] = {
        "rules": [{"name": "marketing", "users": ["*@marketing.corp.example"], "action": "reject"}]
    }
    app = await start_relay(sink.url, extra)
    data = message(CUSTOMERS)
    # alice matches no rule: the default rewrite hides the customers
    await asyncio.to_thread(_auth_send, app.port, tls_files[0], "alice", "wonderland", "127.0.0.1", data,
                            CUSTOMERS)
    assert b"gmail.com" not in sink.messages[0].data.partition(b"\r\n\r\n")[0]
    # the marketing user's rule rejects, and the reply names the rule, not the user
    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(_auth_send, app.port, tls_files[0], "eve@marketing.corp.example", "s3cret",
                                "127.0.0.1", data, CUSTOMERS)
    assert err.value.smtp_code == 550 and b"rule marketing" in err.value.smtp_error
    assert b"@" not in err.value.smtp_error
    assert len(sink.messages) == 1


async def test_failed_auth_is_535_counted_and_limited_per_session(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path], auth_file: Path
) -> None:
    app = await start_relay(sink.url, tls_extra(tls_files, auth_file, max_auth_failures=3))
    registry = app.metrics.registry
    reader, writer = await _open(app.port)
    try:
        await talk(reader, writer, b"EHLO c.test\r\n")
        await talk(reader, writer, b"STARTTLS\r\n")
        await _starttls(writer, tls_files[0])
        await talk(reader, writer, b"EHLO c.test\r\n")
        for creds in (plain("alice", "wrong"), plain("nobody", "wonderland")):
            reply = await talk(reader, writer, b"AUTH PLAIN " + creds + b"\r\n")
            assert reply == [b"535 5.7.8 Authentication credentials invalid"]
        # LOGIN, the third failure: 535 then 421, and the connection is closed
        assert (await talk(reader, writer, b"AUTH LOGIN\r\n"))[0].startswith(b"334 ")
        assert (await talk(reader, writer, base64.b64encode(b"alice") + b"\r\n"))[0].startswith(b"334 ")
        writer.write(base64.b64encode(b"nope") + b"\r\n")
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest.splitlines() == [
            b"535 5.7.8 Authentication credentials invalid",
            b"421 4.7.0 Too many failed authentication attempts, closing connection",
        ]
    finally:
        writer.close()
    assert registry.get_sample_value("bccguard_smtp_connections_total", {"result": "refused_auth"}) == 3


async def test_auth_login_works_and_cancel_gets_one_reply(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path], auth_file: Path
) -> None:
    app = await start_relay(sink.url, tls_extra(tls_files, auth_file))
    reader, writer = await _open(app.port)
    try:
        await talk(reader, writer, b"EHLO c.test\r\n")
        await talk(reader, writer, b"STARTTLS\r\n")
        await _starttls(writer, tls_files[0])
        await talk(reader, writer, b"EHLO c.test\r\n")
        assert (await talk(reader, writer, b"AUTH PLAIN\r\n"))[0] == b"334 "
        # "*" cancels (RFC 4954 4): one reply, and the session goes on
        assert await talk(reader, writer, b"*\r\n") == [b"501 5.7.0 Auth aborted"]
        assert (await talk(reader, writer, b"NOOP\r\n"))[0].startswith(b"250")
        await talk(reader, writer, b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n")
        reply = await talk(reader, writer, base64.b64encode(b"wonderland") + b"\r\n")
        assert reply == [b"235 2.7.0 Authentication successful"]
        assert (await talk(reader, writer, b"AUTH PLAIN x\r\n"))[0].startswith(b"503 5.5.1")
    finally:
        writer.close()


async def test_require_tls_refuses_mail_before_starttls(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    app = await start_relay(sink.url, {"server": {"tls": {"cert": str(cert), "key": str(key),
                                                          "require_tls": True}}})
    reader, writer = await _open(app.port)
    try:
        await talk(reader, writer, b"EHLO c.test\r\n")
        reply = await talk(reader, writer, b"MAIL FROM:<a@corp.example>\r\n")
        assert reply == [b"530 5.7.0 Must issue a STARTTLS command first"]
    finally:
        writer.close()
    refused = await asyncio.to_thread(_tls_send, app.port, cert, message(["b@corp.example"]))
    assert refused == {} and len(sink.messages) == 1


def _tls_send(port: int, cert: Path, data: bytes) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.starttls(context=client_context(cert))
        return c.sendmail("a@corp.example", ["b@corp.example"], data)


async def test_protocol_floor_refuses_older_tls(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    app = await start_relay(sink.url, {"server": {"tls": {"cert": str(cert), "key": str(key),
                                                          "min_version": "TLSv1.3"}}})
    reader, writer = await _open(app.port)
    old = client_context(cert)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        await talk(reader, writer, b"EHLO c.test\r\n")
        await talk(reader, writer, b"STARTTLS\r\n")
        # the server refuses the handshake (seen as an SSL alert or a reset, by timing)
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await writer.start_tls(old, server_hostname="127.0.0.1")
    finally:
        writer.close()
    # a TLS 1.3 client is served, and the relay still works for everyone
    assert await asyncio.to_thread(_tls_send, app.port, cert, message(["b@corp.example"])) == {}


def _peer_cert_digest(port: int, cafile: Path) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.starttls(context=client_context(cafile))
        der = c.sock.getpeercert(binary_form=True)
        c.noop()
        return hashlib.sha256(der).hexdigest()


async def test_sighup_reload_serves_the_new_certificate_to_new_sessions(
    tmp_path: Path, sink: Sink, tls_files: tuple[Path, Path]
) -> None:
    from bccguard.config import load

    cert, key = tls_files
    conf = tmp_path / "bccguard.toml"
    conf.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nhostname = "bccguard.test"\n'
        f'[server.tls]\ncert = "{cert}"\nkey = "{key}"\n'
        f'[upstream]\nurl = "{sink.url}"\n[metrics]\nlisten = ""\n'
        f'[quarantine]\npath = "{tmp_path / "q"}"\n[spool]\npath = "{tmp_path / "s"}"\n'
    )
    from prometheus_client import CollectorRegistry

    from bccguard.app import rule_names
    from bccguard.ops.metrics import Metrics

    cfg = load(conf)
    metrics = Metrics(registry=CollectorRegistry(), rules=rule_names(cfg))
    app = App(cfg, config_path=str(conf), metrics=metrics)
    await app.start()
    try:
        before = await asyncio.to_thread(_peer_cert_digest, app.port, cert)
        # renew: a new certificate at the same paths, then SIGHUP's reload
        old_cert = cert.read_bytes()
        new_dir = tmp_path / "renewed"
        new_dir.mkdir()
        new_cert, new_key = self_signed_cert(new_dir, "127.0.0.1")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        assert cert.read_bytes() != old_cert
        assert await app.reload()
        after = await asyncio.to_thread(_peer_cert_digest, app.port, cert)
        assert before != after
        # a broken key on disk: the reload is refused and the current certificate stays
        key.write_text("not a key")
        assert not await app.reload()
        assert await asyncio.to_thread(_peer_cert_digest, app.port, cert) == after
    finally:
        await app.stop(timeout=2.0)


async def test_passwd_cli_writes_a_file_the_relay_authenticates_against(
    tmp_path: Path, start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path]
) -> None:
    users = tmp_path / "secrets" / "users"
    env = {**os.environ, "PYTHONPATH": SRC}
    short = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bccguard.cli", "passwd", "--file", str(users), "alice"],
        input="elevenchars\n", capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert short.returncode == 2 and "at least 12" in short.stderr and len(short.stderr.splitlines()) == 1
    assert not users.exists()
    first, second = "first-password", "second-password"
    for user, password in (("alice", first), ("bob", "bob-the-builder"), ("alice", second)):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bccguard.cli", "passwd", "--file", str(users), user],
            input=password + "\n", capture_output=True, text=True, env=env, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    text = users.read_text()
    assert "second" not in text and "first" not in text and "builder" not in text
    assert sorted(Credentials.load(users).users) == ["alice", "bob"]
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bccguard.cli", "passwd", "--file", str(users), "a:b"],
        input="x\n", capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert bad.returncode == 2 and "user name" in bad.stderr

    app = await start_relay(sink.url, tls_extra(tls_files, users, allowed_networks=["10.0.0.0/8"]))
    data = message(["b@corp.example"])
    with pytest.raises(smtplib.SMTPAuthenticationError):
        await asyncio.to_thread(_auth_send, app.port, tls_files[0], "alice", first, "127.0.0.1", data,
                                ["b@corp.example"])
    await asyncio.to_thread(_auth_send, app.port, tls_files[0], "alice", second, "127.0.0.1", data,
                            ["b@corp.example"])
    assert len(sink.messages) == 1


# ------------------------------------------------------------------ TLS to the upstream


@pytest.fixture
async def tls_sink(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    d = tmp_path / "upstream-tls"
    d.mkdir()
    cert, key = self_signed_cert(d, "127.0.0.1")
    ctx = server_tls_context(cert, key)
    kind = request.param
    s = Sink(starttls=ctx) if kind == "starttls" else Sink(implicit_tls=ctx)
    await s.start()
    yield s, cert
    await s.stop()


@pytest.mark.parametrize("tls_sink", ["starttls", "smtps"], indirect=True)
async def test_upstream_certificate_is_verified_by_default(start_relay: StartRelay, tls_sink: Any) -> None:
    sink, cert = tls_sink
    data = message(["b@corp.example"])
    app = await start_relay(sink.url)  # self-signed and not trusted: must fail
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(app.port, "a@corp.example", ["b@corp.example"], data)
    assert err.value.smtp_code == 451 and err.value.smtp_error.startswith(b"4.4.1")
    assert sink.messages == []
    assert app.metrics.registry.get_sample_value("bccguard_upstream_failures_total", {"kind": "tls"}) == 1

    trusting = await start_relay(sink.url, {"upstream": {"ca_file": str(cert)}})
    assert await send(trusting.port, "a@corp.example", ["b@corp.example"], data) == {}
    assert [m.original for m in sink.messages] == [data]

    opted_out = await start_relay(sink.url, {"upstream": {"verify_tls": False}})
    assert await send(opted_out.port, "a@corp.example", ["b@corp.example"], data) == {}
    assert len(sink.messages) == 2


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_a_successful_auth_logs_no_warning(
    start_relay: StartRelay, sink: Sink, tls_files: tuple[Path, Path], auth_file: Path,
    caplog: pytest.LogCaptureFixture, mechanism: str,
) -> None:  # fmt: skip
    """aiosmtpd said "Session.login_data is deprecated" at WARNING on every AUTH: alert noise."""
    import logging

    caplog.set_level(logging.DEBUG)
    app = await start_relay(sink.url, tls_extra(tls_files, auth_file, allowed_networks=["10.0.0.0/8"]))
    data = message(["b@corp.example"])

    def auth_send() -> None:
        with smtplib.SMTP("127.0.0.1", app.port, timeout=20) as c:
            c.starttls(context=client_context(tls_files[0]))
            c.ehlo("client.test")
            if mechanism == "PLAIN":
                c.login("alice", "wonderland")
            else:
                c.user, c.password = "alice", "wonderland"  # what login() would set for auth_login
                c.auth("LOGIN", c.auth_login, initial_response_ok=False)
            c.sendmail("news@corp.example", ["b@corp.example"], data)

    await asyncio.to_thread(auth_send)
    assert len(sink.messages) == 1
    assert [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING] == []
