"""Side-by-side benchmarks of ``phds_tre.sdc`` against pandas and ACRO 1.0.2.

Run from the repository root::

    .venv/bin/python benchmarks/run_sdc.py                 # full run, records results
    .venv/bin/python benchmarks/run_sdc.py --quick         # smoke test (~15 s, no ACRO)
    .venv/bin/python benchmarks/run_sdc.py --acro-sparse   # also re-run ACRO's 200x100 suppression

See ``benchmarks/README.md`` for what each case measures. In short: pandas and
phds are timed alternately in this process (warm-up, then ``--repeats`` runs
each, median); ACRO is timed in its own venv (``benchmarks/.venv-acro``, created
on demand) by ``acro_side.py``, on the same data regenerated from the same seed
and verified by checksum. Every phds answer that is timed is first checked
against pandas: unsuppressed cells must equal pandas' values and every cell
under the policy's ``min_count`` must be suppressed.

Exit status: 0 when the harness ran and every timed phds answer was correct
(also when the phds API is not available yet: its side is then skipped and
reported as such); 1 when phds raised or gave a wrong answer, or, with
``--check-targets``, when a target was missed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pandas as pd
from sdc_data import CASES, QUICK_CASES, CaseData, DataSpec, checksum, generate

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ACRO_VENV = BENCH_DIR / ".venv-acro"
ACRO_VERSION = "1.0.2"
RECORDED_JSON = BENCH_DIR / "results" / "sdc.json"
QUICK_DEFAULT_JSON = BENCH_DIR / ".data" / "sdc-quick.json"

# Measured earlier on this machine (2 cores) with ACRO 1.0.2 by an earlier script,
# on a 200x100 sparse table from 1,000,000 rows with 17,130 unsafe cells (not the
# same generator: sdc_data.SPARSE was made to match its shape and sparsity).
# Recorded, clearly labelled, in place of a re-run unless --acro-sparse is given.
PREVIOUS_ACRO_SPARSE_SUPPRESS_SECONDS = 996.0
# The same suppression re-measured once by this script (`run_sdc.py --acro-sparse`)
# on exactly the data of sdc_data.SPARSE; shown only while the data checksum matches.
SAME_DATA_ACRO_SPARSE_SUPPRESS: dict[str, Any] = {
    "seconds": 1016.4,
    "date_utc": "2026-11-22T20:10:00+00:00",
    "checksum": "sha256:1be22c509102886775b3b509373bfc1ff8df76567a82ed415dc40100cb6ad4bb",
    "unsafe_cells": 17145,
    "note": "one run by `run_sdc.py --acro-sparse --cases sparse_crosstab_margins`, "
    "on a shared machine (load average 2-5 during it), ACRO 1.0.2, pandas 2.3.3",
}
PREVIOUS_MEASUREMENTS: dict[str, str] = {
    "crosstab_dense (1,000,000 rows, 10x6)": "pandas 0.19 s, ACRO 1.42 s, ACRO+suppression 3.31 s",
    "pivot_mean_dense": "pandas 0.13 s, ACRO 2.56 s",
    "sparse 200x100, 17,130 unsafe cells": "ACRO checking 2.7 s, ACRO suppression 996 s",
    "import acro": "1.6-2.1 s",
}

TableFn = Callable[[], pd.DataFrame]


class PhdsError(Exception):
    """phds raised, or returned a table that disagrees with pandas: never time a wrong answer."""


# --------------------------------------------------------------------------------------------
# machine and environment


def machine_info() -> dict[str, Any]:
    """Facts about this machine and process that matter for reading the timings."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    try:
        phds_version: str | None = importlib.import_module("phds_tre").__version__
    except Exception:
        phds_version = None
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "phds_sdc_source_sha256": phds_source_digest(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pandas": pd.__version__,
        "numpy": np.__version__,
        "phds_tre": phds_version,
        "git_commit": commit,
        "openblas_env": {
            k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ
        },
    }


def phds_source_digest() -> str:
    """sha256 over ``phds_tre/sdc/**/*.py`` as on disk: names the code measured, even uncommitted."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "phds_tre" / "sdc").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()


def load_phds() -> tuple[Any | None, str | None]:
    """``(phds_tre.sdc, None)`` when the API under test is importable, else ``(None, reason)``."""
    try:
        sdc = importlib.import_module("phds_tre.sdc")
    except Exception as exc:
        return None, f"`import phds_tre.sdc` failed: {type(exc).__name__}: {exc}"
    missing = [
        name for name in ("crosstab", "pivot_table") if not callable(getattr(sdc, name, None))
    ]
    if missing:
        return None, f"phds_tre.sdc has no {' / '.join(missing)} yet (API not implemented)"
    return sdc, None


def policy_thresholds() -> tuple[int, bool]:
    """``(min_count, zeros_disclosive)`` of phds' default policy (10, True if unavailable)."""
    try:
        policy = importlib.import_module("phds_tre.sdc.policy").DEFAULT_POLICY
        return int(policy.min_count), bool(policy.zeros_disclosive)
    except Exception:
        return 10, True


def acro_python() -> Path:
    """The interpreter of the ACRO venv."""
    return ACRO_VENV / "bin" / "python"


def ensure_acro_venv(log: Callable[[str], None]) -> tuple[bool, str | None]:
    """Make sure ``benchmarks/.venv-acro`` has ACRO 1.0.2; create it if needed."""
    probe = "import importlib.metadata as m; print(m.version('acro'))"
    python = acro_python()
    if python.exists():
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip() == ACRO_VERSION:
            return True, None
    system_python = shutil.which("python3")
    if system_python is None:
        return False, "no python3 on PATH to create benchmarks/.venv-acro"
    log(f"creating {ACRO_VENV.relative_to(REPO_ROOT)} with acro=={ACRO_VERSION} (about 30 s) ...")
    steps = [
        [system_python, "-m", "venv", str(ACRO_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", f"acro=={ACRO_VERSION}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return False, f"`{' '.join(map(str, step))}` failed: {' | '.join(tail)}"
    return True, None


# --------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Per-repeat seconds of one tool in one case."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median of the repeats."""
        return statistics.median(self.seconds)

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        """JSON-ready form."""
        return {"status": "measured", "median": self.median, "seconds": self.seconds, **extra}


def _timed(fn: TableFn) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def time_alternating(
    fns: dict[str, TableFn], repeats: int, warmup: bool, already_warm: frozenset[str] = frozenset()
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Time several callables alternately (order rotated each round); return timings, outputs.

    With ``warmup`` each callable not in ``already_warm`` first runs once untimed.
    The outputs returned are those of the last timed round.
    """
    names = list(fns)
    if warmup:
        for name in names:
            if name not in already_warm:
                fns[name]()
    timings = {name: Timing() for name in names}
    outputs: dict[str, Any] = {}
    for round_no in range(repeats):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, outputs[name] = _timed(fns[name])
            timings[name].seconds.append(seconds)
    return timings, outputs


# --------------------------------------------------------------------------------------------
# correctness


def _flat_labels(index: pd.Index) -> list[str]:
    return [
        "|".join(map(str, label)) if isinstance(label, tuple) else str(label) for label in index
    ]


def _drop_constant_outer_levels(columns: pd.Index, nlevels: int) -> pd.Index:
    while columns.nlevels > nlevels and columns.get_level_values(0).nunique() == 1:
        columns = columns.droplevel(0)
    return columns


def check_against_pandas(
    reference: pd.DataFrame,
    got: Any,
    counts: pd.DataFrame,
    min_count: int,
    zeros_disclosive: bool,
    expect_no_suppression: bool,
    margins_name: str | None,
) -> dict[str, Any]:
    """Compare a phds result with pandas' table; raise :class:`PhdsError` on a wrong answer.

    Checks that ``got.table`` has pandas' row and column labels, that every cell
    phds left unsuppressed equals pandas' value (``rtol=1e-9``), and that every
    cell whose contributor count is under ``min_count`` (or zero, when zeros are
    disclosive) is suppressed. With margins it also counts rows/columns where
    exactly one cell (the total included) is suppressed: such a cell can be
    recovered by subtraction (reported, not fatal).
    """
    for attr in ("table", "status", "checks"):
        if not hasattr(got, attr):
            raise PhdsError(f"phds result has no .{attr} attribute ({type(got).__name__})")
    table = got.table
    if not isinstance(table, pd.DataFrame):
        raise PhdsError(f"phds .table is a {type(table).__name__}, not a DataFrame")
    columns = _drop_constant_outer_levels(table.columns, reference.columns.nlevels)
    got_rows, got_cols = _flat_labels(table.index), _flat_labels(columns)
    ref_rows, ref_cols = _flat_labels(reference.index), _flat_labels(reference.columns)
    for what, ref_labels, got_labels in (
        ("row", ref_rows, got_rows),
        ("column", ref_cols, got_cols),
    ):
        if sorted(ref_labels) != sorted(got_labels) or len(set(got_labels)) != len(got_labels):
            only_ref = sorted(set(ref_labels) - set(got_labels))[:5]
            only_got = sorted(set(got_labels) - set(ref_labels))[:5]
            raise PhdsError(
                f"phds {what} labels differ from pandas': {len(got_labels)} vs {len(ref_labels)}; "
                f"only in pandas {only_ref}, only in phds {only_got}"
            )
    row_pos = [got_rows.index(label) for label in ref_rows]
    col_pos = [got_cols.index(label) for label in ref_cols]
    try:
        values = table.to_numpy(dtype=float, na_value=np.nan)[np.ix_(row_pos, col_pos)]
    except (TypeError, ValueError) as exc:
        raise PhdsError(f"phds .table is not numeric: {exc}") from None
    expected = reference.to_numpy(dtype=float, na_value=np.nan)
    shown = ~np.isnan(values)
    wrong = shown & ~np.isclose(values, expected, rtol=1e-9, atol=1e-12)
    if wrong.any():
        r, c = np.argwhere(wrong)[0]
        raise PhdsError(
            f"{int(wrong.sum())} unsuppressed phds cells differ from pandas, e.g. "
            f"[{ref_rows[r]}, {ref_cols[c]}]: phds {float(values[r, c])!r},"
            f" pandas {float(expected[r, c])!r}"
        )
    n = counts.reindex(index=reference.index, columns=reference.columns).to_numpy(dtype=float)
    unsafe = (n < min_count) & ((n > 0) | zeros_disclosive)
    leaked = unsafe & shown
    if leaked.any():
        r, c = np.argwhere(leaked)[0]
        raise PhdsError(
            f"{int(leaked.sum())} cells with fewer than {min_count} contributors are not"
            f" suppressed, e.g. [{ref_rows[r]}, {ref_cols[c]}]"
            f" (n={int(n[r, c])}, shown {float(values[r, c])!r})"
        )
    suppressed = ~shown & ~np.isnan(expected)
    if expect_no_suppression and suppressed.any():
        raise PhdsError(
            f"phds suppressed {int(suppressed.sum())} cells of a table whose cells are all safe"
        )
    result: dict[str, Any] = {
        "matches_pandas": True,
        "status": str(got.status),
        "cells": int(values.size),
        "primary_unsafe_cells": int(unsafe.sum()),
        "suppressed_cells": int(suppressed.sum()),
        "secondary_suppressed_cells": int((suppressed & ~unsafe).sum()),
    }
    if margins_name is not None and margins_name in ref_rows and margins_name in ref_cols:
        hidden = ~shown
        result["lines_with_one_suppressed_cell"] = int(
            (hidden.sum(axis=1) == 1).sum() + (hidden.sum(axis=0) == 1).sum()
        )
    return result


# --------------------------------------------------------------------------------------------
# ACRO side


def run_acro(
    case: str,
    spec: DataSpec,
    expected_checksum: str,
    tools: list[str],
    repeats: int,
    warmup: bool,
    timeout: float,
) -> dict[str, Any]:
    """Run ``acro_side.py`` in the ACRO venv for one case; return its JSON (or an error entry)."""
    request = {
        "case": case,
        "spec": spec.to_dict(),
        "tools": tools,
        "repeats": repeats,
        "warmup": warmup,
    }
    cmd = [str(acro_python()), str(BENCH_DIR / "acro_side.py"), json.dumps(request)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": "timeout", "timeout_seconds": timeout}
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-5:])
        return {"error": f"acro_side.py exited {done.returncode}: {tail}"}
    try:
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"acro_side.py printed no JSON: {done.stdout[-300:]!r}"}
    if answer.get("checksum") != expected_checksum:
        return {
            "error": "data mismatch: the ACRO process generated different data "
            f"({answer.get('checksum')} != {expected_checksum}); its timings are not used"
        }
    answer["subprocess_wall_seconds"] = wall
    return answer


def merge_acro(case_result: dict[str, Any], answer: dict[str, Any], labels: dict[str, str]) -> None:
    """Put the ACRO process's tools into ``case_result['tools']`` under the names in ``labels``."""
    tools = case_result["tools"]
    if "error" in answer:
        for name in labels.values():
            tools[name] = {"status": "error", "reason": answer["error"]}
        return
    case_result.setdefault("acro_process", {}).update(
        {"versions": answer["versions"], "checksum_verified": True}
    )
    for side_name, name in labels.items():
        tools[name] = {"status": "measured", **answer["tools"][side_name]}


# --------------------------------------------------------------------------------------------
# the cases


@dataclass
class Settings:
    """What this run does (from the command line)."""

    quick: bool
    repeats: int
    warmup: bool
    use_acro: bool
    acro_sparse: bool
    acro_timeout: float
    import_repeats: int
    cases: list[str]
    key_kind: str


def _series(data: CaseData) -> tuple[pd.Series, pd.Series, pd.DataFrame]:
    row = pd.Series(data.row, name="row")
    col = pd.Series(data.col, name="col")
    frame = pd.DataFrame({"row": row, "col": col, "value": data.value})
    return row, col, frame


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
    if not num or not den or "median" not in num or "median" not in den:
        return None
    return float(num["median"]) / float(den["median"])


def run_pair(
    pandas_fn: TableFn,
    phds_fn: TableFn | None,
    phds_skip: str | None,
    checker: Callable[[Any], dict[str, Any]],
    settings: Settings,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Time pandas and phds alternately; phds is checked for correctness before any timing.

    The untimed checked call doubles as phds' warm-up; its last timed answer is checked too.
    """
    tools: dict[str, Any] = {}
    fns: dict[str, TableFn] = {"pandas": pandas_fn}
    correctness: dict[str, Any] | None = None
    if phds_fn is not None:
        call_phds = phds_fn

        def guarded() -> Any:
            try:
                return call_phds()
            except Exception as exc:
                raise PhdsError(f"phds raised {type(exc).__name__}: {exc}") from exc

        correctness = checker(guarded())
        fns["phds"] = guarded
    timings, outputs = time_alternating(
        fns, settings.repeats, settings.warmup, already_warm=frozenset({"phds"})
    )
    if "phds" in outputs:
        checker(outputs["phds"])  # the last timed answer must be right too
    tools["pandas"] = timings["pandas"].to_dict(version=pd.__version__, process="main venv")
    if "phds" in timings:
        tools["phds"] = timings["phds"].to_dict(
            process="main venv",
            output_status=correctness["status"] if correctness else None,
        )
    else:
        tools["phds"] = {"status": "skipped", "reason": phds_skip}
    for name, entry in tools.items():
        if entry["status"] == "measured":
            log(f"    {name:<14} median {entry['median']:.3f} s")
        else:
            log(f"    {name:<14} {entry['status']}: {entry.get('reason')}")
    return {"tools": tools, "correctness": correctness}


def target_entry(
    description: str, metric: str, value: float | None, threshold: float, quick: bool
) -> dict[str, Any]:
    """A target and whether this run met it (``None`` when not measured or not applicable)."""
    met: bool | None = None if value is None else value <= threshold
    note = None
    if quick:
        met, note = None, "not assessed: --quick uses smaller data than the target is defined on"
    elif value is None:
        note = "not assessed: phds side not measured in this run"
    return {
        "description": description,
        "metric": metric,
        "threshold": threshold,
        "value": value,
        "met": met,
        "note": note,
    }


def case_table(
    name: str,
    kind: str,
    spec: DataSpec,
    settings: Settings,
    sdc: Any | None,
    phds_skip: str | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Generate one data set, time pandas vs phds on it, and describe it (ACRO added later)."""
    data = generate(spec)
    digest = checksum(data)
    row, col, frame = _series(data)
    min_count, zeros_disclosive = policy_thresholds()
    margins = kind == "sparse_crosstab"
    api: Any = sdc  # only called when not None
    counts = pd.crosstab(row, col, margins=margins)
    pivot_kwargs: dict[str, Any] = {
        "values": "value",
        "index": "row",
        "columns": "col",
        "aggfunc": "mean",
    }
    if kind == "pivot_mean":
        call = 'pivot_table(data, values="value", index="row", columns="col", aggfunc="mean")'

        def pandas_fn() -> pd.DataFrame:
            return pd.pivot_table(frame, **pivot_kwargs)

        def phds_call() -> Any:
            return api.pivot_table(frame, **pivot_kwargs)

    else:
        call = f"crosstab(row, col{', margins=True' if margins else ''})"

        def pandas_fn() -> pd.DataFrame:
            return pd.crosstab(row, col, margins=margins)

        def phds_call() -> Any:
            return api.crosstab(row, col, margins=margins)

    reference = pandas_fn()

    def checker(got: Any) -> dict[str, Any]:
        return check_against_pandas(
            reference,
            got,
            counts,
            min_count,
            zeros_disclosive,
            expect_no_suppression=spec.name.startswith("dense"),
            margins_name="All" if margins else None,
        )

    n_interior = counts.iloc[:-1, :-1] if margins else counts
    log(f"  {name}: {spec.n_rows:,} rows, {call}")
    pair = run_pair(
        pandas_fn, phds_call if sdc is not None else None, phds_skip, checker, settings, log
    )
    return {
        "data": {
            **spec.to_dict(),
            "checksum": digest,
            "key_dtype_main": str(row.dtype),
            "table_shape": list(reference.shape),
            "interior_cells": int(n_interior.size),
            "interior_cells_under_min_count": int(
                ((n_interior < min_count) & ((n_interior > 0) | zeros_disclosive)).to_numpy().sum()
            ),
            "interior_zero_cells": int((n_interior == 0).to_numpy().sum()),
            "min_count": min_count,
            "zeros_disclosive": zeros_disclosive,
        },
        "call": call,
        **pair,
    }


def time_imports(python: Path, module: str, repeats: int, warmup: bool = True) -> dict[str, Any]:
    """Median in-process time of ``import module`` over ``repeats`` fresh interpreters.

    With ``warmup``, one untimed run first, so that byte-code compilation is not counted.
    """
    code = (
        "import time; _t = time.perf_counter(); import "
        + module
        + "; print(time.perf_counter() - _t)"
    )
    seconds: list[float] = []
    skip = 1 if warmup else 0
    for attempt in range(repeats + skip):
        done = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
        )
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            return {"status": "error", "reason": f"import {module} failed: {tail}"}
        if attempt >= skip:
            seconds.append(float(done.stdout.strip().splitlines()[-1]))
    shown = python.relative_to(REPO_ROOT) if python.is_relative_to(REPO_ROOT) else python
    return Timing(seconds).to_dict(python=str(shown), module=module)


# --------------------------------------------------------------------------------------------
# the run


TABLE_CASES: list[tuple[str, str, str]] = [
    # (case name, kind of call, data spec)
    ("crosstab_dense", "crosstab", "dense_10x6"),
    ("pivot_mean_dense", "pivot_mean", "dense_10x6"),
    ("sparse_crosstab_margins", "sparse_crosstab", "sparse_200x100"),
    ("sparse_small_crosstab_margins", "sparse_crosstab", "sparse_small_50x25"),
    ("sparser_crosstab_margins", "sparse_crosstab", "sparser_200x100"),
]
ACRO_LABELS = {"pandas": "pandas_acro_venv", "acro": "acro", "acro_suppress": "acro_suppress"}


def not_re_run_entry(data_checksum: str) -> dict[str, Any]:
    """Placeholder for ACRO's suppression of the full sparse table when it is not re-run."""
    previous = PREVIOUS_ACRO_SPARSE_SUPPRESS_SECONDS
    same = SAME_DATA_ACRO_SPARSE_SUPPRESS
    extra: dict[str, Any] = {}
    if same["checksum"] == data_checksum:
        extra["same_data_previous"] = same
    return {
        **extra,
        "status": "not_re_run",
        "previous_median_seconds": previous,
        "reason": (
            f"NOT re-run by this run (it takes ~1,000 s; pass --acro-sparse). {previous:.0f} s "
            "was measured earlier on this machine by an earlier script, on a 200x100 sparse "
            "table from 1,000,000 rows with 17,130 unsafe cells (a data set of the same shape "
            "and sparsity, not this one); see sparse_small_crosstab_margins for ACRO's "
            "suppression re-run on a smaller variant"
        ),
    }


def add_acro_side(
    name: str,
    kind: str,
    spec: DataSpec,
    result: dict[str, Any],
    settings: Settings,
    log: Callable[[str], None],
) -> None:
    """Time ACRO (and pandas 2.3) on the case's data in the ACRO venv; add them to ``result``."""
    tools = result["tools"]
    sparse_full = name == "sparse_crosstab_margins"
    checks_only = sparse_full or name == "sparser_crosstab_margins"
    side_tools = ["pandas", "acro"] if checks_only else ["pandas", "acro", "acro_suppress"]
    log(f"    ACRO venv: {', '.join(side_tools)} ...")
    answer = run_acro(
        kind,
        spec,
        result["data"]["checksum"],
        side_tools,
        settings.repeats,
        settings.warmup,
        timeout=max(600.0, settings.acro_timeout),
    )
    merge_acro(result, answer, {t: ACRO_LABELS[t] for t in side_tools})
    if sparse_full and settings.acro_sparse:
        timeout = settings.acro_timeout
        log(f"    ACRO suppression on the full sparse table (once, timeout {timeout:.0f} s) ...")
        answer = run_acro(
            kind, spec, result["data"]["checksum"], ["acro_suppress"], 1, False, timeout=timeout
        )
        if answer.get("error") == "timeout":
            tools["acro_suppress"] = {
                "status": "timed_out",
                "reason": f"killed after {timeout:.0f} s (a lower bound)",
                "lower_bound_seconds": timeout,
            }
        else:
            merge_acro(result, answer, {"acro_suppress": "acro_suppress"})
    elif sparse_full:
        tools["acro_suppress"] = not_re_run_entry(result["data"]["checksum"])
    elif checks_only:
        tools["acro_suppress"] = {
            "status": "skipped",
            "reason": "not run for this case (one query per unsafe cell: minutes); "
            "ACRO's suppression is re-run on sparse_small_crosstab_margins",
        }
    for label in ("pandas_acro_venv", "acro", "acro_suppress"):
        entry = tools.get(label, {})
        if entry.get("status") == "measured":
            log(f"    {label:<16} median {entry['median']:.3f} s")
        elif entry:
            log(f"    {label:<16} {entry['status']}: {entry.get('reason')}")


TARGETS: dict[str, tuple[str, str, float]] = {
    # case: (description, metric, threshold); the metric must be <= the threshold
    "crosstab_dense": (
        "sdc.crosstab at most 1.3x pandas.crosstab (same run)",
        "phds/pandas",
        1.3,
    ),
    "pivot_mean_dense": (
        'sdc.pivot_table(aggfunc="mean") at most 1.5x pandas.pivot_table (same run)',
        "phds/pandas",
        1.5,
    ),
    "sparse_crosstab_margins": (
        "phds primary check + secondary suppression of the 200x100 table under 5 s",
        "phds median seconds",
        5.0,
    ),
}


def add_ratios_and_target(name: str, result: dict[str, Any], quick: bool) -> None:
    """Ratios between the tools' medians, and the case's target (if it has one)."""
    tools = result["tools"]
    ref_acro = tools.get("pandas_acro_venv")
    ratios = {
        "phds/pandas": _ratio(tools.get("phds"), tools["pandas"]),
        "acro/pandas (acro venv)": _ratio(tools.get("acro"), ref_acro),
        "acro_suppress/pandas (acro venv)": _ratio(tools.get("acro_suppress"), ref_acro),
        "acro/phds": _ratio(tools.get("acro"), tools.get("phds")),
        "acro_suppress/phds": _ratio(tools.get("acro_suppress"), tools.get("phds")),
    }
    result["ratios"] = ratios
    if name in TARGETS:
        description, metric, threshold = TARGETS[name]
        value = ratios["phds/pandas"] if metric == "phds/pandas" else tools["phds"].get("median")
        result["target"] = target_entry(description, metric, value, threshold, quick)


def import_case(
    settings: Settings,
    phds_ok: bool,
    phds_skip: str | None,
    acro_ok: bool,
    acro_skip: str | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Time ``import phds_tre.sdc`` / ``import acro`` (and pandas in both venvs)."""
    log("  import_time: fresh interpreters, median")
    main_python = Path(sys.executable)
    n, warm = settings.import_repeats, not settings.quick
    imports: dict[str, Any] = {
        "pandas (main venv)": time_imports(main_python, "pandas", n, warm),
    }
    if phds_ok:
        imports["phds_tre.sdc"] = time_imports(main_python, "phds_tre.sdc", n, warm)
    else:
        imports["phds_tre.sdc"] = {"status": "skipped", "reason": phds_skip}
    if acro_ok:
        imports["pandas (acro venv)"] = time_imports(acro_python(), "pandas", n, warm)
        imports["acro"] = time_imports(acro_python(), "acro", n, warm)
    else:
        imports["acro"] = {"status": "skipped", "reason": acro_skip}
    for label, entry in imports.items():
        if entry["status"] == "measured":
            log(f"    {label:<20} median {entry['median']:.3f} s")
        else:
            log(f"    {label:<20} {entry['status']}: {entry.get('reason')}")
    return {
        "tools": imports,
        "ratios": {"acro/phds": _ratio(imports.get("acro"), imports.get("phds_tre.sdc"))},
        "target": {
            "description": "import phds_tre.sdc vs import acro: reported for comparison",
            "metric": "seconds",
            "threshold": None,
            "value": imports["phds_tre.sdc"].get("median"),
            "met": None,
            "note": "informational: the issue sets no threshold",
        },
    }


def run(settings: Settings, log: Callable[[str], None]) -> tuple[dict[str, Any], bool]:
    """Run every selected case; return the results document and whether phds was always right."""
    started = time.perf_counter()
    specs = QUICK_CASES if settings.quick else CASES
    if settings.key_kind != "str":
        specs = {
            k: DataSpec(**{**v.to_dict(), "key_kind": settings.key_kind}) for k, v in specs.items()
        }
    sdc, phds_skip = load_phds()
    if sdc is None:
        log(f"phds side SKIPPED: {phds_skip}")
    acro_ok = False
    acro_skip: str | None = "not run: --quick" if settings.quick else "not run: --no-acro"
    if settings.use_acro:
        acro_ok, acro_skip = ensure_acro_venv(log)
        if not acro_ok:
            log(f"ACRO side SKIPPED: {acro_skip}")

    doc: dict[str, Any] = {
        "schema": 1,
        "mode": "quick" if settings.quick else "full",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "settings": {
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "import_repeats": settings.import_repeats,
            "acro": settings.use_acro,
            "acro_sparse": settings.acro_sparse,
            "acro_timeout_seconds": settings.acro_timeout,
            "key_kind": settings.key_kind,
        },
        "phds": {"available": sdc is not None, "reason": phds_skip},
        "acro": {"available": acro_ok, "version": ACRO_VERSION, "reason": acro_skip},
        "previous_measurements": {
            "note": "measured before on this machine by an earlier script; NOT by this run",
            **PREVIOUS_MEASUREMENTS,
        },
        "cases": {},
    }
    cases: dict[str, Any] = doc["cases"]
    all_correct = True
    for name, kind, spec_name in TABLE_CASES:
        if name not in settings.cases:
            continue
        spec = specs[spec_name]
        try:
            result = case_table(name, kind, spec, settings, sdc, phds_skip, log)
        except PhdsError as exc:
            all_correct = False
            log(f"    phds WRONG/ERROR: {exc}")
            cases[name] = {"error": str(exc), "data": spec.to_dict()}
            if name in TARGETS:
                description, metric, threshold = TARGETS[name]
                cases[name]["target"] = {
                    **target_entry(description, metric, None, threshold, settings.quick),
                    "met": None if settings.quick else False,
                    "note": "phds raised or gave a wrong answer (not timed)",
                }
            continue
        if acro_ok:
            add_acro_side(name, kind, spec, result, settings, log)
        else:
            for label in ("acro", "acro_suppress"):
                result["tools"][label] = {"status": "skipped", "reason": acro_skip}
        add_ratios_and_target(name, result, settings.quick)
        cases[name] = result
    if "import_time" in settings.cases:
        cases["import_time"] = import_case(
            settings, sdc is not None, phds_skip, acro_ok, acro_skip, log
        )

    doc["duration_seconds"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        doc["machine"]["load_average_at_end"] = list(os.getloadavg())
    return doc, all_correct


# --------------------------------------------------------------------------------------------
# reporting


def _fmt_seconds(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    status = entry.get("status")
    if status == "measured":
        median = float(entry["median"])
        return f"{median:.3f} s" if median < 10 else f"{median:.0f} s"
    if status == "not_re_run":
        shown = f"{entry['previous_median_seconds']:.0f} s"
        if "same_data_previous" in entry:
            shown += f"; {entry['same_data_previous']['seconds']:.0f} s on this data"
        return shown + " (earlier measurements, NOT re-run)"
    if status == "timed_out":
        return f"> {entry['lower_bound_seconds']:.0f} s (timed out)"
    return f"{status}"


def _fmt_load(load: list[float] | None) -> str:
    return "-" if not load else "/".join(f"{x:.2f}" for x in load)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_markdown(doc: dict[str, Any]) -> str:
    """Human-readable summary of a results document."""
    m = doc["machine"]
    lines = [
        "# phds_tre.sdc benchmarks",
        "",
        "Generated by `benchmarks/run_sdc.py`; do not edit by hand (see `benchmarks/README.md`).",
        "",
        f"- mode: **{doc['mode']}**; command: `{doc['command']}`",
        f"- date (UTC): {m['date_utc']}; git HEAD: `{m['git_commit']}`; "
        f"phds_tre/sdc sources as measured: `{m.get('phds_sdc_source_sha256', '-')[:19]}…`",
        f"- machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB; "
        f"load average (1/5/15 min) at start {_fmt_load(m.get('load_average_at_start'))}, "
        f"at end {_fmt_load(m.get('load_average_at_end'))}",
        f"- main venv: Python {m['python']}, pandas {m['pandas']}, numpy {m['numpy']}, "
        f"phds_tre {m['phds_tre']}",
    ]
    acro_versions = next(
        (c["acro_process"]["versions"] for c in doc["cases"].values() if "acro_process" in c),
        None,
    )
    if acro_versions:
        lines.append(
            f"- ACRO venv: acro {acro_versions['acro']}, pandas {acro_versions['pandas']}, "
            f"numpy {acro_versions['numpy']}"
        )
    s = doc["settings"]
    lines += [
        f"- repeats: {s['repeats']} (median; warm-up: {s['warmup']}); "
        f"import repeats: {s['import_repeats']}; keys: {s['key_kind']}",
        f"- total run time: {doc['duration_seconds']} s",
        "",
    ]
    if not doc["phds"]["available"]:
        lines += [f"> **phds side not measured**: {doc['phds']['reason']}", ""]
    if not doc["acro"]["available"]:
        lines += [f"> **ACRO side not measured**: {doc['acro']['reason']}", ""]
    if doc["mode"] == "quick":
        lines += ["> **quick mode**: small data, 1 repeat; a smoke test, not a measurement.", ""]

    lines += ["## Targets", "", "| case | target | value | met |", "| --- | --- | --- | --- |"]
    for name, case in doc["cases"].items():
        target = case.get("target")
        if not target:
            continue
        value = target["value"]
        shown = (
            "-"
            if value is None
            else (f"{value:.2f}x" if target["metric"] == "phds/pandas" else f"{value:.3f} s")
        )
        met = {True: "**yes**", False: "**NO**", None: "n/a"}[target["met"]]
        if target.get("note"):
            met += f" ({target['note']})"
        lines.append(f"| {name} | {target['description']} | {shown} | {met} |")
    lines.append("")

    tool_cols = [
        ("pandas", "pandas (main)"),
        ("phds", "phds"),
        ("pandas_acro_venv", "pandas (ACRO venv)"),
        ("acro", "ACRO"),
        ("acro_suppress", "ACRO + suppression"),
    ]
    lines += ["## Tables: median seconds", ""]
    lines.append(
        "| case | rows | table | "
        + " | ".join(t[1] for t in tool_cols)
        + " | phds/pandas | ACRO/phds | ACRO+supp./phds |"
    )
    lines.append("| --- " * (len(tool_cols) + 6) + "|")
    for name, case in doc["cases"].items():
        if name == "import_time":
            continue
        data = case.get("data", {})
        if "error" in case:
            lines.append(f"| {name} | {data.get('n_rows', '-'):,} | - | ERROR: {case['error']} |")
            continue
        shape = f"{data['n_row_keys']}x{data['n_col_keys']}"
        cells = [_fmt_seconds(case["tools"].get(key)) for key, _ in tool_cols]
        lines.append(
            f"| {name} | {data['n_rows']:,} | {shape} | "
            + " | ".join(cells)
            + f" | {_fmt_ratio(case['ratios']['phds/pandas'])}"
            + f" | {_fmt_ratio(case['ratios']['acro/phds'])}"
            + f" | {_fmt_ratio(case['ratios']['acro_suppress/phds'])} |"
        )
    lines.append("")

    lines += ["## Tables: data and outputs", ""]
    for name, case in doc["cases"].items():
        if name == "import_time" or "error" in case:
            continue
        data, tools = case["data"], case["tools"]
        lines.append(
            f"- **{name}**: `{case['call']}`; keys {data['key_dtype_main']} "
            f"(Zipf {data['row_zipf']}/{data['col_zipf']}); "
            f"{data['interior_cells_under_min_count']:,} of {data['interior_cells']:,} "
            f"interior cells under min_count={data['min_count']} "
            f"({data['interior_zero_cells']:,} zero); data {data['checksum'][:19]}…"
            + (" (checksum verified in the ACRO process)" if "acro_process" in case else "")
        )
        corr = case.get("correctness")
        if corr:
            extra = ""
            if "lines_with_one_suppressed_cell" in corr:
                ones = corr["lines_with_one_suppressed_cell"]
                extra = f", rows/columns with exactly one suppressed cell: {ones}"
            lines.append(
                f"  - phds: status `{corr['status']}`, matches pandas on every unsuppressed cell, "
                f"{corr['suppressed_cells']:,} cells suppressed "
                f"({corr['primary_unsafe_cells']:,} primary, "
                f"{corr['secondary_suppressed_cells']:,} secondary){extra}"
            )
        for key in ("acro", "acro_suppress"):
            entry = tools.get(key, {})
            if entry.get("status") == "measured":
                bits = [f"output status `{entry.get('output_status')}`"]
                bits.append(f"{entry['nan_cells']:,} NaN cells")
                if "matches_pandas" in entry:
                    bits.append(
                        "matches pandas" if entry["matches_pandas"] else "DIFFERS from pandas"
                    )
                lines.append(f"  - {key}: " + ", ".join(bits))
            elif entry.get("status") in ("not_re_run", "timed_out", "error", "skipped"):
                lines.append(f"  - {key}: {entry['status']}: {entry['reason']}")
                same = entry.get("same_data_previous")
                if same:
                    lines.append(
                        f"    - the same suppression on exactly this data (checksum matches) took "
                        f"{same['seconds']:.0f} s when run on {same['date_utc'][:10]}: "
                        f"{same['note']}; not re-run either"
                    )
    lines.append("")

    if "import_time" in doc["cases"]:
        lines += [
            "## Import time (fresh interpreter, median)",
            "",
            "| import | median |",
            "| --- | --- |",
        ]
        for label, entry in doc["cases"]["import_time"]["tools"].items():
            reason = f": {entry.get('reason')}" if entry.get("status") != "measured" else ""
            lines.append(f"| `{label}` | {_fmt_seconds(entry)}{reason} |")
        lines.append("")

    prev = doc["previous_measurements"]
    lines += ["## Earlier measurements (not from this run)", "", f"_{prev['note']}_", ""]
    lines += [f"- {k}: {v}" for k, v in prev.items() if k != "note"]
    lines.append("")
    return "\n".join(lines)


def write_results(doc: dict[str, Any], out: Path) -> Path:
    """Write ``out`` (JSON) and the Markdown summary beside it (same stem, ``.md``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(render_markdown(doc), encoding="utf-8")
    return md


# --------------------------------------------------------------------------------------------
# command line

ALL_CASES = [*(name for name, _, _ in TABLE_CASES), "import_time"]


def parse_args(argv: list[str] | None) -> tuple[Settings, Path, bool, Path | None]:
    """Command-line options -> settings, output path, fail on missed targets?, JSON to render."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, 1 repeat, no ACRO")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per tool (5)")
    parser.add_argument("--import-repeats", type=int, default=None, help="fresh imports (7)")
    parser.add_argument("--no-acro", action="store_true", help="skip the ACRO side")
    parser.add_argument(
        "--acro-sparse",
        action="store_true",
        help="also time ACRO's suppression of the full 200x100 table (took 996 s)",
    )
    parser.add_argument("--acro-timeout", type=float, default=1800.0, help="seconds (1800)")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated subset")
    parser.add_argument("--keys", choices=["str", "int"], default="str", help="key dtype")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (.md beside it)")
    parser.add_argument("--check-targets", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only rewrite the .md beside an existing results JSON (runs nothing)",
    )
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {ALL_CASES}")
    if args.quick and args.acro_sparse:
        parser.error("--acro-sparse needs a full run (not --quick)")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    import_repeats = (
        args.import_repeats if args.import_repeats is not None else (1 if args.quick else 7)
    )
    if repeats < 1 or import_repeats < 1:
        parser.error("--repeats and --import-repeats must be at least 1")
    settings = Settings(
        quick=args.quick,
        repeats=repeats,
        warmup=True,
        use_acro=not (args.quick or args.no_acro),
        acro_sparse=args.acro_sparse,
        acro_timeout=args.acro_timeout,
        import_repeats=import_repeats,
        cases=cases,
        key_kind=args.keys,
    )
    out = args.out or (QUICK_DEFAULT_JSON if args.quick else RECORDED_JSON)
    return settings, out, args.check_targets, args.render


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring for the exit status."""
    settings, out, check_targets, render = parse_args(argv)
    if render is not None:
        md = render.with_suffix(".md")
        md.write_text(render_markdown(json.loads(render.read_text(encoding="utf-8"))), "utf-8")
        print(f"wrote {md}")
        return 0

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"phds_tre.sdc benchmarks ({'quick' if settings.quick else 'full'} mode) -> {out}")
    doc, all_correct = run(settings, log)
    md = write_results(doc, out)
    log(f"wrote {out} and {md} in {doc['duration_seconds']} s")
    missed = [
        name for name, case in doc["cases"].items() if case.get("target", {}).get("met") is False
    ]
    if missed:
        log(f"targets missed: {', '.join(missed)}")
    if not all_correct:
        log("FAILED: phds raised or gave a wrong answer (see above); those cases were not timed")
        return 1
    if check_targets and missed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
