"""One duration syntax wherever bccguard reads a duration (issue 14 item 1), its edge cases.

Beyond the issue's examples ("30" refused, "30d" taken): the compound forms
other admin tools accept ("1h30m", as Go, Prometheus and systemd do), a
fraction ("1.5h"), zero, a sign, and TOML's `nan` and `inf` (which TOML
allows as numbers, and which would make a timer that never, or always, fires).
Every config key that holds a duration and the CLI's `--older-than` are tried.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bccguard.config import ConfigError, from_dict, load, parse_duration

# Every duration key, and where it sits (delivery_timeout must stay under 600 s).
DURATION_KEYS = [
    ("server", "command_timeout"),
    ("server", "data_timeout"),
    ("server", "shutdown_timeout"),
    ("upstream", "timeout"),
    ("upstream", "delivery_timeout"),
    ("upstream", "pool_idle"),
    ("spool", "max_age"),
    ("console", "session_ttl"),
    ("console", "login_window"),
]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1.5h", 5400.0),
        ("2w1d", 15 * 86400.0),
        ("1m30s", 90.0),
        ("90M", 5400.0),
        (" 45 s ", 45.0),
    ],
)
def test_compound_and_fractional_durations_are_read(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0s", "not a positive duration"),
        ("0h0m", "not a positive duration"),
        ("-5m", "not a positive duration"),
        ("+5m", "is not a duration"),
        ("1h30", "is not a duration"),
        ("1h-30m", "is not a duration"),
        ("5m5m", "is not a duration"),  # a unit twice is a typo, not 10 minutes
        ("30m1h", "is not a duration"),  # largest unit first, as everywhere else
        ("nan", "is not a duration"),
        ("inf", "is not a duration"),
        ("", "is not a duration"),
        (math.nan, "not a positive duration"),
        (math.inf, "not a finite duration"),
        (-math.inf, "not a positive duration"),
        (0, "not a positive duration"),
        (-300, "not a positive duration"),
    ],
)
def test_bad_durations_are_refused_with_the_forms_that_work(value: str | float, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_duration(value)


@pytest.mark.parametrize(("section", "key"), DURATION_KEYS, ids=[k for _, k in DURATION_KEYS])
def test_every_duration_key_reads_compound_forms_and_refuses_nan_and_inf(
    tmp_path: Path, section: str, key: str
) -> None:
    cfg_file = tmp_path / "bccguard.toml"
    cfg_file.write_text(f'[{section}]\n{key} = "1m30s"\n')
    assert getattr(getattr(load(cfg_file), section), key) == 90.0
    for number in ("nan", "inf", "-inf", "0", "-1.5"):
        cfg_file.write_text(f"[{section}]\n{key} = {number}\n")
        with pytest.raises(ConfigError) as err:
            load(cfg_file)
        assert f"{section}.{key}" in str(err.value), number
        assert "\n" not in str(err.value)


def test_retry_schedule_refuses_nan_and_zero_steps() -> None:
    assert from_dict({"spool": {"retry_schedule": ["1m30s", "1.5h"]}}).spool.retry_schedule == (90.0, 5400.0)
    for bad in ([math.nan], ["0s"], ["1m", math.inf]):
        with pytest.raises(ConfigError, match=r"spool\.retry_schedule"):
            from_dict({"spool": {"retry_schedule": bad}})


def _purge(tmp_path: Path, age: str) -> subprocess.CompletedProcess[str]:
    cfg_file = tmp_path / "bccguard.toml"
    cfg_file.write_text(
        f'[quarantine]\npath = "{tmp_path / "q"}"\n[spool]\npath = "{tmp_path / "s"}"\n'
        '[policy]\ninternal_domains = ["corp.example"]\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "bccguard.cli", "quarantine", "purge", f"--older-than={age}",
         "--dry-run", "--config", str(cfg_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("age", ["1h30m", "1.5h"])
def test_purge_takes_the_compound_forms(tmp_path: Path, age: str) -> None:
    done = _purge(tmp_path, age)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("age", ["0s", "-5m", "1h30", "nan"])
def test_purge_refuses_zero_negative_and_unitless_in_one_line(tmp_path: Path, age: str) -> None:
    done = _purge(tmp_path, age)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert "--older-than" in line and "30d" in line
