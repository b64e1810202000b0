"""Checked Kaplan–Meier tables: risk-set truncation, the event and censoring
accumulation rule, agreement with statsmodels' SurvfuncRight, the default time
grid, and the payload round trip through ``recheck`` (forged payloads included)."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest
from statsmodels.duration.survfunc import SurvfuncRight

from phds_tre import sdc
from phds_tre.sdc.output import CHECK_COLUMNS
from phds_tre.sdc.rules import RULES
from phds_tre.sdc.survival import TABLE_COLUMNS, SurvivalOutput, default_times

POLICY = sdc.Policy()  # min_count 10


def _data(blocks: list[tuple[int, float, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Durations and events from (count, duration, event) blocks."""
    t = np.concatenate([np.full(n, d, dtype=float) for n, d, _ in blocks])
    e = np.concatenate([np.full(n, ev, dtype=int) for n, _, ev in blocks])
    return t, e


def _payload(out: sdc.SDCOutput) -> dict[str, Any]:
    return out._repr_mimebundle_()[sdc.MIME_TYPE]


def _random(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    rng = np.random.default_rng(seed)
    t = np.round(rng.exponential(400, n)).clip(1)
    c = np.round(rng.uniform(30, 1200, n))
    groups = pd.Series(rng.choice(["cardiac", "sepsis"], n), name="cohort")
    return np.minimum(t, c), (t <= c).astype(int), groups


# ---------------------------------------------------------------------------
# risk-set truncation
# ---------------------------------------------------------------------------
def test_at_risk_10_passes_and_9_truncates_the_curve() -> None:
    # 20 children: 10 events by t=10, one more by t=20, 9 censored at 50.
    t, e = _data([(10, 5.0, 1), (1, 15.0, 1), (9, 50.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20, 30], policy=POLICY)
    table = out.table
    assert list(table.index) == [0.0, 10.0, 20.0, 30.0]
    assert table.loc[10.0, "at_risk"] == 10  # 10 still at risk: passes
    assert table.loc[10.0, "events"] == 10
    assert table.loc[10.0, "survival"] == pytest.approx(0.5)
    assert table.loc[[20.0, 30.0]].isna().all().all()  # 9 at risk: truncated from here on
    at_risk = out.checks[out.checks["column"] == "at_risk"]
    assert list(at_risk["status"]) == ["pass", "pass", "fail", "fail"]
    assert out.status == "review"  # suppression applied: the site's default verdict
    assert any("truncated" in r for r in out.reasons)


def test_once_truncated_every_later_row_is_suppressed() -> None:
    t, e = _data([(15, 5.0, 1), (9, 50.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20, 30, 40], policy=POLICY)
    assert out.suppressed.tolist() == [False, True, True, True, True]
    fails = out.checks[(out.checks["column"] == "at_risk") & (out.checks["status"] == "fail")]
    assert len(fails) == 4
    # No event/censoring checks are made on rows already lost to truncation.
    assert set(out.checks.loc[out.checks["row"] == 40.0, "column"]) == {"at_risk"}


def test_a_small_group_is_suppressed_whole() -> None:
    t, e = _data([(30, 5.0, 1), (30, 50.0, 0), (4, 5.0, 1), (5, 50.0, 0)])
    groups = np.array(["big"] * 60 + ["rare"] * 9)
    out = sdc.survival(t, e, groups=groups, times=[0, 10, 20], policy=POLICY)
    assert out.table.loc["rare"].isna().all().all()
    assert not out.table.loc["big"].isna().any().any()


# ---------------------------------------------------------------------------
# event and censoring accumulation
# ---------------------------------------------------------------------------
def test_events_accumulate_until_zero_or_min_count() -> None:
    t, e = _data([(5, 5.0, 1), (6, 15.0, 1), (10, 25.0, 1), (9, 35.0, 1), (30, 100.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20, 30, 40], policy=POLICY)
    table = out.table
    assert out.suppressed.tolist() == [False, True, False, False, True]
    assert table.loc[0.0, "events"] == 0  # zero events: publishable
    assert table.loc[20.0, "events"] == 11  # 5 carried from the suppressed row + 6
    assert table.loc[30.0, "events"] == 10  # exactly min_count passes
    assert np.isnan(table.loc[40.0, "events"])  # 9 fails
    # Between published rows the counts add up exactly: nothing to difference.
    assert (
        table.loc[0.0, "at_risk"] - table.loc[20.0, "events"] - table.loc[20.0, "censored"]
        == table.loc[20.0, "at_risk"]
    )
    ev_checks = out.checks[out.checks["column"] == "events"]
    assert list(ev_checks["status"]) == ["pass", "fail", "pass", "pass", "fail"]


def test_a_suppressed_drop_is_hidden_in_the_survival_too() -> None:
    t, e = _data([(5, 5.0, 1), (6, 15.0, 1), (40, 100.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20], policy=POLICY)
    assert np.isnan(out.table.loc[10.0, "survival"])  # would reveal 5 events out of 51
    assert out.table.loc[20.0, "survival"] == pytest.approx(40 / 51)


def test_censorings_follow_the_same_rule() -> None:
    t, e = _data([(3, 5.0, 0), (7, 15.0, 0), (9, 25.0, 0), (30, 100.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20, 30], policy=POLICY)
    assert out.suppressed.tolist() == [False, True, False, True]
    assert out.table.loc[20.0, "censored"] == 10
    cens = out.checks[out.checks["column"] == "censored"]
    assert list(cens["status"]) == ["pass", "fail", "pass", "fail"]
    assert any("censorings" in r for r in out.reasons)


def test_nothing_suppressed_passes() -> None:
    t, e = _data([(10, 5.0, 1), (10, 15.0, 0), (30, 100.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20], policy=POLICY)
    assert out.status == "pass"
    assert out.reasons == ["every row passed every rule"]


def test_site_may_release_suppressed_tables_without_review() -> None:
    t, e = _data([(5, 5.0, 1), (6, 15.0, 1), (40, 100.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20], policy=sdc.Policy(suppressed_verdict="pass"))
    assert out.status == "pass"
    assert out.suppressed.any()


def test_rounding_applies_to_published_counts() -> None:
    t, e = _data([(11, 5.0, 1), (12, 15.0, 0), (31, 100.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20], policy=sdc.Policy(rounding="base5"))
    counts = out.table[["at_risk", "events", "censored"]].to_numpy()
    assert np.all(counts % 5 == 0)
    assert out.table.loc[10.0, "events"] == 10  # 11 → 10
    assert any("rounded" in r for r in out.reasons)


# ---------------------------------------------------------------------------
# agreement with statsmodels
# ---------------------------------------------------------------------------
def _step(sf: SurvfuncRight, at: float) -> float:
    pos = np.searchsorted(sf.surv_times, at, side="right") - 1
    return 1.0 if pos < 0 else float(sf.surv_prob[pos])


def test_published_survival_equals_survfuncright() -> None:
    t, e, groups = _random()
    out = sdc.survival(t, e, groups=groups, policy=POLICY)
    checked = 0
    for label in groups.unique():
        sel = (groups == label).to_numpy()
        sf = SurvfuncRight(t[sel], e[sel])
        part = out.table.loc[label]
        for time, row in part.iterrows():
            if np.isnan(row["survival"]):
                continue
            assert row["survival"] == pytest.approx(_step(sf, float(time)), rel=1e-12)
            assert row["at_risk"] == int((t[sel] > float(time)).sum())
            assert row["ci_lower"] <= row["survival"] <= row["ci_upper"]
            checked += 1
    assert checked >= 4


def test_ungrouped_survival_equals_survfuncright_at_given_times() -> None:
    t, e, _ = _random(seed=3)
    times = [0, 30, 90, 180, 365]
    out = sdc.survival(t, e, times=times, policy=POLICY)
    sf = SurvfuncRight(t, e)
    for time in times:
        got = out.table.loc[float(time), "survival"]
        if not np.isnan(got):
            assert got == pytest.approx(_step(sf, time), rel=1e-12)


def test_acro_defect_km_dof_zero_is_replaced_by_real_risk_set_checks() -> None:
    """ACRO 1.0.2 reported dof=0 for every Kaplan–Meier output, which checks nothing.

    Ours emits no dof rule at all; instead every row carries a risk-set
    threshold check, and rows that fail it are actually suppressed.
    """
    t, e, groups = _random()
    out = sdc.survival(t, e, groups=groups, policy=POLICY)
    checks = out.checks
    assert "dof" not in set(checks["rule"])
    at_risk = checks[checks["column"] == "at_risk"]
    assert list(at_risk["row"]) == list(out.table.index)  # one risk-set check per row
    assert set(at_risk["rule"]) == {"threshold"}
    failing = at_risk[at_risk["status"] == "fail"]
    assert len(failing) > 0  # the tail of every curve runs out of children
    assert out.table.loc[list(failing["row"])].isna().all().all()


# ---------------------------------------------------------------------------
# the default grid
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("top", [0.4, 1.0, 7.0, 10.0, 99.0, 100.0, 365.0, 400.0, 1826.0, 9999.0])
def test_default_grid_is_round_and_ends_strictly_past_the_maximum(top: float) -> None:
    grid = default_times(top)
    assert grid[0] == 0.0
    assert grid[-1] > top  # the largest duration itself is never a grid time
    assert 3 <= len(grid) <= 10
    step = grid[1]
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert round(mantissa, 9) in {1.0, 2.0, 2.5, 5.0}
    assert np.allclose(np.diff(grid), step)
    assert grid[-2] <= top  # one step past the maximum, no more


def test_default_grid_does_not_move_with_the_exact_maximum() -> None:
    assert default_times(361.0) == default_times(399.0) == default_times(398.5)


def test_survival_uses_the_default_grid_of_all_groups_together() -> None:
    t, e, groups = _random()
    out = sdc.survival(t, e, groups=groups, policy=POLICY)
    grid = default_times(float(t.max()))
    assert out.table.index.names == ["cohort", "time"]
    for label in ("cardiac", "sepsis"):
        assert list(out.table.loc[label].index) == grid


# ---------------------------------------------------------------------------
# inputs and shape
# ---------------------------------------------------------------------------
def test_rows_with_missing_values_are_left_out() -> None:
    t, e = _data([(10, 5.0, 1), (10, 15.0, 0), (30, 100.0, 0)])
    t = np.append(t, [np.nan, 3.0])
    e = np.append(e.astype(float), [1.0, np.nan])
    out = sdc.survival(t, e, times=[0, 10, 20], policy=POLICY)
    assert out.table.loc[0.0, "at_risk"] == 50


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="0/1"):
        sdc.survival([1.0, 2.0], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        sdc.survival([-1.0, 2.0], [1, 0])
    with pytest.raises(ValueError, match="same length"):
        sdc.survival([1.0, 2.0], [1])
    with pytest.raises(ValueError, match="times"):
        sdc.survival([1.0, 2.0], [1, 0], times=[-5])


def test_checks_shape_and_details_carry_no_disclosive_counts() -> None:
    t, e, groups = _random(seed=5)
    pol = sdc.Policy(min_count=12)
    out = sdc.survival(t, e, groups=groups, policy=pol)
    assert list(out.checks.columns) == CHECK_COLUMNS
    assert set(out.checks["rule"]) <= set(RULES)
    assert list(out.table.columns) == list(TABLE_COLUMNS)
    for detail in out.checks["detail"]:
        assert set(re.findall(r"\d+", detail)) <= {"12"}, detail


# ---------------------------------------------------------------------------
# payload round trip and recheck
# ---------------------------------------------------------------------------
def _accumulation_output() -> SurvivalOutput:
    t, e = _data([(5, 5.0, 1), (6, 15.0, 1), (10, 25.0, 1), (9, 35.0, 1), (30, 100.0, 0)])
    return sdc.survival(t, e, times=[0, 10, 20, 30, 40], policy=POLICY)


def test_round_trip_gives_the_same_status_and_table() -> None:
    t, e, groups = _random()
    outputs = [
        _accumulation_output(),
        sdc.survival(t, e, groups=groups, policy=POLICY),
        sdc.survival(*_data([(10, 5.0, 1), (10, 15.0, 0), (30, 100.0, 0)]), times=[0, 10, 20]),
    ]
    for out in outputs:
        payload = _payload(out)
        json.dumps(payload, allow_nan=False)
        assert payload["kind"] == "survival"
        result = sdc.recheck(payload, POLICY)
        assert result.status == out.status, result.reasons
        assert result.notes == []
        assert result.output is not None
        pd.testing.assert_frame_equal(result.output.table, out.table)
    assert [o.status for o in outputs] == ["review", "review", "pass"]


def test_stricter_site_policy_suppresses_more_on_recheck() -> None:
    t, e = _data([(10, 5.0, 1), (10, 15.0, 0), (30, 100.0, 0)])
    out = sdc.survival(t, e, times=[0, 10, 20], policy=POLICY)
    assert out.status == "pass"
    result = sdc.recheck(_payload(out), sdc.Policy(min_count=11))
    assert result.status == "review"
    assert result.output is not None
    assert result.output.table.loc[[10.0, 20.0]].isna().all().all()
    assert result.notes


def test_forged_at_risk_does_not_pass() -> None:
    payload = copy.deepcopy(_payload(_accumulation_output()))
    group = payload["evidence"]["groups"][0]
    group["at_risk"] = [a + 10 for a in group["at_risk"]]
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "at_risk" in result.reasons[0]


def test_forged_group_size_and_risk_sets_together_do_not_pass() -> None:
    # 10 events out of 20 halve the survival; claiming 30 at risk makes that drop impossible.
    t, e = _data([(10, 5.0, 1), (1, 15.0, 1), (9, 50.0, 0)])
    payload = copy.deepcopy(_payload(sdc.survival(t, e, times=[0, 10, 20, 30], policy=POLICY)))
    group = payload["evidence"]["groups"][0]
    group["n"] += 10
    group["at_risk"] = [a + 10 for a in group["at_risk"]]
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "survival" in result.reasons[0]


def test_forged_events_do_not_pass() -> None:
    # Claim 10 events (not 5) in the first interval so the row would be publishable.
    payload = copy.deepcopy(_payload(_accumulation_output()))
    group = payload["evidence"]["groups"][0]
    group["events"][1] = 10
    assert sdc.recheck(payload, POLICY).status == "fail"  # the counts no longer add up
    # Keep the partition (5 fewer at risk from then on): the survival drop gives it away.
    group["at_risk"] = [a if i == 0 else a - 5 for i, a in enumerate(group["at_risk"])]
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "survival" in result.reasons[0]


def test_forged_survival_without_events_does_not_pass() -> None:
    payload = copy.deepcopy(_payload(_accumulation_output()))
    payload["evidence"]["groups"][0]["survival"][0] = 0.9  # a drop at t=0 with no events
    assert sdc.recheck(payload, POLICY).status == "fail"


def test_claimed_pass_status_is_not_trusted() -> None:
    payload = copy.deepcopy(_payload(_accumulation_output()))
    payload["status"] = "pass"
    result = sdc.recheck(payload, POLICY)
    assert result.status == "review"
    assert result.claimed_status == "pass"
    assert result.notes


def test_missing_evidence_fails() -> None:
    payload = copy.deepcopy(_payload(_accumulation_output()))
    del payload["evidence"]["groups"][0]["censored"]
    assert sdc.recheck(payload, POLICY).status == "fail"
    payload = copy.deepcopy(_payload(_accumulation_output()))
    payload["evidence"]["times"] = [0, 20, 10, 30, 40]
    assert sdc.recheck(payload, POLICY).status == "fail"
