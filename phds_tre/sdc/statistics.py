"""The statistics an analysis may aggregate with, and how each is checked.

A small registry: every aggregation a researcher asks for (a string such as
``"mean"``, or a callable such as ``np.mean``) resolves to one
:class:`Statistic`, which says how the rules treat it. Anything that does not
resolve (a lambda, an unknown function) is refused with a clear error rather
than passed unchecked: ACRO 1.0.2 ran no checks at all on a callable aggfunc.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["STATISTICS", "Statistic", "UnsupportedAggregation", "resolve_statistic"]


class UnsupportedAggregation(ValueError):
    """An aggregation that phds_tre cannot check, so it refuses to compute it."""


@dataclass(frozen=True)
class Statistic:
    """One aggregation and the disclosure rules that apply to it.

    ``name`` labels the result as pandas would (``np.std`` → ``"std"``).
    ``key`` identifies the computation (``"std0"`` is ``np.std``'s ddof=0).
    """

    key: str
    name: str
    additive: bool = False  # margins are sums of cells: secondary suppression applies
    magnitude: bool = False  # a function of a magnitude: dominance rules (NK, p%) apply
    counts_rows: bool = False  # the value is a count of contributors itself
    order: bool = False  # min/max/mode/first/last/median: may be one person's value

    def to_json(self) -> dict[str, str]:
        """JSON form stored in an output's evidence."""
        return {"key": self.key, "name": self.name}


def _stat(key: str, name: str | None = None, **flags: bool) -> Statistic:
    return Statistic(key=key, name=name or key, **flags)


STATISTICS: dict[str, Statistic] = {
    s.key: s
    for s in [
        _stat("size", counts_rows=True, additive=True),
        _stat("count", counts_rows=True, additive=True),
        _stat("sum", additive=True, magnitude=True),
        _stat("mean", magnitude=True),
        _stat("median", magnitude=True, order=True),
        _stat("std", magnitude=True),
        _stat("var", magnitude=True),
        _stat("std0", "std", magnitude=True),
        _stat("var0", "var", magnitude=True),
        _stat("min", order=True),
        _stat("max", order=True),
        _stat("mode", order=True),
        _stat("first", order=True),
        _stat("last", order=True),
        # Quartiles (describe's 25% / 75% rows): like the median, an order statistic of a
        # magnitude, so dominance and the single-value rule both apply.
        _stat("q25", magnitude=True, order=True),
        _stat("q75", magnitude=True, order=True),
    ]
}

_ALIASES: dict[str, str] = {
    "len": "size",
    "nansum": "sum",
    "nanmean": "mean",
    "average": "mean",
    "nanmedian": "median",
    "amin": "min",
    "amax": "max",
    "nanmin": "min",
    "nanmax": "max",
}

# Known callables → statistic key. pandas 3 passes numpy reductions through as
# callables, so np.std is the population SD (ddof=0), unlike the string "std".
_CALLABLES: dict[object, str] = {
    builtins.len: "size",
    builtins.sum: "sum",
    builtins.min: "min",
    builtins.max: "max",
    np.size: "size",
    np.sum: "sum",
    np.nansum: "sum",
    np.mean: "mean",
    np.nanmean: "mean",
    np.average: "mean",
    np.median: "median",
    np.nanmedian: "median",
    np.std: "std0",
    np.nanstd: "std0",
    np.var: "var0",
    np.nanvar: "var0",
    np.min: "min",
    np.max: "max",
    np.amin: "min",
    np.amax: "max",
    np.nanmin: "min",
    np.nanmax: "max",
    pd.Series.sum: "sum",
    pd.Series.mean: "mean",
    pd.Series.median: "median",
    pd.Series.std: "std",
    pd.Series.var: "var",
    pd.Series.min: "min",
    pd.Series.max: "max",
    pd.Series.count: "count",
    pd.Series.nunique: "__refused__",
}


def resolve_statistic(aggfunc: str | Callable[..., object]) -> Statistic:
    """Map a string or callable aggregation to the :class:`Statistic` that checks it.

    Raises :class:`UnsupportedAggregation` for anything unknown, naming the
    supported statistics, so that no aggregation is ever computed unchecked.
    """
    if isinstance(aggfunc, str):
        key = _ALIASES.get(aggfunc, aggfunc)
        if key in STATISTICS and key not in ("std0", "var0"):
            return STATISTICS[key]
        raise UnsupportedAggregation(_refusal(repr(aggfunc)))
    if callable(aggfunc):
        key_or_none = _CALLABLES.get(aggfunc)
        if key_or_none is not None and key_or_none in STATISTICS:
            return STATISTICS[key_or_none]
        name = getattr(aggfunc, "__name__", type(aggfunc).__name__)
        raise UnsupportedAggregation(_refusal(f"the function {name!r}"))
    raise UnsupportedAggregation(_refusal(repr(aggfunc)))


def _refusal(what: str) -> str:
    names = ", ".join(sorted(k for k in STATISTICS if k not in ("std0", "var0")))
    return (
        f"phds_tre cannot check the aggregation {what}, so it refuses to compute it. "
        f"Use one of: {names} (as strings, or numpy/pandas/builtin functions such as "
        f"np.mean, np.std, len). Custom functions and lambdas cannot be checked."
    )
