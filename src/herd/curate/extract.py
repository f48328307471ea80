"""HTML -> plain text, as the paper asks: the main content without navigation, footers and
banners; code blocks with their lines; math as TeX (MathML annotations, MathJax scripts) and
the alt text of images (formulas are often images); no markdown markers.

trafilatura finds the main content and returns it as its XML tree; `linearize` writes that tree
as plain text (trafilatura's own "txt" output carries markdown: "- " items, "![alt](src)",
"| cell |" tables)."""

from __future__ import annotations

import re

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

CONTAINERS = {"list", "table", "div", "main", "doc", "body"}  # hold blocks, no text of their own
BLOCKS = CONTAINERS | {"head", "p", "item", "code", "quote", "row", "cell"}


CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([\w-]+)""", re.IGNORECASE)


def decode_html(raw: bytes) -> str | None:
    """The page's text: UTF-8, else the charset it declares, else the one its bytes look like;
    None if undecodable."""
    import cchardet

    declared = CHARSET.search(raw[:4096])
    guesses = ["utf-8", declared and declared.group(1).decode("ascii"),
               cchardet.detect(raw)["encoding"]]  # fmt: skip
    for encoding in filter(None, guesses):
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
    return None


def _tex_scripts(html: str) -> str:
    """MathJax keeps TeX in <script type="math/tex">, which extractors drop with the scripts."""
    return re.sub(
        r'<script[^>]*type="math/tex[^"]*"[^>]*>(.*?)</script>',
        lambda m: f"<span>\\({m.group(1)}\\)</span>",
        html,
        flags=re.DOTALL | re.IGNORECASE,
    )


def linearize(node, out: list[str]) -> None:
    """Append the plain-text lines of trafilatura's XML `node` to `out`: one line per block
    (heading, paragraph, list item, table row), code blocks line by line, images as alt text."""
    tag = node.tag
    if tag == "code" and "\n" in "".join(node.itertext()):
        out.extend("".join(node.itertext()).strip("\n").split("\n"))
        return
    if tag == "row":
        cells = [" ".join("".join(c.itertext()).split()) for c in node]
        out.append("\t".join(c for c in cells if c))
        return
    if tag in CONTAINERS:
        for child in node:
            linearize(child, out)
        return
    line = [node.text or ""]

    def flush() -> None:
        text = " ".join("".join(line).split())
        if text:
            out.append(text)
        line.clear()

    for child in node:
        inline_code = child.tag == "code" and "\n" not in "".join(child.itertext())
        if child.tag in BLOCKS and not inline_code:  # a block in a block (a list in an item)
            flush()
            linearize(child, out)
        elif child.tag == "lb":
            flush()
        else:
            line.append(_inline(child))
        line.append(child.tail or "")
    flush()


def _inline(node) -> str:
    if node.tag == "graphic":
        return f" {node.get('alt', '')} "
    parts = [node.text or ""]
    for child in node:
        parts += [_inline(child), child.tail or ""]
    return "".join(parts)


def html_to_text(html: str, favor_recall: bool = True) -> str:
    """The main content of a page as plain text ('' when there is none)."""
    import trafilatura
    from lxml import etree

    xml = trafilatura.extract(
        _tex_scripts(html),
        output_format="xml",
        include_comments=False,
        include_tables=True,
        include_images=True,
        include_formatting=False,
        include_links=False,
        deduplicate=False,
        favor_recall=favor_recall,
    )
    if not xml:
        return ""
    root = etree.fromstring(xml.encode())
    lines: list[str] = []
    for part in root:
        if part.tag != "comments":
            linearize(part, lines)
    text = "\n".join(line.rstrip() for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class Extract(BaseFilter):
    """HTML documents -> their main content as plain text (code, math and alt text kept)."""

    name = "extract"

    def __init__(self, min_chars: int = 1, favor_recall: bool = True, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_chars = min_chars
        self.favor_recall = favor_recall

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from lxml.etree import LxmlError

        try:
            doc.text = html_to_text(doc.text, self.favor_recall)
        except (ValueError, LxmlError):  # a page lxml cannot parse has no text; not a crash
            return False, "unparsable"
        return True if len(doc.text) >= self.min_chars else (False, "no_text")
