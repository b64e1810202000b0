"""``phds_tre.share(name, value)``: a named result for combining across sites.

A study that pools results (counts, estimates with their variances, the
sufficient statistics of a federated regression) names each one with
:func:`share`. It is displayed as ONE bundle of MIME type
:data:`SHARE_MIME`::

    {"schema": "phds.share", "version": 1, "name": name,
     "payload": <a structured phds output payload>}

beside a ``text/plain`` note without numbers. The payload is always a
structured output (:data:`phds_tre.sdc.MIME_TYPE` payload), so a shared value
is re-checked by the site's checker exactly like any output
(:mod:`phds_tre.check.checkers` validates the envelope and re-checks the
payload): an :class:`~phds_tre.sdc.SDCOutput` is shared as its own payload; a
DataFrame, Series, numpy array or dict of numbers becomes a raw
:class:`~phds_tre.sdc.frame.FrameOutput` (``"frame"``: review at best, and
small whole numbers fail).

The kernel is untrusted (DESIGN.md, principle 3): nothing in the envelope is
taken on trust at the site; a malformed envelope or payload fails.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["NAME_PATTERN", "SHARE_MIME", "SHARE_SCHEMA", "SHARE_VERSION", "share", "share_bundle"]

SHARE_MIME = "application/vnd.phds.share+json"
SHARE_SCHEMA = "phds.share"
SHARE_VERSION = 1
#: What a shared result's name must look like (letters first, at most 64 characters).
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def _number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _frame_of(value: object) -> Any:
    """A DataFrame or Series for a pandas object, a numpy array or a dict of numbers."""
    import numpy as np
    import pandas as pd

    if isinstance(value, (pd.DataFrame, pd.Series)):
        return value
    if isinstance(value, np.ndarray):
        if value.ndim == 1:
            return pd.DataFrame({"value": value})
        if value.ndim == 2:
            return pd.DataFrame(value)
        raise TypeError("share: a numpy array must have one or two dimensions")
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("share: the keys of a dict must be strings")
        items = list(value.values())
        if all(_number(v) for v in items):
            values = [float(v) for v in items]
            return pd.DataFrame({"value": values}, index=pd.Index(keys, name="name"))
        if all(isinstance(v, Mapping) and all(_number(x) for x in v.values()) for v in items):
            frame = pd.DataFrame.from_dict(dict(value), orient="index").astype(np.float64)
            frame.index.name = "name"
            return frame
        raise TypeError(
            "share: a dict must map names to numbers, or names to dicts of numbers "
            "(e.g. {'beta': {'estimate': 0.4, 'variance': 0.01}})"
        )
    raise TypeError(
        f"share: cannot share a {type(value).__name__}; share a phds_tre.sdc output, a pandas "
        "object, a numpy array or a dict of numbers"
    )


def share_bundle(name: str, value: object) -> dict[str, Any]:
    """The display bundle of a shared result (see the module docstring).

    Raises ``ValueError`` for a name that does not match :data:`NAME_PATTERN`
    and ``TypeError`` for a value that cannot be shared.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"share: the name {name!r} must start with a letter and hold only letters, digits, "
            "'_' and '-' (at most 64 characters)"
        )
    from phds_tre.sdc.output import SDCOutput

    if isinstance(value, SDCOutput):
        output: SDCOutput[Any] = value
    else:
        from phds_tre.sdc.frame import frame_output

        output = frame_output(_frame_of(value), call="share")
    payload = json.loads(json.dumps(output.to_payload(), allow_nan=False))
    envelope = {
        "schema": SHARE_SCHEMA,
        "version": SHARE_VERSION,
        "name": name,
        "payload": payload,
    }
    note = (
        f"shared result {name!r}: a {output.kind} output ({output.status}), re-checked at the "
        "site before it can be combined"
    )
    return {SHARE_MIME: envelope, "text/plain": note}


def share(name: str, value: object) -> None:
    """Record ``value`` under ``name`` for combining across sites; it is re-checked like any output.

    ``value``: a :mod:`phds_tre.sdc` output (shared as it is), or a DataFrame,
    Series, numpy array, dict of numbers or dict of dicts of numbers (shared
    as a raw ``"frame"`` output: review at best). Displays one bundle (see the
    module docstring); returns nothing, so the cell shows it once.
    """
    from IPython.display import display

    display(share_bundle(name, value), raw=True)
