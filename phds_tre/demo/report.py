"""Combine what the demo's hospitals released, and draw it: the coordinator's side.

Each function reads the verified releases that ``phds results`` wrote (one
folder per study, ``<site>/release/shared/<name>.json``), combines them with
:mod:`phds_tre.federate` and saves a figure. A hospital whose share was withheld
or suppressed is named in the report, never filled in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["combine_benchmarking", "combine_feasibility", "combine_mortality_models"]


def _cell(payload: dict[str, Any], row: str, column: str | None = None) -> float | None:
    """One released cell of a structured payload's table (None when suppressed or absent)."""
    table = payload.get("table") or {}
    index = [str(i) for i in table.get("index", [])]
    columns = [str(c) for c in table.get("columns", [])]
    if row not in index:
        return None
    j = 0 if column is None else columns.index(column) if column in columns else -1
    if j < 0:
        return None
    value = table["data"][index.index(row)][j]
    return None if value is None else float(value)


def _save(figure: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path.name


def combine_benchmarking(results_dir: Path, figures: Path) -> dict[str, Any]:
    """Sepsis mortality per hospital on a funnel plot (hospitals with both counts released)."""
    from phds_tre import federate

    shares = federate.load_shares(results_dir, "sepsis_outcome")
    events: list[int] = []
    totals: list[int] = []
    labels: list[str] = []
    withheld: dict[str, str] = {}
    for site, payload in sorted(shares.items()):
        died, survived = _cell(payload, "died"), _cell(payload, "survived")
        if died is None or survived is None:
            withheld[site] = "a count was suppressed (fewer than the threshold)"
            continue
        events.append(int(died))
        totals.append(int(died + survived))
        labels.append(site)
    out: dict[str, Any] = {"hospitals": labels, "withheld": withheld, "figure": None}
    if len(labels) >= 2:
        title = "PICU sepsis mortality per hospital"
        if withheld:
            title += f" ({', '.join(sorted(withheld))} withheld: small counts)"
        funnel = federate.funnel_plot(
            events, totals, labels, title=title, ylabel="deaths / admissions", xlabel="admissions"
        )
        out["figure"] = _save(funnel.figure, figures / "benchmarking_funnel.png")
        out["table"] = json.loads(funnel.table.to_json(orient="records"))
    else:
        out["note"] = "fewer than two hospitals released both counts: no funnel plot"
    return out


def combine_feasibility(results_dir: Path, figures: Path) -> dict[str, Any]:
    """Haemophilia counts by age band and type, pooled as intervals, drawn as ranges."""
    from phds_tre import federate

    shares = federate.load_shares(results_dir, "haemophilia_by_age")
    if not shares:
        return {"hospitals": [], "note": "no hospital released its table", "figure": None}
    pooled = federate.pool_counts(shares)
    frame = pooled.to_frame()
    figures.mkdir(parents=True, exist_ok=True)
    frame.to_csv(figures / "haemophilia_pooled.csv")
    return {
        "hospitals": sorted(shares),
        "pooled": json.loads(frame.astype(str).to_json(orient="split")),
        "table": "haemophilia_pooled.csv",
        "figure": _save(_interval_chart(pooled), figures / "haemophilia_pooled.png"),
    }


def _interval_chart(pooled: Any) -> Any:
    """One horizontal range per (age band, type): what the network can be sure of."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = pooled.low, pooled.high
    rows = [r for r in low.index if str(r) != "All"]
    columns = [c for c in low.columns if str(c) != "All"]
    figure, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(rows) * len(columns)))
    y = 0.0
    ticks: list[float] = []
    names: list[str] = []
    for row in rows:
        for k, column in enumerate(columns):
            lo, hi = float(low.loc[row, column]), float(high.loc[row, column])
            colour = f"C{k}"
            if lo == hi:
                ax.plot([lo], [y], "o", color=colour)
                label, end = f"{lo:g}", lo
            elif math.isinf(hi):  # nothing bounds it from above: an open range
                ax.annotate(
                    "", (lo + 10, y), (lo, y), arrowprops={"arrowstyle": "->", "color": colour}
                )
                label, end = f"≥ {lo:g}", lo + 10
            else:
                ax.plot([lo, hi], [y, y], "-", lw=6, color=colour, solid_capstyle="butt")
                label, end = f"{lo:g}–{hi:g}", hi
            ax.annotate(label, (end, y), xytext=(4, -3), textcoords="offset points")
            ticks.append(y)
            names.append(f"{row} · {column}")
            y -= 1
        y -= 0.5
    ax.set_yticks(ticks, names)
    ax.set_xlabel("children across the network (suppressed cells give ranges, never guesses)")
    ax.set_title("Haemophilia by age at diagnosis and type: pooled counts")
    ax.set_xlim(left=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return figure


def combine_mortality_models(results_dir: Path, figures: Path) -> dict[str, Any]:
    """The lactate coefficient of each hospital's logistic model, random-effects pooled."""
    from phds_tre import federate

    shares = federate.load_shares(results_dir, "mortality_model")
    effects: list[float] = []
    variances: list[float] = []
    labels: list[str] = []
    withheld: dict[str, str] = {}
    for site, payload in sorted(shares.items()):
        coef, se = _cell(payload, "lactate", "coef"), _cell(payload, "lactate", "std_err")
        if coef is None or se is None or payload.get("status") != "pass":
            withheld[site] = "the model was not released"
            continue
        effects.append(coef)
        variances.append(se * se)
        labels.append(site)
    out: dict[str, Any] = {"hospitals": labels, "withheld": withheld, "figure": None}
    if len(labels) >= 2:
        ma = federate.meta_analysis(effects, variances, method="reml", labels=labels)
        out["lactate_log_odds_per_mmol"] = {
            "estimate": ma.estimate,
            "ci": list(ma.ci),
            "tau2": ma.tau2,
            "i2": ma.i2,
        }
        figure = ma.forest_plot(
            xlabel="log odds of death per mmol/L of first lactate",
            title="Sepsis mortality: lactate effect per hospital and pooled",
        )
        out["figure"] = _save(figure, figures / "mortality_lactate_forest.png")
    return out


def _site_cohort(notebook: Path, site_dir: Path) -> Any:
    """The cohort a study notebook builds at a site: its ``cohort`` cell, run here as is.

    Demo only: the demo holds the synthetic hospitals' data, so it can show that the
    federated fit equals the fit on the pooled rows. A real coordinator never can.
    """
    import nbformat

    from phds_tre.data import connect

    nb = nbformat.read(notebook, as_version=4)
    (cell,) = [c for c in nb.cells if "cohort" in c.metadata.get("tags", [])]
    namespace: dict[str, Any] = {"min_age_years": 0, "_connect": lambda: connect(site_dir)}
    exec(
        compile(cell.source.replace("data.connect()", "_connect()"), str(notebook), "exec"),
        namespace,
    )
    return namespace["cohort"]


def combine_federated_glm(
    fit: Any, work_dir: Path, figures: Path, data_root: Path, term: str = "lactate"
) -> dict[str, Any]:
    """The federated logistic regression: its fit, rounds, forest plot and the pooled check."""
    import numpy as np
    import pandas as pd
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    from phds_tre import federate
    from phds_tre.demo import GLM_STUDY, notebooks_dir

    result = fit.result
    ci = result.conf_int()
    shares = federate.load_shares(work_dir / "round-1", "site_model")
    estimates: list[float] = []
    ses: list[float] = []
    labels: list[str] = []
    withheld: dict[str, str] = {}
    for site, payload in sorted(shares.items()):
        coef, se = _cell(payload, term, "coef"), _cell(payload, term, "std_err")
        if coef is None or se is None or payload.get("status") != "pass":
            withheld[site] = "its own model was not released (too few deaths or survivors)"
            continue
        estimates.append(coef)
        ses.append(se)
        labels.append(site)
    for site, reason in result.sites_dropped:
        withheld.setdefault(site, f"its share was withheld ({reason})")
    figure = federate.forest_plot(
        estimates=estimates,
        ses=ses,
        labels=labels,
        pooled=(float(result.params[term]), float(ci.loc[term, 0]), float(ci.loc[term, 1])),
        pooled_label="Federated GLM (exact pooled fit)",
        xlabel="log odds of death per mmol/L of first lactate (adjusted for age, sex)",
        title="Sepsis mortality: each hospital's model and the federated one",
    )
    # Demo only: refit on the pooled rows of the hospitals that took part.
    notebook, formula, _family, _levels = GLM_STUDY
    pooled_rows = pd.concat(
        [_site_cohort(notebooks_dir() / notebook, data_root / s) for s in result.sites_used],
        ignore_index=True,
    )
    reference = smf.glm(formula, pooled_rows, family=sm.families.Binomial()).fit()
    params = reference.params.reindex(result.params.index)
    bse = reference.bse.reindex(result.bse.index)
    difference = float(
        max(
            np.max(np.abs(result.params - params) / np.abs(params)),
            np.max(np.abs(result.bse - bse) / np.abs(bse)),
        )
    )
    return {
        "study_id": fit.study_id,
        "title": "Research: sepsis mortality and lactate (federated logistic regression)",
        "runs": {},
        "verified": True,  # run_glm verified every release of every round, or raised
        "complete": True,
        "decisions": [],
        "hospitals": result.sites_used,
        "withheld": withheld,
        "combined": {
            "figure": _save(figure, figures / "sepsis_glm_forest.png"),
            "withheld": withheld,
            "params": {k: float(v) for k, v in result.params.items()},
            "bse": {k: float(v) for k, v in result.bse.items()},
            "nobs": int(result.nobs),
            "iterations": int(result.iterations),
            "rounds": [r.to_dict() for r in fit.rounds],
            "pooled_check": {
                "max_relative_difference": difference,
                "statsmodels_iterations": int(reference.fit_history["iteration"]),
            },
        },
        "equal_to_pooled": difference < 1e-6
        and int(reference.fit_history["iteration"]) == int(result.iterations),
    }
