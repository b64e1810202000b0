"""Meta-analysis of per-site estimates: fixed effect and random effects (DL, REML, PM).

The coordinator combines one estimate and its variance per site (a log odds
ratio, a mean difference, a regression coefficient) released by the sites::

    ma = federate.meta_analysis(effects, variances, method="reml", labels=sites)
    ma.estimate, ma.ci, ma.tau2, ma.i2
    ma.forest_plot()

The estimators follow their textbook definitions and R's metafor (Viechtbauer
2010), which is the reference the tests compare with:

* ``fixed``: inverse-variance weights ``1/v``.
* ``dl`` (DerSimonian–Laird): ``tau2 = max(0, (Q - (k-1)) / (Σw - Σw²/Σw))``,
  truncated at zero as metafor does.
* ``reml``: the root of the restricted log-likelihood's score
  ``Σw²(y-μ̂)² - Σw + Σw²/Σw = 0`` with ``w = 1/(v + tau2)``; ``tau2 = 0`` when
  the score is not positive at zero.
* ``pm`` (Paule–Mandel): the root of the generalised ``Q(tau2) = Σw(y-μ̂)² = k-1``;
  ``tau2 = 0`` when ``Q(0) <= k-1``.

Both roots are found with :func:`scipy.optimize.brentq` to ``xtol=1e-15``
(statsmodels' ``combine_effects`` does not truncate a negative DL ``tau2`` and
offers no REML, so it is a test reference only).

``I²`` and ``H²`` are computed from ``tau2`` and the "typical" within-site
variance ``s² = (k-1)Σw / ((Σw)² - Σw²)`` as metafor does: for DL they equal
``(Q-df)/Q`` and ``Q/df``; for REML and PM they follow that method's ``tau2``.
The prediction interval is ``μ̂ ± crit·sqrt(tau2 + se²)`` with ``crit`` the
normal quantile, or Student's t on ``k-1`` df with HKSJ (metafor's ``predict``).

Knapp–Hartung / Sidik–Jonkman (``hksj=True``): ``se² = Σw(y-μ̂)²/((k-1)Σw)`` and
a t distribution on ``k-1`` df, **without** the "ad hoc" truncation
``max(1, q)`` — as metafor's default ``test="knha"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import optimize, stats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["METHODS", "MetaAnalysis", "meta_analysis", "q_generalised", "reml_score"]

Method = Literal["fixed", "dl", "reml", "pm"]
METHODS: tuple[str, ...] = ("fixed", "dl", "reml", "pm")
_METHOD_NAMES = {
    "fixed": "fixed effect (inverse variance)",
    "dl": "random effects, DerSimonian-Laird",
    "reml": "random effects, REML",
    "pm": "random effects, Paule-Mandel",
}
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class MetaAnalysis:
    """The pooled estimate of a meta-analysis and its heterogeneity statistics.

    ``statistic`` is a z statistic, or a t statistic on ``k-1`` df when
    ``hksj`` is true (``df`` says which). ``weights`` are the normalised
    weights of the method (they sum to one). ``i2`` is a fraction (0..1).
    """

    method: str
    hksj: bool
    k: int
    estimate: float
    se: float
    ci: tuple[float, float]
    statistic: float
    df: float | None
    pvalue: float
    tau2: float
    tau: float
    i2: float
    h2: float
    q: float
    q_df: int
    q_pvalue: float
    weights: tuple[float, ...]
    effects: tuple[float, ...]
    variances: tuple[float, ...]
    labels: tuple[str, ...]
    level: float
    prediction_interval: tuple[float, float] | None
    notes: tuple[str, ...] = field(default=())

    @property
    def z(self) -> float | None:
        """The z statistic (None under HKSJ, where the statistic is t)."""
        return None if self.hksj else self.statistic

    @property
    def t(self) -> float | None:
        """The t statistic under HKSJ (None otherwise)."""
        return self.statistic if self.hksj else None

    @property
    def site_ci(self) -> list[tuple[float, float]]:
        """Each site's own Wald interval at ``level`` (normal quantile)."""
        crit = float(stats.norm.ppf(0.5 + self.level / 2))
        return [
            (y - crit * math.sqrt(v), y + crit * math.sqrt(v))
            for y, v in zip(self.effects, self.variances, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (tuples become lists)."""
        return {
            "method": self.method,
            "hksj": self.hksj,
            "k": self.k,
            "estimate": self.estimate,
            "se": self.se,
            "ci": list(self.ci),
            "statistic": self.statistic,
            "statistic_name": "t" if self.hksj else "z",
            "df": self.df,
            "pvalue": self.pvalue,
            "tau2": self.tau2,
            "tau": self.tau,
            "i2": self.i2,
            "h2": self.h2,
            "q": self.q,
            "q_df": self.q_df,
            "q_pvalue": self.q_pvalue,
            "weights": list(self.weights),
            "effects": list(self.effects),
            "variances": list(self.variances),
            "labels": list(self.labels),
            "level": self.level,
            "prediction_interval": (
                None if self.prediction_interval is None else list(self.prediction_interval)
            ),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A plain-text report: pooled estimate, heterogeneity and each site's weight."""
        pct = f"{100 * self.level:g}%"
        test = f"t({self.df:g})" if self.hksj else "z"
        lines = [
            f"Meta-analysis: {_METHOD_NAMES[self.method]}"
            + (" with Knapp-Hartung (HKSJ) standard error" if self.hksj else ""),
            f"k = {self.k} sites",
            f"estimate {self.estimate:.4f}  se {self.se:.4f}  {pct} CI "
            f"[{self.ci[0]:.4f}, {self.ci[1]:.4f}]  {test} = {self.statistic:.3f}  "
            f"p = {self.pvalue:.3g}",
            f"heterogeneity: Q({self.q_df}) = {self.q:.4f}, p = {self.q_pvalue:.3g}; "
            f"tau^2 = {self.tau2:.4f} (tau = {self.tau:.4f}); "
            f"I^2 = {100 * self.i2:.1f}%; H^2 = {self.h2:.2f}",
        ]
        if self.prediction_interval is not None:
            lo, hi = self.prediction_interval
            lines.append(f"{pct} prediction interval [{lo:.4f}, {hi:.4f}]")
        width = max(len(lab) for lab in self.labels)
        lines.append("")
        lines.append(f"{'site':<{width}}  {'effect':>9}  {'se':>8}  {'weight':>7}")
        for lab, y, v, w in zip(
            self.labels, self.effects, self.variances, self.weights, strict=True
        ):
            lines.append(f"{lab:<{width}}  {y:>9.4f}  {math.sqrt(v):>8.4f}  {100 * w:>6.2f}%")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def forest_plot(self, **kwargs: Any) -> Figure:
        """A forest plot of the sites and the pooled diamond (see :func:`~phds_tre.federate.plots.forest_plot`)."""
        from phds_tre.federate.plots import forest_plot

        return forest_plot(self, **kwargs)


def _validate(
    effects: Sequence[float] | npt.ArrayLike,
    variances: Sequence[float] | npt.ArrayLike,
    labels: Sequence[str] | None,
) -> tuple[FloatArray, FloatArray, tuple[str, ...]]:
    try:
        y = np.asarray(effects, dtype=np.float64)
        v = np.asarray(variances, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"effects and variances must be numbers ({exc})") from None
    if y.ndim != 1 or v.ndim != 1:
        raise ValueError("effects and variances must be one-dimensional (one value per site)")
    if len(y) != len(v):
        raise ValueError(f"{len(y)} effects but {len(v)} variances: give one of each per site")
    if len(y) == 0:
        raise ValueError("no sites: effects is empty")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"effects must be finite; site(s) {_where(~np.isfinite(y))} are not")
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        bad = ~np.isfinite(v) | (v <= 0)
        raise ValueError(
            f"variances must be finite and > 0; site(s) {_where(bad)} are not "
            "(a suppressed or zero variance cannot be weighted)"
        )
    if labels is None:
        names = tuple(f"site {i + 1}" for i in range(len(y)))
    else:
        names = tuple(str(x) for x in labels)
        if len(names) != len(y):
            raise ValueError(f"{len(names)} labels for {len(y)} sites")
    return y, v, names


def _where(mask: npt.NDArray[np.bool_]) -> str:
    return ", ".join(str(i + 1) for i in np.flatnonzero(mask))


def _weighted_mean(y: FloatArray, w: FloatArray) -> float:
    return float(np.sum(w * y) / np.sum(w))


def q_generalised(y: FloatArray, v: FloatArray, tau2: float) -> float:
    """Generalised Cochran's Q: ``Σw(y-μ̂)²`` with ``w = 1/(v + tau2)`` (Q at ``tau2 = 0``)."""
    w = 1.0 / (v + tau2)
    mu = _weighted_mean(y, w)
    return float(np.sum(w * (y - mu) ** 2))


def reml_score(y: FloatArray, v: FloatArray, tau2: float) -> float:
    """Twice the derivative of the restricted log-likelihood in ``tau2``.

    ``Σw²(y-μ̂)² - Σw + Σw²/Σw`` with ``w = 1/(v + tau2)``; zero at the REML estimate.
    """
    w = 1.0 / (v + tau2)
    mu = _weighted_mean(y, w)
    sw = np.sum(w)
    return float(np.sum(w**2 * (y - mu) ** 2) - sw + np.sum(w**2) / sw)


def _root(func: Any, start: float) -> float:
    """The root of a function positive at 0 and negative far out, by bracketing and brentq."""
    hi = max(start, 1e-8)
    for _ in range(200):
        if func(hi) < 0:
            break
        hi *= 2.0
    else:  # pragma: no cover - the functions here always turn negative
        raise RuntimeError("could not bracket tau^2")
    return float(
        optimize.brentq(func, 0.0, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    )


def _tau2(y: FloatArray, v: FloatArray, method: str) -> float:
    k = len(y)
    if method == "fixed":
        return 0.0
    w = 1.0 / v
    q = q_generalised(y, v, 0.0)
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    dl = max(0.0, (q - (k - 1)) / c)
    if method == "dl":
        return dl
    if method == "reml":
        if reml_score(y, v, 0.0) <= 0:
            return 0.0
        return _root(lambda t: reml_score(y, v, t), dl)
    if method == "pm":
        if q <= k - 1:
            return 0.0
        return _root(lambda t: q_generalised(y, v, t) - (k - 1), dl)
    raise ValueError(f"unknown method {method!r} (use one of {', '.join(METHODS)})")


def meta_analysis(
    effects: Sequence[float] | npt.ArrayLike,
    variances: Sequence[float] | npt.ArrayLike,
    method: str = "reml",
    hksj: bool = False,
    labels: Sequence[str] | None = None,
    level: float = 0.95,
) -> MetaAnalysis:
    """Combine one estimate per site by inverse-variance meta-analysis.

    Args:
        effects: each site's estimate (e.g. log odds ratios).
        variances: each site's sampling variance (``se**2``), > 0.
        method: ``"fixed"``, ``"dl"``, ``"reml"`` (default) or ``"pm"``.
        hksj: Knapp–Hartung standard error and t on ``k-1`` df (no truncation).
        labels: site names (default ``site 1``, ``site 2``, …).
        level: confidence level of the intervals.

    Raises:
        ValueError: on unequal lengths, non-finite values, variances <= 0,
            an unknown method, ``level`` outside (0, 1), or fewer than two
            sites for random effects or HKSJ.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (use one of {', '.join(METHODS)})")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")
    y, v, names = _validate(effects, variances, labels)
    k = len(y)
    if k < 2 and (method != "fixed" or hksj):
        raise ValueError(
            f"{'HKSJ' if hksj else 'a random-effects meta-analysis'} needs at least 2 sites, got {k}"
        )
    tau2 = _tau2(y, v, method)
    w = 1.0 / (v + tau2)
    sw = float(np.sum(w))
    mu = _weighted_mean(y, w)
    q = q_generalised(y, v, 0.0)
    q_df = k - 1
    alpha = 1.0 - level
    notes: list[str] = []
    if hksj:
        q_hk = float(np.sum(w * (y - mu) ** 2)) / (k - 1)
        se = math.sqrt(q_hk / sw)
        df: float | None = float(k - 1)
        crit = float(stats.t.ppf(1 - alpha / 2, k - 1))
        stat = mu / se
        pvalue = float(2 * stats.t.sf(abs(stat), k - 1))
        if q_hk < 1:
            notes.append(
                "HKSJ: the Knapp-Hartung factor is below 1, so the interval is narrower "
                "than without HKSJ (no ad hoc truncation, as metafor's test='knha')"
            )
    else:
        se = math.sqrt(1.0 / sw)
        df = None
        crit = float(stats.norm.ppf(1 - alpha / 2))
        stat = mu / se
        pvalue = float(2 * stats.norm.sf(abs(stat)))
    ci = (mu - crit * se, mu + crit * se)
    w0 = 1.0 / v
    s2 = (
        (k - 1) * float(np.sum(w0)) / (float(np.sum(w0)) ** 2 - float(np.sum(w0**2)))
        if k > 1
        else math.nan
    )
    if method == "fixed":
        i2 = max(0.0, (q - q_df) / q) if q > 0 and k > 1 else 0.0
        h2 = q / q_df if k > 1 else math.nan
        prediction = None
    else:
        i2 = tau2 / (tau2 + s2)
        h2 = (tau2 + s2) / s2
        half = crit * math.sqrt(tau2 + se**2)
        prediction = (mu - half, mu + half)
    q_pvalue = float(stats.chi2.sf(q, q_df)) if k > 1 else math.nan
    return MetaAnalysis(
        method=method,
        hksj=hksj,
        k=k,
        estimate=mu,
        se=se,
        ci=ci,
        statistic=stat,
        df=df,
        pvalue=pvalue,
        tau2=tau2,
        tau=math.sqrt(tau2),
        i2=i2,
        h2=h2,
        q=q,
        q_df=q_df,
        q_pvalue=q_pvalue,
        weights=tuple(float(x) for x in w / sw),
        effects=tuple(float(x) for x in y),
        variances=tuple(float(x) for x in v),
        labels=names,
        level=level,
        prediction_interval=prediction,
        notes=tuple(notes),
    )
