"""The milter's header edits: applying them to the original block gives exactly the relay's block.

Pure tests over `policy/header_edits.py`: hand-written cases for each kind of
edit, the whole corpus through the relay's own rewrite, and hypothesis over
generated messages (the relay's rewrite) and over arbitrary field-list pairs
(the diff in general).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bccguard.config import from_dict
from bccguard.policy.engine import evaluate
from bccguard.policy.header_edits import HeaderEdit, HeaderField, apply_edits, fields_of, header_edits
from bccguard.policy.model import Action, Envelope
from test_fuzz import EXAMPLES, FUZZ, POLICY, messages

CORPUS = Path(__file__).parent / "corpus"
ENV = Envelope(mail_from="news@corp.example", rcpt_tos=("someone@gmail.com",))


def _roundtrip(original: bytes, rewritten: bytes) -> list[HeaderEdit]:
    before, after = fields_of(original), fields_of(rewritten)
    edits = header_edits(before, after)
    assert apply_edits(before, edits) == after
    return edits


def test_survey_rewrite_is_a_change_a_delete_and_an_add() -> None:
    msg = (
        b"From: news@corp.example\r\nTo: a@gmail.com, b@orange.fr\r\nCc: boss@corp.example\r\n"
        b"Bcc: c@gmail.com\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    out = evaluate(msg, ENV, POLICY)
    assert out.verdict.action is Action.REWRITE
    edits = _roundtrip(msg, out.message)
    kinds = [(e.kind, e.name.lower(), e.index) for e in edits]
    assert ("delete", "bcc", 1) in kinds
    assert ("change", "to", 1) in kinds
    assert kinds[-1] == ("add", "x-bccguard", 0)
    assert not any(k == "insert" for k, _, _ in kinds), "the relay only appends: no index-dependent inserts"
    assert edits[kinds.index(("change", "to", 1))].value == b" news@corp.example"


def test_second_occurrence_is_addressed_by_its_index() -> None:
    before = [HeaderField("To", b" a@gmail.com"), HeaderField("Subject", b" x"), HeaderField("TO", b" b@x")]
    after = [HeaderField("To", b" a@gmail.com"), HeaderField("Subject", b" x")]
    edits = header_edits(before, after)
    assert edits == [HeaderEdit("delete", "TO", 2)]
    assert apply_edits(before, edits) == after


def test_deletes_come_highest_index_first() -> None:
    before = [HeaderField("Bcc", b" a"), HeaderField("Bcc", b" b"), HeaderField("X", b" y")]
    edits = header_edits(before, [HeaderField("X", b" y")])
    assert [(e.kind, e.index) for e in edits] == [("delete", 2), ("delete", 1)]


def test_a_field_inserted_mid_block_gets_its_final_position() -> None:
    before = [HeaderField("From", b" f"), HeaderField("Subject", b" s")]
    after = [HeaderField("From", b" f"), HeaderField("To", b" t"), HeaderField("Subject", b" s")]
    edits = header_edits(before, after)
    assert edits == [HeaderEdit("insert", "To", 1, b" t")]
    assert apply_edits(before, edits) == after


def test_an_empty_new_value_is_not_sent_as_a_change() -> None:
    """CHGHEADER with an empty value means delete to an MTA: it must become delete + insert."""
    before = [HeaderField("To", b" a@gmail.com"), HeaderField("X", b" 1")]
    after = [HeaderField("To", b""), HeaderField("X", b" 1")]
    edits = header_edits(before, after)
    assert all(e.kind != "change" for e in edits)
    assert apply_edits(before, edits) == after


CASES = sorted(p for p in CORPUS.iterdir() if p.name.endswith((".eml", ".eml.gz")))


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name.split(".eml")[0])
def test_corpus_rewrites_roundtrip(path: Path) -> None:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    policy = from_dict(
        {"policy": {"consumer_domains": [], "max_visible_external": 0, "internal_domains": ["corp.example"]}}
    ).policy
    out = evaluate(data, ENV, policy)
    _roundtrip(data, out.message)


@settings(FUZZ, max_examples=max(50, EXAMPLES // 5))
@given(messages())
def test_property_edits_reproduce_the_relay_rewrite(msg: bytes) -> None:
    out = evaluate(msg, ENV, POLICY)
    _roundtrip(msg, out.message)


field_lists = st.lists(
    st.builds(
        HeaderField,
        st.sampled_from(["To", "Cc", "to", "Bcc", "Subject", "X-A", "Received"]),
        st.sampled_from([b" a", b" b", b" c\r\n\td", b"", b" a@gmail.com"]),
    ),
    max_size=8,
)


@FUZZ
@given(field_lists, field_lists)
def test_property_any_two_blocks(before: list[HeaderField], after: list[HeaderField]) -> None:
    assert apply_edits(before, header_edits(before, after)) == after
