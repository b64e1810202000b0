"""``sdc.crosstab`` and ``sdc.pivot_table``: pandas-shaped, checked tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from phds_tre.sdc.cells import Grouping, group_rows, measure_stats, statistic_values
from phds_tre.sdc.policy import Policy, resolve_policy
from phds_tre.sdc.statistics import Statistic, resolve_statistic
from phds_tre.sdc.table import Block, TableEvidence, TableOutput

__all__ = ["crosstab", "pivot_table"]

AggFunc = str | Callable[..., Any]
PolicyArg = Policy | str | Path | None


def _is_listlike(x: object) -> bool:
    return isinstance(x, (list, tuple, np.ndarray, pd.Series, pd.Index, pd.Categorical))


def _key_list(keys: object) -> list[Any]:
    """pandas' convention: one array-like, or a list of array-likes."""
    if isinstance(keys, (list, tuple)) and len(keys) > 0 and all(_is_listlike(k) for k in keys):
        return list(keys)
    return [keys]


def _aggfuncs(aggfunc: AggFunc | Sequence[AggFunc]) -> tuple[list[Statistic], bool]:
    if isinstance(aggfunc, (list, tuple)):
        if not aggfunc:
            raise ValueError("aggfunc is an empty list: name at least one statistic")
        return [resolve_statistic(a) for a in aggfunc], True
    return [resolve_statistic(aggfunc)], False  # type: ignore[arg-type]


def _numeric(values: Any, name: str) -> np.ndarray:
    series = pd.Series(values)
    if series.dtype == bool:
        series = series.astype(np.float64)
    if not (pd.api.types.is_numeric_dtype(series.dtype)):
        raise TypeError(
            f"the values column {name!r} is not numeric ({series.dtype}); "
            "only numeric values can be aggregated and checked"
        )
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def _blocks(
    grouping: Grouping,
    value_columns: list[tuple[str | None, np.ndarray | None]],
    stats_per_value: list[list[Statistic]],
    k: int,
) -> list[Block]:
    """One block per (statistic, value) in pandas' column order: each aggfunc, then each value."""
    measures = [measure_stats(grouping, arr, k) for _, arr in value_columns]
    blocks: list[Block] = []
    for si in range(len(stats_per_value[0])):
        for vi, (name, arr) in enumerate(value_columns):
            stat = stats_per_value[vi][si]
            values = statistic_values(grouping, arr, stat, measures[vi])
            blocks.append(Block(stat, name, values, measures[vi]))
    return blocks


def crosstab(
    index: Any,
    columns: Any,
    values: Any = None,
    aggfunc: AggFunc | Sequence[AggFunc] | None = None,
    margins: bool = False,
    policy: PolicyArg = None,
    rownames: Sequence[str] | None = None,
    colnames: Sequence[str] | None = None,
    margins_name: str = "All",
    dropna: bool = True,
) -> TableOutput:
    """A checked :func:`pandas.crosstab`.

    Without ``values`` it counts rows (children) per cell; with ``values`` and
    ``aggfunc`` it aggregates them. Every cell and margin is checked; the
    releasable ``.table`` has unsafe cells suppressed (NaN), secondary
    suppression when ``margins=True``, and rounding per the policy.
    """
    if (values is None) != (aggfunc is None):
        raise ValueError("values and aggfunc go together: give both or neither (as in pandas)")
    if not dropna:
        raise ValueError("dropna=False is not supported: rows with a missing key are dropped")
    pol = resolve_policy(policy)
    index_keys = _key_list(index)
    column_keys = _key_list(columns)
    n = len(index_keys[0])
    for key in [*index_keys, *column_keys]:
        if len(key) != n:
            raise ValueError(
                f"all index and column arrays must have the same length ({n}), got {len(key)}"
            )
    rn = (
        list(rownames)
        if rownames is not None
        else [_series_name(k, f"row_{i}") for i, k in enumerate(index_keys)]
    )
    cn = (
        list(colnames)
        if colnames is not None
        else [_series_name(k, f"col_{i}") for i, k in enumerate(column_keys)]
    )
    grouping = group_rows(index_keys, column_keys, n, rn, cn)
    k = max(pol.nk_n, 2)
    if values is None:
        size = resolve_statistic("size")
        ms = measure_stats(grouping, None, k)
        block = Block(size, None, statistic_values(grouping, None, size, ms), ms)
        evidence = _evidence("crosstab", grouping, [block], margins, margins_name, frequency=True)
        return TableOutput(evidence, pol)
    if len(values) != n:
        raise ValueError(f"values must have the same length as the keys ({n}), got {len(values)}")
    stats, agg_multi = _aggfuncs(aggfunc)  # type: ignore[arg-type]
    arr = _numeric(values, _series_name(values, "values") or "values")
    blocks = _blocks(grouping, [(_series_name(values, None), arr)], [stats], k)
    evidence = _evidence("crosstab", grouping, blocks, margins, margins_name, agg_level=agg_multi)
    return TableOutput(evidence, pol)


def _series_name(obj: Any, default: str | None) -> str | None:
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) else default


def _evidence(
    call: str,
    grouping: Grouping,
    blocks: list[Block],
    margins: bool,
    margins_name: str,
    frequency: bool = False,
    values_level: bool = False,
    agg_level: bool = False,
) -> TableEvidence:
    return TableEvidence(
        call=call,
        row_labels=grouping.row_labels,
        col_labels=grouping.col_labels,
        row_names=grouping.row_names,
        col_names=grouping.col_names,
        blocks=blocks,
        margins=margins,
        margins_name=margins_name,
        frequency=frequency,
        values_level=values_level,
        agg_level=agg_level,
    )


def _names(arg: Any, what: str, data: pd.DataFrame) -> list[str]:
    if arg is None:
        return []
    names = list(arg) if isinstance(arg, (list, tuple)) else [arg]
    for name in names:
        if name not in data.columns:
            raise KeyError(
                f"{what} column {name!r} is not in the data (columns: {list(data.columns)})"
            )
    return names


def pivot_table(
    data: pd.DataFrame,
    values: str | Sequence[str] | None = None,
    index: str | Sequence[str] | None = None,
    columns: str | Sequence[str] | None = None,
    aggfunc: AggFunc | Sequence[AggFunc] | dict[str, AggFunc] = "mean",
    margins: bool = False,
    policy: PolicyArg = None,
    margins_name: str = "All",
    dropna: bool = True,
) -> TableOutput:
    """A checked :func:`pandas.pivot_table` (index required; columns optional).

    ``aggfunc`` may be a string, a known numpy/pandas/builtin function, a list
    of them, or a dict mapping each value column to one of them; anything
    else is refused with an error rather than computed unchecked.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    if not dropna:
        raise ValueError("dropna=False is not supported: rows with a missing key are dropped")
    pol = resolve_policy(policy)
    index_names = _names(index, "index", data)
    if not index_names:
        raise ValueError("pivot_table needs an index (one or more grouping columns)")
    column_names = _names(columns, "columns", data)
    keys = set(index_names) | set(column_names)
    if values is None:
        value_names = [
            c for c in data.columns if c not in keys and pd.api.types.is_numeric_dtype(data[c])
        ]
        values_level = True
        if not value_names:
            raise ValueError("no numeric value columns to aggregate")
    else:
        value_names = _names(values, "values", data)
        values_level = isinstance(values, (list, tuple))
    if isinstance(aggfunc, dict):
        unknown = set(aggfunc) - set(value_names)
        if unknown:
            raise KeyError(f"aggfunc names columns that are not values: {sorted(unknown)}")
        value_names = [v for v in value_names if v in aggfunc]
        stats_per_value = [[resolve_statistic(aggfunc[v])] for v in value_names]
        agg_multi = False
        values_level = True
    else:
        stats, agg_multi = _aggfuncs(aggfunc)
        stats_per_value = [stats for _ in value_names]
    if not column_names:
        values_level = True  # pandas labels the columns by value when there are no column keys
    n = len(data)
    grouping = group_rows(
        [data[c] for c in index_names],
        [data[c] for c in column_names],
        n,
        index_names,
        column_names,
    )
    k = max(pol.nk_n, 2)
    value_columns: list[tuple[str | None, np.ndarray | None]] = [
        (v, _numeric(data[v], v)) for v in value_names
    ]
    blocks = _blocks(grouping, value_columns, stats_per_value, k)
    evidence = _evidence(
        "pivot_table",
        grouping,
        blocks,
        margins,
        margins_name,
        values_level=values_level,
        agg_level=agg_multi,
    )
    return TableOutput(evidence, pol)
