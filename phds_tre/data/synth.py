"""Synthetic paediatric hospitals in the OMOP CDM v5.4, for dry runs, tests and teaching.

:func:`generate` writes ``out_dir/<site>/<table>.parquet`` for several hospitals
with different sizes and case mixes (a large tertiary centre, a cardiac centre, a
small regional hospital, ...). Each site holds the PHEMS use cases:

* **sepsis in paediatric intensive care** — an emergency-room visit, a PICU stay
  (``visit_concept_id`` 32037), the sepsis diagnosis, lactate / CRP / heart-rate
  measurements, antibiotics, and in-hospital death drawn from a known logistic
  model (:data:`TRUE_EFFECTS`), so an analysis can check that it recovers it;
* **congenital heart disease pathways** — VSD, tetralogy of Fallot and HLHS:
  diagnosis, surgical admission with the operation, length of stay, in-hospital
  death, 30-day readmissions and follow-up;
* **haemophilia A and B** — factor VIII / IX prophylaxis dispensings (some on
  emicizumab), emergency visits for bleeds with on-demand doses;
* **rare diseases** (SCID, mitochondrial cytopathy) with a handful of children
  per site: the counts that disclosure control must catch;
* general paediatrics (bronchiolitis, asthma, pneumonia, appendicitis, ...).

Person rows carry identifiers the leak scanners look for: a hospital record
number in each site's own format (``HSJD-0012345``, ``MRN12345678``,
``NHC 4567890``, ...) and a full ``birth_datetime``. Everything is drawn from
``numpy.random`` seeded per site, so the same seed gives the same bytes.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from phds_tre.data import concepts as c

DAY: Final = 86_400
HOUR: Final = 3_600
_EPOCH = np.datetime64("1970-01-01", "D")


def _day(iso: str) -> int:
    return int((np.datetime64(iso, "D") - _EPOCH).astype(int))


#: First day an index event (admission, diagnosis) can fall on.
DATA_START: Final = _day("2017-01-01")
#: Last day an index event can fall on (so every child has some follow-up).
INDEX_END: Final = _day("2024-06-30")
#: Extraction date: no record starts after it; stays still open end on it.
DATA_END: Final = _day("2024-12-31")

#: The true logistic model of in-hospital death in the PICU sepsis cohort.
#:
#: ``logit P(death) = intercept + lactate_mmol_per_l * lactate + age_years * age
#: + male * [male] + crp_per_10_mg_per_l * CRP / 10 + heart_rate_per_10_bpm * HR / 10``
#: where lactate, CRP and heart rate are the first measurement of each of them in
#: the PICU stay (the admission values), age is ``(visit_start_date -
#: date(birth_datetime)).days / 365.25``, male is ``gender_concept_id == 8507``.
#: One PICU sepsis stay per child. Heart rate has no effect of its own (0.0): it
#: rises with lactate and falls with age, a marker rather than a cause.
TRUE_EFFECTS: Final[dict[str, float]] = {
    "intercept": -3.2,
    "lactate_mmol_per_l": 0.30,
    "age_years": -0.06,
    "male": 0.25,
    "crp_per_10_mg_per_l": 0.04,
    "heart_rate_per_10_bpm": 0.0,
}


@dataclass(frozen=True)
class SiteProfile:
    """One synthetic hospital: its size, case mix and record-number format."""

    name: str
    description: str
    persons: int
    record_prefix: str
    record_digits: int
    sepsis: float  # share of persons with a PICU sepsis stay
    chd: float  # share with a congenital heart surgery pathway
    haemophilia: float  # share with haemophilia A or B
    lesions: tuple[float, float, float]  # VSD, tetralogy of Fallot, HLHS among CHD
    scid: tuple[int, int]  # inclusive range of children with SCID
    mitochondrial: tuple[int, int]  # inclusive range with mitochondrial cytopathy

    def record_numbers(self, numbers: np.ndarray) -> list[str]:
        """Format hospital record numbers, zero-padded to the site's width."""
        return [f"{self.record_prefix}{int(x):0{self.record_digits}d}" for x in numbers]


#: The hospitals, largest first; ``generate(sites=n)`` takes the first n.
SITE_PROFILES: Final[tuple[SiteProfile, ...]] = (
    SiteProfile(
        "hospital_a_barcelona",
        "tertiary children's hospital: large PICU, haemophilia reference centre",
        persons=4000,
        record_prefix="HSJD-",
        record_digits=7,
        sepsis=0.32,
        chd=0.10,
        haemophilia=0.012,
        lesions=(0.55, 0.30, 0.15),
        scid=(2, 5),
        mitochondrial=(3, 6),
    ),
    SiteProfile(
        "hospital_b_london",
        "cardiac centre: most congenital heart surgery, HLHS programme",
        persons=2500,
        record_prefix="MRN",
        record_digits=8,
        sepsis=0.16,
        chd=0.45,
        haemophilia=0.004,
        lesions=(0.40, 0.35, 0.25),
        scid=(1, 3),
        mitochondrial=(1, 4),
    ),
    SiteProfile(
        "hospital_c_girona",
        "regional hospital: few PICU beds, complex cardiac cases referred out",
        persons=1200,
        record_prefix="NHC ",
        record_digits=7,
        sepsis=0.07,
        chd=0.03,
        haemophilia=0.004,
        lesions=(0.85, 0.15, 0.0),
        scid=(1, 2),
        mitochondrial=(1, 3),
    ),
    SiteProfile(
        "hospital_d_lyon",
        "university children's hospital: mixed case load",
        persons=1800,
        record_prefix="IPP ",
        record_digits=9,
        sepsis=0.20,
        chd=0.15,
        haemophilia=0.008,
        lesions=(0.50, 0.30, 0.20),
        scid=(1, 4),
        mitochondrial=(2, 5),
    ),
    SiteProfile(
        "hospital_e_tartu",
        "small national children's clinic",
        persons=1000,
        record_prefix="TK/",
        record_digits=6,
        sepsis=0.08,
        chd=0.05,
        haemophilia=0.003,
        lesions=(0.70, 0.30, 0.0),
        scid=(1, 2),
        mitochondrial=(1, 2),
    ),
)

#: Columns of every table with their DuckDB types (OMOP CDM v5.4 names; only the
#: columns the generator fills). Dates are DATE, datetimes TIMESTAMP.
SCHEMA: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "person": (
        ("person_id", "BIGINT"),
        ("gender_concept_id", "INTEGER"),
        ("year_of_birth", "INTEGER"),
        ("month_of_birth", "INTEGER"),
        ("day_of_birth", "INTEGER"),
        ("birth_datetime", "TIMESTAMP"),
        ("race_concept_id", "INTEGER"),
        ("ethnicity_concept_id", "INTEGER"),
        ("person_source_value", "VARCHAR"),
        ("gender_source_value", "VARCHAR"),
    ),
    "observation_period": (
        ("observation_period_id", "BIGINT"),
        ("person_id", "BIGINT"),
        ("observation_period_start_date", "DATE"),
        ("observation_period_end_date", "DATE"),
        ("period_type_concept_id", "INTEGER"),
    ),
    "visit_occurrence": (
        ("visit_occurrence_id", "BIGINT"),
        ("person_id", "BIGINT"),
        ("visit_concept_id", "INTEGER"),
        ("visit_start_date", "DATE"),
        ("visit_start_datetime", "TIMESTAMP"),
        ("visit_end_date", "DATE"),
        ("visit_end_datetime", "TIMESTAMP"),
        ("visit_type_concept_id", "INTEGER"),
        ("visit_source_value", "VARCHAR"),
        ("preceding_visit_occurrence_id", "BIGINT"),
    ),
    "condition_occurrence": (
        ("condition_occurrence_id", "BIGINT"),
        ("person_id", "BIGINT"),
        ("condition_concept_id", "INTEGER"),
        ("condition_start_date", "DATE"),
        ("condition_start_datetime", "TIMESTAMP"),
        ("condition_type_concept_id", "INTEGER"),
        ("visit_occurrence_id", "BIGINT"),
        ("condition_source_value", "VARCHAR"),
    ),
    "procedure_occurrence": (
        ("procedure_occurrence_id", "BIGINT"),
        ("person_id", "BIGINT"),
        ("procedure_concept_id", "INTEGER"),
        ("procedure_date", "DATE"),
        ("procedure_datetime", "TIMESTAMP"),
        ("procedure_type_concept_id", "INTEGER"),
        ("visit_occurrence_id", "BIGINT"),
        ("procedure_source_value", "VARCHAR"),
    ),
    "measurement": (
        ("measurement_id", "BIGINT"),
        ("person_id", "BIGINT"),
        ("measurement_concept_id", "INTEGER"),
        ("measurement_date", "DATE"),
        ("measurement_datetime", "TIMESTAMP"),
        ("measurement_type_concept_id", "INTEGER"),
        ("value_as_number", "DOUBLE"),
        ("unit_concept_id", "INTEGER"),
        ("unit_source_value", "VARCHAR"),
        ("visit_occurrence_id", "BIGINT"),
        ("measurement_source_value", "VARCHAR"),
    ),
    "drug_exposure": (
        ("drug_exposure_id", "BIGINT"),
        ("person_id", "BIGINT"),
        ("drug_concept_id", "INTEGER"),
        ("drug_exposure_start_date", "DATE"),
        ("drug_exposure_start_datetime", "TIMESTAMP"),
        ("drug_exposure_end_date", "DATE"),
        ("drug_type_concept_id", "INTEGER"),
        ("quantity", "DOUBLE"),
        ("days_supply", "INTEGER"),
        ("route_source_value", "VARCHAR"),
        ("visit_occurrence_id", "BIGINT"),
        ("drug_source_value", "VARCHAR"),
    ),
    "death": (
        ("person_id", "BIGINT"),
        ("death_date", "DATE"),
        ("death_datetime", "TIMESTAMP"),
        ("death_type_concept_id", "INTEGER"),
        ("cause_concept_id", "INTEGER"),
        ("cause_source_value", "VARCHAR"),
    ),
}

# Start column of each event table: rows after a child's death or after the
# extraction date are dropped, and the observation period must cover them all.
_START: Final[dict[str, str]] = {
    "visit_occurrence": "visit_start_datetime",
    "condition_occurrence": "condition_start_datetime",
    "procedure_occurrence": "procedure_datetime",
    "measurement": "measurement_datetime",
    "drug_exposure": "drug_exposure_start_datetime",
}
_END: Final[dict[str, str]] = {
    "visit_occurrence": "visit_end_datetime",
    "drug_exposure": "drug_exposure_end_date",
}


@dataclass(frozen=True)
class SiteSummary:
    """What :func:`generate` wrote for one site."""

    name: str
    folder: Path
    description: str
    rows: dict[str, int] = field(default_factory=dict)


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _heart_rate_norm(age_years: np.ndarray) -> np.ndarray:
    """Typical heart rate (/min) by age: ~140 in newborns, ~95 in teenagers."""
    return 140.0 - 45.0 * (1.0 - np.exp(-age_years / 4.0))


class _Builder:
    """Collects the rows of one site; visits get temporary keys until ids are assigned.

    Times are int64 seconds since 1970-01-01 (``*_datetime``); person references
    are row positions in the person table (``person``), visit references are
    keys returned by :meth:`visits` (``visit``; -1 for none).
    """

    def __init__(self) -> None:
        self.frames: dict[str, list[pd.DataFrame]] = defaultdict(list)
        self._next_key = 0

    def visits(
        self,
        person: np.ndarray,
        concept: int | np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        source: str | np.ndarray,
        preceding: np.ndarray | None = None,
    ) -> np.ndarray:
        """Add visits and return their keys (for rows that belong to them)."""
        n = len(person)
        keys = np.arange(self._next_key, self._next_key + n, dtype=np.int64)
        self._next_key += n
        self.add(
            "visit_occurrence",
            person=person,
            visit=keys,
            visit_concept_id=concept,
            visit_start_datetime=start,
            visit_end_datetime=np.maximum(end, start),
            visit_source_value=source,
            preceding=np.full(n, -1, dtype=np.int64) if preceding is None else preceding,
        )
        return keys

    def add(self, table: str, **columns: Any) -> None:
        """Add rows (scalars are broadcast); skipped when there are none."""
        n = len(columns["person"])
        if n == 0:
            return
        data = {
            k: (np.full(n, v) if np.ndim(v) == 0 else np.asarray(v)) for k, v in columns.items()
        }
        self.frames[table].append(pd.DataFrame(data))

    def conditions(
        self,
        person: np.ndarray,
        concept: int | np.ndarray,
        icd10: str | np.ndarray,
        when: np.ndarray,
        visit: np.ndarray,
    ) -> None:
        """Add one diagnosis per person, recorded at ``when`` within ``visit``."""
        self.add(
            "condition_occurrence",
            person=person,
            condition_concept_id=concept,
            condition_start_datetime=when,
            visit=visit,
            condition_source_value=icd10,
        )

    def measurements(
        self,
        person: np.ndarray,
        concept: int,
        when: np.ndarray,
        value: np.ndarray,
        unit: int,
        unit_source: str,
        visit: np.ndarray,
        source: str,
    ) -> None:
        """Add numeric measurements."""
        self.add(
            "measurement",
            person=person,
            measurement_concept_id=concept,
            measurement_datetime=when,
            value_as_number=value.astype(float),
            unit_concept_id=unit,
            unit_source_value=unit_source,
            visit=visit,
            measurement_source_value=source,
        )

    def drugs(
        self,
        person: np.ndarray,
        concept: int | np.ndarray,
        start: np.ndarray,
        days: np.ndarray,
        source: str | np.ndarray,
        visit: np.ndarray,
        quantity: np.ndarray | None = None,
        days_supply: np.ndarray | None = None,
    ) -> None:
        """Add drug exposures lasting ``days`` (0 = same day)."""
        n = len(person)
        start_day = start // DAY
        self.add(
            "drug_exposure",
            person=person,
            drug_concept_id=concept,
            drug_exposure_start_datetime=start,
            drug_exposure_end_date=(start_day + days) * DAY,
            quantity=np.full(n, np.nan) if quantity is None else quantity.astype(float),
            days_supply=np.full(n, -1) if days_supply is None else days_supply,
            route_source_value="intravenous",
            visit=visit,
            drug_source_value=source,
        )


def _uniform_days(rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
    return rng.integers(lo, hi + 1, n).astype(np.int64)


def _clock(rng: np.random.Generator, n: int, lo_h: float = 0.0, hi_h: float = 24.0) -> np.ndarray:
    """Random seconds into a day between ``lo_h`` and ``hi_h`` o'clock."""
    return rng.integers(int(lo_h * HOUR), int(hi_h * HOUR), n).astype(np.int64)


@dataclass
class _People:
    """Birth datetime (seconds) and sex of each person, filled pathway by pathway."""

    birth: np.ndarray
    male: np.ndarray

    def set(
        self, who: np.ndarray, birth_day: np.ndarray, male: np.ndarray, rng: np.random.Generator
    ) -> None:
        self.birth[who] = birth_day * DAY + _clock(rng, len(who))
        self.male[who] = male


# Physiological bounds of the repeated PICU measurements.
_LIMITS: Final[dict[int, tuple[float, float]]] = {
    c.LACTATE: (0.3, 25.0),
    c.C_REACTIVE_PROTEIN: (0.3, 500.0),
    c.HEART_RATE: (40.0, 250.0),
}


def _sepsis(b: _Builder, people: _People, who: np.ndarray, rng: np.random.Generator) -> None:
    """PICU sepsis stays with the known mortality model (:data:`TRUE_EFFECTS`)."""
    m = len(who)
    if m == 0:
        return
    male = rng.random(m) < 0.54
    band = rng.choice(3, size=m, p=[0.35, 0.25, 0.40])  # infants, 1-4 y, 5-17 y
    age_days = np.select(
        [band == 0, band == 1],
        [rng.integers(3, 365, m), rng.integers(365, 5 * 365, m)],
        rng.integers(5 * 365, 18 * 365 - 1, m),
    ).astype(np.int64)
    admit_day = _uniform_days(rng, m, DATA_START, INDEX_END)
    people.set(who, admit_day - age_days, male, rng)
    admit = admit_day * DAY + _clock(rng, m)
    age = age_days / 365.25

    lactate = np.clip(np.round(np.exp(rng.normal(np.log(2.4), 0.6, m)), 1), 0.4, 20.0)
    crp = np.clip(np.round(np.exp(rng.normal(np.log(55.0), 0.9, m)), 1), 0.3, 450.0)
    hr = np.clip(
        np.round(_heart_rate_norm(age) + 5.0 * (lactate - 2.0) + rng.normal(0, 12, m)), 60, 230
    )
    e = TRUE_EFFECTS
    eta = (
        e["intercept"]
        + e["lactate_mmol_per_l"] * lactate
        + e["age_years"] * age
        + e["male"] * male
        + e["crp_per_10_mg_per_l"] * crp / 10.0
        + e["heart_rate_per_10_bpm"] * hr / 10.0
    )
    died = rng.random(m) < _expit(eta)
    los = ((1.0 + rng.gamma(2.0, 2.5, m)) * DAY).astype(np.int64)
    death = admit + (rng.uniform(0.1, 1.0, m) * los).astype(np.int64)
    picu_end = np.where(died, death, admit + los)

    # Most arrive through the emergency room; the rest are transfers or ward calls.
    er = rng.random(m) < 0.7
    er_start = admit[er] - rng.integers(2 * HOUR, 6 * HOUR, er.sum())
    er_keys = b.visits(who[er], c.EMERGENCY_ROOM_VISIT, er_start, admit[er], "URG")
    preceding = np.full(m, -1, dtype=np.int64)
    preceding[er] = er_keys
    picu = b.visits(who, c.INTENSIVE_CARE, admit, picu_end, "UCIP", preceding)
    # Survivors mostly step down to a ward before going home.
    ward = ~died & (rng.random(m) < 0.8)
    ward_end = picu_end[ward] + rng.integers(2, 11, ward.sum()) * DAY
    b.visits(who[ward], c.INPATIENT_VISIT, picu_end[ward], ward_end, "PLANTA", picu[ward])

    b.conditions(who, c.SEPSIS, c.ICD10["sepsis"], admit, picu)
    focus = rng.choice(4, size=m, p=[0.35, 0.10, 0.15, 0.40])
    for k, (concept, icd) in enumerate(
        [
            (c.PNEUMONIA, "pneumonia"),
            (c.MENINGITIS, "meningitis"),
            (c.ACUTE_URINARY_TRACT_INFECTION, "urinary_tract_infection"),
        ]
    ):
        sel = focus == k
        b.conditions(who[sel], concept, c.ICD10[icd], admit[sel], picu[sel])

    # Admission values first, then 6 h and 24 h: survivors recover, the others do not.
    trend = {6: np.where(died, 1.15, 0.75), 24: np.where(died, 1.35, 0.5)}
    series: list[tuple[int, np.ndarray, int, str, str, float, float, int]] = [
        (c.LACTATE, lactate, c.MILLIMOLE_PER_LITER, "mmol/L", "lactate", 0.25, 1.0, 1),
        (c.C_REACTIVE_PROTEIN, crp, c.MILLIGRAM_PER_LITER, "mg/L", "crp", 0.5, 1.5, 1),
        (c.HEART_RATE, hr, c.PER_MINUTE, "/min", "heart_rate", 0.05, 0.5, 0),
    ]
    for concept, first, unit, unit_src, src, lo_h, hi_h, decimals in series:
        first_at = admit + rng.integers(int(lo_h * HOUR), int(hi_h * HOUR), m)
        b.measurements(who, concept, first_at, first, unit, unit_src, picu, src)
        for hours, factor in trend.items():
            if concept == c.C_REACTIVE_PROTEIN and hours == 6:
                continue  # CRP is repeated daily, not six-hourly
            at = admit + hours * HOUR + rng.integers(0, HOUR, m)
            keep = at < picu_end
            if concept == c.HEART_RATE:
                norm = _heart_rate_norm(age)
                value = norm + (first - norm) * np.sqrt(factor) + rng.normal(0, 6, m)
            elif concept == c.C_REACTIVE_PROTEIN:
                value = first * np.where(died, 1.6, 1.3) * np.exp(rng.normal(0, 0.2, m))
            else:
                value = first * factor * np.exp(rng.normal(0, 0.15, m))
            low, high = _LIMITS[concept]
            value = np.clip(np.round(value, decimals), low, high)
            b.measurements(
                who[keep], concept, at[keep], value[keep], unit, unit_src, picu[keep], src
            )

    stay_days = (picu_end - admit) // DAY + 1
    for concept, share, name in [
        (c.CEFOTAXIME, 1.0, "cefotaxime"),
        (c.VANCOMYCIN, 0.4, "vancomycin"),
        (c.MEROPENEM, 0.25, "meropenem"),
    ]:
        sel = rng.random(m) < share
        start = admit[sel] + rng.integers(HOUR // 2, 3 * HOUR, sel.sum())
        days = np.minimum(stay_days[sel], rng.integers(5, 11, sel.sum()))
        b.drugs(who[sel], concept, start, days, name, picu[sel])

    b.add(
        "death",
        person=who[died],
        death_datetime=death[died],
        cause_concept_id=c.SEPSIS,
        cause_source_value=c.ICD10["sepsis"],
    )


def _congenital_heart(
    b: _Builder,
    people: _People,
    who: np.ndarray,
    rng: np.random.Generator,
    mix: tuple[float, float, float],
) -> None:
    """Diagnosis, surgery admission, in-hospital death, 30-day readmission, follow-up."""
    m = len(who)
    if m == 0:
        return
    p = np.asarray(mix, dtype=float)
    lesion = rng.choice(3, size=m, p=p / p.sum())  # 0 VSD, 1 ToF, 2 HLHS
    surgery_age = np.select(
        [lesion == 0, lesion == 1],
        [rng.integers(90, 366, m), rng.integers(90, 301, m)],
        rng.integers(3, 11, m),
    ).astype(np.int64)
    surgery_day = _uniform_days(rng, m, DATA_START + 30, INDEX_END)
    birth_day = surgery_day - surgery_age
    people.set(who, birth_day, rng.random(m) < 0.52, rng)
    hlhs = lesion == 2
    # HLHS babies are admitted on their first days; the others the day before surgery.
    admit_day = np.where(hlhs, birth_day + rng.integers(1, 3, m), surgery_day - 1)
    admit = admit_day * DAY + _clock(rng, m, 8, 18)
    surgery = surgery_day * DAY + _clock(rng, m, 8, 12)
    los = np.select(
        [lesion == 0, lesion == 1],
        [4 + rng.gamma(2.0, 1.5, m), 6 + rng.gamma(2.0, 2.5, m)],
        18 + rng.gamma(2.0, 8.0, m),
    )
    died = rng.random(m) < np.array([0.005, 0.02, 0.15])[lesion]
    death = surgery + (rng.uniform(0.05, 1.0, m) * los * DAY).astype(np.int64)
    discharge = np.where(died, death, surgery + (los * DAY).astype(np.int64))

    concept = np.where(hlhs, c.HYPOPLASTIC_LEFT_HEART_SYNDROME, c.CONGENITAL_HEART_DISEASE)
    names = np.array(
        ["ventricular_septal_defect", "tetralogy_of_fallot", "hypoplastic_left_heart_syndrome"]
    )
    icd = np.array([c.ICD10[n] for n in names])[lesion]
    procedure = np.array([c.CLOSURE_OF_VSD, c.REPAIR_OF_TETRALOGY_OF_FALLOT, c.NORWOOD_PROCEDURE])[
        lesion
    ]

    # VSD and ToF are diagnosed in a cardiology clinic weeks before surgery.
    clinic = ~hlhs
    diag_day = birth_day[clinic] + np.minimum(
        rng.integers(7, 121, clinic.sum()), surgery_age[clinic] - 14
    )
    diag = diag_day * DAY + _clock(rng, clinic.sum(), 9, 14)
    diag_keys = b.visits(who[clinic], c.OUTPATIENT_VISIT, diag, diag + 30 * 60, "CARDIO")
    b.conditions(who[clinic], concept[clinic], icd[clinic], diag, diag_keys)

    stay = b.visits(who, c.INPATIENT_VISIT, admit, discharge, "CIR-CARD")
    b.conditions(who, concept, icd, admit, stay)
    b.add(
        "procedure_occurrence",
        person=who,
        procedure_concept_id=procedure,
        procedure_datetime=surgery,
        visit=stay,
        procedure_source_value=np.array(["VSD closure", "ToF repair", "Norwood"])[lesion],
    )
    post_op = surgery + DAY + rng.integers(0, 4 * HOUR, m)
    alive = post_op < discharge
    age = (post_op // DAY - birth_day) / 365.25
    hr = np.round(_heart_rate_norm(age) + rng.normal(10, 12, m))
    b.measurements(
        who[alive],
        c.HEART_RATE,
        post_op[alive],
        hr[alive],
        c.PER_MINUTE,
        "/min",
        stay[alive],
        "heart_rate",
    )

    readmit = ~died & (rng.random(m) < np.array([0.06, 0.10, 0.25])[lesion])
    r_start = discharge[readmit] + rng.integers(2 * DAY, 30 * DAY, readmit.sum())
    r_end = r_start + rng.integers(1, 8, readmit.sum()) * DAY
    r_keys = b.visits(who[readmit], c.INPATIENT_VISIT, r_start, r_end, "CARD", stay[readmit])
    b.conditions(who[readmit], concept[readmit], icd[readmit], r_start, r_keys)

    for months in (1, 6, 12):
        at = discharge + (30 * months + rng.integers(-7, 8, m)) * DAY
        keep = ~died & (at // DAY <= DATA_END)
        b.visits(who[keep], c.OUTPATIENT_VISIT, at[keep], at[keep] + 30 * 60, "CARDIO")

    cause = np.where(hlhs, c.HYPOPLASTIC_LEFT_HEART_SYNDROME, c.CONGENITAL_HEART_DISEASE)
    b.add(
        "death",
        person=who[died],
        death_datetime=death[died],
        cause_concept_id=cause[died],
        cause_source_value=icd[died],
    )


def _repeat_index(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For counts [2, 3] return owners [0, 0, 1, 1, 1] and ranks [0, 1, 0, 1, 2]."""
    owners = np.repeat(np.arange(len(counts)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return owners, np.arange(len(owners)) - starts


def _haemophilia(b: _Builder, people: _People, who: np.ndarray, rng: np.random.Generator) -> None:
    """Haemophilia A (80 %) and B: diagnosis, prophylaxis dispensings, bleeds, clinics."""
    m = len(who)
    if m == 0:
        return
    type_b = rng.random(m) < 0.2
    age_days = rng.integers(120, 18 * 365 - 1, m).astype(np.int64)
    index_day = _uniform_days(rng, m, DATA_START, INDEX_END)
    people.set(who, index_day - age_days, np.ones(m, dtype=bool), rng)  # X-linked: boys
    index = index_day * DAY + _clock(rng, m, 9, 14)
    weight = 3.5 + 2.6 * (age_days / 365.25) * np.exp(rng.normal(0, 0.1, m))  # kg

    first = b.visits(who, c.OUTPATIENT_VISIT, index, index + 45 * 60, "HEMATO")
    b.conditions(
        who[~type_b], c.HAEMOPHILIA_A, c.ICD10["haemophilia_a"], index[~type_b], first[~type_b]
    )
    # No verified standard concept for haemophilia B: unmapped, ICD-10 kept as source.
    b.conditions(
        who[type_b], c.NO_MATCHING_CONCEPT, c.ICD10["haemophilia_b"], index[type_b], first[type_b]
    )

    emicizumab = ~type_b & (rng.random(m) < 0.2)
    drug = np.where(
        type_b, c.NO_MATCHING_CONCEPT, np.where(emicizumab, c.EMICIZUMAB, c.FACTOR_VIII)
    )
    source = np.where(
        type_b,
        f"{c.ATC['factor_ix']} factor IX",
        np.where(emicizumab, "emicizumab", f"{c.ATC['factor_viii']} factor VIII"),
    )
    # Four weeks of prophylaxis per dispensing: FVIII 25 IU/kg 3x/week, FIX 40 IU/kg
    # 2x/week, emicizumab 1.5 mg/kg/week.
    per_dispensing = np.where(type_b, 40 * 8, np.where(emicizumab, 1.5 * 4, 25 * 12)) * weight
    quantity = np.where(emicizumab, np.round(per_dispensing), np.round(per_dispensing / 250) * 250)
    span = DATA_END - index_day
    n_disp = np.minimum(span // 28, rng.integers(6, 37, m))
    owner, rank = _repeat_index(n_disp)
    start = index[owner] + (rank * 28 + rng.integers(0, 4, len(owner))) * DAY
    b.drugs(
        who[owner], drug[owner], start, np.full(len(owner), 27), source[owner],
        np.full(len(owner), -1, dtype=np.int64), quantity[owner], np.full(len(owner), 28),
    )  # fmt: skip

    bleeds = np.minimum(rng.poisson(0.35 * span / 365.25), 6)
    owner, _ = _repeat_index(bleeds)
    at = (
        index_day[owner] + (rng.random(len(owner)) * span[owner]).astype(np.int64)
    ) * DAY + _clock(rng, len(owner))
    er = b.visits(
        who[owner],
        c.EMERGENCY_ROOM_VISIT,
        at,
        at + rng.integers(2 * HOUR, 8 * HOUR, len(owner)),
        "URG",
    )
    on_demand = np.where(type_b[owner], c.NO_MATCHING_CONCEPT, c.FACTOR_VIII)
    dose = np.round(np.where(type_b[owner], 60, 40) * weight[owner] / 250) * 250
    b.drugs(
        who[owner], on_demand, at + HOUR, np.zeros(len(owner), dtype=np.int64),
        np.where(type_b[owner], source[owner], f"{c.ATC['factor_viii']} factor VIII"),
        er, dose, np.ones(len(owner), dtype=np.int64),
    )  # fmt: skip

    clinics = np.minimum(span // 182, 10)
    owner, rank = _repeat_index(clinics)
    at = index[owner] + (rank + 1) * 182 * DAY
    b.visits(who[owner], c.OUTPATIENT_VISIT, at, at + 30 * 60, "HEMATO")


_GENERAL: Final[list[tuple[int, str, Callable[[np.ndarray], np.ndarray]]]] = [
    (c.BRONCHIOLITIS, "bronchiolitis", lambda a: np.where(a < 2, 6.0, 0.0)),
    (c.ASTHMA, "asthma", lambda a: np.where(a >= 2, 3.0, 0.0)),
    (c.PNEUMONIA, "pneumonia", lambda a: np.full(len(a), 2.0)),
    (c.APPENDICITIS, "appendicitis", lambda a: np.where(a >= 4, 2.0, 0.0)),
    (c.ACUTE_URINARY_TRACT_INFECTION, "urinary_tract_infection", lambda a: np.full(len(a), 2.0)),
    (c.SEIZURE_DISORDER, "seizure_disorder", lambda a: np.full(len(a), 1.0)),
    (c.DIABETIC_KETOACIDOSIS, "diabetic_ketoacidosis", lambda a: np.where(a >= 8, 0.4, 0.0)),
]


def _general(b: _Builder, people: _People, who: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """General paediatrics: a few ER, clinic and ward visits; returns index days."""
    m = len(who)
    # At least a day old, so that no visit starts before the birth time.
    age_days = 1 + (rng.beta(1.1, 2.2, m) * (18 * 365 - 2)).astype(np.int64)
    index_day = _uniform_days(rng, m, DATA_START, INDEX_END)
    people.set(who, index_day - age_days, rng.random(m) < 0.52, rng)
    n_visits = np.minimum(1 + rng.poisson(0.8, m), 4)
    owner, rank = _repeat_index(n_visits)
    k = len(owner)
    day = index_day[owner] + np.where(rank > 0, rng.integers(1, 731, k), 0)
    kind = rng.choice(3, size=k, p=[0.5, 0.35, 0.15])  # ER, clinic, ward
    start = day * DAY + _clock(rng, k)
    end = start + np.select(
        [kind == 0, kind == 1],
        [rng.integers(2 * HOUR, 8 * HOUR, k), rng.integers(20 * 60, 45 * 60, k)],
        rng.integers(1 * DAY, 7 * DAY, k),
    )
    concept = np.array([c.EMERGENCY_ROOM_VISIT, c.OUTPATIENT_VISIT, c.INPATIENT_VISIT])[kind]
    keys = b.visits(who[owner], concept, start, end, np.array(["URG", "CCEE", "PLANTA"])[kind])

    age = (day - (people.birth[who[owner]] // DAY)) / 365.25
    weights = np.column_stack([f(age) for _, _, f in _GENERAL])
    cum = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    pick = (rng.random((k, 1)) > cum).sum(axis=1)
    for j, (cond, name, _) in enumerate(_GENERAL):
        sel = pick == j
        b.conditions(who[owner][sel], cond, c.ICD10[name], start[sel], keys[sel])

    er = (kind == 0) & (rng.random(k) < 0.6)
    hr = np.round(_heart_rate_norm(age[er]) + rng.normal(8, 12, er.sum()))
    b.measurements(
        who[owner][er],
        c.HEART_RATE,
        start[er] + 15 * 60,
        hr,
        c.PER_MINUTE,
        "/min",
        keys[er],
        "heart_rate",
    )

    down = (rank == 0) & (rng.random(k) < 0.01)
    b.conditions(
        who[owner][down], c.DOWN_SYNDROME, c.ICD10["down_syndrome"], start[down], keys[down]
    )
    return index_day


def _rare(
    b: _Builder,
    who: np.ndarray,
    index_day: np.ndarray,
    rng: np.random.Generator,
    profile: SiteProfile,
) -> None:
    """A handful of children per site with SCID or mitochondrial cytopathy."""
    n_scid = int(rng.integers(profile.scid[0], profile.scid[1] + 1))
    n_mito = int(rng.integers(profile.mitochondrial[0], profile.mitochondrial[1] + 1))
    chosen = rng.choice(len(who), size=min(len(who), n_scid + n_mito), replace=False)
    for concept, name, pos, death_risk in [
        (
            c.SEVERE_COMBINED_IMMUNODEFICIENCY,
            "severe_combined_immunodeficiency",
            chosen[:n_scid],
            0.25,
        ),
        (c.MITOCHONDRIAL_CYTOPATHY, "mitochondrial_cytopathy", chosen[n_scid:], 0.1),
    ]:
        n = len(pos)
        start = (index_day[pos] + rng.integers(0, 181, n)) * DAY + _clock(rng, n)
        end = start + rng.integers(3, 31, n) * DAY
        keys = b.visits(who[pos], c.INPATIENT_VISIT, start, end, "PLANTA")
        b.conditions(who[pos], concept, c.ICD10[name], start, keys)
        died = rng.random(n) < death_risk
        b.add(
            "death",
            person=who[pos][died],
            death_datetime=end[died],
            cause_concept_id=concept,
            cause_source_value=c.ICD10[name],
        )


# Internal columns each event table carries before ids are assigned (see _Builder).
_INTERNAL: Final[dict[str, tuple[str, ...]]] = {
    "visit_occurrence": (
        "person", "visit", "visit_concept_id", "visit_start_datetime", "visit_end_datetime",
        "visit_source_value", "preceding",
    ),
    "condition_occurrence": (
        "person", "condition_concept_id", "condition_start_datetime", "visit", "condition_source_value",
    ),
    "procedure_occurrence": (
        "person", "procedure_concept_id", "procedure_datetime", "visit", "procedure_source_value",
    ),
    "measurement": (
        "person", "measurement_concept_id", "measurement_datetime", "value_as_number",
        "unit_concept_id", "unit_source_value", "visit", "measurement_source_value",
    ),
    "drug_exposure": (
        "person", "drug_concept_id", "drug_exposure_start_datetime", "drug_exposure_end_date",
        "quantity", "days_supply", "route_source_value", "visit", "drug_source_value",
    ),
    "death": ("person", "death_datetime", "cause_concept_id", "cause_source_value"),
}  # fmt: skip

_ORDER_BY: Final[dict[str, list[str]]] = {
    "visit_occurrence": ["person", "visit_start_datetime", "visit"],
    "condition_occurrence": ["person", "condition_start_datetime", "condition_concept_id"],
    "procedure_occurrence": ["person", "procedure_datetime"],
    "measurement": ["person", "measurement_datetime", "measurement_concept_id"],
    "drug_exposure": ["person", "drug_exposure_start_datetime", "drug_concept_id"],
    "death": ["person"],
}


def _event_frames(b: _Builder) -> dict[str, pd.DataFrame]:
    frames = {}
    for t, cols in _INTERNAL.items():
        parts = b.frames.get(t, [])
        if parts:
            frames[t] = pd.concat(parts, ignore_index=True)
        else:  # a small site may have no procedures or deaths at all
            frames[t] = pd.DataFrame({col: np.array([], dtype=np.int64) for col in cols})
    return frames


def _observation_periods(
    frames: dict[str, pd.DataFrame],
    birth: np.ndarray,
    death_at: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """From before the first record (never before birth) to the death, or some time
    after the last record (never after extraction): every record lies inside."""
    n = len(birth)
    first = np.full(n, np.iinfo(np.int64).max)
    last = np.full(n, np.iinfo(np.int64).min)
    for t, col in _START.items():
        f = frames[t]
        p = f["person"].to_numpy(dtype=np.int64)
        np.minimum.at(first, p, f[col].to_numpy(dtype=np.int64))
        end = f[_END.get(t, col)].to_numpy(dtype=np.int64)
        np.maximum.at(last, p, end)
    birth_day = birth // DAY
    lookback = rng.integers(0, 366, n)
    follow_up = rng.integers(30, 731, n)
    start = np.where(first == np.iinfo(np.int64).max, birth_day, first // DAY - lookback)
    start = np.maximum(birth_day, start)
    end = np.where(last == np.iinfo(np.int64).min, start, last // DAY + follow_up)
    end = np.minimum(DATA_END, end)
    dead = death_at < np.iinfo(np.int64).max
    end[dead] = death_at[dead] // DAY
    return start, np.maximum(start, end)


def _person_frame(
    people: _People, person_ids: np.ndarray, profile: SiteProfile, rng: np.random.Generator
) -> pd.DataFrame:
    days = (people.birth // DAY).astype("datetime64[D]")
    years = days.astype("datetime64[Y]")
    months = days.astype("datetime64[M]")
    numbers = rng.choice(10**profile.record_digits - 1, size=len(person_ids), replace=False) + 1
    return pd.DataFrame(
        {
            "person_id": person_ids,
            "gender_concept_id": np.where(people.male, c.MALE, c.FEMALE),
            "year_of_birth": years.astype(np.int64) + 1970,
            "month_of_birth": (months - years.astype("datetime64[M]")).astype(np.int64) + 1,
            "day_of_birth": (days - months.astype("datetime64[D]")).astype(np.int64) + 1,
            "birth_datetime": people.birth,
            # European hospitals do not record race or ethnicity.
            "race_concept_id": c.NO_MATCHING_CONCEPT,
            "ethnicity_concept_id": c.NO_MATCHING_CONCEPT,
            "person_source_value": profile.record_numbers(numbers),
            "gender_source_value": np.where(people.male, "M", "F"),
        }
    )


def _to_schema(table: str, f: pd.DataFrame) -> pd.DataFrame:
    """Select and convert the columns of :data:`SCHEMA` (times: int seconds -> datetime64)."""
    data: dict[str, Any] = {}
    n = len(f)
    for col, sql_type in SCHEMA[table]:
        if col in f:
            # Nullable ids (Int64) keep their NA; everything else as plain numpy.
            values: Any = f[col].array if f[col].dtype == "Int64" else f[col].to_numpy()
        elif col.endswith("_type_concept_id"):
            values = np.full(n, c.EHR)
        elif col.endswith("_date") and col.replace("_date", "_datetime") in f:
            values = f[col.replace("_date", "_datetime")].to_numpy(dtype=np.int64) // DAY * DAY
        else:
            raise KeyError(f"{table}.{col} is not filled")
        if sql_type in ("DATE", "TIMESTAMP"):
            values = np.asarray(values, dtype=np.int64).astype("datetime64[s]")
        elif col == "quantity":
            values = pd.array(np.asarray(values, dtype=float), dtype="Float64")  # NaN -> NULL
        elif col == "days_supply":
            values = pd.array(np.asarray(values, dtype=np.int64), dtype="Int64")
            values[values < 0] = pd.NA
        data[col] = values
    return pd.DataFrame(data, columns=[col for col, _ in SCHEMA[table]])


def _finish(
    b: _Builder, people: _People, profile: SiteProfile, rng: np.random.Generator, base: int
) -> dict[str, pd.DataFrame]:
    """Assign ids, drop rows after death or extraction, build person and observation_period."""
    n = len(people.birth)
    person_ids = base + np.arange(1, n + 1, dtype=np.int64)
    frames = _event_frames(b)

    death = frames["death"].sort_values(["person", "death_datetime"], kind="stable")
    death = death.drop_duplicates("person", keep="first")  # one death per child
    death_at = np.full(n, np.iinfo(np.int64).max)
    death_at[death["person"].to_numpy(dtype=np.int64)] = death["death_datetime"].to_numpy(
        dtype=np.int64
    )
    frames["death"] = death
    cutoff = np.minimum(death_at, (DATA_END + 1) * DAY - 1)
    for t, col in _START.items():
        f = frames[t]
        owner = f["person"].to_numpy(dtype=np.int64)
        f = f[f[col].to_numpy(dtype=np.int64) <= cutoff[owner]].copy()
        if t in _END:  # stays open at death or extraction end there
            end = f[_END[t]].to_numpy(dtype=np.int64)
            f[_END[t]] = np.minimum(end, cutoff[f["person"].to_numpy(dtype=np.int64)])
        frames[t] = f

    for t, keys in _ORDER_BY.items():
        frames[t] = frames[t].sort_values(keys, kind="stable").reset_index(drop=True)
    visits = frames["visit_occurrence"]
    visits["visit_occurrence_id"] = np.arange(1, len(visits) + 1, dtype=np.int64)
    key_to_id = pd.Series(
        visits["visit_occurrence_id"].to_numpy(), index=visits["visit"].to_numpy(dtype=np.int64)
    )
    visits["preceding_visit_occurrence_id"] = visits["preceding"].map(key_to_id).astype("Int64")
    for t, f in frames.items():
        f["person_id"] = person_ids[f["person"].to_numpy(dtype=np.int64)]
        if t != "visit_occurrence" and "visit" in f:
            f["visit_occurrence_id"] = f["visit"].map(key_to_id).astype("Int64")
        if t not in ("visit_occurrence", "death"):
            f[f"{t}_id"] = np.arange(1, len(f) + 1, dtype=np.int64)

    start, end = _observation_periods(frames, people.birth, death_at, rng)
    frames["observation_period"] = pd.DataFrame(
        {
            "observation_period_id": np.arange(1, n + 1, dtype=np.int64),
            "person_id": person_ids,
            "observation_period_start_date": start * DAY,
            "observation_period_end_date": end * DAY,
            "period_type_concept_id": c.EHR,
        }
    )
    frames["person"] = _person_frame(people, person_ids, profile, rng)
    return {t: _to_schema(t, frames[t]) for t in SCHEMA}


def _site_tables(
    profile: SiteProfile, persons: int, seed: int, site_number: int
) -> dict[str, pd.DataFrame]:
    """Generate every table of one site (independent of how many sites are made)."""
    streams = [
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, site_number]).spawn(7)
    ]
    assign, sepsis_rng, chd_rng, haem_rng, general_rng, rare_rng, finish_rng = streams
    n_sepsis = round(persons * profile.sepsis)
    n_chd = round(persons * profile.chd)
    n_haem = max(2, round(persons * profile.haemophilia))
    order = assign.permutation(persons)  # pathways are scattered over the person ids
    cuts = np.cumsum([n_sepsis, n_chd, n_haem])
    sepsis, chd, haem, general = np.split(order, cuts)
    people = _People(np.zeros(persons, dtype=np.int64), np.zeros(persons, dtype=bool))
    b = _Builder()
    _sepsis(b, people, np.sort(sepsis), sepsis_rng)
    _congenital_heart(b, people, np.sort(chd), chd_rng, profile.lesions)
    _haemophilia(b, people, np.sort(haem), haem_rng)
    general = np.sort(general)
    index_day = _general(b, people, general, general_rng)
    _rare(b, general, index_day, rare_rng, profile)
    return _finish(b, people, profile, finish_rng, base=site_number * 1_000_000)


def _write_parquet(frames: dict[str, pd.DataFrame], folder: Path) -> None:
    import duckdb

    folder.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET threads = 1")  # one writer thread: the same rows give the same bytes
        for table, cols in SCHEMA.items():
            con.register("frame", frames[table])
            select = ", ".join(f'CAST("{col}" AS {typ}) AS "{col}"' for col, typ in cols)
            tmp = folder / f".{table}.parquet.tmp"
            target = str(tmp).replace("'", "''")
            con.execute(
                f"COPY (SELECT {select} FROM frame) TO '{target}' (FORMAT parquet, COMPRESSION zstd)"
            )
            con.unregister("frame")
            os.replace(tmp, folder / f"{table}.parquet")  # readers never see half a file
    finally:
        con.close()


def site_sizes(sites: int = 3, persons: int | None = None) -> list[tuple[SiteProfile, int]]:
    """The profiles used for ``sites`` hospitals and their person counts.

    ``persons`` sets the size of the largest site; the others keep their
    proportions (never fewer than 20 persons).
    """
    if not 1 <= sites <= len(SITE_PROFILES):
        raise ValueError(f"sites must be between 1 and {len(SITE_PROFILES)}, got {sites}")
    chosen = SITE_PROFILES[:sites]
    if persons is None:
        return [(p, p.persons) for p in chosen]
    if persons < 20:
        raise ValueError(f"persons must be at least 20, got {persons}")
    largest = max(p.persons for p in chosen)
    return [(p, max(20, round(p.persons * persons / largest))) for p in chosen]


def generate(
    out_dir: str | os.PathLike[str], sites: int = 3, persons: int | None = None, seed: int = 0
) -> list[SiteSummary]:
    """Write ``out_dir/<site>/<table>.parquet`` for ``sites`` synthetic hospitals.

    ``persons`` scales the largest site (default sizes 4000 / 2500 / 1200 ...);
    the same ``seed`` always gives byte-identical files. Returns one
    :class:`SiteSummary` per site, with row counts per table.
    """
    root = Path(out_dir)
    summaries = []
    for number, (profile, n) in enumerate(site_sizes(sites, persons), start=1):
        frames = _site_tables(profile, n, seed, number)
        folder = root / profile.name
        _write_parquet(frames, folder)
        rows = {t: len(frames[t]) for t in SCHEMA}
        summaries.append(SiteSummary(profile.name, folder, profile.description, rows))
    return summaries


def format_summaries(summaries: list[SiteSummary], seconds: float | None = None) -> str:
    """A small text table of the sites written (used by ``phds synth``)."""
    columns = [
        ("person", "persons"),
        ("visit_occurrence", "visits"),
        ("condition_occurrence", "conditions"),
        ("procedure_occurrence", "procedures"),
        ("measurement", "measurements"),
        ("drug_exposure", "drugs"),
        ("death", "deaths"),
    ]
    width = max([len("site")] + [len(s.name) for s in summaries])
    header = "site".ljust(width) + "".join(f"{label:>14}" for _, label in columns)
    lines = [header, "-" * len(header)]
    for s in summaries:
        lines.append(s.name.ljust(width) + "".join(f"{s.rows[t]:>14,}" for t, _ in columns))
    if seconds is not None:
        lines.append(f"{len(summaries)} sites written in {seconds:.1f} s")
    return "\n".join(lines)


def timed_generate(
    out_dir: str | os.PathLike[str], sites: int = 3, persons: int | None = None, seed: int = 0
) -> tuple[list[SiteSummary], float]:
    """:func:`generate`, also returning the seconds it took."""
    t0 = time.perf_counter()
    summaries = generate(out_dir, sites=sites, persons=persons, seed=seed)
    return summaries, time.perf_counter() - t0
