"""Exact federated regression: OLS and GLM from site shares equal statsmodels on the pooled rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

from phds_tre import data, federate
from phds_tre.data import concepts as c
from phds_tre.federate.design import DesignError
from phds_tre.federate.glm import ConvergenceError
from phds_tre.federate.shares import ShareError
from phds_tre.sdc import Policy

#: A policy that lets every share of the small test data sets through, so that
#: exactness is tested on all rows; the disclosure rules have their own tests.
OPEN = Policy(min_count=1, min_dof=0)


def _rel(a: pd.Series, b: pd.Series) -> float:
    assert list(a.index) == list(b.index)
    return float(np.max(np.abs(a.to_numpy() / b.to_numpy() - 1)))


def _thirds(df: pd.DataFrame) -> list[pd.DataFrame]:
    return [df.iloc[i::3] for i in range(3)]


def _fair_without_top_occupation_at_two_sites() -> list[pd.DataFrame]:
    # Occupation 6 only at the third site: its column is all zeros at the other two.
    d = sm.datasets.fair.load_pandas().data
    rest, top = d[d.occupation != 6], d[d.occupation == 6]
    return [rest.iloc[0::3], rest.iloc[1::3], pd.concat([rest.iloc[2::3], top])]


def _anes_without_lowest_education_at_one_site() -> list[pd.DataFrame]:
    d = sm.datasets.anes96.load_pandas().data
    low, rest = d[d.educ == 1], d[d.educ != 1]
    return [rest.iloc[0::3], pd.concat([rest.iloc[1::3], low]), rest.iloc[2::3]]


OLS_CASES: dict[str, tuple[str, Callable[[], list[pd.DataFrame]]]] = {
    # longley: notoriously ill-conditioned; the stacked R factors keep it exact
    "longley": (
        "TOTEMP ~ GNPDEFL + GNP + UNEMP + ARMED + POP + YEAR",
        lambda: _thirds(sm.datasets.longley.load_pandas().data),
    ),
    "fair, level absent at two sites": (
        "affairs ~ rate_marriage + age + yrs_married + C(religious) + C(occupation)",
        _fair_without_top_occupation_at_two_sites,
    ),
    "scotland": (
        "YES ~ COUTAX + UNEMPF + MOR + ACT + GDP + AGE",
        lambda: _thirds(sm.datasets.scotland.load_pandas().data),
    ),
}


@pytest.mark.parametrize("case", sorted(OLS_CASES))
def test_ols_equals_statsmodels_on_the_pooled_rows(case: str) -> None:
    formula, make_sites = OLS_CASES[case]
    sites = make_sites()
    pooled = pd.concat(sites)
    expected = smf.ols(formula, pooled).fit()
    design = federate.Design.from_data(formula, pooled)
    shares = {
        f"site_{i}": federate.linear_stats(df, design, policy=OPEN) for i, df in enumerate(sites)
    }
    got = federate.ols(shares)
    assert _rel(got.params, expected.params) < 1e-8
    assert _rel(got.bse, expected.bse) < 1e-8
    assert _rel(got.tvalues, expected.tvalues) < 1e-8
    np.testing.assert_allclose(got.pvalues, expected.pvalues, rtol=1e-6, atol=1e-300)
    np.testing.assert_allclose(got.conf_int(), expected.conf_int(), rtol=1e-8)
    np.testing.assert_allclose(got.conf_int(0.1), expected.conf_int(0.1), rtol=1e-8)
    assert (got.nobs, got.df_resid, got.df_model) == (
        expected.nobs,
        expected.df_resid,
        expected.df_model,
    )
    assert got.ssr == pytest.approx(expected.ssr, rel=1e-8)
    assert got.scale == pytest.approx(expected.scale, rel=1e-8)
    assert got.rsquared == pytest.approx(expected.rsquared, rel=1e-6)
    assert got.sites_used == ["site_0", "site_1", "site_2"] and got.sites_dropped == []
    assert "Federated OLS" in got.summary() and formula in got.summary()


def _fit(
    formula: str,
    family: str,
    sites: list[pd.DataFrame],
    levels: dict[str, list[object]] | None = None,
    policy: Policy = OPEN,
    **kw: object,
) -> federate.GLM:
    m = federate.GLM(formula, family=family, levels=levels, **kw)  # type: ignore[arg-type]
    rounds = 0
    while not m.converged:
        # Round trip through the state string, as a site notebook parameter does.
        state = m.state()
        m.update([federate.glm_round(df, federate.GLM.from_state(state), policy) for df in sites])
        rounds += 1
    extra = 1 if family in ("poisson", "gaussian") else 0  # the pooled mean for the start
    assert rounds == m.iterations + 1 + extra
    return m


GLM_CASES: dict[str, tuple[str, str, Callable[[], list[pd.DataFrame]]]] = {
    "spector logit": (
        "GRADE ~ GPA + TUCE + PSI",
        "binomial",
        lambda: _thirds(sm.datasets.spector.load_pandas().data),
    ),
    "anes96 logit, level absent at two sites": (
        "vote ~ logpopul + age + income + C(educ)",
        "binomial",
        _anes_without_lowest_education_at_one_site,
    ),
    "randhie poisson": (
        "mdvis ~ lncoins + idp + lpi + fmde + physlm + disea + hlthg + hlthf + hlthp",
        "poisson",
        lambda: _thirds(sm.datasets.randhie.load_pandas().data),
    ),
    "fair poisson, level absent at two sites": (
        "affairs ~ rate_marriage + age + C(occupation)",
        "poisson",
        _fair_without_top_occupation_at_two_sites,
    ),
    "scotland gaussian": (
        "YES ~ COUTAX + UNEMPF + MOR + ACT + GDP + AGE",
        "gaussian",
        lambda: _thirds(sm.datasets.scotland.load_pandas().data),
    ),
}
_SM_FAMILIES = {
    "binomial": sm.families.Binomial,
    "poisson": sm.families.Poisson,
    "gaussian": sm.families.Gaussian,
}


@pytest.mark.parametrize("case", sorted(GLM_CASES))
def test_glm_equals_statsmodels_in_the_same_iterations(case: str) -> None:
    formula, family, make_sites = GLM_CASES[case]
    sites = make_sites()
    pooled = pd.concat(sites)
    expected = smf.glm(formula, pooled, family=_SM_FAMILIES[family]()).fit()
    design = federate.Design.from_data(formula, pooled)
    m = _fit(formula, family, sites, levels=design.levels)
    got = m.result
    assert got is not None and got.converged
    assert m.iterations == got.iterations == expected.fit_history["iteration"]
    assert _rel(got.params, expected.params) < 1e-6
    assert _rel(got.bse, expected.bse) < 1e-6
    np.testing.assert_allclose(got.conf_int(), expected.conf_int(), rtol=1e-6)
    np.testing.assert_allclose(got.pvalues, expected.pvalues, rtol=1e-5, atol=1e-300)
    assert got.scale == pytest.approx(expected.scale, rel=1e-8)
    assert got.deviance == pytest.approx(expected.deviance, rel=1e-8)
    assert got.pearson_chi2 == pytest.approx(expected.pearson_chi2, rel=1e-8)
    assert (got.nobs, got.df_resid) == (expected.nobs, expected.df_resid)
    np.testing.assert_allclose(
        got.fit_history["deviance"][1:], expected.fit_history["deviance"][1:], rtol=1e-8
    )


def test_glm_stops_at_max_iter_like_statsmodels() -> None:
    d = sm.datasets.spector.load_pandas().data
    formula = "GRADE ~ GPA + TUCE + PSI"
    expected = smf.glm(formula, d, family=sm.families.Binomial()).fit(maxiter=2)
    m = federate.GLM(formula, family="binomial", max_iter=2)
    with pytest.raises(ConvergenceError, match="no convergence after 2 iterations"):
        while not m.converged:
            m.update([federate.glm_round(df, m, OPEN) for df in _thirds(d)])
    assert m.result is not None and not m.result.converged
    assert m.result.iterations == expected.fit_history["iteration"] == 2
    assert _rel(m.result.params, expected.params) < 1e-6
    assert _rel(m.result.bse, expected.bse) < 1e-6


# ---------------------------------------------------------------------------
# the synthetic hospitals: sepsis mortality in the PICU
# ---------------------------------------------------------------------------
SEPSIS_COHORT = f"""
    WITH picu AS (
      SELECT v.visit_occurrence_id, v.person_id, v.visit_start_date, v.visit_end_date
      FROM visit_occurrence v
      WHERE v.visit_concept_id = {c.INTENSIVE_CARE} AND EXISTS (
        SELECT 1 FROM condition_occurrence co
        WHERE co.visit_occurrence_id = v.visit_occurrence_id
          AND co.condition_concept_id = {c.SEPSIS})
    ), lac AS (
      SELECT visit_occurrence_id, arg_min(value_as_number, measurement_datetime) AS lactate
      FROM measurement JOIN picu USING (visit_occurrence_id)
      WHERE measurement_concept_id = {c.LACTATE} GROUP BY ALL
    )
    SELECT CASE WHEN p.gender_concept_id = {c.MALE} THEN 'M' ELSE 'F' END AS sex,
           date_diff('day', CAST(p.birth_datetime AS DATE), picu.visit_start_date) / 365.25 AS age,
           lac.lactate,
           (d.death_date IS NOT NULL AND d.death_date <= picu.visit_end_date)::INT AS died
    FROM picu JOIN person p USING (person_id) JOIN lac USING (visit_occurrence_id)
    LEFT JOIN death d USING (person_id)
"""
SEPSIS_FORMULA = "died ~ lactate + age + C(sex)"
SEX = {"sex": ["F", "M"]}


@pytest.fixture(scope="module")
def sepsis(synth_sites: Path) -> dict[str, pd.DataFrame]:
    """Site -> its sepsis PICU cohort (one row per stay)."""
    return {
        p.name: data.connect(p).sql(SEPSIS_COHORT)
        for p in sorted(synth_sites.iterdir())
        if p.is_dir()
    }


def test_sepsis_mortality_across_the_synthetic_hospitals_is_exact(
    sepsis: dict[str, pd.DataFrame],
) -> None:
    pooled = pd.concat(sepsis.values())
    expected = smf.glm(SEPSIS_FORMULA, pooled, family=sm.families.Binomial()).fit()
    m = federate.GLM(SEPSIS_FORMULA, family="binomial", levels=SEX)
    while not m.converged:
        m.update({site: federate.glm_round(df, m, OPEN) for site, df in sepsis.items()})
    got = m.result
    assert got is not None
    assert m.iterations == expected.fit_history["iteration"]
    assert _rel(got.params, expected.params) < 1e-6
    assert _rel(got.bse, expected.bse) < 1e-6
    assert got.params["lactate"] > 0  # the known mortality model: lactate raises the risk
    assert got.sites_used == sorted(sepsis)
    # The same cohort as a linear probability model (OLS of the 0/1 outcome).
    lpm = federate.ols(
        {s: federate.linear_stats(df, SEPSIS_FORMULA, SEX, OPEN) for s, df in sepsis.items()}
    )
    ols_expected = smf.ols(SEPSIS_FORMULA, pooled).fit()
    assert _rel(lpm.params, ols_expected.params) < 1e-8
    assert _rel(lpm.bse, ols_expected.bse) < 1e-8


def test_sites_failing_the_default_policy_are_dropped_and_said_so(
    sepsis: dict[str, pd.DataFrame],
) -> None:
    # Girona has fewer than 10 deaths; London fewer than 10 deaths among boys.
    shares = {site: federate.linear_stats(df, SEPSIS_FORMULA, SEX) for site, df in sepsis.items()}
    assert {s: x.status for s, x in shares.items()} == {
        "hospital_a_barcelona": "pass",
        "hospital_b_london": "fail",
        "hospital_c_girona": "fail",
    }
    got = federate.ols(shares)
    barcelona = sepsis["hospital_a_barcelona"]
    expected = smf.ols(SEPSIS_FORMULA, barcelona).fit()
    assert _rel(got.params, expected.params) < 1e-8
    assert got.sites_used == ["hospital_a_barcelona"]
    assert [s for s, _ in got.sites_dropped] == ["hospital_b_london", "hospital_c_girona"]
    n_all = sum(len(df) for df in sepsis.values())
    london = dict(got.sites_dropped)["hospital_b_london"]
    assert "events behind C(sex)[T.M] below 10" in london
    girona = next(line for line in got.dropped if line.startswith("hospital_c_girona"))
    assert "events below 10" in girona
    assert (
        f"n {len(barcelona)} instead of {len(barcelona) + len(sepsis['hospital_c_girona'])}"
        in girona
    )
    assert all(line in got.summary() for line in got.dropped)
    assert got.nobs < n_all
    # The GLM drops them from the first round and keeps the same sites to the end.
    m = federate.GLM(SEPSIS_FORMULA, family="binomial", levels=SEX)
    while not m.converged:
        m.update({site: federate.glm_round(df, m) for site, df in sepsis.items()})
    assert m.result is not None and m.result.sites_used == ["hospital_a_barcelona"]
    glm_expected = smf.glm(SEPSIS_FORMULA, barcelona, family=sm.families.Binomial()).fit()
    assert _rel(m.result.params, glm_expected.params) < 1e-6


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_shares_of_different_designs_are_refused() -> None:
    d = sm.datasets.fair.load_pandas().data
    a = federate.linear_stats(
        d.iloc[::2],
        "affairs ~ age + C(occupation)",
        policy=OPEN,
        levels={"occupation": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]},
    )
    b = federate.linear_stats(
        d.iloc[1::2],
        "affairs ~ age + C(occupation)",
        policy=OPEN,
        levels={"occupation": [2.0, 1.0, 3.0, 4.0, 5.0, 6.0]},
    )
    with pytest.raises(ShareError, match="site 2: its share was built with another design"):
        federate.ols([a, b])


def test_a_value_outside_the_coordinators_levels_is_an_error() -> None:
    df = pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0], "sex": ["F", "M", "F", "X"]})
    with pytest.raises(DesignError, match=r"'sex' holds values that are not among .*'X'"):
        federate.linear_stats(df, "y ~ C(sex)", levels=SEX, policy=OPEN)
    with pytest.raises(DesignError, match="categorical variable 'sex' has no levels fixed"):
        federate.linear_stats(df, "y ~ sex", policy=OPEN)
    with pytest.raises(DesignError, match="'grp', which is not a column"):
        federate.linear_stats(df[:3], "y ~ C(sex)", levels={**SEX, "grp": ["a"]}, policy=OPEN)


def test_missing_rows_are_dropped_and_counted_like_statsmodels() -> None:
    d = sm.datasets.scotland.load_pandas().data.copy()
    d.loc[d.index[:3], "GDP"] = np.nan
    formula = "YES ~ COUTAX + GDP"
    s = federate.linear_stats(d, formula, policy=OPEN)
    assert s.dropped == 3 and s.n == len(d) - 3
    got = federate.ols([s])
    assert _rel(got.params, smf.ols(formula, d).fit().params) < 1e-8


def test_a_share_of_another_round_is_refused() -> None:
    d = sm.datasets.spector.load_pandas().data
    m = federate.GLM("GRADE ~ GPA + TUCE + PSI", family="binomial")
    old = [federate.glm_round(df, m, OPEN) for df in _thirds(d)]
    m.update(old)
    with pytest.raises(ShareError, match="site 1: its share was computed for another state"):
        m.update(old)
    other = federate.GLM("GRADE ~ GPA + PSI", family="binomial")
    with pytest.raises(ShareError, match="another state"):
        m.update([federate.glm_round(df, other, OPEN) for df in _thirds(d)])
    with pytest.raises(ShareError, match=r"not a federate\.glm_round share"):
        m.update([federate.linear_stats(d, "GRADE ~ GPA", policy=OPEN)])


def test_a_site_dropping_out_mid_fit_is_an_error() -> None:
    d = sm.datasets.spector.load_pandas().data
    m = federate.GLM("GRADE ~ GPA + TUCE + PSI", family="binomial")
    sites = dict(zip("abc", _thirds(d), strict=True))
    m.update({s: federate.glm_round(df, m, OPEN) for s, df in sites.items()})
    with pytest.raises(ShareError, match=r"the sites changed during the fit .*missing now: c"):
        m.update({s: federate.glm_round(df, m, OPEN) for s, df in sites.items() if s != "c"})


def test_all_shares_withheld_is_a_clear_error() -> None:
    d = sm.datasets.spector.load_pandas().data  # 32 rows: three sites of about 11 fail dof
    shares = [federate.linear_stats(df, "GRADE ~ GPA + TUCE + PSI") for df in _thirds(d)]
    assert {s.status for s in shares} == {"fail"}
    with pytest.raises(ShareError, match=r"every site.s share was withheld.*site 1 withheld"):
        federate.ols(shares)
    with pytest.raises(ShareError, match="every site's share was withheld"):
        federate.ols({"a": None, "b": {"schema": "phds.federate.withheld", "reason": "x"}})


def test_a_rank_deficient_pooled_design_is_refused() -> None:
    df = pd.DataFrame(
        {"y": np.arange(30.0), "x": np.arange(30.0) % 7, "x2": 2 * (np.arange(30.0) % 7)}
    )
    with pytest.raises(ShareError, match="rank-deficient"):
        federate.ols([federate.linear_stats(df, "y ~ x + x2", policy=OPEN)])


def test_glm_state_is_json_and_round_trips() -> None:
    m = federate.GLM(SEPSIS_FORMULA, family="poisson", levels=SEX)
    spec = json.loads(m.state())
    assert spec["params"] is None and spec["phase"] == "mean" and spec["design"]["levels"] == SEX
    assert federate.GLM.from_state(m.state()).state() == m.state()
    with pytest.raises(ValueError, match="not a federated GLM state"):
        federate.GLM.from_state(json.dumps({"formula": SEPSIS_FORMULA}))
    with pytest.raises(ValueError, match="unknown family"):
        federate.GLM(SEPSIS_FORMULA, family="gamma")
