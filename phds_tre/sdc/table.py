"""Checked tables: evidence, evaluation, suppression and pandas-shaped results.

A :class:`TableEvidence` holds, for each (statistic, value) block, the raw
statistic of every cell and margin and the contributor statistics behind it.
:func:`evaluate` applies a policy: primary suppression of every failing cell,
secondary suppression of additive blocks with margins, rounding of counts,
then the verdict. The same function runs in the researcher's kernel and,
on the evidence, at the site's checker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from phds_tre.sdc.cells import Label, MeasureStats
from phds_tre.sdc.jsonio import array_from_json, array_to_json, label_to_json, labels_from_json
from phds_tre.sdc.output import (
    CHECK_COLUMNS,
    EvidenceError,
    SDCOutput,
    public_rule_counts,
    register_kind,
)
from phds_tre.sdc.policy import Policy
from phds_tre.sdc.rounding import round_counts
from phds_tre.sdc.rules import FAIL, PASS, REVIEW, STATUS_NAMES, RuleResult, evaluate_cells
from phds_tre.sdc.statistics import STATISTICS, Statistic

__all__ = ["Block", "TableEvidence", "TableOutput", "evaluate"]

_MS_FIELDS = ("n_rows", "n", "n_missing", "n_negative", "total", "vmin", "vmax", "m2")


@dataclass
class Block:
    """One statistic of one value column over every cell and margin."""

    stat: Statistic
    value: str | None
    values: np.ndarray  # (R+1, C+1) raw statistic; NaN where undefined
    ms: MeasureStats


@dataclass
class TableEvidence:
    """Everything the rules need to check a table and rebuild its releasable form."""

    call: str
    row_labels: list[Label]
    col_labels: list[Label]
    row_names: list[str | None]
    col_names: list[str | None]
    blocks: list[Block]
    margins: bool
    margins_name: str = "All"
    frequency: bool = False  # counts of rows (crosstab without values): empty cell = 0
    values_level: bool = False
    agg_level: bool = False
    layout: str = "pivot"  # "pivot" | "series" | "describe"
    series_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(R, C) interior cells."""
        return len(self.row_labels), len(self.col_labels)

    # ---- JSON -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Evidence as strict JSON."""
        return {
            "call": self.call,
            "row_labels": [label_to_json(t) for t in self.row_labels],
            "col_labels": [label_to_json(t) for t in self.col_labels],
            "row_names": [label_to_json(n) for n in self.row_names],
            "col_names": [label_to_json(n) for n in self.col_names],
            "margins": self.margins,
            "margins_name": self.margins_name,
            "frequency": self.frequency,
            "values_level": self.values_level,
            "agg_level": self.agg_level,
            "layout": self.layout,
            "series_name": self.series_name,
            "extra": self.extra,
            "blocks": [
                {
                    "stat": b.stat.key,
                    "value": b.value,
                    "values": array_to_json(b.values),
                    "top": array_to_json(b.ms.top),
                    **{f: array_to_json(getattr(b.ms, f)) for f in _MS_FIELDS},
                }
                for b in self.blocks
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableEvidence:
        """Parse and validate evidence; raise :class:`EvidenceError` when inconsistent."""
        try:
            row_labels = labels_from_json(data["row_labels"])
            col_labels = labels_from_json(data["col_labels"])
            r, c = len(row_labels), len(col_labels)
            blocks = []
            for b in data["blocks"]:
                key = b["stat"]
                if key not in STATISTICS:
                    raise EvidenceError(f"unknown statistic {key!r}")
                arrays = {f: array_from_json(b[f]) for f in _MS_FIELDS}
                top = array_from_json(b["top"], fill=-np.inf)
                values = array_from_json(b["values"])
                for name, arr in [*arrays.items(), ("values", values)]:
                    if arr.shape != (r + 1, c + 1):
                        raise EvidenceError(
                            f"block {key!r}: {name} has shape {arr.shape}, expected {(r + 1, c + 1)}"
                        )
                if top.ndim != 3 or top.shape[1:] != (r + 1, c + 1):
                    raise EvidenceError(f"block {key!r}: top has shape {top.shape}")
                ms = MeasureStats(top=top, **arrays)
                blocks.append(Block(STATISTICS[key], b.get("value"), values, ms))
            ev = cls(
                call=str(data["call"]),
                row_labels=row_labels,
                col_labels=col_labels,
                row_names=list(data["row_names"]),
                col_names=list(data["col_names"]),
                blocks=blocks,
                margins=bool(data["margins"]),
                margins_name=str(data.get("margins_name", "All")),
                frequency=bool(data["frequency"]),
                values_level=bool(data["values_level"]),
                agg_level=bool(data["agg_level"]),
                layout=str(data.get("layout", "pivot")),
                series_name=data.get("series_name"),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError) as exc:
            raise EvidenceError(f"evidence is incomplete: missing or malformed {exc}") from None
        ev.validate()
        return ev

    def validate(self) -> None:
        """Internal consistency of the evidence: catches forged or edited statistics.

        The kernel is untrusted, so this cannot prove the statistics came from
        the data; it proves they are arithmetically possible and agree with the
        statistic values they claim to support.
        """
        r, c = self.shape
        if self.layout not in ("pivot", "series", "describe"):
            raise EvidenceError(f"unknown layout {self.layout!r}")
        if self.frequency and any(b.stat.key not in ("size", "count") for b in self.blocks):
            raise EvidenceError("a frequency table can only hold counts")
        for b in self.blocks:
            ms = b.ms
            name = f"block {b.stat.key}({b.value})"
            for f in ("n_rows", "n", "n_missing", "n_negative"):
                arr = getattr(ms, f)
                if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
                    raise EvidenceError(f"{name}: {f} must be non-negative integers")
            if np.any(ms.n + ms.n_missing != ms.n_rows) or np.any(ms.n_negative > ms.n):
                raise EvidenceError(f"{name}: contributor counts do not add up")
            for f in ("n_rows", "n", "n_missing", "n_negative", "total"):
                arr = getattr(ms, f)
                if not (
                    np.allclose(arr[:r, c], arr[:r, :c].sum(1), rtol=1e-9, atol=1e-6)
                    and np.allclose(arr[r, :c], arr[:r, :c].sum(0), rtol=1e-9, atol=1e-6)
                    and np.isclose(arr[r, c], arr[:r, :c].sum(), rtol=1e-9, atol=1e-6)
                ):
                    raise EvidenceError(f"{name}: margins of {f} are not the sums of the cells")
            top = ms.top
            finite = np.isfinite(top)
            if top.shape[0] >= 2 and np.any(top[1:] > top[:-1]):
                raise EvidenceError(f"{name}: largest contributions are not in descending order")
            present = finite.sum(axis=0)
            if np.any(present > ms.n):
                raise EvidenceError(f"{name}: more largest contributions than contributors")
            if b.stat.magnitude or b.stat.order:
                if b.value is None:
                    raise EvidenceError(f"{name}: a {b.stat.name} needs a values column")
                # Dominance is judged on these: a missing contribution would hide one.
                if np.any(present < np.minimum(ms.n, top.shape[0])):
                    raise EvidenceError(f"{name}: number of largest contributions does not match n")
            if b.value is not None:
                nonneg = ms.n_negative == 0
                topsum = np.where(finite, top, 0).sum(axis=0)
                if np.any(nonneg & (topsum > ms.total * (1 + 1e-9) + 1e-6)):
                    raise EvidenceError(f"{name}: largest contributions exceed the cell total")
            expected = _derived_statistic(b)
            if expected is not None:
                both = np.isfinite(expected) | np.isfinite(b.values)
                if not np.allclose(
                    np.where(both, b.values, 0), np.where(both, expected, 0), rtol=1e-7, atol=1e-7
                ) or np.any(np.isfinite(expected) != np.isfinite(b.values)):
                    raise EvidenceError(
                        f"{name}: the published statistic does not agree with its contributor statistics"
                    )


def _derived_statistic(b: Block) -> np.ndarray | None:
    """The statistic recomputed from contributor statistics, where that is possible.

    Empty cells are NaN for every statistic, as :func:`statistic_values` makes them.
    """
    derived = _derived(b)
    if derived is not None:
        derived = np.where(b.ms.n_rows == 0, np.nan, derived)
    return derived


def _derived(b: Block) -> np.ndarray | None:
    ms = b.ms
    n = ms.n.astype(np.float64)
    key = b.stat.key
    with np.errstate(invalid="ignore", divide="ignore"):
        if key == "size":
            return ms.n_rows.astype(np.float64)
        if key == "count":
            return n
        if key == "sum":
            return ms.total
        if key == "mean":
            return np.where(n > 0, ms.total / n, np.nan)
        if key in ("var", "std", "var0", "std0"):
            ddof = 0 if key.endswith("0") else 1
            var = np.where(n > ddof, np.maximum(ms.m2 / (n - ddof), 0), np.nan)
            return np.sqrt(var) if key.startswith("std") else var
        if key == "max":
            return np.where(n > 0, ms.top[0], np.nan)
    return None


@dataclass
class Evaluation:
    """A policy applied to evidence."""

    checks: pd.DataFrame
    published: list[np.ndarray]  # per block, releasable values (NaN = suppressed)
    suppressed: list[np.ndarray]
    status: str
    reasons: list[str]
    primary: list[np.ndarray]
    secondary: list[np.ndarray]
    required: list[np.ndarray | None]


def _suppression_base(block: Block, policy: Policy) -> tuple[np.ndarray, np.ndarray]:
    """The non-negative additive table secondary suppression protects, and the width required.

    Counts: the counts, ``protection`` wide. Sums of a non-negative magnitude:
    the sums, each at least ±p% of its value wide. Sums with negative values
    have no non-negativity bound, so the pattern is chosen on the cells' row
    counts: every suppressed cell then lies on a cycle of suppressed cells and
    its sum is unbounded.
    """
    if block.stat.key in ("size", "count"):
        base = np.nan_to_num(block.values)
        return base, np.full(base.shape, float(policy.effective_protection))
    if block.ms.n_negative.any():
        base = block.ms.n_rows.astype(np.float64)
        return base, np.full(base.shape, float(policy.effective_protection))
    base = np.abs(np.nan_to_num(block.values))
    return base, np.maximum(2.0 * policy.p_ratio * base, 1.0)


def evaluate(ev: TableEvidence, policy: Policy) -> Evaluation:
    """Apply ``policy`` to evidence: rules, suppression, rounding, verdict."""
    from phds_tre.sdc.suppression import secondary_suppression

    r, c = ev.shape
    show_margins = ev.margins
    row_disp, col_disp = _display_labels(ev)
    check_parts: list[pd.DataFrame] = []
    published, suppressed_all, primaries, secondaries, requireds = [], [], [], [], []
    fail_published = review_published = False
    n_primary = n_secondary = n_unprotected = 0
    primary_rules: dict[str, int] = {}
    review_rules: dict[str, int] = {}
    has_cols = bool(ev.col_names)
    visible = np.zeros((r + 1, c + 1), dtype=bool)
    visible[:r, :c] = True
    if show_margins:
        visible[r, :c] = True
        if has_cols:  # without column keys pandas adds an 'All' row but no 'All' column
            visible[:r, c] = True
            visible[r, c] = True
    for bi, block in enumerate(ev.blocks):
        results = evaluate_cells(block.stat, block.ms, policy, ev.frequency)
        primary = np.zeros((r + 1, c + 1), dtype=bool)
        for res in results:
            failing = res.applies & (res.status == FAIL) & visible
            primary |= failing
            if failing.any():
                primary_rules[res.rule] = primary_rules.get(res.rule, 0) + int(failing.sum())
        secondary = np.zeros_like(primary)
        unprotected = np.zeros_like(primary)
        required: np.ndarray | None = None
        if show_margins and block.stat.additive and primary.any():
            base, required = _suppression_base(block, policy)
            wanted = primary & visible
            if not has_cols:
                # One column: the hidden row totals equal the cells, so they share their fate.
                wanted[:, c] = wanted[:, 0]
            sup = secondary_suppression(base, wanted, required, margins=True)
            secondary = sup.secondary & ~primary
            unprotected = sup.unprotected & visible
            if not has_cols:
                secondary[:, 0] |= secondary[:, c]
                unprotected[:, 0] |= sup.unprotected[:, c]
            secondary &= visible
        suppressed = (primary | secondary) & visible
        values = block.values.astype(np.float64).copy()
        if ev.frequency:
            values = np.where(block.ms.n_rows == 0, 0.0, values)
        if block.stat.key in ("size", "count"):
            values = round_counts(values, policy.rounding)
        values[suppressed] = np.nan
        values[~visible] = np.nan
        published.append(values)
        suppressed_all.append(suppressed)
        primaries.append(primary)
        secondaries.append(secondary)
        requireds.append(required)
        n_primary += int(primary.sum())
        n_secondary += int(secondary.sum())
        n_unprotected += int(unprotected.sum())
        shown = visible & ~suppressed
        for res in results:
            fail_published |= bool((res.applies & shown & (res.status == FAIL)).any())
            rev = res.applies & shown & (res.status == REVIEW)
            if rev.any():
                review_published = True
                review_rules[res.rule] = review_rules.get(res.rule, 0) + int(rev.sum())
        if secondary.any():
            results.append(
                RuleResult(
                    "secondary",
                    secondary,
                    np.full(secondary.shape, PASS, dtype=np.int8),
                    (
                        "suppressed so that no suppressed cell can be recomputed from the margins",
                        "",
                        "",
                    ),
                )
            )
        if unprotected.any():
            results.append(
                RuleResult(
                    "secondary",
                    unprotected,
                    np.full(unprotected.shape, FAIL, dtype=np.int8),
                    (
                        "",
                        "",
                        "this suppressed cell could still be estimated too closely from the margins",
                    ),
                )
            )
        block_rows = _block_rows(ev, bi, row_disp)
        check_parts.append(_checks_frame(results, visible, block_rows, col_disp[bi]))
    checks = (
        pd.concat(check_parts, ignore_index=True)
        if check_parts
        else pd.DataFrame({c_: pd.Series(dtype=object) for c_ in CHECK_COLUMNS})
    )
    reasons: list[str] = []
    for rule, count in sorted(public_rule_counts(primary_rules).items()):
        reasons.append(f"{count} cell(s) suppressed by the {rule} rule")
    if n_secondary:
        reasons.append(
            f"{n_secondary} further cell(s) suppressed so that suppressed cells cannot be recomputed"
        )
    if policy.rounding != "none" and any(b.stat.key in ("size", "count") for b in ev.blocks):
        reasons.append(f"counts rounded ({policy.rounding}); margins rounded independently")
    for rule, count in sorted(review_rules.items()):
        reasons.append(f"{count} published cell(s) need review ({rule})")
    if n_unprotected or fail_published:
        status = "fail"
        if n_unprotected:
            reasons.append(
                f"{n_unprotected} suppressed cell(s) could not be protected from recomputation"
            )
    elif review_published:
        status = "review"
    elif n_primary:
        status = policy.suppressed_verdict
        if status == "review":
            reasons.append(
                "suppression was applied: the site's policy has a reviewer confirm suppressed tables"
            )
    else:
        status = "pass"
    if not reasons:
        reasons.append("every cell passed every rule")
    return Evaluation(
        checks, published, suppressed_all, status, reasons, primaries, secondaries, requireds
    )


def _checks_frame(
    results: list[RuleResult], visible: np.ndarray, row_disp: list[object], col_disp: list[object]
) -> pd.DataFrame:
    parts = []
    for res in results:
        ii, jj = np.nonzero(res.applies & visible)
        if not len(ii):
            continue
        status = res.status[ii, jj]
        detail = np.asarray(res.details, dtype=object)[status]
        parts.append(
            pd.DataFrame(
                {
                    "row": _take(row_disp, ii),
                    "column": _take(col_disp, jj),
                    "rule": res.rule,
                    "status": np.asarray(STATUS_NAMES, dtype=object)[status],
                    "detail": detail,
                }
            )
        )
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in CHECK_COLUMNS})
    return pd.concat(parts, ignore_index=True)


def _take(labels: list[object], idx: np.ndarray) -> np.ndarray:
    arr = np.empty(len(labels), dtype=object)
    arr[:] = labels
    return arr[idx]


def _simplify(label: tuple[object, ...]) -> object:
    return label[0] if len(label) == 1 else label


def _margin_label(name: str, nlevels: int) -> tuple[object, ...]:
    return (name,) + ("",) * (nlevels - 1)


def _display_labels(ev: TableEvidence) -> tuple[list[object], list[list[object]]]:
    """Row labels and, per block, column labels as they appear in the result table."""
    nrow_levels = max(len(ev.row_names), 1)
    rows: list[object] = [_simplify(t) for t in ev.row_labels]
    rows.append(_simplify(_margin_label(ev.margins_name, nrow_levels)))
    ncol_levels = len(ev.col_names)
    per_block = []
    for b in ev.blocks:
        if ev.layout == "describe":
            # A describe block is one cell: its column is the variable (rows: _block_rows).
            variable: list[object] = [b.value] * (len(ev.col_labels) + 1)
            per_block.append(variable)
            continue
        prefix: tuple[object, ...] = ()
        if ev.agg_level:
            prefix += (b.stat.name,)
        if ev.values_level:
            prefix += (b.value,)
        cols: list[object] = []
        for t in [*ev.col_labels, _margin_label(ev.margins_name, max(ncol_levels, 1))]:
            full = prefix + (t if ncol_levels else ())
            cols.append(_simplify(full) if full else ev.series_name)
        per_block.append(cols)
    return rows, per_block


def _block_rows(ev: TableEvidence, bi: int, rows: list[object]) -> list[object]:
    """Row labels of block ``bi``: a describe block's one cell is labelled by its statistic row."""
    if ev.layout == "describe":
        return [ev.extra["block_rows"][bi]] * len(rows)
    return rows


def _index(labels: list[object], names: list[str | None]) -> pd.Index:
    if labels and isinstance(labels[0], tuple):
        return pd.MultiIndex.from_tuples(labels, names=names)
    if not labels and len(names) > 1:
        return pd.MultiIndex.from_arrays([[] for _ in names], names=names)
    return pd.Index(labels, name=names[0] if names else None)


class TableOutput(SDCOutput[Evaluation]):
    """A checked table (crosstab, pivot table, frequency list, histogram counts, summary)."""

    kind = "table"

    def __init__(self, evidence: TableEvidence, policy: Policy) -> None:
        super().__init__(policy, evidence.call)
        self._evidence = evidence
        self._eval = evaluate(evidence, policy)
        self._table = self._shape()

    @property
    def suppressed(self) -> pd.DataFrame | pd.Series:
        """Boolean mask of suppressed cells, shaped like :attr:`table`."""
        return self._shape(masks=True)

    def evidence(self) -> dict[str, Any]:
        """The private contributor statistics (never released)."""
        return self._evidence.to_json()

    def audit(self) -> pd.DataFrame:
        """Exact intervals of every suppressed cell of additive blocks, by linear programming.

        Columns: row, column, lower, upper, width, required, protected. The
        bounds are what anyone could infer from the published cells, the
        margins and non-negativity; ``protected`` says whether the width
        reaches the policy's protection. Tables without margins publish no
        relation, so their suppressed cells are unbounded above.
        """
        from phds_tre.sdc.suppression import protection_intervals

        ev = self._evidence
        row_disp, col_disp = _display_labels(ev)
        frames = []
        for bi, block in enumerate(ev.blocks):
            sup = self._eval.suppressed[bi]
            if not sup.any() or not block.stat.additive:
                continue
            base, required = _suppression_base(block, self.policy)
            if ev.margins:
                hidden = sup
                if not ev.col_names:
                    # One column (series layout): the unshown row totals are the cells
                    # themselves, so they are hidden exactly when their cell is (as in evaluate).
                    hidden = sup.copy()
                    hidden[:, -1] = sup[:, 0]
                iv = protection_intervals(base, hidden, margins=True)
                lower, upper = iv.lower, iv.upper
            else:
                lower = np.where(sup, 0.0, np.nan)
                upper = np.where(sup, np.inf, np.nan)
            ii, jj = np.nonzero(sup)
            width = upper[ii, jj] - lower[ii, jj]
            frames.append(
                pd.DataFrame(
                    {
                        "row": _take(_block_rows(ev, bi, row_disp), ii),
                        "column": _take(col_disp[bi], jj),
                        "lower": lower[ii, jj],
                        "upper": upper[ii, jj],
                        "width": width,
                        "required": required[ii, jj],
                        "protected": width >= required[ii, jj] - 1e-9,
                    }
                )
            )
        if not frames:
            return pd.DataFrame(
                columns=["row", "column", "lower", "upper", "width", "required", "protected"]
            )
        return pd.concat(frames, ignore_index=True)

    def _shape(self, masks: bool = False) -> pd.DataFrame | pd.Series:
        ev = self._evidence
        r, c = ev.shape
        arrays = self._eval.suppressed if masks else self._eval.published
        nrows = r + 1 if ev.margins else r
        row_disp, col_disp = _display_labels(ev)
        has_cols = bool(ev.col_names)
        ncols = c + 1 if (ev.margins and has_cols) else c
        if ev.layout == "series":
            arr = arrays[0][:nrows, 0]
            series_data = arr.astype(bool) if masks else _maybe_int(arr, ev.blocks[0].stat)
            return pd.Series(
                series_data, index=_index(row_disp[:nrows], ev.row_names), name=ev.series_name
            )
        if ev.layout == "describe":
            return _describe_frame(ev, arrays, masks)
        # Unlike pandas' dropna=True, a row or column whose raw statistics are all NaN
        # (the std of one-child groups, the mean of a declared but empty category) is
        # shown, suppressed: leaving it out would publish that its group has one child
        # or none, without the rules ever seeing the cell.
        columns: list[object] = []
        data: dict[int, np.ndarray] = {}
        pos = 0
        for bi, block in enumerate(ev.blocks):
            for j in range(ncols):
                arr = arrays[bi][:nrows, j]
                data[pos] = arr.astype(bool) if masks else _maybe_int(arr, block.stat)
                columns.append(col_disp[bi][j])
                pos += 1
        frame = pd.DataFrame(data)
        frame.index = _index(list(row_disp[:nrows]), ev.row_names)
        col_level_names = [None] * (int(ev.agg_level) + int(ev.values_level)) + list(ev.col_names)
        frame.columns = _index(columns, col_level_names or [None])
        return frame


def _maybe_int(arr: np.ndarray, stat: Statistic) -> np.ndarray:
    """Counts stay integers when nothing in the column is suppressed, as in pandas."""
    if stat.key in ("size", "count") and np.all(np.isfinite(arr)):
        return arr.astype(np.int64)
    return arr


def _describe_frame(ev: TableEvidence, arrays: list[np.ndarray], masks: bool) -> pd.DataFrame:
    """describe() layout: one row per statistic, one column per variable."""
    stat_rows: list[str] = ev.extra["rows"]
    variables: list[str] = ev.extra["variables"]
    block_rows: list[str] = ev.extra["block_rows"]
    # Every (statistic, variable) cell must come from exactly one block: a forged
    # payload must not leave a cell filled by default or fill one twice.
    unique = len(set(stat_rows)) == len(stat_rows) and len(set(variables)) == len(variables)
    if len(block_rows) != len(ev.blocks) or not unique:
        raise EvidenceError("describe evidence: rows, variables and blocks do not match")
    cells = {(row, block.value) for row, block in zip(block_rows, ev.blocks, strict=True)}
    if len(cells) != len(ev.blocks) or cells != {(r_, v) for r_ in stat_rows for v in variables}:
        raise EvidenceError("describe evidence: each (statistic, variable) needs exactly one block")
    # pandas fills an empty bool frame with True: start from explicit values instead.
    shape = (len(stat_rows), len(variables))
    data = np.zeros(shape, dtype=bool) if masks else np.full(shape, np.nan)
    out = pd.DataFrame(data, index=pd.Index(stat_rows), columns=pd.Index(variables))
    for bi, block in enumerate(ev.blocks):
        out.loc[block_rows[bi], block.value] = arrays[bi][0, 0]
    return out


def _from_payload(payload: dict[str, Any], policy: Policy) -> SDCOutput[Any]:
    evidence = payload.get("evidence")
    if not isinstance(evidence, dict):
        raise EvidenceError("the structured output carries no evidence to re-check")
    return TableOutput(TableEvidence.from_json(evidence), policy)


register_kind(TableOutput.kind, _from_payload)
