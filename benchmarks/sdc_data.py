"""Deterministic synthetic data for the ``phds_tre.sdc`` benchmarks.

This module is imported by both sides of the benchmark: by ``run_sdc.py`` in the
project venv (pandas 3.x) and by ``acro_side.py`` in ``benchmarks/.venv-acro``
(ACRO 1.0.2 pins pandas <= 2.3.3). It therefore uses only numpy to generate the
data (no pyarrow, no files shared between the processes): each process
regenerates the data from the same seed, and :func:`checksum` lets the caller
verify that both processes measured identical data.

Keys are generated as ``int64`` category codes and handed to pandas as string
labels (``"r007"``, ``"c042"``: zero-padded so that label order is code order),
as hospital data have them; each pandas version then uses its default string
dtype (``str`` in pandas 3, ``object`` in pandas 2.3). ``key_kind="int"`` hands
over the codes themselves instead. The magnitude column is a non-negative
``float64`` (gamma distributed, like a length of stay or a cost).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["CASES", "QUICK_CASES", "CaseData", "DataSpec", "checksum", "generate"]

SEED = 20_240_611
"""Base seed; each spec adds its own ``seed_offset`` so cases are independent."""


@dataclass(frozen=True)
class DataSpec:
    """How to generate one benchmark's data set.

    Attributes:
        name: short identifier, used as the case key in the results.
        n_rows: number of records.
        n_row_keys: number of distinct row categories (table rows).
        n_col_keys: number of distinct column categories (table columns).
        row_zipf: exponent ``a`` of the row key distribution, ``p(i) ∝ 1/(i+1)**a``;
            ``0`` means uniform.
        col_zipf: the same for the column key.
        seed_offset: added to :data:`SEED`.
        key_kind: ``"str"`` (labels, the default) or ``"int"`` (the codes).
    """

    name: str
    n_rows: int
    n_row_keys: int
    n_col_keys: int
    row_zipf: float = 0.0
    col_zipf: float = 0.0
    seed_offset: int = 0
    key_kind: str = "str"

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (for the subprocess and the results file)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class CaseData:
    """The generated columns of one data set (plain numpy arrays).

    ``row_codes``/``col_codes`` are the ``int64`` codes; ``row``/``col`` the keys as
    handed to pandas (an ``object`` array of labels, or the codes for ``key_kind="int"``).
    """

    row_codes: np.ndarray
    col_codes: np.ndarray
    row: np.ndarray
    col: np.ndarray
    value: np.ndarray


def _keys(codes: np.ndarray, prefix: str, n: int, kind: str) -> np.ndarray:
    if kind == "int":
        return codes
    if kind != "str":
        raise ValueError(f"key_kind must be 'str' or 'int', not {kind!r}")
    width = len(str(n - 1))
    labels = np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)
    keys: np.ndarray = labels[codes]
    return keys


def _probabilities(n: int, exponent: float) -> np.ndarray | None:
    if exponent == 0.0:
        return None
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    probabilities: np.ndarray = weights / weights.sum()
    return probabilities


def generate(spec: DataSpec) -> CaseData:
    """Generate the data of ``spec``; identical output for identical specs and numpy's PCG64."""
    rng = np.random.Generator(np.random.PCG64(SEED + spec.seed_offset))
    row = rng.choice(
        spec.n_row_keys, size=spec.n_rows, p=_probabilities(spec.n_row_keys, spec.row_zipf)
    )
    col = rng.choice(
        spec.n_col_keys, size=spec.n_rows, p=_probabilities(spec.n_col_keys, spec.col_zipf)
    )
    value = rng.gamma(shape=2.0, scale=50.0, size=spec.n_rows)
    row_codes = np.ascontiguousarray(row, dtype=np.int64)
    col_codes = np.ascontiguousarray(col, dtype=np.int64)
    return CaseData(
        row_codes=row_codes,
        col_codes=col_codes,
        row=_keys(row_codes, "r", spec.n_row_keys, spec.key_kind),
        col=_keys(col_codes, "c", spec.n_col_keys, spec.key_kind),
        value=np.ascontiguousarray(value, dtype=np.float64),
    )


def checksum(data: CaseData) -> str:
    """sha256 over the key codes, the key labels and the values, to prove both processes agree."""
    digest = hashlib.sha256()
    for array, dtype in ((data.row_codes, "<i8"), (data.col_codes, "<i8"), (data.value, "<f8")):
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    for codes, keys in ((data.row_codes, data.row), (data.col_codes, data.col)):
        # keys are a function of the codes: hashing each code's key once covers them all
        _, first = np.unique(codes, return_index=True)
        digest.update(str(keys.dtype).encode())
        digest.update("\x1f".join(str(k) for k in keys[first]).encode())
    return "sha256:" + digest.hexdigest()


# --- the data sets -------------------------------------------------------------------------

DENSE = DataSpec("dense_10x6", n_rows=1_000_000, n_row_keys=10, n_col_keys=6, seed_offset=1)
"""1,000,000 rows, 10×6 uniform keys: every cell is large (~16,700 records) and safe."""

SPARSE = DataSpec(
    "sparse_200x100",
    n_rows=1_000_000,
    n_row_keys=200,
    n_col_keys=100,
    row_zipf=1.5,
    col_zipf=1.5,
    seed_offset=2,
)
"""1,000,000 rows, 200×100 Zipf(1.5) keys: ~17,000 of the 20,000 cells are < 10 (incl. zeros)."""

SPARSE_SMALL = DataSpec(
    "sparse_small_50x25",
    n_rows=100_000,
    n_row_keys=50,
    n_col_keys=25,
    row_zipf=1.5,
    col_zipf=1.5,
    seed_offset=3,
)
"""Smaller variant of :data:`SPARSE` on which ACRO's suppression finishes in seconds."""

SPARSER = DataSpec(
    "sparser_200x100",
    n_rows=100_000,
    n_row_keys=200,
    n_col_keys=100,
    row_zipf=1.5,
    col_zipf=1.5,
    seed_offset=4,
)
"""The 200×100 shape from 100,000 rows: ~19,000 unsafe cells, ~15,500 of them zero."""

CASES: dict[str, DataSpec] = {spec.name: spec for spec in (DENSE, SPARSE, SPARSE_SMALL, SPARSER)}


def _quick(spec: DataSpec, **changes: int) -> DataSpec:
    return DataSpec(**{**spec.to_dict(), "name": spec.name + "_quick", **changes})


QUICK_CASES: dict[str, DataSpec] = {
    "dense_10x6": _quick(DENSE, n_rows=100_000),
    "sparse_200x100": _quick(SPARSE, n_rows=50_000, n_row_keys=100, n_col_keys=50),
    "sparse_small_50x25": _quick(SPARSE_SMALL, n_rows=20_000),
    "sparser_200x100": _quick(SPARSER, n_rows=20_000, n_row_keys=100, n_col_keys=50),
}
"""Smaller data under the same keys, for ``--quick``: a smoke test of the harness, not a
measurement (the sparse tables shrink to 100×50 so that a slow phds still finishes fast)."""
