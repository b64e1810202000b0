"""Secondary cell suppression for tables with margins, and an exact LP audit.

Data model
----------
A table with margins is a 2-D float array ``values`` of shape ``(R+1, C+1)``:
rows ``0..R-1`` and columns ``0..C-1`` are the interior cells, the last row
holds the column totals, the last column the row totals, and ``values[R, C]``
is the grand total. All values are ``>= 0`` (counts, or sums of a non-negative
magnitude) and the table is additive.

This 2-D form is the general case: an n-D table built by pandas with
MultiIndex rows and columns and ``margins=True`` (``margins_name="All"``) has
exactly this structure once the row and column MultiIndexes are flattened,
because pandas publishes only the row totals, the column totals and the grand
total; no per-level subtotal is a published relation. (A table that does
publish subtotals needs a hierarchical model, which this module does not
attempt.)

A table without margins (``margins=False``, shape ``(R, C)``) publishes no
linear relation, so nothing needs secondary suppression and every suppressed
cell's feasible interval is ``[0, +inf)``.

Fast path (:func:`secondary_suppression`)
-----------------------------------------
Multiply the margin row and the margin column by -1 (the corner stays +1): in
this signed table ``B`` every row and every column sums to zero, so adding
``+t, -t, -t, +t`` at the corners ``(i, j), (i, j'), (i', j), (i', j')`` of
any rectangle keeps every published relation. Rectangles may use margin
positions; that is how a one-column table or a suppressed total is handled.
Translated back to the published table, each corner moves by ``+t`` or
``-t``, and non-negativity of the corners bounds ``t``. The feasible range
of ``t`` has the same width for all four corners: the minimum over the
corners moving one way plus the minimum over those moving the other way
(``+inf`` when all four move together, e.g. a cell with its row total, its
column total and the grand total). Rectangles through the same cell whose
other corners are disjoint add their upward rooms; the downward room is capped
by the cell's own value. A lower bound on the exact interval width is
therefore computed without any LP.

Each suppressed cell still short of ``required`` gets the cheapest rectangles:
first rectangles whose corners are already all suppressed, then the one
needing the fewest new cells and, among those, the smallest total value
suppressed (least information lost). Newly suppressed cells are checked in
turn. Suppression only ever widens intervals (a published value becomes a
free variable), so a cell once protected stays protected.

Speed: each row's columns and each column's rows are sorted by value once.
A first pass, vectorised over all primary cells, tries for each the best
already-suppressed rectangle among the largest corners and then several
disjoint ones (the k-th largest row corner paired with the k-th largest column
corner); in densely suppressed tables this settles almost every cell. Only the
remaining cells scan their full (R+1) x (C+1) grid of rectangles, once per
cell, vectorised. A 200 x 100 table with 3,000 to 17,000 primary cells takes
well under a second on one core.

With margins, every cell can always be protected: suppressing a cell together
with its row total, its column total and the grand total leaves it unbounded
above. Consequently ``unprotected`` is empty for every table with at least one
interior row and column and a finite ``required``; it is kept in the result
for callers (and for a future cost model that forbids suppressing totals).

Decision for a grand total below ``required``: every cell lies in
``[0, grand total]`` while the grand total is published, so no protection
exists without suppressing it. The algorithm then suppresses the grand total
(and the row and column totals of the cells concerned), which makes the
protected cells unbounded above; it never leaves such cells silently
unprotected, and the LP audit confirms the infinite upper bounds.

Audit (:func:`protection_intervals`)
------------------------------------
The exact feasible interval of every suppressed cell, given the published
cells, the additivity equations of every row and column of the augmented
table and non-negativity, by two LPs per suppressed cell solved by HiGHS
(``scipy.optimize.linprog``). It is meant for audits of small and medium
tables; the fast path never calls it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "Intervals",
    "SuppressionResult",
    "protection_intervals",
    "secondary_suppression",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_QUICK_K = 6
"""Rows and columns tried by the quick check before the full candidate grid."""


@dataclass(frozen=True, eq=False)
class SuppressionResult:
    """Outcome of :func:`secondary_suppression`.

    Attributes:
        secondary: bool mask of the cells suppressed in addition to the primary
            ones (never overlaps the primary mask).
        unprotected: bool mask of suppressed cells whose guaranteed interval
            width is still below ``required`` after best effort; the caller must
            suppress more or fail the output.
    """

    secondary: BoolArray
    unprotected: BoolArray


@dataclass(frozen=True, eq=False)
class Intervals:
    """Feasible interval of every suppressed cell (:func:`protection_intervals`).

    Attributes:
        lower: lower bounds; NaN for published cells.
        upper: upper bounds; NaN for published cells, ``+inf`` when unbounded.
    """

    lower: FloatArray
    upper: FloatArray

    @property
    def width(self) -> FloatArray:
        """``upper - lower`` (NaN for published cells, ``+inf`` when unbounded)."""
        return self.upper - self.lower


# ---------------------------------------------------------------------------
# validation helpers


def _as_table(values: npt.ArrayLike, *, margins: bool) -> FloatArray:
    a = np.array(values, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"values must be a 2-D array, got {a.ndim} dimension(s)")
    smallest = 2 if margins else 1
    if a.shape[0] < smallest or a.shape[1] < smallest:
        what = "one interior row and column plus margins" if margins else "one cell"
        raise ValueError(f"values of shape {a.shape} must have at least {what}")
    return a


def _as_mask(mask: npt.ArrayLike, shape: tuple[int, ...], name: str) -> BoolArray:
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        # Refuse 0/1 or value arrays: passing the table instead of its mask is a
        # plausible mistake that would otherwise silently suppress every non-zero cell.
        raise ValueError(f"{name} must be a boolean mask, got dtype {m.dtype}")
    if m.shape != shape:
        raise ValueError(f"{name} has shape {m.shape}, expected {shape}")
    return m.copy()


def _signs(n: int) -> FloatArray:
    """+1 for the interior positions, -1 for the margin (last) position."""
    s = np.ones(n)
    s[-1] = -1.0
    return s


def _check_values(a: FloatArray, where: BoolArray) -> None:
    sub = a[where]
    if not np.all(np.isfinite(sub)):
        raise ValueError("values must be finite")
    if np.any(sub < 0):
        raise ValueError("values must be non-negative")


def _check_additive(a: FloatArray) -> None:
    b = a * np.outer(_signs(a.shape[0]), _signs(a.shape[1]))
    for axis, label in ((1, "row"), (0, "column")):
        residual = np.abs(b.sum(axis=axis))
        # Relative tolerance: sums of non-integer magnitudes carry rounding error.
        tol = 1e-9 * np.abs(b).sum(axis=axis) + 1e-12
        bad = np.flatnonzero(residual > tol)
        if bad.size:
            raise ValueError(
                f"table is not additive: {label} {int(bad[0])} differs from its total "
                f"by {float(residual[bad[0]]):g}"
            )


def _as_required(required: npt.ArrayLike, shape: tuple[int, int]) -> FloatArray:
    r = np.asarray(required, dtype=np.float64)
    try:
        r = np.broadcast_to(r, shape)
    except ValueError:
        raise ValueError(f"required of shape {r.shape} does not fit the table {shape}") from None
    if np.any(np.isnan(r)) or np.any(r < 0):
        raise ValueError("required must be non-negative (and not NaN)")
    return r


# ---------------------------------------------------------------------------
# fast path


class _Protector:
    """State of the rectangle heuristic on one augmented table.

    Conventions for a target ``(i, j)`` and a rectangle ``(i', j')``: the *row
    corner* is ``(i, j')``, the *column corner* ``(i', j)``, the *diagonal
    corner* ``(i', j')``. A corner is *opposite* when it moves against the
    target (it limits the target's upward room) and *same* otherwise (it limits
    the downward room, as does the target itself).
    """

    def __init__(self, a: FloatArray, suppressed: BoolArray, required: FloatArray) -> None:
        self.a = a
        self.req = required
        self.s = suppressed  # mutated as cells are added
        self.n_rows, self.n_cols = a.shape
        self.sr = _signs(self.n_rows)
        self.sc = _signs(self.n_cols)
        sign = np.outer(self.sr, self.sc)
        inf = np.inf
        # The diagonal corner moves against a target of sign e when e * sign < 0;
        # only two target signs exist, so both variants are precomputed once.
        self.diag_up = {
            1.0: np.where(sign < 0, a, inf),
            -1.0: np.where(sign > 0, a, inf),
        }
        self.diag_dn = {
            1.0: np.where(sign > 0, a, inf),
            -1.0: np.where(sign < 0, a, inf),
        }
        # Lexicographic cost (new cells first, then value) folded into one float:
        # a new cell costs `big` plus its value, and three values never reach `big`.
        self.big = 3.0 * float(a.max()) + 1.0
        self.cost = np.where(suppressed, 0.0, self.big + a)
        # Best guaranteed width known per cell; only ever grows (suppression widens).
        self.known = np.zeros_like(a)
        # Static orders of each row's columns and each column's rows by decreasing value.
        self.row_order = np.argsort(-a, axis=1, kind="stable")
        self.col_order = np.argsort(-a, axis=0, kind="stable")
        self.queue: deque[tuple[int, int]] = deque()

    # -- rooms ---------------------------------------------------------------

    def _grid_rooms(self, i: int, j: int) -> tuple[FloatArray, FloatArray]:
        """Upward room ``u`` and downward limit ``d`` (target excluded) of every
        rectangle ``(i', j')`` through ``(i, j)``, as two full-table grids."""
        inf = np.inf
        row, col = self.a[i, :], self.a[:, j]
        opp_r = self.sc[j] * self.sc > 0
        opp_c = self.sr[i] * self.sr > 0
        e = float(self.sr[i] * self.sc[j])
        u = np.minimum(
            np.minimum.outer(np.where(opp_c, col, inf), np.where(opp_r, row, inf)),
            self.diag_up[e],
        )
        d = np.minimum(
            np.minimum.outer(np.where(opp_c, inf, col), np.where(opp_r, inf, row)),
            self.diag_dn[e],
        )
        return u, d

    def _rooms(
        self,
        ti: npt.NDArray[np.intp] | int,
        tj: npt.NDArray[np.intp] | int,
        rows: npt.NDArray[np.intp],
        cols: npt.NDArray[np.intp],
    ) -> tuple[FloatArray, FloatArray]:
        """``u`` and ``d`` of the rectangles ``(rows, cols)`` through the targets
        ``(ti, tj)``; all four arguments broadcast against each other."""
        a, sr, sc, inf = self.a, self.sr, self.sc, np.inf
        col_v, row_v, diag_v = a[rows, tj], a[ti, cols], a[rows, cols]
        # A corner moves against the target when its sign relative to the
        # target's differs in the signed table (see the module docstring).
        opp_c = sr[ti] * sr[rows] > 0
        opp_r = sc[tj] * sc[cols] > 0
        opp_d = sr[ti] * sc[tj] * sr[rows] * sc[cols] < 0
        u = np.minimum(
            np.minimum(np.where(opp_c, col_v, inf), np.where(opp_r, row_v, inf)),
            np.where(opp_d, diag_v, inf),
        )
        d = np.minimum(
            np.minimum(np.where(opp_c, inf, col_v), np.where(opp_r, inf, row_v)),
            np.where(opp_d, inf, diag_v),
        )
        return u, d

    # -- bookkeeping ---------------------------------------------------------

    def _commit(self, i: int, j: int, rects: list[tuple[int, int, float]], total: float) -> None:
        for ip, jp, w in rects:
            for r, c in ((i, jp), (ip, j), (ip, jp)):
                if not self.s[r, c]:
                    self.s[r, c] = True
                    self.cost[r, c] = 0.0
                    self.queue.append((r, c))
                # A single rectangle gives all four corners the same range of t.
                self.known[r, c] = max(self.known[r, c], w)
        self.known[i, j] = max(self.known[i, j], total)

    # -- search --------------------------------------------------------------

    def _quick(self, i: int, j: int, need: float) -> bool:
        """Look for already-suppressed rectangles among the largest corners.

        O(R + C) per cell, and enough for most cells of a densely suppressed
        table, where the full candidate grid would dominate the run.
        """
        s = self.s
        cols = self.row_order[i]
        cols = cols[s[i, cols]]
        cols = cols[cols != j]
        rows = self.col_order[:, j]
        rows = rows[s[rows, j]]
        rows = rows[rows != i]
        if cols.size == 0 or rows.size == 0:
            return False
        a_t = float(self.a[i, j])

        # One rectangle among the K largest row and column corners.
        top_r, top_c = rows[:_QUICK_K, None], cols[None, :_QUICK_K]
        u, d = self._rooms(i, j, top_r, top_c)
        w = np.where(s[top_r, top_c], u + np.minimum(d, a_t), -np.inf)
        k = int(np.argmax(w))
        if w.flat[k] >= need:
            r, c = divmod(k, w.shape[1])
            self._commit(
                i, j, [(int(top_r[r, 0]), int(top_c[0, c]), float(w.flat[k]))], float(w.flat[k])
            )
            return True

        # Several rectangles: pair the k-th largest row corner with the k-th
        # largest column corner. For interior corners the upward room is the
        # smaller of the two, and sorted pairing maximises a sum of such minima;
        # the pairs are disjoint by construction, so their rooms add.
        m = min(rows.size, cols.size)
        rows, cols = rows[:m], cols[:m]
        keep = s[rows, cols]
        rows, cols = rows[keep], cols[keep]
        if rows.size < 2:
            return False
        u, d = self._rooms(i, j, rows, cols)
        width = np.cumsum(u) + np.minimum(np.cumsum(d), a_t)
        hit = np.flatnonzero(width >= need)
        if hit.size == 0:
            return False
        n = int(hit[0]) + 1
        single = u[:n] + np.minimum(d[:n], a_t)
        rects = [
            (int(r), int(c), float(w1)) for r, c, w1 in zip(rows[:n], cols[:n], single, strict=True)
        ]
        self._commit(i, j, rects, float(width[n - 1]))
        return True

    def _batch_quick(self, cells: npt.NDArray[np.intp]) -> BoolArray:
        """:meth:`_quick` for many cells at once, on the primary suppression.

        Vectorised over the cells (in chunks, to bound memory); valid because
        nothing is suppressed meanwhile. Returns which cells it protected.
        """
        a, s = self.a, self.s
        n_rows, n_cols = self.n_rows, self.n_cols
        # Per column: suppressed rows by decreasing value first (stable, so ties
        # keep the static order), their count, and each row's rank in that list.
        sup = s[self.col_order, np.arange(n_cols)]
        by_col = np.take_along_axis(self.col_order, np.argsort(~sup, axis=0, kind="stable"), 0)
        count_c = sup.sum(axis=0)
        rank_c = np.empty_like(by_col)
        rank_c[by_col, np.arange(n_cols)] = np.arange(n_rows)[:, None]
        # Per row, the same for columns.
        sup = s[np.arange(n_rows)[:, None], self.row_order]
        by_row = np.take_along_axis(self.row_order, np.argsort(~sup, axis=1, kind="stable"), 1)
        count_r = sup.sum(axis=1)
        rank_r = np.empty_like(by_row)
        rank_r[np.arange(n_rows)[:, None], by_row] = np.arange(n_cols)

        done = np.zeros(len(cells), dtype=bool)
        m = min(n_rows, n_cols) - 1  # longest possible pairing
        chunk = max(1, 2_000_000 // max(m, _QUICK_K * _QUICK_K))
        for start in range(0, len(cells), chunk):
            ti = cells[start : start + chunk, 0][:, None]
            tj = cells[start : start + chunk, 1][:, None]
            a_t = a[ti, tj]
            need = self.req[ti, tj]
            # k-th candidate row/column with the target itself skipped.
            k = np.arange(m)[None, :]
            kr = k + (k >= rank_c[ti, tj])
            kc = k + (k >= rank_r[ti, tj])
            ok_r = k < count_c[tj] - 1
            ok_c = k < count_r[ti] - 1
            rows = by_col[np.minimum(kr, n_rows - 1), tj]
            cols = by_row[ti, np.minimum(kc, n_cols - 1)]

            # One rectangle among the K largest corners.
            kk = min(_QUICK_K, m)
            r3, c3 = rows[:, :kk, None], cols[:, None, :kk]
            u, d = self._rooms(ti[:, :, None], tj[:, :, None], r3, c3)
            valid = ok_r[:, :kk, None] & ok_c[:, None, :kk] & s[r3, c3]
            w = np.where(valid, u + np.minimum(d, a_t[:, :, None]), -np.inf).reshape(len(ti), -1)
            best = w.argmax(axis=1)
            best_w = w[np.arange(len(ti)), best]
            hit1 = best_w >= need[:, 0]
            br, bc = np.divmod(best[hit1], kk)
            h_r, h_c = rows[hit1, br], cols[hit1, bc]
            h_i, h_j = ti[hit1, 0], tj[hit1, 0]
            for ci, cj in ((h_i, h_j), (h_i, h_c), (h_r, h_j), (h_r, h_c)):
                np.maximum.at(self.known, (ci, cj), best_w[hit1])

            # Several disjoint rectangles by sorted pairing.
            valid = ok_r & ok_c & s[rows, cols]
            u, d = self._rooms(ti, tj, rows, cols)
            u = np.where(valid, u, 0.0)
            d = np.where(valid, d, 0.0)
            width = np.cumsum(u, axis=1) + np.minimum(np.cumsum(d, axis=1), a_t)
            reach = width >= need
            hit2 = reach.any(axis=1) & ~hit1
            last = reach.argmax(axis=1)
            used = valid & (k <= last[:, None]) & hit2[:, None]
            single = (u + np.minimum(d, a_t))[used]
            t_i, t_j = np.broadcast_to(ti, used.shape)[used], np.broadcast_to(tj, used.shape)[used]
            for ci, cj in ((t_i, cols[used]), (rows[used], t_j), (rows[used], cols[used])):
                np.maximum.at(self.known, (ci, cj), single)
            idx = np.flatnonzero(hit2)
            np.maximum.at(self.known, (ti[idx, 0], tj[idx, 0]), width[idx, last[idx]])
            done[start : start + chunk] = hit1 | hit2
        return done

    def protect(self, i: int, j: int) -> bool:
        """Make the guaranteed width of suppressed cell ``(i, j)`` reach ``required``.

        Returns False, suppressing nothing, when no set of rectangles suffices.
        """
        need = float(self.req[i, j])
        if self.known[i, j] >= need:
            return True
        if self._quick(i, j, need):
            return True
        a_t = float(self.a[i, j])
        u, d = self._grid_rooms(i, j)
        w = u + np.minimum(d, a_t)
        # A rectangle needs i' != i and j' != j.
        w[i, :] = -np.inf
        w[:, j] = -np.inf
        key = self.cost[:, j][:, None] + self.cost[i, :][None, :] + self.cost
        n_cols = self.n_cols

        # 1. Rectangles whose corners are all suppressed cost nothing: take them,
        #    largest first, keeping their other corners disjoint so rooms add.
        free_w = np.where(key == 0.0, w, -np.inf)
        k = int(np.argmax(free_w))
        if free_w.flat[k] >= need:
            ip, jp = divmod(k, n_cols)
            self._commit(i, j, [(ip, jp, float(free_w.flat[k]))], float(free_w.flat[k]))
            return True
        chosen: list[tuple[int, int, float]] = []
        up, down = 0.0, 0.0
        row_ok = np.ones(self.n_rows, dtype=bool)
        col_ok = np.ones(n_cols, dtype=bool)
        row_ok[i] = col_ok[j] = False
        if free_w.flat[k] > 0:
            flat = np.flatnonzero(free_w > 0)
            cap = 2 * (self.n_rows + n_cols)  # a matching has < R + C rectangles
            if flat.size > cap:
                flat = flat[np.argpartition(-free_w.flat[flat], cap)[:cap]]
            for kk in flat[np.argsort(-free_w.flat[flat], kind="stable")]:
                ip, jp = divmod(int(kk), n_cols)
                if not (row_ok[ip] and col_ok[jp]):
                    continue
                chosen.append((ip, jp, float(w[ip, jp])))
                up += float(u[ip, jp])
                down += float(d[ip, jp])
                row_ok[ip] = col_ok[jp] = False
                if up + min(a_t, down) >= need:
                    self._commit(i, j, chosen, up + min(a_t, down))
                    return True

        # 2. Add rectangles with new cells. The free ones taken above may block
        #    the only rows or columns that can complete the protection (e.g. the
        #    margins), so retry from scratch before giving up.
        state = (chosen, up, down, row_ok, col_ok)
        fresh_rows = np.ones(self.n_rows, dtype=bool)
        fresh_cols = np.ones(n_cols, dtype=bool)
        fresh_rows[i] = fresh_cols[j] = False
        for start in (state, ([], 0.0, 0.0, fresh_rows, fresh_cols)):
            done = self._complete(a_t, need, u, d, w, key, *start)
            if done is not None:
                self._commit(i, j, *done)
                return True
        return False  # nothing suffices: leave the table unchanged

    def _complete(
        self,
        a_t: float,
        need: float,
        u: FloatArray,
        d: FloatArray,
        w: FloatArray,
        key: FloatArray,
        chosen: list[tuple[int, int, float]],
        up: float,
        down: float,
        row_ok: BoolArray,
        col_ok: BoolArray,
    ) -> tuple[list[tuple[int, int, float]], float] | None:
        """Greedily add rectangles to ``chosen`` until the width reaches ``need``.

        Each step takes the cheapest rectangle that completes the protection,
        else the one adding most width (ties: the cheapest). Returns the
        rectangles and their combined width, or None when nothing suffices.
        """
        chosen, row_ok, col_ok = list(chosen), row_ok.copy(), col_ok.copy()
        while True:
            current = up + min(a_t, down)
            total = (up + u) + np.minimum(down + d, a_t)
            total[~row_ok, :] = -np.inf
            total[:, ~col_ok] = -np.inf
            ok = total >= need
            complete = bool(ok.any())
            if complete:
                k = int(np.argmin(np.where(ok, key, np.inf)))
            else:
                best = float(total.max())
                if not best > current:
                    return None
                k = int(np.argmin(np.where(total == best, key, np.inf)))
            ip, jp = divmod(k, self.n_cols)
            chosen.append((ip, jp, float(w[ip, jp])))
            up += float(u[ip, jp])
            down += float(d[ip, jp])
            row_ok[ip] = col_ok[jp] = False
            if complete:
                return chosen, up + min(a_t, down)

    def run(self, primary: BoolArray) -> BoolArray:
        """Protect every primary cell and every cell suppressed on the way."""
        cells = np.argwhere(primary)
        if len(cells):
            cells = cells[~self._batch_quick(cells)]
        self.queue.extend((int(r), int(c)) for r, c in cells)
        failed: set[tuple[int, int]] = set()
        while True:
            while self.queue:
                r, c = self.queue.popleft()
                if not self.protect(r, c):
                    failed.add((r, c))
            # Cells suppressed later may have widened a failed cell's interval.
            fixed = {cell for cell in failed if self.protect(*cell)}
            failed -= fixed
            if not self.queue:
                break
        unprotected = np.zeros_like(self.s)
        for r, c in failed:
            unprotected[r, c] = True
        return unprotected


def secondary_suppression(
    values: np.ndarray,
    primary: np.ndarray,
    required: np.ndarray | float,
    *,
    margins: bool,
) -> SuppressionResult:
    """Choose further cells so that no suppressed cell can be recomputed too closely.

    After suppression every suppressed cell (primary and secondary) has a
    feasible interval of width at least ``required`` given the published cells,
    the table's additivity and non-negativity, unless it is reported in
    ``unprotected``. The guarantee comes from rectangle perturbations (see the
    module docstring) and never calls an LP solver; :func:`protection_intervals`
    audits it exactly.

    Args:
        values: the table, shape ``(R+1, C+1)`` with margins (last row and
            column are totals) or ``(R, C)`` without; non-negative and, with
            margins, additive.
        primary: bool mask of the cells that fail a primary rule.
        required: interval width each suppressed cell must have, a scalar or a
            per-cell array broadcastable to ``values``; for a zero cell this is
            the upper bound it must reach.
        margins: whether ``values`` carries the margin row and column.

    Returns:
        The secondary mask (disjoint from ``primary``) and the unprotected mask.

    Raises:
        ValueError: on a malformed, negative, non-finite or non-additive table,
            a non-boolean or mis-shaped mask, or a negative ``required``.
    """
    a = _as_table(values, margins=margins)
    p = _as_mask(primary, a.shape, "primary")
    req = _as_required(required, a.shape)
    _check_values(a, np.ones(a.shape, dtype=bool))
    if not margins:
        # No published relation: every suppressed cell ranges over [0, +inf).
        return SuppressionResult(np.zeros(a.shape, dtype=bool), np.zeros(a.shape, dtype=bool))
    _check_additive(a)
    protector = _Protector(a, p.copy(), req)
    unprotected = protector.run(p)
    return SuppressionResult(secondary=protector.s & ~p, unprotected=unprotected)


# ---------------------------------------------------------------------------
# LP audit


def protection_intervals(values: np.ndarray, suppressed: np.ndarray, *, margins: bool) -> Intervals:
    """Exact feasible interval of every suppressed cell, by linear programming.

    The variables are the suppressed cells (interior or margin); the
    constraints are the additivity equations of every row and column of the
    augmented table (with the published values moved to the right-hand side)
    and non-negativity. Each suppressed cell is minimised and maximised
    (``scipy.optimize.linprog``, ``method="highs"``): two LPs per cell, meant
    for audits of small and medium tables. The values of suppressed cells are
    not used.

    Args:
        values: the table, as for :func:`secondary_suppression`.
        suppressed: bool mask of all suppressed cells.
        margins: whether ``values`` carries the margin row and column; without
            margins every suppressed cell's interval is ``[0, +inf)``.

    Returns:
        Lower and upper bounds (NaN for published cells, ``+inf`` upper bound
        when unbounded).

    Raises:
        ValueError: on malformed input or when the published cells are
            inconsistent with additivity and non-negativity (the LP is
            infeasible).
        RuntimeError: when the solver fails for another reason.
    """
    # scipy loads lazily: the audit is the only user and `import phds_tre.sdc` must stay fast.
    from scipy import optimize, sparse

    a = _as_table(values, margins=margins)
    s = _as_mask(suppressed, a.shape, "suppressed")
    _check_values(a, ~s)
    lower = np.full(a.shape, np.nan)
    upper = np.full(a.shape, np.nan)
    if not margins:
        lower[s] = 0.0
        upper[s] = np.inf
        return Intervals(lower, upper)
    n_vars = int(s.sum())
    if n_vars == 0:
        return Intervals(lower, upper)

    n_rows, n_cols = a.shape
    sr, sc = _signs(n_rows), _signs(n_cols)
    # Signed table: every row and column of `b` sums to zero (see module docstring).
    coef = np.outer(sr, sc)
    b = np.where(s, 0.0, a * coef)
    rhs = -np.concatenate([b.sum(axis=1), b.sum(axis=0)])
    scale = np.concatenate([np.abs(b).sum(axis=1), np.abs(b).sum(axis=0)])

    cell_r, cell_c = np.nonzero(s)
    var = np.arange(n_vars)
    # Row equation r: sum_j coef[r, j] x[r, j] = 0; column equation c likewise.
    eq = np.concatenate([cell_r, n_rows + cell_c])
    col = np.concatenate([var, var])
    data = np.tile(coef[cell_r, cell_c], 2)
    a_eq = sparse.csr_array((data, (eq, col)), shape=(n_rows + n_cols, n_vars))

    used = np.zeros(n_rows + n_cols, dtype=bool)
    used[eq] = True
    # An equation with only published cells is a plain consistency check.
    bad = np.flatnonzero(~used & (np.abs(rhs) > 1e-9 * scale + 1e-12))
    if bad.size:
        k = int(bad[0])
        label = f"row {k}" if k < n_rows else f"column {k - n_rows}"
        raise ValueError(f"published cells are not additive: {label} is off by {abs(rhs[k]):g}")
    a_eq = a_eq[used]
    b_eq = rhs[used]

    def solve(c: FloatArray) -> optimize.OptimizeResult:
        return optimize.linprog(c, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")

    feasible = solve(np.zeros(n_vars))
    if feasible.status == 2:
        raise ValueError(
            "published cells are inconsistent: no non-negative additive table "
            "matches them (infeasible LP)"
        )
    if feasible.status != 0:
        raise RuntimeError(f"LP feasibility check failed: {feasible.message}")

    lo = np.empty(n_vars)
    hi = np.empty(n_vars)
    c = np.zeros(n_vars)
    for k in range(n_vars):
        c[k] = 1.0
        res = solve(c)
        if res.status != 0:
            raise RuntimeError(f"LP minimising cell {k} failed: {res.message}")
        lo[k] = max(0.0, float(res.fun))
        c[k] = -1.0
        res = solve(c)
        if res.status == 3:
            hi[k] = np.inf
        elif res.status == 0:
            hi[k] = -float(res.fun)
        else:
            raise RuntimeError(f"LP maximising cell {k} failed: {res.message}")
        c[k] = 0.0
    lower[s] = lo
    upper[s] = np.maximum(hi, lo)
    return Intervals(lower, upper)
