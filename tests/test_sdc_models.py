"""Checked regression models: known answers at each rule's boundary, agreement
with statsmodels, the payload round trip through ``recheck`` and forged payloads."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf

from phds_tre import sdc
from phds_tre.sdc.models import TABLE_COLUMNS, ModelOutput
from phds_tre.sdc.output import CHECK_COLUMNS
from phds_tre.sdc.rules import RULES

POLICY = sdc.Policy()  # min_count 10, min_dof 10


def _gaussian(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame({"x": x, "y": 1.0 + 2.0 * x + rng.normal(size=n)})


def _levels(counts: dict[str, int], seed: int = 1) -> pd.DataFrame:
    """A data set with a categorical ``g`` having exactly ``counts`` rows per level."""
    rng = np.random.default_rng(seed)
    g = np.repeat(list(counts), list(counts.values()))
    n = len(g)
    x = rng.normal(size=n)
    return pd.DataFrame({"g": g, "x": x, "y": x + rng.normal(size=n)})


def _binary(n: int, events: int, seed: int = 2) -> pd.DataFrame:
    """``n`` rows with exactly ``events`` ones, outcome unrelated to x (no separation)."""
    rng = np.random.default_rng(seed)
    s = np.zeros(n, dtype=int)
    s[rng.choice(n, events, replace=False)] = 1
    return pd.DataFrame({"s": s, "x": rng.normal(size=n)})


def _payload(out: sdc.SDCOutput) -> dict[str, Any]:
    return out._repr_mimebundle_()[sdc.MIME_TYPE]


def _failing(out: ModelOutput, rule: str) -> pd.DataFrame:
    c = out.checks
    return c[(c["rule"] == rule) & (c["status"] == "fail")]


# ---------------------------------------------------------------------------
# dof
# ---------------------------------------------------------------------------
def test_df_resid_9_fails_with_min_dof_10() -> None:
    out = sdc.ols("y ~ x", _gaussian(11), policy=POLICY)  # 11 rows, 2 parameters
    assert out.df_resid == 9
    assert out.status == "fail"
    assert len(_failing(out, "dof")) == 1
    assert out.table.isna().all().all()  # a model cannot be partly released
    assert list(out.table.index) == ["Intercept", "x"]
    assert any("suppressed" in r for r in out.reasons)


def test_df_resid_10_passes_with_min_dof_10() -> None:
    out = sdc.ols("y ~ x", _gaussian(12), policy=POLICY)
    assert out.df_resid == 10
    assert out.status == "pass"
    dof = out.checks[out.checks["rule"] == "dof"]
    assert list(dof["status"]) == ["pass"]


def test_min_dof_is_the_policy_s() -> None:
    data = _gaussian(12)
    assert sdc.ols("y ~ x", data, policy=sdc.Policy(min_dof=11)).status == "fail"
    assert sdc.ols("y ~ x", data, policy=sdc.Policy(min_dof=10)).status == "pass"


def test_nobs_below_min_count_fails_even_when_dof_allows() -> None:
    out = sdc.ols("y ~ x", _gaussian(9), policy=sdc.Policy(min_dof=0))
    failing = _failing(out, "threshold")
    assert list(failing["row"]) == ["model"] and list(failing["column"]) == ["nobs"]
    assert out.status == "fail"


# ---------------------------------------------------------------------------
# categorical threshold
# ---------------------------------------------------------------------------
def test_dummy_level_with_9_rows_fails() -> None:
    out = sdc.ols("y ~ x + C(g)", _levels({"a": 30, "b": 9, "c": 30}), policy=POLICY)
    failing = _failing(out, "threshold")
    assert list(failing["row"]) == ["C(g)[T.b]"]
    assert out.status == "fail"
    assert out.table.isna().all().all()


def test_dummy_level_with_10_rows_passes() -> None:
    out = sdc.ols("y ~ x + C(g)", _levels({"a": 30, "b": 10, "c": 30}), policy=POLICY)
    assert out.status == "pass"
    row = out.checks[(out.checks["row"] == "C(g)[T.b]") & (out.checks["rule"] == "threshold")]
    assert list(row["status"]) == ["pass"]


@pytest.mark.parametrize(("n_ref", "status"), [(9, "fail"), (10, "pass")])
def test_reference_level_is_checked_too(n_ref: int, status: str) -> None:
    out = sdc.ols("y ~ x + C(g)", _levels({"a": n_ref, "b": 30, "c": 30}), policy=POLICY)
    ref = out.checks[out.checks["row"] == "C(g) reference level"]
    assert list(ref["status"]) == [status]
    assert out.status == status


def test_string_column_without_c_is_categorical() -> None:
    out = sdc.ols("y ~ x + g", _levels({"a": 30, "b": 9}), policy=POLICY)
    assert list(_failing(out, "threshold")["row"]) == ["g[T.b]"]


def test_numeric_binary_column_counts_both_sides() -> None:
    data = _levels({"a": 9, "b": 40})
    data["flag"] = (data["g"] == "a").astype(int)  # 9 ones: a 0/1 covariate is a dummy
    out = sdc.ols("y ~ x + flag", data, policy=POLICY)
    assert list(_failing(out, "threshold")["row"]) == ["flag"]
    data["flag"] = 1 - data["flag"]  # now 9 zeros: the "reference" side is small
    out = sdc.ols("y ~ x + flag", data, policy=POLICY)
    assert list(_failing(out, "threshold")["row"]) == ["flag reference level"]


def test_interaction_cells_below_threshold_fail() -> None:
    data = pd.concat(
        [
            _levels({"a": 20, "b": 20}).assign(h="u"),
            _levels({"a": 20, "b": 9}, seed=5).assign(h="v"),
        ],
        ignore_index=True,
    )
    out = sdc.ols("y ~ C(g) * C(h)", data, policy=POLICY)
    failing = _failing(out, "threshold")
    # b×v has its own interaction dummy with 9 rows.
    assert "C(g)[T.b]:C(h)[T.v]" in set(failing["row"])
    assert out.status == "fail"
    # The same data with 10 in every combination passes.
    data2 = pd.concat(
        [
            _levels({"a": 10, "b": 10}).assign(h="u"),
            _levels({"a": 10, "b": 10}, seed=5).assign(h="v"),
        ],
        ignore_index=True,
    )
    assert sdc.ols("y ~ C(g) * C(h)", data2, policy=POLICY).status == "pass"


def test_interaction_reference_combination_is_a_cell() -> None:
    # a×u (both reference levels) has 9 rows; no dummy column names it.
    data = pd.concat(
        [
            _levels({"a": 9, "b": 20}).assign(h="u"),
            _levels({"a": 20, "b": 20}, seed=5).assign(h="v"),
        ],
        ignore_index=True,
    )
    out = sdc.ols("y ~ C(g) * C(h)", data, policy=POLICY)
    failing = _failing(out, "threshold")
    assert list(failing["row"]) == ["C(g) reference level & C(h) reference level"]


def test_empty_interaction_cell_is_a_disclosive_zero() -> None:
    data = pd.concat(
        [
            _levels({"a": 20, "b": 20, "c": 20}).assign(h="u"),
            _levels({"a": 20, "b": 20}, seed=5).assign(h="v"),  # no c×v child
        ],
        ignore_index=True,
    )
    out = sdc.ols("y ~ C(g) * C(h)", data, policy=POLICY)
    zeros = out.checks[out.checks["rule"] == "zeros"]
    assert list(zeros["row"]) == ["C(g)[T.c]:C(h)[T.v]"]
    assert list(zeros["status"]) == ["fail"]
    assert out.status == "fail"
    lenient = sdc.ols("y ~ C(g) * C(h)", data, policy=sdc.Policy(zeros_disclosive=False))
    assert lenient.status == "review"  # still rank-deficient: a reviewer looks
    assert any("rank-deficient" in r for r in lenient.reasons)


def test_slope_within_one_level_counts_that_level_s_rows() -> None:
    out = sdc.ols("y ~ C(g) + C(g):x", _levels({"a": 30, "b": 9}), policy=POLICY)
    failing = set(_failing(out, "threshold")["row"])
    # Without a main effect of x, patsy gives each level its own slope: C(g)[b]:x.
    assert {"C(g)[T.b]", "C(g)[b]:x"} <= failing


def test_formulaic_engine_gives_the_same_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statsmodels.formula.options, "formula_engine", "formulaic")
    out = sdc.ols("y ~ x + C(g)", _levels({"a": 30, "b": 9, "c": 30}), policy=POLICY)
    assert list(_failing(out, "threshold")["row"]) == ["C(g)[T.b]"]
    out = sdc.ols("y ~ x + C(g)", _levels({"a": 9, "b": 30, "c": 30}), policy=POLICY)
    assert list(_failing(out, "threshold")["row"]) == ["C(g) reference level"]
    assert sdc.recheck(_payload(out), POLICY).status == "fail"


# ---------------------------------------------------------------------------
# binary outcomes
# ---------------------------------------------------------------------------
def test_logit_with_9_events_fails() -> None:
    out = sdc.logit("s ~ x", _binary(60, 9), policy=POLICY)
    failing = _failing(out, "threshold")
    assert list(zip(failing["row"], failing["column"], strict=True)) == [("outcome", "events")]
    assert out.status == "fail"
    assert out.table.isna().all().all()


def test_logit_with_10_events_passes() -> None:
    out = sdc.logit("s ~ x", _binary(60, 10), policy=POLICY)
    assert out.status == "pass", out.reasons


def test_logit_with_9_non_events_fails() -> None:
    out = sdc.logit("s ~ x", _binary(60, 51), policy=POLICY)
    failing = _failing(out, "threshold")
    assert list(failing["column"]) == ["non-events"]


def test_binomial_glm_counts_events_like_logit() -> None:
    assert sdc.glm("s ~ x", _binary(60, 9), family="binomial", policy=POLICY).status == "fail"
    assert sdc.glm("s ~ x", _binary(60, 10), family="binomial", policy=POLICY).status == "pass"
    # A Poisson model has no events/non-events rule.
    out = sdc.glm("s ~ x", _binary(60, 9), family="poisson", policy=POLICY)
    assert "events" not in set(out.checks["column"])


def test_separation_in_a_level_is_reviewed() -> None:
    data = _levels({"a": 30, "b": 15, "c": 30}, seed=3)
    rng = np.random.default_rng(4)
    data["s"] = rng.integers(0, 2, len(data))
    data.loc[data["g"] == "b", "s"] = 1  # every child in b has the event
    out = sdc.logit("s ~ x + C(g)", data, policy=POLICY)
    assert out.status == "review"
    zeros = out.checks[(out.checks["rule"] == "zeros") & (out.checks["status"] == "review")]
    assert "C(g)[T.b]" in set(zeros["row"])
    assert not out.table.isna().all().all()  # review: the reviewer sees the estimates


def test_separation_by_a_continuous_covariate_is_reviewed() -> None:
    data = _binary(60, 30)
    data["s"] = (data["x"] > np.median(data["x"])).astype(int)
    for out in (
        sdc.logit("s ~ x", data, policy=POLICY),
        sdc.glm("s ~ x", data, family="binomial", policy=POLICY),
    ):
        assert out.status == "review", out.reasons
        assert any("separation" in r or "converge" in r for r in out.reasons)


def test_non_binary_binomial_outcome_is_reviewed() -> None:
    data = _binary(60, 30)
    data["p"] = np.linspace(0.1, 0.9, 60)
    out = sdc.glm("p ~ x", data, family="binomial", policy=POLICY)
    assert out.status == "review"
    assert any("0/1" in r for r in out.reasons)


# ---------------------------------------------------------------------------
# agreement with statsmodels
# ---------------------------------------------------------------------------
def _expected(result: Any) -> pd.DataFrame:
    ci = result.conf_int()
    return pd.DataFrame(
        {
            "coef": result.params,
            "std_err": result.bse,
            "statistic": result.tvalues,
            "p_value": result.pvalues,
            "ci_lower": ci[0],
            "ci_upper": ci[1],
        }
    )


def test_ols_table_equals_statsmodels() -> None:
    data = _levels({"a": 30, "b": 20, "c": 25})
    out = sdc.ols("y ~ x + C(g)", data, policy=POLICY)
    assert out.status == "pass"
    expected = _expected(smf.ols("y ~ x + C(g)", data).fit())
    pd.testing.assert_frame_equal(out.table, expected, check_names=False, rtol=1e-12)
    assert list(out.table.columns) == list(TABLE_COLUMNS)
    assert out.result is not None
    assert np.allclose(out.result.params, expected["coef"])


def test_logit_and_glm_tables_equal_statsmodels() -> None:
    data = _binary(80, 30)
    data["g"] = np.repeat(["a", "b"], 40)
    out = sdc.logit("s ~ x + C(g)", data, policy=POLICY)
    assert out.status == "pass", out.reasons
    expected = _expected(smf.logit("s ~ x + C(g)", data).fit(disp=0))
    pd.testing.assert_frame_equal(out.table, expected, check_names=False, rtol=1e-10)
    for family, fam in (("binomial", sm.families.Binomial()), ("poisson", sm.families.Poisson())):
        got = sdc.glm("s ~ x + C(g)", data, family=family, policy=POLICY)
        assert got.status == "pass", got.reasons
        want = _expected(smf.glm("s ~ x + C(g)", data, family=fam).fit())
        pd.testing.assert_frame_equal(got.table, want, check_names=False, rtol=1e-10)


def test_glm_accepts_a_statsmodels_family_and_refuses_unknown_names() -> None:
    data = _gaussian(40)
    out = sdc.glm("y ~ x", data, family=sm.families.Gaussian(), policy=POLICY)
    assert out.status == "pass"
    want = _expected(smf.glm("y ~ x", data, family=sm.families.Gaussian()).fit())
    pd.testing.assert_frame_equal(out.table, want, check_names=False, rtol=1e-10)
    with pytest.raises(ValueError, match="unknown family"):
        sdc.glm("y ~ x", data, family="gamma-ish")


def test_rows_with_missing_values_are_dropped_as_statsmodels_does() -> None:
    data = _gaussian(30)
    data.loc[[0, 1, 2], "x"] = np.nan
    out = sdc.ols("y ~ x", data, policy=POLICY)
    assert out.nobs == 27
    pd.testing.assert_frame_equal(
        out.table, _expected(smf.ols("y ~ x", data).fit()), check_names=False, rtol=1e-12
    )


def test_formula_errors_raise_for_the_researcher() -> None:
    with pytest.raises(Exception, match="nope"):
        sdc.ols("y ~ nope", _gaussian(30))
    with pytest.raises(TypeError):
        sdc.ols("y ~ x", {"y": [1.0]})


# ---------------------------------------------------------------------------
# shape of the checks and details
# ---------------------------------------------------------------------------
def test_checks_use_known_columns_and_rules() -> None:
    data = _levels({"a": 30, "b": 9, "c": 30})
    data["s"] = np.random.default_rng(0).integers(0, 2, len(data))
    out = sdc.logit("s ~ x + C(g)", data, policy=POLICY)
    assert list(out.checks.columns) == CHECK_COLUMNS
    assert set(out.checks["rule"]) <= set(RULES)
    assert set(out.checks["status"]) <= {"pass", "review", "fail"}


def test_details_never_carry_the_disclosive_count() -> None:
    pol = sdc.Policy(min_count=12, min_dof=15)
    data = _levels({"a": 7, "b": 30, "c": 5}, seed=9)
    data["s"] = 0
    data.loc[data.index[:3], "s"] = 1  # 3 events
    out = sdc.glm("s ~ x + C(g)", data, family="binomial", policy=pol)
    assert out.status == "fail"
    allowed = {"12", "15", "0", "1"}  # the policy's thresholds; "0 or 1" in the separation text
    for detail in out.checks["detail"]:
        assert set(re.findall(r"\d+", detail)) <= allowed, detail
    for reason in out.reasons:  # counts of *checks* only, never of children
        assert not re.search(r"\b(7|5|3)\b", reason.split(" check(s)")[-1]), reason


def test_rank_deficient_design_is_reviewed() -> None:
    data = _gaussian(40)
    data["x2"] = 2 * data["x"]
    out = sdc.ols("y ~ x + x2", data, policy=POLICY)
    assert out.status == "review"
    assert any("rank-deficient" in r for r in out.reasons)
    assert sdc.recheck(_payload(out), POLICY).status == "review"


# ---------------------------------------------------------------------------
# payload round trip and recheck
# ---------------------------------------------------------------------------
@pytest.fixture
def outputs() -> Iterator[list[ModelOutput]]:
    data = _levels({"a": 30, "b": 9, "c": 30})
    data["s"] = np.random.default_rng(0).integers(0, 2, len(data))
    yield [
        sdc.ols("y ~ x", _gaussian(12), policy=POLICY),  # pass
        sdc.ols("y ~ x", _gaussian(11), policy=POLICY),  # fail: dof
        sdc.ols("y ~ x + C(g)", data, policy=POLICY),  # fail: threshold
        sdc.logit("s ~ x", _binary(60, 10), policy=POLICY),  # pass
        sdc.glm("s ~ x", _binary(60, 9), family="binomial", policy=POLICY),  # fail
    ]


def test_round_trip_gives_the_same_status_and_table(outputs: list[ModelOutput]) -> None:
    statuses = []
    for out in outputs:
        payload = _payload(out)
        json.dumps(payload, allow_nan=False)  # strict JSON
        assert payload["kind"] == "model"
        result = sdc.recheck(payload, POLICY)
        assert result.status == out.status, result.reasons
        assert result.notes == []
        assert result.output is not None
        pd.testing.assert_frame_equal(result.output.table, out.table)
        statuses.append(out.status)
    assert statuses == ["pass", "fail", "fail", "pass", "fail"]


def test_release_payload_has_no_evidence_and_no_results_object(outputs: list[ModelOutput]) -> None:
    released = outputs[0].release_payload()
    assert "evidence" not in released
    text = json.dumps(released)
    assert "RegressionResults" not in text and "nobs" not in text


def test_forged_df_resid_does_not_pass() -> None:
    out = sdc.ols("y ~ x", _gaussian(12), policy=POLICY)
    payload = copy.deepcopy(_payload(out))
    payload["evidence"]["df_resid"] = 50
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "df_resid" in result.reasons[0]


def test_forged_nobs_and_df_resid_together_do_not_pass() -> None:
    # A kernel that claims 60 rows for an 11-row fit must also redo the t intervals.
    out = sdc.ols("y ~ x", _gaussian(11), policy=POLICY)
    payload = copy.deepcopy(_payload(out))
    ev = payload["evidence"]
    ev["nobs"], ev["df_resid"] = 60, 58
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "confidence interval" in result.reasons[0] or "p-value" in result.reasons[0]


def test_claimed_pass_status_is_not_trusted() -> None:
    out = sdc.ols("y ~ x", _gaussian(11), policy=POLICY)
    payload = copy.deepcopy(_payload(out))
    payload["status"] = "pass"
    payload["checks"] = {"summary": {}, "not_pass": []}
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert result.claimed_status == "pass"
    assert result.notes


def test_forged_dummy_count_does_not_pass() -> None:
    data = _levels({"a": 30, "b": 9, "c": 30})
    payload = copy.deepcopy(_payload(sdc.ols("y ~ x + C(g)", data, policy=POLICY)))
    support = payload["evidence"]["support"]
    for item in support:
        if item["column"] == "C(g)[T.b]":
            item["n"] = 10  # claim the small level is large enough
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "add up" in result.reasons[0]


def test_hidden_dummy_count_does_not_pass() -> None:
    data = _levels({"a": 30, "b": 9, "c": 30})
    payload = copy.deepcopy(_payload(sdc.ols("y ~ x + C(g)", data, policy=POLICY)))
    ev = payload["evidence"]
    ev["support"] = [s for s in ev["support"] if s["column"] != "C(g)[T.b]"]
    ev["terms"] = []
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "C(g)[T.b]" in result.reasons[0]


def test_dropped_cells_do_not_pass() -> None:
    # Without the cells of C(g), the 9-row reference level would go unchecked.
    data = _levels({"a": 9, "b": 30, "c": 30})
    payload = copy.deepcopy(_payload(sdc.ols("y ~ x + C(g)", data, policy=POLICY)))
    payload["evidence"]["terms"] = []
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "no term" in result.reasons[0]


def test_forged_outcome_counts_do_not_pass() -> None:
    payload = copy.deepcopy(_payload(sdc.logit("s ~ x", _binary(60, 9), policy=POLICY)))
    payload["evidence"]["outcome"]["events"] = 10  # 10 + 51 != 60
    assert sdc.recheck(payload, POLICY).status == "fail"


def test_forged_coefficient_does_not_pass() -> None:
    payload = copy.deepcopy(_payload(sdc.ols("y ~ x", _gaussian(40), policy=POLICY)))
    payload["evidence"]["values"][1][0] += 1.0  # coef no longer matches its statistic and CI
    assert sdc.recheck(payload, POLICY).status == "fail"


def test_missing_evidence_fails() -> None:
    payload = copy.deepcopy(_payload(sdc.ols("y ~ x", _gaussian(40), policy=POLICY)))
    del payload["evidence"]
    assert sdc.recheck(payload, POLICY).status == "fail"
    payload = copy.deepcopy(_payload(sdc.ols("y ~ x", _gaussian(40), policy=POLICY)))
    del payload["evidence"]["nobs"]
    assert sdc.recheck(payload, POLICY).status == "fail"


def test_stricter_site_policy_fails_a_model_that_passed_in_the_kernel() -> None:
    out = sdc.ols("y ~ x + C(g)", _levels({"a": 30, "b": 12, "c": 30}), policy=POLICY)
    assert out.status == "pass"
    payload = _payload(out)
    by_dof = sdc.recheck(payload, sdc.Policy(min_dof=100))
    assert by_dof.status == "fail"
    assert by_dof.output is not None and by_dof.output.table.isna().all().all()
    by_count = sdc.recheck(payload, sdc.Policy(min_count=15))
    assert by_count.status == "fail"
    assert any("threshold" in r for r in by_count.reasons)
    assert by_count.notes  # the kernel's claim differs from the site's verdict


def test_html_and_text_show_the_verdict() -> None:
    out = sdc.ols("y ~ x", _gaussian(11), policy=POLICY)
    bundle = out._repr_mimebundle_()
    assert "FAIL" in bundle["text/html"] and "sdc.ols" in bundle["text/html"]
    assert bundle["text/plain"].startswith("[FAIL] sdc.ols")


def test_a_fit_that_raises_is_reviewed_with_an_empty_table() -> None:
    data = _binary(60, 30)
    data["x2"] = 2 * data["x"]  # singular Hessian: Newton's method raises
    out = sdc.logit("s ~ x + x2", data, policy=POLICY)
    assert out.status == "review"
    assert out.result is None
    assert out.table.isna().all().all()
    assert any("could not be fitted (LinAlgError)" in r for r in out.reasons)
    assert sdc.recheck(_payload(out), POLICY).status == "review"


def test_non_finite_estimates_are_reviewed() -> None:
    data = _gaussian(30)
    data.loc[0, "y"] = np.inf
    out = sdc.ols("y ~ x", data, policy=POLICY)
    assert out.status == "review"
    assert any("not finite" in r for r in out.reasons)


def test_free_text_in_fit_notes_is_refused() -> None:
    payload = copy.deepcopy(_payload(sdc.ols("y ~ x", _gaussian(40), policy=POLICY)))
    payload["evidence"]["fit"]["error"] = "patient 1234567 born 2019-03-04"
    result = sdc.recheck(payload, POLICY)
    assert result.status == "fail"
    assert "1234567" not in " ".join(result.reasons)
