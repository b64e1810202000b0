"""Exact federated ordinary least squares from per-site sufficient statistics.

Site side::

    s = federate.linear_stats(df, "los ~ age + C(sex)", levels={"sex": ["F", "M"]})
    share("los_stats", s)

Each site shares the triangular factor ``R`` of its ``[X y]`` (``RᵀR`` holds
``XᵀX``, ``Xᵀy`` and ``yᵀy``) and ``n``, checked under the site's policy
(:mod:`phds_tre.federate.shares`). The coordinator stacks the sites' factors
and factors again (:func:`ols`): the result equals ``smf.ols`` on the pooled
rows to rounding, without any row leaving a site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import linalg, stats

from phds_tre.federate.design import Design, DesignError, design_matrices
from phds_tre.federate.shares import (
    Collected,
    FederatedShare,
    ShareCounts,
    ShareError,
    check_counts_against_gram,
    coefficient_table,
    collect,
    dropped_lines,
    matrix_from_json,
    matrix_table,
    matrix_to_json,
    r_factor,
)
from phds_tre.sdc.output import EvidenceError, register_kind
from phds_tre.sdc.policy import Policy, resolve_policy

__all__ = ["LinearStats", "OLSResult", "linear_stats", "ols"]

KIND = "federate.linear_stats"


class LinearStats(FederatedShare):
    """One site's share of a federated OLS: ``R`` of ``[X y]`` and n, checked.

    ``xtx``, ``xty`` and ``yty`` are the cross-products (``RᵀR``), for reading.
    """

    kind = KIND

    def __init__(
        self,
        design: Design,
        columns: list[str],
        outcome: str,
        r: np.ndarray,
        counts: ShareCounts,
        policy: Policy,
        dropped: int = 0,
    ) -> None:
        super().__init__(policy, "linear_stats")
        self.design, self.columns, self.outcome, self.counts = design, columns, outcome, counts
        self.r = r
        self.dropped = dropped  # rows dropped as missing: local information, never released
        self._evaluate()
        self._table = matrix_table(r, [*columns, outcome], self.status == "fail")

    @property
    def gram(self) -> np.ndarray:
        """``[X y]ᵀ[X y]``."""
        return self.r.T @ self.r

    @property
    def xtx(self) -> np.ndarray:
        """``XᵀX``."""
        return self.gram[:-1, :-1]

    @property
    def xty(self) -> np.ndarray:
        """``Xᵀy``."""
        return self.gram[:-1, -1]

    @property
    def yty(self) -> float:
        """``yᵀy``."""
        return float(self.gram[-1, -1])

    def evidence(self) -> dict[str, Any]:
        """Design, counts and the factor (the factor is also the releasable table)."""
        return {
            "design": self.design.to_dict(),
            "columns": list(self.columns),
            "outcome": self.outcome,
            "r": matrix_to_json(self.r),
            "counts": self.counts.to_json(),
        }

    def public(self) -> dict[str, Any]:
        """Design, columns, outcome, n and the factor ``r`` (``None`` when failing)."""
        ok = self.status != "fail"
        return {
            "design": self.design.to_dict(),
            "columns": list(self.columns),
            "outcome": self.outcome,
            "n": self.counts.n if ok else None,
            "r": matrix_to_json(self.r) if ok else None,
        }


def _from_payload(payload: dict[str, Any], policy: Policy) -> LinearStats:
    ev = payload.get("evidence")
    if not isinstance(ev, dict):
        raise EvidenceError("the share carries no evidence to re-check")
    try:
        design = Design.from_json(ev["design"])
        columns = [str(c) for c in ev["columns"]]
        outcome = str(ev["outcome"])
    except (KeyError, TypeError, DesignError) as exc:
        raise EvidenceError(f"share evidence is incomplete or malformed: {exc}") from None
    if len(set(columns)) != len(columns) or outcome in columns:
        raise EvidenceError("design column names are not unique")
    r = matrix_from_json(ev.get("r"), len(columns) + 1, "r")
    counts = ShareCounts.from_json(ev.get("counts"), columns)
    # The rank the dof rule reads is re-derived from the released factor itself.
    counts.rank = int(np.linalg.matrix_rank(r[:-1, :-1])) if columns else 0
    if counts.rank > counts.n:
        raise EvidenceError("the factor has a higher rank than the rows behind it")
    check_counts_against_gram(counts, r.T @ r, columns, len(columns))
    return LinearStats(design, columns, outcome, r, counts, policy)


register_kind(KIND, _from_payload)


def linear_stats(
    df: pd.DataFrame,
    formula: str | Design,
    levels: Mapping[str, list[Any]] | None = None,
    policy: Policy | str | Path | None = None,
) -> LinearStats:
    """Site side: the checked sufficient statistics of ``formula`` on ``df``.

    ``levels`` fixes the categorical levels (first = reference), as sent by the
    coordinator; ``formula`` may also be a :class:`Design` (or its JSON). A
    0/1 outcome has its events checked like a logistic model's.
    """
    design = _design(formula, levels)
    y, X, columns, dropped = design_matrices(df, design)
    outcome = design.formula.split("~", 1)[0].strip() or "y"
    binary = bool(len(y)) and bool(np.all((y == 0) | (y == 1)))
    counts = ShareCounts.of(y, X, columns, binary)
    r = r_factor(np.column_stack([X, y]))
    return LinearStats(design, columns, outcome, r, counts, resolve_policy(policy), dropped)


def _design(formula: str | Design, levels: Mapping[str, list[Any]] | None) -> Design:
    if isinstance(formula, Design):
        if levels is not None:
            raise DesignError("pass levels inside the Design, not beside it")
        return formula
    if isinstance(formula, str) and formula.lstrip().startswith("{"):
        return Design.from_json(formula)
    return Design(formula, dict(levels or {}))


# ---------------------------------------------------------------------------
# coordinator
# ---------------------------------------------------------------------------
class OLSResult:
    """Federated OLS: statsmodels-like results of the pooled regression.

    ``params``, ``bse``, ``tvalues``, ``pvalues`` are pandas Series indexed by
    design column; ``sites_used`` and ``sites_dropped`` (site, reason) say who
    contributed.
    """

    def __init__(
        self,
        design: Design,
        columns: list[str],
        r: np.ndarray,
        nobs: int,
        collected: Collected,
    ) -> None:
        k = len(columns)
        r_xx, r_xy, r_yy = r[:k, :k], r[:k, k], float(r[k, k])
        rank = int(np.linalg.matrix_rank(r_xx))
        if rank < k:
            raise ShareError(
                "the pooled design is rank-deficient (collinear columns, or a level absent "
                "at every site): drop or merge columns"
            )
        self.design, self.columns, self.nobs = design, columns, nobs
        index = pd.Index(columns)
        self.params = pd.Series(linalg.solve_triangular(r_xx, r_xy), index=index)
        # (XᵀX)⁻¹ = R⁻¹R⁻ᵀ from the triangular factor: never an explicit inverse of XᵀX.
        r_inv = linalg.solve_triangular(r_xx, np.eye(k))
        self.normalized_cov_params = pd.DataFrame(r_inv @ r_inv.T, index=index, columns=index)
        self.ssr = r_yy**2
        self.df_resid = float(nobs - rank)
        self.k_constant = int("Intercept" in columns)
        self.df_model = float(rank - self.k_constant)
        self.scale = self.ssr / self.df_resid if self.df_resid > 0 else math.nan
        self.bse = pd.Series(
            np.sqrt(np.diag(self.normalized_cov_params.to_numpy()) * self.scale), index=index
        )
        self.tvalues = self.params / self.bse
        self.pvalues = pd.Series(2 * stats.t.sf(np.abs(self.tvalues), self.df_resid), index=index)
        gram = r.T @ r
        if self.k_constant:
            i = columns.index("Intercept")
            total = gram[i, k]
            tss = gram[k, k] - total**2 / nobs  # centred, as statsmodels with a constant
        else:
            tss = gram[k, k]
        self.rsquared = 1 - self.ssr / tss
        self.sites_used = [site for site, _ in collected.used]
        self.sites_dropped = [(site, reason) for site, reason, _ in collected.dropped]
        self.dropped = dropped_lines(collected, nobs)

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Confidence intervals (t distribution on the residual df), columns 0 and 1."""
        q = stats.t.ppf(1 - alpha / 2, self.df_resid)
        return pd.DataFrame({0: self.params - q * self.bse, 1: self.params + q * self.bse})

    def summary(self) -> str:
        """A readable text summary: the table, the fit, and who contributed."""
        table = coefficient_table(self, "t")
        lines = [
            "Federated OLS (exact: equals OLS on the pooled rows)",
            f"formula: {self.design.formula}",
            f"sites: {', '.join(self.sites_used)}",
            f"nobs: {self.nobs}   df_resid: {self.df_resid:g}   df_model: {self.df_model:g}",
            f"R-squared: {self.rsquared:.4f}   scale: {self.scale:.6g}",
            table.to_string(float_format=lambda v: f"{v:.4f}"),
        ]
        lines.extend(self.dropped)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def ols(stats_: Any) -> OLSResult:
    """Coordinator side: the pooled OLS from sites' :class:`LinearStats` (objects or payloads).

    ``stats_`` is a list, or a mapping site -> share. Withheld shares (failed,
    placeholders from :func:`~phds_tre.federate.load_shares`, ``None``) are
    dropped and reported in ``result.dropped`` and ``summary()``; shares built
    with different designs are an error.
    """
    collected = collect(stats_, KIND)
    design: Design | None = None
    columns: list[str] = []
    factors = []
    nobs = 0
    for site, payload in collected.used:
        block = payload["federate"]
        try:
            this = Design.from_json(block["design"])
            cols = [str(c) for c in block["columns"]]
            n = int(block["n"])
            r = np.asarray(block["r"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ShareError(f"{site}: malformed linear_stats share ({exc})") from None
        if design is None:
            design, columns = this, cols
        elif this != design or cols != columns:
            raise ShareError(
                f"{site}: its share was built with another design or columns "
                f"({this.formula!r}, {cols}) than the first site's "
                f"({design.formula!r}, {columns}); send every site the same Design"
            )
        if r.shape != (len(cols) + 1, len(cols) + 1):
            raise ShareError(
                f"{site}: the factor r has shape {r.shape}, not square over the columns"
            )
        factors.append(r)
        nobs += n
    assert design is not None  # collect() guarantees at least one share
    pooled = r_factor(np.vstack(factors))
    return OLSResult(design, columns, pooled, nobs, collected)
