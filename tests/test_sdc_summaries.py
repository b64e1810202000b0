"""sdc.value_counts, sdc.describe and sdc.hist: known answers, pandas/numpy agreement, re-checks."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from phds_tre import sdc
from phds_tre.sdc import MIME_TYPE, Policy, recheck
from phds_tre.sdc.summaries import HistogramOutput, ValueCountsOutput, bin_labels, nice_edges


def _policy(**settings: Any) -> Policy:
    """A site policy differing from the defaults in ``settings``."""
    return Policy.model_validate(settings)


# min/max allowed: the site lists only the other single-value statistics.
PERMISSIVE = _policy(single_value_statistics=("mode", "first", "last"))


def _json(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as the checker receives it: strict JSON, parsed back."""
    return json.loads(json.dumps(payload, allow_nan=False))


def _not_pass(out: sdc.SDCOutput) -> pd.DataFrame:
    checks = out.checks
    return checks[checks["status"] != "pass"]


# ---- value_counts ---------------------------------------------------------------


def test_value_counts_threshold_boundary_10_passes_9_fails() -> None:
    s = pd.Series(["a"] * 10 + ["b"] * 9 + ["c"] * 12, name="dx")
    out = sdc.value_counts(s)
    assert isinstance(out, ValueCountsOutput)
    table = out.table
    assert table.name == "count" and table.index.name == "dx"
    assert list(table.index) == ["c", "a", "b"]  # suppressed entry listed last
    assert table["c"] == 12 and table["a"] == 10 and np.isnan(table["b"])
    bad = _not_pass(out)
    assert list(bad["row"]) == ["b"] and list(bad["rule"]) == ["threshold"]
    assert list(bad["status"]) == ["fail"]
    assert out.status == out.policy.suppressed_verdict == "review"
    assert bool(out.suppressed["b"]) and not out.suppressed["a"]


def test_value_counts_all_at_least_min_count_passes_and_matches_pandas() -> None:
    rng = np.random.default_rng(7)
    # Ties on purpose: pandas lists equal counts in first-appearance order.
    values = np.repeat(list("qwertyuiop"), [30, 12, 30, 12, 50, 10, 10, 30, 44, 12])
    s = pd.Series(rng.permutation(values), name="ward")
    for sort in (True, False):
        out = sdc.value_counts(s, sort=sort)
        assert out.status == "pass"
        pd.testing.assert_series_equal(out.table, s.value_counts(sort=sort), check_index_type=False)


def test_value_counts_numbers_and_unnamed_values_match_pandas() -> None:
    data = [3] * 11 + [1] * 20 + [2] * 11
    out = sdc.value_counts(np.array(data))
    pd.testing.assert_series_equal(
        out.table, pd.Series(data).value_counts(), check_index_type=False
    )


def test_value_counts_zeros_cannot_appear_from_observed_values() -> None:
    out = sdc.value_counts(pd.Series(["x"] * 15 + ["y"] * 3))
    assert "zeros" not in set(out.checks["rule"])


def test_value_counts_unobserved_category_follows_the_zeros_rule() -> None:
    s = pd.Series(pd.Categorical(["a"] * 12, categories=["a", "rare"]))
    out = sdc.value_counts(s)
    assert np.isnan(out.table["rare"]) and out.table["a"] == 12
    assert _not_pass(out)["rule"].tolist() == ["zeros"]
    lenient = sdc.value_counts(s, policy=_policy(zeros_disclosive=False))
    assert lenient.status == "pass"
    expected = s.value_counts()
    assert lenient.table.tolist() == expected.tolist() == [12, 0]
    assert list(lenient.table.index) == list(expected.index)


def test_value_counts_dropna_false_checks_the_missing_entry() -> None:
    s = pd.Series([1.0] * 12 + [np.nan] * 4 + [2.0] * 10)
    out = sdc.value_counts(s, dropna=False)
    expected = s.value_counts(dropna=False)
    assert out.table.iloc[:2].tolist() == expected.iloc[:2].tolist()
    assert np.isnan(out.table.index[-1]) and np.isnan(out.table.iloc[-1])
    assert sdc.value_counts(s).table.tolist() == [12, 10]  # dropna=True: left out, like pandas


def test_value_counts_rounding_applies_to_counts() -> None:
    s = pd.Series(["a"] * 12 + ["b"] * 18)
    out = sdc.value_counts(s, policy=_policy(rounding="base5"))
    assert out.table.to_dict() == {"b": 20, "a": 10}


def test_value_counts_normalize_matches_pandas_when_nothing_is_suppressed() -> None:
    s = pd.Series(["a"] * 30 + ["b"] * 12 + ["c"] * 18, name="sex")
    out = sdc.value_counts(s, normalize=True)
    assert out.status == "pass"
    pd.testing.assert_series_equal(
        out.table, s.value_counts(normalize=True), check_index_type=False
    )


def test_value_counts_normalize_protects_suppressed_proportions_from_the_total() -> None:
    # One small entry: with proportions summing to 1 it would be 1 - the others.
    s = pd.Series(["a"] * 80 + ["b"] * 59 + ["c"] * 43 + ["d"] * 11 + ["e"] * 7)
    out = sdc.value_counts(s, normalize=True)
    table = out.table
    assert table.name == "proportion"
    assert table.isna().sum() >= 2
    assert np.isnan(table["e"])
    shown = table.dropna()
    expected = s.value_counts(normalize=True)
    np.testing.assert_allclose(shown.to_numpy(), expected[shown.index].to_numpy())
    assert "secondary" in set(out.checks["rule"])
    audit = out.audit()  # what the published proportions and their total allow to infer
    assert set(audit["row"]) == {"d", "e"} and audit["protected"].all()
    assert (audit["width"] >= out.policy.min_count).all()
    assert list(table.index[-2:]) == ["d", "e"]  # suppressed last, in first-appearance order
    # Without normalize there is no total, so no secondary suppression.
    counts = sdc.value_counts(s).table
    assert counts.isna().sum() == 1 and counts["d"] == 11


def test_value_counts_suppressed_order_does_not_follow_counts() -> None:
    # 'y' (2) appears before 'x' (5): listed in that order, not by size.
    s = pd.Series(["z"] * 20 + ["y"] * 2 + ["x"] * 5)
    out = sdc.value_counts(s)
    assert list(out.table.index) == ["z", "y", "x"]
    assert list(_not_pass(out)["row"]) == ["y", "x"]


def test_value_counts_refuses_a_dataframe() -> None:
    with pytest.raises(TypeError):
        sdc.value_counts(pd.DataFrame({"a": [1]}))


@pytest.mark.parametrize("normalize", [False, True])
def test_value_counts_payload_round_trip(normalize: bool) -> None:
    s = pd.Series(["a"] * 30 + ["b"] * 3 + ["c"] * 25 + ["d"] * 14, name="dx")
    out = sdc.value_counts(s, normalize=normalize)
    bundle = out._repr_mimebundle_()
    result = recheck(bundle[MIME_TYPE], out.policy)
    assert result.status == out.status
    assert result.output is not None and result.output.kind == "value_counts"
    rebuilt = result.output.table
    assert isinstance(rebuilt, pd.Series)
    assert rebuilt.name == out.table.name
    np.testing.assert_array_equal(rebuilt.to_numpy(), out.table.to_numpy())
    assert list(rebuilt.index) == list(out.table.index)


def test_value_counts_forged_pass_is_not_trusted() -> None:
    s = pd.Series(["a"] * 30 + ["b"] * 3, name="dx")
    out = sdc.value_counts(s)
    payload = _json(out.to_payload())
    payload["status"] = "pass"
    payload["reasons"] = ["every cell passed every rule"]
    payload["table"]["data"] = [[30.0], [3.0]]  # the small count "published"
    payload["checks"]["not_pass"] = []
    result = recheck(payload, out.policy)
    assert result.status != "pass" and result.status == out.status
    assert result.claimed_status == "pass" and result.notes
    assert result.output is not None and np.isnan(result.output.table["b"])
    # Raising the small count in the evidence breaks its margins: not re-checkable.
    forged = copy.deepcopy(payload)
    block = forged["evidence"]["blocks"][0]
    for key in ("n_rows", "n", "values"):
        block[key][1][0] = 10.0
    assert recheck(forged, out.policy).status == "fail"
    # A stricter site policy re-decides: the kernel's policy is not the site's.
    strict = recheck(payload, _policy(min_count=31))
    assert strict.output is not None and strict.output.table.isna().all()


# ---- describe -----------------------------------------------------------------


def _frame(n: int = 50, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(9.0, 3.0, n).clip(0.1),
            "weight": rng.gamma(4.0, 6.0, n),
            "ward": rng.choice(["a", "b"], n),  # not numeric: left out, as pandas does
            "icu": rng.random(n) < 0.3,  # bool: left out, as pandas does
        }
    )


def test_describe_matches_pandas_when_min_max_are_allowed() -> None:
    df = _frame()
    out = sdc.describe(df, policy=PERMISSIVE)
    assert out.status == "pass"
    expected = df.describe()
    table = out.table
    assert list(table.index) == list(expected.index)
    assert list(table.columns) == list(expected.columns) == ["age", "weight"]
    np.testing.assert_allclose(table.to_numpy(), expected.to_numpy(), rtol=1e-12)


def test_describe_min_max_fail_by_default_even_over_many_children() -> None:
    # ACRO 1.0.2 passed max/min for n >= 10: here they are one child's value, whatever n.
    df = _frame(n=200)
    out = sdc.describe(df)
    table = out.table
    assert table.loc[["min", "max"]].isna().all().all()
    rest = table.drop(index=["min", "max"])
    np.testing.assert_allclose(rest.to_numpy(), df.describe().drop(index=["min", "max"]).to_numpy())
    bad = _not_pass(out)
    assert set(bad["row"]) == {"min", "max"}
    assert set(bad["rule"]) == {"single_value"} and set(bad["status"]) == {"fail"}
    assert set(bad["column"]) == {"age", "weight"}
    assert out.status == "review"


def test_describe_checks_are_labelled_by_statistic_and_column() -> None:
    out = sdc.describe(_frame())
    pairs = set(zip(out.checks["row"], out.checks["column"], strict=True))
    assert pairs == {(r, c) for r in out.table.index for c in out.table.columns}


@pytest.mark.parametrize(("n", "published"), [(9, False), (10, True)])
def test_describe_threshold_boundary(n: int, published: bool) -> None:
    df = pd.DataFrame({"x": np.arange(1.0, n + 1)})
    out = sdc.describe(df, policy=PERMISSIVE)
    assert out.table["x"].notna().all() == published
    assert out.table["x"].isna().all() == (not published)
    if published:
        assert out.status == "pass" and out.table.loc["count", "x"] == 10
    else:
        assert set(_not_pass(out)["rule"]) == {"threshold"}


def test_describe_missing_values_go_to_review() -> None:
    df = _frame()
    df.loc[[1, 5], "age"] = np.nan
    out = sdc.describe(df, policy=PERMISSIVE)
    assert out.status == "review"
    missing = out.checks[out.checks["rule"] == "missing"]
    assert set(missing["column"]) == {"age"} and set(missing["status"]) == {"review"}
    np.testing.assert_allclose(out.table.to_numpy(), df.describe().to_numpy(), rtol=1e-12)


def test_describe_dominated_mean_is_suppressed() -> None:
    df = pd.DataFrame({"cost": [1.0] * 14 + [10_000.0]})
    out = sdc.describe(df, policy=PERMISSIVE)
    assert np.isnan(out.table.loc["mean", "cost"]) and np.isnan(out.table.loc["std", "cost"])
    assert out.table.loc["count", "cost"] == 15
    rules = set(_not_pass(out)["rule"])
    assert {"nk", "p_percent"} <= rules


def test_describe_median_follows_the_policy() -> None:
    df = _frame(n=15)
    assert sdc.describe(df, policy=PERMISSIVE).table.loc["50%"].notna().all()
    listed = _policy(single_value_statistics=("median", "mode", "first", "last"))
    assert sdc.describe(df, policy=listed).table.loc["50%"].isna().all()
    assert sdc.describe(df, policy=_policy(median_min_count=16)).table.loc["50%"].isna().all()
    assert sdc.describe(df, policy=_policy(median_min_count=15)).table.loc["50%"].notna().all()


def test_describe_quartiles_follow_the_median_rule() -> None:
    df = _frame(n=15)
    listed = _policy(single_value_statistics=("median", "mode", "first", "last"))
    assert sdc.describe(df, policy=listed).table.loc[["25%", "75%"]].isna().all().all()
    few = _policy(median_min_count=16)
    assert sdc.describe(df, policy=few).table.loc[["25%", "75%"]].isna().all().all()


def test_describe_series_int_labels_and_refusals() -> None:
    s = pd.Series(np.arange(20.0), name="los")
    out = sdc.describe(s, policy=PERMISSIVE)
    np.testing.assert_allclose(out.table.to_numpy(), s.to_frame().describe().to_numpy())
    df = pd.DataFrame({0: np.arange(12.0), 1: np.arange(12.0) ** 2})
    assert list(sdc.describe(df, policy=PERMISSIVE).table.columns) == [0, 1]
    with pytest.raises(ValueError, match="value_counts"):
        sdc.describe(pd.DataFrame({"ward": ["a", "b"]}))


def test_describe_payload_round_trip() -> None:
    df = _frame()
    df.loc[3, "weight"] = np.nan
    for policy in (sdc.DEFAULT_POLICY, PERMISSIVE):
        out = sdc.describe(df, policy=policy)
        result = recheck(_json(out.to_payload()), policy)
        assert result.status == out.status
        assert result.output is not None
        pd.testing.assert_frame_equal(result.output.table, out.table)
    # The site's policy decides: min/max allowed in the kernel, not at the site.
    out = sdc.describe(df, policy=PERMISSIVE)
    at_site = recheck(_json(out.to_payload()), sdc.DEFAULT_POLICY)
    assert at_site.output is not None
    assert at_site.output.table.loc[["min", "max"]].isna().all().all()


def test_describe_forged_small_column_claiming_pass_is_not_trusted() -> None:
    df = pd.DataFrame({"x": np.arange(1.0, 6.0)})  # 5 children
    out = sdc.describe(df, policy=PERMISSIVE)
    payload = _json(out.to_payload())
    payload["status"] = "pass"
    result = recheck(payload, PERMISSIVE)
    assert result.status == out.status != "pass"
    assert result.output is not None and result.output.table.isna().all().all()
    # Dropping blocks (so no failing cell is left to check) does not re-check.
    payload["evidence"]["blocks"] = payload["evidence"]["blocks"][:1]
    assert recheck(payload, PERMISSIVE).status == "fail"


def test_quartiles_in_the_statistics_registry() -> None:
    from phds_tre.sdc.statistics import STATISTICS

    for key in ("q25", "q75"):
        stat = STATISTICS[key]
        assert stat.order and stat.magnitude and not stat.additive


# ---- hist -----------------------------------------------------------------------


def test_hist_counts_a_value_on_the_top_edge() -> None:
    # ACRO 1.0.2 dropped values equal to the last edge; numpy's last bin is closed.
    values = np.array([0.0] * 10 + [5.0] * 10 + [10.0] * 10)
    out = sdc.hist(values, bins=2, range=(0, 10))
    assert list(out.table.index) == ["[0, 5)", "[5, 10]"]
    assert out.table.tolist() == [10, 20]
    assert out.table.tolist() == np.histogram(values, bins=2, range=(0, 10))[0].tolist()
    assert out.status == "pass"


@pytest.mark.parametrize(("n", "passes"), [(9, False), (10, True)])
def test_hist_bin_threshold_boundary(n: int, passes: bool) -> None:
    values = np.r_[np.full(20, 1.0), np.full(n, 3.0)]
    out = sdc.hist(values, bins=[0, 2, 4])
    assert out.table.iloc[0] == 20
    assert np.isnan(out.table.iloc[1]) != passes
    assert out.status == ("pass" if passes else "review")


def test_hist_empty_bins_follow_the_zeros_rule() -> None:
    values = np.r_[np.full(12, 0.5), np.full(12, 2.5)]
    out = sdc.hist(values, bins=[0, 1, 2, 3])
    assert np.isnan(out.table.iloc[1])
    assert _not_pass(out)["rule"].tolist() == ["zeros"]
    lenient = sdc.hist(values, bins=[0, 1, 2, 3], policy=_policy(zeros_disclosive=False))
    assert lenient.table.tolist() == [12, 0, 12] and lenient.status == "pass"


def test_hist_agrees_with_numpy_on_explicit_bins_and_range() -> None:
    rng = np.random.default_rng(11)
    values = np.r_[rng.integers(0, 21, 3000).astype(float), rng.normal(10, 4, 3000)]
    lenient = _policy(min_count=1, zeros_disclosive=False)
    cases: list[tuple[Any, Any]] = [
        (7, (0.0, 20.0)),
        (13, (-3.5, 17.25)),
        ([0, 1, 2.5, 10, 20], None),
    ]
    for bins, range_ in cases:
        # Values exactly on every edge, and outside the range (left out, as numpy does).
        on_edges = np.histogram_bin_edges(values, bins=bins, range=range_)
        values = np.r_[values, on_edges, on_edges[0] - 1, on_edges[-1] + 1]
        out = sdc.hist(values, bins=bins, range=range_, policy=lenient)
        counts, edges = np.histogram(values, bins=bins, range=range_)
        np.testing.assert_array_equal(out.edges, edges)
        assert out.table.tolist() == counts.tolist()
        assert list(out.table.index) == bin_labels(edges)


def test_hist_default_edges_are_nice_and_hide_the_exact_min_and_max() -> None:
    rng = np.random.default_rng(5)
    values = rng.normal(37.2, 0.6, 400)  # temperatures
    out = sdc.hist(values, policy=_policy(min_count=1, zeros_disclosive=False))
    edges = out.edges
    assert edges[0] <= values.min() and edges[-1] >= values.max()
    assert values.min() not in edges and values.max() not in edges
    assert 2 <= len(edges) - 1 <= 10
    width = edges[1] - edges[0]
    np.testing.assert_allclose(np.diff(edges), width)
    mantissa = width / 10 ** np.floor(np.log10(width))
    assert any(np.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
    np.testing.assert_allclose(edges / width, np.round(edges / width), atol=1e-9)
    assert out.table.tolist() == np.histogram(values, edges)[0].tolist()
    assert out.evidence()["extra"]["nice_edges"] is True


@pytest.mark.parametrize(
    ("lo", "hi", "bins"),
    [
        (3.94, 16.06, 10),
        (3.7, 51.0, 10),
        (-1.0, 1.0, 1),
        (0.001234, 0.0019, 10),
        (-7.3, -2.1, 4),
        (5.0, 5.0, 10),
        (1e6, 1e6 + 3, 5),
        (0.0, 1.0, 10),
    ],
)
def test_nice_edges_cover_the_range_in_at_most_bins(lo: float, hi: float, bins: int) -> None:
    edges = nice_edges(lo, hi, bins)
    assert edges[0] <= lo and edges[-1] >= hi
    assert 1 <= len(edges) - 1 <= bins
    assert np.all(np.diff(edges) > 0)
    assert len(set(bin_labels(edges))) == len(edges) - 1


def test_hist_leaves_out_missing_values_and_refuses_estimators() -> None:
    values = pd.Series([1.0] * 10 + [np.nan] * 3 + [2.0] * 10, name="crp")
    out = sdc.hist(values, bins=[0, 1.5, 3])
    assert out.table.tolist() == [10, 10] and out.table.index.name == "crp"
    with pytest.raises(ValueError, match="estimators"):
        sdc.hist(values, bins="auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sdc.hist(values, bins=[0, 2, 1])
    with pytest.raises(ValueError, match="infinity"):
        sdc.hist([1.0, np.inf])


def _bars_and_bands(out: HistogramOutput) -> tuple[list[Any], list[Any]]:
    ax = out.figure.axes[0]
    bars = list(ax.containers[0]) if ax.containers else []
    bands = [p for p in ax.patches if p.get_gid() == "phds-suppressed"]
    assert len(bars) + len(bands) == len(ax.patches)  # nothing else drawn
    return bars, bands


def test_hist_figure_has_no_bar_for_suppressed_bins() -> None:
    values = np.r_[np.full(25, 0.5), np.full(4, 1.5), np.full(12, 2.5), np.full(7, 3.5)]
    out = sdc.hist(values, bins=[0, 1, 2, 3, 4])
    assert out.table.isna().tolist() == [False, True, False, True]
    bars, bands = _bars_and_bands(out)
    assert sorted(b.get_x() for b in bars) == [0.0, 2.0]
    assert sorted(b.get_height() for b in bars) == [12.0, 25.0]
    assert all(b.get_height() not in (4.0, 7.0) for b in [*bars, *bands])
    # Suppressed: empty, hatched, the axes' full height (axes coordinates), never a count.
    assert sorted(p.get_x() for p in bands) == [1.0, 3.0]
    for band in bands:
        assert not band.get_fill() and band.get_hatch()
        assert (band.get_y(), band.get_height()) == (0.0, 1.0)
    texts = [t.get_text() for t in out.figure.axes[0].texts]
    assert texts == ["suppressed", "suppressed"]
    assert max(out.figure.axes[0].get_ylim()) < 4 * 25  # scaled to released bars only


def test_hist_draws_on_a_given_axes() -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    out = sdc.hist(np.r_[np.full(12, 1.0), np.full(3, 3.0)], bins=[0, 2, 4], ax=ax)
    assert out.figure is fig
    assert len(ax.containers[0]) == 1 and ax.containers[0][0].get_height() == 12


def test_hist_display_carries_the_figure_inside_html_only() -> None:
    out = sdc.hist(np.r_[np.full(12, 1.0), np.full(3, 3.0)], bins=[0, 2, 4])
    bundle = out._repr_mimebundle_()
    assert set(bundle) == {MIME_TYPE, "text/html", "text/plain"}
    html = bundle["text/html"]
    marker = 'src="data:image/png;base64,'
    assert marker in html
    encoded = html.split(marker, 1)[1].split('"', 1)[0]
    assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")
    assert "suppressed" in html


def test_hist_payload_round_trip_redraws_from_rechecked_counts() -> None:
    values = np.r_[np.full(25, 0.5), np.full(4, 1.5), np.full(12, 2.5)]
    out = sdc.hist(pd.Series(values, name="los"), bins=[0, 1, 2, 3])
    result = recheck(_json(out.to_payload()), out.policy)
    assert result.status == out.status == "review"
    rebuilt = result.output
    assert isinstance(rebuilt, HistogramOutput)
    pd.testing.assert_series_equal(rebuilt.table, out.table)
    np.testing.assert_array_equal(rebuilt.edges, out.edges)
    bars, bands = _bars_and_bands(rebuilt)
    assert len(bars) == 2 and len(bands) == 1
    assert "data:image/png;base64," in rebuilt._repr_html_()


def test_hist_forged_payloads_are_not_trusted() -> None:
    values = np.r_[np.full(25, 0.5), np.full(4, 1.5)]
    out = sdc.hist(values, bins=[0, 1, 2])
    payload = _json(out.to_payload())
    payload["status"] = "pass"
    payload["table"]["data"] = [[25.0], [4.0]]
    result = recheck(payload, out.policy)
    assert result.status == "review" and result.claimed_status == "pass"
    assert result.output is not None and np.isnan(result.output.table.iloc[1])
    # Edges that do not match the bin labels.
    bad_edges = copy.deepcopy(payload)
    bad_edges["evidence"]["extra"]["edges"] = [0.0, 1.0, 3.0]
    assert recheck(bad_edges, out.policy).status == "fail"
    # Histogram evidence with a second block (e.g. sums) is not a histogram.
    two_blocks = copy.deepcopy(payload)
    two_blocks["evidence"]["blocks"].append(two_blocks["evidence"]["blocks"][0])
    assert recheck(two_blocks, out.policy).status == "fail"


def test_empty_bins_and_categories_survive_the_recheck() -> None:
    # An empty cell is a published zero (or suppressed by the zeros rule) on both sides.
    for policy in (sdc.DEFAULT_POLICY, _policy(zeros_disclosive=False)):
        outs: list[sdc.SDCOutput] = [
            sdc.hist(np.r_[np.full(12, 0.5), np.full(12, 2.5)], bins=[0, 1, 2, 3], policy=policy),
            sdc.value_counts(
                pd.Series(pd.Categorical(["a"] * 12, categories=["a", "rare"])), policy=policy
            ),
        ]
        for out in outs:
            result = recheck(_json(out.to_payload()), policy)
            assert result.status == out.status, result.reasons
            assert result.output is not None
            pd.testing.assert_series_equal(result.output.table, out.table, check_index_type=False)
