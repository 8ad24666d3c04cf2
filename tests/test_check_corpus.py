"""`bccguard check --json` over every hard case of the address corpus, as a sender would run it.

With no internal domains every visible address is external, so the JSON's
`visible_external` must be exactly the corpus' distinct expected addr-specs,
sorted — proving the CLI reports what the parser found, for every case.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bccguard.policy.model import person_key

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(p for p in CORPUS.iterdir() if p.name.endswith((".eml", ".eml.gz")))


def _case_id(p: Path) -> str:
    return p.name.split(".eml")[0]


@pytest.mark.parametrize("path", CASES, ids=_case_id)
def test_check_json_over_the_corpus(path: Path, tmp_path: Path) -> None:
    expected = json.loads((CORPUS / f"{_case_id(path)}.expected.json").read_text("utf-8"))
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    eml = tmp_path / "case.eml"
    eml.write_bytes(data)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[policy]\nconsumer_domains = []\nmax_visible_external = 0\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bccguard.cli",
            "check",
            str(eml),
            "--config",
            str(cfg),
            "--json",
            "--mail-from",
            "sender@corp.example",
            "--rcpt",
            "someone@outside.example",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"Traceback" not in proc.stderr
    # the 1 MB case lists only its first and last addresses, and how many
    visible = expected.get("visible", [])
    want = sorted({_key(a["addr_spec"]) for a in visible if a["valid"]})
    unparsed = sorted({a["addr_spec"] for a in visible if not a["valid"]})
    count = expected.get("count")
    if proc.returncode == 2:  # no header fields at all: bad input, said in one line
        assert want == [] and proc.stderr.count(b"\n") == 1 and b"no header fields" in proc.stderr
        return
    assert proc.returncode in (0, 1), proc.stderr
    proc.stdout.decode("utf-8")  # valid UTF-8, whatever bytes the message held (issue 13 item 9)
    result = json.loads(proc.stdout)
    if "reply" in result:  # bare CR/LF or NUL: the relay refuses it at DATA, and check says so (item 8)
        assert result["reply"].startswith(("550 5.6.0", "554 5.6.0")) and proc.returncode == 1
        assert expected.get("refused") is True
        return
    assert "refused" not in expected
    if count is not None:
        assert len(result["visible_external"]) == count
        want = result["visible_external"]
        for a in expected["head"] + expected["tail"]:
            assert a["addr_spec"] in want
    assert result["visible_external"] == want
    assert result["unparsed"] == _fffd(unparsed)
    assert result["exposure"] is bool(want or unparsed)
    assert (proc.returncode == 1) is bool(want or unparsed)


def _key(addr_spec: str) -> str:
    """The canonical form check prints: one spelling per person (issue 13 items 4 and 9)."""
    local, _, domain = addr_spec.rpartition("@")
    return person_key(local, domain)


def _fffd(texts: list[str]) -> list[str]:
    """What undecodable bytes look like in check's JSON: U+FFFD."""
    return [t.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for t in texts]
