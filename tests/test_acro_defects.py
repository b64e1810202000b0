"""Every ACRO 1.0.2 defect listed in shared/BUILD-NOTES.md, as a test that passes here.

One test per defect, named after it, so a reader can tick the list off.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phds_tre import sdc


def _groups(**groups: list[float]) -> pd.DataFrame:
    return pd.DataFrame([(g, v) for g, vals in groups.items() for v in vals], columns=["g", "v"])


def test_callable_aggfunc_is_checked_not_passed() -> None:
    """ACRO: a callable aggfunc (np.mean, a lambda) runs no checks and passes."""
    df = _groups(small=[1.0, 2.0, 3.0], big=list(np.arange(30.0)))
    out = sdc.pivot_table(df, values="v", index="g", aggfunc=np.mean)
    assert np.isnan(out.table.loc["small", "v"])
    assert (
        (out.checks.row == "small")
        & (out.checks.rule == "threshold")
        & (out.checks.status == "fail")
    ).any()
    with pytest.raises(sdc.UnsupportedAggregation):
        sdc.pivot_table(df, values="v", index="g", aggfunc=lambda s: s.mean())


def test_mode_has_a_threshold_check() -> None:
    """ACRO: mode has no threshold check."""
    df = _groups(small=[4.0, 4.0, 5.0], big=[1.0] * 20)
    out = sdc.pivot_table(
        df, values="v", index="g", aggfunc="mode", policy=sdc.Policy(single_value_statistics=())
    )
    assert np.isnan(out.table.loc["small", "v"])
    assert out.table.loc["big", "v"] == 1.0


def test_max_and_min_over_ten_or_more_fail() -> None:
    """ACRO: max/min on n >= 10 passes."""
    df = _groups(a=list(np.arange(40.0)), b=list(np.arange(25.0)))
    for func in ("max", "min", np.max, np.min):
        out = sdc.pivot_table(df, values="v", index="g", aggfunc=func)
        assert out.table["v"].isna().all()
        assert set(out.checks[out.checks.rule == "single_value"].status) == {"fail"}
    described = sdc.describe(pd.DataFrame({"age": np.arange(200.0)}))
    assert described.table.loc[["min", "max"], "age"].isna().all()
    assert described.table.loc["mean", "age"] == pytest.approx(99.5)


def test_std_with_suppression_keeps_the_safe_cells() -> None:
    """ACRO: std with suppression blanks the whole table."""
    df = _groups(small=[1.0, 5.0], a=list(np.arange(20.0)), b=list(np.arange(12.0)))
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="std")
    assert np.isnan(out.table.loc["small", "v"])
    assert out.table.loc[["a", "b"], "v"].notna().all()


def test_histogram_counts_values_on_the_top_edge() -> None:
    """ACRO: values on a histogram's top bin edge are dropped."""
    values = np.r_[np.full(12, 1.0), np.full(15, 3.0)]  # 3.0 is the top edge
    out = sdc.hist(values, bins=[0, 2, 3])
    counts, _ = np.histogram(values, bins=[0, 2, 3])
    assert counts.tolist() == [12, 15]
    assert out.table.tolist() == [12, 15]


def test_kaplan_meier_reports_risk_set_checks_not_dof_zero() -> None:
    """ACRO: Kaplan–Meier always reports dof=0."""
    rng = np.random.default_rng(0)
    durations = rng.exponential(20, 200).round(1)
    events = (rng.random(200) < 0.7).astype(int)
    out = sdc.survival(durations, events)
    rules = set(out.checks.rule)
    assert "dof" not in rules
    assert "threshold" in rules
    assert out.table["at_risk"].dropna().ge(10).all()


def test_unsupported_aggregation_is_a_clear_refusal() -> None:
    """ACRO: unsupported aggregations raise TypeError instead of a clear refusal."""
    df = _groups(a=list(np.arange(20.0)))
    for func in ("skew", np.percentile, lambda s: s.iloc[0]):
        with pytest.raises(sdc.UnsupportedAggregation) as info:
            sdc.pivot_table(df, values="v", index="g", aggfunc=func)
        assert not isinstance(info.value, TypeError)
        assert "Use one of" in str(info.value)
