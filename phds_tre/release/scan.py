"""Data-aware scanning: look for the site's own identifiers in every representation of an output.

The node knows the site's data (DESIGN.md, principle 3), so before anything
leaves it can look for row-level values — record numbers, dates of birth —
in what a kernel produced, wherever they hide: plain text, HTML comments and
attributes, JSON (structured payloads including their ``evidence``), output
metadata, error tracebacks, and base64 payloads (images, PDFs, data URIs,
PNG text chunks, compressed PDF streams).

How matching works, and why not Aho–Corasick: no Aho–Corasick library is
installed in the project's environment (``pyahocorasick`` is not a
dependency), and a dependency is not worth it here, because identifiers are
matched as whole *tokens*, not as arbitrary substrings — "12345678" must not
hit inside "912345678". So:

* **record numbers** are indexed in normalised forms (case-folded, letters and
  digits only, e.g. ``HSJD-0012345`` → ``hsjd0012345``, plus its digit run
  ``0012345`` and that run without leading zeros when it still has ≥ 6 digits);
  text is cut into runs of letters and runs of digits, consecutive runs joined
  by nothing or one separator are combined, and each combination is one set
  lookup. Forms shorter than 6 characters, and digits-only forms shorter than
  6 digits, are never indexed (they would hit ordinary counts).
* **dates** are found with a few regular expressions for full dates only
  (ISO, d/m/y and m/d/y with ``/``, ``-`` or ``.``, ``yyyymmdd``,
  "12 March 2015", "March 12, 2015", in several languages) and each parsed
  date is looked up in a set of the column's dates. A year, or a month and a
  year, is never a hit. Timestamps are also indexed as epoch seconds,
  milliseconds and nanoseconds (the form ``DataFrame.to_json`` writes).

A :class:`Hit` names where (MIME type / JSON path) and which column — never
the value: the report may be shown to a researcher. JSON keys shown in a
path are replaced by ``<key>`` when the key itself holds an identifier.

Caution for callers: in a paediatric cohort of a few thousand children,
almost every calendar date of the birth years is somebody's birth date, so a
date hit is weaker evidence than a record-number hit; :attr:`Hit.kind` lets a
caller treat the two differently.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import html
import re
import struct
import unicodedata
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from phds_tre.check.verdict import Verdict

__all__ = [
    "MIN_LENGTH",
    "UNSCANNED",
    "Hit",
    "IdentifierIndex",
    "IdentifierIndexError",
    "hits_verdict",
]

#: Shortest identifier form indexed (characters; digits-only forms: digits).
MIN_LENGTH = 6
#: Shortest run of base64 characters decoded inside text.
MIN_BASE64 = 32
#: How deep decoded payloads are scanned for further payloads.
_MAX_DEPTH = 3
#: Most bytes a compressed stream may expand to (zip bombs).
_MAX_INFLATE = 20_000_000
#: Deepest JSON nesting walked; deeper values are reported as unscanned (a hit).
_MAX_NESTING = 200
#: The "column" of a hit for something that could not be scanned.
UNSCANNED = "(unscanned)"
#: MIME types whose values are base64 bytes as a whole.
BASE64_MIMES = frozenset({"image/png", "image/jpeg", "image/gif", "application/pdf"})

HitKind = Literal["identifier", "date"]


class IdentifierIndexError(ValueError):
    """A column that cannot be indexed (bad name, missing file or column); one-line message."""


@dataclass(frozen=True, order=True)
class Hit:
    """One identifier found in an output: where, which column, in what form — never the value."""

    where: str
    column: str
    form: str
    kind: HitKind

    def __str__(self) -> str:
        return f"{self.where}: a value of {self.column} from the site's data ({self.form})"


# ---------------------------------------------------------------------------
# Text normalisation

_RUN = re.compile(r"[0-9]+|[^\W\d_]+")
_SPLIT = re.compile(r"([0-9]+|[^\W\d_]+)")
# Separators that may join two runs of one identifier ("HSJD-0012345", "HSJD 0012345").
_JOINERS = frozenset("-_/ .:#")
# Between two digit runs only these: "." and " " join decimals and lists of numbers.
_DIGIT_JOINERS = frozenset("-_/")
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[\]PX^_].*?(?:\x07|\x1b\\|$)|\x1b.|\x9b[0-?]*[@-~]"
)
_BASE64_RUN = re.compile(
    rf"[A-Za-z0-9+/]{{{MIN_BASE64},}}={{0,2}}|[A-Za-z0-9\-_]{{{MIN_BASE64},}}={{0,2}}"
)
_BASE64_WHOLE = re.compile(r"[A-Za-z0-9+/\-_]+={0,2}")
_WHITESPACE = re.compile(r"\s+")


def _normalise(text: str) -> str:
    """Compatibility forms (full-width digits), no terminal escapes, no invisible format characters."""
    if "\x1b" in text or "\x9b" in text:
        text = _ANSI.sub("", text)
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if c.isascii() or unicodedata.category(c) != "Cf")


def _fold(text: str) -> str:
    """The normalised form of an identifier: case-folded letters and digits only."""
    return "".join(c for c in _normalise(text).casefold() if c.isalnum())


def _long_enough(form: str) -> bool:
    return len(form) >= MIN_LENGTH


# ---------------------------------------------------------------------------
# Dates

_MONTHS: dict[str, int] = {}
for _names in (
    # English (with abbreviations), Spanish, Catalan, French, German, Italian, Dutch, Portuguese
    "january jan|february feb|march mar|april apr|may|june jun|july jul|august aug|"
    "september sep sept|october oct|november nov|december dec",
    "enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre setiembre|octubre|noviembre|diciembre",
    "gener|febrer|març|abril|maig|juny|juliol|agost|setembre|octubre|novembre|desembre",
    "janvier|février|mars|avril|mai|juin|juillet|août|septembre|octobre|novembre|décembre",
    "januar|februar|märz|april|mai|juni|juli|august|september|oktober|november|dezember",
    "gennaio|febbraio|marzo|aprile|maggio|giugno|luglio|agosto|settembre|ottobre|novembre|dicembre",
    "januari|februari|maart|april|mei|juni|juli|augustus|september|oktober|november|december",
    "janeiro|fevereiro|março|abril|maio|junho|julho|agosto|setembro|outubro|novembro|dezembro",
):
    for _month, _words in enumerate(_names.split("|"), start=1):
        for _word in _words.split():
            _MONTHS[_word] = _month

_ORDINAL = r"(?:st|nd|rd|th|er|e|º|\.)?"
_OF = r"(?:(?:of|de|del|di|d')\s*)?"

_DATE_PATTERNS: tuple[tuple[re.Pattern[str], str, tuple[str, ...]], ...] = (
    (
        re.compile(r"(?<!\d)(\d{4})([-/.])(\d{1,2})\2(\d{1,2})(?!\d)"),
        "ISO date (yyyy-mm-dd)",
        ("y", "", "m", "d"),
    ),
    (
        re.compile(r"(?<!\d)(\d{1,2})([-/.])(\d{1,2})\2(\d{4})(?!\d)"),
        "date (dd/mm/yyyy or mm/dd/yyyy)",
        ("a", "", "b", "y"),
    ),
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"), "date (yyyymmdd)", ("y", "m", "d")),
)
# Dates with a month name are parsed around each month word found (a regex alternation of
# every month name tried at every position of a long text is slow): what comes before the
# word ("12th of"), and what comes after it (" 2015", " 12, 2015").
_DAY_BEFORE = re.compile(rf"(?<![\w])(\d{{1,2}}){_ORDINAL}\s*{_OF}\Z", re.IGNORECASE)
_YEAR_AFTER = re.compile(rf"\.?,?\s*{_OF}(\d{{4}})(?!\d)", re.IGNORECASE)
_DAY_YEAR_AFTER = re.compile(rf"\.?\s+(\d{{1,2}}){_ORDINAL},?\s+(\d{{4}})(?!\d)", re.IGNORECASE)


def _date(year: int, month: int, day: int) -> dt.date | None:
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


_WORD = re.compile(r"[^\W\d_]{3,}")


def _dates_in(text: str) -> Iterator[tuple[dt.date, str]]:
    """Every full calendar date written in ``text``, with the form it was written in."""
    for pattern, form, roles in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            yield from _parsed(match, form, roles)
    for word in _WORD.finditer(text):
        month = _MONTHS.get(word.group(0).casefold())
        if month is None:
            continue
        before = _DAY_BEFORE.search(text[max(0, word.start() - 16) : word.start()])
        after = _YEAR_AFTER.match(text, word.end(), word.end() + 16)
        if before and after:
            found = _date(int(after[1]), month, int(before[1]))
            if found:
                yield found, "date (day month year)"
        after = _DAY_YEAR_AFTER.match(text, word.end(), word.end() + 16)
        if after:
            found = _date(int(after[2]), month, int(after[1]))
            if found:
                yield found, "date (month day, year)"


def _parsed(
    match: re.Match[str], form: str, roles: tuple[str, ...]
) -> Iterator[tuple[dt.date, str]]:
    parts = dict(zip(roles, match.groups(), strict=True))
    year = int(parts["y"])
    if "a" in parts:  # ambiguous: day-first and month-first
        a, b = int(parts["a"]), int(parts["b"])
        for day, month in dict.fromkeys(((a, b), (b, a))):
            found = _date(year, month, day)
            if found:
                yield found, form
    else:
        found = _date(year, int(parts["m"]), int(parts["d"]))
        if found:
            yield found, form


_ISO_VALUE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?"
)


# ---------------------------------------------------------------------------
# The index


class IdentifierIndex:
    """The site's identifier values, in every form an output might show them.

    Build with :meth:`from_site` (Parquet files of the site's OMOP tables) or
    :meth:`from_values`; scan with :meth:`scan_output`, :meth:`scan_text` or
    :meth:`scan_notebook`.
    """

    def __init__(self) -> None:
        #: normalised token → {column: (form, kind)}
        self._tokens: dict[str, dict[str, tuple[str, HitKind]]] = {}
        #: calendar date → columns holding it
        self._dates: dict[dt.date, set[str]] = {}
        #: first run of every token (most runs of a text are not: skipped with one lookup)
        self._firsts: set[str] = set()
        self._max_runs = 1
        #: per column: values seen, values indexed, values too short to index
        self.stats: dict[str, dict[str, int]] = {}

    # ---- building ------------------------------------------------------
    @classmethod
    def from_site(cls, site_dir: str | Path, columns: Sequence[str]) -> IdentifierIndex:
        """Index ``table.column`` values read from ``site_dir/<table>.parquet`` with DuckDB."""
        import duckdb  # lazily: only a node that scans needs it

        site_dir = Path(site_dir)
        index = cls()
        with duckdb.connect() as con:
            for spec in columns:
                table, column = _split_column(spec)
                path = site_dir / f"{table}.parquet"
                if not path.is_file():
                    raise IdentifierIndexError(f"{spec}: no table file {path}")
                try:
                    names = [
                        row[0]
                        for row in con.execute(
                            "DESCRIBE SELECT * FROM read_parquet($1)", [str(path)]
                        ).fetchall()
                    ]
                    if column not in names:
                        raise IdentifierIndexError(f"{spec}: {path.name} has no column {column!r}")
                    rows = con.execute(
                        f'SELECT DISTINCT CAST("{column}" AS VARCHAR) FROM read_parquet($1) '
                        f'WHERE "{column}" IS NOT NULL',
                        [str(path)],
                    ).fetchall()
                except duckdb.Error as exc:
                    message = str(exc).splitlines()[0]
                    raise IdentifierIndexError(f"{spec}: cannot read {path} ({message})") from None
                index.add(spec, (row[0] for row in rows))
        return index

    @classmethod
    def from_values(cls, values: Mapping[str, Iterable[object]]) -> IdentifierIndex:
        """Index values given directly: ``{"person.person_source_value": [...], ...}``."""
        index = cls()
        for column, items in values.items():
            index.add(column, items)
        return index

    def add(self, column: str, values: Iterable[object]) -> None:
        """Index the values of one column (dates, timestamps, record numbers, numbers)."""
        stats = self.stats.setdefault(column, {"values": 0, "indexed": 0, "too_short": 0})
        for value in values:
            if value is None:
                continue
            stats["values"] += 1
            if self._add_value(column, value):
                stats["indexed"] += 1
            else:
                stats["too_short"] += 1

    def _add_value(self, column: str, value: object) -> bool:
        if isinstance(value, dt.datetime):
            return self._add_date(column, value.date(), value)
        if isinstance(value, dt.date):
            return self._add_date(column, value, None)
        if isinstance(value, bool):
            return False
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value).strip()
        if re.fullmatch(r"-?\d+\.0+", text):
            text = text.split(".")[0]
        iso = _ISO_VALUE.fullmatch(text)
        if iso:
            day = _date(int(iso[1]), int(iso[2]), int(iso[3]))
            if day is not None:
                moment = None
                if iso[4] is not None:
                    fraction = (iso[7] or "0").ljust(6, "0")[:6]
                    moment = dt.datetime(
                        day.year, day.month, day.day, int(iso[4]), int(iso[5]),
                        int(iso[6] or 0), int(fraction),
                    )  # fmt: skip
                    offset = iso[8]
                    if offset and offset != "Z":  # the instant in UTC, as epoch forms count
                        digits = offset[1:].replace(":", "").ljust(4, "0")
                        delta = dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4]))
                        moment = moment - delta if offset[0] == "+" else moment + delta
                return self._add_date(column, day, moment)
        return self._add_identifier(column, text)

    def _add_date(self, column: str, day: dt.date, moment: dt.datetime | None) -> bool:
        self._dates.setdefault(day, set()).add(column)
        # Epoch forms of the exact timestamp (naive values taken as UTC, as pandas does).
        if moment is None:
            moment = dt.datetime(day.year, day.month, day.day)
        seconds = moment.replace(tzinfo=dt.UTC).timestamp()
        for scale, name in (
            (1, "epoch seconds"),
            (1000, "epoch milliseconds"),
            (10**9, "epoch nanoseconds"),
        ):
            number = round(seconds * scale)
            if number != 0 and len(str(abs(number))) >= MIN_LENGTH:
                self._put(str(number), column, f"timestamp as {name}", 1, kind="date")
        return True

    def _add_identifier(self, column: str, text: str) -> bool:
        runs = [m.group(0).casefold() for m in _RUN.finditer(_normalise(text))]
        added = False
        full = "".join(runs)
        if _long_enough(full):
            self._put(full, column, "record number", len(runs), runs[0])
            added = True
        for run in runs:
            if not run.isdigit() or run == full:
                continue
            # The number without its prefix, with and without leading zeros.
            for form, label in (
                (run, "record number without prefix"),
                (run.lstrip("0"), "record number without prefix or leading zeros"),
            ):
                if _long_enough(form):
                    self._put(form, column, label, 1)
                    added = True
        if full.isdigit() and full.lstrip("0") != full and _long_enough(full.lstrip("0")):
            self._put(full.lstrip("0"), column, "record number without leading zeros", 1)
            added = True
        return added

    def _put(
        self,
        token: str,
        column: str,
        form: str,
        runs: int,
        first: str | None = None,
        kind: HitKind = "identifier",
    ) -> None:
        self._tokens.setdefault(token, {}).setdefault(column, (form, kind))
        self._firsts.add(first if first is not None else token)
        if token.isdigit():
            # The same number with thousands separators, "1,234,567", starts with its first group.
            self._firsts.add(token[: len(token) % 3 or 3])
            runs = max(runs, -(-len(token) // 3))
        self._max_runs = max(self._max_runs, min(runs, 8))

    def __len__(self) -> int:
        return len(self._tokens) + len(self._dates)

    @property
    def columns(self) -> list[str]:
        """The columns indexed."""
        return sorted(self.stats)

    # ---- scanning ------------------------------------------------------
    def scan_text(self, text: str, where: str = "text") -> list[Hit]:
        """Hits in one piece of text (and in base64 payloads inside it)."""
        scanner = _Scanner(self)
        scanner.text(text, where, 0)
        return scanner.result()

    def scan_output(self, output: Mapping[str, Any]) -> list[Hit]:
        """Hits in every representation of one nbformat output (data, metadata, text, errors)."""
        scanner = _Scanner(self)
        for key, value in output.items():
            if key == "output_type":
                continue
            if key == "data" and isinstance(value, Mapping):
                for mime, item in value.items():
                    where = f"data/{scanner.key(mime)}"
                    if mime in BASE64_MIMES and isinstance(item, (str, list)):
                        scanner.base64_value(item, where)
                        scanner.value(item, where, _MAX_DEPTH)  # the text itself, not decoded again
                    else:
                        scanner.value(item, where, 0)
            else:
                scanner.value(value, scanner.key(key), 0)
        return scanner.result()

    def scan_notebook(self, nb: Mapping[str, Any]) -> dict[tuple[int, int], list[Hit]]:
        """Hits per (cell index, output index) of every code cell's outputs; only outputs with hits."""
        found: dict[tuple[int, int], list[Hit]] = {}
        for cell_index, cell in enumerate(nb.get("cells") or []):
            if cell.get("cell_type") != "code":
                continue
            for output_index, output in enumerate(cell.get("outputs") or []):
                hits = self.scan_output(output) if isinstance(output, Mapping) else []
                if hits:
                    found[(cell_index, output_index)] = hits
        return found

    # ---- matching (used by _Scanner) -------------------------------------
    def _match_tokens(self, text: str) -> Iterator[tuple[str, str, HitKind]]:
        # parts alternates separator, run, separator, run, …: one C-level split of the text.
        parts = _SPLIT.split(text.casefold())
        tokens, firsts = self._tokens, self._firsts
        last = len(parts) - 1
        for k in range(1, len(parts), 2):
            combined = parts[k]
            if combined not in firsts:
                continue
            for column, (form, kind) in tokens.get(combined, {}).items():
                yield column, form, kind
            left = combined
            for j in range(k + 2, min(k + 2 * self._max_runs, last + 1), 2):
                run = parts[j]
                if not _joinable(parts[j - 1], left, run):
                    break
                combined += run
                for column, (form, kind) in tokens.get(combined, {}).items():
                    yield column, form, kind
                left = run

    def _match_dates(self, text: str) -> Iterator[tuple[str, str, HitKind]]:
        if not self._dates:
            return
        for day, form in _dates_in(text):
            for column in sorted(self._dates.get(day, ())):
                yield column, form, "date"

    def _match_number(self, number: int) -> Iterator[tuple[str, str, HitKind]]:
        found = self._tokens.get(str(abs(number)))
        if found:
            for column, (form, kind) in found.items():
                yield column, form, kind
        yield from self._match_dates(str(abs(number)))


def _joinable(gap: str, left: str, right: str) -> bool:
    """Whether two runs separated by ``gap`` may be parts of one identifier."""
    if not gap:
        return True  # a letter run next to a digit run: "HSJD0012345"
    if len(gap) != 1:
        return False
    if left.isdigit() and right.isdigit():
        if gap == ",":  # thousands grouping: 1,234,567
            return len(right) == 3 and len(left) <= 3
        return gap in _DIGIT_JOINERS
    return gap in _JOINERS


def _split_column(spec: str) -> tuple[str, str]:
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)", spec)
    if not match:
        raise IdentifierIndexError(f"{spec!r}: expected 'table.column' (letters, digits, _)")
    return match[1], match[2]


# ---------------------------------------------------------------------------
# Walking an output


_SAFE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_+.\-/]{0,60}")


class _Scanner:
    """Collects hits while walking one output; one per (where, column)."""

    def __init__(self, index: IdentifierIndex) -> None:
        self.index = index
        self.hits: dict[tuple[str, str], Hit] = {}

    def result(self) -> list[Hit]:
        return sorted(self.hits.values())

    def _record(self, found: Iterable[tuple[str, str, HitKind]], where: str) -> bool:
        # One hit per place and column: the first form found (the fullest) names it.
        any_hit = False
        for column, form, kind in found:
            self.hits.setdefault((where, column), Hit(where, column, form, kind))
            any_hit = True
        return any_hit

    def key(self, key: object) -> str:
        """A key as shown in a path: itself when plain and free of identifiers, else ``<key>``."""
        text = str(key)
        if _SAFE_KEY.fullmatch(text) and not self._has_hit(text):
            return text
        return "<key>"

    def _has_hit(self, text: str) -> bool:
        probe = _Scanner(self.index)
        probe.text(text, "key", _MAX_DEPTH)
        return bool(probe.hits)

    def value(self, value: object, where: str, depth: int, nesting: int = 0) -> None:
        if nesting > _MAX_NESTING:
            # Fail closed: what cannot be walked is reported, never silently skipped.
            self.hits.setdefault(
                (where, UNSCANNED), Hit(where, UNSCANNED, "nested too deeply to scan", "identifier")
            )
            return
        if isinstance(value, str):
            self.text(value, where, depth)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                shown = self.key(key)
                if shown == "<key>":
                    self.text(str(key), f"{where}/<key>", depth)
                self.value(item, f"{where}/{shown}", depth, nesting + 1)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                self.value(item, f"{where}/{i}", depth, nesting + 1)
            if len(value) > 1 and all(isinstance(item, str) for item in value):
                # nbformat stores multi-line text as a list of lines: an identifier may span two.
                self.text("".join(value), where, depth)
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, int):
            if abs(value) >= 10 ** (MIN_LENGTH - 1):
                self._record(self.index._match_number(value), where)
        elif (
            isinstance(value, float) and value.is_integer() and abs(value) >= 10 ** (MIN_LENGTH - 1)
        ):
            self._record(self.index._match_number(int(value)), where)

    def text(self, text: str, where: str, depth: int) -> None:
        # Decoded forms first: the first form found names the hit, and theirs is the fullest.
        variants = []
        if "&" in text:
            variants.append(_normalise(html.unescape(text)))
        if "%" in text:
            variants.append(_normalise(urllib.parse.unquote(text)))
        variants += [_normalise(text), text]
        for variant in dict.fromkeys(variants):
            self._record(self.index._match_tokens(variant), where)
            self._record(self.index._match_dates(variant), where)
        if depth >= _MAX_DEPTH:
            return
        compact = _WHITESPACE.sub("", text)
        if len(compact) >= MIN_BASE64 and _BASE64_WHOLE.fullmatch(compact):
            self._base64(compact, f"{where} (base64)", depth + 1)
        for match in _BASE64_RUN.finditer(text):
            if match.group(0) != compact:
                self._base64(match.group(0), f"{where} (base64)", depth + 1)

    def base64_value(self, value: str | list[str], where: str) -> None:
        """A whole MIME value that is base64 (nbformat may split it over lines)."""
        joined = "".join(value) if isinstance(value, list) else value
        self._base64(_WHITESPACE.sub("", joined), f"{where} (base64)", 1)

    def _base64(self, text: str, where: str, depth: int) -> None:
        raw = _b64decode(text)
        if raw:
            self.bytes(raw, where, depth)

    def bytes(self, raw: bytes, where: str, depth: int) -> None:
        self.text(raw.decode("latin-1"), where, depth)
        if b"\x00" in raw:  # UTF-16 text: ASCII with NULs between
            self.text(raw.replace(b"\x00", b"").decode("latin-1"), where, _MAX_DEPTH)
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if not decoded.isascii():
                self.text(decoded, where, _MAX_DEPTH)
        if raw.startswith(b"\x89PNG\r\n\x1a\n"):
            for chunk_type, text in _png_text_chunks(raw):
                self.text(text, f"{where} (PNG {chunk_type} chunk)", depth)
        elif raw.startswith(b"%PDF"):
            for text in _pdf_streams(raw):
                self.text(text, f"{where} (PDF stream)", depth)


def _b64decode(text: str) -> bytes | None:
    text = text.rstrip("=")
    text = text[: len(text) - len(text) % 4] if len(text) % 4 == 1 else text
    padded = text + "=" * (-len(text) % 4)
    try:
        if "-" in padded or "_" in padded:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None


def _inflate(data: bytes) -> bytes | None:
    try:
        inflater = zlib.decompressobj()
        return inflater.decompress(data, _MAX_INFLATE)
    except zlib.error:
        return None


def _png_text_chunks(raw: bytes) -> Iterator[tuple[str, str]]:
    """The text of every tEXt, zTXt and iTXt chunk of a PNG (decompressed)."""
    pos = 8
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        body = raw[pos + 8 : pos + 8 + length]
        pos += 12 + length
        name = kind.decode("latin-1")
        if kind == b"tEXt":
            yield name, body.replace(b"\x00", b" ").decode("latin-1")
        elif kind == b"zTXt":
            keyword, _, rest = body.partition(b"\x00")
            yield (
                name,
                keyword.decode("latin-1") + " " + (_inflate(rest[1:]) or b"").decode("latin-1"),
            )
        elif kind == b"iTXt":
            keyword, _, rest = body.partition(b"\x00")
            compressed = rest[:1] == b"\x01"
            _, _, rest = rest[2:].partition(b"\x00")  # language tag
            translated, _, text = rest.partition(b"\x00")
            if compressed:
                text = _inflate(text) or b""
            yield (
                name,
                " ".join(
                    part.decode("utf-8", errors="replace") for part in (keyword, translated, text)
                ),
            )
        elif kind == b"IEND":
            return


_PDF_STREAM = re.compile(rb"stream\r?\n(.*?)endstream", re.DOTALL)


def _pdf_streams(raw: bytes) -> Iterator[str]:
    """The decompressed content of every Flate-encoded stream of a PDF."""
    for match in _PDF_STREAM.finditer(raw):
        inflated = _inflate(match.group(1))
        if inflated:
            yield inflated.replace(b"\x00", b"").decode("latin-1")


# ---------------------------------------------------------------------------
# Verdicts


def hits_verdict(hits: Sequence[Hit]) -> Verdict:
    """A ``fail`` :class:`~phds_tre.check.Verdict` naming each hit (where, column), or ``pass``."""
    if not hits:
        return Verdict.passed("no identifier from the site's data found")
    reasons = [str(hit) for hit in hits]
    return Verdict.fail(*dict.fromkeys(reasons))
