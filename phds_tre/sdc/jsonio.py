"""JSON encoding of arrays and labels inside the structured output bundle.

JSON has no NaN or infinity, and pandas labels can be numpy scalars,
timestamps or tuples; these helpers give one lossless-enough, strict form
(``allow_nan=False`` everywhere) so a checker never meets a non-standard token.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["array_from_json", "array_to_json", "label_from_json", "label_to_json"]


def array_to_json(a: np.ndarray) -> list[Any]:
    """Nested lists with NaN/±inf as ``None``; integral floats stay floats."""
    arr = np.asarray(a, dtype=np.float64)
    obj = arr.astype(object)
    obj[~np.isfinite(arr)] = None
    result: list[Any] = obj.tolist()
    return result


def array_from_json(data: Any, fill: float = np.nan) -> np.ndarray:
    """Inverse of :func:`array_to_json`; ``None`` becomes ``fill``.

    Raises ``ValueError`` for ragged or non-numeric input.
    """
    try:
        arr = np.array(data, dtype=object)
        is_none = np.frompyfunc(lambda x: x is None, 1, 1)
        arr[is_none(arr).astype(bool)] = fill
        return arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a numeric array: {exc}") from None


def label_to_json(label: object) -> Any:
    """A table label as JSON: tuples become lists, exotic scalars strings."""
    if isinstance(label, tuple):
        return [label_to_json(x) for x in label]
    if isinstance(label, np.generic):
        label = label.item()
    if label is None or isinstance(label, (str, bool, int)):
        return label
    if isinstance(label, float):
        return None if math.isnan(label) else label
    if isinstance(label, (_dt.date, _dt.datetime)):
        return label.isoformat()
    if hasattr(label, "isoformat"):
        return label.isoformat()
    return str(label)


def label_from_json(data: Any) -> object:
    """Inverse of :func:`label_to_json` (lists become tuples)."""
    if isinstance(data, list):
        return tuple(label_from_json(x) for x in data)
    return data


def labels_from_json(data: Sequence[Any]) -> list[tuple[object, ...]]:
    """A list of tuple labels (each stored as a JSON list)."""
    out = []
    for item in data:
        lab = label_from_json(item)
        out.append(lab if isinstance(lab, tuple) else (lab,))
    return out
