"""Exact federated GLM: statsmodels' IRLS, one round of site shares per iteration.

::

    m = federate.GLM("died ~ lactate + age + C(sex)", family="binomial", levels={"sex": ["F", "M"]})
    while not m.converged:
        shares = [federate.glm_round(df_i, m) for df_i in site_frames]   # at each site
        m.update(shares)
    m.result

Every step reproduces ``statsmodels GLM.fit()`` (IRLS) on the pooled rows:

* the start is ``family.starting_mu(y)``, not β = 0. For the binomial family
  that needs only each row; for poisson and gaussian it needs the pooled mean
  of y, so those families begin with one extra "mean" round (n and the sum of
  y) that is not an IRLS iteration;
* each round a site shares, at the current mean μ, the triangular factor of
  ``[√W X | √W z]`` (W the IRLS weights, z the working response; the factor's
  ``RᵀR`` holds the information ``XᵀWX`` and ``XᵀWz``), the deviance and the
  Pearson chi² (for the gaussian scale). The coordinator stacks the factors,
  solves the weighted least squares for the next β and appends the deviance
  (divided by the scale statsmodels holds at that moment) to the history;
* it stops where statsmodels stops: the first iteration whose deviance is
  within ``tol`` of the previous one (``np.allclose(atol=tol, rtol=0)``), or
  after ``max_iter`` iterations. Convergence is only known once the sites
  have computed the deviance at the newest β, so a fit of k iterations takes
  k + 1 rounds (k + 2 with the mean round); ``m.iterations`` counts IRLS
  iterations exactly as ``res.fit_history["iteration"]``;
* the covariance is the inverse of the information of the last WLS, scaled by
  1 (binomial, poisson) or Pearson chi² / df_resid (gaussian), as statsmodels.

Every round's share is checked like :class:`~phds_tre.federate.LinearStats`
(rows, residual df, counts behind categorical columns, and for the binomial
family events and non-events, overall and behind every categorical column).
A site that is withheld in the first round is left out of the whole fit; a
site that drops out later makes :meth:`GLM.update` raise, since the remaining
rounds would mix two different pooled data sets.
"""

from __future__ import annotations

import json
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
    coefficient_table,
    collect,
    dropped_lines,
    matrix_from_json,
    matrix_table,
    matrix_to_json,
    r_factor,
)
from phds_tre.sdc.output import EvidenceError, register_kind
from phds_tre.sdc.policy import Policy, canonical_hash, resolve_policy

__all__ = ["GLM", "ConvergenceError", "GLMResult", "GLMRound", "glm_round"]

KIND = "federate.glm_round"
FAMILIES = ("binomial", "poisson", "gaussian")
#: Families whose statsmodels start (``starting_mu``) needs the pooled mean of y.
_NEEDS_MEAN = frozenset({"poisson", "gaussian"})
STATE_SCHEMA = "phds.federate.glm_state/1"


class ConvergenceError(RuntimeError):
    """The federated IRLS reached ``max_iter`` without converging (``m.result`` holds the fit)."""


def _family(name: str) -> Any:
    import statsmodels.api as sm

    families = {
        "binomial": sm.families.Binomial,
        "poisson": sm.families.Poisson,
        "gaussian": sm.families.Gaussian,
    }
    if name not in families:
        raise ValueError(f"unknown family {name!r}: use one of {', '.join(FAMILIES)}")
    return families[name]()


# ---------------------------------------------------------------------------
# the site's share
# ---------------------------------------------------------------------------
class GLMRound(FederatedShare):
    """One site's share of one round of the federated IRLS, checked.

    ``phase`` is ``"mean"`` (n and the sum of y, for the start of poisson and
    gaussian fits) or ``"irls"`` (the factor ``r`` of ``[√W X | √W z]``, the
    deviance and Pearson chi²). ``state_hash`` names the coordinator's state
    the share was computed from.
    """

    kind = KIND

    def __init__(
        self,
        design: Design,
        columns: list[str],
        state_hash: str,
        iteration: int,
        phase: str,
        stats_: dict[str, float],
        r: np.ndarray | None,
        counts: ShareCounts,
        policy: Policy,
    ) -> None:
        super().__init__(policy, "glm_round")
        self.design, self.columns, self.counts = design, columns, counts
        self.state_hash, self.iteration, self.phase = state_hash, iteration, phase
        self.stats = stats_
        self.r = r
        self._evaluate()
        failed = self.status == "fail"
        if r is not None:
            self._table = matrix_table(r, [*columns, "(working response)"], failed)
        else:
            self._table = pd.DataFrame(
                {"value": [np.nan if failed else v for v in stats_.values()]},
                index=pd.Index(list(stats_)),
            )

    def evidence(self) -> dict[str, Any]:
        """Design, state, counts and the statistics (all rebuilt by the site's re-check)."""
        return {
            "design": self.design.to_dict(),
            "columns": list(self.columns),
            "state_hash": self.state_hash,
            "iteration": self.iteration,
            "phase": self.phase,
            "stats": dict(self.stats),
            "r": None if self.r is None else matrix_to_json(self.r),
            "counts": self.counts.to_json(),
        }

    def public(self) -> dict[str, Any]:
        """What the coordinator combines (numbers ``None`` when the share fails)."""
        ok = self.status != "fail"
        return {
            "design": self.design.to_dict(),
            "columns": list(self.columns),
            "state_hash": self.state_hash,
            "iteration": self.iteration,
            "phase": self.phase,
            "n": self.counts.n if ok else None,
            "stats": {k: (v if ok else None) for k, v in self.stats.items()},
            "r": matrix_to_json(self.r) if ok and self.r is not None else None,
        }


_STATS = {"mean": ("sum_y",), "irls": ("deviance", "pearson_chi2")}


def _from_payload(payload: dict[str, Any], policy: Policy) -> GLMRound:
    ev = payload.get("evidence")
    if not isinstance(ev, dict):
        raise EvidenceError("the share carries no evidence to re-check")
    try:
        design = Design.from_json(ev["design"])
        columns = [str(c) for c in ev["columns"]]
        state_hash = str(ev["state_hash"])
        iteration = int(ev["iteration"])
        phase = str(ev["phase"])
        raw = ev["stats"]
    except (KeyError, TypeError, ValueError, DesignError) as exc:
        raise EvidenceError(f"share evidence is incomplete or malformed: {exc}") from None
    if phase not in _STATS or not isinstance(raw, dict) or set(raw) != set(_STATS[phase]):
        raise EvidenceError(f"a {phase!r} round must carry exactly {_STATS.get(phase)}")
    values: dict[str, float] = {}
    for key, value in raw.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise EvidenceError(f"{key} must be a finite number")
        values[key] = float(value)
    counts = ShareCounts.from_json(ev.get("counts"), columns)
    r = None
    if phase == "irls":
        r = matrix_from_json(ev.get("r"), len(columns) + 1, "r")
        counts.rank = int(np.linalg.matrix_rank(r[:-1, :-1])) if columns else 0
    elif ev.get("r") is not None:
        raise EvidenceError("a mean round carries no matrix")
    return GLMRound(design, columns, state_hash, iteration, phase, values, r, counts, policy)


register_kind(KIND, _from_payload)


def glm_round(
    df: pd.DataFrame, model: GLM | str, policy: Policy | str | Path | None = None
) -> GLMRound:
    """Site side: this site's checked share of the round ``model`` (a :class:`GLM` or its state)."""
    state = GLM.from_state(model).state() if isinstance(model, str) else model.state()
    spec = json.loads(state)
    design = Design.from_json(spec["design"])
    fam = _family(spec["family"])
    y, X, columns, _ = design_matrices(df, design)
    binary = spec["family"] == "binomial"
    if binary and not bool(np.all((y == 0) | (y == 1))):
        raise DesignError("a binomial federated GLM needs a 0/1 outcome")
    counts = ShareCounts.of(y, X, columns, binary)
    state_hash = canonical_hash(spec)
    pol = resolve_policy(policy)
    if spec["phase"] == "mean":
        values = {"sum_y": float(y.sum())}
        return GLMRound(
            design, columns, state_hash, spec["iteration"], "mean", values, None, counts, pol
        )
    if spec["params"] is None:
        # statsmodels' start: starting_mu uses y.mean(), here the pooled mean.
        needs_mean = spec["family"] in _NEEDS_MEAN
        mu = (y + spec["mean"]) / 2.0 if needs_mean else fam.starting_mu(y)
        eta = fam.predict(mu)
    else:
        params = np.asarray(spec["params"], dtype=np.float64)
        if params.shape != (X.shape[1],):
            raise DesignError("the state's parameters do not match the design's columns")
        eta = X @ params
        mu = fam.fitted(eta)
    weights = fam.weights(mu)
    z = eta + fam.link.deriv(mu) * (y - mu)
    root_w = np.sqrt(weights)
    r = r_factor(np.column_stack([X * root_w[:, None], z * root_w]))
    values = {
        "deviance": float(fam.deviance(y, mu)),
        "pearson_chi2": float(np.sum((y - mu) ** 2 / fam.variance(mu))),
    }
    return GLMRound(design, columns, state_hash, spec["iteration"], "irls", values, r, counts, pol)


# ---------------------------------------------------------------------------
# coordinator
# ---------------------------------------------------------------------------
class GLMResult:
    """The pooled GLM, as statsmodels' ``GLMResults`` would give it on the pooled rows."""

    def __init__(
        self,
        model: GLM,
        params: np.ndarray,
        cov_unscaled: np.ndarray,
        scale: float,
        deviance: float,
        pearson_chi2: float,
        converged: bool,
    ) -> None:
        index = pd.Index(model.columns)
        self.design, self.family = model.design, model.family
        self.nobs = model.nobs
        self.df_resid = float(model.df_resid)
        self.df_model = float(len(model.columns) - 1)
        self.scale = scale
        self.params = pd.Series(params, index=index)
        self.cov_params_unscaled = pd.DataFrame(cov_unscaled, index=index, columns=index)
        self.bse = pd.Series(np.sqrt(np.diag(cov_unscaled) * scale), index=index)
        self.tvalues = self.params / self.bse
        self.pvalues = pd.Series(2 * stats.norm.sf(np.abs(self.tvalues)), index=index)
        self.deviance = deviance
        self.pearson_chi2 = pearson_chi2
        self.converged = converged
        self.iterations = model.iteration
        self.fit_history = {"deviance": list(model.history), "iteration": model.iteration}
        collected = model.collected
        self.sites_used = [s for s, _ in collected.used] if collected else []
        self.sites_dropped = [(s, r) for s, r, _ in collected.dropped] if collected else []
        self.dropped = dropped_lines(collected, self.nobs) if collected else []

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald confidence intervals (normal), columns 0 and 1, as statsmodels' GLM."""
        q = stats.norm.ppf(1 - alpha / 2)
        return pd.DataFrame({0: self.params - q * self.bse, 1: self.params + q * self.bse})

    def summary(self) -> str:
        """A readable text summary: the table, the fit and who contributed."""
        table = coefficient_table(self, "z")
        lines = [
            f"Federated GLM ({self.family}; exact IRLS: equals GLM on the pooled rows)",
            f"formula: {self.design.formula}",
            f"sites: {', '.join(self.sites_used)}",
            f"nobs: {self.nobs}   df_resid: {self.df_resid:g}   scale: {self.scale:.6g}",
            f"deviance: {self.deviance:.6g}   Pearson chi2: {self.pearson_chi2:.6g}",
            f"iterations: {self.iterations}   converged: {self.converged}",
            table.to_string(float_format=lambda v: f"{v:.4f}"),
        ]
        lines.extend(self.dropped)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


class GLM:
    """Coordinator side of an exact federated GLM (binomial/logit, poisson/log, gaussian/identity).

    Drive it with ``while not m.converged: m.update([glm_round(df_i, m) ...])``;
    across a network, send :meth:`state` to the sites and rebuild with
    :meth:`from_state` there. ``max_iter`` and ``tol`` are statsmodels'
    ``maxiter`` and ``tol`` (deviance criterion).
    """

    def __init__(
        self,
        formula: str | Design,
        family: str = "binomial",
        levels: Mapping[str, list[Any]] | None = None,
        max_iter: int = 100,
        tol: float = 1e-8,
    ) -> None:
        if isinstance(formula, Design):
            if levels is not None:
                raise DesignError("pass levels inside the Design, not beside it")
            self.design = formula
        else:
            self.design = Design(formula, dict(levels or {}))
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError("max_iter must be a positive integer")
        if not tol > 0:
            raise ValueError("tol must be positive")
        self.family, self.max_iter, self.tol = family, max_iter, float(tol)
        self.phase = "mean" if family in _NEEDS_MEAN else "irls"
        self.iteration = 0
        self.params: np.ndarray | None = None
        self.mean: float | None = None
        self.converged = False
        self.result: GLMResult | None = None
        self.history: list[float] = [math.inf]
        self.columns: list[str] = []
        self.nobs = 0
        self.df_resid = 0
        self.collected: Collected | None = None
        self._sites: list[str] | None = None
        self._scale = 1.0
        self._last_r: np.ndarray | None = None

    @property
    def iterations(self) -> int:
        """IRLS iterations so far (statsmodels' ``fit_history['iteration']`` at the end)."""
        return self.iteration

    # ---- state sent to the sites ----------------------------------------
    def _spec(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "design": self.design.to_dict(),
            "family": self.family,
            "phase": self.phase,
            "iteration": self.iteration,
            "params": None if self.params is None else [float(v) for v in self.params],
            "mean": self.mean,
            "max_iter": self.max_iter,
            "tol": self.tol,
        }

    def state(self) -> str:
        """JSON of everything a site needs for the next round (``params`` null = the start)."""
        return json.dumps(self._spec(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @property
    def state_hash(self) -> str:
        """sha256 of the state; every share names the state it was computed from."""
        return canonical_hash(self._spec())

    @classmethod
    def from_state(cls, state: str) -> GLM:
        """A model at the round ``state`` describes (what a site rebuilds from its parameter)."""
        try:
            spec = json.loads(state)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"glm state is not JSON: {exc}") from None
        if not isinstance(spec, dict) or spec.get("schema") != STATE_SCHEMA:
            raise ValueError(f"not a federated GLM state (expected schema {STATE_SCHEMA})")
        try:
            m = cls(
                Design.from_json(spec["design"]),
                spec["family"],
                max_iter=int(spec["max_iter"]),
                tol=float(spec["tol"]),
            )
            if spec["phase"] not in ("mean", "irls"):
                raise ValueError(f"unknown phase {spec['phase']!r}")
            m.phase, m.iteration = str(spec["phase"]), int(spec["iteration"])
            m.params = None if spec["params"] is None else np.asarray(spec["params"], float)
            m.mean = None if spec["mean"] is None else float(spec["mean"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"glm state is incomplete: {exc}") from None
        if m.state_hash != canonical_hash(spec):
            raise ValueError("glm state does not round-trip (edited or from another version)")
        return m

    # ---- one round --------------------------------------------------------
    def update(self, shares: Any) -> None:
        """Combine one round of shares and step the IRLS (see the module docstring).

        Raises :class:`~phds_tre.federate.shares.ShareError` for shares of
        another state, design or site set, and :class:`ConvergenceError` when
        ``max_iter`` is reached without convergence (``result`` is then set).
        """
        if self.converged:
            raise ShareError("the fit has converged: read m.result")
        collected = collect(shares, KIND)
        expected = self.state_hash
        blocks = []
        for site, payload in collected.used:
            block = payload["federate"]
            if block.get("state_hash") != expected:
                raise ShareError(
                    f"{site}: its share was computed for another state (iteration "
                    f"{block.get('iteration')!r}, phase {block.get('phase')!r}) than this round's "
                    f"(iteration {self.iteration}, phase {self.phase!r}); send m.state() again"
                )
            blocks.append((site, block))
        sites = [s for s, _ in blocks]
        if self._sites is None:
            self._sites, self.collected = sites, collected
            self.columns = [str(c) for c in blocks[0][1]["columns"]]
            self.nobs = sum(int(b["n"]) for _, b in blocks)
        elif sites != self._sites:
            missing = sorted(set(self._sites) - set(sites))
            raise ShareError(
                f"the sites changed during the fit (missing now: {', '.join(missing) or 'none'}; "
                f"first round: {', '.join(self._sites)}): restart the fit with the same sites"
            )
        if self.phase == "mean":
            total = sum(float(b["stats"]["sum_y"]) for _, b in blocks)
            self.mean = total / self.nobs
            self.phase = "irls"
            return
        factors = [np.asarray(b["r"], dtype=np.float64) for _, b in blocks]
        k = len(self.columns)
        for (site, _), r in zip(blocks, factors, strict=True):
            if r.shape != (k + 1, k + 1):
                raise ShareError(f"{site}: the factor r is not square over the design's columns")
        pooled = r_factor(np.vstack(factors))
        deviance = sum(float(b["stats"]["deviance"]) for _, b in blocks)
        pearson = sum(float(b["stats"]["pearson_chi2"]) for _, b in blocks)
        if self.params is None:
            rank = int(np.linalg.matrix_rank(pooled[:k, :k]))
            if rank < k:
                raise ShareError(
                    "the pooled design is rank-deficient (collinear columns, or a level absent "
                    "at every site): drop or merge columns"
                )
            self.df_resid = self.nobs - rank
            self._scale = self._estimate_scale(pearson)
            self.history = [math.inf, deviance / self._scale]
        else:
            # statsmodels divides the new deviance by the scale of the previous mean.
            self.history.append(deviance / self._scale)
            self._scale = self._estimate_scale(pearson)
            done = bool(np.allclose(self.history[-2], self.history[-1], atol=self.tol, rtol=0.0))
            if done or self.iteration >= self.max_iter:
                self._finish(deviance, pearson, done)
                return
        self._last_r = pooled
        self.params = linalg.solve_triangular(pooled[:k, :k], pooled[:k, k])
        self.iteration += 1

    def _estimate_scale(self, pearson: float) -> float:
        if self.family == "gaussian":
            return pearson / self.df_resid
        return 1.0

    def _finish(self, deviance: float, pearson: float, converged: bool) -> None:
        assert self._last_r is not None and self.params is not None
        k = len(self.columns)
        r_inv = linalg.solve_triangular(self._last_r[:k, :k], np.eye(k))
        self.result = GLMResult(
            self, self.params, r_inv @ r_inv.T, self._scale, deviance, pearson, converged
        )
        self.converged = converged
        if not converged:
            raise ConvergenceError(
                f"no convergence after {self.max_iter} iterations (m.result holds the last fit)"
            )
