"""HTML outputs: active content, hidden content, raw tables and visible text.

Parsed with the standard library's :class:`html.parser.HTMLParser`, not
BeautifulSoup: it is not a dependency of the project, and a streaming parser
that sees every tag, attribute, comment and declaration is what a scanner
needs. Because a browser's parser and this one may disagree on malformed
markup (and ``html.parser`` is quadratic on some of it), markup is first
tokenised in one linear pass (:func:`markup_tags`): malformed markup fails
without being parsed, and the raw text and tags are also searched for the
most dangerous patterns (``<script``, ``javascript:``, event handlers), so a
parser trick cannot hide them.

Rules (DESIGN.md: what the checker does not understand is withheld):

* ``fail``: scripts, event-handler attributes (``on*=``), ``javascript:`` URLs,
  embedded documents (``<iframe>``, ``<object>``, ``<embed>`` …), and hidden
  content (comments with text, ``hidden`` elements, ``display:none`` …), since a
  reviewer looking at the rendered output would not see it;
* ``review``: images, media and ``data:`` URIs (cannot be checked exactly), and
  raw tables (``fail`` when a data cell is a small non-zero count);
* visible text goes through the free-text rule.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from phds_tre.check.text import EXAMPLES, check_free_text, scan_table_rows
from phds_tre.check.verdict import Verdict, combine
from phds_tre.sdc.policy import Policy

__all__ = [
    "HtmlScan",
    "check_css",
    "check_html",
    "check_markdown",
    "check_markup",
    "markup_tags",
    "raw_problems",
    "scan_markup",
    "url_scheme",
]

#: Elements that run code, load other documents or change how the page behaves.
ACTIVE_TAGS = frozenset(
    {
        "script", "iframe", "frame", "frameset", "object", "embed", "applet", "base",
        "link", "meta", "form", "portal", "foreignobject",
    }
)  # fmt: skip
#: Elements whose content is never displayed.
HIDDEN_TAGS = frozenset({"template", "noscript", "noembed", "noframes", "xmp", "plaintext"})
#: Elements that show pixels the checker cannot read.
MEDIA_TAGS = frozenset(
    {"img", "picture", "video", "audio", "source", "track", "canvas", "svg", "image"}
)
#: Attributes holding URLs (``javascript:`` there runs code).
URL_ATTRIBUTES = frozenset(
    {
        "href", "src", "action", "formaction", "xlink:href", "data", "poster", "background",
        "srcset", "lowsrc", "dynsrc", "cite", "longdesc", "ping", "manifest", "codebase",
        "usemap", "icon",
    }
)  # fmt: skip
#: Attributes whose text a reader may see (tooltips, alternatives, form values).
TEXT_ATTRIBUTES = frozenset(
    {"title", "alt", "aria-label", "placeholder", "value", "label", "summary", "content"}
)

_SCRIPT_SCHEMES = ("javascript:", "vbscript:", "livescript:")
_RAW_ACTIVE_TAG = re.compile(r"<\s*/?\s*(script|iframe|object|embed|applet|frame)\b", re.I)
_RAW_HANDLER = re.compile(r"[\s/\"']on[a-z]+\s*=", re.I)
_RAW_SCRIPT_URL = re.compile(r"(?:java|vb)\s*script\s*:", re.I)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_TAG_NAME = re.compile(r"</?([A-Za-z][^\s/>]*)")
# Elements whose content is raw text up to their end tag (as html.parser treats them).
_RAW_TEXT = ("script", "style")
_CSS_HIDDEN = re.compile(
    r"display:none|visibility:(?:hidden|collapse)|opacity:0(?:\.0*)?(?![.\d])|font-size:0(?![.\d])"
    r"|(?<![-\w])(?:width|height|max-width|max-height):0(?![.\d])"
    r"|clip(?:-path)?:|text-indent:-|color:transparent"
)
_CSS_ACTIVE = re.compile(r"expression\(|javascript:|vbscript:|behavior:|-moz-binding|@import")
_CSS_GENERATED = re.compile(r"content:(?!none|normal|['\"]['\"])")


def url_scheme(value: str) -> str:
    """The scheme of a URL as a browser reads it (whitespace and controls dropped, lower case)."""
    compact = re.sub(r"[\x00-\x20\x7f]+", "", value).lower()
    match = re.match(r"[a-z][a-z0-9+.\-]*:", compact)
    return match.group(0) if match else ""


def _strip_css_comments(css: str) -> str:
    # A loop, not a regex: a lazy /\*.*?\*/ is quadratic on many unclosed "/*".
    parts = []
    i = 0
    while (start := css.find("/*", i)) >= 0:
        parts.append(css[i:start])
        end = css.find("*/", start + 2)
        i = len(css) if end < 0 else end + 2  # an unclosed comment runs to the end, as in CSS
    parts.append(css[i:])
    return "".join(parts)


def check_css(css: str) -> Verdict:
    """Active or hiding CSS fails; ``url()`` resources go to review; colours and layout pass."""
    # Compare without whitespace and comments so ``display : none`` cannot slip by.
    compact = re.sub(r"\s+", "", _strip_css_comments(css)).lower()
    fails = []
    reviews = []
    if "\\" in compact:
        # CSS escapes (``disp\61 y``) can spell any property; not understood → withheld.
        fails.append("CSS escape sequences are not understood by the checker")
    if _CSS_ACTIVE.search(compact):
        fails.append("active CSS (expression(), javascript:, behavior, @import)")
    if _CSS_HIDDEN.search(compact):
        fails.append("hidden content: CSS hides elements (display:none, visibility:hidden, …)")
    if _CSS_GENERATED.search(compact):
        fails.append("hidden content: CSS generates text (content:) that is not in the page text")
    if "url(" in compact:
        reviews.append("CSS loads a resource (url())")
    if fails:
        return Verdict.fail(*fails, *reviews)
    if reviews:
        return Verdict.review(*reviews)
    return Verdict.passed()


class HtmlScan(HTMLParser):
    """One pass over an HTML document, collecting everything the rules need."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fails: list[str] = []
        self.reviews: list[str] = []
        self.text: list[str] = []
        self.preformatted: list[str] = []
        self._pre_depth = 0
        self.attribute_text: list[str] = []
        self.css: list[str] = []
        # Tables: a list of tables, each a list of rows of (cell text, is header).
        self.tables: list[list[list[tuple[str, bool]]]] = []
        self._open_tables: list[list[list[tuple[str, bool]]]] = []
        self._cell: list[str] | None = None
        self._cell_is_header = False
        self._raw_parent: str | None = None

    # -- parser callbacks ----------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Check an element and its attributes; track tables and style/script bodies."""
        self._check_element(tag, attrs)
        if tag in ("style", "script"):
            self._raw_parent = tag
        elif tag in ("pre", "listing"):
            self._pre_depth += 1
        elif tag == "table":
            self._open_tables.append([])
        elif tag == "tr" and self._open_tables:
            self._finish_cell()
            self._open_tables[-1].append([])
        elif tag in ("td", "th") and self._open_tables:
            self._finish_cell()
            if not self._open_tables[-1]:
                self._open_tables[-1].append([])
            self._cell = []
            self._cell_is_header = tag == "th"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """A self-closing element: checked like any other, but has no body."""
        self._check_element(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        """Close cells and tables."""
        if tag == self._raw_parent:
            self._raw_parent = None
        elif tag in ("pre", "listing") and self._pre_depth:
            self._pre_depth -= 1
        elif tag in ("td", "th", "tr"):
            self._finish_cell()
        elif tag == "table" and self._open_tables:
            self._finish_cell()
            self.tables.append(self._open_tables.pop())

    def handle_data(self, data: str) -> None:
        """Text: CSS of a style element, or visible text (also the current table cell)."""
        if self._raw_parent == "style":
            self.css.append(data)
            return
        if self._raw_parent == "script":
            return  # already a fail; its code is not text a reader sees
        if self._pre_depth:
            self.preformatted.append(data)
        else:
            self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def handle_comment(self, data: str) -> None:
        """A comment with content is text the reviewer never sees."""
        if data.strip():
            self.fails.append("hidden content: HTML comment with text")

    def handle_pi(self, data: str) -> None:
        """Processing instructions are not displayed: hidden content."""
        self.fails.append("hidden content: processing instruction")

    def unknown_decl(self, data: str) -> None:
        """CDATA sections and other declarations are not displayed: hidden content."""
        self.fails.append(f"hidden content: declaration <![{data[:20]}…]>")

    def close(self) -> None:
        """Finish parsing and close tables left open by malformed markup."""
        super().close()
        self._finish_cell()
        while self._open_tables:
            self.tables.append(self._open_tables.pop())

    # -- helpers --------------------------------------------------------
    def _finish_cell(self) -> None:
        if self._cell is not None and self._open_tables and self._open_tables[-1]:
            self._open_tables[-1][-1].append(("".join(self._cell).strip(), self._cell_is_header))
        self._cell = None

    def _check_element(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ACTIVE_TAGS:
            self.fails.append(f"active content: <{tag}>")
        if tag in HIDDEN_TAGS:
            self.fails.append(f"hidden content: <{tag}> is not displayed")
        if tag in MEDIA_TAGS:
            self.reviews.append(f"embedded image or media <{tag}> cannot be checked exactly")
        for name, value in attrs:
            self._check_attribute(tag, name, value or "")

    def _check_attribute(self, tag: str, name: str, value: str) -> None:
        if name.startswith("on"):
            self.fails.append(f"active content: event handler attribute {name}= on <{tag}>")
        elif name == "hidden":
            self.fails.append(f"hidden content: <{tag} hidden>")
        elif name == "type" and value.strip().lower() == "hidden":
            self.fails.append(f"hidden content: <{tag} type=hidden>")
        elif name.startswith("data-") and value.strip():
            self.fails.append(f"hidden content: attribute {name}= is not displayed")
        elif name == "style":
            verdict = check_css(value)
            self.fails.extend(r for r in verdict.reasons if verdict.status == "fail")
            self.reviews.extend(r for r in verdict.reasons if verdict.status == "review")
        elif name in URL_ATTRIBUTES or name.endswith(":href"):
            scheme = url_scheme(value)
            if scheme in _SCRIPT_SCHEMES:
                self.fails.append(f"active content: {scheme} URL in {name}= on <{tag}>")
            elif scheme == "data:" or (name == "srcset" and "data:" in value.lower()):
                self.reviews.append(f"data: URI in {name}= on <{tag}> cannot be checked exactly")
            else:
                self.attribute_text.append(value)
        elif name in TEXT_ATTRIBUTES:
            self.attribute_text.append(value)


def markup_tags(text: str) -> tuple[list[str], str | None]:
    """The tags of ``text`` in one linear pass, or the first malformed construct found.

    A gate before :class:`HtmlScan`: ``html.parser`` takes quadratic time on
    unclosed constructs (``<a <a <a …``) and browsers and parsers disagree
    most on malformed markup, so markup is only parsed when every ``<`` that
    starts a tag, comment or declaration is closed before the next ``<``.
    Attribute values containing ``<`` are refused too (pandas escapes them).
    """
    tags: list[str] = []
    lower = text.lower()
    i = 0
    while (i := text.find("<", i)) >= 0:
        if text.startswith("<!--", i):
            end = text.find("-->", i + 4)
            if end < 0:
                return tags, "unclosed comment"
            i = end + 3
        elif text.startswith(("<!", "<?"), i):
            end = text.find(">", i)
            following = text.find("<", i + 1)
            if end < 0 or 0 <= following < end:
                return tags, f"unclosed declaration at character {i}"
            i = end + 1
        elif text.startswith("</", i) or _ASCII_LETTER.fullmatch(text[i + 1 : i + 2]):
            match = _TAG.match(text, i)
            if match is None:
                return tags, f"unclosed or malformed tag at character {i}"
            tags.append(match.group(0))
            i = match.end()
            name = _TAG_NAME.match(match.group(0))
            if name and not match.group(0).startswith("</") and name.group(1).lower() in _RAW_TEXT:
                end = lower.find(f"</{name.group(1).lower()}", i)
                if end < 0:
                    return tags, f"unclosed <{name.group(1).lower()}>"
                i = end
        else:
            i += 1  # "a < b": text, not markup
    return tags, None


def raw_problems(tags: list[str], text: str) -> list[str]:
    """What the raw tags and text show of scripts, handlers and script URLs (parser-independent)."""
    problems = []
    if _RAW_ACTIVE_TAG.search(text):
        problems.append("active content: script or embedded document found in the raw markup")
    if any(_RAW_HANDLER.search(t) for t in tags):
        problems.append("active content: event handler found in the raw markup")
    if _RAW_SCRIPT_URL.search(text):
        problems.append("active content: javascript: found in the raw markup")
    return problems


def scan_markup(text: str) -> tuple[HtmlScan | None, list[str]]:
    """Parse ``text`` if it passes the :func:`markup_tags` gate; the scan and raw problems."""
    tags, problem = markup_tags(text)
    problems = raw_problems(tags, text)
    if problem is not None:
        return None, [f"malformed markup not understood by the checker ({problem})", *problems]
    scan = HtmlScan()
    scan.feed(text)
    scan.close()
    return scan, problems


def check_markup(scan: HtmlScan, raw_fails: list[str], policy: Policy) -> list[Verdict]:
    """Verdicts for the active/hidden-content rules of a scan, plus raw-markup problems."""
    verdicts = []
    fails = list(dict.fromkeys(scan.fails))
    if not any(r.startswith("active content") for r in fails):
        # The parser missed what the raw text shows: parsers disagree, so withhold.
        fails.extend(raw_fails)
    if fails:
        verdicts.append(Verdict.fail(*fails))
    if scan.reviews:
        verdicts.append(Verdict.review(*dict.fromkeys(scan.reviews)))
    css = "\n".join(scan.css)
    if css.strip():
        verdicts.append(check_css(css).prefixed("<style>"))
    if scan.attribute_text:
        text = " ".join(scan.attribute_text)
        verdict = check_free_text(text, policy)
        if verdict.status != "pass":
            verdicts.append(verdict.prefixed("attribute text"))
    return verdicts


def _table_verdict(table: list[list[tuple[str, bool]]], policy: Policy) -> Verdict | None:
    """The raw-table rule on one HTML table: header cells (``<th>``) are labels, not counts."""
    rows = [[text for text, is_header in row if not is_header] for row in table]
    rows = [r for r in rows if r]
    scan = scan_table_rows(rows, policy.min_count, index_column=False)
    if scan.rows == 0:
        return None
    if scan.small_counts:
        shown = ", ".join(list(dict.fromkeys(scan.small_counts))[:EXAMPLES])
        return Verdict.fail(
            f"raw HTML table with possible small counts below min_count={policy.min_count}: {shown}"
        )
    return Verdict.review(
        f"raw HTML table ({scan.rows} rows with numbers); publish tables through phds_tre.sdc "
        "so they are checked exactly"
    )


def check_html(html: str, policy: Policy) -> Verdict:
    """text/html: active or hidden content fails; tables and images review; text is scanned."""
    scan, raw_fails = scan_markup(html)
    if scan is None:
        return Verdict.fail(*raw_fails)
    verdicts = check_markup(scan, raw_fails, policy)
    for table in scan.tables:
        verdict = _table_verdict(table, policy)
        if verdict is not None:
            verdicts.append(verdict)
    # Outside <pre>, browsers collapse whitespace, so the text is one flowing line;
    # tables in it are judged from their cells above, not from line layout.
    text = re.sub(r"\s+", " ", " ".join(scan.text)).strip()
    verdicts.append(check_free_text(text, policy).prefixed("visible text"))
    if scan.preformatted:
        # Preformatted text keeps its lines: a printed table in <pre> is a raw table.
        pre = "".join(scan.preformatted)
        verdicts.append(check_free_text(pre, policy).prefixed("preformatted text"))
    return combine(verdicts)


# Bounded, single-line patterns: unbounded ones are quadratic on "![![![…".
_MD_IMAGE = re.compile(r"!\[[^\]\n]{0,300}\]\(\s*<?([^)\s>]*)")
_MD_LINK = re.compile(
    r"\]\(\s*<?([^)\s>]*)|^[ \t]{0,3}\[[^\]\n]{1,1000}\]:[ \t]*<?(\S+?)>?[ \t]*$", re.MULTILINE
)


def check_markdown(markdown: str, policy: Policy) -> Verdict:
    """text/markdown: the free-text rule, plus the HTML rules for markup it may embed.

    Jupyter renders raw HTML inside markdown, so a comment or a script there is
    as hidden or as active as in text/html; markdown images and links are
    checked like ``<img src>`` and ``<a href>``.
    """
    scan, raw_fails = scan_markup(markdown)
    if scan is None:
        return combine([Verdict.fail(*raw_fails), check_free_text(markdown, policy)])
    verdicts = check_markup(scan, raw_fails, policy)
    for match in _MD_IMAGE.finditer(markdown):
        verdicts.append(
            Verdict.review(f"markdown image {match.group(1)[:40]!r} cannot be checked exactly")
        )
    for match in _MD_LINK.finditer(markdown):
        url = match.group(1) or match.group(2) or ""
        scheme = url_scheme(url)
        if scheme in _SCRIPT_SCHEMES:
            verdicts.append(Verdict.fail(f"active content: {scheme} link in markdown"))
        elif scheme == "data:":
            verdicts.append(Verdict.review("data: URI in markdown cannot be checked exactly"))
    verdicts.append(check_free_text(markdown, policy))
    return combine(verdicts)
