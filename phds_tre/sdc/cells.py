"""Group rows into table cells and compute the contributor statistics the rules need.

One pass of vectorised numpy over integer cell codes gives, for every cell and
every margin: the number of contributors, missing and negative values, the
total and the largest contributions (for NK dominance and the p% rule). We
group with ``pandas.factorize`` + ``numpy.bincount`` / ``ufunc.at`` rather than
``DataFrame.groupby`` because the checks must cost little more than the
pandas table itself (benchmarks/: at most 1.3× ``pandas.crosstab``).

Every row is one contributor. A study with several rows per child should
aggregate to one row per child first (say so in the notebook).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from phds_tre.sdc.statistics import Statistic

__all__ = ["Grouping", "MeasureStats", "group_rows", "measure_stats", "statistic_values"]

Label = tuple[object, ...]

#: Quantile statistics (keys in ``statistics.STATISTICS``) and the probability each computes.
QUANTILES: dict[str, float] = {"q25": 0.25, "q75": 0.75}


@dataclass(frozen=True)
class Grouping:
    """Which cell each data row falls in.

    ``row_codes``/``col_codes`` index ``row_labels``/``col_labels`` (observed
    key combinations, sorted as pandas sorts them); rows with a missing key are
    dropped, as pandas does with ``dropna=True``.
    """

    row_codes: np.ndarray
    col_codes: np.ndarray
    row_labels: list[Label]
    col_labels: list[Label]
    row_names: list[str | None]
    col_names: list[str | None]
    keep: np.ndarray | None  # boolean mask of kept data rows, None when all kept

    @property
    def shape(self) -> tuple[int, int]:
        """(R, C): interior cells, margins excluded."""
        return len(self.row_labels), len(self.col_labels)

    @property
    def cell_codes(self) -> np.ndarray:
        """Flat interior cell index ``r * C + c`` for every kept row."""
        return self.row_codes * max(len(self.col_labels), 1) + self.col_codes


def _python_scalar(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _categories(key: pd.Series | np.ndarray) -> pd.CategoricalDtype | None:
    dtype = getattr(key, "dtype", None)
    return dtype if isinstance(dtype, pd.CategoricalDtype) else None


def _axis(
    keys: Sequence[pd.Series | np.ndarray], n: int
) -> tuple[np.ndarray, list[Label], np.ndarray]:
    """Codes of the observed key combinations of one axis, sorted lexicographically.

    A single categorical key is the exception: every category is a label, in the
    categories' order, observed or not (see :func:`group_rows`).
    """
    if not keys:
        return np.zeros(n, dtype=np.int64), [()], np.ones(n, dtype=bool)
    dtype = _categories(keys[0]) if len(keys) == 1 else None
    if dtype is not None:
        codes = np.asarray(pd.Categorical(keys[0], dtype=dtype).codes, dtype=np.int64)
        return codes, [(_python_scalar(c),) for c in dtype.categories], codes >= 0
    level_codes = []
    level_uniques = []
    valid = np.ones(n, dtype=bool)
    for key in keys:
        codes, uniques = pd.factorize(key, sort=True, use_na_sentinel=True)
        codes = np.asarray(codes, dtype=np.int64)
        valid &= codes >= 0
        level_codes.append(codes)
        level_uniques.append(uniques)
    if len(keys) == 1:
        combined = level_codes[0]
        present = np.bincount(combined[valid], minlength=len(level_uniques[0])) > 0
        remap = np.cumsum(present) - 1
        codes = np.where(valid, remap[np.maximum(combined, 0)], -1)
        single: list[Label] = [
            (_python_scalar(level_uniques[0][i]),) for i in np.flatnonzero(present)
        ]
        return codes, single, valid
    # Mixed-radix code of the combination; factorize(sort=True) keeps lexicographic order.
    combined = np.zeros(n, dtype=np.int64)
    for codes, uniques in zip(level_codes, level_uniques, strict=True):
        combined = combined * len(uniques) + np.maximum(codes, 0)
    combined = np.where(valid, combined, -1)
    codes, uniq = pd.factorize(combined, sort=True, use_na_sentinel=True)
    codes = np.asarray(codes, dtype=np.int64)
    uniq = np.asarray(uniq, dtype=np.int64)
    if len(uniq) and uniq[0] == -1:  # -1 (dropped rows) sorts first: shift it out
        codes = codes - 1
        uniq = uniq[1:]
    labels: list[Label] = []
    decoded = []
    rest = uniq.copy()
    for uniques in reversed(level_uniques):
        decoded.append(rest % len(uniques))
        rest = rest // len(uniques)
    decoded.reverse()
    for i in range(len(uniq)):
        labels.append(
            tuple(_python_scalar(level_uniques[k][decoded[k][i]]) for k in range(len(keys)))
        )
    return codes, labels, valid


def _name(key: object, default: str | None) -> str | None:
    name = getattr(key, "name", None)
    return name if isinstance(name, str) else default


def group_rows(
    index_keys: Sequence[pd.Series | np.ndarray],
    column_keys: Sequence[pd.Series | np.ndarray],
    n: int,
    index_names: Sequence[str | None] | None = None,
    column_names: Sequence[str | None] | None = None,
) -> Grouping:
    """Assign each of ``n`` data rows to a (row, column) cell of the table.

    Labels are the observed values, as in pandas — except for an axis keyed by one
    categorical, where every category is a row (or column) even when no child has
    it. The researcher declared those categories; leaving an empty one out would
    publish that its count is zero without the zeros rule ever seeing the cell.
    """
    row_codes, row_labels, row_valid = _axis(index_keys, n)
    col_codes, col_labels, col_valid = _axis(column_keys, n)
    valid = row_valid & col_valid
    keep: np.ndarray | None = None
    if not valid.all():
        keep = valid
        row_codes = row_codes[valid]
        col_codes = col_codes[valid]
        # Labels observed only in dropped rows must disappear, as in pandas (declared
        # categories stay).
        if not (len(index_keys) == 1 and _categories(index_keys[0]) is not None):
            row_codes, row_labels = _compact(row_codes, row_labels)
        if not (len(column_keys) == 1 and _categories(column_keys[0]) is not None):
            col_codes, col_labels = _compact(col_codes, col_labels)
    rn = list(index_names) if index_names is not None else [_name(k, None) for k in index_keys]
    cn = list(column_names) if column_names is not None else [_name(k, None) for k in column_keys]
    return Grouping(row_codes, col_codes, row_labels, col_labels, rn, cn, keep)


def _compact(codes: np.ndarray, labels: list[Label]) -> tuple[np.ndarray, list[Label]]:
    present = np.bincount(codes, minlength=len(labels)) > 0
    if present.all():
        return codes, labels
    remap = np.cumsum(present) - 1
    return remap[codes], [lab for lab, p in zip(labels, present, strict=True) if p]


@dataclass
class MeasureStats:
    """Contributor statistics of one value column, each shaped (R+1, C+1).

    The last row and column are the margins (all rows of a column, all columns
    of a row, everything), computed from the data, so margin cells are checked
    like any other cell.
    """

    n_rows: np.ndarray  # rows in the cell
    n: np.ndarray  # contributors: rows with a non-missing value
    n_missing: np.ndarray
    n_negative: np.ndarray
    total: np.ndarray  # sum of non-missing values
    top: np.ndarray  # (k, R+1, C+1) largest values, descending; -inf where fewer than k
    vmin: np.ndarray
    vmax: np.ndarray
    m2: np.ndarray  # sum of squared deviations from the cell mean


def _with_margins(interior: np.ndarray) -> np.ndarray:
    r, c = interior.shape
    out = np.empty((r + 1, c + 1), dtype=interior.dtype)
    out[:r, :c] = interior
    out[:r, c] = interior.sum(axis=1)
    out[r, :c] = interior.sum(axis=0)
    out[r, c] = interior.sum()
    return out


def _reduce_with_margins(interior: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    r, c = interior.shape
    out = np.empty((r + 1, c + 1), dtype=interior.dtype)
    out[:r, :c] = interior
    out[:r, c] = ufunc.reduce(interior, axis=1)
    out[r, :c] = ufunc.reduce(interior, axis=0)
    out[r, c] = ufunc.reduce(interior, axis=None)
    return out


def _top_k(codes: np.ndarray, values: np.ndarray, ncells: int, k: int) -> np.ndarray:
    """The k largest values per cell, ties kept (two equal largest values are x1 = x2)."""
    top = np.full((k, ncells), -np.inf)
    remaining = values
    rem_codes = codes
    filled = np.zeros(ncells, dtype=np.int64)
    # Peel off the distinct largest value of every cell with its multiplicity; a
    # sort-based top-k (np.lexsort) was 10× slower on a million rows.
    while len(remaining) and (filled < k).any():
        level = np.full(ncells, -np.inf)
        np.maximum.at(level, rem_codes, remaining)
        at_level = remaining == level[rem_codes]
        mult = np.bincount(rem_codes[at_level], minlength=ncells)
        for j in range(k):
            place = (filled <= j) & (j < filled + mult) & (mult > 0)
            top[j, place] = level[place]
        filled = np.minimum(filled + mult, k)
        keep = ~at_level & (filled[rem_codes] < k)
        remaining = remaining[keep]
        rem_codes = rem_codes[keep]
    return top


def _merge_top(top: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Top-k over a margin from the cells' own top-k lists.

    ``top`` is (k, R, C); ``axis=1`` merges across columns (row margins, → (k, R)),
    ``axis=0`` across rows (column margins, → (k, C)).
    """
    kk, r, c = top.shape
    if axis == 1:
        flat = np.transpose(top, (1, 0, 2)).reshape(r, kk * c)
    else:
        flat = np.transpose(top, (2, 0, 1)).reshape(c, kk * r)
    return (-np.sort(-flat, axis=1)[:, :k]).T


def measure_stats(grouping: Grouping, values: np.ndarray | None, k: int) -> MeasureStats:
    """Compute :class:`MeasureStats` for one value column (``None``: counts only)."""
    r, c = grouping.shape
    ncells = r * c
    codes = grouping.cell_codes
    n_rows = _with_margins(np.bincount(codes, minlength=ncells).reshape(r, c))
    if values is None:
        zeros = np.zeros_like(n_rows, dtype=np.float64)
        return MeasureStats(
            n_rows=n_rows,
            n=n_rows,
            n_missing=np.zeros_like(n_rows),
            n_negative=np.zeros_like(n_rows),
            total=zeros,
            top=np.full((k, r + 1, c + 1), -np.inf),
            vmin=np.full_like(zeros, np.nan),
            vmax=np.full_like(zeros, np.nan),
            m2=zeros.copy(),
        )
    if grouping.keep is not None:
        values = values[grouping.keep]
    values = np.asarray(values, dtype=np.float64)
    missing = np.isnan(values)
    if missing.any():
        ok = ~missing
        v, vcodes = values[ok], codes[ok]
    else:
        v, vcodes = values, codes
    n_i = np.bincount(vcodes, minlength=ncells)
    total_i = np.bincount(vcodes, weights=v, minlength=ncells)
    neg_i = np.bincount(vcodes[v < 0], minlength=ncells)
    mean_i = np.divide(total_i, n_i, out=np.zeros(ncells), where=n_i > 0)
    dev = v - mean_i[vcodes]
    m2_i = np.bincount(vcodes, weights=dev * dev, minlength=ncells)
    vmin_i = np.full(ncells, np.inf)
    vmax_i = np.full(ncells, -np.inf)
    np.minimum.at(vmin_i, vcodes, v)
    np.maximum.at(vmax_i, vcodes, v)
    top_i = _top_k(vcodes, v, ncells, k).reshape(k, r, c)

    n = _with_margins(n_i.reshape(r, c))
    total = _with_margins(total_i.reshape(r, c))
    top = np.full((k, r + 1, c + 1), -np.inf)
    top[:, :r, :c] = top_i
    top[:, :r, c] = _merge_top(top_i, 1, k)
    top[:, r, :c] = _merge_top(top_i, 0, k)
    top[:, r, c] = -np.sort(-top_i.reshape(k, -1).ravel())[:k]
    # Chan et al.'s pairwise update: the margins' M2 from the cells' M2 and means.
    m2_cells = m2_i.reshape(r, c)
    n_cells = n_i.reshape(r, c).astype(np.float64)
    mean_cells = mean_i.reshape(r, c)
    m2 = np.empty((r + 1, c + 1))
    m2[:r, :c] = m2_cells
    mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
    m2[:r, c] = m2_cells.sum(1) + (n_cells * (mean_cells - mean[:r, c][:, None]) ** 2).sum(1)
    m2[r, :c] = m2_cells.sum(0) + (n_cells * (mean_cells - mean[r, :c][None, :]) ** 2).sum(0)
    m2[r, c] = m2_cells.sum() + (n_cells * (mean_cells - mean[r, c]) ** 2).sum()
    vmin = _reduce_with_margins(vmin_i.reshape(r, c), np.minimum)
    vmax = _reduce_with_margins(vmax_i.reshape(r, c), np.maximum)
    vmin[np.isinf(vmin)] = np.nan
    vmax[np.isinf(vmax)] = np.nan
    return MeasureStats(
        n_rows=n_rows,
        n=n,
        n_missing=n_rows - n,
        n_negative=_with_margins(neg_i.reshape(r, c)),
        total=total,
        top=top,
        vmin=vmin,
        vmax=vmax,
        m2=m2,
    )


def _grouped_order_statistic(grouping: Grouping, values: np.ndarray, stat: Statistic) -> np.ndarray:
    """median/mode/first/last per cell and margin: not decomposable, so group four times."""
    r, c = grouping.shape
    if grouping.keep is not None:
        values = values[grouping.keep]
    s = pd.Series(np.asarray(values, dtype=np.float64))
    out = np.full((r + 1, c + 1), np.nan)
    groupings = [
        (
            grouping.cell_codes,
            lambda res: out.__setitem__((slice(0, r), slice(0, c)), res.reshape(r, c)),
        ),
        (grouping.row_codes, lambda res: out.__setitem__((slice(0, r), c), res)),
        (grouping.col_codes, lambda res: out.__setitem__((r, slice(0, c)), res)),
        (np.zeros(len(s), dtype=np.int64), lambda res: out.__setitem__((r, c), res[0])),
    ]
    sizes = [r * c, r, c, 1]
    for (codes, store), size in zip(groupings, sizes, strict=True):
        store(_per_group(s, codes, size, stat.key))
    return out


def _per_group(s: pd.Series, codes: np.ndarray, size: int, key: str) -> np.ndarray:
    res = np.full(size, np.nan)
    if key == "mode":
        # Most frequent value, smallest among ties: as pandas.Series.mode().iloc[0].
        frame = pd.DataFrame({"g": codes, "v": s.to_numpy()}).dropna()
        if frame.empty:
            return res
        freq = frame.groupby(["g", "v"], sort=True).size().reset_index(name="f")
        freq = freq.sort_values(["g", "f", "v"], ascending=[True, False, True], kind="stable")
        first = freq.drop_duplicates("g")
        res[first["g"].to_numpy()] = first["v"].to_numpy()
        return res
    grouped = s.groupby(codes, sort=True)
    # Quantiles interpolate linearly, as pandas' describe() and Series.quantile do.
    agg = grouped.quantile(QUANTILES[key]) if key in QUANTILES else getattr(grouped, key)()
    res[agg.index.to_numpy()] = agg.to_numpy()
    return res


def statistic_values(
    grouping: Grouping, values: np.ndarray | None, stat: Statistic, ms: MeasureStats
) -> np.ndarray:
    """The statistic for every cell and margin, shaped (R+1, C+1); NaN where undefined.

    An empty cell (no rows) is NaN for every statistic, as in pandas; a frequency
    table shows it as 0 later.
    """
    out = _statistic_values(grouping, values, stat, ms)
    out[ms.n_rows == 0] = np.nan
    return out


def _statistic_values(
    grouping: Grouping, values: np.ndarray | None, stat: Statistic, ms: MeasureStats
) -> np.ndarray:
    n = ms.n.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if stat.key == "size":
            return ms.n_rows.astype(np.float64)
        if stat.key == "count":
            return n
        if stat.key == "sum":
            return ms.total.copy()
        if stat.key == "mean":
            return np.where(n > 0, ms.total / n, np.nan)
        if stat.key in ("var", "std", "var0", "std0"):
            ddof = 0 if stat.key.endswith("0") else 1
            var = np.where(n > ddof, ms.m2 / (n - ddof), np.nan)
            var = np.maximum(var, 0.0)
            return np.sqrt(var) if stat.key.startswith("std") else var
        if stat.key == "min":
            return ms.vmin.copy()
        if stat.key == "max":
            return ms.vmax.copy()
    if values is None:
        raise ValueError(f"the statistic {stat.name!r} needs a values column")
    return _grouped_order_statistic(grouping, values, stat)
