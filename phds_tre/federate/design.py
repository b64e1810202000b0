"""The coordinator's fixed design: formula plus categorical levels, identical at every site.

A federated regression adds up per-site statistics column by column, so every
site must build exactly the same design columns in the same order, even when
a level is absent at one hospital. The coordinator fixes the formula and the
levels of every categorical variable (the first level is the reference) and
sends them as a parameter; each site turns its categorical columns into
pandas ``Categorical`` with exactly those categories before the formula
engine sees them, so the engine (patsy or formulaic, whichever
``statsmodels.formula`` uses) names and orders the columns as
``smf.ols``/``smf.glm`` would on the pooled data.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

__all__ = ["Design", "DesignError", "DesignMatrices", "design_matrices"]

#: A level is a plain JSON scalar, so the design survives a JSON round trip unchanged.
Level = str | int | float | bool
_CATEGORICAL_CALL = re.compile(r"\bC\(\s*([A-Za-z_][A-Za-z0-9_]*)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DesignError(ValueError):
    """A design or data that cannot give the coordinator's columns; the message names the cause."""


def _plain(value: object) -> Level:
    """A level as a JSON scalar (numpy scalars become Python ones)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise DesignError(f"a categorical level must be a string, number or boolean, not {value!r}")


def _is_categorical(series: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


@dataclass(frozen=True)
class Design:
    """The formula and the levels (in order; the first is the reference) of every categorical.

    ``levels`` maps a data column to its levels. Every variable that the
    formula uses as a category (a non-numeric or boolean column, or one
    wrapped in ``C(...)``) must have its levels here: otherwise two sites
    could build different columns.
    """

    formula: str
    levels: dict[str, list[Level]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.formula, str) or "~" not in self.formula:
            raise DesignError("formula must be a string with an outcome, such as 'y ~ x + C(sex)'")
        if not isinstance(self.levels, dict):
            raise DesignError("levels must be a dict: variable -> list of levels")
        clean: dict[str, list[Level]] = {}
        for var, values in self.levels.items():
            if not isinstance(var, str) or not var:
                raise DesignError("levels: every variable name must be a non-empty string")
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                raise DesignError(f"levels of {var!r} must be a list")
            vals = [_plain(v) for v in values]
            if not vals:
                raise DesignError(f"levels of {var!r} are empty")
            if len(set(vals)) != len(vals):
                raise DesignError(f"levels of {var!r} are not unique")
            clean[var] = vals
        object.__setattr__(self, "levels", clean)

    @classmethod
    def from_data(cls, formula: str, data: pd.DataFrame) -> Design:
        """The design a formula engine would infer from ``data`` (levels sorted, as patsy does).

        The coordinator calls this on pooled or synthetic data to fix the levels
        once; the sites then receive the result as a parameter.
        """
        levels: dict[str, list[Level]] = {}
        for var in _categorical_variables(formula, data):
            values = pd.Series(data[var]).dropna().unique().tolist()
            levels[var] = sorted((_plain(v) for v in values), key=_sort_key)
        return cls(formula, levels)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"formula": self.formula, "levels": {k: list(v) for k, v in self.levels.items()}}

    def to_json(self) -> str:
        """The design as one JSON string (a notebook parameter)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> Design:
        """Inverse of :meth:`to_json` (also accepts the parsed dict)."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise DesignError(f"design is not JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) != {"formula", "levels"}:
            raise DesignError("a design is a JSON object with exactly 'formula' and 'levels'")
        levels = data["levels"]
        if not isinstance(levels, dict):
            raise DesignError("design levels must be a JSON object")
        return cls(str(data["formula"]), {str(k): list(v) for k, v in levels.items()})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Design) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())


def _sort_key(value: Level) -> tuple[str, Any]:
    # Sorted within a type, as the formula engines sort one column's levels.
    return (type(value).__name__, value)


def _categorical_variables(formula: str, data: pd.DataFrame) -> list[str]:
    """Data columns the formula uses as categories (non-numeric, boolean, or inside ``C()``)."""
    names = set(_IDENTIFIER.findall(formula))
    wrapped = set(_CATEGORICAL_CALL.findall(formula))
    found = []
    for col in data.columns:
        if not isinstance(col, str) or col not in names:
            continue
        if col in wrapped or _is_categorical(data[col]):
            found.append(col)
    return found


class DesignMatrices(NamedTuple):
    """One site's design: outcome, design matrix, column names and rows dropped as missing."""

    y: np.ndarray
    X: np.ndarray
    columns: list[str]
    dropped: int


def design_matrices(df: pd.DataFrame, design: Design | str) -> DesignMatrices:
    """``y, X, columns, dropped`` of ``df`` under the coordinator's ``design``.

    A level absent from ``df`` still gets its (all-zero) column; a value not
    among the design's levels is an error (never silently dropped). Rows with a
    missing value in any variable of the formula are dropped, as statsmodels'
    default ``missing="drop"``; ``dropped`` says how many.
    """
    if isinstance(design, str):
        design = Design.from_json(design)
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, not {type(df).__name__}")
    data = df.copy(deep=False)
    for var in _categorical_variables(design.formula, data):
        if var not in design.levels:
            raise DesignError(
                f"categorical variable {var!r} has no levels fixed by the coordinator: "
                f"pass levels={{{var!r}: [...]}} (the first level is the reference)"
            )
    for var, levels in design.levels.items():
        if var not in data.columns:
            raise DesignError(
                f"the design fixes levels of {var!r}, which is not a column of the data"
            )
        column = pd.Series(data[var])
        present = column.dropna()
        unknown = present[~present.isin(levels)].unique().tolist()
        if unknown:
            shown = ", ".join(repr(v) for v in unknown[:3])
            raise DesignError(
                f"{var!r} holds values that are not among the coordinator's levels ({shown}); "
                "recode them or ask the coordinator to add them to the design"
            )
        data[var] = pd.Categorical(column, categories=levels)
    from statsmodels.formula._manager import FormulaManager

    manager = FormulaManager()
    na_action = manager.get_na_action(action="drop")
    # The evaluation environment is fixed (numpy only), so every site evaluates the
    # formula the same way whatever the researcher's notebook has defined.
    try:
        y_frame, x_frame = manager.get_matrices(
            design.formula, data, eval_env={"np": np}, pandas=True, na_action=na_action
        )
    except Exception as exc:  # the engines raise their own error types
        raise DesignError(f"cannot build the design of {design.formula!r}: {exc}") from None
    if y_frame.shape[1] != 1:
        raise DesignError("the outcome must be one numeric column (code a binary outcome 0/1)")
    y = np.asarray(y_frame, dtype=np.float64)[:, 0]
    X = np.asarray(x_frame, dtype=np.float64)
    return DesignMatrices(y, X, [str(c) for c in x_frame.columns], len(df) - len(y))
