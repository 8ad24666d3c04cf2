"""The container images built and run for real (podman), as an admin deploys them.

    bccguard image:  client --SMTP--> [bccguard container] --SMTP--> the test's sink on the host
    compose demo:    client --> [Postfix container :25] --content_filter--> [bccguard :10025]
                        --> [Postfix :10026 re-injection] --relayhost--> sink (stands in for mailpit)

deploy/docker/Dockerfile and deploy/docker/postfix/Dockerfile are built unchanged
(`podman build --pull=never` on stand-in base images from Debian's packages:
tests/containers/base-images.sh; no registry is reachable here). The bccguard
container runs as compose.yaml says: UID 10025, read-only root, `cap_drop: ALL`,
no-new-privileges, /tmp on tmpfs, quarantine and spool on named volumes.

How the compose network is reproduced: the bccguard container gets its own
network namespace (slirp4netns, where 10.0.2.2 is the host's loopback) and the
Postfix container joins it, so `postfix`, `bccguard` and their fixed ports (25,
10025, 10026, 9465) are as in compose and never collide with the host's; host
names come from `--add-host`. mailpit's image cannot be fetched here, so
`mailpit` points at the host and Postfix's relayhost port at the test's sink.

Proven here (issue 14, items 11 to 13):
- a 300-customer survey through the image reaches every customer, rewritten;
  the HEALTHCHECK reports healthy; the process is UID 10025 without capabilities
  on a read-only root;
- SIGTERM with a message in DATA: the message finishes with 250 and reaches the
  sink, then the container exits 0;
- quarantine and spool on their volumes outlive the container: a new container on
  the same volumes lists the held message and delivers the spooled copies;
- the compose demo's Postfix image, with the shipped after-queue snippets, hands
  the survey to the bccguard container and relays the rewritten copies on; a
  message bccguard rejects is bounced to its sender with bccguard's reason;
- the image's final stage holds no compiler and no pip.
The image size and the time from `podman run` to healthy are printed (-s).
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_helpers import free_port, poll, require_binary, require_root, to_toml
from podman_helpers import (
    HOST_FROM_CONTAINER,
    LIMITS,
    NETWORK,
    Containers,
    Podman,
    can_run_containers,
    ensure_base_images,
)
from sink import Sink
from test_postfix_e2e import CUSTOMERS, copies_of, header_block, recipients_of, survey

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
EVERYONE = sorted([*CUSTOMERS, "sales@corp.example"])
DEADLINE = 90.0  # seconds any one step may take before the test says which step hung


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    exe = require_binary("podman")
    for binary in ("runc", "slirp4netns", "debootstrap"):
        require_binary(binary)
    require_root("rootful podman with stand-in base images (debootstrap)")
    p = Podman(exe)
    reason = can_run_containers(p)
    if reason is not None:
        pytest.skip(f"podman cannot run containers here: {reason}")
    ensure_base_images(p)
    try:
        yield p
    finally:
        p.remove_images()


@pytest.fixture(scope="module")
def bccguard_image(podman: Podman) -> str:
    """deploy/docker/Dockerfile built unchanged (removed at the end of the module)."""
    return podman.build("deploy/docker/Dockerfile", "bccguard")


@pytest.fixture(scope="module")
def postfix_image(podman: Podman) -> str:
    """deploy/docker/postfix/Dockerfile (the compose demo's Postfix) built unchanged."""
    return podman.build("deploy/docker/postfix/Dockerfile", "postfix")


@pytest.fixture
async def containers(podman: Podman) -> AsyncIterator[Containers]:
    c = Containers(podman)
    try:
        yield c
    finally:
        await c.cleanup()


# ------------------------------------------------------------------ compose.yaml -> podman run


def compose_service(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service: dict[str, Any] = data["services"][name]
    return service


def compose_run_args(service: dict[str, Any]) -> list[str]:
    """The `podman run` flags for a compose service's runtime settings (what compose itself would pass).

    Every key must be one this function translates or one the test supplies
    itself (build, image, ports, volumes, healthcheck from the image, restart
    policy, start order): a key added to compose.yaml later fails here, so the
    test never silently runs a container looser than the demo.
    """
    supplied = {"build", "image", "ports", "volumes", "healthcheck", "restart", "depends_on", "hostname"}
    args: list[str] = []
    for key, value in service.items():
        if key == "user":
            args += ["--user", str(value)]
        elif key == "read_only":
            args += ["--read-only"] if value else []
        elif key == "tmpfs":
            args += [a for path in value for a in ("--tmpfs", path)]
        elif key == "cap_drop":
            args += [a for cap in value for a in ("--cap-drop", cap)]
        elif key == "security_opt":
            args += [a for opt in value for a in ("--security-opt", opt)]
        elif key == "stop_grace_period":
            args += ["--stop-timeout", str(int(re.fullmatch(r"(\d+)s", value).group(1)))]  # type: ignore[union-attr]
        else:
            assert key in supplied, f"compose.yaml key {key!r} is not reproduced by this test"
    return args


def compose_mount(service: dict[str, Any], target: str) -> str:
    """The source compose mounts at `target` (a named volume or a path relative to deploy/docker)."""
    for m in service["volumes"]:
        src, dst = m.split(":")[:2]
        if dst == target:
            return str(src)
    raise AssertionError(f"compose.yaml mounts nothing at {target}")


# ------------------------------------------------------------------ SMTP helpers


def submit(port: int, mail_from: str, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """One transaction (blocking: call through asyncio.to_thread); the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as c:
        c.ehlo("client.test")
        c.mail(mail_from)
        for r in rcpts:
            code, _ = c.rcpt(r)
            assert code == 250, f"RCPT refused with {code}"
        return c.data(data)


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One whole SMTP reply (multi-line joined); b'' if the connection closed first."""
    lines: list[bytes] = []
    while True:
        line = await asyncio.wait_for(reader.readline(), DEADLINE)
        if not line:
            return b"".join(lines)
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


async def banner(port: int) -> bytes:
    """The greeting a new connection gets now (b'' when nothing listens behind the published port)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return b""
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        if line.startswith(b"220"):
            writer.write(b"QUIT\r\n")
            await writer.drain()
        return line
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()


# ------------------------------------------------------------------ running the image


class Relay:
    """One bccguard container: its name, published ports and when `podman run` was called."""

    def __init__(self, name: str, smtp_port: int, metrics_port: int, started: float) -> None:
        self.name, self.smtp_port, self.metrics_port, self.started = name, smtp_port, metrics_port, started


def image_config_for(sink: Sink, tmp_path: Path) -> Path:
    """deploy/docker/bccguard.toml as shipped, but upstream at the host's sink and one quarantine rule.

    Only these two keys differ from the image's file: compose's upstream
    (Postfix) is not part of this test, and the shipped policy has no rule that
    holds mail, which the volume test needs.
    """
    data = tomllib.loads((DOCKER / "bccguard.toml").read_text())
    data["upstream"]["url"] = f"smtp://{HOST_FROM_CONTAINER}:{sink.port}"
    data["policy"]["rules"].append(
        {"name": "hold", "senders": ["*@hold.corp.example"], "action": "quarantine"}
    )
    path = tmp_path / "bccguard.toml"
    path.write_text(to_toml(data))
    path.chmod(0o644)  # read by UID 10025 inside the container
    return path


async def run_relay(
    containers: Containers,
    image: str,
    what: str,
    *,
    config: Path,
    quarantine: str,
    spool: str,
    publish: dict[int, int] | None = None,
    extra: tuple[str, ...] = (),
) -> Relay:
    """The bccguard container as compose.yaml runs it, in its own network namespace."""
    service = compose_service("bccguard")
    smtp_port, metrics_port = free_port(), free_port()
    ports = {smtp_port: 10025, metrics_port: 9465, **(publish or {})}
    name, started = await containers.start(
        what,
        "--network", NETWORK,
        *[a for host, inner in ports.items() for a in ("-p", f"127.0.0.1:{host}:{inner}")],
        *compose_run_args(service),
        "-v", f"{config}:/etc/bccguard/bccguard.toml:ro",
        "-v", f"{quarantine}:/var/lib/bccguard/quarantine",
        "-v", f"{spool}:/var/lib/bccguard/spool",
        *extra,
        image,
    )  # fmt: skip
    return Relay(name, smtp_port, metrics_port, started)


async def wait_healthy(containers: Containers, relay: Relay) -> tuple[float, float]:
    """Until HEALTHCHECK passes and SMTP answers; seconds from `podman run` to each (a reading)."""
    deadline = time.monotonic() + DEADLINE
    healthy_after = 0.0
    while True:
        if await containers.healthy(relay.name):
            healthy_after = time.monotonic() - relay.started
            break
        state = (await containers.inspect(relay.name))["State"]
        if not state["Running"]:
            raise AssertionError(
                f"{relay.name} exited {state['ExitCode']}:\n{await containers.logs(relay.name)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{relay.name} never became healthy:\n{await containers.logs(relay.name)}")
        await asyncio.sleep(0.2)
    await poll_async(lambda: banner(relay.smtp_port), lambda b: b.startswith(b"220"), "the SMTP greeting")
    return healthy_after, time.monotonic() - relay.started


async def poll_async(probe: Any, ok: Any, what: str, within: float = DEADLINE) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.2)


def assert_rewritten(copies: list[Any]) -> None:
    for m in copies:
        head = header_block(m.data)
        assert b"X-BCCGuard: rewritten; hidden=300" in head
        assert not any(c.encode() in head for c in CUSTOMERS), "a customer saw another customer"
        assert b"gmail.com" not in head and b"clients.example" not in head
        assert b"Cc: sales@corp.example" in head
        assert m.data.endswith(b"please answer our survey.\r\n")


# ------------------------------------------------------------------ item 13: the image's contents


def test_image_has_no_compiler_or_pip(podman: Podman, bccguard_image: str) -> None:
    """The final stage carries the venv and Python, no build tools: nothing to compile or install with."""
    probe = (
        "import json, os, shutil, subprocess\n"
        "path = os.environ['PATH'] + ':/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'\n"
        "found = [b for b in ('gcc', 'cc', 'c++', 'g++', 'clang', 'pip', 'pip3', 'pip3.11')"
        " if shutil.which(b, path=path)]\n"
        "for py in ('/opt/bccguard/bin/python', '/usr/local/bin/python', '/usr/bin/python3'):\n"
        "    if os.path.exists(py) and subprocess.run([py, '-c', 'import pip'],"
        " capture_output=True).returncode == 0:\n"
        "        found.append(py + ' -m pip')\n"
        "import bccguard, uvloop\n"
        "print(json.dumps(found))\n"
    )
    r = podman.run(
        "run", "--rm", *LIMITS, "--network", "none", "--entrypoint", "python", bccguard_image, "-c", probe
    )
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found == [], f"build tools in the final image: {found}"

    size = int(podman.run("image", "inspect", "--format", "{{.Size}}", bccguard_image).stdout.strip())
    base = int(podman.run("image", "inspect", "--format", "{{.Size}}", "python:3.11-slim").stdout.strip())
    print(
        f"bccguard image: {size / 1e6:.0f} MB, of which {(size - base) / 1e6:.0f} MB above python:3.11-slim"
    )


# ------------------------------------------------------------------ item 11: the image alone


async def test_survey_through_the_image_rewritten_healthy_confined(
    containers: Containers, bccguard_image: str, sink: Sink, tmp_path: Path
) -> None:
    relay = await run_relay(
        containers,
        bccguard_image,
        "survey",
        config=image_config_for(sink, tmp_path),
        quarantine=await containers.volume("survey-q"),
        spool=await containers.volume("survey-s"),
    )
    healthy_after, smtp_after = await wait_healthy(containers, relay)
    print(f"bccguard container: healthy {healthy_after:.1f}s, SMTP greeting {smtp_after:.1f}s after run")
    info = await containers.inspect(relay.name)
    assert info["State"]["Health"]["Status"] == "healthy"

    # Confined as compose.yaml says: UID 10025, no capabilities, nothing writable but the volumes and /tmp.
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    rc, out, _ = await containers.exec(relay.name, "id", "-u")
    assert (rc, out.strip()) == (0, "10025")
    rc, out, _ = await containers.exec(relay.name, "grep", "^Cap", "/proc/1/status")
    caps = dict(line.split(":\t") for line in out.strip().splitlines())
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == "0000000000000000", out
    rc, _, err = await containers.exec(relay.name, "touch", "/etc/bccguard/x")
    assert rc != 0 and "Read-only file system" in err
    rc, _, _ = await containers.exec(relay.name, "touch", "/var/lib/bccguard/spool/.w", "/tmp/.w")
    assert rc == 0, "the volumes and /tmp are writable"

    code, text = await asyncio.to_thread(
        submit, relay.smtp_port, "news@corp.example", EVERYONE, survey("c1@corp.example")
    )
    assert code == 250, text
    copies = copies_of(sink, "c1@corp.example")
    assert recipients_of(copies) == EVERYONE
    assert_rewritten(copies)
    (processed,) = await containers.events(relay.name, "message_processed")
    assert (processed["action"], processed["reply_code"], processed["hidden"]) == ("rewrite", 250, 300)
    logs = await containers.logs(relay.name)
    assert not any(c in logs for c in CUSTOMERS), "an address in the logs"


async def test_sigterm_with_a_message_in_data_finishes_it_and_exits_0(
    containers: Containers, podman: Podman, bccguard_image: str, sink: Sink, tmp_path: Path
) -> None:
    relay = await run_relay(
        containers,
        bccguard_image,
        "sigterm",
        config=image_config_for(sink, tmp_path),
        quarantine=await containers.volume("sigterm-q"),
        spool=await containers.volume("sigterm-s"),
    )
    await wait_healthy(containers, relay)
    message = survey("t1@corp.example")
    first, rest = message[: len(message) // 2], message[len(message) // 2 :]

    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    try:
        assert (await reply(reader)).startswith(b"220")
        for command, expected in [
            (b"EHLO client.test\r\n", b"250"),
            (b"MAIL FROM:<news@corp.example>\r\n", b"250"),
            *[(f"RCPT TO:<{r}>\r\n".encode(), b"250") for r in EVERYONE],
            (b"DATA\r\n", b"354"),
        ]:
            writer.write(command)
            await writer.drain()
            got = await reply(reader)
            assert got.startswith(expected), (command, got)
        writer.write(first)
        await writer.drain()

        # `podman stop` sends the image's STOPSIGNAL (SIGTERM) and waits up to the grace period.
        stop = asyncio.create_task(podman.arun("stop", "--time", "45", relay.name, timeout=DEADLINE))
        # The drain has begun once nothing accepts new connections any more.
        await poll_async(
            lambda: banner(relay.smtp_port), lambda b: not b.startswith(b"220"), "the listener to close"
        )
        assert not stop.done(), "the container stopped while a message was still in DATA"

        writer.write(rest + b".\r\n")
        await writer.drain()
        final = await reply(reader)
        assert final.startswith(b"250"), final
    finally:
        writer.close()
    await stop
    state = (await containers.inspect(relay.name))["State"]
    assert (state["Running"], state["ExitCode"]) == (False, 0), state
    assert recipients_of(copies_of(sink, "t1@corp.example")) == EVERYONE
    assert_rewritten(copies_of(sink, "t1@corp.example"))
    (stopped,) = [e for e in await containers.events(relay.name, "stopped") if "workers" in e]
    assert set(stopped["codes"]) == {0}, stopped


async def test_quarantine_and_spool_outlive_the_container_on_their_volumes(
    containers: Containers, podman: Podman, bccguard_image: str, sink: Sink, tmp_path: Path
) -> None:
    config = image_config_for(sink, tmp_path)
    quarantine, spool = await containers.volume("keep-q"), await containers.volume("keep-s")
    later = CUSTOMERS[:3]  # the upstream defers these: their copy waits in the spool
    sink.rcpt_replies = {r: "450 4.2.0 mailbox busy, try later" for r in later}

    first = await run_relay(
        containers, bccguard_image, "keep-1", config=config, quarantine=quarantine, spool=spool
    )
    await wait_healthy(containers, first)
    code, text = await asyncio.to_thread(
        submit, first.smtp_port, "news@corp.example", EVERYONE, survey("k1@corp.example")
    )
    assert code == 250 and b"accepted for 298 of 301" in text, text
    code, text = await asyncio.to_thread(
        submit,
        first.smtp_port,
        "news@hold.corp.example",
        CUSTOMERS,
        survey("k2@corp.example", sender="News <news@hold.corp.example>"),
    )
    assert code == 250 and text.startswith(b"2.6.0 Held for review as "), text
    held_id = text.split(b" as ", 1)[1].split(b":", 1)[0].decode()
    assert recipients_of(copies_of(sink, "k1@corp.example")) == sorted(set(EVERYONE) - set(later))

    await podman.arun("stop", "--time", "45", first.name, timeout=DEADLINE)
    assert (await containers.inspect(first.name))["State"]["ExitCode"] == 0
    await containers.remove(first.name)  # an upgrade: a new container on the same volumes

    sink.rcpt_replies = {}
    second = await run_relay(
        containers, bccguard_image, "keep-2", config=config, quarantine=quarantine, spool=spool
    )
    await wait_healthy(containers, second)
    # The spool is retried at once at start-up: the deferred copies arrive, rewritten like the rest.
    await poll(
        lambda: recipients_of(copies_of(sink, "k1@corp.example")) == EVERYONE,
        "the spooled copies delivered by the new container",
        DEADLINE,
    )
    assert_rewritten(copies_of(sink, "k1@corp.example"))
    rc, out, err = await containers.exec(second.name, "bccguard", "quarantine", "list", "--json")
    assert rc == 0, err
    assert [row["id"] for row in json.loads(out)] == [held_id]
    assert copies_of(sink, "k2@corp.example") == [], "a held message is not delivered"


# ------------------------------------------------------------------ item 12: the compose demo's Postfix


async def test_compose_demo_postfix_to_bccguard_to_sink(
    containers: Containers, bccguard_image: str, postfix_image: str, sink: Sink
) -> None:
    """Postfix (shipped after-queue snippets) -> bccguard (shipped image config, unchanged) -> sink."""
    bccguard = compose_service("bccguard")
    postfix = compose_service("postfix")
    # compose publishes Postfix's port 25 on the host; here it is published from the shared namespace.
    (postfix_port_spec,) = postfix["ports"]
    assert postfix_port_spec.endswith(":25")
    smtp_port = free_port()
    relay = await run_relay(
        containers,
        bccguard_image,
        "demo-bccguard",
        config=(DOCKER / compose_mount(bccguard, "/etc/bccguard/bccguard.toml")).resolve(),
        quarantine=await containers.volume("demo-q"),
        spool=await containers.volume("demo-s"),
        publish={smtp_port: 25},
        extra=(
            "--add-host", "postfix:127.0.0.1",
            "--add-host", "bccguard:127.0.0.1",
            "--add-host", f"mailpit:{HOST_FROM_CONTAINER}",
        ),
    )  # fmt: skip
    # The compose file's mailpit takes SMTP on 1025; the sink is on a free port of the host.
    pf_name, _ = await containers.start(
        "demo-postfix",
        "--network", f"container:{relay.name}",
        postfix_image,
        "sh", "-c", f'postconf -e "relayhost = [mailpit]:{sink.port}" && exec postfix start-fg',
    )  # fmt: skip
    await wait_healthy(containers, relay)
    await poll_async(lambda: banner(smtp_port), lambda b: b.startswith(b"220 postfix.docker"), "Postfix")

    # 1. The survey: Postfix -> bccguard -> Postfix -> sink, every customer, rewritten.
    code, text = await asyncio.to_thread(
        submit, smtp_port, "news@corp.example", EVERYONE, survey("d1@corp.example")
    )
    assert code == 250, text
    try:
        await poll(
            lambda: recipients_of(copies_of(sink, "d1@corp.example")) == EVERYONE,
            "the survey delivered through Postfix and bccguard",
            DEADLINE,
        )
    except AssertionError:
        raise AssertionError(await containers.logs(pf_name)) from None
    copies = copies_of(sink, "d1@corp.example")
    assert len(copies) >= 2, "Postfix's default recipient limit of 50 splits the relayed copies"
    assert_rewritten(copies)
    processed = await containers.events(relay.name, "message_processed")
    assert [(e["action"], e["reply_code"]) for e in processed] == [("rewrite", 250)]
    assert processed[0]["rcpts"] == len(EVERYONE), "Postfix handed bccguard the survey in one transaction"
    maillog = await containers.logs(pf_name)
    assert "relay=bccguard[127.0.0.1]:10025" in maillog and "relay=mailpit[" in maillog
    relay_logs = await containers.logs(relay.name)
    assert not any(c in relay_logs for c in CUSTOMERS), "an address in bccguard's logs"

    # 2. A message bccguard rejects: Postfix bounces it to the sender with bccguard's reason.
    await asyncio.to_thread(
        submit,
        smtp_port,
        "ceo@board.corp.example",
        CUSTOMERS,
        survey("d2@corp.example", sender="CEO <ceo@board.corp.example>", subject="Apology"),
    )

    def bounce() -> Any:
        return next(
            (
                m
                for m in sink.messages
                if m.mail_from in ("", "<>") and m.rcpt_tos == ["ceo@board.corp.example"]
            ),
            None,
        )

    await poll(lambda: bounce() is not None, "the bounce to the board sender", DEADLINE)
    text_b = bounce().data.decode("utf-8", "replace")
    assert "5.7.1" in text_b and "bccguard rule board" in text_b
    assert copies_of(sink, "d2@corp.example") == [], "a rejected message reaches no recipient"
