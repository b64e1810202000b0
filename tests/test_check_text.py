"""Free-text rule: ANSI stripping, numbers, number words, raw tables (boundaries)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phds_tre.check.text import (
    check_free_text,
    check_latex,
    find_numbers,
    scan_tables,
    strip_ansi,
)
from phds_tre.check.verdict import Verdict, combine, worst
from phds_tre.sdc.policy import DEFAULT_POLICY, Policy

P = DEFAULT_POLICY  # min_count = 10


# ---- verdict algebra -------------------------------------------------------
@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], "pass"),
        (["pass"], "pass"),
        (["pass", "review"], "review"),
        (["review", "fail", "pass"], "fail"),
        (["fail", "review"], "fail"),
    ],
)
def test_worst(statuses: list, expected: str) -> None:
    assert worst(statuses) == expected


def test_combine_drops_pass_notes_when_held() -> None:
    combined = combine([Verdict.passed("fine"), Verdict.review("numbers"), Verdict.fail("bad")])
    assert combined.status == "fail"
    assert combined.reasons == ("numbers", "bad")
    assert combine([Verdict.passed("fine")]).reasons == ("fine",)


# ---- ANSI ------------------------------------------------------------------
def test_colour_codes_are_stripped_before_looking_for_numbers() -> None:
    coloured = "\x1b[1;31mError\x1b[0m: \x1b[38;5;208mcolumn missing\x1b[39m"
    clean, problems = strip_ansi(coloured)
    assert clean == "Error: column missing"
    assert problems == []
    assert check_free_text(coloured, P).status == "pass"


def test_ipython_traceback_colours_leave_only_real_numbers() -> None:
    text = "\x1b[0;31m---------\x1b[0m\n\x1b[0;32mCell \x1b[0;32mIn[3]\x1b[0m"
    verdict = check_free_text(text, P)
    assert verdict.status == "review"
    assert "numbers in free text: 3" in verdict.reasons


def test_escape_strings_that_hide_text_fail() -> None:
    # An OSC 8 hyperlink: its URL (with a number) is never displayed.
    hidden = "\x1b]8;;https://example.org/?n=3\x1b\\link\x1b]8;;\x1b\\"
    verdict = check_free_text(hidden, P)
    assert verdict.status == "fail"
    assert any("never displayed" in r for r in verdict.reasons)


@pytest.mark.parametrize(
    "text",
    [
        "\x1b[38;2;3;12;5mhello\x1b[0m",  # truecolour: three free bytes
        "\x1b[8msecret\x1b[0m",  # conceal
        "\x1b[12;34;56qhello",  # not a colour or cursor sequence
    ],
)
def test_unusual_escapes_are_reported_not_silently_dropped(text: str) -> None:
    verdict = check_free_text(text, P)
    assert verdict.status == "review"
    assert any("unusual terminal escape" in r for r in verdict.reasons)


# ---- numbers ---------------------------------------------------------------
def test_text_without_numbers_passes() -> None:
    verdict = check_free_text("Model fitted; see the released table below.\n", P)
    assert verdict.status == "pass"


def test_numbers_in_text_go_to_review_and_are_named() -> None:
    verdict = check_free_text("Found 7 patients born on 2012-03-04 (mean age 5.25)", P)
    assert verdict.status == "review"
    assert verdict.reasons == ("numbers in free text: 7, 2012-03-04, 5.25",)


def test_only_the_first_few_numbers_are_quoted() -> None:
    verdict = check_free_text(" ".join(f"x{i}" for i in range(20, 40)), P)
    assert verdict.reasons[-1].endswith("… (20 distinct)")


def test_unicode_digits_are_numbers() -> None:
    assert find_numbers("n = ３ and ٣") == ["３", "٣"]


@pytest.mark.parametrize("text", ["three children", "Twelve admissions", "a dozen"])
def test_number_words_go_to_review(text: str) -> None:
    verdict = check_free_text(text, P)
    assert verdict.status == "review"
    assert "number words" in verdict.reasons[0]


def test_hidden_characters_go_to_review() -> None:
    assert check_free_text("done\rDONE", P).status == "review"
    assert check_free_text("zero\u200bwidth", P).status == "review"
    assert check_free_text("bell\x07", P).status == "review"


# ---- raw tables: the small-count boundary ----------------------------------------
@pytest.mark.parametrize(("value", "expected"), [("9", "fail"), ("10", "review"), ("1", "fail")])
def test_small_integer_in_a_table_boundary(value: str, expected: str) -> None:
    text = f"group  n\nA      {value}\nB      250\n"
    verdict = check_free_text(text, P)
    assert verdict.status == expected
    if expected == "fail":
        assert any(
            f"possible small counts below min_count=10: {value}" in r for r in verdict.reasons
        )


def test_zero_in_a_table_is_not_a_small_count() -> None:
    # Zeros are a class-disclosure question for the structured rules; here: review.
    assert check_free_text("group  n\nA      0\nB      250\n", P).status == "review"


def test_boundary_follows_the_policy() -> None:
    text = "group  n\nA      9\nB      250\n"
    assert check_free_text(text, Policy(min_count=9)).status == "review"
    assert check_free_text(text, Policy(min_count=10)).status == "fail"


def test_pandas_value_counts_with_a_small_count_fails() -> None:
    s = pd.Series(["F"] * 12 + ["M"] * 3, name="sex")
    verdict = check_free_text(repr(s.value_counts()), P)
    assert verdict.status == "fail"
    assert any(": 3" in r for r in verdict.reasons)


def test_pandas_frame_default_index_is_not_a_count() -> None:
    df = pd.DataFrame({"a": [100, 200], "b": [30, 40]})
    scan = scan_tables(repr(df), 10)
    assert scan is not None and scan.small_counts == ()
    assert check_free_text(repr(df), P).status == "review"


def test_one_row_frame_is_a_table() -> None:
    df = pd.DataFrame({"a": [3], "b": [40]})
    assert check_free_text(repr(df), P).status == "fail"


def test_long_frame_with_elided_rows_keeps_index_detection() -> None:
    df = pd.DataFrame(np.random.default_rng(0).random((70, 30)))
    verdict = check_free_text(repr(df), P)
    assert verdict.status == "review"
    assert any("raw table" in r for r in verdict.reasons)


def test_numpy_array_of_small_counts_fails() -> None:
    assert check_free_text(repr(np.array([[3, 12], [15, 20]])), P).status == "fail"
    assert check_free_text(repr(np.array([[30, 12], [15, 20]])), P).status == "review"


@pytest.mark.parametrize(
    "text",
    [
        ",a,b\nx,3,40\ny,50,60\n",  # CSV
        "a\tb\nx\t3\ny\t40\n",  # TSV
        "| g | n |\n|---|---|\n| x | 3 |\n| y | 40 |\n",  # markdown
        "Sex    n (%)\nF      3 (25.0%)\nM      90 (75.0%)\n",  # Table 1 "n (%)"
        "3\n5\n",  # a column of numbers
    ],
)
def test_other_raw_table_shapes_with_small_counts_fail(text: str) -> None:
    assert check_free_text(text, P).status == "fail"


def test_label_value_lines_with_single_spaces_are_free_text() -> None:
    verdict = check_free_text("Mean age: 5.3\nMedian age: 4\n", P)
    assert verdict.status == "review"
    assert not any("raw table" in r for r in verdict.reasons)


# ---- LaTeX -------------------------------------------------------------------
def test_latex_styling_that_can_hide_fails() -> None:
    assert check_latex(r"$\style{display:none}{x}$", P).status == "fail"
    assert check_latex(r"$\alpha + \beta$", P).status == "pass"
    assert check_latex(r"$x^2$", P).status == "review"
