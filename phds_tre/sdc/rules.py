"""The disclosure rules, evaluated on every cell of a table at once.

Each rule looks at the contributor statistics of a cell (:class:`MeasureStats`)
and gives ``pass``, ``review`` or ``fail``. Boundaries (docs/rules.md):

========== ============================================ =========================
rule       fails / reviews when                         boundary
========== ============================================ =========================
threshold  0 < n < min_count                            n == min_count passes
zeros      n == 0 and zeros_disclosive                  —
nk         (x1+…+x_nk_n) / total >= nk_k                equality fails
p_percent  (total − x1 − x2) / x1 < p_ratio             equality passes
negative   any negative value (review: NK/p% undefined) —
missing    any missing value in the cell (review)       —
single_value  statistic is one person's value (fail)    median: n < median_min_count
dof        residual df < min_dof (models)               df == min_dof passes
========== ============================================ =========================

Details are templated per rule and status, never per-cell numbers: the checks
are shown to the researcher, and "3 contributors" would publish the very count
that was suppressed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phds_tre.sdc.cells import MeasureStats
from phds_tre.sdc.policy import Policy
from phds_tre.sdc.statistics import Statistic

__all__ = [
    "FAIL",
    "PASS",
    "REVIEW",
    "RULES",
    "STATUS_NAMES",
    "RuleResult",
    "evaluate_cells",
    "worst",
]

PASS, REVIEW, FAIL = 0, 1, 2
STATUS_NAMES = ("pass", "review", "fail")
RULES = (
    "threshold",
    "zeros",
    "nk",
    "p_percent",
    "dof",
    "single_value",
    "negative",
    "missing",
    "secondary",
)


def worst(statuses: list[str] | tuple[str, ...]) -> str:
    """The worst of several verdicts (fail > review > pass); ``pass`` for none."""
    code = max((STATUS_NAMES.index(s) for s in statuses), default=PASS)
    return STATUS_NAMES[code]


@dataclass
class RuleResult:
    """One rule's outcome on the cells where it applies."""

    rule: str
    applies: np.ndarray  # bool (R+1, C+1)
    status: np.ndarray  # int8 (R+1, C+1), meaningful where ``applies``
    details: tuple[str, str, str]  # detail text for pass, review, fail


def _result(
    rule: str, applies: np.ndarray, status: np.ndarray, details: tuple[str, str, str]
) -> RuleResult:
    return RuleResult(rule, applies, status.astype(np.int8), details)


def evaluate_cells(
    stat: Statistic, ms: MeasureStats, policy: Policy, frequency: bool
) -> list[RuleResult]:
    """Evaluate every rule that applies to ``stat`` on every cell of one block.

    ``frequency`` is true for a frequency table (counts of rows), where an empty
    cell is a published zero; in a magnitude table an empty cell shows as a
    missing value, which still tells that nobody is in it, so it is judged by
    the same zeros rule.
    """
    n = ms.n
    shape = n.shape
    results: list[RuleResult] = []
    m = policy.min_count

    positive = n > 0
    results.append(
        _result(
            "threshold",
            positive,
            np.where(n < m, FAIL, PASS),
            (
                f"at least {m} contributors",
                "",
                f"fewer than {m} contributors (minimum cell count)",
            ),
        )
    )
    zero = ~positive
    results.append(
        _result(
            "zeros",
            zero,
            np.full(shape, FAIL if policy.zeros_disclosive else PASS),
            (
                "empty cell: zeros are not disclosive under this policy",
                "",
                "empty cell: a zero discloses that no child has this combination (class disclosure)",
            ),
        )
    )
    if ms.n_missing.any():
        results.append(
            _result(
                "missing",
                ms.n_missing > 0,
                np.full(shape, REVIEW),
                ("", "missing values inside this cell were left out of the statistic", ""),
            )
        )
    if not frequency and stat.magnitude:
        negative = ms.n_negative > 0
        if negative.any():
            results.append(
                _result(
                    "negative",
                    positive & negative,
                    np.full(shape, REVIEW),
                    ("", "negative values: dominance (NK, p%) is undefined for this cell", ""),
                )
            )
        dominance = positive & ~negative
        results.extend(_dominance(ms, policy, dominance))
    if stat.order:
        results.append(_single_value(stat, ms, policy, positive))
    return results


def _dominance(ms: MeasureStats, policy: Policy, applies: np.ndarray) -> list[RuleResult]:
    total = ms.total
    top = np.where(np.isfinite(ms.top), ms.top, 0.0)
    k = policy.nk_n
    if top.shape[0] < max(k, 2):
        raise ValueError(
            f"the evidence holds the top {top.shape[0]} contributions, "
            f"but the policy's NK rule needs {max(k, 2)}"
        )
    topk = top[:k].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, topk / total, 0.0)
        x1, x2 = top[0], top[1]
        remainder = total - x1 - x2
        p_fail = (x1 > 0) & (remainder < policy.p_ratio * x1)
    nk_status = np.where(share >= policy.nk_k, FAIL, PASS)
    pct = round(policy.nk_k * 100, 6)
    p = round(policy.p_ratio * 100, 6)
    return [
        _result(
            "nk",
            applies,
            nk_status,
            (
                f"the largest {k} contributors hold less than {pct:g}% of the total",
                "",
                f"the largest {k} contributors hold {pct:g}% or more of the total (NK dominance)",
            ),
        ),
        _result(
            "p_percent",
            applies,
            np.where(p_fail, FAIL, PASS),
            (
                f"no contributor's value can be estimated to within {p:g}% by another",
                "",
                f"the second-largest contributor could estimate the largest to within {p:g}% (p% rule)",
            ),
        ),
    ]


def _single_value(
    stat: Statistic, ms: MeasureStats, policy: Policy, applies: np.ndarray
) -> RuleResult:
    # Quartiles are medians of halves: the site's median rules cover them too.
    is_median = stat.key in ("median", "q25", "q75")
    listed = stat.key in policy.single_value_statistics or (
        is_median and "median" in policy.single_value_statistics
    )
    status = np.full(ms.n.shape, FAIL if listed else PASS)
    if is_median and not listed:
        status = np.where(ms.n < policy.median_min_count, FAIL, PASS)
    return _result(
        "single_value",
        applies,
        status,
        (
            f"the {stat.name} is allowed by this site's policy",
            "",
            f"the {stat.name} is one child's own value (single-value statistic)",
        ),
    )
