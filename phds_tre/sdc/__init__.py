"""Statistical disclosure control: the rules that decide what may leave a hospital.

The safe analysis API is pandas-shaped, so researchers change little code::

    from phds_tre import sdc
    out = sdc.crosstab(df.sex, df.age_band, margins=True)
    out.status   # "pass" | "review" | "fail"
    out.table    # releasable: unsafe cells suppressed (NaN)
    out.checks   # one row per (cell, rule) evaluated

Every call returns an :class:`~phds_tre.sdc.output.SDCOutput` that displays in
Jupyter as the structured MIME bundle :data:`MIME_TYPE` beside HTML and text.
"""

from phds_tre.sdc.figure import FigureOutput as FigureOutput
from phds_tre.sdc.frame import FrameOutput as FrameOutput
from phds_tre.sdc.models import ModelOutput, glm, logit, ols
from phds_tre.sdc.output import (
    MIME_TYPE,
    SCHEMA_VERSION,
    EvidenceError,
    Recheck,
    SDCOutput,
    recheck,
)
from phds_tre.sdc.pivot import crosstab, pivot_table
from phds_tre.sdc.policy import DEFAULT_POLICY, Policy, PolicyError, load_policy
from phds_tre.sdc.statistics import UnsupportedAggregation
from phds_tre.sdc.summaries import describe, hist, value_counts
from phds_tre.sdc.survival import SurvivalOutput, survival
from phds_tre.sdc.table import TableOutput

__all__ = [
    "DEFAULT_POLICY",
    "MIME_TYPE",
    "SCHEMA_VERSION",
    "EvidenceError",
    "ModelOutput",
    "Policy",
    "PolicyError",
    "Recheck",
    "SDCOutput",
    "SurvivalOutput",
    "TableOutput",
    "UnsupportedAggregation",
    "crosstab",
    "describe",
    "glm",
    "hist",
    "load_policy",
    "logit",
    "ols",
    "pivot_table",
    "recheck",
    "survival",
    "value_counts",
]
