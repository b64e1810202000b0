"""Raw pandas tables captured in the site kernel: kind ``"frame"``.

A DataFrame or Series that a researcher displays without going through
:mod:`phds_tre.sdc` has no contributor statistics: the kernel extension
(:mod:`phds_tre.kernel`) captures its values, labels and dtypes as the
evidence of a :class:`FrameOutput`, so the checker can at least look at every
cell exactly instead of guessing from rendered HTML. What a raw table cannot
tell is how many children stand behind a number, so the rules are
conservative and a raw table **never passes**:

============= ================================================================ ======
rule          when                                                             status
============= ================================================================ ======
threshold     a numeric cell holding a whole number ``0 < v < min_count``      fail
              (a possible small count); the cell is suppressed in the table
single_value  a row or column labelled with a statistic the site's policy      fail
              counts as one child's value (``min``, ``max``, ``first``…:
              ``df.describe()``, ``df.agg(["min", "max"])``)
single_value  row-level data: more than ``max(20, 10 × columns)`` rows; or a   fail
              positional index (unnamed integers, as rows of a data set have)
              with a non-numeric column or a column of distinct integers
              (identifiers, dates, one child's attributes); or a table too
              large to hold in the evidence
text          non-numeric cells (text, dates, categories) are withheld from    review
              the releasable table: only numbers can be checked
unchecked     anything else: "not produced by phds_tre.sdc: a reviewer decides" review
============= ================================================================ ======

Known false alarms, by design: a table of whole numbers below ``min_count``
that are not counts (ages, medians) fails; ``groupby(...).mean().reset_index()``
fails because its group labels sit in a column beside a positional index (keep
labels in the index, or use :func:`phds_tre.sdc.pivot_table`).

The kernel is untrusted (DESIGN.md, principle 3): the payload is re-checked
from its evidence by :func:`phds_tre.sdc.recheck`, never from its claimed
status, and the node's data-aware scanning looks for row-level values (record
numbers, dates of birth) that no rule here can recognise, such as an index
set to ``person_id``.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from phds_tre.sdc.jsonio import label_from_json, label_to_json
from phds_tre.sdc.output import (
    CHECK_COLUMNS,
    EvidenceError,
    SDCOutput,
    badge_html,
    register_kind,
)
from phds_tre.sdc.policy import Policy, resolve_policy

__all__ = [
    "DTYPE_KINDS",
    "MAX_COLUMNS",
    "MAX_ROWS",
    "FrameEvidence",
    "FrameOutput",
    "frame_evidence",
    "frame_output",
]

#: Rows and columns of a captured table kept as evidence; larger tables fail as row-level data.
MAX_ROWS = 1000
MAX_COLUMNS = 100
#: Rows and columns shown in the output's HTML and text (the payload holds them all).
SHOWN_ROWS = 60
SHOWN_COLUMNS = 20
#: Text cells are cut to this length in the evidence (they are never released).
MAX_TEXT = 200
#: Row-level rule: more than ``max(ROW_LEVEL_ROWS, ROWS_PER_COLUMN * columns)`` rows.
ROW_LEVEL_ROWS = 20
ROWS_PER_COLUMN = 10
#: Dtype kinds recorded per column.
DTYPE_KINDS = ("int", "float", "bool", "datetime", "timedelta", "category", "text", "other")
_NON_NUMERIC_KINDS = frozenset({"bool", "datetime", "timedelta", "category", "text", "other"})
_CALL = re.compile(r"[A-Za-z_][\w.]{0,79}")


# ---------------------------------------------------------------------------
# evidence
# ---------------------------------------------------------------------------
@dataclass
class FrameEvidence:
    """A raw table's values, labels and dtypes (column-major), as the kernel saw them."""

    call: str
    orient: str  # "frame" | "series"
    series_name: Any
    index: list[object]
    index_names: list[Any]
    columns: list[object]
    column_names: list[Any]
    dtypes: list[str]
    data: list[list[Any]]  # one list per column, JSON scalars
    n_rows: int  # of the displayed object; more than len(index) when truncated
    n_columns: int

    @property
    def truncated(self) -> bool:
        """Whether the object had more rows or columns than the evidence holds."""
        return self.n_rows > len(self.index) or self.n_columns > len(self.columns)

    def to_json(self) -> dict[str, Any]:
        """Evidence as strict JSON."""
        return {
            "call": self.call,
            "orient": self.orient,
            "series_name": label_to_json(self.series_name),
            "index": [label_to_json(x) for x in self.index],
            "index_names": [label_to_json(x) for x in self.index_names],
            "columns": [label_to_json(x) for x in self.columns],
            "column_names": [label_to_json(x) for x in self.column_names],
            "dtypes": list(self.dtypes),
            "data": [list(col) for col in self.data],
            "n_rows": self.n_rows,
            "n_columns": self.n_columns,
        }

    @classmethod
    def from_json(cls, data: Any) -> FrameEvidence:
        """Parse and validate evidence; :class:`EvidenceError` when malformed or inconsistent."""
        if not isinstance(data, dict):
            raise EvidenceError("frame evidence is not a JSON object")
        try:
            ev = cls(
                call=data["call"],
                orient=data["orient"],
                series_name=label_from_json(data.get("series_name")),
                index=[label_from_json(x) for x in _list(data["index"], "index")],
                index_names=[label_from_json(x) for x in _list(data["index_names"], "names")],
                columns=[label_from_json(x) for x in _list(data["columns"], "columns")],
                column_names=[label_from_json(x) for x in _list(data["column_names"], "names")],
                dtypes=_list(data["dtypes"], "dtypes"),
                data=[_list(col, "column") for col in _list(data["data"], "data")],
                n_rows=data["n_rows"],
                n_columns=data["n_columns"],
            )
        except KeyError as exc:
            raise EvidenceError(f"frame evidence is incomplete: missing {exc}") from None
        ev.validate()
        return ev

    def validate(self) -> None:
        """Shapes, types and dtypes agree; every cell is a JSON scalar of its column's kind."""
        if not isinstance(self.call, str) or not _CALL.fullmatch(self.call):
            raise EvidenceError("frame call must be a short name such as 'DataFrame'")
        if self.orient not in ("frame", "series"):
            raise EvidenceError(f"unknown frame orientation {self.orient!r}")
        for what, n in (("n_rows", self.n_rows), ("n_columns", self.n_columns)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise EvidenceError(f"{what} must be a non-negative integer")
        r, c = len(self.index), len(self.columns)
        if r > MAX_ROWS or c > MAX_COLUMNS:
            raise EvidenceError("frame evidence holds more cells than a capture keeps")
        if self.n_rows < r or self.n_columns < c:
            raise EvidenceError("frame evidence holds more rows or columns than the table had")
        if self.orient == "series" and (c != 1 or self.n_columns != 1):
            raise EvidenceError("a series has exactly one column")
        if len(self.dtypes) != c or len(self.data) != c:
            raise EvidenceError("one dtype and one list of values are needed per column")
        if not self.index_names or not self.column_names:
            raise EvidenceError("index and columns need at least one level name")
        for labels, names, what in (
            (self.index, self.index_names, "index"),
            (self.columns, self.column_names, "columns"),
        ):
            _check_labels(labels, len(names), what)
        for kind, column in zip(self.dtypes, self.data, strict=True):
            if kind not in DTYPE_KINDS:
                raise EvidenceError(f"unknown column dtype kind {kind!r}")
            if len(column) != r:
                raise EvidenceError("a column does not have one value per row")
            for value in column:
                _check_cell(value, kind)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise EvidenceError(f"frame evidence: {what} must be a list")
    return value


def _scalar_label(x: object) -> bool:
    return x is None or isinstance(x, (str, int, float, bool))


def _check_labels(labels: list[object], levels: int, what: str) -> None:
    for label in labels:
        if levels > 1:
            if not isinstance(label, tuple) or len(label) != levels:
                raise EvidenceError(f"{what}: every label needs one value per level")
            if not all(_scalar_label(x) for x in label):
                raise EvidenceError(f"{what}: labels must be JSON scalars")
        elif not _scalar_label(label):
            raise EvidenceError(f"{what}: labels must be JSON scalars")


def _check_cell(value: Any, kind: str) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise EvidenceError("cells must be finite numbers or null")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise EvidenceError("an integer column holds a value that is not an integer")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise EvidenceError("a float column holds a value that is not a number")
    if kind == "bool" and not isinstance(value, bool):
        raise EvidenceError("a boolean column holds a value that is not true or false")
    if not isinstance(value, (str, int, float, bool)):
        raise EvidenceError("cells must be JSON scalars")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# from pandas (in the kernel)
# ---------------------------------------------------------------------------
def _dtype_kind(dtype: Any) -> str:
    api = pd.api.types
    if api.is_bool_dtype(dtype):
        return "bool"
    if isinstance(dtype, pd.CategoricalDtype):
        return "category"
    if api.is_integer_dtype(dtype):
        return "int"
    if api.is_float_dtype(dtype):
        return "float"
    if api.is_datetime64_any_dtype(dtype):
        return "datetime"
    if api.is_timedelta64_dtype(dtype):
        return "timedelta"
    if api.is_string_dtype(dtype) or api.is_object_dtype(dtype):
        return "text"
    return "other"


def _cell(value: Any, kind: str) -> Any:
    """One cell as a JSON scalar; numbers stay numbers only in columns that hold numbers."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool):
        return int(value) if kind in ("int", "float") else value
    if isinstance(value, int):
        return float(value) if kind == "float" else value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if kind == "int":  # a nullable integer column read back as floats
            return int(value) if value == int(value) else None
        return value
    if kind in ("int", "float"):
        return None
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time, pd.Timestamp)):
        return value.isoformat()
    return str(value)[:MAX_TEXT]


def _flat_label(label: object, levels: int) -> object:
    """A label whose every level is a JSON scalar (anything else becomes its text)."""
    if levels > 1 and isinstance(label, tuple):
        return tuple(_flat_label(x, 1) for x in label)
    value = label_to_json(label)
    return label if _scalar_label(value) else str(label)[:MAX_TEXT]


def frame_evidence(obj: pd.DataFrame | pd.Series, call: str | None = None) -> dict[str, Any]:
    """The JSON evidence of a DataFrame or Series (at most :data:`MAX_ROWS` × :data:`MAX_COLUMNS`)."""
    if isinstance(obj, pd.Series):
        orient, frame = "series", obj.to_frame()
    elif isinstance(obj, pd.DataFrame):
        orient, frame = "frame", obj
    else:
        raise TypeError(f"expected a pandas DataFrame or Series, not {type(obj).__name__}")
    n_rows, n_columns = frame.shape
    part = frame.iloc[:MAX_ROWS, :MAX_COLUMNS]
    dtypes: list[str] = []
    data: list[list[Any]] = []
    for j in range(part.shape[1]):
        column = part.iloc[:, j]
        kind = _dtype_kind(column.dtype)
        dtypes.append(kind)
        data.append([_cell(v, kind) for v in column.tolist()])
    name = call or type(obj).__name__
    evidence = FrameEvidence(
        call=name if _CALL.fullmatch(name) else "table",
        orient=orient,
        series_name=obj.name if isinstance(obj, pd.Series) else None,
        index=[_flat_label(x, part.index.nlevels) for x in part.index],
        index_names=[_flat_label(x, 1) for x in part.index.names],
        columns=[_flat_label(x, part.columns.nlevels) for x in part.columns],
        column_names=[_flat_label(x, 1) for x in part.columns.names],
        dtypes=dtypes,
        data=data,
        n_rows=int(n_rows),
        n_columns=int(n_columns),
    )
    # Through strict JSON, so the kernel's output is built exactly as the checker rebuilds it.
    result: dict[str, Any] = json.loads(json.dumps(evidence.to_json(), allow_nan=False))
    return result


def frame_output(
    obj: pd.DataFrame | pd.Series, policy: Policy | None = None, call: str | None = None
) -> FrameOutput:
    """A :class:`FrameOutput` for a DataFrame or Series (the site's active policy by default)."""
    return FrameOutput(FrameEvidence.from_json(frame_evidence(obj, call)), resolve_policy(policy))


# ---------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------
@dataclass
class FrameEvaluation:
    """A policy applied to a raw table."""

    checks: pd.DataFrame
    status: str
    reasons: list[str]
    suppressed: np.ndarray  # bool (rows, columns): small counts
    withheld: np.ndarray  # bool (rows, columns): non-numeric cells


def _positional(ev: FrameEvidence) -> bool:
    """An unnamed index of integers: what pandas gives the rows of a data set."""
    return (
        len(ev.index_names) == 1
        and ev.index_names[0] is None
        and all(isinstance(x, int) and not isinstance(x, bool) for x in ev.index)
    )


def _identifier_like(kind: str, column: list[Any]) -> bool:
    """A non-numeric column, or integers that are all distinct (record numbers, years of birth)."""
    values = [v for v in column if v is not None]
    if not values:
        return False
    if kind in _NON_NUMERIC_KINDS or any(not _is_number(v) for v in values):
        return True
    return kind == "int" and len(values) >= 2 and len(set(values)) == len(values)


def _single_value_labels(ev: FrameEvidence, policy: Policy) -> list[str]:
    """Statistics the site counts as one person's value (min, max, …) named by a row or column."""
    listed = set(policy.single_value_statistics)
    found: set[str] = set()
    for label in (*ev.index, *ev.columns):
        for part in label if isinstance(label, tuple) else (label,):
            if isinstance(part, str) and part.strip().lower() in listed:
                found.add(part.strip().lower())
    return sorted(found)


def evaluate(ev: FrameEvidence, policy: Policy) -> FrameEvaluation:
    """Apply ``policy`` to a raw table (rules: module docstring)."""
    m = policy.min_count
    r, c = len(ev.index), len(ev.columns)
    suppressed = np.zeros((r, c), dtype=bool)
    withheld = np.zeros((r, c), dtype=bool)
    rows: list[tuple[object, object, str, str, str]] = []
    for j, column in enumerate(ev.data):
        for i, v in enumerate(column):
            if v is None:
                continue
            if not _is_number(v):
                withheld[i, j] = True
            elif v == math.floor(v) and 0 < v < m:
                suppressed[i, j] = True
                rows.append(
                    (
                        ev.index[i],
                        ev.columns[j],
                        "threshold",
                        "fail",
                        f"a whole number below {m}: possibly a count of fewer than {m} "
                        "children (minimum cell count)",
                    )
                )
    reasons: list[str] = []
    fail = False
    if suppressed.any():
        fail = True
        reasons.append(
            f"{int(suppressed.sum())} cell(s) hold whole numbers below {m} (possible small "
            "counts): suppressed, and a raw table cannot be protected by suppression, so it fails"
        )
    row_level: list[str] = []
    if ev.truncated:
        row_level.append("too large to be an aggregate table")
    if ev.n_rows > max(ROW_LEVEL_ROWS, ROWS_PER_COLUMN * ev.n_columns):
        row_level.append("many rows for its columns, like a listing of records")
    if (
        _positional(ev)
        and r >= 2
        and any(_identifier_like(k, col) for k, col in zip(ev.dtypes, ev.data, strict=True))
    ):
        row_level.append(
            "a positional row index with identifier-like or descriptive columns: rows of a "
            "data set, not groups (keep group labels in the index)"
        )
    for detail in row_level:
        fail = True
        rows.append(("table", "rows", "single_value", "fail", f"row-level data: {detail}"))
    if row_level:
        reasons.append("row-level data: " + "; ".join(row_level))
    singles = _single_value_labels(ev, policy)
    for label in singles:
        fail = True
        rows.append(
            (
                "table",
                label,
                "single_value",
                "fail",
                f"a {label} is one child's own value (single-value statistic)",
            )
        )
    if singles:
        reasons.append(
            f"labelled {', '.join(singles)}: one child's own value (single-value statistic)"
        )
    if withheld.any():
        rows.append(
            (
                "table",
                "values",
                "text",
                "review",
                "text, dates and categories are withheld from the releasable table",
            )
        )
        reasons.append(
            f"{int(withheld.sum())} non-numeric cell(s) withheld: only numbers can be checked"
        )
    rows.append(
        (
            "table",
            "all",
            "unchecked",
            "review",
            "not produced by phds_tre.sdc: a reviewer decides",
        )
    )
    reasons.append(
        "not produced by phds_tre.sdc: a reviewer decides (sdc.crosstab, sdc.pivot_table and "
        "sdc.describe make tables that are checked exactly)"
    )
    checks = pd.DataFrame(rows, columns=CHECK_COLUMNS)
    return FrameEvaluation(checks, "fail" if fail else "review", reasons, suppressed, withheld)


def _make_index(labels: list[object], names: list[Any]) -> pd.Index:
    if len(names) > 1:
        if not labels:
            return pd.MultiIndex.from_arrays([[] for _ in names], names=names)
        return pd.MultiIndex.from_tuples(labels, names=names)
    return pd.Index(labels, dtype=object, name=names[0])


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
class FrameOutput(SDCOutput[FrameEvaluation]):
    """A raw pandas table captured in the kernel: never ``pass`` (rules: module docstring).

    ``.table`` is what may be released after review: the numeric cells, with
    possible small counts and every non-numeric cell suppressed (NaN).
    """

    kind = "frame"

    def __init__(self, evidence: FrameEvidence, policy: Policy) -> None:
        super().__init__(policy, evidence.call)
        self._evidence = evidence
        self._eval = evaluate(evidence, policy)
        r, c = len(evidence.index), len(evidence.columns)
        values = np.full((r, c), np.nan)
        for j, column in enumerate(evidence.data):
            for i, v in enumerate(column):
                if _is_number(v) and not self._eval.suppressed[i, j]:
                    values[i, j] = float(v)
        index = _make_index(evidence.index, evidence.index_names)
        if evidence.orient == "series":
            self._table = pd.Series(values[:, 0], index=index, name=evidence.series_name)
        else:
            self._table = pd.DataFrame(
                values, index=index, columns=_make_index(evidence.columns, evidence.column_names)
            )

    def evidence(self) -> dict[str, Any]:
        """The captured values and labels (never released)."""
        return self._evidence.to_json()

    def _table_html(self) -> str:
        table = self.table
        frame = table.to_frame() if isinstance(table, pd.Series) else table
        return str(
            frame.to_html(
                na_rep="<i>suppressed</i>",
                escape=True,
                render_links=False,
                max_rows=SHOWN_ROWS,
                max_cols=SHOWN_COLUMNS,
            )
        )

    def _repr_html_(self) -> str:
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in self.reasons)
        return (
            f'<div class="phds-output"><div>{badge_html(self.status)} captured pandas '
            f"<code>{html.escape(self.call)}</code> (not made with phds_tre.sdc) · policy "
            f"<code>{html.escape(self.policy.hash[7:19])}</code></div>"
            f"{self._table_html()}<ul>{reasons}</ul></div>"
        ).replace("<td><i>suppressed</i></td>", '<td style="color:#888"><i>suppressed</i></td>')

    def __repr__(self) -> str:
        lines = [
            f"[{self.status.upper()}] captured pandas {self.call} (not made with phds_tre.sdc)"
        ]
        if isinstance(self.table, pd.Series):
            lines.append(self.table.to_string(na_rep="suppressed", max_rows=SHOWN_ROWS))
        else:
            shown = self.table.to_string(
                na_rep="suppressed", max_rows=SHOWN_ROWS, max_cols=SHOWN_COLUMNS
            )
            lines.append(shown)
        lines.extend(f"- {r}" for r in self.reasons)
        return "\n".join(lines)


def _from_payload(payload: dict[str, Any], policy: Policy) -> SDCOutput[Any]:
    evidence = payload.get("evidence")
    if not isinstance(evidence, dict):
        raise EvidenceError("the structured output carries no evidence to re-check")
    return FrameOutput(FrameEvidence.from_json(evidence), policy)


register_kind(FrameOutput.kind, _from_payload)
