"""HTML -> the text a reader sees, with table cells kept apart by tabs.

The stdlib parser is enough: no rendering, no scripts, just the text nodes,
line breaks where blocks end, and tables as tab-separated lines so a pasted
customer table in an HTML mail keeps its shape for the table detector.
"""

from __future__ import annotations

from html.parser import HTMLParser

_BLOCKS = frozenset((
    "p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
    "section", "article", "header", "footer", "blockquote", "pre",
))  # fmt: skip
_SKIP = frozenset(("script", "style", "head", "title", "template"))


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag in ("td", "th"):
            self.out.append("\t")
        elif tag in _BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCKS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(" ".join(data.split()) if "\n" in data else data)


def html_to_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    parser.close()
    lines = ("".join(parser.out)).split("\n")
    # A row starts with a tab (its first <td>): drop that one, keep the separators between cells.
    return "\n".join(line[1:] if line.startswith("\t") else line for line in lines if line.strip())
