"""What the console shows of a message: masking and the safe body, as plain functions."""

from __future__ import annotations

import pytest

from bccguard.config import PolicySettings, from_dict
from bccguard.console.view import MASK, Masker, html_to_text


def settings() -> PolicySettings:
    return from_dict({"policy": {"internal_domains": ["corp.example"],
                                 "partner_domains": ["agency.example"]}}).policy.defaults  # fmt: skip


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("To: customer0@gmail.com", f"To: {MASK}@gmail.com"),
        ("To: Bob <bob@clients.example>, sales@corp.example",
         f"To: Bob <{MASK}@clients.example>, sales@corp.example"),
        ("Cc: x@agency.example", "Cc: x@agency.example"),  # partners are not customers
        ("To: jos\u00e9@gmail.com", f"To: {MASK}@gmail.com"),  # UTF-8 local part
        ('To: "john doe"@gmail.com', f"To: {MASK}@gmail.com"),  # quoted local part
        ("To: o'brien@gmail.com", f"To: {MASK}@gmail.com"),
        ("To: a@b\u00fccher.example", f"To: {MASK}@b\u00fccher.example"),  # IDN domain
        ('"c1@gmail.com" <c1@gmail.com>', f'"{MASK}@gmail.com" <{MASK}@gmail.com>'),
        ("To: CUSTOMER@GMAIL.COM", f"To: {MASK}@GMAIL.COM"),
    ],
)
def test_masker_hides_every_external_local_part(text: str, shown: str) -> None:
    m = Masker(settings())
    assert m(text) == shown
    assert m.count == shown.count(MASK)


def test_html_is_shown_as_its_text_without_scripts_or_remote_content() -> None:
    html = (
        "<html><head><title>t</title><style>p{}</style><script>alert(1)</script></head>"
        "<body><p>Hello &amp; welcome</p><img src='http://x.example/p.png' alt='logo'>"
        "<script>steal()</script><a href='javascript:x()'>link</a></body></html>"
    )
    text = html_to_text(html)
    assert "Hello & welcome" in text and "[image: logo (not loaded)]" in text and "link" in text
    assert "alert" not in text and "steal" not in text and "http" not in text and "p{}" not in text
