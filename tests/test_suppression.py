"""Tests for :mod:`phds_tre.sdc.suppression`: secondary suppression and the LP audit."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.optimize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from phds_tre.sdc.suppression import (
    Intervals,
    SuppressionResult,
    protection_intervals,
    secondary_suppression,
)

REQUIRED = 10.0


def with_margins(interior: object) -> np.ndarray:
    """The augmented table: interior cells, row totals, column totals, grand total."""
    x = np.asarray(interior, dtype=float)
    r, c = x.shape
    a = np.zeros((r + 1, c + 1))
    a[:r, :c] = x
    a[:r, c] = x.sum(axis=1)
    a[r, :c] = x.sum(axis=0)
    a[r, c] = x.sum()
    return a


def mask_of(shape: tuple[int, ...], *cells: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for cell in cells:
        m[cell] = True
    return m


def cells_of(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in np.argwhere(mask)}


def assert_protected(
    values: np.ndarray, primary: np.ndarray, result: SuppressionResult, required: float
) -> Intervals:
    """Audit a result by LP: every suppressed cell not flagged has width >= required."""
    assert result.secondary.dtype == np.bool_ and result.unprotected.dtype == np.bool_
    assert not (result.secondary & primary).any()
    suppressed = primary | result.secondary
    assert not (result.unprotected & ~suppressed).any()
    iv = protection_intervals(values, suppressed, margins=True)
    checked = suppressed & ~result.unprotected
    assert np.all(iv.width[checked] >= required - 1e-9), iv.width[checked].min()
    # The true values are feasible, so they lie inside their intervals.
    assert np.all(iv.lower[suppressed] <= values[suppressed] + 1e-7)
    assert np.all(iv.upper[suppressed] >= values[suppressed] - 1e-7)
    return iv


# ---------------------------------------------------------------------------
# known answers


def test_textbook_rectangle_3x3() -> None:
    a = with_margins([[20, 30, 25], [15, 2, 18], [22, 27, 31]])
    primary = mask_of(a.shape, (1, 1))
    res = secondary_suppression(a, primary, REQUIRED, margins=True)
    # Every rectangle needs 3 new cells; the cheapest by value that reaches 10 is
    # rows {1, 2} x columns {0, 1}: 15 + 22 + 27 = 64 (width min(15, 27) + 2 = 17).
    assert cells_of(res.secondary) == {(1, 0), (2, 0), (2, 1)}
    assert not res.unprotected.any()
    iv = assert_protected(a, primary, res, REQUIRED)
    # One degree of freedom t in [-2, 15]: +t at (1,1), (2,0); -t at (1,0), (2,1).
    assert iv.lower[1, 1] == pytest.approx(0) and iv.upper[1, 1] == pytest.approx(17)
    assert iv.lower[1, 0] == pytest.approx(0) and iv.upper[1, 0] == pytest.approx(17)
    assert iv.lower[2, 0] == pytest.approx(20) and iv.upper[2, 0] == pytest.approx(37)
    assert iv.lower[2, 1] == pytest.approx(12) and iv.upper[2, 1] == pytest.approx(29)


def test_one_column_table_forces_the_row_total() -> None:
    # In a one-column table a cell equals its row total, so the total must go too.
    a = with_margins([[5], [30], [40]])
    primary = mask_of(a.shape, (0, 0))
    res = secondary_suppression(a, primary, REQUIRED, margins=True)
    assert res.secondary[0, 1], "the row total of the primary cell must be suppressed"
    # Cheapest rectangle: rows {0, 1} x (cell, row total): 5 + 30 + 30.
    assert cells_of(res.secondary) == {(0, 1), (1, 0), (1, 1)}
    iv = assert_protected(a, primary, res, REQUIRED)
    for cell in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        assert (iv.lower[cell], iv.upper[cell]) == pytest.approx((0, 35))


def test_grand_total_below_required_suppresses_the_grand_total() -> None:
    """Decision: while the grand total G is published every cell lies in [0, G],
    so with G < required protection needs G suppressed. The algorithm suppresses
    it, with the primary cell's row and column totals, which leaves every
    suppressed cell unbounded above; nothing is left flagged unprotected."""
    a = with_margins([[1, 2], [0, 3]])
    assert a[-1, -1] < REQUIRED
    primary = mask_of(a.shape, (0, 0))
    res = secondary_suppression(a, primary, REQUIRED, margins=True)
    assert cells_of(res.secondary) == {(0, 2), (2, 0), (2, 2)}
    assert not res.unprotected.any()
    iv = assert_protected(a, primary, res, REQUIRED)
    suppressed = primary | res.secondary
    assert np.all(np.isinf(iv.upper[suppressed]))


def test_zero_cell_in_a_zero_row_forces_the_row_total() -> None:
    # A published zero row total pins every cell of the row to 0.
    a = with_margins([[0, 0, 0], [12, 20, 15], [30, 11, 25]])
    primary = mask_of(a.shape, (0, 1))
    res = secondary_suppression(a, primary, REQUIRED, margins=True)
    assert res.secondary[0, 3]
    assert cells_of(res.secondary) == {(0, 3), (1, 1), (1, 3)}
    iv = assert_protected(a, primary, res, REQUIRED)
    assert (iv.lower[0, 1], iv.upper[0, 1]) == pytest.approx((0, 20))


def test_zero_cell_upper_bound_reaches_required() -> None:
    a = with_margins([[0, 14, 20], [13, 25, 18], [16, 12, 30]])
    primary = mask_of(a.shape, (0, 0))
    res = secondary_suppression(a, primary, REQUIRED, margins=True)
    iv = assert_protected(a, primary, res, REQUIRED)
    assert iv.lower[0, 0] == 0 and iv.upper[0, 0] >= REQUIRED


def test_primary_cells_protecting_each_other_need_no_secondary() -> None:
    # The rectangle of the four primaries has width min(12, 11) + min(4, 3) = 14.
    a = with_margins([[4, 30, 12], [11, 25, 3], [40, 41, 42]])
    primary = mask_of(a.shape, (0, 0), (0, 2), (1, 0), (1, 2))
    res = secondary_suppression(a, primary, REQUIRED, margins=True)
    assert not res.secondary.any()
    assert_protected(a, primary, res, REQUIRED)


def test_required_zero_needs_nothing() -> None:
    a = with_margins([[1, 2], [3, 4]])
    res = secondary_suppression(a, mask_of(a.shape, (0, 0)), 0.0, margins=True)
    assert not res.secondary.any() and not res.unprotected.any()


def test_per_cell_required() -> None:
    a = with_margins([[20, 30, 25], [15, 2, 18], [22, 27, 31]])
    primary = mask_of(a.shape, (1, 1))
    required = np.full(a.shape, 10.0)
    required[1, 1] = 30.0  # more than one rectangle of width 17 can give
    res = secondary_suppression(a, primary, required, margins=True)
    iv = protection_intervals(a, primary | res.secondary, margins=True)
    suppressed = primary | res.secondary
    assert np.all(iv.width[suppressed] >= required[suppressed] - 1e-9)


def test_no_margins_no_secondary() -> None:
    a = np.array([[1.0, 20.0], [3.0, 40.0]])
    primary = mask_of(a.shape, (0, 0), (1, 0))
    res = secondary_suppression(a, primary, REQUIRED, margins=False)
    assert not res.secondary.any() and not res.unprotected.any()
    iv = protection_intervals(a, primary, margins=False)
    assert np.all(iv.lower[primary] == 0) and np.all(np.isposinf(iv.upper[primary]))
    assert np.all(np.isnan(iv.lower[~primary])) and np.all(np.isnan(iv.upper[~primary]))


# ---------------------------------------------------------------------------
# protection_intervals on hand-computed examples


def test_intervals_one_rectangle_with_nontrivial_lower_bounds() -> None:
    a = with_margins([[10, 1], [2, 8]])
    suppressed = mask_of(a.shape, (0, 0), (0, 1), (1, 0), (1, 1))
    iv = protection_intervals(a, suppressed, margins=True)
    # x = (10 + t, 1 - t, 2 - t, 8 + t) with t in [-8, 1].
    np.testing.assert_allclose(iv.lower[:2, :2], [[2, 0], [1, 0]], atol=1e-9)
    np.testing.assert_allclose(iv.upper[:2, :2], [[11, 9], [10, 9]], atol=1e-9)
    np.testing.assert_allclose(iv.width[:2, :2], 9, atol=1e-9)
    assert np.all(np.isnan(iv.lower[~suppressed])) and np.all(np.isnan(iv.width[~suppressed]))


def test_intervals_cells_pinned_by_their_columns() -> None:
    a = with_margins([[3, 4, 5], [6, 7, 8], [9, 11, 13]])
    suppressed = mask_of(a.shape, (0, 0), (0, 1))
    iv = protection_intervals(a, suppressed, margins=True)
    assert (iv.lower[0, 0], iv.upper[0, 0]) == pytest.approx((3, 3))
    assert (iv.lower[0, 1], iv.upper[0, 1]) == pytest.approx((4, 4))


def test_intervals_unbounded_when_all_relations_are_hidden() -> None:
    a = with_margins([[1, 2], [0, 3]])
    suppressed = mask_of(a.shape, (0, 0), (0, 2), (2, 0), (2, 2))
    iv = protection_intervals(a, suppressed, margins=True)
    # All four move together: +t with t >= -1 (the cell itself, value 1).
    assert iv.lower[0, 0] == pytest.approx(0) and iv.lower[0, 2] == pytest.approx(2)
    assert iv.lower[2, 0] == pytest.approx(0) and iv.lower[2, 2] == pytest.approx(5)
    assert np.all(np.isposinf(iv.upper[suppressed]))
    assert np.all(np.isposinf(iv.width[suppressed]))


def test_intervals_suppressed_margins_in_a_one_column_table() -> None:
    a = with_margins([[5], [30], [40]])
    suppressed = mask_of(a.shape, (0, 0), (0, 1), (1, 0), (1, 1))
    iv = protection_intervals(a, suppressed, margins=True)
    np.testing.assert_allclose(iv.lower[:2, :], 0, atol=1e-9)
    np.testing.assert_allclose(iv.upper[:2, :], 35, atol=1e-9)


def test_intervals_ignore_the_values_of_suppressed_cells() -> None:
    a = with_margins([[10, 1], [2, 8]])
    suppressed = mask_of(a.shape, (0, 0), (0, 1), (1, 0), (1, 1))
    b = a.copy()
    b[suppressed] = np.nan
    assert np.array_equal(
        protection_intervals(a, suppressed, margins=True).upper,
        protection_intervals(b, suppressed, margins=True).upper,
        equal_nan=True,
    )


def test_intervals_nothing_suppressed() -> None:
    a = with_margins([[1, 2], [3, 4]])
    iv = protection_intervals(a, np.zeros(a.shape, dtype=bool), margins=True)
    assert np.all(np.isnan(iv.lower)) and np.all(np.isnan(iv.upper))


def test_intervals_inconsistent_published_cells() -> None:
    a = with_margins([[5, 5], [5, 5]])
    a[0, 1] = 8  # row 0 and column 1 no longer add up
    with pytest.raises(ValueError, match="not additive"):
        protection_intervals(a, mask_of(a.shape, (0, 0)), margins=True)


def test_intervals_infeasible_lp_is_a_value_error() -> None:
    # Every equation has a free variable, yet non-negativity cannot hold:
    # row 0 says x00 = 3 - 5 = -2.
    a = np.array([[0.0, 5.0, 3.0], [4.0, 0.0, 5.0], [2.0, 6.0, 8.0]])
    suppressed = mask_of(a.shape, (0, 0), (1, 1))
    with pytest.raises(ValueError, match="infeasible"):
        protection_intervals(a, suppressed, margins=True)


# ---------------------------------------------------------------------------
# input validation


def test_non_additive_table_is_rejected() -> None:
    a = with_margins([[1, 2], [3, 4]])
    a[0, 0] += 1
    with pytest.raises(ValueError, match="not additive"):
        secondary_suppression(a, mask_of(a.shape, (0, 1)), REQUIRED, margins=True)


@pytest.mark.parametrize(
    ("values", "primary", "required", "match"),
    [
        (with_margins([[1, 2]]) * -1, np.zeros((2, 3), dtype=bool), 1.0, "non-negative"),
        (with_margins([[1, 2]]), np.zeros((2, 3), dtype=int), 1.0, "boolean"),
        (with_margins([[1, 2]]), np.zeros((3, 3), dtype=bool), 1.0, "shape"),
        (with_margins([[1, 2]]), np.zeros((2, 3), dtype=bool), -1.0, "required"),
        (with_margins([[1, 2]]), np.zeros((2, 3), dtype=bool), np.ones(4), "required"),
        (np.ones(3), np.zeros(3, dtype=bool), 1.0, "2-D"),
        (np.ones((1, 3)), np.zeros((1, 3), dtype=bool), 1.0, "at least"),
    ],
)
def test_bad_input(
    values: np.ndarray, primary: np.ndarray, required: float | np.ndarray, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        secondary_suppression(values, primary, required, margins=True)


# ---------------------------------------------------------------------------
# properties


@st.composite
def tables(draw: st.DrawFn, max_dim: int = 8, max_count: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A random count table with margins and a random primary mask (margins included)."""
    r = draw(st.integers(1, max_dim))
    c = draw(st.integers(1, max_dim))
    counts = st.one_of(st.integers(0, max_count), st.just(0))  # plenty of zeros
    interior = draw(hnp.arrays(np.int64, (r, c), elements=counts))
    values = with_margins(interior)
    primary = draw(hnp.arrays(np.bool_, values.shape, elements=st.booleans()))
    return values, primary


# Each example runs two LPs per suppressed cell; these counts keep the file under ~30 s.
PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(tables())
def test_every_suppressed_cell_is_protected(table: tuple[np.ndarray, np.ndarray]) -> None:
    """The LP audit confirms the fast path's guarantee, and nothing is unprotected.

    `unprotected` is empty for every table with margins and a finite
    `required`, not only when the grand total is comfortably large: suppressing
    a cell with its row total, column total and grand total always leaves it
    unbounded above, so the search always has a rectangle that suffices.
    """
    values, primary = table
    res = secondary_suppression(values, primary, REQUIRED, margins=True)
    assert not res.unprotected.any()
    assert_protected(values, primary, res, REQUIRED)


@settings(max_examples=50, deadline=None)
@given(tables(max_dim=3, max_count=4))
def test_small_grand_total_ends_suppressed(table: tuple[np.ndarray, np.ndarray]) -> None:
    values, primary = table
    res = secondary_suppression(values, primary, REQUIRED, margins=True)
    assert not res.unprotected.any()
    if values[-1, -1] < REQUIRED and primary.any():
        assert (primary | res.secondary)[-1, -1]
    assert_protected(values, primary, res, REQUIRED)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.data())
def test_magnitude_tables_and_per_cell_required(
    table: tuple[np.ndarray, np.ndarray], data: st.DataObject
) -> None:
    values, primary = table
    scale = data.draw(hnp.arrays(np.float64, values.shape, elements=st.floats(0.1, 3.0)))
    values = with_margins(values[:-1, :-1] * scale[:-1, :-1])  # non-integer sums
    required = data.draw(hnp.arrays(np.float64, values.shape, elements=st.floats(0, 40)))
    res = secondary_suppression(values, primary, required, margins=True)
    assert not res.unprotected.any()
    suppressed = primary | res.secondary
    iv = protection_intervals(values, suppressed, margins=True)
    assert np.all(iv.width[suppressed] >= required[suppressed] * (1 - 1e-7) - 1e-7)


@settings(max_examples=40, deadline=None)
@given(tables())
def test_without_margins_nothing_is_added(table: tuple[np.ndarray, np.ndarray]) -> None:
    values, primary = table
    inner, inner_primary = values[:-1, :-1], primary[:-1, :-1]
    res = secondary_suppression(inner, inner_primary, REQUIRED, margins=False)
    assert not res.secondary.any() and not res.unprotected.any()


# ---------------------------------------------------------------------------
# scale


def big_table(mean: float, seed: int, rows: int = 200, cols: int = 100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 2 / (2 + mean), size=(rows, cols))
    return with_margins(counts)


def test_medium_table_audited_by_lp() -> None:
    values = big_table(12.0, seed=3, rows=25, cols=15)
    rng = np.random.default_rng(4)
    primary = np.zeros(values.shape, dtype=bool)
    primary[:-1, :-1] = values[:-1, :-1] < 10
    primary |= rng.random(values.shape) < 0.03  # a few large cells and margins too
    res = secondary_suppression(values, primary, REQUIRED, margins=True)
    assert not res.unprotected.any()
    assert_protected(values, primary, res, REQUIRED)


@pytest.mark.parametrize(("mean", "n_min", "n_max"), [(30.0, 2_500, 3_500), (6.0, 15_000, 17_000)])
def test_fast_path_does_not_use_the_lp(
    monkeypatch: pytest.MonkeyPatch, mean: float, n_min: int, n_max: int
) -> None:
    """200 x 100 tables with ~3,000 and ~16,000 primary cells, LP solver disabled."""

    def no_lp(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fast path called scipy.optimize.linprog")

    monkeypatch.setattr(scipy.optimize, "linprog", no_lp)
    small = with_margins([[1, 2], [3, 4]])
    with pytest.raises(AssertionError):  # the patch does reach the module
        protection_intervals(small, mask_of(small.shape, (0, 0)), margins=True)

    values = big_table(mean, seed=0)
    primary = np.zeros(values.shape, dtype=bool)
    primary[:-1, :-1] = values[:-1, :-1] < 10
    assert n_min <= primary.sum() <= n_max
    start = time.perf_counter()
    res = secondary_suppression(values, primary, REQUIRED, margins=True)
    elapsed = time.perf_counter() - start
    assert not (res.secondary & primary).any()
    assert not res.unprotected.any()
    # Typically well under a second; the bound only catches a complexity regression.
    assert elapsed < 20.0
