"""Forest and funnel plots: what is drawn, checked from the figure's data, not its pixels."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Polygon
from scipy import stats

from phds_tre import federate
from phds_tre.federate.plots import ForestFigure, control_limit


def meta() -> federate.MetaAnalysis:
    y = [-0.89, -1.59, -1.35, -1.44, -0.22, -0.79]
    v = [0.33, 0.19, 0.42, 0.02, 0.05, 0.007]
    return federate.meta_analysis(y, v, method="reml", labels=list("ABCDEF"))


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---- forest plot -------------------------------------------------------------


def test_forest_plot_of_a_meta_analysis_draws_sites_diamond_and_prediction() -> None:
    ma = meta()
    fig = ma.forest_plot()
    assert isinstance(fig, Figure) and isinstance(fig, ForestFigure)
    table = fig.table
    assert list(table["kind"]) == ["site"] * 6 + ["pooled", "prediction"]
    assert list(table["label"][:6]) == list("ABCDEF")
    assert table["weight"][:6].to_numpy() == pytest.approx(np.array(ma.weights))
    crit = stats.norm.ppf(0.975)
    assert table["low"][0] == pytest.approx(-0.89 - crit * math.sqrt(0.33))
    assert tuple(table.loc[6, ["low", "high"]]) == pytest.approx(ma.ci)
    assert tuple(table.loc[7, ["low", "high"]]) == pytest.approx(ma.prediction_interval)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][:6] == list("ABCDEF")
    # The pooled diamond spans the pooled CI, centred on the estimate.
    diamond = next(p for p in ax.patches if isinstance(p, Polygon))
    xs = diamond.get_xy()[:, 0]
    assert (xs.min(), xs.max()) == pytest.approx(ma.ci)
    # Square sizes grow with the weights.
    squares = next(c for c in ax.collections if isinstance(c, PathCollection))
    order = np.argsort(ma.weights)
    assert np.all(np.diff(squares.get_sizes()[order]) >= 0)
    # The null line is at 0.
    assert any(tuple(line.get_xdata()) == (0, 0) for line in ax.get_lines())
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_forest_plot_on_the_ratio_scale() -> None:
    fig = federate.forest_plot(meta(), exp=True, xlabel="risk ratio", prediction=False)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert any(tuple(line.get_xdata()) == (1.0, 1.0) for line in ax.get_lines())
    assert "prediction" not in set(fig.table["kind"])
    assert fig.table["estimate"][0] == pytest.approx(math.exp(-0.89))


def test_forest_plot_of_estimates_with_a_separately_pooled_glm() -> None:
    fig = federate.forest_plot(
        estimates=[0.30, 0.50, 0.10],
        ses=[0.10, 0.20, 0.15],
        labels=["Hospital A", "Hospital B", "Hospital C"],
        pooled=(0.28, 0.10, 0.46),
        pooled_label="Federated GLM",
        xlabel="log odds ratio",
    )
    table = fig.table
    assert list(table["label"]) == ["Hospital A", "Hospital B", "Hospital C", "Federated GLM"]
    assert tuple(table.iloc[3][["estimate", "low", "high"]]) == (0.28, 0.10, 0.46)
    inv = 1 / np.array([0.1, 0.2, 0.15]) ** 2
    assert table["weight"][:3].to_numpy() == pytest.approx(inv / inv.sum())
    assert fig.axes[0].get_xlabel() == "log odds ratio"
    texts = [t.get_text() for t in fig.axes[0].texts]
    # Numbers are right-aligned per column (Hospital C's interval starts at -0.19).
    assert any(t.startswith("0.28 [ 0.10, 0.46]") for t in texts)
    assert any(t.startswith("0.10 [-0.19, 0.39]") for t in texts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give a MetaAnalysis, or estimates"),
        ({"estimates": [0.1, 0.2], "ses": [0.1]}, "2 estimates but 1 ses"),
        ({"estimates": [0.1], "ses": [0.0]}, "ses must be finite and > 0"),
        ({"estimates": [0.1], "cis": [(0.0, 0.2)], "labels": ["a", "b"]}, "2 labels for 1"),
        ({"estimates": [0.1], "ses": [0.1], "pooled": (0.5, 0.6, 0.7)}, "low <= estimate"),
    ],
)
def test_forest_plot_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        federate.forest_plot(**kwargs)  # type: ignore[arg-type]


# ---- funnel plot -------------------------------------------------------------


def exact_limit(p: float, n: int, theta: float) -> float:
    """Spiegelhalter (2005) appendix, by summing binomial probabilities by hand."""
    cdf, r = 0.0, -1
    while cdf < p:
        r += 1
        below = cdf
        cdf += math.comb(n, r) * theta**r * (1 - theta) ** (n - r)
    alpha = (cdf - p) / (cdf - below)
    return min(max((r - alpha) / n, 0.0), 1.0)


@pytest.mark.parametrize("n", [20, 57, 100, 333, 1000])
@pytest.mark.parametrize("p", [0.001, 0.025, 0.975, 0.999])
def test_exact_limits_follow_spiegelhalter(n: int, p: float) -> None:
    assert control_limit(p, n, 0.12) == pytest.approx(exact_limit(p, n, 0.12), abs=1e-12)


def test_exact_limits_approach_the_normal_ones() -> None:
    n = 20000
    z = stats.norm.ppf(0.999)
    normal = 0.1 + z * math.sqrt(0.1 * 0.9 / n)
    assert control_limit(0.999, n, 0.1) == pytest.approx(normal, rel=2e-3)
    assert control_limit(0.999, n, 0.1, method="normal") == pytest.approx(normal, rel=1e-12)


def test_funnel_flags_hospitals_inside_and_outside_the_limits() -> None:
    theta = 0.10
    n = [100, 100, 400, 400, 250]
    up95, up998 = exact_limit(0.975, 400, theta), exact_limit(0.999, 400, theta)
    between = math.floor(up998 * 400)  # above the 95% limit, below the 99.8% one
    assert up95 * 400 < between < up998 * 400
    events = [10, 50, 0, between, 25]
    fp = federate.funnel_plot(events, n, list("VWXYZ"), target=theta)
    flags = dict(zip(fp.table["label"], fp.table["flag"], strict=True))
    assert flags == {
        "V": "within",
        "W": "above 99.8%",
        "X": "below 99.8%",
        "Y": "above 95%",
        "Z": "within",
    }
    assert fp.target == theta and fp.method == "exact"
    row = fp.table.set_index("label").loc["W"]
    assert row["z"] == pytest.approx((0.5 - theta) / math.sqrt(theta * (1 - theta) / 100))
    assert row["upper 99.8%"] == pytest.approx(exact_limit(0.999, 100, theta))
    # The curves drawn are the limits at each n of the grid.
    curve = fp.limits.iloc[10]
    assert curve["upper 95%"] == pytest.approx(exact_limit(0.975, int(curve["n"]), theta))
    ax = fp.figure.axes[0]
    assert ax.get_xlabel() == "number of cases" and ax.get_ylabel() == "proportion"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "95% limits" in labels and "99.8% limits" in labels
    assert png_bytes(fp.figure).startswith(b"\x89PNG")


def test_funnel_target_defaults_to_the_pooled_proportion() -> None:
    fp = federate.funnel_plot([5, 20, 12], [100, 200, 150])
    assert fp.target == pytest.approx(37 / 450)
    assert list(fp.table["label"]) == ["hospital 1", "hospital 2", "hospital 3"]
    normal = federate.funnel_plot([5, 20, 12], [100, 200, 150], method="normal")
    assert normal.table["upper 95%"][0] == pytest.approx(
        37 / 450 + stats.norm.ppf(0.975) * math.sqrt(37 / 450 * (1 - 37 / 450) / 100)
    )


@pytest.mark.parametrize(
    ("events", "totals", "kwargs", "message"),
    [
        ([1, 2], [10], {}, "equal-length"),
        ([1, None], [10, 10], {}, "must be finite"),
        ([11], [10], {}, "0 <= events <= totals"),
        ([1.5], [10], {}, "whole numbers"),
        ([1], [10], {"limits": (95,)}, "coverages between 0 and 1"),
        ([0, 0], [10, 10], {}, "strictly between 0 and 1"),
        ([1], [10], {"method": "poisson"}, "unknown method"),
    ],
)
def test_funnel_bad_input(
    events: list[float], totals: list[float], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        federate.funnel_plot(events, totals, **kwargs)  # type: ignore[arg-type]
