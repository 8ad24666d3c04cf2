"""SIGHUP reloads and readiness as an admin reads them in the log.

A listen change reverted before any restart needs no restart; a reload or a
readiness check that fails says the exception's type and message, so
"ModuleNotFoundError: No module named ..." is in the log, not only "error".
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from bccguard.app import App, rule_names
from bccguard.config import load
from bccguard.ops.http import OpsServer
from bccguard.ops.metrics import Metrics
from sink import Sink


async def test_reverting_a_listen_change_does_not_ask_for_a_restart(tmp_path: Path, sink: Sink) -> None:
    conf = tmp_path / "bccguard.toml"

    def write(listen: str) -> None:
        conf.write_text(
            f'[server]\nlisten = "{listen}"\n[upstream]\nurl = "{sink.url}"\n[metrics]\nlisten = ""\n'
            f'[quarantine]\npath = "{tmp_path / "q"}"\n[spool]\npath = "{tmp_path / "s"}"\n'
            '[policy]\ninternal_domains = ["corp.example"]\n'
        )

    write("127.0.0.1:0")
    cfg = load(conf)
    metrics = Metrics(registry=CollectorRegistry(), rules=rule_names(cfg))
    app = App(cfg, config_path=str(conf), metrics=metrics)
    await app.start()
    try:
        with capture_logs() as logs:
            write("127.0.0.1:1")  # moved: needs a restart
            assert await app.reload()
            write("127.0.0.1:0")  # moved back before any restart
            assert await app.reload()
    finally:
        await app.stop(timeout=2.0)
    warned = [e for e in logs if e["event"] == "reload_listen_unchanged"]
    assert len(warned) == 1 and warned[0]["configured"] == "127.0.0.1:1"
    assert [e["event"] for e in logs].count("reloaded") == 2


async def test_a_reload_that_raises_logs_the_exception_type_and_message(tmp_path: Path, sink: Sink) -> None:
    conf = tmp_path / "bccguard.toml"
    quarantine = tmp_path / "q"
    conf.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[upstream]\nurl = "{sink.url}"\n[metrics]\nlisten = ""\n'
        f'[quarantine]\npath = "{quarantine}"\n[spool]\npath = "{tmp_path / "s"}"\n'
    )
    cfg = load(conf)
    metrics = Metrics(registry=CollectorRegistry(), rules=rule_names(cfg))
    app = App(cfg, config_path=str(conf), metrics=metrics)
    await app.start()
    try:
        blocker = tmp_path / "file"
        blocker.write_text("")
        conf.write_text(conf.read_text().replace(str(quarantine), str(blocker / "q")))
        with capture_logs() as logs:
            assert not await app.reload()  # the store cannot be opened under a file
    finally:
        await app.stop(timeout=2.0)
    (failed,) = [e for e in logs if e["event"] == "reload_failed"]
    assert failed["error"] == "NotADirectoryError" and "Not a directory" in failed["problem"]


def test_a_readiness_check_that_raises_logs_type_and_message(caplog: pytest.LogCaptureFixture) -> None:
    def readiness() -> tuple[bool, str]:
        raise ModuleNotFoundError("No module named 'bccguard.app'")  # pip replaced the package under it

    ops = OpsServer("127.0.0.1:0", Metrics(registry=CollectorRegistry(), rules=["default"]), readiness)
    ops.start()
    caplog.set_level(logging.ERROR)
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{ops.port}/readyz", timeout=10)
        assert err.value.code == 503
        assert err.value.read() == b"readiness check raised an error (ModuleNotFoundError)\n"
    finally:
        ops.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert "readiness check raised ModuleNotFoundError: No module named 'bccguard.app'" in messages

