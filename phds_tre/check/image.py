"""Raw images: always a human's decision, and withheld when they are not what they claim.

A bitmap cannot be checked exactly (bars and bins drawn as pixels have lost
their counts), so an unstructured image goes to review and the reason points
to the structured alternatives. The checker still makes sure the bytes are
what the MIME type says — invalid base64 or a PNG that is not a PNG is not
understood, hence withheld — and that an SVG cannot run code.
"""

from __future__ import annotations

import base64
import binascii
import re
from html.parser import HTMLParser

from phds_tre.check.html import markup_tags, raw_problems, url_scheme
from phds_tre.check.verdict import Verdict

__all__ = ["RAW_IMAGE_REASON", "check_base64_image", "check_svg"]

RAW_IMAGE_REASON = "raw image: cannot be checked exactly; use phds_tre.sdc.hist / captured figures"

#: File signatures of the bitmap types Jupyter displays.
MAGIC: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
}

_BASE64_WHITESPACE = re.compile(r"\s+")


def check_base64_image(mime: str, data: str) -> Verdict:
    """A base64 bitmap: invalid base64 or wrong file signature fails, otherwise review."""
    compact = _BASE64_WHITESPACE.sub("", data)  # nbformat may wrap base64 over lines
    if not compact:
        return Verdict.fail("empty image data")
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return Verdict.fail("invalid base64 image data")
    signatures = MAGIC.get(mime, ())
    if signatures and not raw.startswith(signatures):
        return Verdict.fail(f"data is not a valid {mime} image (wrong file signature)")
    return Verdict.review(RAW_IMAGE_REASON)


class _SvgScan(HTMLParser):
    """Looks for what makes an SVG more than a picture: scripts, handlers, embedded HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fails: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Check one SVG element (the parser lower-cases names: foreignobject)."""
        if tag == "script":
            self.fails.append("SVG contains <script>")
        elif tag == "foreignobject":
            self.fails.append("SVG contains <foreignObject> (embedded HTML)")
        elif tag in ("iframe", "object", "embed"):
            self.fails.append(f"SVG contains <{tag}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.fails.append(f"SVG has an event handler attribute {name}=")
            elif (name == "href" or name.endswith(":href")) and url_scheme(value or "") in (
                "javascript:",
                "vbscript:",
            ):
                self.fails.append("SVG links to a javascript: URL")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Self-closing elements are checked the same way."""
        self.handle_starttag(tag, attrs)


_ENTITY = re.compile(r"<!ENTITY", re.IGNORECASE)


def check_svg(svg: str) -> Verdict:
    """An SVG image: scripts, handlers, ``<foreignObject>`` or entities fail; else review."""
    if _ENTITY.search(svg):
        # Entities expand to text the raw markup does not show.
        return Verdict.fail("SVG declares XML entities")
    tags, problem = markup_tags(svg)
    raw = raw_problems(tags, svg)
    if problem is not None:
        return Verdict.fail(f"malformed SVG markup not understood by the checker ({problem})", *raw)
    scan = _SvgScan()
    scan.feed(svg)
    scan.close()
    fails = list(dict.fromkeys(scan.fails)) or raw  # raw: where parsers would disagree
    if fails:
        return Verdict.fail(*fails)
    return Verdict.review(RAW_IMAGE_REASON)
