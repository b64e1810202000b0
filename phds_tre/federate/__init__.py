"""Combine released results across hospitals exactly: pooling, meta-analysis, federated regression.

Site side (runs inside a site notebook; every share is checked like any output)
and coordinator side (runs in the researcher's notebook on released results)::

    from phds_tre import federate
    s = federate.linear_stats(df, "y ~ x + C(sex)", levels=design_levels)   # site
    r = federate.ols([s1, s2, s3])                                         # coordinator
    m = federate.GLM("died ~ lactate + age", family="binomial")
    ma = federate.meta_analysis(effects, variances, method="reml")
    federate.funnel_plot(events, totals, labels)

Names are resolved lazily (one module per concern, as papermill does), so
``import phds_tre.federate`` stays cheap inside a site kernel.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    # design.py: the coordinator's fixed design (formula, levels and their order)
    "Design": "design",
    "design_matrices": "design",
    "DesignError": "design",
    # linear.py: federated OLS from sufficient statistics
    "LinearStats": "linear",
    "linear_stats": "linear",
    "ols": "linear",
    "OLSResult": "linear",
    # glm.py: exact federated IRLS / Newton
    "GLM": "glm",
    "GLMRound": "glm",
    "glm_round": "glm",
    "GLMResult": "glm",
    "ConvergenceError": "glm",
    # network.py: rounds through the hub
    "run_glm": "network",
    # meta.py: meta-analysis of per-site estimates
    "meta_analysis": "meta",
    "MetaAnalysis": "meta",
    # pooling.py: pooled counts (intervals) and summaries
    "pool_counts": "pooling",
    "pool_summary": "pooling",
    "PooledCounts": "pooling",
    "PooledSummary": "pooling",
    # plots.py: forest and funnel plots
    "forest_plot": "plots",
    "funnel_plot": "plots",
    "ForestFigure": "plots",
    "FunnelPlot": "plots",
    # shares.py: reading shares out of released results
    "load_shares": "shares",
    "ShareError": "shares",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'phds_tre.federate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"phds_tre.federate.{module}"), name)
