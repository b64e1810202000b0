"""Pooled counts as guaranteed intervals, and exactly pooled summaries.

The property test runs the project's own disclosure control (``sdc.crosstab``
with a random site policy) on generated data at several sites, pools the
released payloads, and checks that every pooled cell and margin contains the
truth and that each site's interval is at least as tight as the simple rules
(threshold, rounding, margin minus the other cells) give.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phds_tre import federate, sdc
from phds_tre.federate.pooling import PooledCounts
from phds_tre.sdc.rounding import round_counts

ROWS = ["a", "b", "c"]
COLS = ["w", "x", "y", "z"]


def site_data(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """One site's children: skewed categories so that some cells are small."""
    p_row = rng.dirichlet(np.ones(len(ROWS)) * 0.8)
    p_col = rng.dirichlet(np.ones(len(COLS)) * 0.8)
    return pd.DataFrame(
        {"group": rng.choice(ROWS, n, p=p_row), "band": rng.choice(COLS, n, p=p_col)}
    )


def truth_of(frames: list[pd.DataFrame]) -> pd.DataFrame:
    total = pd.DataFrame(0, index=[*ROWS, "All"], columns=[*COLS, "All"])
    for df in frames:
        t = pd.crosstab(df["group"], df["band"], margins=True)
        total = total.add(t.reindex(index=total.index, columns=total.columns, fill_value=0))
    return total


def released(df: pd.DataFrame, policy: sdc.Policy, margins: bool = True) -> dict[str, Any]:
    out = sdc.crosstab(df["group"], df["band"], margins=margins, policy=policy)
    return out.release_payload()


# ---- the simple rules, written out independently -----------------------------


def simple_published(x: float, policy: sdc.Policy) -> tuple[float, float]:
    """Counts that round to x and could pass the threshold (brute force)."""
    candidates = [
        v
        for v in range(0, int(x) + 10)
        if round_counts(np.array([float(v)]), policy.rounding)[0] == x
        and (v >= policy.min_count or (v == 0 and not policy.zeros_disclosive))
    ]
    assert candidates, f"published {x} cannot arise under {policy}"
    return float(min(candidates)), float(max(candidates))


def simple_bounds(payload: dict[str, Any], policy: sdc.Policy) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell [low, high] from the rules alone, then margin minus the others' lower bounds."""
    tab = payload["table"]
    data = np.array([[np.nan if v is None else v for v in row] for row in tab["data"]], float)
    primary = {
        (str(c["row"]), str(c["column"]))
        for c in payload["checks"]["not_pass"]
        if c["rule"] in ("threshold", "zeros") and c["status"] == "fail"
    }
    t, zeros = policy.min_count, policy.zeros_disclosive
    lo, hi = np.zeros(data.shape), np.zeros(data.shape)
    for i, r in enumerate(tab["index"]):
        for j, c in enumerate(tab["columns"]):
            x = data[i, j]
            if not np.isnan(x):
                lo[i, j], hi[i, j] = simple_published(x, policy)
            elif (str(r), str(c)) in primary:
                lo[i, j], hi[i, j] = (0 if zeros else 1), t - 1
            else:
                lo[i, j], hi[i, j] = (t if zeros else 0), math.inf
    has_margins = tab["index"][-1] == "All" and tab["columns"][-1] == "All"
    if has_margins:
        nr, nc = data.shape
        for i in range(nr):
            for j in range(nc):
                # a cell is its row's total minus the other cells of the row (and likewise columns)
                if i < nr - 1:
                    others = sum(lo[k, j] for k in range(nr - 1) if k != i)
                    hi[i, j] = min(hi[i, j], hi[nr - 1, j] - others)
                else:
                    hi[i, j] = min(hi[i, j], sum(hi[k, j] for k in range(nr - 1)))
                if j < nc - 1:
                    others = sum(lo[i, k] for k in range(nc - 1) if k != j)
                    hi[i, j] = min(hi[i, j], hi[i, nc - 1] - others)
    return lo, hi


policies = st.builds(
    sdc.Policy,
    min_count=st.integers(2, 10),
    zeros_disclosive=st.booleans(),
    rounding=st.sampled_from(["none", "base5", "midpoint6"]),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(1, 90), min_size=2, max_size=4),
    site_policies=st.lists(policies, min_size=4, max_size=4),
    margins=st.booleans(),
)
def test_pooled_intervals_contain_the_truth_and_are_tight(
    seed: int, sizes: list[int], site_policies: list[sdc.Policy], margins: bool
) -> None:
    rng = np.random.default_rng(seed)
    frames, payloads, pols = [], {}, {}
    for k, n in enumerate(sizes):
        df = site_data(rng, n)
        policy = site_policies[k]
        payload = released(df, policy, margins=margins)
        name = f"H{k}"
        if payload["status"] == "fail":
            # An unprotectable table is not a release: pooling refuses it.
            with pytest.raises(ValueError, match="failed its disclosure check"):
                federate.pool_counts({name: payload}, policies=policy, absent="zero")
            continue
        frames.append(df)
        payloads[name] = payload
        pols[name] = policy
    if not payloads:
        return
    pooled = federate.pool_counts(payloads, policies=pols, absent="zero")
    for sc, df in zip(pooled.site_tables, frames, strict=True):
        # Each site's interval is within the simple rules' and contains the site's truth.
        lo, hi = simple_bounds(payloads[sc.site], pols[sc.site])
        r, c = len(sc.rows), len(sc.columns)
        cells_lo = sc.low if margins else sc.low[:r, :c]
        cells_hi = sc.high if margins else sc.high[:r, :c]
        assert np.all(cells_lo >= lo) and np.all(cells_hi <= hi)
        own = pd.crosstab(df["group"], df["band"], margins=True)
        own = own.reindex(index=[*sc.rows, "All"], columns=[*sc.columns, "All"])
        assert np.all(sc.low <= own.to_numpy()) and np.all(own.to_numpy() <= sc.high)
    truth = truth_of(frames).reindex(index=pooled.low.index, columns=pooled.low.columns)
    assert np.all(pooled.low.to_numpy() <= truth.to_numpy())
    assert np.all(truth.to_numpy() <= pooled.high.to_numpy())
    # A cell published unrounded everywhere (or pinned by the margins) is exact and right.
    exact = pooled.exact
    known = exact.notna().to_numpy()
    assert np.array_equal(exact.to_numpy()[known], truth.to_numpy()[known])
    if all(p.rounding == "none" for p in pols.values()) and all(
        not any(v is None for row in p["table"]["data"] for v in row) for p in payloads.values()
    ):
        assert known.all()


# ---- unit tests --------------------------------------------------------------


def small_cell_frame() -> pd.DataFrame:
    """Two groups × two bands with one cell of 3 children; every other cell is large."""
    rows = [("a", "x")] * 40 + [("a", "y")] * 3 + [("b", "x")] * 30 + [("b", "y")] * 25
    return pd.DataFrame(rows, columns=["group", "band"])


def test_primary_cell_is_one_to_threshold_minus_one_without_margins() -> None:
    df = small_cell_frame()
    for zeros, low in ((True, 0.0), (False, 1.0)):
        policy = sdc.Policy(zeros_disclosive=zeros)
        pooled = federate.pool_counts(
            {"A": released(df, policy, margins=False)}, policies={"A": policy}
        )
        assert (pooled.low.loc["a", "y"], pooled.high.loc["a", "y"]) == (low, 9.0)
        assert pooled.exact.loc["a", "x"] == 40
        # Margins were not released: they are the sums of the cells' intervals.
        assert (pooled.low.loc["a", "All"], pooled.high.loc["a", "All"]) == (40 + low, 49.0)
        assert math.isnan(pooled.exact.loc["a", "All"])


def test_margins_bound_secondary_cells_and_the_pool_adds_sites() -> None:
    df = small_cell_frame()
    policy = sdc.Policy()
    payload = released(df, policy)
    assert payload["status"] == "review"
    pooled = federate.pool_counts({"A": payload, "B": payload}, policies=policy)
    # Every cell of the 2x2 is suppressed (a 2x2 can only be protected that way), the
    # margins are published: each cell is bounded by the margins, never a point guess.
    assert pooled.exact.loc["All", "All"] == 2 * len(df)
    for r in ("a", "b"):
        for c in ("x", "y"):
            lo, hi = pooled.low.loc[r, c], pooled.high.loc[r, c]
            assert lo < hi and math.isfinite(hi)
    one = federate.pool_counts({"A": payload}, policies=policy)
    assert pooled.low.equals(2 * one.low) and pooled.high.equals(2 * one.high)
    text = pooled.explain("a", "y")
    assert "A: [0, 9]" in text and "suppressed (under the threshold 10" in text
    frame = pooled.to_frame()
    assert frame.loc["All", "All"] == str(2 * len(df))
    assert "–" in frame.loc["a", "y"]
    long = pooled.to_frame(text=False)
    assert list(long.columns) == ["row", "column", "low", "high", "exact"]


def test_rounded_counts_become_the_counts_that_round_to_them() -> None:
    rng = np.random.default_rng(4)
    df = pd.DataFrame({"group": rng.choice(["a", "b"], 400), "band": rng.choice(["x", "y"], 400)})
    truth = pd.crosstab(df["group"], df["band"], margins=True)
    for rounding, width in (("base5", 4.0), ("midpoint6", 5.0)):
        policy = sdc.Policy(rounding=rounding)
        pooled = federate.pool_counts({"A": released(df, policy)}, policies=policy)
        widths = (pooled.high - pooled.low).to_numpy()
        assert np.all(widths <= width)
        assert np.all(pooled.low.to_numpy() <= truth.to_numpy())
        assert np.all(truth.to_numpy() <= pooled.high.to_numpy())
        assert "rounded" in pooled.explain("a", "x")


def test_tables_as_dataframes_with_nan_and_margins_are_solved_by_lp() -> None:
    table = pd.DataFrame(
        [[5.0, np.nan, 15.0], [10.0, 10.0, 20.0], [15.0, np.nan, 35.0]],
        index=["a", "b", "All"],
        columns=["x", "y", "All"],
    )
    policy = sdc.Policy(min_count=5, zeros_disclosive=False)
    pooled = federate.pool_counts({"A": table}, policies=policy)
    # The margins pin both suppressed cells: exact, not guessed.
    assert pooled.exact.loc["a", "y"] == 10 and pooled.exact.loc["All", "y"] == 20
    assert "LP" in pooled.explain("a", "y")
    with pytest.raises(ValueError, match="needs the rules it was released under"):
        federate.pool_counts({"A": table})


def test_policy_must_match_the_released_hash() -> None:
    df = small_cell_frame()
    payload = released(df, sdc.Policy(min_count=5))
    with pytest.raises(ValueError, match="no disclosure policy given"):
        federate.pool_counts({"A": payload})
    with pytest.raises(ValueError, match="was checked with policy sha256:"):
        federate.pool_counts({"A": payload}, policies=sdc.Policy(min_count=10))
    # The default policy is recognised by its hash without being passed.
    default = federate.pool_counts({"A": released(df, sdc.DEFAULT_POLICY)})
    assert isinstance(default, PooledCounts)


def test_other_outputs_and_tampered_payloads_are_refused() -> None:
    df = small_cell_frame().assign(los=np.arange(98.0))
    policy = sdc.DEFAULT_POLICY
    describe = sdc.describe(df[["los"]], policy=policy).release_payload()
    with pytest.raises(ValueError, match="not a table of counts"):
        federate.pool_counts({"A": describe})
    means = sdc.crosstab(df["group"], df["band"], values=df["los"], aggfunc="mean", policy=policy)
    with pytest.raises(ValueError, match="holds statistics other than counts"):
        federate.pool_counts({"A": means.release_payload()})
    payload = released(df, policy)
    failed = copy.deepcopy(payload) | {"status": "fail"}
    with pytest.raises(ValueError, match="failed its disclosure check"):
        federate.pool_counts({"A": failed})
    hidden = copy.deepcopy(payload)
    hidden["table"]["data"][2][2] = None  # a published margin blanked by someone
    with pytest.raises(ValueError, match="cannot tell suppressed cells from empty ones"):
        federate.pool_counts({"A": hidden})
    with pytest.raises(TypeError, match="expected a released payload"):
        federate.pool_counts({"A": [1, 2]})


def test_labels_missing_at_a_site_are_an_error_unless_zero() -> None:
    big = pd.DataFrame({"group": ["a"] * 30 + ["b"] * 30, "band": (["x"] * 15 + ["y"] * 15) * 2})
    only_a = big[big["group"] == "a"]
    policy = sdc.Policy(zeros_disclosive=False)
    tables = {"A": released(big, policy), "B": released(only_a, policy)}
    with pytest.raises(ValueError, match="site 'B' has no row 'b'"):
        federate.pool_counts(tables, policies=policy)
    pooled = federate.pool_counts(tables, policies=policy, absent="zero")
    assert pooled.exact.loc["b", "x"] == 15 and pooled.exact.loc["a", "x"] == 30
    assert "absent from the site's table" in pooled.explain("b", "x")


def test_value_counts_and_hist_payloads_pool() -> None:
    rng = np.random.default_rng(9)
    a = pd.Series(rng.choice(["u", "v", "w"], 80, p=[0.5, 0.45, 0.05]), name="ward")
    b = pd.Series(rng.choice(["u", "v", "w"], 60, p=[0.5, 0.4, 0.1]), name="ward")
    pol = sdc.DEFAULT_POLICY
    pooled = federate.pool_counts(
        {
            "A": sdc.value_counts(a, policy=pol).release_payload(),
            "B": sdc.value_counts(b, policy=pol).release_payload(),
        },
        absent="zero",
    )
    truth = a.value_counts().add(b.value_counts(), fill_value=0)
    for label, count in truth.items():
        assert pooled.low.loc[label, "count"] <= count <= pooled.high.loc[label, "count"]
    assert pooled.low.loc["All", "count"] <= 140 <= pooled.high.loc["All", "count"]
    assert pooled.high.loc["w", "count"] <= 18  # two suppressed counts of at most 9


# ---- pool_summary ------------------------------------------------------------


def test_pooled_mean_and_sd_equal_the_pooled_data() -> None:
    rng = np.random.default_rng(11)
    parts = [rng.normal(3.0 + k, 1.0 + k / 2, n) for k, n in enumerate([7, 40, 13, 120])]
    pooled_data = np.concatenate(parts)
    by_sd = {
        f"H{k}": {"n": len(x), "mean": float(x.mean()), "sd": float(x.std(ddof=1))}
        for k, x in enumerate(parts)
    }
    by_sums = {
        f"H{k}": {"n": len(x), "sum": float(x.sum()), "sumsq": float((x**2).sum())}
        for k, x in enumerate(parts)
    }
    for stats_ in (by_sd, by_sums):
        res = federate.pool_summary(stats_)
        assert res.n == len(pooled_data)
        assert res.mean == pytest.approx(pooled_data.mean(), rel=1e-12)
        assert res.sd == pytest.approx(pooled_data.std(ddof=1), rel=1e-12)
    assert not res.dropped


def test_pooled_proportion_with_wilson_interval() -> None:
    res = federate.pool_summary(
        {"A": {"n": 120, "events": 9}, "B": {"n": 80, "events": 4}, "C": {"n": 40, "events": None}}
    )
    n, e, z = 200, 13, 1.959963984540054
    p = e / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert (res.n, res.events, res.proportion) == (200, 13, 0.065)
    assert res.proportion_ci == pytest.approx((centre - half, centre + half), rel=1e-10)
    assert res.dropped == {"C": "events was suppressed"}
    assert "dropped C" in res.summary()


def test_describe_payloads_pool_and_suppressed_or_rounded_sites_are_dropped() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.gamma(2, 3, 60), rng.gamma(3, 2, 45)
    frames = [pd.DataFrame({"los": a}), pd.DataFrame({"los": b})]
    pol = sdc.DEFAULT_POLICY
    payloads: dict[str, Any] = {
        f"H{k}": sdc.describe(df, policy=pol).release_payload() for k, df in enumerate(frames)
    }
    rounded = sdc.Policy(rounding="base5")
    payloads["H2"] = sdc.describe(
        pd.DataFrame({"los": rng.gamma(2, 2, 33)}), policy=rounded
    ).release_payload()
    small = sdc.describe(pd.DataFrame({"los": rng.gamma(2, 2, 4)}), policy=pol).release_payload()
    payloads["H3"] = small
    res = federate.pool_summary(payloads, policies={"H2": rounded})
    both = np.concatenate([a, b])
    assert res.sites == ("H0", "H1")
    assert res.mean == pytest.approx(both.mean(), rel=1e-12)
    assert res.sd == pytest.approx(both.std(ddof=1), rel=1e-12)
    assert "rounded (base5)" in res.dropped["H2"]
    assert "suppressed" in res.dropped["H3"]
    with pytest.raises(ValueError, match="no disclosure policy given"):
        federate.pool_summary({"H2": payloads["H2"]})


def test_pool_summary_bad_input() -> None:
    with pytest.raises(ValueError, match="statistics need 'n'"):
        federate.pool_summary({"A": {"mean": 1.0, "sd": 1.0}})
    with pytest.raises(ValueError, match="events \\(5\\) exceed n \\(3\\)"):
        federate.pool_summary({"A": {"n": 3, "events": 5}})
    with pytest.raises(ValueError, match="no site has usable statistics"):
        federate.pool_summary({"A": {"n": None, "mean": 1.0, "sd": 1.0}})
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        federate.pool_summary({"A": {"n": 2.5, "mean": 1.0, "sd": 1.0}})
