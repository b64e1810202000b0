"""OMOP concept ids used by the synthetic generator and by notebooks that query site data.

Every id is a standard concept of the OMOP vocabularies (Athena), named here so
that notebook code reads ``concepts.SEPSIS`` rather than ``132797``. Each
comment gives the vocabulary, the concept name and where the id was checked:

* [PHEMS] the PHEMS network's own concept-set definitions
  (``data_raw/conceptSetsPHEMS.R`` of a PHEMS R package, a Capr script listing
  "source /// concept" pairs for the use cases: PICU sepsis, cardiac pathways,
  haemophilia UC3), read in a public code index.
* [EE] ``execution_engine/omop/concepts.py`` (visit and gender constants of an
  OMOP execution engine).
* [LEGEND] OHDSI/Legend cohort definitions (Atlas JSON with concept names).
* [PROFILE] a public OMOP data-quality profile listing concept ids with their
  names (``0 No matching concept``, ``condition_type_concept_id 32817 EHR``).
* [ETL] public OMOP ETL code mapping unit strings to unit concepts
  (``'mmol/L' THEN 8753 -- millimole per liter``; ``'mg/L' then 8751 --milligram
  per liter``; ``8541 -- per minute (UCUM)``).

Concepts for which no standard id could be verified are deliberately absent:
haemophilia B, ventricular septal defect, tetralogy of Fallot and the factor IX
ingredient. The generator records those as an ETL does with a source code it
could not map: ``*_concept_id`` = :data:`NO_MATCHING_CONCEPT` (0) or the verified
parent concept, with the ICD-10 / ATC code in ``*_source_value`` (see
:data:`ICD10`, :data:`ATC`). Look them up in Athena before relying on a
standard id for them.
"""

from __future__ import annotations

from typing import Final

#: Metadata: "No matching concept" — the OMOP convention for an unmapped source code. [PROFILE]
NO_MATCHING_CONCEPT: Final = 0

# --- Gender (vocabulary Gender) ----------------------------------------------
#: Gender: MALE. [EE]
MALE: Final = 8507
#: Gender: FEMALE. [EE]
FEMALE: Final = 8532

# --- Visits (vocabulary Visit) -----------------------------------------------
#: Visit: Inpatient Visit. [EE, LEGEND]
INPATIENT_VISIT: Final = 9201
#: Visit: Outpatient Visit. [EE]
OUTPATIENT_VISIT: Final = 9202
#: Visit: Emergency Room Visit. [LEGEND]
EMERGENCY_ROOM_VISIT: Final = 9203
#: Visit: Intensive Care (used here for paediatric intensive care stays). [EE]
INTENSIVE_CARE: Final = 32037

# --- Provenance (vocabulary Type Concept) ---------------------------------------
#: Type Concept: EHR — record type of every synthetic row. [PROFILE]
EHR: Final = 32817

# --- Conditions (vocabulary SNOMED) ---------------------------------------------
#: SNOMED: Sepsis. [PHEMS healthcareUse "Previous diagnosis of sepsis"]
SEPSIS: Final = 132797
#: SNOMED: Pneumonia. [PHEMS]
PNEUMONIA: Final = 255848
#: SNOMED: Meningitis. [PHEMS]
MENINGITIS: Final = 435785
#: SNOMED: Acute urinary tract infection. [PHEMS]
ACUTE_URINARY_TRACT_INFECTION: Final = 4331815
#: SNOMED: Congenital heart disease (parent of VSD and tetralogy of Fallot). [PHEMS]
CONGENITAL_HEART_DISEASE: Final = 312723
#: SNOMED: Hypoplastic left heart syndrome. [PHEMS additional "High Risk Diagnoses"]
HYPOPLASTIC_LEFT_HEART_SYNDROME: Final = 440207
#: SNOMED: Hereditary factor VIII deficiency disease (haemophilia A). [PHEMS UC3 "hemophilia A diagnosis"]
#: (One public synthetic seed uses 55011 for it, but its other ids are demonstrably wrong.)
HAEMOPHILIA_A: Final = 434007
#: SNOMED: Severe combined immunodeficiency disease (rare). [PHEMS "Very High Risk Diagnoses"]
SEVERE_COMBINED_IMMUNODEFICIENCY: Final = 29783
#: SNOMED: Mitochondrial cytopathy (rare). [PHEMS "mitochondrial disease"]
MITOCHONDRIAL_CYTOPATHY: Final = 81539
#: SNOMED: Bronchiolitis. [PHEMS "Low Risk Diagnoses"]
BRONCHIOLITIS: Final = 4165112
#: SNOMED: Asthma. [PHEMS]
ASTHMA: Final = 317009
#: SNOMED: Seizure disorder. [PHEMS]
SEIZURE_DISORDER: Final = 4029498
#: SNOMED: Diabetic ketoacidosis. [PHEMS]
DIABETIC_KETOACIDOSIS: Final = 443727
#: SNOMED: Appendicitis. [PHEMS]
APPENDICITIS: Final = 440448
#: SNOMED: Complete trisomy 21 syndrome (Down's syndrome). [PHEMS]
DOWN_SYNDROME: Final = 439125

# --- Procedures (vocabulary SNOMED) -----------------------------------------------
#: SNOMED: Closure of ventricular septal defect. [PHEMS cardiacSurgery]
CLOSURE_OF_VSD: Final = 4199899
#: SNOMED: Repair of tetralogy of Fallot. [PHEMS cardiacSurgery]
REPAIR_OF_TETRALOGY_OF_FALLOT: Final = 4019929
#: SNOMED: Aortopulmonary reconstruction with systemic to pulmonary arterial shunt (Norwood stage I). [PHEMS cardiacSurgery]
NORWOOD_PROCEDURE: Final = 44793133

# --- Measurements (vocabulary LOINC) and their units (vocabulary UCUM) ----------
#: LOINC: Lactate [Moles/volume] in Blood. [PHEMS labTests "Lactate"]
LACTATE: Final = 3047181
#: LOINC: C reactive protein [Mass/volume] in Serum or Plasma. [PHEMS labTests "CRP"]
C_REACTIVE_PROTEIN: Final = 3020460
#: LOINC: Heart rate. [PHEMS vitalSigns "Age-dependent HR"]
HEART_RATE: Final = 3027018
#: UCUM: millimole per liter. [ETL]
MILLIMOLE_PER_LITER: Final = 8753
#: UCUM: milligram per liter. [ETL]
MILLIGRAM_PER_LITER: Final = 8751
#: UCUM: per minute. [ETL]
PER_MINUTE: Final = 8541

# --- Drugs (vocabulary RxNorm, ingredients) -----------------------------------------
#: RxNorm Ingredient: factor VIII. [PHEMS UC3Treatments "factor VIII"]
FACTOR_VIII: Final = 1352213
#: RxNorm Ingredient: emicizumab. [PHEMS UC3Treatments]
EMICIZUMAB: Final = 793042
#: RxNorm Ingredient: cefotaxime. [PHEMS antibiotics]
CEFOTAXIME: Final = 1774470
#: RxNorm Ingredient: vancomycin. [PHEMS antibiotics]
VANCOMYCIN: Final = 1707687
#: RxNorm Ingredient: meropenem. [PHEMS antibiotics]
MEROPENEM: Final = 1709170

#: WHO ICD-10 codes written to ``condition_source_value`` / ``cause_source_value``
#: (European hospitals code diagnoses in ICD-10; an ETL maps them to SNOMED).
#: Q21.3, Q23.4 and D67 were seen in public code lists; the rest are the usual
#: unspecified-subtype codes of their ICD-10 categories.
#: They tell apart lesions that share a standard concept (VSD and tetralogy of
#: Fallot are both recorded under :data:`CONGENITAL_HEART_DISEASE`) and carry
#: haemophilia B, which has no verified standard id here.
ICD10: Final[dict[str, str]] = {
    "sepsis": "A41.9",
    "pneumonia": "J18.9",
    "meningitis": "G03.9",
    "urinary_tract_infection": "N39.0",
    "ventricular_septal_defect": "Q21.0",
    "tetralogy_of_fallot": "Q21.3",
    "hypoplastic_left_heart_syndrome": "Q23.4",
    "haemophilia_a": "D66",
    "haemophilia_b": "D67",
    "severe_combined_immunodeficiency": "D81.9",
    "mitochondrial_cytopathy": "E88.4",
    "bronchiolitis": "J21.9",
    "asthma": "J45.9",
    "seizure_disorder": "G40.9",
    "diabetic_ketoacidosis": "E10.1",
    "appendicitis": "K35.8",
    "down_syndrome": "Q90.9",
}

#: ATC codes written to ``drug_source_value`` for the coagulation factors; factor
#: IX (B02BD04) has no verified RxNorm ingredient id here and is recorded with
#: ``drug_concept_id`` = :data:`NO_MATCHING_CONCEPT`.
ATC: Final[dict[str, str]] = {
    "factor_viii": "B02BD02",
    "factor_ix": "B02BD04",
}
