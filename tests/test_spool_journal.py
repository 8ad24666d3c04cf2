"""The spool's per-entry journal: one fsync'ed line per delivered copy, O(1) per copy.

Reading an entry is its JSON copies minus the ones its journal names; these
tests build the states a crash can leave on disk and check that no copy is
lost and only the one in the write window can go twice.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import bccguard.store.spool as spool_mod
from bccguard.policy.split import CopySpec
from bccguard.store.durable import append_record, list_ids, read_records, remove_entry
from bccguard.store.spool import Copy, Spool


def split_entry(tmp_path: Path, n: int = 5) -> tuple[Spool, str]:
    spool = Spool(tmp_path / "spool")
    spool.open()
    specs = [CopySpec(rcpts=(f"c{i}@x.example",), to=f"c{i}@x.example") for i in range(n)]
    return spool, spool.put_split(b"Subject: hi\r\n\r\nbody\r\n", "s@corp.example", specs, {"v": 1})


def pending(spool: Spool, entry_id: str) -> list[str]:
    return [r for c in spool.entry(entry_id).copies for r in c.rcpts]


def journal(spool: Spool, entry_id: str) -> Path:
    return spool.path / f"{entry_id}.done"


def test_delivered_copies_are_journaled_and_left_out(tmp_path: Path) -> None:
    spool, eid = split_entry(tmp_path)
    json_before = (spool.path / f"{eid}.json").read_bytes()
    copies = spool.entry(eid).copies
    assert [c.n for c in copies] == [0, 1, 2, 3, 4]
    spool.delivered(eid, copies[0])
    spool.delivered(eid, copies[2])
    assert journal(spool, eid).read_bytes() == b"0\n2\n"
    assert (spool.path / f"{eid}.json").read_bytes() == json_before  # O(1): the JSON is not touched
    assert pending(spool, eid) == ["c1@x.example", "c3@x.example", "c4@x.example"]
    assert journal(spool, eid).stat().st_mode & 0o777 == 0o600
    # the journal does not confuse listings
    assert list_ids(spool.path) == [eid] and spool.depth() == 1 and len(spool.entries()) == 1


def test_torn_last_line_is_ignored_and_cut_before_the_next_append(tmp_path: Path) -> None:
    spool, eid = split_entry(tmp_path, n=20)
    copies = spool.entry(eid).copies
    spool.delivered(eid, copies[0])
    with journal(spool, eid).open("ab") as f:
        f.write(b"1")  # the relay died writing "12\n": copy 12 is the one in the window
    assert "c12@x.example" in pending(spool, eid) and "c1@x.example" in pending(spool, eid)
    spool.delivered(eid, copies[7])  # glued on, "1" + "7\n" would say copy 17 went
    assert journal(spool, eid).read_bytes() == b"0\n7\n"
    left = pending(spool, eid)
    assert "c17@x.example" in left and "c12@x.example" in left and "c1@x.example" in left
    assert "c7@x.example" not in left and len(left) == 18


def test_unknown_and_garbled_journal_lines_match_nothing(tmp_path: Path) -> None:
    spool, eid = split_entry(tmp_path)
    # a later-reached block of a torn append reads as zeros, never as other digits
    journal(spool, eid).write_bytes(b"99\n\x00\x003\nabc\n-1\n 2\n\n4\n")
    assert pending(spool, eid) == [f"c{i}@x.example" for i in range(4)]
    assert read_records(tmp_path / "absent") == []
    with pytest.raises(ValueError, match="one line"):
        append_record(journal(spool, eid), b"1\n2\n")


def test_rewrite_goes_first_then_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, eid = split_entry(tmp_path)
    copies = list(spool.entry(eid).copies)
    spool.delivered(eid, copies[0])
    spool.delivered(eid, copies[1])
    stale = journal(spool, eid).read_bytes()

    seen: list[bool] = []
    real = spool_mod.atomic_write

    def watching(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
        seen.append(journal(spool, eid).exists())  # the journal must outlive the old JSON
        real(path, data, sync_dir=sync_dir)

    monkeypatch.setattr(spool_mod, "atomic_write", watching)
    later = [spool.deferred(c, "451 busy") for c in copies[2:]]
    written = spool.update(eid, later)
    assert seen == [True] and not journal(spool, eid).exists()
    assert [c.n for c in written] == [2, 3, 4]
    assert [c.attempts for c in spool.entry(eid).copies] == [1, 1, 1]

    # the relay died between the two: the journal's lines name copies the JSON no longer has
    journal(spool, eid).write_bytes(stale)
    assert pending(spool, eid) == ["c2@x.example", "c3@x.example", "c4@x.example"]


def test_new_copies_never_reuse_a_journaled_number(tmp_path: Path) -> None:
    spool, eid = split_entry(tmp_path, n=3)
    copies = spool.entry(eid).copies
    spool.delivered(eid, copies[2])
    stale = journal(spool, eid).read_bytes()
    written = spool.update(eid, [copies[0], Copy(rcpts=("extra@x.example",))])
    assert [c.n for c in written] == [0, 3]
    journal(spool, eid).write_bytes(stale)  # a crash kept the old journal
    assert pending(spool, eid) == ["c0@x.example", "extra@x.example"]
    with pytest.raises(ValueError, match="journal number"):
        spool.delivered(eid, Copy(rcpts=("x@x.example",)))


def test_a_failed_part_outlives_the_delivery_of_its_retried_part(tmp_path: Path) -> None:
    """One copy split into a 5xx part (awaiting its DSN) and a 4xx part: both keep n."""
    spool, eid = split_entry(tmp_path, n=2)
    c = spool.entry(eid).copies[1]
    bad = replace(c, rcpts=("bad@x.example",), failed="5.1.1 550 5.1.1 unknown")
    busy = spool.deferred(replace(c, rcpts=("busy@x.example",)), "451 busy")
    spool.update(eid, [bad, busy])
    spool.delivered(eid, spool.entry(eid).copies[1])  # the busy part goes later
    (left,) = spool.entry(eid).copies
    assert left.failed and left.rcpts == ("bad@x.example",)  # its DSN is not lost


def test_entries_written_before_the_journal(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    base = {"mail_from": "s@corp.example", "created": 1.0, "smtputf8": False, "origin": ""}
    v2 = {**base, "id": "v2", "version": 2, "kind": "split", "render": {"v": 1},
          "copies": [{"rcpts": [f"c{i}@x.example"], "to": f"c{i}@x.example"} for i in range(3)]}  # fmt: skip
    v1 = {**base, "id": "v1", "rcpt_tos": ["a@x.example", "b@x.example"], "attempts": 2}
    for m in (v1, v2):
        (spool.path / f"{m['id']}.eml").write_bytes(b"\r\n")
        (spool.path / f"{m['id']}.json").write_text(json.dumps(m))

    (one,) = spool.entry("v1").copies
    assert (one.n, one.rcpts, one.attempts) == (0, ("a@x.example", "b@x.example"), 2)
    assert not (spool.path / "v2.done").exists()
    old = spool.entry("v2").copies
    assert [c.n for c in old] == [0, 1, 2]  # by position until a rewrite records the numbers
    spool.delivered("v2", old[1])
    assert pending(spool, "v2") == ["c0@x.example", "c2@x.example"]
    stale = (spool.path / "v2.done").read_bytes()
    spool.update("v2", [spool.deferred(old[2], "451"), old[0]])  # order changes; numbers stay
    (spool.path / "v2.done").write_bytes(stale)
    meta = json.loads((spool.path / "v2.json").read_bytes())
    assert [c["n"] for c in meta["copies"]] == [2, 0] and meta["next_n"] == 3
    assert pending(spool, "v2") == ["c2@x.example", "c0@x.example"]
    spool.update("v1", [replace(one, attempts=3)])
    assert "rcpt_tos" not in json.loads((spool.path / "v1.json").read_bytes())
    assert spool.entry("v1").copies[0].n == 0


def test_removal_takes_the_journal_and_orphans_are_not_listed(tmp_path: Path) -> None:
    spool, eid = split_entry(tmp_path)
    spool.delivered(eid, spool.entry(eid).copies[0])
    spool.done(eid)
    assert sorted(p.name for p in spool.path.iterdir()) == []
    # a crash inside remove_entry after the .json went: the leftovers list as nothing
    (spool.path / "20240101T000000-abc.done").write_bytes(b"1\n")
    (spool.path / "20240101T000000-abc.eml").write_bytes(b"x")
    assert list_ids(spool.path) == [] and spool.entries() == []
    remove_entry(spool.path, "20240101T000000-abc")
    assert list(spool.path.iterdir()) == []


def test_last_copy_removes_the_entry_through_update(tmp_path: Path) -> None:
    spool, eid = split_entry(tmp_path, n=2)
    c0, c1 = spool.entry(eid).copies
    spool.delivered(eid, c0)
    assert spool.update(eid, []) == []
    assert list(spool.path.iterdir()) == []
