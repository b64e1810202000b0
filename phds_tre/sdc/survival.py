"""Checked Kaplan–Meier survival tables: ``sdc.survival``.

The estimator is statsmodels' :class:`~statsmodels.duration.survfunc.SurvfuncRight`
(Greenwood standard errors); this module only reads it off at a grid of
published times and decides which rows may be released.

Each row of ``.table`` (indexed by ``(group, time)``, or ``time`` without
groups) reports at a published time ``t``:

* ``at_risk`` — children still under follow-up *after* ``t`` (duration > t),
  i.e. the risk set of the next interval;
* ``events`` / ``censored`` — events / censorings in ``(t_prev, t]``, where
  ``t_prev`` is the previous *published* row's time (the first row counts
  everything up to and including its time);
* ``survival``, ``ci_lower``, ``ci_upper`` — the Kaplan–Meier estimate at ``t``
  and its pointwise 95% interval on the log(−log) scale.

With these conventions ``at_risk(t_prev) − events − censored = at_risk(t)``
holds exactly between published rows, so no count can be recovered by
differencing two published rows (the convention "at risk at t = duration ≥ t"
would leak the number of children whose duration is exactly a grid time).

Rules, walking each group's rows in time order (docs/rules.md):

========= ============================================================ ==================
rule      a row is suppressed when                                     boundary
========= ============================================================ ==================
threshold ``at_risk < min_count`` — and so is every later row of the   equality passes
          group (the curve is truncated; 0 at risk also fails)
threshold events since the last published row are ``0 < e < min_count`` 0 and min_count pass
threshold censorings since the last published row likewise (at_risk    0 and min_count pass
          and events would otherwise give them by subtraction)
========= ============================================================ ==================

A suppressed row does not reset the count: its events are carried to the next
row, because the survival drop between two published rows reveals all the
events between them. Suppressed rows are NaN throughout. As for tables, an
output with suppressed rows gets the site's ``suppressed_verdict`` (review by
default); nothing that fails a rule is ever published, so it never fails.

There is deliberately no ``dof`` rule: degrees of freedom mean nothing for a
Kaplan–Meier estimate (ACRO 1.0.2 reported ``dof = 0`` for every KM output,
which checks nothing); the risk-set and event rules above are the real checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from phds_tre.sdc.jsonio import array_from_json, array_to_json, label_from_json, label_to_json
from phds_tre.sdc.output import CHECK_COLUMNS, EvidenceError, SDCOutput, register_kind
from phds_tre.sdc.policy import Policy, resolve_policy
from phds_tre.sdc.rounding import round_counts

__all__ = ["TABLE_COLUMNS", "SurvivalEvidence", "SurvivalOutput", "default_times", "survival"]

PolicyArg = Policy | str | Path | None

#: Columns of a survival table, in order.
TABLE_COLUMNS = ("at_risk", "events", "censored", "survival", "ci_lower", "ci_upper")
ALPHA = 0.05
_NICE = (1, 2, 2.5, 5)
_TOL = 1e-8


# ---------------------------------------------------------------------------
# the time grid
# ---------------------------------------------------------------------------
def default_times(max_duration: float, points: int = 8) -> list[float]:
    """A grid of about ``points`` round times from 0 past ``max_duration``.

    The step is 1, 2, 2.5 or 5 × 10^k, whichever gives the number of grid
    points closest to ``points`` (ties: the coarser step), and the grid ends
    at the first multiple of the step *strictly above* the largest duration.
    So every grid time is a multiple of a round step, none is derived from a
    single child's value except through that rounding, and the grid only
    tells that the longest follow-up lies within the last step.
    """
    if points < 3:
        raise ValueError("a time grid needs at least 3 points")
    if not math.isfinite(max_duration) or max_duration < 0:
        raise ValueError("the largest duration must be a finite non-negative number")
    if max_duration == 0:
        return [0.0, 1.0]
    top = Decimal(repr(max_duration))
    magnitude = math.floor(math.log10(max_duration))
    best: tuple[int, Decimal, int] | None = None  # (distance, -step, intervals)
    for exponent in range(magnitude - 3, magnitude + 2):
        for nice in _NICE:
            step = Decimal(str(nice)).scaleb(exponent)
            intervals = math.floor(top / step) + 1  # last point strictly above the maximum
            key = (abs(intervals + 1 - points), -step, intervals)
            if best is None or key < best:
                best = key
    assert best is not None
    step, intervals = -best[1], best[2]
    return [float(step * i) for i in range(intervals + 1)]


# ---------------------------------------------------------------------------
# evidence
# ---------------------------------------------------------------------------
@dataclass
class GroupCurve:
    """One group's counts per grid interval and its Kaplan–Meier values at the grid times."""

    label: object
    n: int
    at_risk: np.ndarray  # (K,) duration > t_k
    events: np.ndarray  # (K,) events in (t_{k-1}, t_k]
    censored: np.ndarray  # (K,) censorings in (t_{k-1}, t_k]
    survival: np.ndarray  # (K,) S(t_k)
    se: np.ndarray  # (K,) Greenwood standard error of S(t_k); NaN where undefined
    ci_lower: np.ndarray
    ci_upper: np.ndarray


@dataclass
class SurvivalEvidence:
    """Everything the rules need to check a survival table and rebuild its releasable form."""

    times: np.ndarray  # (K,) grid, strictly increasing
    grouped: bool
    group_name: str | None
    curves: list[GroupCurve]
    times_given: bool = False

    @property
    def call(self) -> str:
        """The safe-API function that made this output."""
        return "survival"

    def to_json(self) -> dict[str, Any]:
        """Evidence as strict JSON (NaN → null)."""
        return {
            "times": array_to_json(self.times),
            "times_given": self.times_given,
            "grouped": self.grouped,
            "group_name": self.group_name,
            "alpha": ALPHA,
            "groups": [
                {
                    "label": label_to_json(c.label),
                    "n": c.n,
                    **{f: array_to_json(getattr(c, f)) for f in _CURVE_ARRAYS},
                }
                for c in self.curves
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> SurvivalEvidence:
        """Parse and validate evidence; :class:`EvidenceError` when malformed or inconsistent."""
        if not isinstance(data, dict):
            raise EvidenceError("survival evidence is not a JSON object")
        try:
            if data.get("alpha", ALPHA) != ALPHA:
                raise EvidenceError(f"confidence level must be {1 - ALPHA:.0%}")
            group_name = data["group_name"]
            if group_name is not None and not isinstance(group_name, str):
                raise EvidenceError("group_name must be a string or null")
            grouped = data["grouped"]
            if not isinstance(grouped, bool):
                raise EvidenceError("grouped must be true or false")
            curves = []
            for g in data["groups"]:
                n = g["n"]
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise EvidenceError("a group's n must be a non-negative integer")
                arrays = {f: array_from_json(g[f]) for f in _CURVE_ARRAYS}
                curves.append(GroupCurve(label=label_from_json(g["label"]), n=n, **arrays))
            ev = cls(
                times=array_from_json(data["times"]),
                grouped=grouped,
                group_name=group_name,
                curves=curves,
                times_given=bool(data.get("times_given", False)),
            )
        except (KeyError, TypeError) as exc:
            raise EvidenceError(
                f"survival evidence is incomplete: missing or malformed {exc}"
            ) from None
        ev.validate()
        return ev

    def validate(self) -> None:
        """Internal consistency: catches forged or edited counts and survival values.

        The counts must partition each group (``at_risk`` is ``n`` minus every
        event and censoring so far), and every survival drop must be possible
        for the events and risk sets claimed: over an interval with ``e``
        events, a risk set of at most ``R`` before it and ``A`` after it, the
        Kaplan–Meier factor lies in ``[A / (A + e), exp(−e / R)]``; with no
        events it is exactly 1. The intervals must follow from the survival
        and its standard error.
        """
        t = self.times
        if t.ndim != 1 or len(t) == 0:
            raise EvidenceError("the time grid is empty or not a list")
        if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(np.diff(t) <= 0):
            raise EvidenceError("times must be finite, non-negative and strictly increasing")
        if not self.curves:
            raise EvidenceError("no survival curve")
        if not self.grouped and len(self.curves) != 1:
            raise EvidenceError("an ungrouped survival table has exactly one curve")
        labels = [label_to_json(c.label) for c in self.curves]
        if len({repr(x) for x in labels}) != len(labels):
            raise EvidenceError("group labels are not unique")
        k = len(t)
        z = _z()
        for c in self.curves:
            name = f"group {c.label!r}" if self.grouped else "curve"
            for f in _CURVE_ARRAYS:
                if getattr(c, f).shape != (k,):
                    raise EvidenceError(f"{name}: {f} has the wrong length")
            for f in ("at_risk", "events", "censored"):
                arr = getattr(c, f)
                if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
                    raise EvidenceError(f"{name}: {f} must be non-negative integers")
            if np.any(c.at_risk != c.n - np.cumsum(c.events + c.censored)):
                raise EvidenceError(
                    f"{name}: at_risk is not n minus the events and censorings so far"
                )
            s = c.survival
            if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(s > 1 + _TOL):
                raise EvidenceError(f"{name}: survival must lie in [0, 1]")
            s_prev, r_prev = 1.0, float(c.n)
            for i in range(k):
                e, a = float(c.events[i]), float(c.at_risk[i])
                if s_prev <= 0:
                    ok = s[i] <= _TOL
                else:
                    ratio = s[i] / s_prev
                    if e == 0:
                        ok = abs(ratio - 1) <= _TOL
                    else:
                        lower = a / (a + e)
                        upper = math.exp(-e / r_prev) if r_prev > 0 else 0.0
                        ok = lower - _TOL <= ratio <= upper + _TOL
                if not ok:
                    raise EvidenceError(
                        f"{name}: the survival at a time does not fit the events and risk sets"
                    )
                s_prev, r_prev = float(s[i]), a
            se = c.se
            if np.any(se < 0):
                raise EvidenceError(f"{name}: a standard error is negative")
            lo, hi = _loglog_ci(s, se, z)
            for got, want, what in ((c.ci_lower, lo, "ci_lower"), (c.ci_upper, hi, "ci_upper")):
                if np.any(np.isfinite(got) != np.isfinite(want)) or np.any(
                    np.abs(np.nan_to_num(got) - np.nan_to_num(want)) > 1e-6
                ):
                    raise EvidenceError(
                        f"{name}: {what} does not follow from the survival and its standard error"
                    )


_CURVE_ARRAYS = ("at_risk", "events", "censored", "survival", "se", "ci_lower", "ci_upper")


def _loglog_ci(s: np.ndarray, se: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise interval on the log(−log S) scale (R's ``conf.type="log-log"``), within [0, 1]."""
    lo = np.full(s.shape, np.nan)
    hi = np.full(s.shape, np.nan)
    one = s >= 1
    lo[one] = hi[one] = 1.0  # before the first event: no uncertainty
    mid = (s > 0) & (s < 1) & np.isfinite(se)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.log(s[mid])
        theta = np.log(-log_s)
        se_theta = se[mid] / (s[mid] * np.abs(log_s))
        lo[mid] = np.exp(-np.exp(theta + z * se_theta))
        hi[mid] = np.exp(-np.exp(theta - z * se_theta))
    return lo, hi


# ---------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------
@dataclass
class SurvivalEvaluation:
    """A policy applied to survival evidence."""

    checks: pd.DataFrame
    published: list[np.ndarray]  # per group, (K, 6) releasable values (NaN = suppressed)
    suppressed: list[np.ndarray]  # per group, (K,) bool
    status: str
    reasons: list[str]


def _row_labels(ev: SurvivalEvidence, curve: GroupCurve) -> list[object]:
    times = [float(x) for x in ev.times]
    return [(curve.label, t) for t in times] if ev.grouped else list(times)


def evaluate(ev: SurvivalEvidence, policy: Policy) -> SurvivalEvaluation:
    """Apply ``policy`` to survival evidence: walk each group's grid, suppress, give the verdict."""
    m = policy.min_count
    rows: list[tuple[object, str, str, str, str]] = []
    published: list[np.ndarray] = []
    suppressed: list[np.ndarray] = []
    n_risk = n_events = n_censored = 0
    for curve in ev.curves:
        labels = _row_labels(ev, curve)
        k = len(ev.times)
        out = np.full((k, len(TABLE_COLUMNS)), np.nan)
        hidden = np.ones(k, dtype=bool)
        truncated = False
        pending_e = pending_c = 0
        for i in range(k):
            label = labels[i]
            e, c, a = int(curve.events[i]), int(curve.censored[i]), int(curve.at_risk[i])
            pending_e += e
            pending_c += c
            if truncated or a < m:
                truncated = True
                n_risk += 1
                rows.append(
                    (
                        label,
                        "at_risk",
                        "threshold",
                        "fail",
                        f"fewer than {m} children at risk at or before this time "
                        "(the curve is truncated)",
                    )
                )
                continue
            rows.append((label, "at_risk", "threshold", "pass", f"at least {m} children at risk"))
            # Between published rows the survival drop reveals every event behind it, and
            # at_risk minus events gives the censorings: both must be 0 or >= min_count.
            ok_e = pending_e == 0 or pending_e >= m
            ok_c = pending_c == 0 or pending_c >= m
            rows.append(
                (
                    label,
                    "events",
                    "threshold",
                    "pass" if ok_e else "fail",
                    f"no events, or at least {m}, since the last published time"
                    if ok_e
                    else f"fewer than {m} events since the last published time (minimum count)",
                )
            )
            rows.append(
                (
                    label,
                    "censored",
                    "threshold",
                    "pass" if ok_c else "fail",
                    f"no censorings, or at least {m}, since the last published time"
                    if ok_c
                    else f"fewer than {m} censorings since the last published time (minimum count)",
                )
            )
            if not ok_e:
                n_events += 1
            if not ok_c:
                n_censored += 1
            if not (ok_e and ok_c):
                continue
            hidden[i] = False
            out[i] = (
                a,
                pending_e,
                pending_c,
                curve.survival[i],
                curve.ci_lower[i],
                curve.ci_upper[i],
            )
            pending_e = pending_c = 0
        if policy.rounding != "none":
            out[:, :3] = round_counts(out[:, :3], policy.rounding)
        published.append(out)
        suppressed.append(hidden)
    checks = (
        pd.DataFrame(rows, columns=CHECK_COLUMNS)
        if rows
        else pd.DataFrame({c: pd.Series(dtype=object) for c in CHECK_COLUMNS})
    )
    reasons: list[str] = []
    if n_risk:
        reasons.append(
            f"{n_risk} row(s) suppressed: fewer than {m} children at risk (the curve is truncated)"
        )
    if n_events:
        reasons.append(
            f"{n_events} row(s) suppressed: fewer than {m} events since the last published time"
        )
    if n_censored:
        reasons.append(
            f"{n_censored} row(s) suppressed: fewer than {m} censorings "
            "since the last published time"
        )
    if policy.rounding != "none":
        reasons.append(f"counts rounded ({policy.rounding})")
    any_suppressed = any(bool(h.any()) for h in suppressed)
    if any_suppressed:
        status = policy.suppressed_verdict
        if status == "review":
            reasons.append(
                "suppression was applied: the site's policy has a reviewer "
                "confirm suppressed tables"
            )
    else:
        status = "pass"
    if not reasons:
        reasons.append("every row passed every rule")
    return SurvivalEvaluation(checks, published, suppressed, status, reasons)


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
class SurvivalOutput(SDCOutput["SurvivalEvaluation"]):
    """A checked Kaplan–Meier table: risk sets, events, censorings, survival at published times."""

    kind = "survival"

    def __init__(self, evidence: SurvivalEvidence, policy: Policy) -> None:
        super().__init__(policy, evidence.call)
        self._evidence = evidence
        self._eval = evaluate(evidence, policy)
        self._table = self._shape(masks=False)

    @property
    def table(self) -> pd.DataFrame:
        """The releasable survival table; suppressed rows are NaN."""
        return self._table

    @property
    def suppressed(self) -> pd.Series:
        """Boolean per row of :attr:`table`: whether the row was suppressed."""
        data = np.concatenate(self._eval.suppressed) if self._eval.suppressed else np.zeros(0, bool)
        return pd.Series(data, index=self._table.index, name="suppressed")

    def evidence(self) -> dict[str, Any]:
        """The private counts and estimates behind the rules (never released)."""
        return self._evidence.to_json()

    def _shape(self, masks: bool) -> pd.DataFrame:
        ev = self._evidence
        labels: list[object] = []
        for curve in ev.curves:
            labels.extend(_row_labels(ev, curve))
        values = (
            np.vstack(self._eval.published)
            if self._eval.published
            else np.zeros((0, len(TABLE_COLUMNS)))
        )
        if ev.grouped:
            index: pd.Index = pd.MultiIndex.from_tuples(
                labels,
                names=[ev.group_name or "group", "time"],
            )
        else:
            index = pd.Index(labels, name="time", dtype=np.float64)
        return pd.DataFrame(values, index=index, columns=pd.Index(TABLE_COLUMNS))


def _from_payload(payload: dict[str, Any], policy: Policy) -> SDCOutput[Any]:
    evidence = payload.get("evidence")
    if not isinstance(evidence, dict):
        raise EvidenceError("the structured output carries no evidence to re-check")
    return SurvivalOutput(SurvivalEvidence.from_json(evidence), policy)


register_kind(SurvivalOutput.kind, _from_payload)


# ---------------------------------------------------------------------------
# the safe API
# ---------------------------------------------------------------------------
def survival(
    durations: Any,
    events: Any,
    groups: Any = None,
    times: Any = None,
    policy: PolicyArg = None,
) -> SurvivalOutput:
    """A checked Kaplan–Meier table of right-censored ``durations``.

    ``events`` is 1 (or True) for an event and 0 for censoring; ``groups``
    optionally splits the children into curves (one label per child).
    ``times`` are the published times; by default :func:`default_times` of
    the largest duration (one grid for every group, so no group's own maximum
    shows). Rows with a missing duration, event or group are left out.
    """
    pol = resolve_policy(policy)
    dur = pd.Series(durations).reset_index(drop=True)
    evt = pd.Series(events).reset_index(drop=True)
    if len(dur) != len(evt):
        raise ValueError(
            f"durations and events must have the same length ({len(dur)} vs {len(evt)})"
        )
    if not pd.api.types.is_numeric_dtype(dur.dtype) or pd.api.types.is_bool_dtype(dur.dtype):
        raise TypeError(f"durations must be numeric, not {dur.dtype}")
    keep = dur.notna() & evt.notna()
    grp: pd.Series | None = None
    group_name: str | None = None
    if groups is not None:
        grp = pd.Series(groups).reset_index(drop=True)
        if len(grp) != len(dur):
            raise ValueError(
                f"groups must have one label per duration ({len(dur)}), got {len(grp)}"
            )
        name = getattr(groups, "name", None)
        group_name = name if isinstance(name, str) else "group"
        keep &= grp.notna()
    t_obs = dur[keep].to_numpy(dtype=np.float64)
    e_raw = evt[keep].to_numpy()
    try:
        e_obs = e_raw.astype(np.float64)
    except (TypeError, ValueError):
        raise TypeError("events must be 0/1 or True/False") from None
    if not np.all((e_obs == 0) | (e_obs == 1)):
        raise ValueError("events must be 0/1 or True/False (1 = event, 0 = censored)")
    if not np.all(np.isfinite(t_obs)) or np.any(t_obs < 0):
        raise ValueError("durations must be finite and non-negative")
    if len(t_obs) == 0:
        raise ValueError("no rows with a duration and an event indicator")
    if times is None:
        grid = np.asarray(default_times(float(t_obs.max())), dtype=np.float64)
    else:
        grid = np.unique(np.asarray(times, dtype=np.float64))
        if len(grid) == 0 or not np.all(np.isfinite(grid)) or np.any(grid < 0):
            raise ValueError("times must be finite, non-negative numbers (at least one)")
    z = _z()
    curves: list[GroupCurve] = []
    if grp is None:
        curves.append(_curve(None, t_obs, e_obs, grid, z))
    else:
        g_obs = grp[keep].reset_index(drop=True)
        try:
            codes, uniques = pd.factorize(g_obs, sort=True)
        except TypeError:  # labels of mixed types cannot be sorted: keep first-seen order
            codes, uniques = pd.factorize(g_obs, sort=False)
        for gi, label in enumerate(uniques):
            sel = codes == gi
            curves.append(
                _curve(label_from_json(label_to_json(label)), t_obs[sel], e_obs[sel], grid, z)
            )
    evidence = SurvivalEvidence(
        times=grid,
        grouped=grp is not None,
        group_name=group_name,
        curves=curves,
        times_given=times is not None,
    )
    evidence.validate()  # a numerical disagreement should show here, not only at the site
    return SurvivalOutput(evidence, pol)


def _z() -> float:
    """Two-sided normal quantile for the confidence level (stdlib: no scipy import needed)."""
    return NormalDist().inv_cdf(1 - ALPHA / 2)


def _curve(label: object, t: np.ndarray, e: np.ndarray, grid: np.ndarray, z: float) -> GroupCurve:
    n = len(t)
    # Interval of each child: the first grid time at or after its duration (k=0 takes t <= t_0).
    slot = np.searchsorted(grid, t, side="left")
    inside = slot < len(grid)
    k = len(grid)
    events = np.bincount(slot[inside], weights=e[inside], minlength=k)[:k]
    censored = np.bincount(slot[inside], weights=1 - e[inside], minlength=k)[:k]
    at_risk = (n - np.searchsorted(np.sort(t), grid, side="right")).astype(np.float64)
    # statsmodels loads lazily: `import phds_tre.sdc` must stay fast.
    from statsmodels.duration.survfunc import SurvfuncRight

    sf = SurvfuncRight(t, e.astype(np.int64))
    surv = np.ones(k)
    se = np.zeros(k)
    if len(sf.surv_times):
        # S(t) is the estimate at the last event time <= t (a right-continuous step function).
        pos = np.searchsorted(sf.surv_times, grid, side="right") - 1
        has = pos >= 0
        surv[has] = np.asarray(sf.surv_prob, dtype=np.float64)[pos[has]]
        se[has] = np.asarray(sf.surv_prob_se, dtype=np.float64)[pos[has]]
    lo, hi = _loglog_ci(surv, se, z)
    return GroupCurve(label, n, at_risk, events, censored, surv, se, lo, hi)
