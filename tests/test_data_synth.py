"""The synthetic paediatric hospitals: determinism, OMOP shape, clinical realism, the known model."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import statsmodels.api as sm
from click.testing import CliRunner

from phds_tre import data
from phds_tre.cli import cli
from phds_tre.data import concepts as c
from phds_tre.data import synth

SITES = ("hospital_a_barcelona", "hospital_b_london", "hospital_c_girona")
REQUIRED = {
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "measurement",
    "drug_exposure",
    "death",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default three sites, seed 0."""
    out = tmp_path_factory.mktemp("synth")
    summaries = synth.generate(out)
    assert [s.name for s in summaries] == list(SITES)
    return out


@pytest.fixture(scope="module")
def sites(root: Path) -> Iterator[dict[str, data.Site]]:
    opened = {name: data.connect(root / name) for name in SITES}
    yield opened
    for s in opened.values():
        s.close()


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.parquet"))
    }


def test_same_seed_gives_the_same_bytes_and_another_seed_other_data(
    root: Path, tmp_path: Path
) -> None:
    synth.generate(tmp_path / "again", seed=0)
    assert _digests(tmp_path / "again") == _digests(root)
    assert len(_digests(root)) == len(SITES) * len(synth.SCHEMA)

    synth.generate(tmp_path / "other", seed=1)
    with (
        data.connect(root / SITES[0]) as a,
        data.connect(tmp_path / "other" / SITES[0]) as b,
    ):
        births_a = a.sql("SELECT birth_datetime FROM person ORDER BY person_id")
        births_b = b.sql("SELECT birth_datetime FROM person ORDER BY person_id")
    assert len(births_a) == len(births_b)  # same sizes, different children
    assert not births_a.equals(births_b)


def test_every_table_has_the_documented_columns_and_types(sites: dict[str, data.Site]) -> None:
    named_in_cdm = {
        "person": {"person_id", "gender_concept_id", "year_of_birth", "month_of_birth",
                   "day_of_birth", "birth_datetime", "race_concept_id", "ethnicity_concept_id",
                   "person_source_value", "gender_source_value"},
        "visit_occurrence": {"visit_occurrence_id", "visit_concept_id", "visit_start_date",
                             "visit_end_date"},
        "condition_occurrence": {"condition_concept_id", "condition_start_date"},
        "measurement": {"measurement_concept_id", "value_as_number", "unit_concept_id"},
        "drug_exposure": {"drug_concept_id", "drug_exposure_start_date"},
        "death": {"death_date", "cause_concept_id"},
    }  # fmt: skip
    for table, names in named_in_cdm.items():
        assert names <= {col for col, _ in synth.SCHEMA[table]}, table
    for site in sites.values():
        assert set(site.tables()) >= REQUIRED
        assert set(site.tables()) == set(synth.SCHEMA)
        for table, columns in synth.SCHEMA.items():
            described = site.sql(f"DESCRIBE {table}")
            assert list(zip(described.column_name, described.column_type, strict=True)) == [
                (col, typ) for col, typ in columns
            ]
            for col, typ in columns:  # dates are DATEs, datetimes TIMESTAMPs
                if col.endswith("_date"):
                    assert typ == "DATE", (table, col)
                if col.endswith("_datetime"):
                    assert typ == "TIMESTAMP", (table, col)
        person = site.table("person")
        assert pd.api.types.is_datetime64_any_dtype(person["birth_datetime"])
        # Full birth timestamps (identifiers the leak scanners look for), not midnights.
        assert (person["birth_datetime"].dt.hour != 0).mean() > 0.9


def test_children_are_0_to_17_and_records_are_consistent(sites: dict[str, data.Site]) -> None:
    for name, site in sites.items():
        ages = site.sql(
            """
            SELECT p.person_id,
                   date_diff('day', CAST(p.birth_datetime AS DATE), min(v.visit_start_date)) / 365.25 AS age
            FROM person p JOIN visit_occurrence v USING (person_id)
            GROUP BY p.person_id, p.birth_datetime
            """
        )
        assert len(ages) == len(site.table("person")), name  # everyone has a visit
        assert ages.age.between(0, 18, inclusive="left").all(), name
        bad = site.sql(
            f"""
            SELECT
              (SELECT count(*) FROM visit_occurrence v JOIN person p USING (person_id)
                 WHERE v.visit_start_datetime < p.birth_datetime) AS before_birth,
              (SELECT count(*) FROM visit_occurrence WHERE visit_end_datetime < visit_start_datetime) AS ends_early,
              (SELECT count(*) FROM visit_occurrence v JOIN death d USING (person_id)
                 WHERE v.visit_start_date > d.death_date) AS after_death,
              (SELECT count(*) FROM measurement m JOIN death d USING (person_id)
                 WHERE m.measurement_date > d.death_date) AS measured_after_death,
              (SELECT count(*) FROM visit_occurrence WHERE visit_start_date > DATE '2024-12-31') AS after_extraction,
              (SELECT count(*) FROM visit_occurrence v JOIN observation_period o USING (person_id)
                 WHERE v.visit_start_date < o.observation_period_start_date
                    OR v.visit_end_date > o.observation_period_end_date) AS outside_observation,
              (SELECT count(*) FROM drug_exposure x JOIN observation_period o USING (person_id)
                 WHERE x.drug_exposure_start_date < o.observation_period_start_date
                    OR x.drug_exposure_end_date > o.observation_period_end_date) AS drugs_outside,
              (SELECT count(*) FROM condition_occurrence x LEFT JOIN visit_occurrence v USING (visit_occurrence_id)
                 WHERE v.person_id IS DISTINCT FROM x.person_id) AS orphan_conditions,
              (SELECT count(*) - count(DISTINCT person_id) FROM death) AS double_deaths,
              (SELECT count(*) FROM person WHERE gender_concept_id NOT IN ({c.MALE}, {c.FEMALE})) AS bad_gender
            """
        )
        assert bad.iloc[0].to_dict() == dict.fromkeys(bad.columns, 0), name


def test_measurements_are_in_physiological_ranges(sites: dict[str, data.Site]) -> None:
    limits = {
        c.LACTATE: (0.3, 25.0, c.MILLIMOLE_PER_LITER),
        c.C_REACTIVE_PROTEIN: (0.3, 500.0, c.MILLIGRAM_PER_LITER),
        c.HEART_RATE: (40.0, 250.0, c.PER_MINUTE),
    }
    for site in sites.values():
        m = site.table("measurement")
        assert set(m.measurement_concept_id) == set(limits)
        for concept, (low, high, unit) in limits.items():
            rows = m[m.measurement_concept_id == concept]
            assert rows.value_as_number.between(low, high).all()
            assert (rows.unit_concept_id == unit).all()
        lactate = m[m.measurement_concept_id == c.LACTATE].value_as_number
        assert 1.5 < lactate.median() < 3.5  # PICU sepsis lactates, mmol/L


def test_case_mix_differs_between_sites(sites: dict[str, data.Site]) -> None:
    mix = {}
    for name, site in sites.items():
        mix[name] = site.sql(
            f"""
            SELECT
              (SELECT count(DISTINCT person_id) FROM condition_occurrence
                 WHERE condition_concept_id IN ({c.CONGENITAL_HEART_DISEASE}, {c.HYPOPLASTIC_LEFT_HEART_SYNDROME}))
                / (SELECT count(*) FROM person) AS chd,
              (SELECT count(*) FROM visit_occurrence WHERE visit_concept_id = {c.INTENSIVE_CARE})
                / (SELECT count(*) FROM person) AS picu,
              (SELECT count(DISTINCT person_id) FROM condition_occurrence
                 WHERE condition_concept_id = {c.HYPOPLASTIC_LEFT_HEART_SYNDROME}) AS hlhs
            """
        ).iloc[0]
    a, b, regional = (mix[s] for s in SITES)
    assert b.chd > 3 * a.chd and a.chd > 2 * regional.chd  # the cardiac centre
    assert a.picu > 3 * regional.picu  # the regional hospital has few PICU beds
    assert b.hlhs > a.hlhs > 0 and regional.hlhs == 0  # HLHS is referred out


def test_mortality_model_is_recovered_by_logistic_regression(sites: dict[str, data.Site]) -> None:
    cohort_sql = f"""
        WITH picu AS (
          SELECT v.visit_occurrence_id, v.person_id, v.visit_start_date, v.visit_end_date
          FROM visit_occurrence v
          WHERE v.visit_concept_id = {c.INTENSIVE_CARE} AND EXISTS (
            SELECT 1 FROM condition_occurrence co
            WHERE co.visit_occurrence_id = v.visit_occurrence_id
              AND co.condition_concept_id = {c.SEPSIS})
        ), first_value AS (
          SELECT visit_occurrence_id, measurement_concept_id,
                 arg_min(value_as_number, measurement_datetime) AS value
          FROM measurement JOIN picu USING (visit_occurrence_id) GROUP BY ALL
        )
        SELECT (p.gender_concept_id = {c.MALE})::INT AS male,
               date_diff('day', CAST(p.birth_datetime AS DATE), picu.visit_start_date) / 365.25 AS age,
               lac.value AS lactate, crp.value AS crp, hr.value AS hr,
               (d.death_date IS NOT NULL AND d.death_date <= picu.visit_end_date)::INT AS died
        FROM picu JOIN person p USING (person_id)
        JOIN first_value lac ON lac.visit_occurrence_id = picu.visit_occurrence_id
             AND lac.measurement_concept_id = {c.LACTATE}
        JOIN first_value crp ON crp.visit_occurrence_id = picu.visit_occurrence_id
             AND crp.measurement_concept_id = {c.C_REACTIVE_PROTEIN}
        JOIN first_value hr ON hr.visit_occurrence_id = picu.visit_occurrence_id
             AND hr.measurement_concept_id = {c.HEART_RATE}
        LEFT JOIN death d USING (person_id)
    """
    cohort = pd.concat([site.sql(cohort_sql) for site in sites.values()], ignore_index=True)
    assert len(cohort) > 1500
    assert 0.05 < cohort.died.mean() < 0.25
    x = pd.DataFrame(
        {
            "intercept": 1.0,
            "lactate_mmol_per_l": cohort.lactate,
            "age_years": cohort.age,
            "male": cohort.male,
            "crp_per_10_mg_per_l": cohort.crp / 10,
            "heart_rate_per_10_bpm": cohort.hr / 10,
        }
    ).astype(float)
    fit = sm.Logit(cohort.died.astype(float), x).fit(disp=0)
    ci = fit.conf_int(alpha=0.05)
    assert set(synth.TRUE_EFFECTS) == set(x.columns)
    for name, true in synth.TRUE_EFFECTS.items():
        low, high = ci.loc[name]
        assert low <= true <= high, (name, true, low, high)
    assert ci.loc["lactate_mmol_per_l"].iloc[0] > 0  # and lactate's effect is detected


def test_rare_conditions_have_counts_below_disclosure_thresholds(
    sites: dict[str, data.Site],
) -> None:
    for site in sites.values():
        counts = site.sql(
            f"""
            SELECT condition_source_value, count(DISTINCT person_id) AS n
            FROM condition_occurrence
            WHERE condition_concept_id IN
                  ({c.SEVERE_COMBINED_IMMUNODEFICIENCY}, {c.MITOCHONDRIAL_CYTOPATHY})
               OR condition_source_value = '{c.ICD10["haemophilia_b"]}'
            GROUP BY 1
            """
        )
        n = dict(zip(counts.condition_source_value, counts.n, strict=True))
        assert 1 <= n[c.ICD10["severe_combined_immunodeficiency"]] <= 6
        assert 1 <= n[c.ICD10["mitochondrial_cytopathy"]] <= 6
        assert n.get(c.ICD10["haemophilia_b"], 0) < 10


def test_record_numbers_are_unique_and_in_each_site_format(
    sites: dict[str, data.Site],
) -> None:
    formats = {
        "hospital_a_barcelona": r"HSJD-\d{7}",
        "hospital_b_london": r"MRN\d{8}",
        "hospital_c_girona": r"NHC \d{7}",
    }
    for name, site in sites.items():
        numbers = site.table("person").person_source_value
        assert numbers.is_unique
        assert numbers.map(lambda v, f=formats[name]: re.fullmatch(f, v) is not None).all()
        for other, pattern in formats.items():
            if other != name:
                assert not numbers.str.fullmatch(pattern).any()


def test_haemophilia_boys_get_factor_viii_or_ix(sites: dict[str, data.Site]) -> None:
    site = sites["hospital_a_barcelona"]
    haem = site.sql(
        f"""
        SELECT DISTINCT person_id, condition_source_value AS icd, gender_concept_id
        FROM condition_occurrence JOIN person USING (person_id)
        WHERE condition_source_value IN ('{c.ICD10["haemophilia_a"]}', '{c.ICD10["haemophilia_b"]}')
        """
    )
    assert (haem.gender_concept_id == c.MALE).all()
    assert set(haem.icd) == {"D66", "D67"}
    coded_a = site.sql(
        f"SELECT DISTINCT condition_source_value AS icd FROM condition_occurrence "
        f"WHERE condition_concept_id = {c.HAEMOPHILIA_A}"
    )
    assert list(coded_a.icd) == ["D66"]
    drugs = site.table("drug_exposure").merge(haem, on="person_id", how="left")
    factor_viii = drugs[drugs.drug_concept_id == c.FACTOR_VIII]
    factor_ix = drugs[drugs.drug_source_value.str.startswith(c.ATC["factor_ix"])]
    assert len(factor_viii) > 0 and (factor_viii.icd == "D66").all()
    assert len(factor_ix) > 0 and (factor_ix.icd == "D67").all()
    assert (factor_ix.drug_concept_id == c.NO_MATCHING_CONCEPT).all()
    prophylaxis = factor_viii[factor_viii.days_supply == 28]
    assert (prophylaxis.quantity > 0).all() and prophylaxis.visit_occurrence_id.isna().all()


def test_cardiac_pathway_has_surgery_length_of_stay_and_readmissions(
    sites: dict[str, data.Site],
) -> None:
    site = sites["hospital_b_london"]
    stays = site.sql(
        """
        SELECT pr.procedure_concept_id, v.visit_occurrence_id,
               date_diff('day', v.visit_start_date, v.visit_end_date) AS los
        FROM procedure_occurrence pr JOIN visit_occurrence v USING (visit_occurrence_id)
        """
    )
    assert set(stays.procedure_concept_id) == {
        c.CLOSURE_OF_VSD,
        c.REPAIR_OF_TETRALOGY_OF_FALLOT,
        c.NORWOOD_PROCEDURE,
    }
    los = stays.groupby("procedure_concept_id").los.median()
    assert los[c.CLOSURE_OF_VSD] < los[c.REPAIR_OF_TETRALOGY_OF_FALLOT] < los[c.NORWOOD_PROCEDURE]
    readmissions = site.sql(
        """
        SELECT date_diff('day', s.visit_end_date, r.visit_start_date) AS gap
        FROM visit_occurrence r JOIN visit_occurrence s
          ON r.preceding_visit_occurrence_id = s.visit_occurrence_id
        WHERE s.visit_occurrence_id IN (SELECT visit_occurrence_id FROM procedure_occurrence)
        """
    )
    assert len(readmissions) > 20 and readmissions.gap.between(0, 30).all()
    lesions = site.sql(
        f"""
        SELECT condition_source_value, count(DISTINCT person_id) AS n FROM condition_occurrence
        WHERE condition_concept_id = {c.CONGENITAL_HEART_DISEASE} GROUP BY 1
        """
    )
    assert set(lesions.condition_source_value) == {"Q21.0", "Q21.3"}  # VSD, tetralogy of Fallot


def test_persons_scales_the_largest_site_and_small_sites_still_have_every_table(
    tmp_path: Path,
) -> None:
    summaries = synth.generate(tmp_path, sites=5, persons=40, seed=7)
    assert [s.rows["person"] for s in summaries] == [40, 25, 20, 20, 20]
    for s in summaries:
        assert sorted(p.stem for p in s.folder.glob("*.parquet")) == sorted(synth.SCHEMA)
        with data.connect(s.folder) as site:
            assert len(site.table("person")) == s.rows["person"]
            for table, n in s.rows.items():
                assert site.sql(f"SELECT count(*) AS n FROM {table}").n[0] == n
    with pytest.raises(ValueError, match="sites"):
        synth.site_sizes(sites=len(synth.SITE_PROFILES) + 1)
    with pytest.raises(ValueError, match="persons"):
        synth.site_sizes(persons=5)


def test_phds_synth_command_writes_sites_and_prints_a_summary(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["synth", "--out", str(tmp_path), "--sites", "2", "--persons", "100"]
    )
    assert result.exit_code == 0, result.output
    assert "hospital_a_barcelona" in result.output and "hospital_b_london" in result.output
    assert re.search(r"2 sites written in \d+\.\d s", result.output)
    assert (tmp_path / "hospital_b_london" / "person.parquet").is_file()
    with data.connect(tmp_path / "hospital_b_london") as site:
        assert len(site.table("person")) == 62  # 2500 / 4000 of 100
    bad = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path), "--sites", "6"])
    assert bad.exit_code == 2
    # The CLI's --sites range is the list of profiles.
    param = next(p for p in cli.commands["synth"].params if p.name == "sites")
    assert param.type.max == len(synth.SITE_PROFILES)  # type: ignore[attr-defined]
