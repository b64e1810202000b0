"""Known-answer tests of every table rule at and around its boundary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phds_tre import sdc
from phds_tre.sdc import Policy, rules


def _cell_frame(groups: dict[str, list[float]]) -> pd.DataFrame:
    rows = [(g, v) for g, vals in groups.items() for v in vals]
    return pd.DataFrame(rows, columns=["g", "v"])


def _status(out: sdc.TableOutput, rule: str, row: object) -> str:
    checks = out.checks
    hit = checks[(checks.rule == rule) & (checks.row == row)]
    assert len(hit) == 1, f"expected one {rule} check for {row!r}, got {len(hit)}"
    return str(hit.status.iloc[0])


# ---- threshold -----------------------------------------------------------
@pytest.mark.parametrize(("n", "expected"), [(1, "fail"), (9, "fail"), (10, "pass"), (11, "pass")])
def test_threshold_boundary_counts(n: int, expected: str) -> None:
    df = pd.DataFrame({"a": ["x"] * n + ["y"] * 20, "b": ["p"] * (n + 20)})
    out = sdc.crosstab(df.a, df.b)
    assert _status(out, "threshold", "x") == expected
    assert np.isnan(out.table.loc["x", "p"]) == (expected == "fail")
    assert out.table.loc["y", "p"] == 20


def test_threshold_follows_policy_min_count() -> None:
    df = pd.DataFrame({"a": ["x"] * 5 + ["y"] * 20, "b": "p"})
    assert sdc.crosstab(df.a, df.b, policy=Policy(min_count=5)).status == "pass"
    strict = sdc.crosstab(df.a, df.b, policy=Policy(min_count=6, suppressed_verdict="pass"))
    assert np.isnan(strict.table.loc["x", "p"])
    assert strict.status == "pass"  # the site accepts suppressed tables without review


def test_status_of_suppressed_table_follows_policy() -> None:
    df = pd.DataFrame({"a": ["x"] * 3 + ["y"] * 20, "b": "p"})
    assert sdc.crosstab(df.a, df.b).status == "review"
    assert sdc.crosstab(df.a, df.b, policy=Policy(suppressed_verdict="pass")).status == "pass"


# ---- zeros -----------------------------------------------------------------
def test_zero_cell_is_disclosive_by_default() -> None:
    df = pd.DataFrame({"a": ["x"] * 20 + ["y"] * 20, "b": ["p"] * 20 + ["p"] * 10 + ["q"] * 10})
    out = sdc.crosstab(df.a, df.b)
    zero = out.checks[out.checks.rule == "zeros"]
    assert list(zip(zero.row, zero.column, zero.status, strict=True)) == [("x", "q", "fail")]
    assert np.isnan(out.table.loc["x", "q"])
    relaxed = sdc.crosstab(df.a, df.b, policy=Policy(zeros_disclosive=False))
    assert relaxed.table.loc["x", "q"] == 0
    assert relaxed.status == "pass"


# ---- NK dominance: fails when top-2 share >= nk_k --------------------------------
@pytest.mark.parametrize(("x2", "expected"), [(40, "fail"), (39, "pass")])
def test_nk_boundary(x2: float, expected: str) -> None:
    # total 100; top two = 50 + x2 (90 → share 0.90 exactly fails; 89 passes)
    rest = [(100 - 50 - x2) / 8] * 8
    df = _cell_frame({"x": [50, x2, *rest], "y": [10.0] * 10})
    pol = Policy(p_ratio=0.0)  # isolate NK
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="sum", policy=pol)
    assert _status(out, "nk", "x") == expected
    assert _status(out, "nk", "y") == "pass"


# ---- p% rule: fails when (total - x1 - x2) / x1 < p ------------------------
@pytest.mark.parametrize(
    ("rest", "expected"), [([1, 1, 1, 1, 1, 0, 0, 0], "pass"), ([1, 1, 1, 1, 0, 0, 0, 0], "fail")]
)
def test_p_percent_boundary(rest: list[float], expected: str) -> None:
    # x1 = 50, x2 = 40: remainder 5 → 5/50 = 0.10 exactly passes; 4 fails
    df = _cell_frame({"x": [50, 40, *rest], "y": [10.0] * 10})
    pol = Policy(nk_k=1.0)  # isolate p%
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="mean", policy=pol)
    assert _status(out, "p_percent", "x") == expected
    assert np.isnan(out.table.loc["x", "v"]) == (expected == "fail")


def test_dominance_applies_to_callables_too() -> None:
    """ACRO 1.0.2 ran no checks for a callable aggfunc such as np.mean."""
    df = _cell_frame({"x": [1000.0] + [1.0] * 11, "y": [10.0] * 12})
    for func in ["mean", np.mean, np.nanmean, pd.Series.mean]:
        out = sdc.pivot_table(df, values="v", index="g", aggfunc=func)
        assert _status(out, "nk", "x") == "fail", func
        assert np.isnan(out.table.loc["x", "v"])
        assert out.table.loc["y", "v"] == 10.0


def test_lambda_and_unknown_callables_are_refused_clearly() -> None:
    df = _cell_frame({"x": [1.0] * 12})
    with pytest.raises(sdc.UnsupportedAggregation, match="cannot check"):
        sdc.pivot_table(df, values="v", index="g", aggfunc=lambda s: s.mean())
    with pytest.raises(sdc.UnsupportedAggregation, match="'skew'"):
        sdc.pivot_table(df, values="v", index="g", aggfunc="skew")
    with pytest.raises(ValueError):  # a clear refusal is a ValueError, never a TypeError
        sdc.crosstab(df.g, df.g, values=df.v, aggfunc=np.percentile)


# ---- negative and missing values → review ---------------------------------
def test_negative_values_make_dominance_undefined() -> None:
    df = _cell_frame({"x": [-5.0] + [3.0] * 11, "y": [10.0] * 12})
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="mean")
    assert _status(out, "negative", "x") == "review"
    assert not ((out.checks.rule == "nk") & (out.checks.row == "x")).any()
    assert out.status == "review"
    assert out.table.loc["x", "v"] == pytest.approx((-5 + 33) / 12)


def test_missing_values_inside_a_cell_need_review() -> None:
    df = _cell_frame({"x": [np.nan] + [3.0] * 11, "y": [10.0] * 12})
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="mean")
    assert _status(out, "missing", "x") == "review"
    assert out.status == "review"
    assert "missing" in " ".join(out.reasons)


def test_missing_values_reduce_contributors() -> None:
    # 10 rows but one missing value: 9 contributors → threshold fails
    df = _cell_frame({"x": [np.nan] + [3.0] * 9, "y": [10.0] * 12})
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="mean")
    assert _status(out, "threshold", "x") == "fail"


# ---- single values -----------------------------------------------------
@pytest.mark.parametrize("func", ["max", "min", "first", "last", "mode", np.max, np.min, max, min])
def test_single_value_statistics_fail_even_for_large_groups(func: object) -> None:
    """ACRO 1.0.2 passed max/min over n >= 10."""
    df = _cell_frame({"x": list(np.arange(50.0)), "y": list(np.arange(30.0))})
    out = sdc.pivot_table(df, values="v", index="g", aggfunc=func)  # type: ignore[arg-type]
    assert _status(out, "single_value", "x") == "fail"
    assert out.table["v"].isna().all()


def test_site_may_allow_single_values() -> None:
    df = _cell_frame({"x": list(np.arange(50.0)), "y": list(np.arange(30.0))})
    pol = Policy(single_value_statistics=("mode",))
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="max", policy=pol)
    assert out.status == "pass"
    assert out.table.loc["x", "v"] == 49.0


def test_mode_has_a_threshold_check() -> None:
    """ACRO 1.0.2 applied no threshold to mode."""
    df = _cell_frame({"x": [1.0, 1.0, 2.0], "y": [5.0] * 12})
    pol = Policy(single_value_statistics=())
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="mode", policy=pol)
    assert _status(out, "threshold", "x") == "fail"
    assert np.isnan(out.table.loc["x", "v"])
    assert out.table.loc["y", "v"] == 5.0


def test_median_counts_as_single_value_below_policy_size() -> None:
    df = _cell_frame({"x": list(np.arange(11.0)), "y": list(np.arange(30.0))})
    pol = Policy(median_min_count=20)
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="median", policy=pol)
    assert _status(out, "single_value", "x") == "fail"
    assert _status(out, "single_value", "y") == "pass"
    assert out.table.loc["y", "v"] == 14.5


def test_std_with_suppression_keeps_safe_cells() -> None:
    """ACRO 1.0.2 blanked the whole table for std with suppression."""
    df = _cell_frame({"x": [1.0, 2.0, 3.0], "y": list(np.arange(20.0)), "z": list(np.arange(15.0))})
    out = sdc.pivot_table(df, values="v", index="g", aggfunc="std")
    assert np.isnan(out.table.loc["x", "v"])
    assert out.table.loc["y", "v"] == pytest.approx(np.std(np.arange(20.0), ddof=1))
    assert out.table.loc["z", "v"] == pytest.approx(np.std(np.arange(15.0), ddof=1))
    np_out = sdc.pivot_table(df, values="v", index="g", aggfunc=np.std)
    assert np_out.table.loc["y", "v"] == pytest.approx(np.std(np.arange(20.0)))  # numpy: ddof=0


def test_checks_never_show_the_count_of_a_failing_cell() -> None:
    df = pd.DataFrame({"a": ["x"] * 3 + ["y"] * 20, "b": "p"})
    out = sdc.crosstab(df.a, df.b)
    text = " ".join(out.checks.detail) + " ".join(out.reasons)
    assert " 3 " not in f" {text} "
    assert "3 contributors" not in text


def test_checks_frame_has_the_documented_columns() -> None:
    df = pd.DataFrame({"a": list("xy") * 10, "b": ["p"] * 20})
    out = sdc.crosstab(df.a, df.b)
    assert list(out.checks.columns) == ["row", "column", "rule", "status", "detail"]
    assert set(out.checks.rule) <= set(rules.RULES)
