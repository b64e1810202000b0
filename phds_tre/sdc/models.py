"""Checked regression models: ``sdc.ols``, ``sdc.logit`` and ``sdc.glm``.

Each call fits the model with statsmodels' formula API and returns a
:class:`ModelOutput` whose releasable ``.table`` has one row per parameter
(coef, std_err, statistic, p_value, ci_lower, ci_upper). The rules
(DESIGN.md, "degrees of freedom" and "minimum cell count"):

========== ======================================================== ====================
rule       fails when                                               boundary
========== ======================================================== ====================
dof        residual degrees of freedom ``< min_dof``                 equality passes
threshold  fewer than ``min_count`` observations                     equality passes
threshold  a categorical design column (dummy, or a slope that only   equality passes
           rows of one level inform) has ``0 < rows < min_count``
threshold  a cell of a categorical term (its levels, including the    equality passes
           reference level; the level combinations of an interaction)
           has fewer than ``min_count`` rows
threshold  binary outcome (logit, binomial GLM): fewer than           equality passes
           ``min_count`` events or non-events (0 included)
zeros      a categorical design column with no rows at all (an empty   ``zeros_disclosive``
           interaction cell): class disclosure
zeros      binary outcome: a cell in which every child has the same   review, not fail
           outcome (perfect or quasi-perfect separation)
========== ======================================================== ====================

Any failing check fails the whole output and suppresses the whole table: a
model cannot be partly released, because the remaining coefficients and the
covariance tie every parameter to every other. Non-convergence, a
rank-deficient design, a fit that raised, or separation detected from the
fitted probabilities make the output ``review`` with the reason.

The evidence (nobs, rank, degrees of freedom, the full table, the counts
behind every categorical column and cell, the outcome counts) travels in the
payload; :func:`phds_tre.sdc.recheck` validates it for internal consistency
(degrees of freedom against nobs and rank, counts that partition nobs,
statistics and confidence intervals that agree with coef, std_err and the
degrees of freedom) and re-applies the rules with the site's policy.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # statsmodels is imported lazily: `import phds_tre.sdc` must stay fast
    import statsmodels.api as sm

from phds_tre.sdc.jsonio import array_from_json, array_to_json
from phds_tre.sdc.output import CHECK_COLUMNS, EvidenceError, SDCOutput, register_kind
from phds_tre.sdc.policy import Policy, resolve_policy
from phds_tre.sdc.rules import worst

__all__ = [
    "TABLE_COLUMNS",
    "ModelEvidence",
    "ModelOutput",
    "glm",
    "logit",
    "model_output_from_result",
    "ols",
]

PolicyArg = Policy | str | Path | None
# statsmodels has no type stubs, so its Family class is Any to mypy.
FamilyArg: TypeAlias = Literal["binomial", "poisson", "gaussian"] | Any

#: Columns of a model's releasable table, in order (as in statsmodels' summary).
TABLE_COLUMNS = ("coef", "std_err", "statistic", "p_value", "ci_lower", "ci_upper")
METHODS = ("ols", "logit", "glm")
ALPHA = 0.05


def _families() -> dict[str, type[sm.families.Family]]:
    """The named families; statsmodels loads only when a model is fitted (it takes ~1.5 s)."""
    import statsmodels.api as sm

    return {
        "binomial": sm.families.Binomial,
        "poisson": sm.families.Poisson,
        "gaussian": sm.families.Gaussian,
    }


# Tolerances of the consistency checks: loose enough for float round-off in
# statsmodels and JSON, far tighter than any forged value would need to be.
_RTOL = 1e-6
_ATOL = 1e-8
# A fitted probability this close to 0 or 1 means the linear predictor ran off
# to |eta| > 23: (quasi-)separation, whatever statsmodels warned or not.
_SEPARATION_EPS = 1e-10


# ---------------------------------------------------------------------------
# evidence
# ---------------------------------------------------------------------------
@dataclass
class Cell:
    """One cell of a categorical term: rows sharing a pattern of its design columns."""

    label: str
    nonzero: list[str]  # design columns that are non-zero in this cell
    n: int
    events: int | None = None  # binary outcome only


@dataclass
class TermCells:
    """The cells of one categorical term (levels; level combinations of an interaction)."""

    term: str
    columns: list[str]  # the design columns whose patterns define the cells
    cells: list[Cell]


@dataclass
class ModelEvidence:
    """Everything the rules need to check a model and rebuild its releasable table.

    ``support`` maps each categorical design column to the number of rows in
    which it is non-zero (for a dummy: the rows in that level). ``outcome`` is
    ``{"events": e, "non_events": m}`` for a 0/1 outcome of a binary model.
    ``fit`` records what the kernel saw while fitting (converged, separation
    warnings, an error's type name): hints only, since the kernel is untrusted.
    """

    method: str
    family: str
    link: str
    formula: str
    nobs: int
    rank: int
    k_constant: int
    df_resid: float
    df_model: float
    use_t: bool
    params: list[str]
    values: np.ndarray  # (n_params, 6) raw table, NaN where undefined
    binary_model: bool
    outcome: dict[str, int] | None
    support: dict[str, int]
    terms: list[TermCells]
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def call(self) -> str:
        """The safe-API function that made this output."""
        return self.method

    # ---- JSON -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Evidence as strict JSON (NaN → null)."""
        return {
            "method": self.method,
            "family": self.family,
            "link": self.link,
            "formula": self.formula,
            "nobs": self.nobs,
            "rank": self.rank,
            "k_constant": self.k_constant,
            "df_resid": self.df_resid,
            "df_model": self.df_model,
            "use_t": self.use_t,
            "alpha": ALPHA,
            "params": list(self.params),
            "columns": list(TABLE_COLUMNS),
            "values": array_to_json(self.values),
            "binary_model": self.binary_model,
            "outcome": None if self.outcome is None else dict(self.outcome),
            "support": [{"column": c, "n": n} for c, n in self.support.items()],
            "terms": [
                {
                    "term": t.term,
                    "columns": list(t.columns),
                    "cells": [
                        {"label": c.label, "nonzero": list(c.nonzero), "n": c.n, "events": c.events}
                        for c in t.cells
                    ],
                }
                for t in self.terms
            ],
            "fit": dict(self.fit),
        }

    @classmethod
    def from_json(cls, data: Any) -> ModelEvidence:
        """Parse and validate evidence; :class:`EvidenceError` when malformed or inconsistent."""
        if not isinstance(data, dict):
            raise EvidenceError("model evidence is not a JSON object")
        try:
            if data.get("alpha", ALPHA) != ALPHA:
                raise EvidenceError(f"confidence level must be {1 - ALPHA:.0%}")
            if list(data["columns"]) != list(TABLE_COLUMNS):
                raise EvidenceError(f"table columns must be {list(TABLE_COLUMNS)}")
            outcome = data["outcome"]
            if outcome is not None:
                outcome = {
                    "events": _int(outcome["events"], "events"),
                    "non_events": _int(outcome["non_events"], "non_events"),
                }
            support: dict[str, int] = {}
            for item in data["support"]:
                col = _str(item["column"], "support column")
                if col in support:
                    raise EvidenceError(f"support of {col!r} is given twice")
                support[col] = _int(item["n"], f"support of {col!r}")
            terms = [
                TermCells(
                    term=_str(t["term"], "term"),
                    columns=[_str(c, "term column") for c in t["columns"]],
                    cells=[
                        Cell(
                            label=_str(c["label"], "cell label"),
                            nonzero=[_str(x, "cell column") for x in c["nonzero"]],
                            n=_int(c["n"], "cell rows"),
                            events=None
                            if c.get("events") is None
                            else _int(c["events"], "cell events"),
                        )
                        for c in t["cells"]
                    ],
                )
                for t in data["terms"]
            ]
            fit = _fit_notes(data.get("fit", {}))
            ev = cls(
                method=_str(data["method"], "method"),
                family=_str(data["family"], "family"),
                link=_str(data["link"], "link"),
                formula=_str(data["formula"], "formula"),
                nobs=_int(data["nobs"], "nobs"),
                rank=_int(data["rank"], "rank"),
                k_constant=_int(data["k_constant"], "k_constant"),
                df_resid=_num(data["df_resid"], "df_resid"),
                df_model=_num(data["df_model"], "df_model"),
                use_t=_bool(data["use_t"], "use_t"),
                params=[_str(p, "parameter name") for p in data["params"]],
                values=array_from_json(data["values"]),
                binary_model=_bool(data["binary_model"], "binary_model"),
                outcome=outcome,
                support=support,
                terms=terms,
                fit=fit,
            )
        except (KeyError, TypeError) as exc:
            raise EvidenceError(
                f"model evidence is incomplete: missing or malformed {exc}"
            ) from None
        ev.validate()
        return ev

    def validate(self) -> None:
        """Internal consistency of the evidence: catches forged or edited statistics.

        The kernel is untrusted, so this cannot prove the numbers came from the
        data; it proves they are arithmetically possible together: degrees of
        freedom that follow from nobs and the rank, counts that partition the
        rows, and a table whose statistics, p-values and intervals follow from
        its coefficients, standard errors and degrees of freedom.
        """
        if self.method not in METHODS:
            raise EvidenceError(f"unknown model method {self.method!r}")
        if self.method == "ols" and self.family != "gaussian":
            raise EvidenceError("an OLS model must have the gaussian family")
        if self.method == "logit" and self.family != "binomial":
            raise EvidenceError("a logit model must have the binomial family")
        if self.binary_model != (self.family == "binomial"):
            raise EvidenceError("binary_model must be true exactly for the binomial family")
        k = len(self.params)
        if len(set(self.params)) != k:
            raise EvidenceError("parameter names are not unique")
        if self.values.shape != (k, len(TABLE_COLUMNS)):
            raise EvidenceError(
                f"table has shape {self.values.shape}, expected {(k, len(TABLE_COLUMNS))}"
            )
        if self.k_constant not in (0, 1):
            raise EvidenceError("k_constant must be 0 or 1")
        if not 0 <= self.rank <= min(k, self.nobs):
            raise EvidenceError(
                "the rank of the design exceeds the number of parameters or of rows"
            )
        # The heart of the dof rule: residual df cannot be claimed, it follows from nobs and rank.
        if self.df_resid != self.nobs - self.rank:
            raise EvidenceError(
                "df_resid is not nobs minus the rank of the design (nobs − parameters)"
            )
        expected_df_model = self.rank - (self.k_constant if self.method == "ols" else 1)
        if self.df_model != expected_df_model:
            raise EvidenceError("df_model does not agree with the rank of the design")
        if self.outcome is not None:
            if not self.binary_model:
                raise EvidenceError("outcome counts are given for a model without a binary outcome")
            if self.outcome["events"] + self.outcome["non_events"] != self.nobs:
                raise EvidenceError("events and non-events do not add up to nobs")
        for col, n in self.support.items():
            if col not in self.params:
                raise EvidenceError(f"support is given for {col!r}, which is not a parameter")
            if n > self.nobs:
                raise EvidenceError(f"support of {col!r} exceeds nobs")
        for p in self.params:
            # Both formula engines name categorical design columns "term[level]": such a
            # column must come with its count, or a kernel could hide a small level.
            if "[" in p and p not in self.support:
                raise EvidenceError(f"categorical column {p!r} has no row count")
        in_cells = {c for t in self.terms for c in t.columns}
        for p in self.support:
            # A main-effect level column ("C(g)[T.b]", no ":") always belongs to the cells
            # of its term; without them the reference level would go unchecked.
            if "[" in p and ":" not in p and p not in in_cells:
                raise EvidenceError(f"categorical column {p!r} belongs to no term's cells")
        seen_terms: set[str] = set()
        for t in self.terms:
            if t.term in seen_terms:
                raise EvidenceError(f"term {t.term!r} is given twice")
            seen_terms.add(t.term)
            _validate_term(t, self)
        self._validate_table()

    def _validate_table(self) -> None:
        v = self.values
        coef, se, stat, p, lo, hi = (v[:, i] for i in range(len(TABLE_COLUMNS)))
        if np.any(se < 0):
            raise EvidenceError("a standard error is negative")
        if np.any((p < 0) | (p > 1)):
            raise EvidenceError("a p-value lies outside [0, 1]")
        defined = np.isfinite(coef) & np.isfinite(se) & (se > 0)
        # Without a standard error nothing downstream of it can be defined.
        undefined_se = ~np.isfinite(se)
        if np.any(undefined_se[:, None] & np.isfinite(np.column_stack([stat, p, lo, hi]))):
            raise EvidenceError("statistics are given for a parameter without a standard error")
        if not defined.any():
            return
        from scipy import stats as _st

        c, s = coef[defined], se[defined]
        if self.use_t:
            if self.df_resid <= 0:
                raise EvidenceError("t statistics need positive residual degrees of freedom")
            q = float(_st.t.ppf(1 - ALPHA / 2, self.df_resid))
        else:
            q = float(_st.norm.ppf(1 - ALPHA / 2))
        z = c / s
        if not _close(stat[defined], z):
            raise EvidenceError("a statistic is not coef / std_err")
        if not (
            _close(lo[defined], c - q * s, scale=np.abs(c) + q * s)
            and _close(hi[defined], c + q * s, scale=np.abs(c) + q * s)
        ):
            raise EvidenceError(
                "a confidence interval does not follow from coef, std_err and the residual df"
            )
        expected_p = 2 * (
            _st.t.sf(np.abs(z), self.df_resid) if self.use_t else _st.norm.sf(np.abs(z))
        )
        if not _close(p[defined], expected_p, scale=np.ones_like(expected_p)):
            raise EvidenceError(
                "a p-value does not follow from the statistic and the degrees of freedom"
            )


def _validate_term(t: TermCells, ev: ModelEvidence) -> None:
    name = f"term {t.term!r}"
    for col in t.columns:
        if col not in ev.support:
            raise EvidenceError(f"{name}: column {col!r} has no row count")
    if sum(c.n for c in t.cells) != ev.nobs:
        raise EvidenceError(
            f"{name}: its cells do not partition the rows (sum of counts is not nobs)"
        )
    if len({c.label for c in t.cells}) != len(t.cells):
        raise EvidenceError(f"{name}: cell labels are not unique")
    for c in t.cells:
        if not set(c.nonzero) <= set(t.columns):
            raise EvidenceError(f"{name}: a cell names a column outside the term")
        if ev.outcome is not None:
            if c.events is None:
                raise EvidenceError(
                    f"{name}: a cell of a model with a 0/1 outcome has no event count"
                )
            if c.events > c.n:
                raise EvidenceError(f"{name}: a cell has more events than rows")
        elif c.events is not None:
            raise EvidenceError(f"{name}: event counts given for a model without a 0/1 outcome")
    for col in t.columns:
        rows = sum(c.n for c in t.cells if col in c.nonzero)
        if rows != ev.support[col]:
            raise EvidenceError(f"{name}: the cells do not add up to the row count of {col!r}")
    if ev.outcome is not None and sum(c.events or 0 for c in t.cells) != ev.outcome["events"]:
        raise EvidenceError(f"{name}: events in the cells do not add up to the outcome's events")


def _close(a: np.ndarray, b: np.ndarray, scale: np.ndarray | None = None) -> bool:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not np.all(np.isfinite(a) == np.isfinite(b)):
        return False
    fin = np.isfinite(b)
    sc = np.abs(b) if scale is None else np.asarray(scale, dtype=np.float64)
    return bool(np.all(np.abs(a[fin] - b[fin]) <= _RTOL * sc[fin] + _ATOL))


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,79}")


def _fit_notes(fit: Any) -> dict[str, Any]:
    """The kernel's fit notes, reduced to what the rules read.

    An error's *type name* reaches the public reasons, so it must look like a
    Python name: free text there could carry anything past the checker.
    """
    if not isinstance(fit, dict):
        raise EvidenceError("fit notes must be a JSON object")
    out: dict[str, Any] = {}
    error = fit.get("error")
    if error is not None:
        if not isinstance(error, str) or not _IDENTIFIER.fullmatch(error):
            raise EvidenceError("fit error must be the name of an exception type")
        out["error"] = error
    for key in ("converged", "separation"):
        if key in fit:
            out[key] = _bool(fit[key], f"fit {key}")
    warns = fit.get("warnings", [])
    if not isinstance(warns, list) or not all(
        isinstance(w, str) and _IDENTIFIER.fullmatch(w) for w in warns
    ):
        raise EvidenceError("fit warnings must be names of warning types")
    if warns:
        out["warnings"] = list(warns)
    return out


def _int(x: Any, what: str) -> int:
    if (
        isinstance(x, bool)
        or not isinstance(x, (int, float))
        or not math.isfinite(x)
        or x != int(x)
        or x < 0
    ):
        raise EvidenceError(f"{what} must be a non-negative integer")
    return int(x)


def _num(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise EvidenceError(f"{what} must be a finite number")
    return float(x)


def _str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise EvidenceError(f"{what} must be a string")
    return x


def _bool(x: Any, what: str) -> bool:
    if not isinstance(x, bool):
        raise EvidenceError(f"{what} must be true or false")
    return x


# ---------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------
@dataclass
class ModelEvaluation:
    """A policy applied to model evidence."""

    checks: pd.DataFrame
    status: str
    reasons: list[str]


def evaluate(ev: ModelEvidence, policy: Policy) -> ModelEvaluation:
    """Apply ``policy`` to model evidence: every rule, then the verdict of the whole model."""
    m = policy.min_count
    rows: list[tuple[str, str, str, str, str]] = []

    def add(row: str, column: str, rule: str, status: str, detail: str) -> None:
        rows.append((row, column, rule, status, detail))

    dof_ok = ev.df_resid >= policy.min_dof
    add(
        "model",
        "df_resid",
        "dof",
        "pass" if dof_ok else "fail",
        f"at least {policy.min_dof} residual degrees of freedom"
        if dof_ok
        else f"fewer than {policy.min_dof} residual degrees of freedom (degrees of freedom rule)",
    )
    nobs_ok = ev.nobs >= m
    add(
        "model",
        "nobs",
        "threshold",
        "pass" if nobs_ok else "fail",
        f"at least {m} observations" if nobs_ok else f"fewer than {m} observations (minimum count)",
    )
    if ev.outcome is not None:
        for key, word in (("events", "events"), ("non_events", "non-events")):
            ok = ev.outcome[key] >= m
            add(
                "outcome",
                word,
                "threshold",
                "pass" if ok else "fail",
                f"at least {m} {word}" if ok else f"fewer than {m} {word} (minimum count)",
            )
    for col, n in ev.support.items():
        if n == 0:
            add(
                col,
                "rows",
                "zeros",
                "fail" if policy.zeros_disclosive else "pass",
                "no child in this category: a zero discloses that nobody has this combination "
                "(class disclosure)"
                if policy.zeros_disclosive
                else "empty category: zeros are not disclosive under this policy",
            )
        else:
            ok = n >= m
            add(
                col,
                "rows",
                "threshold",
                "pass" if ok else "fail",
                f"at least {m} rows inform this parameter"
                if ok
                else f"fewer than {m} rows inform this parameter (minimum count)",
            )
    for t in ev.terms:
        for c in t.cells:
            # A level with its own dummy column was checked above with the same count.
            covered = (
                len(c.nonzero) == 1
                and ev.support.get(c.nonzero[0]) == c.n
                and c.label == c.nonzero[0]
            )
            if not covered and c.n > 0:
                ok = c.n >= m
                add(
                    c.label,
                    "rows",
                    "threshold",
                    "pass" if ok else "fail",
                    f"at least {m} rows in this group"
                    if ok
                    else f"fewer than {m} rows in this group (minimum count)",
                )
            if ev.binary_model and c.events is not None and c.n > 0:
                separated = c.events in (0, c.n)
                add(
                    c.label,
                    "outcome",
                    "zeros",
                    "review" if separated else "pass",
                    "every child in this group has the same outcome: perfect separation, "
                    "and the coefficient discloses it (class disclosure)"
                    if separated
                    else "both outcomes occur in this group",
                )
    reasons: list[str] = []
    fit = ev.fit
    if fit.get("separation"):
        add(
            "model",
            "outcome",
            "zeros",
            "review",
            "fitted probabilities of 0 or 1: perfect or quasi-perfect separation "
            "(class disclosure)",
        )
    checks = (
        pd.DataFrame(rows, columns=CHECK_COLUMNS)
        if rows
        else pd.DataFrame({c: pd.Series(dtype=object) for c in CHECK_COLUMNS})
    )
    statuses = list(checks["status"])
    status = worst(statuses)
    failing = checks[checks["status"] == "fail"]
    for rule, count in failing.groupby("rule", sort=True).size().items():
        reasons.append(f"{count} check(s) failed the {rule} rule")
    if status == "fail":
        reasons.append("the whole table is suppressed: a model cannot be partly released")
    reviewing = checks[checks["status"] == "review"]
    if len(reviewing):
        reasons.append(
            f"{len(reviewing)} check(s) need review (perfect or quasi-perfect separation)"
        )
    # Fit problems make the estimates unreliable and, near separation, disclosive;
    # they are not rules with a threshold, so they are reasons for review, not checks.
    notes: list[str] = []
    if fit.get("error"):
        notes.append(f"the model could not be fitted ({fit['error']}); nothing is estimated")
    elif not np.all(np.isfinite(ev.values[:, 0])):
        notes.append("some estimates are not finite (infinite or undefined values in the data?)")
    if fit.get("converged") is False:
        notes.append(
            "the fit did not converge: the estimates may be meaningless (often separation)"
        )
    if ev.rank < len(ev.params):
        notes.append("the design matrix is rank-deficient: some parameters are not identified")
    if ev.binary_model and ev.outcome is None:
        notes.append("the outcome is not coded 0/1, so events and non-events could not be counted")
    if notes:
        reasons.extend(notes)
        status = worst([status, "review"])
    if not reasons:
        reasons.append("every check passed every rule")
    return ModelEvaluation(checks, status, reasons)


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
class ModelOutput(SDCOutput["ModelEvaluation"]):
    """A checked regression model (OLS, logit, GLM).

    ``.table`` is what may be released: one row per parameter, NaN throughout
    when the model fails a rule or could not be fitted. ``.result`` is the
    statsmodels results object for local exploration only: it is NOT checked,
    never displayed as the output, and never part of what leaves the site —
    anything printed from it is judged as free text (review at best).
    """

    kind = "model"

    def __init__(self, evidence: ModelEvidence, policy: Policy, result: Any = None) -> None:
        super().__init__(policy, evidence.call)
        self._evidence = evidence
        self._result = result
        self._eval = evaluate(evidence, policy)
        values = evidence.values.copy()
        if self._eval.status == "fail":
            values[:] = np.nan
        self._table = pd.DataFrame(
            values, index=pd.Index(evidence.params), columns=pd.Index(TABLE_COLUMNS)
        )

    @property
    def table(self) -> pd.DataFrame:
        """The releasable parameter table (fully suppressed when the model fails)."""
        return self._table

    @property
    def result(self) -> Any:
        """The statsmodels results, for local use only (unchecked; ``None`` after a recheck)."""
        return self._result

    @property
    def nobs(self) -> int:
        """Number of rows used in the fit (local information; not part of the released table)."""
        return self._evidence.nobs

    @property
    def df_resid(self) -> float:
        """Residual degrees of freedom (local information; checked by the dof rule)."""
        return self._evidence.df_resid

    def evidence(self) -> dict[str, Any]:
        """The private statistics behind the rules (never released)."""
        return self._evidence.to_json()


def _from_payload(payload: dict[str, Any], policy: Policy) -> SDCOutput[Any]:
    evidence = payload.get("evidence")
    if not isinstance(evidence, dict):
        raise EvidenceError("the structured output carries no evidence to re-check")
    return ModelOutput(ModelEvidence.from_json(evidence), policy)


register_kind(ModelOutput.kind, _from_payload)


# ---------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------
def ols(formula: str, data: pd.DataFrame, policy: PolicyArg = None) -> ModelOutput:
    """A checked ordinary least squares fit of ``formula`` on ``data`` (statsmodels ``ols``).

    Rows with a missing value in any variable of the formula are dropped, as
    statsmodels does. Returns a :class:`ModelOutput`; see the module docstring
    for the rules.
    """
    import statsmodels.api as sm

    return _fit("ols", formula, data, sm.families.Gaussian(), policy)


def logit(formula: str, data: pd.DataFrame, policy: PolicyArg = None) -> ModelOutput:
    """A checked logistic regression of a 0/1 outcome (statsmodels ``logit``).

    Besides the degrees-of-freedom and category rules, the numbers of events
    and of non-events must each reach the policy's minimum count.
    """
    import statsmodels.api as sm

    return _fit("logit", formula, data, sm.families.Binomial(), policy)


def glm(
    formula: str,
    data: pd.DataFrame,
    family: FamilyArg = "binomial",
    policy: PolicyArg = None,
) -> ModelOutput:
    """A checked generalised linear model (statsmodels ``glm``).

    ``family`` is ``"binomial"``, ``"poisson"``, ``"gaussian"`` (default links)
    or a statsmodels family instance. Binomial models with a 0/1 outcome get
    the event and non-event counts checked like :func:`logit`.
    """
    import statsmodels.api as sm

    if isinstance(family, str):
        if family not in _families():
            raise ValueError(
                f"unknown family {family!r}: use one of {sorted(_families())} or a statsmodels family"
            )
        fam = _families()[family]()
    elif isinstance(family, sm.families.Family):
        fam = family
    else:
        raise TypeError(
            f"family must be a name or a statsmodels family, not {type(family).__name__}"
        )
    return _fit("glm", formula, data, fam, policy)


def _family_name(fam: sm.families.Family) -> str:
    for name, cls in _families().items():
        if type(fam) is cls:
            return name
    return type(fam).__name__.lower()


def _fit(
    method: str, formula: str, data: pd.DataFrame, fam: sm.families.Family, policy: PolicyArg
) -> ModelOutput:
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    if not isinstance(formula, str):
        raise TypeError("formula must be a string such as 'y ~ age + C(sex)'")
    import statsmodels.formula.api as smf

    pol = resolve_policy(policy)
    # Building the design is the researcher's code: a bad formula or column raises here,
    # before any data-dependent result exists.
    if method == "ols":
        model = smf.ols(formula, data)
    elif method == "logit":
        model = smf.logit(formula, data)
    else:
        model = smf.glm(formula, data, family=fam)
    fit: dict[str, Any] = {}
    result: Any = None
    names = [str(n) for n in model.exog_names]
    values = np.full((len(names), len(TABLE_COLUMNS)), np.nan)
    # Statsmodels' warnings (overflow, convergence, separation) are folded into the
    # verdict's reasons instead of being printed, where they would be unchecked text;
    # the results' statistics are computed lazily, so they are read inside the block.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = model.fit(disp=0) if method == "logit" else model.fit()
            values = _result_table(result)
        except Exception as exc:
            fit["error"] = type(exc).__name__
            result = None
    categories = sorted({w.category.__name__ for w in caught})
    use_t = bool(result.use_t) if result is not None else method == "ols"
    evidence = _model_evidence(
        method, fam, model, result, formula, names, values, fit, categories, use_t
    )
    return ModelOutput(evidence, pol, result)


def model_output_from_result(result: Any, policy: PolicyArg = None) -> ModelOutput:
    """A :class:`ModelOutput` for a statsmodels fit the researcher made directly.

    Used by the site kernel's capture (:mod:`phds_tre.kernel`) when a results
    object or its ``summary()`` is displayed. Only the model classes whose
    evidence can be rebuilt exactly are accepted: ``OLS``, ``Logit`` and
    ``GLM`` (formula or array API); anything else raises :class:`TypeError`
    (the capture then shows the parameter table as a raw ``"frame"``, review
    at best). Warnings raised while fitting are not known here, so the fit
    notes hold only convergence and separation as read from the results.
    Raises :class:`~phds_tre.sdc.output.EvidenceError` when the results do not
    agree with the evidence rebuilt from the model's design.
    """
    import statsmodels.api as sm
    from statsmodels.discrete.discrete_model import Logit
    from statsmodels.genmod.generalized_linear_model import GLM
    from statsmodels.regression.linear_model import OLS

    res = getattr(result, "_results", result)
    model: Any = getattr(res, "model", None)
    if type(model) is OLS:
        method, fam = "ols", sm.families.Gaussian()
    elif type(model) is Logit:
        method, fam = "logit", sm.families.Binomial()
    elif type(model) is GLM:
        method, fam = "glm", model.family
        neutral = (("freq_weights", 1), ("var_weights", 1), ("offset", 0), ("exposure", 0))
        for attr, value in neutral:
            given = getattr(model, attr, None)
            if given is not None and np.any(np.asarray(given) != value):
                raise TypeError(f"a GLM with {attr} cannot be checked exactly")
    else:
        raise TypeError(f"a {type(model).__name__} fit cannot be checked exactly")
    pol = resolve_policy(policy)
    names = [str(n) for n in model.exog_names]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = _result_table(res)
    categories = sorted({w.category.__name__ for w in caught})
    formula = str(getattr(model, "formula", None) or "")
    evidence = _model_evidence(
        method, fam, model, res, formula, names, values, {}, categories, bool(res.use_t)
    )
    return ModelOutput(evidence, pol, result)


def _model_evidence(
    method: str,
    fam: Any,
    model: Any,
    result: Any,
    formula: str,
    names: list[str],
    values: np.ndarray,
    fit: dict[str, Any],
    categories: list[str],
    use_t: bool,
) -> ModelEvidence:
    """The evidence of one fit (``result`` None when fitting raised), validated.

    ``categories`` are the warning classes raised while fitting; they and the
    convergence and separation notes go into ``fit``.
    """
    if categories:
        fit["warnings"] = categories
    exog = np.asarray(model.exog, dtype=np.float64)
    endog = np.asarray(model.endog, dtype=np.float64)
    nobs = int(exog.shape[0])
    rank = int(np.linalg.matrix_rank(exog)) if exog.size else 0
    binary_model = _family_name(fam) == "binomial"
    outcome: dict[str, int] | None = None
    if binary_model and endog.ndim == 1 and bool(np.all((endog == 0) | (endog == 1))):
        events = int(endog.sum())
        outcome = {"events": events, "non_events": nobs - events}
    if result is not None:
        fit["converged"] = _converged(method, result, categories)
        if binary_model and _separated(result, categories):
            fit["separation"] = True
    support, terms = _categorical_counts(model, exog, names, endog if outcome is not None else None)
    k_constant = int(model.k_constant)
    evidence = ModelEvidence(
        method=method,
        family=_family_name(fam),
        link=type(fam.link).__name__.lower(),
        formula=formula,
        nobs=nobs,
        rank=rank,
        k_constant=k_constant,
        df_resid=float(nobs - rank),
        df_model=float(rank - (k_constant if method == "ols" else 1)),
        use_t=use_t,
        params=names,
        values=values,
        binary_model=binary_model,
        outcome=outcome,
        support=support,
        terms=terms,
        fit=fit,
    )
    # The kernel validates its own evidence too, so a numerical disagreement shows
    # up for the researcher, not only as a failed recheck at the site.
    evidence.validate()
    return evidence


def _result_table(result: Any) -> np.ndarray:
    """coef, std_err, statistic, p_value, ci_lower, ci_upper as statsmodels' summary shows them."""
    ci = np.asarray(result.conf_int(alpha=ALPHA), dtype=np.float64)
    return np.column_stack(
        [
            np.asarray(result.params, dtype=np.float64),
            np.asarray(result.bse, dtype=np.float64),
            np.asarray(result.tvalues, dtype=np.float64),
            np.asarray(result.pvalues, dtype=np.float64),
            ci[:, 0],
            ci[:, 1],
        ]
    )


def _converged(method: str, result: Any, categories: Sequence[str]) -> bool:
    if "ConvergenceWarning" in categories:
        return False
    if method == "logit":
        return bool(getattr(result, "mle_retvals", {}).get("converged", True))
    if method == "glm":
        return bool(getattr(result, "converged", True))
    return True


def _separated(result: Any, categories: Sequence[str]) -> bool:
    if "PerfectSeparationWarning" in categories:
        return True
    try:
        # Overflow in exp() is exactly what separation looks like; it is not news to print.
        with np.errstate(over="ignore", under="ignore"):
            mu = np.asarray(result.predict(), dtype=np.float64)
    except Exception:
        return False
    return bool(np.any(np.minimum(mu, 1 - mu) < _SEPARATION_EPS))


# ---------------------------------------------------------------------------
# categorical structure of the design
# ---------------------------------------------------------------------------
@dataclass
class _Term:
    name: str
    cols: list[int]
    factors: tuple[str, ...]
    categorical: bool  # every factor categorical, or every column a 0/1 indicator
    any_categorical: bool


def _is_binary(col: np.ndarray) -> bool:
    return bool(np.all((col == 0) | (col == 1)))


def _design_terms(model: Any, exog: np.ndarray, names: list[str]) -> list[_Term]:
    """The formula's terms with their design columns, for either formula engine."""
    spec = getattr(model.data, "model_spec", None)
    raw: list[tuple[str, list[int], tuple[str, ...], list[bool]]] = []
    if spec is not None and hasattr(spec, "term_name_slices") and hasattr(spec, "factor_infos"):
        # patsy DesignInfo
        for term, (tname, sl) in zip(spec.terms, spec.term_name_slices.items(), strict=True):
            factors = tuple(f.name() for f in term.factors)
            cats = [spec.factor_infos[f].type == "categorical" for f in term.factors]
            raw.append((str(tname), list(range(sl.start, sl.stop)), factors, cats))
    elif spec is not None and hasattr(spec, "term_slices") and hasattr(spec, "factor_contrasts"):
        # formulaic ModelSpec: categorical factors are the ones with contrasts
        cat_names = {str(k) for k in spec.factor_contrasts}
        for term, sl in spec.term_slices.items():
            factors = tuple(str(f) for f in term.factors)
            if factors == ("1",):
                factors = ()
            raw.append(
                (
                    str(term),
                    list(range(sl.start, sl.stop)),
                    factors,
                    [f in cat_names for f in factors],
                )
            )
    else:
        # Unknown engine: one term per column; a column named like a level counts as categorical.
        for j, name in enumerate(names):
            factors = () if name in ("Intercept", "const") else (name,)
            raw.append((name, [j], factors, ["[" in name]))
    terms = []
    for tname, cols, factors, cats in raw:
        if not factors:  # the intercept
            continue
        binary = all(_is_binary(exog[:, j]) for j in cols)
        categorical = all(cats) or binary
        terms.append(_Term(tname, cols, factors, categorical, categorical or any(cats)))
    return terms


def _categorical_counts(
    model: Any, exog: np.ndarray, names: list[str], endog: np.ndarray | None
) -> tuple[dict[str, int], list[TermCells]]:
    """Rows behind each categorical design column, and the cells of each categorical term.

    A dummy's count is the rows in its level; a slope that only one level's rows
    inform (``C(g):x``) counts those rows. The cells of a categorical term are
    the distinct patterns of its own columns and of every categorical term
    nested in it, i.e. its levels (with the reference level) or, for an
    interaction, the combinations of levels.
    """
    terms = _design_terms(model, exog, names)
    support: dict[str, int] = {}
    for t in terms:
        if t.any_categorical:
            for j in t.cols:
                support[names[j]] = int(np.count_nonzero(exog[:, j]))
    out: list[TermCells] = []
    for t in terms:
        if not t.categorical:
            continue
        nested = [u for u in terms if u.categorical and set(u.factors) <= set(t.factors)]
        cols = [j for u in nested for j in u.cols]
        main = {u.factors[0]: u for u in nested if len(u.factors) == 1}
        block = exog[:, cols]
        if block.shape[0] == 0:
            out.append(TermCells(t.name, [names[j] for j in cols], []))
            continue
        patterns, inverse, counts = np.unique(
            block, axis=0, return_inverse=True, return_counts=True
        )
        inverse = np.asarray(inverse).reshape(-1)
        cells = []
        labels = [_cell_label(t, p, cols, names, main) for p in patterns]
        if len(set(labels)) != len(labels):  # unusual codings: name cells by every column
            labels = [_full_label(t, p, cols, names) for p in patterns]
        for i, pattern in enumerate(patterns):
            nonzero = [names[cols[k]] for k in np.flatnonzero(pattern)]
            events = None if endog is None else int(endog[inverse == i].sum())
            cells.append(Cell(labels[i], nonzero, int(counts[i]), events))
        out.append(TermCells(t.name, [names[j] for j in cols], cells))
    return support, out


def _cell_label(
    t: _Term, pattern: np.ndarray, cols: list[int], names: list[str], main: dict[str, _Term]
) -> str:
    value = dict(zip(cols, pattern, strict=True))

    def describe(columns: list[int]) -> list[str]:
        # Treatment dummies read as their names; other codings (Sum, Helmert) need the value.
        return [
            names[j] if value[j] == 1 else f"{names[j]}={float(value[j]):g}"
            for j in columns
            if value[j] != 0
        ]

    parts = []
    for f in t.factors:
        u = main.get(f)
        if u is None:  # no main effect in the model: name the cell by all its columns
            return _full_label(t, pattern, cols, names)
        nz = describe(u.cols)
        parts.append(", ".join(nz) if nz else f"{u.name} reference level")
    return " & ".join(parts)


def _full_label(t: _Term, pattern: np.ndarray, cols: list[int], names: list[str]) -> str:
    nz = [
        names[j] if v == 1 else f"{names[j]}={float(v):g}"
        for j, v in zip(cols, pattern, strict=True)
        if v != 0
    ]
    return " & ".join(nz) if nz else f"{t.name} reference cell"
