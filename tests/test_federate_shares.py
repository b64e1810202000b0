"""Federated regression shares: disclosure checks, the site's re-check, and loading released shares."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from nbformat.v4 import new_code_cell, new_notebook

from phds_tre import data, federate, sdc
from phds_tre.check.checkers import CheckContext, check_output
from phds_tre.check.structured import load_recheck
from phds_tre.data import concepts
from phds_tre.federate.shares import WITHHELD_SCHEMA, ShareError
from phds_tre.kernel.share import SHARE_MIME, share_bundle
from phds_tre.run import SiteRun
from phds_tre.sdc import Policy

SEX = {"sex": ["F", "M"]}
RNG = np.random.default_rng(7)


def _cohort(n_f: int, n_m: int, deaths_f: int, deaths_m: int) -> pd.DataFrame:
    """Rows with a 0/1 outcome and exact counts of deaths per sex."""
    rows = []
    for sex, n, deaths in (("F", n_f, deaths_f), ("M", n_m, deaths_m)):
        for i in range(n):
            rows.append({"sex": sex, "died": int(i < deaths), "age": float(RNG.uniform(0, 17))})
    return pd.DataFrame(rows)


def _failed(out: Any) -> set[tuple[str, str, str]]:
    checks = out.checks
    bad = checks[checks["status"] == "fail"]
    return {(r.row, r.column, r.rule) for r in bad.itertuples()}


def test_a_share_passing_every_rule_is_released_with_what_the_coordinator_needs() -> None:
    s = federate.linear_stats(_cohort(40, 40, 12, 15), "died ~ age + C(sex)", SEX)
    assert s.status == "pass", s.reasons
    payload = s.release_payload()
    assert "evidence" not in payload and payload["kind"] == "federate.linear_stats"
    block = payload["federate"]
    assert block["n"] == 80 and block["columns"] == ["Intercept", "C(sex)[T.M]", "age"]
    assert federate.Design.from_json(block["design"]) == federate.Design("died ~ age + C(sex)", SEX)
    gram = np.asarray(block["r"]).T @ np.asarray(block["r"])
    np.testing.assert_allclose(gram, s.gram)
    assert gram[1, 1] == pytest.approx(40) and gram[1, 3] == pytest.approx(15)  # boys, deaths


@pytest.mark.parametrize(
    ("cohort", "formula", "failing", "reason"),
    [
        # 9 rows in total: rows and residual df
        (
            _cohort(5, 4, 0, 0).assign(died=lambda d: d.age),
            "died ~ age",
            {("share", "rows", "threshold"), ("share", "df_resid", "dof")},
            "fewer than 10 rows",
        ),
        # a level with 4 children
        (
            _cohort(40, 4, 12, 2).assign(died=lambda d: d.age),
            "died ~ C(sex)",
            {("C(sex)[T.M]", "non-zero", "threshold")},
            "counts behind C(sex)[T.M] below 10",
        ),
        # 9 deaths in all
        (
            _cohort(40, 40, 4, 5),
            "died ~ age",
            {("outcome", "events", "threshold")},
            "events below 10",
        ),
        # every death among girls is fine, but only 3 boys survived
        (
            _cohort(40, 40, 12, 37),
            "died ~ C(sex)",
            {("C(sex)[T.M]", "non-zero non-events", "threshold")},
            "non-events behind C(sex)[T.M] below 10",
        ),
        # 8 deaths among girls: the zero side of the boys' column
        (
            _cohort(40, 40, 8, 15),
            "died ~ C(sex)",
            {("C(sex)[T.M]", "zero events", "threshold")},
            "events behind C(sex)[T.M] below 10",
        ),
    ],
)
def test_each_rule_fails_its_share(
    cohort: pd.DataFrame, formula: str, failing: set[tuple[str, str, str]], reason: str
) -> None:
    s = federate.linear_stats(cohort, formula, SEX if "sex" in formula else None)
    assert s.status == "fail"
    assert _failed(s) == failing
    assert reason in s.reasons
    # Templated reasons: the only numbers are the policy's thresholds and column names.
    for r in s.reasons:
        assert set(re.findall(r"\d+", r)) <= {"10"}, r
    assert s.release_payload()["federate"]["r"] is None
    assert s.release_payload()["federate"]["n"] is None
    assert s.table.isna().all().all()


def test_thresholds_come_from_the_site_policy_and_equality_passes() -> None:
    cohort = _cohort(40, 12, 12, 6).assign(died=lambda d: d.age)
    assert federate.linear_stats(cohort, "died ~ C(sex)", SEX).status == "pass"
    strict = Policy(min_count=13)
    s = federate.linear_stats(cohort, "died ~ C(sex)", SEX, policy=strict)
    assert s.status == "fail" and "counts behind C(sex)[T.M] below 13" in s.reasons
    # The node re-checks with its own policy, whatever the kernel used.
    assert sdc.recheck(s.to_payload(), Policy()).status == "pass"
    assert (
        sdc.recheck(federate.linear_stats(cohort, "died ~ C(sex)", SEX).to_payload(), strict).status
        == "fail"
    )
    few = _cohort(20, 20, 5, 5).assign(died=lambda d: d.age)
    assert federate.linear_stats(few, "died ~ age", policy=Policy(min_dof=38)).status == "pass"
    assert federate.linear_stats(few, "died ~ age", policy=Policy(min_dof=39)).status == "fail"


def test_a_level_absent_at_a_site_passes_with_its_zero_column() -> None:
    girls = _cohort(40, 0, 12, 0)
    s = federate.linear_stats(girls, "died ~ age + C(sex)", SEX)
    assert s.status == "pass", s.reasons
    assert s.columns == ["Intercept", "C(sex)[T.M]", "age"]
    zeros = s.checks[s.checks["rule"] == "zeros"]
    assert list(zeros["row"]) == ["C(sex)[T.M]"] and set(zeros["status"]) == {"pass"}
    g = federate.glm_round(girls, federate.GLM("died ~ age + C(sex)", "binomial", SEX))
    assert g.status == "pass"


def test_glm_round_shares_are_rechecked_and_rebuilt_by_the_site() -> None:
    cohort = _cohort(40, 40, 12, 15)
    m = federate.GLM("died ~ age + C(sex)", "binomial", SEX)
    g = federate.glm_round(cohort, m)
    payload = json.loads(json.dumps(g.to_payload()))
    result = sdc.recheck(payload, Policy())
    assert result.status == "pass" and result.output is not None
    released = result.output.release_payload()
    assert released["federate"] == g.release_payload()["federate"]
    assert released["federate"]["state_hash"] == m.state_hash
    # A binomial round reveals events behind each level: they are checked too.
    small = federate.glm_round(_cohort(40, 40, 12, 4), m)
    assert small.status == "fail" and "events behind C(sex)[T.M] below 10" in small.reasons


def _checked(bundle: dict[str, Any]) -> str:
    data = json.loads(json.dumps(bundle, allow_nan=False))
    out = check_output(
        {"output_type": "display_data", "data": data, "metadata": {}},
        CheckContext(Policy(), load_recheck()),
    )
    return str(out.verdict.status)


def test_forged_shares_fail_at_the_site() -> None:
    s = federate.linear_stats(_cohort(40, 40, 12, 15), "died ~ age + C(sex)", SEX)
    bundle = share_bundle("mortality", s)
    assert _checked(bundle) == "pass"
    # Counts that do not agree with the released matrix: the rules would read other data.
    forged = copy.deepcopy(bundle)
    forged[SHARE_MIME]["payload"]["evidence"]["counts"]["support"]["C(sex)[T.M]"] = 60
    assert _checked(forged) == "fail"
    result = sdc.recheck(forged[SHARE_MIME]["payload"], Policy())
    assert (
        result.status == "fail"
        and "does not agree with the released cross-products" in result.reasons[0]
    )
    # A published table edited after the check.
    edited = copy.deepcopy(bundle)
    edited[SHARE_MIME]["payload"]["table"]["data"][0][0] = 1.0
    assert _checked(edited) == "fail"
    # A small level hidden by claiming a pass.
    small = federate.linear_stats(_cohort(40, 4, 12, 2), "died ~ C(sex)", SEX).to_payload()
    small["status"] = "pass"
    assert sdc.recheck(small, Policy()).status == "fail"


# ---------------------------------------------------------------------------
# loading released shares
# ---------------------------------------------------------------------------
def _release(
    root: Path, site: str, shared: dict[str, dict[str, Any]], outputs: list[dict[str, Any]]
) -> None:
    rel = root / site / "release"
    (rel / "shared").mkdir(parents=True)
    (rel / "manifest.json").write_text(json.dumps({"site": site, "release": {"outputs": outputs}}))
    for name, payload in shared.items():
        (rel / "shared" / f"{name}.json").write_text(json.dumps(payload))


def test_load_shares_reads_what_phds_results_wrote(tmp_path: Path) -> None:
    formula = "died ~ age + C(sex)"
    a = federate.linear_stats(_cohort(40, 40, 12, 15), formula, SEX)
    b = federate.linear_stats(_cohort(30, 50, 11, 20), formula, SEX)
    _release(tmp_path, "site_a", {"mortality": a.release_payload()}, [])
    _release(tmp_path, "site_b", {"mortality": b.release_payload()}, [])
    withheld = {
        "kind": "structured/federate.linear_stats",
        "state": "withheld",
        "reason": "withheld: it failed the site's disclosure checks",
    }
    _release(tmp_path, "site_c", {}, [withheld])
    summary = {"sites": {s: {"status": "released"} for s in ("site_a", "site_b", "site_c")}}
    summary["sites"]["site_d"] = {"status": "awaiting_review"}
    (tmp_path / "results.json").write_text(json.dumps(summary))
    shares = federate.load_shares(tmp_path, "mortality")
    assert sorted(shares) == ["site_a", "site_b", "site_c", "site_d"]
    assert shares["site_c"]["schema"] == WITHHELD_SCHEMA
    assert "failed the site's disclosure checks" in shares["site_c"]["reason"]
    assert "not released (status awaiting_review)" in shares["site_d"]["reason"]
    result = federate.ols(shares)
    assert result.sites_used == ["site_a", "site_b"] and result.nobs == 160
    assert "site_c withheld (not in the release; the site withheld: it failed" in result.summary()
    assert "n 160 from 2 of 4 sites" in result.summary()
    # One release folder alone.
    single = federate.load_shares(tmp_path / "site_a" / "release", "mortality")
    assert list(single) == ["site_a"] and single["site_a"]["federate"]["n"] == 80


def test_load_shares_refuses_malformed_files(tmp_path: Path) -> None:
    _release(tmp_path, "site_a", {"mortality": {"schema": "other"}}, [])
    with pytest.raises(ShareError, match="not a released phds output payload"):
        federate.load_shares(tmp_path, "mortality")
    (tmp_path / "site_a" / "release" / "shared" / "mortality.json").write_text("{not json")
    with pytest.raises(ShareError, match="cannot read JSON"):
        federate.load_shares(tmp_path, "mortality")
    with pytest.raises(ShareError, match="not a folder of released results"):
        federate.load_shares(tmp_path / "nowhere", "mortality")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShareError, match="no site release folders"):
        federate.load_shares(empty, "mortality")


# ---------------------------------------------------------------------------
# a real site run
# ---------------------------------------------------------------------------
SEPSIS_SQL = f"""
    WITH picu AS (
      SELECT v.visit_occurrence_id, v.person_id, v.visit_start_date, v.visit_end_date
      FROM visit_occurrence v
      WHERE v.visit_concept_id = {concepts.INTENSIVE_CARE} AND EXISTS (
        SELECT 1 FROM condition_occurrence co
        WHERE co.visit_occurrence_id = v.visit_occurrence_id
          AND co.condition_concept_id = {concepts.SEPSIS})
    ), lac AS (
      SELECT visit_occurrence_id, arg_min(value_as_number, measurement_datetime) AS lactate
      FROM measurement JOIN picu USING (visit_occurrence_id)
      WHERE measurement_concept_id = {concepts.LACTATE} GROUP BY ALL
    )
    SELECT CASE WHEN p.gender_concept_id = {concepts.MALE} THEN 'M' ELSE 'F' END AS sex,
           date_diff('day', CAST(p.birth_datetime AS DATE), picu.visit_start_date) / 365.25 AS age,
           lac.lactate,
           (d.death_date IS NOT NULL AND d.death_date <= picu.visit_end_date)::INT AS died
    FROM picu JOIN person p USING (person_id) JOIN lac USING (visit_occurrence_id)
    LEFT JOIN death d USING (person_id)
"""
STUDY = f"from phds_tre import data, federate, share\ndf = data.connect().sql({SEPSIS_SQL!r})"
SHARES = (
    'share("glm_round", federate.glm_round(df, federate.GLM.from_state(glm_state)))',
    'share("lactate", federate.linear_stats(df, "lactate ~ age + C(sex)", {"sex": ["F", "M"]}))',
    # a filter leaving 4 boys: withheld
    'import pandas as pd\nfew = pd.concat([df[df.sex == "F"].head(30), df[df.sex == "M"].head(4)])\n'
    'share("few_boys", federate.linear_stats(few, "lactate ~ age + C(sex)", {"sex": ["F", "M"]}))',
)


@pytest.mark.slow
def test_shares_travel_through_a_real_site_run(
    tmp_path: Path, site_dir: Path, phds_home: Path
) -> None:
    m = federate.GLM("died ~ lactate + age + C(sex)", family="binomial", levels=SEX)
    nb = new_notebook(
        cells=[
            new_code_cell('glm_state = ""', metadata={"tags": ["parameters"]}),
            new_code_cell(STUDY),
            *(new_code_cell(s) for s in SHARES),
        ],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    path = tmp_path / "study.ipynb"
    nbformat.write(nb, path)
    out = tmp_path / "out"
    run = SiteRun(
        notebook_path=path,
        site_dir=site_dir,
        out_dir=out,
        parameters={"glm_state": m.state()},
        site_name=site_dir.name,
        echo=lambda _: None,
    )
    record = run.run()
    assert record["execution"]["status"] == "completed", record
    shared = out / "release" / "shared"
    assert sorted(p.name for p in shared.iterdir()) == ["glm_round.json", "lactate.json"]
    for name in ("glm_round", "lactate"):
        payload = json.loads((shared / f"{name}.json").read_text())
        assert payload["status"] == "pass" and "evidence" not in payload
    # The coordinator reads the release as `phds results` leaves it.
    lactate = federate.load_shares(out, "lactate")
    cohort = federate.load_shares(out, "few_boys")
    assert cohort[site_dir.name]["schema"] == WITHHELD_SCHEMA
    assert "failed the site's disclosure checks" in cohort[site_dir.name]["reason"]
    df = data.connect(site_dir).sql(SEPSIS_SQL)
    expected = smf.ols("lactate ~ age + C(sex)", df).fit()
    got = federate.ols(lactate)
    np.testing.assert_allclose(got.params, expected.params, rtol=1e-8)
    m.update(federate.load_shares(out, "glm_round"))
    local = federate.GLM("died ~ lactate + age + C(sex)", family="binomial", levels=SEX)
    local.update([federate.glm_round(df, local)])
    assert m.iteration == local.iteration == 1
    np.testing.assert_allclose(m.params, local.params, rtol=1e-10)


def test_the_site_rechecks_a_share_without_importing_federate_first(tmp_path: Path) -> None:
    # The node's checker imports only phds_tre.sdc: the share kinds register on demand.
    payload = federate.linear_stats(_cohort(40, 40, 12, 15), "died ~ age + C(sex)", SEX)
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload.to_payload()))
    code = (
        "import json, sys\n"
        "from phds_tre.sdc import Policy, recheck\n"
        "assert 'phds_tre.federate.linear' not in sys.modules\n"
        f"print(recheck(json.loads(open({str(path)!r}).read()), Policy()).status)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "pass"
