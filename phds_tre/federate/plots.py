"""Forest plots of per-site estimates and funnel plots for comparing hospitals.

Both draw with matplotlib's object-oriented API on a fresh
:class:`~matplotlib.figure.Figure` (no pyplot state; saved with the Agg canvas)
and keep the numbers they drew, so a test or a reader checks content, not pixels:

* :func:`forest_plot` returns a :class:`ForestFigure` — a ``Figure`` whose
  ``table`` has one row per drawn line (sites, pooled diamond, prediction
  interval).
* :func:`funnel_plot` returns a :class:`FunnelPlot` with ``figure``, ``table``
  (one row per hospital with its flag) and ``limits`` (the control-limit curves).

Funnel limits are the **exact binomial** limits with Spiegelhalter's (2005,
*Statistics in Medicine* 24:1185, appendix) interpolation: with
``r = F⁻¹(p)`` the smallest count whose binomial CDF reaches ``p`` and
``α = (F(r) − p) / (F(r) − F(r − 1))``, the limit at ``n`` cases is
``(r − α) / n``. ``method="normal"`` gives ``θ ± z·sqrt(θ(1−θ)/n)`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Polygon, Rectangle
from scipy import stats

from phds_tre.federate.meta import MetaAnalysis

__all__ = ["FLAGS", "ForestFigure", "FunnelPlot", "control_limit", "forest_plot", "funnel_plot"]

FloatArray = npt.NDArray[np.float64]

#: Funnel flags, from lowest to highest.
FLAGS = ("below 99.8%", "below 95%", "within", "above 95%", "above 99.8%")


class ForestFigure(Figure):
    """A matplotlib Figure that also keeps the rows it drew (``table``)."""

    table: pd.DataFrame


def _forest_rows(
    ma: MetaAnalysis | None,
    estimates: Sequence[float] | None,
    ses: Sequence[float] | None,
    cis: Sequence[tuple[float, float]] | None,
    labels: Sequence[str] | None,
    pooled: tuple[float, float, float] | None,
    pooled_label: str | None,
    prediction: bool,
    level: float,
) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    if ma is not None:
        if any(x is not None for x in (estimates, ses, cis, pooled)):
            raise ValueError("give either a MetaAnalysis or estimates with ses/cis, not both")
        for lab, y, (lo, hi), w in zip(ma.labels, ma.effects, ma.site_ci, ma.weights, strict=True):
            rows.append(
                {"label": lab, "kind": "site", "estimate": y, "low": lo, "high": hi, "weight": w}
            )
        name = pooled_label or (
            "Fixed effect" if ma.method == "fixed" else f"Random effects ({ma.method.upper()})"
        )
        rows.append(
            {
                "label": name,
                "kind": "pooled",
                "estimate": ma.estimate,
                "low": ma.ci[0],
                "high": ma.ci[1],
                "weight": 1.0,
            }
        )
        if prediction and ma.prediction_interval is not None:
            lo, hi = ma.prediction_interval
            rows.append(
                {
                    "label": "Prediction interval",
                    "kind": "prediction",
                    "estimate": ma.estimate,
                    "low": lo,
                    "high": hi,
                    "weight": math.nan,
                }
            )
        return pd.DataFrame(rows)
    if estimates is None or (ses is None and cis is None):
        raise ValueError("give a MetaAnalysis, or estimates with ses= or cis=")
    est = np.asarray(estimates, dtype=np.float64)
    if est.ndim != 1 or not len(est):
        raise ValueError("estimates must be a non-empty list, one per site")
    if cis is not None:
        bounds = np.asarray(cis, dtype=np.float64)
        if bounds.shape != (len(est), 2):
            raise ValueError(f"cis must be {len(est)} (low, high) pairs")
        lows, highs = bounds[:, 0], bounds[:, 1]
        weight = np.full(len(est), math.nan)
    else:
        se = np.asarray(ses, dtype=np.float64)
        if se.shape != est.shape:
            raise ValueError(f"{len(est)} estimates but {se.size} ses")
        if not np.all(np.isfinite(se)) or np.any(se <= 0):
            raise ValueError("ses must be finite and > 0")
        crit = float(stats.norm.ppf(0.5 + level / 2))
        lows, highs = est - crit * se, est + crit * se
        inv = 1.0 / se**2
        weight = inv / inv.sum()
    if not (np.all(np.isfinite(est)) and np.all(np.isfinite(lows)) and np.all(np.isfinite(highs))):
        raise ValueError(
            "estimates and intervals must be finite (a suppressed site cannot be drawn)"
        )
    names = (
        [f"site {i + 1}" for i in range(len(est))] if labels is None else [str(x) for x in labels]
    )
    if len(names) != len(est):
        raise ValueError(f"{len(names)} labels for {len(est)} estimates")
    for lab, y, lo, hi, w in zip(names, est, lows, highs, weight, strict=True):
        rows.append(
            {"label": lab, "kind": "site", "estimate": y, "low": lo, "high": hi, "weight": w}
        )
    if pooled is not None:
        y, lo, hi = (float(x) for x in pooled)
        if not lo <= y <= hi:
            raise ValueError("pooled must be (estimate, low, high) with low <= estimate <= high")
        rows.append(
            {
                "label": pooled_label or "Pooled",
                "kind": "pooled",
                "estimate": y,
                "low": lo,
                "high": hi,
                "weight": 1.0,
            }
        )
    return pd.DataFrame(rows)


def forest_plot(
    ma: MetaAnalysis | None = None,
    *,
    estimates: Sequence[float] | None = None,
    ses: Sequence[float] | None = None,
    cis: Sequence[tuple[float, float]] | None = None,
    labels: Sequence[str] | None = None,
    pooled: tuple[float, float, float] | None = None,
    pooled_label: str | None = None,
    prediction: bool = True,
    null: float | None = 0.0,
    exp: bool = False,
    xlabel: str = "effect",
    title: str | None = None,
    level: float = 0.95,
) -> ForestFigure:
    """A forest plot: one row per site (estimate and interval, square ∝ weight), then the pooled diamond.

    Either pass a :class:`~phds_tre.federate.meta.MetaAnalysis`, or per-site
    ``estimates`` with ``ses`` (Wald intervals at ``level``) or ``cis``, and
    optionally a separately computed ``pooled=(estimate, low, high)`` — e.g.
    a federated GLM coefficient with ``pooled_label="Federated GLM"``.

    ``exp=True`` draws ``exp`` of everything on a log axis (odds or risk
    ratios from log estimates); the null line is then at ``exp(null)``.
    The returned Figure's ``table`` holds the drawn numbers (on the drawn scale).
    """
    data = _forest_rows(ma, estimates, ses, cis, labels, pooled, pooled_label, prediction, level)
    if exp:
        for col in ("estimate", "low", "high"):
            data[col] = np.exp(data[col])
    n = len(data)
    forest = ForestFigure(figsize=(8.0, 1.2 + 0.38 * (n + 1)), layout="constrained")
    forest.table = data
    ax = forest.add_subplot(1, 1, 1)
    y_pos = np.arange(n, 0, -1, dtype=np.float64)
    sites = data["kind"] == "site"
    weights = data.loc[sites, "weight"].to_numpy(dtype=np.float64)
    size = (
        40 + 260 * weights / np.nanmax(weights)
        if np.isfinite(weights).any()
        else np.full(weights.shape, 60.0)
    )
    size = np.where(np.isfinite(size), size, 60.0)
    for (_, row), y in zip(data.iterrows(), y_pos, strict=True):
        if row["kind"] == "site":
            ax.plot([row["low"], row["high"]], [y, y], color="#333333", lw=1.2)
        elif row["kind"] == "pooled":
            diamond = Polygon(
                [
                    (row["low"], y),
                    (row["estimate"], y + 0.3),
                    (row["high"], y),
                    (row["estimate"], y - 0.3),
                ],
                closed=True,
                facecolor="#1f4e79",
                edgecolor="#1f4e79",
                label=str(row["label"]),
            )
            ax.add_patch(diamond)
        else:
            ax.plot([row["low"], row["high"]], [y, y], color="#c55a11", lw=3, solid_capstyle="butt")
    ax.scatter(
        data.loc[sites, "estimate"],
        y_pos[sites.to_numpy()],
        s=size,
        marker="s",
        color="#333333",
        zorder=3,
    )
    if null is not None:
        ax.axvline(math.exp(null) if exp else null, color="#888888", ls="--", lw=1)
    if exp:
        ax.set_xscale("log")
    ax.set_yticks(y_pos, [str(x) for x in data["label"]])
    ax.set_ylim(0.3, n + 0.7)
    ax.set_xlabel(f"exp({xlabel})" if exp and xlabel == "effect" else xlabel)
    for spine in ("top", "right", "left"):
        ax.spines[spine].set_visible(False)
    ax.tick_params(axis="y", length=0)
    # Right-hand column: estimate [CI] and weight, in the axes' margin.
    pct = f"{100 * level:g}% CI"
    ax.text(
        1.02,
        1.0,
        f"estimate [{pct}]   weight",
        transform=ax.transAxes,
        fontsize=9,
        va="bottom",
        weight="bold",
    )
    # Right-align each number within its column so the monospace text lines up.
    width = {
        c: int(data[c].map(lambda v: len(f"{v:.2f}")).max()) for c in ("estimate", "low", "high")
    }
    for (_, row), y in zip(data.iterrows(), y_pos, strict=True):
        weight = (
            ""
            if not np.isfinite(row["weight"]) or row["kind"] != "site"
            else f"{100 * row['weight']:5.1f}%"
        )
        est, lo, hi = (f"{row[c]:.2f}".rjust(width[c]) for c in ("estimate", "low", "high"))
        text = f"{est} [{lo}, {hi}]  {weight}"
        ax.text(
            1.02,
            y,
            text,
            transform=ax.get_yaxis_transform(),
            fontsize=9,
            va="center",
            family="monospace",
        )
    handles: list[Artist] = [
        Line2D([], [], marker="s", color="#333333", ls="-", label=f"site estimate ({pct})")
    ]
    handles.append(Patch(facecolor="#1f4e79", label="pooled estimate"))
    if (data["kind"] == "prediction").any():
        handles.append(Line2D([], [], color="#c55a11", lw=3, label="prediction interval"))
    forest.legend(
        handles=handles,
        loc="outside lower center",
        ncol=3,
        frameon=False,
        fontsize=9,
    )
    # Padded above the column header (which sits on the axes' top edge, to the right).
    if title:
        ax.set_title(title, loc="left", pad=18)
    elif ma is not None:
        ax.set_title(
            f"{ma.k} sites · tau² = {ma.tau2:.3g} · I² = {100 * ma.i2:.0f}%",
            fontsize=10,
            loc="left",
            pad=18,
        )
    return forest


# ---- funnel plot -----------------------------------------------------------


def control_limit(p: float, n: npt.ArrayLike, target: float, method: str = "exact") -> FloatArray:
    """The ``p`` quantile control limit of a proportion at ``n`` cases (see module docstring)."""
    n_arr = np.asarray(n, dtype=np.float64)
    if method == "normal":
        z = float(stats.norm.ppf(p))
        return np.asarray(target + z * np.sqrt(target * (1 - target) / n_arr), dtype=np.float64)
    if method != "exact":
        raise ValueError(f"unknown method {method!r} (use 'exact' or 'normal')")
    r = stats.binom.ppf(p, n_arr, target)
    f_r = stats.binom.cdf(r, n_arr, target)
    f_below = stats.binom.cdf(r - 1, n_arr, target)
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = np.where(f_r > f_below, (f_r - p) / (f_r - f_below), 0.0)
    # The interpolation can step below 0 (r = 0) or above 1 (r = n): a proportion cannot.
    return np.asarray(np.clip((r - alpha) / n_arr, 0.0, 1.0), dtype=np.float64)


@dataclass(frozen=True)
class FunnelPlot:
    """A funnel plot and the numbers behind it.

    ``table``: one row per hospital (label, events, total, proportion, z,
    the limits at its size, flag). ``limits``: the curves drawn (n and one
    lower/upper column per limit). ``target`` and ``method`` as used.
    """

    figure: Figure
    table: pd.DataFrame
    limits: pd.DataFrame
    target: float
    method: str
    levels: tuple[float, ...]

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def _pct(level: float) -> str:
    return f"{100 * level:g}%"


def funnel_plot(
    events: Sequence[float] | npt.ArrayLike,
    totals: Sequence[float] | npt.ArrayLike,
    labels: Sequence[str] | None = None,
    target: float | None = None,
    limits: tuple[float, ...] = (0.95, 0.998),
    method: str = "exact",
    title: str | None = None,
    ylabel: str = "proportion",
    xlabel: str = "number of cases",
) -> FunnelPlot:
    """Compare hospitals' proportions with control limits around a target (Spiegelhalter 2005).

    Args:
        events: events per hospital (e.g. deaths), released counts.
        totals: cases per hospital (> 0).
        labels: hospital names.
        target: the benchmark proportion; default the pooled ``Σevents/Σtotals``.
        limits: two-sided coverage of each pair of control limits.
        method: ``"exact"`` binomial limits with Spiegelhalter's interpolation
            (default) or ``"normal"``.

    A hospital is flagged ``"above 99.8%"`` when its proportion is above the
    upper 99.8% limit at its number of cases, else ``"above 95%"`` above the
    95% limit, likewise below; ``"within"`` otherwise.
    """
    y = np.asarray(events, dtype=np.float64)
    n = np.asarray(totals, dtype=np.float64)
    if y.ndim != 1 or y.shape != n.shape or not len(y):
        raise ValueError(
            "events and totals must be equal-length, non-empty lists (one per hospital)"
        )
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(n))):
        raise ValueError("events and totals must be finite (a suppressed count cannot be placed)")
    if np.any(n <= 0) or np.any(y < 0) or np.any(y > n):
        raise ValueError("each hospital needs totals > 0 and 0 <= events <= totals")
    if np.any(y != np.round(y)) or np.any(n != np.round(n)):
        raise ValueError("events and totals must be whole numbers")
    levels = tuple(sorted(float(x) for x in limits))
    if not levels or any(not 0 < x < 1 for x in levels):
        raise ValueError("limits must be coverages between 0 and 1, e.g. (0.95, 0.998)")
    names = (
        [f"hospital {i + 1}" for i in range(len(y))] if labels is None else [str(x) for x in labels]
    )
    if len(names) != len(y):
        raise ValueError(f"{len(names)} labels for {len(y)} hospitals")
    theta = float(y.sum() / n.sum()) if target is None else float(target)
    if not 0 < theta < 1:
        raise ValueError(f"the target proportion must be strictly between 0 and 1, got {theta}")
    prop = y / n
    table = pd.DataFrame(
        {
            "label": names,
            "events": y.astype(np.int64),
            "total": n.astype(np.int64),
            "proportion": prop,
            "z": (prop - theta) / np.sqrt(theta * (1 - theta) / n),
        }
    )
    flag = np.full(len(y), "within", dtype=object)
    for level in levels:  # narrowest first: a wider limit crossed overrides
        lo = control_limit((1 - level) / 2, n, theta, method)
        hi = control_limit(1 - (1 - level) / 2, n, theta, method)
        table[f"lower {_pct(level)}"] = lo
        table[f"upper {_pct(level)}"] = hi
        flag = np.where(
            prop > hi, f"above {_pct(level)}", np.where(prop < lo, f"below {_pct(level)}", flag)
        )
    table["flag"] = flag
    grid = np.unique(np.round(np.geomspace(max(1.0, n.min() / 2), n.max() * 1.15, 300)))
    curves = pd.DataFrame({"n": grid})
    for level in levels:
        curves[f"lower {_pct(level)}"] = control_limit((1 - level) / 2, grid, theta, method)
        curves[f"upper {_pct(level)}"] = control_limit(1 - (1 - level) / 2, grid, theta, method)

    fig = Figure(figsize=(8.0, 5.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    styles = ["--", ":", "-."]
    colours = ["#2f75b5", "#c00000", "#7f6000"]
    for k, level in enumerate(levels):
        style, colour = styles[k % 3], colours[k % 3]
        ax.plot(
            grid,
            curves[f"upper {_pct(level)}"],
            style,
            color=colour,
            lw=1.3,
            label=f"{_pct(level)} limits",
        )
        ax.plot(grid, curves[f"lower {_pct(level)}"], style, color=colour, lw=1.3)
    ax.axhline(theta, color="#444444", lw=1, label=f"target {theta:.3g}")
    outer = f"{_pct(levels[-1])}"
    point_colour = [
        "#c00000" if f.endswith(outer) else "#ed7d31" if f != "within" else "#404040" for f in flag
    ]
    ax.scatter(n, prop, c=point_colour, s=36, zorder=3, edgecolors="white", linewidths=0.5)
    for lab, xi, yi, f in zip(names, n, prop, flag, strict=True):
        if f != "within" or len(names) <= 15:
            ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    top = float(max(prop.max(), curves.iloc[:, 1:].max().max()))
    bottom = float(min(prop.min(), curves.iloc[:, 1:].min().min()))
    pad = 0.03 * (top - bottom)  # a hospital at 0 or at the top stays visible
    ax.set_ylim(bottom - pad, top + pad)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Rectangle((0, 0), 1, 1, color="#ed7d31", label=f"outside {_pct(levels[0])}"))
    if len(levels) > 1:
        handles.append(Rectangle((0, 0), 1, 1, color="#c00000", label=f"outside {outer}"))
    ax.legend(handles=handles, loc="upper right", fontsize=9)
    default_title = (
        "Funnel plot (exact binomial limits)"
        if method == "exact"
        else "Funnel plot (normal approximation)"
    )
    ax.set_title(title or default_title, loc="left", fontsize=11)
    return FunnelPlot(fig, table, curves, theta, method, levels)
