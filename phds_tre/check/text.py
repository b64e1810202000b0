"""Free-text scanning: terminal escapes, numbers, number words and raw tables.

Free text cannot be checked exactly (DESIGN.md, principle 2), so this module
only decides how much a person must look at it:

* text without numbers passes;
* numbers (or English number words) in text go to a reviewer, and the reason
  names the first few so the reviewer sees them even where rendering hides them;
* text that looks like a raw table (a pandas/numpy repr, CSV, a markdown or
  LaTeX table, columns of numbers) goes to a reviewer, and fails when one of its
  cells is a small non-zero integer below ``policy.min_count`` (a possible small
  count of people).

Terminal escape sequences are stripped first because colour codes are full of
digits; escapes that can carry text a reader never sees (OSC/DCS strings,
unusual CSI parameters) are reported rather than silently dropped.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from phds_tre.check.verdict import Verdict
from phds_tre.sdc.policy import Policy

__all__ = [
    "TableScan",
    "check_free_text",
    "check_latex",
    "count_cell",
    "find_number_words",
    "find_numbers",
    "scan_table_rows",
    "scan_tables",
    "strip_ansi",
]

#: How many example numbers a reason quotes.
EXAMPLES = 5

# CSI sequences (colours, cursor moves, erase) and the 8-bit CSI introducer.
_CSI = re.compile(r"(?:\x1b\[|\x9b)([0-?]*)([ -/]*)([@-~])")
# String-carrying escapes (OSC titles/hyperlinks, DCS, SOS, PM, APC): their
# payload is never shown, so it is a hiding place.
_STRING_ESCAPE = re.compile(r"\x1b[\]PX^_].*?(?:\x07|\x1b\\|$)", re.DOTALL)
# Remaining two-character escapes (e.g. ESC c, ESC 7).
_SHORT_ESCAPE = re.compile(r"\x1b[ -/]*[0-~]?")

# SGR parameters that only choose a colour or style. 8 (conceal) is left out:
# it hides text from a reader, so it is reported.
_PLAIN_SGR = {*range(0, 8), *range(9, 30), *range(30, 38), 39, *range(40, 48), 49}
_PLAIN_SGR |= {*range(90, 98), *range(100, 108)}
# CSI final bytes that move the cursor or erase: harmless, but their parameters
# are digits and are stripped with them.
_CURSOR_FINALS = set("ABCDEFGHJKfsu")

_NUMBER = re.compile(r"\d+(?:,\d{3}(?!\d))*(?:[.:/\-]\d+)*")
_NUMBER_WORDS = re.compile(
    r"\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|"
    r"forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand|million|billion|dozen)\b",
    re.IGNORECASE,
)

# A cell that is a number (as pandas, numpy, CSV or people write them).
_NUMERIC_FIELD = re.compile(
    r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?%?|[-+−]?\.\d+(?:[eE][-+]?\d+)?%?"
)
# A cell that states a count: "3" or "3 (25.0%)" (the usual "n (%)" of a Table 1).
_COUNT_CELL = re.compile(r"(\d+)(?:\s*\(.*\))?")
_PANDAS_MARKER = re.compile(r"(?m)^(?:.*\bdtype: \w+|\[\d+ rows x \d+ columns\])\s*$")
_SEPARATOR_LINE = re.compile(r"[\s|+:]*[-=]{3,}[-=\s|+:]*")
_ELLIPSES = {"..", "...", "…", "⋮"}
_CALL_PREFIX = re.compile(r"^[A-Za-z_][\w.]*\(")
_DTYPE_SUFFIX = re.compile(r",?\s*dtype=[\w.']+\)?,?$")
_LATEX_ROW_END = re.compile(r"\\\\\s*(?:\\hline|\\midrule|\\bottomrule|\\toprule)?\s*$")


def strip_ansi(text: str) -> tuple[str, list[str]]:
    """Remove terminal escape sequences; return the clean text and problems found.

    Plain colour/style and cursor sequences are removed silently (they are what
    IPython tracebacks and progress bars use). Sequences that can carry data a
    reader never sees are removed too, but named in the problems so the
    caller can flag them.
    """
    problems: list[str] = []
    if _STRING_ESCAPE.search(text):
        problems.append("terminal escape strings (OSC/DCS) carry text that is never displayed")
        text = _STRING_ESCAPE.sub("", text)

    unusual: list[str] = []

    def _csi(match: re.Match[str]) -> str:
        params, intermediates, final = match.groups()
        if not _plain_csi(params, intermediates, final):
            unusual.append(repr(match.group(0)))
        return ""

    text = _CSI.sub(_csi, text)
    if unusual:
        shown = ", ".join(unusual[:EXAMPLES])
        problems.append(f"unusual terminal escape sequences could carry data: {shown}")
    text = _SHORT_ESCAPE.sub("", text)
    return text, problems


def _plain_csi(params: str, intermediates: str, final: str) -> bool:
    if intermediates:
        return False
    if final in _CURSOR_FINALS:
        return all(p.isdigit() and len(p) <= 3 for p in params.split(";") if p)
    if final != "m":
        return False
    codes = params.split(";")
    i = 0
    while i < len(codes):
        code = codes[i]
        if code == "":
            i += 1
            continue
        if not code.isdecimal():
            return False
        value = int(code)
        # 256-colour palette: 38;5;n / 48;5;n. Truecolour (38;2;r;g;b) is three
        # free bytes per sequence, so it counts as unusual.
        if value in (38, 48) and codes[i + 1 : i + 2] == ["5"] and i + 2 < len(codes):
            if not (codes[i + 2].isdigit() and int(codes[i + 2]) < 256):
                return False
            i += 3
            continue
        if value not in _PLAIN_SGR:
            return False
        i += 1
    return True


def find_numbers(text: str) -> list[str]:
    """Every run of digits in ``text`` (with its separators: ``3.5``, ``2024-01-05``), in order.

    ``\\d`` is Unicode-aware on purpose: full-width or Arabic-Indic digits are
    numbers too.
    """
    return _NUMBER.findall(text)


def find_number_words(text: str) -> list[str]:
    """English number words (``three``, ``twelve``, ``dozen``) in ``text``, in order."""
    return _NUMBER_WORDS.findall(text)


def count_cell(field: str) -> int | None:
    """The count a table cell states (``"3"`` or ``"3 (25%)"``), or None if it states none."""
    match = _COUNT_CELL.fullmatch(field.strip())
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TableScan:
    """What the raw-table rule found in a text: rows holding numbers and small counts."""

    rows: int
    small_counts: tuple[str, ...]


def _fields(line: str) -> list[str] | None:
    """Split one line into table cells; ``[]`` for a rule line, None if it is not a row."""
    s = line.strip()
    if not s:
        return None
    numeric = _numeric_only(s)
    if numeric is not None:
        return numeric
    if _SEPARATOR_LINE.fullmatch(s):
        return []
    if "\t" in s:
        parts = s.split("\t")
    elif "|" in s:
        parts = s.split("|")
    elif "&" in s and _LATEX_ROW_END.search(s):
        parts = _LATEX_ROW_END.sub("", s).split("&")
    elif re.search(r"\S\s{2,}\S", s):
        parts = re.split(r"\s{2,}", s)
    elif "," in s:
        parts = s.split(",")
    else:
        return None
    cells = [p.strip() for p in parts if p.strip()]
    return cells if len(cells) >= 2 else None


def _numeric_only(s: str) -> list[str] | None:
    """Cells of a line made only of numbers (a numpy or list repr row), else None."""
    s = _CALL_PREFIX.sub("", s)
    s = _DTYPE_SUFFIX.sub("", s)
    tokens = [t for t in re.split(r"[\s,;\[\]()]+", s) if t]
    if tokens and all(_NUMERIC_FIELD.fullmatch(t) for t in tokens):
        return tokens
    return None


def _is_number_cell(cell: str) -> bool:
    return bool(_NUMERIC_FIELD.fullmatch(cell) or _COUNT_CELL.fullmatch(cell))


def _has_number(cells: list[str]) -> bool:
    return any(_is_number_cell(c) for c in cells)


def _looks_like_index(rows: list[list[str]]) -> bool:
    """True when the first column counts up from 0 or 1 (a printed RangeIndex).

    pandas elides the middle of long frames with a ``..`` row; the index may
    jump across it, nowhere else.
    """
    values: list[int] = []
    may_jump = False
    for row in rows:
        if len(row) < 2:
            if row and row[0] in _ELLIPSES:
                may_jump = True
            continue
        first = row[0]
        if first in _ELLIPSES:
            may_jump = True
            continue
        if not _has_number(row):
            continue
        if not first.isdecimal():
            return False
        value = int(first)
        if not values:
            if value not in (0, 1):
                return False
        elif not (value == values[-1] + 1 or (may_jump and value > values[-1])):
            return False
        values.append(value)
        may_jump = False
    return bool(values)


def scan_table_rows(
    rows: list[list[str]], min_count: int, header_rows: int = 0, index_column: bool | None = None
) -> TableScan:
    """Apply the small-count rule to the cells of one table.

    ``header_rows`` leading rows are column labels and not counted. The first
    column is treated as an index (not counted) when ``index_column`` is true,
    or, when it is None, when it holds consecutive integers from 0 or 1 (a
    pandas RangeIndex): otherwise every table printed with its default index
    would fail.
    """
    body = [r for r in rows[header_rows:] if r and _has_number(r)]
    if index_column is None:
        index_column = _looks_like_index(rows[header_rows:])
    small: list[str] = []
    for row in body:
        for cell in row[1:] if index_column and len(row) >= 2 else row:
            n = count_cell(cell)
            if n is not None and 0 < n < min_count:
                small.append(cell.strip())
    return TableScan(rows=len(body), small_counts=tuple(small))


def scan_tables(text: str, min_count: int) -> TableScan | None:
    """Find raw tables in ``text``; None when nothing in it looks like one.

    A table is a block of consecutive lines that split into several cells (on
    tabs, pipes, ``&``, runs of two or more spaces, or commas; or lines of
    numbers only), at least two of them, with at least one numeric cell. A
    pandas trailer (``dtype: int64``, ``[5 rows x 3 columns]``) makes even a
    one-row block a table.
    """
    pandas = bool(_PANDAS_MARKER.search(text))
    blocks: list[list[tuple[str, list[str]]]] = [[]]
    for line in text.splitlines():
        cells = _fields(line)
        if cells is None:
            if blocks[-1]:
                blocks.append([])
            continue
        blocks[-1].append((line, cells))
    rows = 0
    small: list[str] = []
    found = False
    for block in blocks:
        content = [(line, cells) for line, cells in block if cells]
        if not any(_has_number(cells) for _, cells in content):
            continue
        if len(content) < 2 and not pandas:
            continue
        found = True
        # A pandas header with an unnamed index starts with spaces; its data rows do not.
        header = int(
            len(content) >= 2 and content[0][0][:1].isspace() and not content[1][0][:1].isspace()
        )
        scan = scan_table_rows([cells for _, cells in content], min_count, header_rows=header)
        rows += scan.rows
        small.extend(scan.small_counts)
    return TableScan(rows, tuple(small)) if found else None


def _examples(items: list[str]) -> str:
    unique = list(dict.fromkeys(items))
    shown = ", ".join(unique[:EXAMPLES])
    return shown + (f", … ({len(unique)} distinct)" if len(unique) > EXAMPLES else "")


def _hidden_characters(text: str) -> list[str]:
    """Characters that change or hide what a reader sees of ``text``."""
    problems = []
    controls = sorted(
        {f"U+{ord(c):04X}" for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"}
    )
    if controls:
        problems.append(
            f"control characters ({', '.join(controls[:EXAMPLES])}) alter what is displayed"
        )
    if re.search(r"\r(?!\n)", text):
        problems.append("carriage returns overwrite earlier text when displayed")
    formats = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) == "Cf"})
    if formats:
        problems.append(f"invisible formatting characters ({', '.join(formats[:EXAMPLES])})")
    return problems


def check_free_text(text: str, policy: Policy) -> Verdict:
    """Free text: pass without numbers, review with numbers or a table, fail on small counts."""
    clean, escape_problems = strip_ansi(text)
    fails: list[str] = []
    reviews: list[str] = []
    for problem in escape_problems:
        (fails if "never displayed" in problem else reviews).append(problem)
    reviews.extend(_hidden_characters(clean))

    table = scan_tables(clean, policy.min_count)
    if table is not None:
        if table.small_counts:
            fails.append(
                f"looks like a raw table with possible small counts below min_count="
                f"{policy.min_count}: {_examples(list(table.small_counts))}"
            )
        else:
            reviews.append(
                f"looks like a raw table ({table.rows} rows with numbers); "
                "publish tables through phds_tre.sdc (e.g. sdc.crosstab) to have them checked"
            )
    numbers = find_numbers(clean)
    if numbers:
        reviews.append(f"numbers in free text: {_examples(numbers)}")
    words = find_number_words(clean)
    if words:
        reviews.append(f"number words in free text: {_examples([w.lower() for w in words])}")

    if fails:
        return Verdict.fail(*fails, *reviews)
    if reviews:
        return Verdict.review(*reviews)
    return Verdict.passed("text without numbers")


# MathJax commands that attach CSS, classes or ids: they can hide text.
_LATEX_STYLING = re.compile(r"\\(?:style|class|cssId|html\w*|unicode)\b")
_LATEX_SCRIPT_URL = re.compile(r"(?:java|vb)\s*script\s*:", re.IGNORECASE)


def check_latex(latex: str, policy: Policy) -> Verdict:
    """text/latex: the free-text rule; MathJax styling commands and script URLs fail."""
    fails = []
    if _LATEX_SCRIPT_URL.search(latex):
        fails.append("active content: javascript: URL in LaTeX")
    styling = sorted(set(_LATEX_STYLING.findall(latex)))
    if styling:
        fails.append(f"LaTeX styling commands can hide content: {', '.join(styling)}")
    verdict = check_free_text(latex, policy)
    if fails:
        return Verdict.fail(*fails, *verdict.reasons)
    return verdict
