"""text/html and text/markdown rules: active content, hidden content, tables, images, text."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from phds_tre.check.html import check_css, check_html, check_markdown, url_scheme
from phds_tre.sdc.policy import DEFAULT_POLICY

P = DEFAULT_POLICY


def _reasons(html: str) -> str:
    return " | ".join(check_html(html, P).reasons)


@pytest.mark.parametrize(
    "html",
    [
        "<script>alert(1)</script>",
        "<SCRIPT src='x.js'></SCRIPT>",
        '<img src="x.png" onerror="alert(1)">',
        '<div onmouseover="steal()">hover</div>',
        '<a href="javascript:alert(1)">x</a>',
        '<a href="jav&#x61;script:alert(1)">entity-encoded</a>',
        '<a href=" java\tscript:alert(1)">whitespace inside the scheme</a>',
        '<iframe src="https://example.org"></iframe>',
        '<object data="x.swf"></object>',
        '<embed src="x.swf">',
        "<scr<script>ipt>broken markup</script>",
        "<svg><foreignObject><div>x</div></foreignObject></svg>",
        '<form action="https://example.org"><input name=q></form>',
    ],
)
def test_active_content_fails(html: str) -> None:
    verdict = check_html(html, P)
    assert verdict.status == "fail"
    assert "active content" in " ".join(verdict.reasons)


@pytest.mark.parametrize(
    "html",
    [
        "<p>ok</p><!-- n=3 -->",
        '<span style="display:none">3</span>',
        '<span style="DISPLAY : NONE">3</span>',
        '<span style="visibility:hidden">3</span>',
        "<div hidden>3</div>",
        '<input type="hidden" value="3">',
        "<style>.x { display: none }</style><span class=x>3</span>",
        '<div data-count="3">ok</div>',
        "<template><p>3</p></template>",
        r'<span style="disp\61 y:none">3</span>',
        "<style>.x::after { content: '3' }</style><span class=x></span>",
    ],
)
def test_hidden_content_fails(html: str) -> None:
    verdict = check_html(html, P)
    assert verdict.status == "fail"
    reasons = " ".join(verdict.reasons)
    assert "hidden content" in reasons or "CSS escape" in reasons


def test_empty_comment_is_not_hidden_content() -> None:
    assert check_html("<p>ok</p><!---->", P).status == "pass"


def test_plain_visible_text_passes_and_numbers_review() -> None:
    assert check_html("<p><b>Model</b> fitted.</p>", P).status == "pass"
    verdict = check_html("<p>7 children&nbsp;had sepsis</p>", P)
    assert verdict.status == "review"
    assert "visible text: numbers in free text: 7" in verdict.reasons


def test_entities_are_decoded_before_looking_for_numbers() -> None:
    assert check_html("<p>&#51; children</p>", P).status == "review"


def test_pandas_html_table_small_count_boundary() -> None:
    df9 = pd.DataFrame({"n": [9, 250]}, index=["A", "B"])
    df10 = pd.DataFrame({"n": [10, 250]}, index=["A", "B"])
    failing = check_html(df9._repr_html_(), P)
    assert failing.status == "fail"
    assert any(
        "raw HTML table with possible small counts" in r and ": 9" in r for r in failing.reasons
    )
    held = check_html(df10._repr_html_(), P)
    assert held.status == "review"
    assert any("raw HTML table" in r for r in held.reasons)


def test_html_table_index_cells_are_labels_not_counts() -> None:
    # Default RangeIndex 0, 1 is in <th>: not a small count.
    df = pd.DataFrame({"a": [100, 200], "b": [30, 40]})
    assert check_html(df._repr_html_(), P).status == "review"


def test_preformatted_text_keeps_its_table_layout() -> None:
    assert check_html("<pre>g  n\nA  3\nB  40</pre>", P).status == "fail"


@pytest.mark.parametrize(
    "html",
    [
        '<img src="plot.png">',
        '<img src="data:image/png;base64,iVBORw0KGgo=">',
        '<a href="data:text/plain,secret">download</a>',
        "<video src=x.mp4></video>",
    ],
)
def test_images_and_data_uris_review(html: str) -> None:
    assert check_html(html, P).status == "review"


def test_attribute_text_is_scanned() -> None:
    verdict = check_html('<abbr title="n=3">few</abbr>', P)
    assert verdict.status == "review"
    assert any(r.startswith("attribute text") for r in verdict.reasons)


def test_css_rules() -> None:
    assert check_css("color: red; text-align: right").status == "pass"
    assert check_css("background: url(https://example.org/x.png)").status == "review"
    assert check_css("width: expression(alert(1))").status == "fail"
    assert check_css("opacity: 0").status == "fail"
    assert check_css("opacity: 0.5").status == "pass"


def test_url_scheme_as_a_browser_reads_it() -> None:
    assert url_scheme(" JaVa\nScRiPt:alert(1)") == "javascript:"
    assert url_scheme("https://example.org") == "https:"
    assert url_scheme("relative/path") == ""


# ---- markdown ---------------------------------------------------------------
def test_markdown_rules() -> None:
    assert check_markdown("**Done.**", P).status == "pass"
    assert check_markdown("We saw 4 cases", P).status == "review"
    assert check_markdown("ok <!-- 3 hidden -->", P).status == "fail"
    assert check_markdown("[x](javascript:alert(1))", P).status == "fail"
    assert check_markdown("![plot](plot.png)", P).status == "review"
    assert check_markdown("| g | n |\n|---|---|\n| x | 3 |\n| y | 40 |", P).status == "fail"


# ---- malformed markup and parser cost ------------------------------------------------
@pytest.mark.parametrize(
    "html",
    ["<a <b <c", "<p>ok</p><!-- unclosed", "<![<![<![", '<p title="a<b">x</p>', "<p>x</ p>"],
)
def test_malformed_markup_fails_without_being_parsed(html: str) -> None:
    verdict = check_html(html, P)
    assert verdict.status == "fail"
    assert "malformed markup" in verdict.reasons[0]


def test_less_than_in_text_is_not_markup() -> None:
    assert check_html("<p>age &lt; 5 and x < y</p>", P).status == "review"
    assert check_html("<p>a &lt; b</p>", P).status == "pass"


@pytest.mark.parametrize("pattern", ["<a ", "<![", "<!--", "![", "[\n", "/*", "\x1b]", "a  1\n"])
def test_pathological_inputs_take_linear_time(pattern: str) -> None:
    # html.parser and lazy regexes are quadratic on some of these: ~150 kB must stay fast.
    from phds_tre.check.checkers import REGISTRY, CheckContext

    text = pattern * (150_000 // len(pattern))
    ctx = CheckContext(P)
    start = time.perf_counter()
    for mime in ("text/plain", "text/html", "text/markdown", "image/svg+xml"):
        REGISTRY.check(mime, text, ctx)
    assert time.perf_counter() - start < 15
