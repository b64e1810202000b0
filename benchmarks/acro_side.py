"""ACRO side of the ``phds_tre.sdc`` benchmarks; runs inside ``benchmarks/.venv-acro``.

ACRO 1.0.2 pins ``pandas<=2.3.3`` while the project runs pandas 3.x, so ACRO is
timed in its own interpreter. ``run_sdc.py`` starts this script once per case::

    benchmarks/.venv-acro/bin/python benchmarks/acro_side.py '<request JSON>'

The request names a case (``crosstab``, ``pivot_mean`` or ``sparse_crosstab``),
the data spec (see :mod:`sdc_data`; the data are regenerated here from the same
seed), the number of repeats and whether to warm up. The script prints one JSON
object on stdout: the checksum of the generated data, and for each tool
(``pandas`` in this venv, ``acro`` without mitigation, ``acro_suppress``) the
per-repeat and median seconds plus a few facts about the output (shape, NaN
cells, the status ACRO recorded, whether unmitigated ACRO matches pandas).
Everything else ACRO prints (its log) goes to stderr.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pandas as pd
from sdc_data import CaseData, DataSpec, checksum, generate

TableFn = Callable[[], pd.DataFrame]


def _time_calls(fn: TableFn, repeats: int, warmup: bool) -> tuple[list[float], pd.DataFrame]:
    """Call ``fn`` ``repeats`` times (after an optional untimed warm-up); return times, output."""
    out: pd.DataFrame | None = None
    if warmup:
        out = fn()
    times: list[float] = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    assert out is not None
    return times, out


def _last_status(session: Any) -> str | None:
    """Status ACRO recorded for its most recent output ("pass", "fail", "review")."""
    with contextlib.suppress(Exception):
        records = list(session.results.results.values())
        return str(records[-1].status)
    return None


def _calls(case: str, data: CaseData, session: Any) -> tuple[TableFn, TableFn]:
    """The pandas call and the equivalent ACRO call (on ``session``) for ``case``."""
    row = pd.Series(data.row, name="row")
    col = pd.Series(data.col, name="col")
    if case == "crosstab":
        return (lambda: pd.crosstab(row, col)), (lambda: session.crosstab(row, col))
    if case == "sparse_crosstab":
        return (
            lambda: pd.crosstab(row, col, margins=True),
            lambda: session.crosstab(row, col, margins=True),
        )
    if case == "pivot_mean":
        frame = pd.DataFrame({"row": data.row, "col": data.col, "value": data.value})
        kwargs: dict[str, Any] = {
            "values": "value",
            "index": "row",
            "columns": "col",
            "aggfunc": "mean",
        }
        return (
            lambda: pd.pivot_table(frame, **kwargs),
            lambda: session.pivot_table(frame, **kwargs),
        )
    raise ValueError(f"unknown case {case!r}")


def _same_values(expected: pd.DataFrame, got: pd.DataFrame) -> bool:
    """True when ``got`` holds ``expected``'s numbers (ignoring labels' dtypes)."""
    if expected.shape != got.shape:
        return False
    return bool(
        np.allclose(expected.to_numpy(float), got.to_numpy(float), rtol=1e-9, equal_nan=True)
    )


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Execute one benchmark request and return the JSON-ready result."""
    import_start = time.perf_counter()
    import acro

    import_seconds = time.perf_counter() - import_start

    case: str = request["case"]
    spec = DataSpec.from_dict(request["spec"])
    repeats = int(request["repeats"])
    warmup = bool(request["warmup"])
    tools: list[str] = list(request.get("tools", ["pandas", "acro", "acro_suppress"]))

    data = generate(spec)
    result: dict[str, Any] = {
        "case": case,
        "checksum": checksum(data),
        "versions": {
            "acro": getattr(acro, "__version__", None) or _dist_version("acro"),
            "pandas": pd.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "acro_import_seconds_in_process": import_seconds,
        "tools": {},
    }
    reference: pd.DataFrame | None = None
    for tool in tools:
        session = None
        if tool != "pandas":
            session = acro.ACRO(suppress=(tool == "acro_suppress"))
        pandas_fn, acro_fn = _calls(case, data, session)
        fn = pandas_fn if tool == "pandas" else acro_fn
        times, out = _time_calls(fn, repeats, warmup)
        entry: dict[str, Any] = {
            "seconds": times,
            "median": statistics.median(times),
            "repeats": repeats,
            "warmup": warmup,
            "nan_cells": int(out.isna().to_numpy().sum()),
            "shape": list(out.shape),
        }
        if tool == "pandas":
            reference = out
        else:
            entry["output_status"] = _last_status(session)
            if tool == "acro":
                if reference is None:
                    reference = pandas_fn()
                entry["matches_pandas"] = _same_values(reference, out)
        result["tools"][tool] = entry
    return result


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    """Entry point: ``acro_side.py '<request JSON>'``; JSON result on stdout, logs on stderr."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    request = json.loads(argv[1])
    # Keep stdout clean for the JSON answer: everything else (ACRO's logging, prints) -> stderr.
    sys.stdout.flush()
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        result = run(request)
    finally:
        sys.stdout.flush()
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
