"""Pooled counts and summaries across sites, from what the sites released.

:func:`pool_counts` adds count tables whose cells may be suppressed or rounded.
A suppressed or rounded cell is never guessed: every site's cell becomes the
interval of true counts consistent with everything the site released and the
rules it applied, and the pooled cell is the sum of those intervals. The
intervals are guaranteed to contain the truth, and they are tight:

* a published count ``x`` is exact (no rounding) or the interval of counts that
  round to ``x`` (:func:`phds_tre.sdc.rounding.interval`); a published count
  also passed the threshold, so it is ``0`` or at least ``min_count``;
* a cell suppressed by the threshold (primary) is in ``[1, min_count - 1]``, or
  ``[0, min_count - 1]`` when the policy suppresses zeros too;
* a cell suppressed to protect another (secondary) passed every rule, so it is
  at least ``min_count`` (or ``0`` when zeros are not disclosive); its upper
  bound comes from the margins;
* with margins, every site's table is then tightened by linear programming
  (``scipy.optimize.linprog``, HiGHS): each cell is minimised and maximised
  subject to the additivity of rows and columns and the boxes above. The
  constraint matrix of a table with margins is totally unimodular, so the LP
  bounds of integer boxes are integers: the sharpest bounds the release allows.

Sites are independent, so the pooled interval (sum of the sites' minima and
maxima) is tight too. The released payload carries the hash of the policy it
was checked with, not the policy itself: pass each site's published policy
(``policies=``); its hash is checked against the payload.

:func:`pool_summary` pools n, mean and SD (or a proportion) exactly from each
site's sufficient statistics; a site whose statistic was suppressed or rounded
is reported as dropped, never estimated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import optimize, sparse

from phds_tre.sdc.jsonio import label_from_json
from phds_tre.sdc.policy import DEFAULT_POLICY, Policy
from phds_tre.sdc.rounding import interval as rounding_interval

__all__ = [
    "PooledCounts",
    "PooledSummary",
    "SiteCounts",
    "pool_counts",
    "pool_summary",
    "site_counts",
]

FloatArray = npt.NDArray[np.float64]
PolicyArg = Policy | Mapping[str, Policy] | None

#: Rules that can appear in the checks of a released table of counts.
_COUNT_RULES = {"threshold", "zeros", "secondary"}
#: Calls whose released table is a frequency table (counts of children).
_COUNT_CALLS = {"crosstab", "value_counts", "hist"}


# ---- site policies ----------------------------------------------------------


def _policy_for(site: str, payload: Mapping[str, Any] | None, policies: PolicyArg) -> Policy:
    """The disclosure policy a site's output was checked with, verified against its hash."""
    claimed = payload.get("policy_hash") if payload is not None else None
    policy: Policy | None = None
    if payload is not None and isinstance(payload.get("policy"), dict):
        policy = Policy.from_mapping(payload["policy"], source=f"site {site!r} payload policy")
    elif isinstance(policies, Policy):
        policy = policies
    elif isinstance(policies, Mapping) and site in policies:
        policy = policies[site]
    elif claimed == DEFAULT_POLICY.hash:
        policy = DEFAULT_POLICY
    if policy is None:
        raise ValueError(
            f"site {site!r}: no disclosure policy given; pass the site's published policy "
            "(policies={site: Policy}) so suppressed and rounded cells can be bounded"
        )
    if claimed is not None and claimed != policy.hash:
        raise ValueError(
            f"site {site!r}: the output was checked with policy {str(claimed)[:19]}…, "
            f"not the policy given ({policy.hash[:19]}…)"
        )
    return policy


def _named(tables: Mapping[str, Any] | Sequence[Any], what: str) -> list[tuple[str, Any]]:
    if isinstance(tables, Mapping):
        items = [(str(k), v) for k, v in tables.items()]
    elif isinstance(tables, (list, tuple)):
        items = [(f"site {i + 1}", v) for i, v in enumerate(tables)]
    else:
        raise TypeError(f"{what} must be a mapping of site name to {what[:-1]} or a list")
    if not items:
        raise ValueError(f"no {what} to pool")
    return items


# ---- one site's released counts ---------------------------------------------


@dataclass(frozen=True)
class SiteCounts:
    """One site's released count table as intervals (margins always present).

    ``low``/``high`` have shape ``(R+1, C+1)``; the last row and column are the
    margins (released, or the sums of the cells' intervals when the site
    released none). ``origin`` says where each interval comes from.
    """

    site: str
    rows: list[object]
    columns: list[object]
    published: FloatArray
    low: FloatArray
    high: FloatArray
    origin: npt.NDArray[np.object_]
    margins_released: bool
    tightened: bool


def _key(label: object) -> str:
    return json.dumps(label, sort_keys=True, default=str)


def _is_margin(label: Any, margins_name: str) -> bool:
    first = label[0] if isinstance(label, list) and label else label
    return bool(first == margins_name)


def site_counts(
    site: str,
    table: Mapping[str, Any] | pd.DataFrame | pd.Series,
    policy: Policy,
    margins_name: str = "All",
) -> SiteCounts:
    """The intervals of one site's released count table (see the module docstring)."""
    if isinstance(table, (pd.DataFrame, pd.Series)):
        return _from_frame(site, table, policy, margins_name)
    return _from_payload(site, table, policy, margins_name)


def _from_payload(
    site: str, payload: Mapping[str, Any], policy: Policy, margins_name: str
) -> SiteCounts:
    if payload.get("schema") != "phds.output" or "table" not in payload:
        raise ValueError(f"site {site!r}: not a released phds output payload")
    call = payload.get("call")
    if call not in _COUNT_CALLS:
        raise ValueError(
            f"site {site!r}: a {call!r} output is not a table of counts "
            f"(pool outputs of {', '.join(sorted(_COUNT_CALLS))})"
        )
    summary = payload.get("checks", {}).get("summary", {})
    other = set(summary) - _COUNT_RULES
    if other:
        raise ValueError(
            f"site {site!r}: the table was checked by {', '.join(sorted(other))} rules, "
            "so it holds statistics other than counts of children"
        )
    if payload.get("status") == "fail":
        raise ValueError(f"site {site!r}: the output failed its disclosure check; it is no release")
    tab = payload["table"]
    index, columns = list(tab["index"]), list(tab["columns"])
    data = np.array(
        [[np.nan if x is None else float(x) for x in row] for row in tab["data"]], dtype=np.float64
    ).reshape(len(index), len(columns))
    margins = (
        tab.get("orient") == "frame"
        and len(index) > 1
        and len(columns) > 1
        and _is_margin(index[-1], margins_name)
        and _is_margin(columns[-1], margins_name)
    )
    primary = np.zeros(data.shape, dtype=bool)
    rows_at = {_key(x): i for i, x in enumerate(index)}
    cols_at = {_key(x): j for j, x in enumerate(columns)}
    for check in payload.get("checks", {}).get("not_pass", []):
        if check.get("status") != "fail" or check.get("rule") not in ("threshold", "zeros"):
            continue
        i, j = rows_at.get(_key(check.get("row"))), cols_at.get(_key(check.get("column")))
        if i is None or j is None:
            raise ValueError(f"site {site!r}: a failed check names a cell not in the table")
        primary[i, j] = True
    suppressed = np.isnan(data)
    if np.any(primary & ~suppressed):
        raise ValueError(f"site {site!r}: a cell that failed a rule is published; not a release")
    n_secondary = int(summary.get("secondary", {}).get("pass", 0))
    if int((suppressed & ~primary).sum()) != n_secondary:
        raise ValueError(
            f"site {site!r}: {int((suppressed & ~primary).sum())} missing cell(s) are neither "
            f"primary nor the {n_secondary} secondary suppression(s) the checks record; "
            "cannot tell suppressed cells from empty ones"
        )
    rows = [label_from_json(x) for x in (index[:-1] if margins else index)]
    cols = [label_from_json(x) for x in (columns[:-1] if margins else columns)]
    return _bounded(site, rows, cols, data, primary, suppressed & ~primary, policy, bool(margins))


def _from_frame(
    site: str, table: pd.DataFrame | pd.Series, policy: Policy, margins_name: str
) -> SiteCounts:
    frame = table.to_frame() if isinstance(table, pd.Series) else table
    try:
        data = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        raise ValueError(f"site {site!r}: the table must hold counts (numbers or NaN)") from None
    index, columns = list(frame.index), list(frame.columns)
    margins = (
        len(index) > 1
        and len(columns) > 1
        and _is_margin(list(index[-1]) if isinstance(index[-1], tuple) else index[-1], margins_name)
        and _is_margin(
            list(columns[-1]) if isinstance(columns[-1], tuple) else columns[-1], margins_name
        )
    )
    suppressed = np.isnan(data)
    rows = index[:-1] if margins else index
    cols = columns[:-1] if margins else columns
    # A plain table does not say which missing cells were primary: each is
    # either [0|1, t-1] or [t|0, inf), so only [0, inf) is guaranteed.
    unknown = np.zeros(data.shape, dtype=bool)
    return _bounded(site, rows, cols, data, unknown, suppressed, policy, margins, unknown_kind=True)


def _bounded(
    site: str,
    rows: list[object],
    cols: list[object],
    data: FloatArray,
    primary: npt.NDArray[np.bool_],
    secondary: npt.NDArray[np.bool_],
    policy: Policy,
    margins: bool,
    unknown_kind: bool = False,
) -> SiteCounts:
    published = data[~np.isnan(data)]
    if np.any(published < 0) or np.any(published != np.round(published)):
        raise ValueError(f"site {site!r}: published counts must be non-negative integers")
    t = policy.min_count
    zeros = policy.zeros_disclosive
    low = np.empty(data.shape)
    high = np.empty(data.shape)
    origin = np.empty(data.shape, dtype=object)
    for (i, j), x in np.ndenumerate(data):
        if primary[i, j]:
            low[i, j], high[i, j] = (0.0 if zeros else 1.0), float(t - 1)
            origin[i, j] = (
                f"suppressed (under the threshold {t}{', zeros suppressed' if zeros else ''})"
            )
        elif secondary[i, j]:
            if unknown_kind:
                low[i, j], high[i, j] = 0.0, math.inf
                origin[i, j] = "suppressed (primary or secondary not recorded)"
            else:
                low[i, j], high[i, j] = (float(t) if zeros else 0.0), math.inf
                origin[i, j] = "suppressed to protect another cell (passed the threshold)"
        else:
            lo, hi = rounding_interval(float(x), policy.rounding)
            # A published count passed the threshold on its unrounded value: it is
            # at least t, or 0 when the policy lets zeros through.
            if zeros or lo > 0:
                lo = max(lo, float(t))
            elif hi < t:
                hi = 0.0
            if lo > hi:
                raise ValueError(
                    f"site {site!r}: the published count {x:g} cannot pass the threshold {t} "
                    f"under rounding {policy.rounding!r}; is it the site's policy?"
                )
            low[i, j], high[i, j] = lo, hi
            origin[i, j] = (
                f"published {x:g}"
                if policy.rounding == "none"
                else f"published {x:g}, rounded ({policy.rounding})"
            )
    tightened = False
    if margins:
        new_low, new_high = _tighten(site, low, high)
        changed = (new_low != low) | (new_high != high)
        for i, j in zip(*np.nonzero(changed), strict=True):
            origin[i, j] += "; tightened by the table's additivity with its margins (LP)"
        low, high, tightened = new_low, new_high, bool(changed.any())
    else:
        low, high = _with_margins(low), _with_margins(high)
        extra = np.full(
            low.shape, "sum of the cells' intervals (no margins released)", dtype=object
        )
        extra[:-1, :-1] = origin
        origin = extra
        shown = np.full(low.shape, np.nan)
        shown[:-1, :-1] = data
        data = shown
    return SiteCounts(site, list(rows), list(cols), data, low, high, origin, margins, tightened)


def _with_margins(a: FloatArray) -> FloatArray:
    r, c = a.shape
    out = np.empty((r + 1, c + 1))
    out[:r, :c] = a
    out[:r, c] = a.sum(axis=1)
    out[r, :c] = a.sum(axis=0)
    out[r, c] = a.sum()
    return out


def _tighten(site: str, low: FloatArray, high: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Sharpest bounds of every cell of a table with margins: two LPs per uncertain cell."""
    r, c = low.shape[0] - 1, low.shape[1] - 1
    n = (r + 1) * (c + 1)
    idx = np.arange(n).reshape(r + 1, c + 1)
    rows_eq, cols_eq, vals = [], [], []
    eq = 0
    # Interior row i: Σ_j x[i, j] − x[i, c] = 0; column j likewise; and Σ_i x[i, c] − x[r, c] = 0.
    for i in range(r + 1):
        for j in range(c):
            rows_eq.append(eq)
            cols_eq.append(int(idx[i, j]))
            vals.append(1.0)
        rows_eq.append(eq)
        cols_eq.append(int(idx[i, c]))
        vals.append(-1.0)
        eq += 1
    for j in range(c + 1):
        for i in range(r):
            rows_eq.append(eq)
            cols_eq.append(int(idx[i, j]))
            vals.append(1.0)
        rows_eq.append(eq)
        cols_eq.append(int(idx[r, j]))
        vals.append(-1.0)
        eq += 1
    a_eq = sparse.csr_array((vals, (rows_eq, cols_eq)), shape=(eq, n))
    b_eq = np.zeros(eq)
    bounds = [
        (float(lo), None if math.isinf(hi) else float(hi))
        for lo, hi in zip(low.ravel(), high.ravel(), strict=True)
    ]

    def solve(cost: FloatArray) -> optimize.OptimizeResult:
        return optimize.linprog(cost, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")

    check = solve(np.zeros(n))
    if check.status == 2:
        raise ValueError(
            f"site {site!r}: the released table does not add up under the policy given "
            "(no table of counts matches it); is it the site's policy?"
        )
    if check.status != 0:
        raise RuntimeError(f"site {site!r}: LP feasibility check failed: {check.message}")
    lo_out, hi_out = low.ravel().copy(), high.ravel().copy()
    cost = np.zeros(n)
    for k in np.flatnonzero(lo_out < hi_out):
        cost[k] = 1.0
        res = solve(cost)
        if res.status != 0:
            raise RuntimeError(f"site {site!r}: LP minimising a cell failed: {res.message}")
        # Counts are integers: round the LP bound inwards, allowing for solver tolerance.
        lo_out[k] = max(lo_out[k], math.ceil(float(res.fun) - 1e-6))
        cost[k] = -1.0
        res = solve(cost)
        if res.status == 0:
            hi_out[k] = min(hi_out[k], math.floor(-float(res.fun) + 1e-6))
        elif res.status != 3:
            raise RuntimeError(f"site {site!r}: LP maximising a cell failed: {res.message}")
        cost[k] = 0.0
    return lo_out.reshape(low.shape), hi_out.reshape(high.shape)


# ---- pooled counts ---------------------------------------------------------


@dataclass(frozen=True)
class PooledCounts:
    """Counts added over sites as guaranteed intervals.

    ``low`` and ``high`` are DataFrames with the pooled cells and a margin row
    and column (``margins_name``); ``high`` is ``inf`` where nothing bounds a
    cell. ``origins`` has one row per (cell, site): what the site published and
    why its interval is what it is; ``site_tables`` holds each site's intervals.
    """

    low: pd.DataFrame
    high: pd.DataFrame
    sites: tuple[str, ...]
    origins: pd.DataFrame
    site_tables: tuple[SiteCounts, ...]
    method: str = "linear programming on each site's table with its margins"
    margins_name: str = "All"

    @property
    def exact(self) -> pd.DataFrame:
        """The pooled count where it is known exactly, NaN elsewhere."""
        return self.low.where(self.low == self.high)

    def to_frame(self, text: bool = True) -> pd.DataFrame:
        """The pooled table: ``"low–high"`` strings (a number where exact), or long form.

        With ``text=False``: one row per cell with columns row, column, low,
        high, exact.
        """
        if text:

            def fmt(lo: float, hi: float) -> str:
                if lo == hi:
                    return f"{lo:.0f}"
                return f"{lo:.0f}–{'∞' if math.isinf(hi) else f'{hi:.0f}'}"

            values = [
                [fmt(lo, hi) for lo, hi in zip(lrow, hrow, strict=True)]
                for lrow, hrow in zip(self.low.to_numpy(), self.high.to_numpy(), strict=True)
            ]
            return pd.DataFrame(values, index=self.low.index, columns=self.low.columns)
        long = self.low.stack(future_stack=True).rename("low").to_frame()
        long["high"] = self.high.stack(future_stack=True)
        long["exact"] = long["low"].where(long["low"] == long["high"])
        long.index.names = ["row", "column"]
        return long.reset_index()

    def explain(self, row: object, column: object) -> str:
        """Why the pooled cell has its interval, one line per site."""
        part = self.origins[(self.origins["row"] == row) & (self.origins["column"] == column)]
        if part.empty:
            raise KeyError(f"no cell ({row!r}, {column!r}) in the pooled table")
        lo, hi = float(self.low.loc[row, column]), float(self.high.loc[row, column])
        lines = [f"({row}, {column}): {_fmt_interval(lo, hi)} = sum over {len(part)} site(s)"]
        for rec in part.itertuples(index=False):
            lines.append(f"  {rec.site}: {_fmt_interval(rec.low, rec.high)} — {rec.origin}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_frame().to_string()


def _fmt_interval(lo: float, hi: float) -> str:
    if lo == hi:
        return f"{lo:.0f}"
    return f"[{lo:.0f}, {'∞' if math.isinf(hi) else f'{hi:.0f}'}]"


def pool_counts(
    tables: Mapping[str, Any] | Sequence[Any],
    policies: PolicyArg = None,
    absent: str = "error",
    margins_name: str = "All",
) -> PooledCounts:
    """Add count tables released by several sites; unknown cells become intervals.

    Args:
        tables: per site (a mapping site → table, or a list), a released payload
            of a checked ``crosstab``, ``value_counts`` or ``hist`` (the JSON of
            ``application/vnd.phds.output+json``), or a pandas DataFrame/Series
            with NaN for suppressed cells and the margins as the last row and
            column labelled ``margins_name`` (when released). A plain table
            does not record which missing cells were primary, so each is only
            known to be ``>= 0`` before the margins bound it; its published
            cells are taken to have passed the policy's threshold.
        policies: each site's published disclosure policy (one :class:`Policy`
            for all sites, or a mapping site → Policy); needed because a release
            carries only the policy's hash, which is checked. A payload that
            carries its policy, or whose hash is the default policy's, needs none.
        absent: a row or column label missing from a site's table is an error
            (``"error"``), or a count of zero at that site (``"zero"``: a
            crosstab omits categories nobody at the site has).
        margins_name: the label of released margins.

    Raises:
        ValueError: a table that is not of counts, a policy that does not match
            the hash, a table that cannot arise under its policy, labels that
            differ between sites with ``absent="error"``.
    """
    if absent not in ("error", "zero"):
        raise ValueError(f"absent must be 'error' or 'zero', got {absent!r}")
    items = _named(tables, "tables")
    sites = []
    for name, table in items:
        payload = None if isinstance(table, (pd.DataFrame, pd.Series)) else table
        if payload is not None and not isinstance(payload, Mapping):
            raise TypeError(
                f"site {name!r}: expected a released payload (dict) or a DataFrame, "
                f"got {type(table).__name__}"
            )
        if payload is None and policies is None:
            raise ValueError(
                f"site {name!r}: a plain table needs the rules it was released under "
                "(policies=Policy(min_count=..., zeros_disclosive=..., rounding=...))"
            )
        policy = _policy_for(name, payload, policies)
        sites.append(site_counts(name, table, policy, margins_name))
    rows = _union([s.rows for s in sites])
    cols = _union([s.columns for s in sites])
    if absent == "error":
        for s in sites:
            missing_r = [x for x in rows if _key(x) not in {_key(y) for y in s.rows}]
            missing_c = [x for x in cols if _key(x) not in {_key(y) for y in s.columns}]
            if missing_r or missing_c:
                raise ValueError(
                    f"site {s.site!r} has no {'row' if missing_r else 'column'} "
                    f"{(missing_r or missing_c)[0]!r}; pass absent='zero' if that means no child"
                )
    r, c = len(rows), len(cols)
    low = np.zeros((r + 1, c + 1))
    high = np.zeros((r + 1, c + 1))
    row_at = {_key(x): i for i, x in enumerate(rows)}
    col_at = {_key(x): j for j, x in enumerate(cols)}
    records = []
    all_rows = [*rows, margins_name]
    all_cols = [*cols, margins_name]
    for s in sites:
        ri = [row_at[_key(x)] for x in s.rows] + [r]
        ci = [col_at[_key(x)] for x in s.columns] + [c]
        low[np.ix_(ri, ci)] += s.low
        high[np.ix_(ri, ci)] += s.high
        present = np.zeros((r + 1, c + 1), dtype=bool)
        present[np.ix_(ri, ci)] = True
        for (i, j), is_there in np.ndenumerate(present):
            if not is_there:
                records.append(
                    (
                        all_rows[i],
                        all_cols[j],
                        s.site,
                        0.0,
                        0.0,
                        0.0,
                        "absent from the site's table: no child",
                    )
                )
        for a, i in enumerate(ri):
            for b, j in enumerate(ci):
                records.append(
                    (
                        all_rows[i],
                        all_cols[j],
                        s.site,
                        float(s.published[a, b]),
                        float(s.low[a, b]),
                        float(s.high[a, b]),
                        str(s.origin[a, b]),
                    )
                )
    index = _labels_index(all_rows)
    columns = _labels_index(all_cols)
    origins = pd.DataFrame(
        records, columns=["row", "column", "site", "published", "low", "high", "origin"]
    )
    return PooledCounts(
        low=pd.DataFrame(low, index=index, columns=columns),
        high=pd.DataFrame(high, index=index, columns=columns),
        sites=tuple(s.site for s in sites),
        origins=origins,
        site_tables=tuple(sites),
        margins_name=margins_name,
    )


def _union(label_lists: list[list[object]]) -> list[object]:
    seen: dict[str, object] = {}
    for labels in label_lists:
        for x in labels:
            seen.setdefault(_key(x), x)
    return list(seen.values())


def _labels_index(labels: list[object]) -> pd.Index:
    return pd.Index(labels, tupleize_cols=False)


# ---- pooled summaries --------------------------------------------------------


@dataclass(frozen=True)
class PooledSummary:
    """n, mean and SD (ddof=1) pooled exactly from per-site sufficient statistics.

    For binary outcomes ``events``, ``proportion`` and a Wilson score
    interval ``proportion_ci`` at ``level``. ``dropped`` maps a site to the
    reason it could not contribute (a suppressed or rounded statistic).
    """

    n: int
    mean: float | None
    sd: float | None
    events: int | None
    proportion: float | None
    proportion_ci: tuple[float, float] | None
    sites: tuple[str, ...]
    dropped: dict[str, str] = field(default_factory=dict)
    variable: str | None = None
    level: float = 0.95

    @property
    def var(self) -> float | None:
        """Pooled variance (ddof=1)."""
        return None if self.sd is None else self.sd**2

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "variable": self.variable,
            "n": self.n,
            "mean": self.mean,
            "sd": self.sd,
            "events": self.events,
            "proportion": self.proportion,
            "proportion_ci": None if self.proportion_ci is None else list(self.proportion_ci),
            "level": self.level,
            "sites": list(self.sites),
            "dropped": dict(self.dropped),
        }

    def summary(self) -> str:
        """Plain-text report, naming dropped sites."""
        head = f"{self.variable}: " if self.variable else ""
        parts = [f"{head}n = {self.n} from {len(self.sites)} site(s)"]
        if self.mean is not None:
            parts.append(f"mean {self.mean:.6g}")
        if self.sd is not None:
            parts.append(f"SD {self.sd:.6g}")
        if self.proportion is not None and self.proportion_ci is not None:
            lo, hi = self.proportion_ci
            parts.append(
                f"proportion {self.events}/{self.n} = {self.proportion:.4f} "
                f"({100 * self.level:g}% Wilson CI {lo:.4f}–{hi:.4f})"
            )
        lines = ["; ".join(parts)]
        lines.extend(f"dropped {site}: {why}" for site, why in self.dropped.items())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class _Moments:
    n: int
    mean: float | None
    m2: float | None  # sum of squared deviations from the site mean
    events: int | None


def _as_int(value: Any, what: str, site: str) -> int:
    x = float(value)
    if not math.isfinite(x) or x < 0 or x != round(x):
        raise ValueError(f"site {site!r}: {what} must be a non-negative integer, got {value!r}")
    return round(x)


def _moments(site: str, stat: Mapping[str, Any]) -> _Moments:
    keys = set(stat)
    if "n" not in keys:
        raise ValueError(f"site {site!r}: statistics need 'n' (got {sorted(keys)})")
    for k, v in stat.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise _Suppressed(f"{k} was suppressed")
    n = _as_int(stat["n"], "n", site)
    if n == 0:
        raise _Suppressed("no children (n = 0)")
    events = _as_int(stat["events"], "events", site) if "events" in keys else None
    if events is not None and events > n:
        raise ValueError(f"site {site!r}: events ({events}) exceed n ({n})")
    if {"mean", "sd"} <= keys:
        mean = float(stat["mean"])
        sd = float(stat["sd"])
        if sd < 0:
            raise ValueError(f"site {site!r}: sd must be >= 0")
        m2 = sd**2 * (n - 1) if n > 1 else 0.0
        return _Moments(n, mean, m2, events)
    if {"sum", "sumsq"} <= keys:
        total, sumsq = float(stat["sum"]), float(stat["sumsq"])
        mean = total / n
        # The sum of squares form loses precision when the mean is large relative to the SD.
        return _Moments(n, mean, max(sumsq - total * mean, 0.0), events)
    if "mean" in keys:
        return _Moments(n, float(stat["mean"]), None, events)
    if events is None:
        raise ValueError(
            f"site {site!r}: give n with mean and sd, n with sum and sumsq, or n with events "
            f"(got {sorted(keys)})"
        )
    return _Moments(n, None, None, events)


class _Suppressed(Exception):
    """A site's statistic is not available exactly: drop the site, say why."""


def _describe_stat(
    site: str, payload: Mapping[str, Any], variable: str | None, policy: Policy
) -> dict[str, Any]:
    if payload.get("call") != "describe":
        raise ValueError(f"site {site!r}: a {payload.get('call')!r} output is not a describe()")
    tab = payload["table"]
    columns = [label_from_json(c) for c in tab["columns"]]
    if variable is None:
        if len(columns) != 1:
            raise ValueError(f"site {site!r}: describe() covers {columns}; name one with variable=")
        variable = str(columns[0])
    if variable not in columns:
        raise ValueError(f"site {site!r}: describe() has no variable {variable!r}")
    j = columns.index(variable)
    rows = [label_from_json(r) for r in tab["index"]]
    value = {str(r): tab["data"][i][j] for i, r in enumerate(rows)}
    if policy.rounding != "none":
        raise _Suppressed(f"its count is rounded ({policy.rounding}): n is not exact")
    return {"n": value.get("count"), "mean": value.get("mean"), "sd": value.get("std")}


def pool_summary(
    stats_by_site: Mapping[str, Any] | Sequence[Any],
    variable: str | None = None,
    policies: PolicyArg = None,
    level: float = 0.95,
) -> PooledSummary:
    """Pool n, mean, SD (ddof=1) and proportions exactly from per-site statistics.

    Each site gives a mapping with ``n`` and ``mean`` + ``sd`` (ddof=1), or
    ``sum`` + ``sumsq``, and/or ``events`` (a binary outcome); or a released
    ``describe()`` payload (pass ``variable=`` when it covers several; its
    ``count`` must not be rounded, which needs the site's policy as for
    :func:`pool_counts`). The pooled SD combines within-site sums of squares
    and between-site deviations (Chan et al.'s parallel formula), equal to the
    SD of the pooled data. Proportions get a Wilson score interval.

    A site whose statistic is suppressed (``None``/NaN) or not exact is
    dropped and named in ``dropped``; nothing is estimated.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")
    items = _named(stats_by_site, "statistics")
    used: list[str] = []
    dropped: dict[str, str] = {}
    moments: list[_Moments] = []
    for name, stat in items:
        if not isinstance(stat, Mapping):
            raise TypeError(
                f"site {name!r}: statistics must be a mapping, got {type(stat).__name__}"
            )
        try:
            if stat.get("schema") == "phds.output":
                stat = _describe_stat(name, stat, variable, _policy_for(name, stat, policies))
            moments.append(_moments(name, stat))
            used.append(name)
        except _Suppressed as why:
            dropped[name] = str(why)
    if not moments:
        raise ValueError(
            f"no site has usable statistics ({'; '.join(f'{k}: {v}' for k, v in dropped.items())})"
        )
    n = sum(m.n for m in moments)
    mean: float | None = None
    sd: float | None = None
    if all(m.mean is not None for m in moments):
        # Chan, Golub & LeVeque's pairwise update: exact and stable.
        n_acc, mean_acc, m2_acc = 0, 0.0, 0.0
        have_m2 = all(m.m2 is not None for m in moments)
        for m in moments:
            assert m.mean is not None
            delta = m.mean - mean_acc
            n_new = n_acc + m.n
            mean_acc += delta * m.n / n_new
            if have_m2:
                assert m.m2 is not None
                m2_acc += m.m2 + delta**2 * n_acc * m.n / n_new
            n_acc = n_new
        mean = mean_acc
        sd = math.sqrt(m2_acc / (n - 1)) if have_m2 and n > 1 else None
    events: int | None = None
    proportion: float | None = None
    ci: tuple[float, float] | None = None
    if all(m.events is not None for m in moments):
        events = sum(m.events for m in moments if m.events is not None)
        proportion = events / n
        ci = wilson_interval(events, n, level)
    return PooledSummary(n, mean, sd, events, proportion, ci, tuple(used), dropped, variable, level)


def wilson_interval(events: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (statsmodels' ``proportion_confint``)."""
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(events, n, alpha=1 - level, method="wilson")
    return (float(lo), float(hi))
