"""Structured outputs: the MIME bundle, re-checking evidence, forgeries, rounding, margins."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from phds_tre import sdc
from phds_tre.sdc import Policy
from phds_tre.sdc.rounding import interval, round_counts


def _cohort(seed: int = 7, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "ward": rng.choice(
                ["PICU", "cardiac", "oncology", "neonatal"], n, p=[0.4, 0.3, 0.27, 0.03]
            ),
            "sex": rng.choice(["F", "M"], n),
            "age_band": rng.choice(["0-1", "1-5", "5-12", "12-18"], n),
            "los": rng.gamma(2.0, 3.0, n).round(1),
        }
    )


def _payload(out: sdc.SDCOutput) -> dict[str, Any]:
    bundle = out._repr_mimebundle_()
    return bundle[sdc.MIME_TYPE]  # type: ignore[no-any-return]


def test_mime_bundle_has_structured_html_and_text() -> None:
    df = _cohort()
    out = sdc.crosstab(df.ward, df.sex, margins=True)
    bundle = out._repr_mimebundle_()
    assert set(bundle) == {sdc.MIME_TYPE, "text/html", "text/plain"}
    payload = bundle[sdc.MIME_TYPE]
    json.dumps(payload, allow_nan=False)  # strict JSON: no NaN tokens
    assert payload["schema"] == "phds.output" and payload["version"] == sdc.SCHEMA_VERSION
    assert payload["kind"] == "table" and payload["call"] == "crosstab"
    assert payload["policy_hash"] == sdc.DEFAULT_POLICY.hash
    assert payload["status"] == out.status
    assert "evidence" in payload and payload["evidence"]["blocks"][0]["n_rows"]
    assert "phds-verdict-" + out.status in bundle["text/html"]
    assert "suppressed" in bundle["text/html"]
    assert bundle["text/plain"].startswith(f"[{out.status.upper()}]")


def test_release_payload_drops_evidence() -> None:
    df = _cohort()
    released = sdc.crosstab(df.ward, df.sex).release_payload()
    assert "evidence" not in released and "policy" not in released
    assert "evidence" not in json.dumps(released)


def test_suppressed_values_do_not_appear_in_public_parts() -> None:
    df = _cohort()
    out = sdc.crosstab(df.ward, df.sex)
    true = pd.crosstab(df.ward, df.sex)
    small = true.loc["neonatal"].tolist()
    assert all(0 < x < 10 for x in small)
    public = out.release_payload()
    assert public["table"]["data"][out.table.index.get_loc("neonatal")] == [None, None]
    assert all(f"{x} contributors" not in json.dumps(public) for x in small)


def test_recheck_reproduces_the_kernel_verdict() -> None:
    df = _cohort()
    for out in [
        sdc.crosstab(df.ward, df.sex, margins=True),
        sdc.pivot_table(df, values="los", index="ward", columns="sex", aggfunc=["mean", "std"]),
        sdc.pivot_table(df, values="los", index=["ward", "sex"], aggfunc="sum", margins=True),
    ]:
        result = sdc.recheck(_payload(out), sdc.DEFAULT_POLICY)
        assert result.status == out.status, result.reasons
        assert result.output is not None
        pd.testing.assert_frame_equal(result.output.table, out.table)


def test_recheck_uses_the_site_policy_not_the_kernel_one() -> None:
    df = _cohort()
    lenient = sdc.crosstab(df.ward, df.sex, policy=Policy(min_count=2, zeros_disclosive=False))
    assert lenient.table.notna().all().all()
    strict = sdc.recheck(_payload(lenient), Policy(min_count=10))
    assert strict.output is not None
    assert strict.output.table.loc["neonatal"].isna().all()
    assert strict.status == "review"
    assert any("claimed" in note for note in strict.notes) or lenient.status == strict.status


def test_claimed_status_is_never_trusted() -> None:
    df = _cohort()
    payload = _payload(sdc.crosstab(df.ward, df.sex))
    forged = copy.deepcopy(payload)
    forged["status"] = "pass"
    forged["table"]["data"] = [[99.0, 99.0] for _ in forged["table"]["data"]]  # fake public table
    result = sdc.recheck(forged, sdc.DEFAULT_POLICY)
    assert result.status == "review"
    assert result.output is not None
    assert (
        result.output.table.loc["neonatal"].isna().all()
    )  # rebuilt from evidence, not the fake table


@pytest.mark.parametrize(
    "tamper",
    [
        "inflate_n",
        "inconsistent_margin",
        "values_disagree",
        "top_exceeds_total",
        "negative_count",
        "wrong_shape",
        "unknown_stat",
        "missing_evidence",
    ],
)
def test_forged_evidence_fails(tamper: str) -> None:
    df = _cohort()
    payload = _payload(
        sdc.pivot_table(df, values="los", index="ward", columns="sex", aggfunc="sum", margins=True)
    )
    ev = payload["evidence"]
    block = ev["blocks"][0]
    if tamper == "inflate_n":  # claim 50 children in the small neonatal cells
        i = ev["row_labels"].index(["neonatal"])
        block["n"][i] = [50.0, 50.0, 100.0]
        block["n_rows"][i] = [50.0, 50.0, 100.0]
    elif tamper == "inconsistent_margin":
        block["total"][0][-1] += 1000.0
    elif tamper == "values_disagree":
        block["values"][0][0] += 5.0
    elif tamper == "top_exceeds_total":
        block["top"][0][0][0] = block["total"][0][0] * 2
    elif tamper == "negative_count":
        block["n_negative"][0][0] = -1.0
    elif tamper == "wrong_shape":
        block["n"] = block["n"][:-1]
    elif tamper == "unknown_stat":
        block["stat"] = "percentile"
    elif tamper == "missing_evidence":
        del payload["evidence"]
    result = sdc.recheck(payload, sdc.DEFAULT_POLICY)
    assert result.status == "fail", tamper
    assert result.reasons and all(isinstance(r, str) for r in result.reasons)


@pytest.mark.parametrize(
    "payload", [None, [], {"schema": "other"}, {"schema": "phds.output", "version": 99}]
)
def test_malformed_payloads_fail_with_a_reason(payload: Any) -> None:
    result = sdc.recheck(payload, sdc.DEFAULT_POLICY)
    assert result.status == "fail" and result.reasons


def test_unknown_kind_fails() -> None:
    result = sdc.recheck(
        {"schema": "phds.output", "version": 1, "kind": "spreadsheet"}, sdc.DEFAULT_POLICY
    )
    assert result.status == "fail" and "kind" in result.reasons[0]


# ---- rounding -------------------------------------------------------------
def test_rounding_known_answers() -> None:
    x = np.array([0, 1, 2, 3, 7, 8, 12, 13, np.nan])
    np.testing.assert_array_equal(round_counts(x, "base5"), [0, 0, 0, 5, 5, 10, 10, 15, np.nan])
    np.testing.assert_array_equal(round_counts(x, "midpoint6"), [0, 3, 3, 3, 9, 9, 9, 15, np.nan])
    for method in ("base5", "midpoint6"):
        for true in range(0, 40):
            lo, hi = interval(float(round_counts(np.array([true]), method)[0]), method)
            assert lo <= true <= hi, (method, true)


def test_rounded_table_rounds_margins_independently() -> None:
    df = pd.DataFrame({"a": ["x"] * 12 + ["y"] * 13, "b": ["p"] * 25})
    out = sdc.crosstab(df.a, df.b, margins=True, policy=Policy(rounding="base5"))
    assert out.table.loc["x", "p"] == 10 and out.table.loc["y", "p"] == 15
    assert out.table.loc["All", "p"] == 25  # 25 rounds to 25, not 10 + 15 recomputed
    out = sdc.crosstab(df.a, df.b, margins=True, policy=Policy(rounding="midpoint6"))
    assert out.table.loc["x", "p"] == 9 and out.table.loc["y", "p"] == 15
    assert out.table.loc["All", "p"] == 27
    assert any("rounded" in r for r in out.reasons)


def test_rounding_never_reveals_a_suppressed_cell() -> None:
    df = pd.DataFrame({"a": ["x"] * 3 + ["y"] * 30, "b": ["p"] * 33})
    out = sdc.crosstab(df.a, df.b, policy=Policy(rounding="base5"))
    assert np.isnan(out.table.loc["x", "p"])


# ---- margins and secondary suppression ---------------------------------
def test_margins_are_cells_and_get_secondary_suppression() -> None:
    df = _cohort()
    out = sdc.crosstab(df.ward, df.sex, margins=True)
    table = out.table
    assert table.loc["neonatal", ["F", "M"]].isna().all()
    # the neonatal row total is below 10 too, and every suppressed cell must be protected
    audit = out.audit()
    assert len(audit) == int(out.suppressed.to_numpy().sum())
    assert audit["protected"].all(), audit
    assert (audit["width"] >= 10 - 1e-9).all()


def test_single_small_cell_in_two_by_two_gets_protected() -> None:
    df = pd.DataFrame(
        {
            "a": ["x"] * 3 + ["x"] * 40 + ["y"] * 50 + ["y"] * 60,
            "b": ["p"] * 3 + ["q"] * 40 + ["p"] * 50 + ["q"] * 60,
        }
    )
    out = sdc.crosstab(df.a, df.b, margins=True)
    sec = out.checks[out.checks.rule == "secondary"]
    assert len(sec) >= 1
    assert out.audit()["protected"].all()
    # without secondary suppression x/p would be recomputable: All/p - y/p
    assert out.suppressed.to_numpy().sum() >= 4


def test_checks_list_secondary_cells() -> None:
    df = _cohort()
    out = sdc.crosstab(df.ward, df.age_band, margins=True)
    sec = out.checks[out.checks.rule == "secondary"]
    assert set(sec.status) <= {"pass", "fail"}
    for row, col in zip(sec.row, sec.column, strict=True):
        assert np.isnan(out.table.loc[row, col])


def test_sum_tables_with_margins_are_protected() -> None:
    df = _cohort()
    out = sdc.pivot_table(
        df, values="los", index="ward", columns="sex", aggfunc="sum", margins=True
    )
    assert out.table.loc["neonatal", ["F", "M"]].isna().all()
    audit = out.audit()
    assert audit["protected"].all()


def test_html_shows_a_badge_for_each_status() -> None:
    df = _cohort()
    passing = sdc.crosstab(df.sex, df.age_band)
    assert passing.status == "pass"
    assert "PASS" in passing._repr_html_()
    held = sdc.crosstab(df.ward, df.sex)
    assert "REVIEW" in held._repr_html_()


def test_a_suppressed_zero_is_not_told_apart_from_a_small_count() -> None:
    """Naming the zeros rule beside a hidden cell would publish that it is exactly 0."""
    rows = [("F", "a")] * 15 + [("F", "b")] * 3 + [("M", "a")] * 20 + [("M", "b")] * 25
    rows += [("X", "a")] * 12  # X, b is an empty cell: zero
    df = pd.DataFrame(rows, columns=["sex", "band"])
    out = sdc.crosstab(df.sex, df.band, margins=True)
    assert set(out.checks.query("status == 'fail'").rule) == {"threshold", "zeros"}  # at the site
    payload = out.release_payload()
    hidden = {(c["row"], c["column"]): c for c in payload["checks"]["not_pass"]}
    assert hidden[("F", "b")] == hidden[("X", "b")] | {"row": "F", "column": "b"}
    assert {c["rule"] for c in hidden.values()} == {"threshold"}
    assert "zeros" not in payload["checks"]["summary"]
    assert payload["checks"]["summary"]["threshold"]["fail"] == 2
    text = " ".join(payload["reasons"]) + repr(out) + out._repr_html_()
    assert "zeros" not in text and "2 cell(s) suppressed by the threshold rule" in text


def test_a_declared_empty_category_is_a_suppressed_row_not_a_missing_one() -> None:
    """A missing row would publish a zero count without the zeros rule seeing it."""
    bands = ["0-1", "2-5", "6-11", "12-17"]
    band = pd.Series(pd.Categorical(["2-5"] * 12 + ["6-11"] * 15, categories=bands), name="band")
    kind = pd.Series(["A"] * 27, name="kind")
    table = sdc.crosstab(band, kind).table
    assert list(table.index) == bands
    assert table.loc["0-1"].isna().all() and table.loc["12-17"].isna().all()
    counts = sdc.value_counts(band).table
    assert set(counts.index) == set(bands) and np.isnan(counts["0-1"])
    means = sdc.pivot_table(
        pd.DataFrame({"band": band, "v": np.arange(27.0)}), values="v", index="band"
    ).table
    assert list(means.index) == bands and means.loc["0-1"].isna().all()


def test_a_one_child_group_is_shown_suppressed_not_dropped() -> None:
    """pandas drops the all-NaN std of a one-child group; that absence would say n = 1."""
    df = pd.DataFrame({"band": ["a"] * 20 + ["b"], "v": np.arange(21.0)})
    assert list(df.pivot_table(values="v", index="band", aggfunc="std").index) == ["a"]
    table = sdc.pivot_table(df, values="v", index="band", aggfunc="std").table
    assert list(table.index) == ["a", "b"] and np.isnan(table.loc["b"]).all()
