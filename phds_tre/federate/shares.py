"""Site shares of a federated regression: their disclosure checks, and loading released ones.

A share (:class:`~phds_tre.federate.linear.LinearStats`,
:class:`~phds_tre.federate.glm.GLMRound`) is an SDC output like any other:
its evidence stays at the site and the site's checker re-runs the rules on
it with the site policy. The rules (thresholds from the site's
:class:`~phds_tre.sdc.policy.Policy`; see docs/federate.md):

========= ============================================================ ===================
rule      fails when                                                   boundary
========= ============================================================ ===================
threshold fewer than ``min_count`` rows                                equality passes
dof       rows minus the rank of the site's design ``< min_dof``        equality passes
threshold a categorical column with ``0 < rows < min_count`` behind     equality passes
          its non-zero values, or behind its zeros
threshold binary outcome: fewer than ``min_count`` events or non-events equality passes
          (0 included), overall and on each side of every categorical
          column
========= ============================================================ ===================

A categorical column with NO row on one side (a level absent at this site)
passes: it contributes nothing, and the coordinator fixed the level, not the
site's data. Reasons are templated sentences naming design columns and the
policy's thresholds, never a count from the data.

The coordinator side reads shares in any of three forms (the objects, the
released payload dicts, or a mapping site -> either) through
:func:`collect`, and :func:`load_shares` reads them from what
``phds results STUDY --out DIR`` wrote.
"""

from __future__ import annotations

import json
import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from phds_tre.federate.design import Design
from phds_tre.sdc.jsonio import array_from_json, array_to_json
from phds_tre.sdc.output import CHECK_COLUMNS, EvidenceError, SDCOutput
from phds_tre.sdc.policy import Policy
from phds_tre.sdc.rules import worst

__all__ = [
    "WITHHELD_SCHEMA",
    "Collected",
    "ShareCounts",
    "ShareError",
    "collect",
    "load_shares",
]

#: What :func:`load_shares` returns for a site whose release does not hold the share.
WITHHELD_SCHEMA = "phds.federate.withheld"
# Counts read back from a released matrix agree with the evidence to this tolerance.
_COUNT_RTOL = 1e-6


class ShareError(ValueError):
    """Shares that cannot be combined, or a results folder that cannot be read."""


# ---------------------------------------------------------------------------
# evidence: the counts every share is checked on
# ---------------------------------------------------------------------------
@dataclass
class ShareCounts:
    """The counts behind one site's share: what the rules read.

    ``support`` maps each categorical design column to its rows with a
    non-zero value; for a binary outcome ``events`` is the number of 1s and
    ``support_events`` the events among each column's non-zero rows.
    """

    n: int
    rank: int
    support: dict[str, int]
    binary: bool
    events: int | None
    support_events: dict[str, int]

    @classmethod
    def of(cls, y: np.ndarray, X: np.ndarray, columns: list[str], binary: bool) -> ShareCounts:
        """The counts of one site's design (``binary``: the outcome is checked as 0/1)."""
        n = int(X.shape[0])
        rank = int(np.linalg.matrix_rank(X)) if X.size else 0
        # Both formula engines name level columns "term[level]" (also inside interactions).
        support = {c: int(np.count_nonzero(X[:, j])) for j, c in enumerate(columns) if "[" in c}
        events: int | None = None
        support_events: dict[str, int] = {}
        if binary:
            events = int(y.sum())
            for j, c in enumerate(columns):
                if c in support:
                    support_events[c] = int(y[X[:, j] != 0].sum())
        return cls(n, rank, support, binary, events, support_events)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "n": self.n,
            "rank": self.rank,
            "support": dict(self.support),
            "binary": self.binary,
            "events": self.events,
            "support_events": dict(self.support_events),
        }

    @classmethod
    def from_json(cls, data: Any, columns: list[str]) -> ShareCounts:
        """Parse and validate; :class:`EvidenceError` when malformed or inconsistent."""
        if not isinstance(data, dict):
            raise EvidenceError("share counts are not a JSON object")
        n, rank = _count(data.get("n"), "n"), _count(data.get("rank"), "rank")
        binary = data.get("binary")
        if not isinstance(binary, bool):
            raise EvidenceError("binary must be true or false")
        support = _counts(data.get("support"), "support")
        support_events = _counts(data.get("support_events"), "support_events")
        events = None if data.get("events") is None else _count(data.get("events"), "events")
        if rank > min(n, len(columns)):
            raise EvidenceError("the rank exceeds the number of rows or of columns")
        expected = {c for c in columns if "[" in c}
        if set(support) != expected:
            raise EvidenceError("every categorical column, and only those, needs its row count")
        if any(v > n for v in support.values()):
            raise EvidenceError("a column's row count exceeds n")
        if binary:
            if events is None or events > n:
                raise EvidenceError("a binary outcome needs events between 0 and n")
            if set(support_events) != expected:
                raise EvidenceError(
                    "a binary outcome needs the events behind every categorical column"
                )
            for c, e in support_events.items():
                if e > support[c] or e > events:
                    raise EvidenceError(f"events behind {c!r} exceed its rows or all events")
        elif events is not None or support_events:
            raise EvidenceError("events are given for an outcome that is not binary")
        return cls(n, rank, support, binary, events, support_events)


def _count(x: Any, what: str) -> int:
    if (
        isinstance(x, bool)
        or not isinstance(x, (int, float))
        or not math.isfinite(x)
        or x != int(x)
        or x < 0
    ):
        raise EvidenceError(f"{what} must be a non-negative integer")
    return int(x)


def _counts(data: Any, what: str) -> dict[str, int]:
    if not isinstance(data, dict):
        raise EvidenceError(f"{what} must be a JSON object")
    return {str(k): _count(v, f"{what} of {k!r}") for k, v in data.items()}


def check_counts_against_gram(
    counts: ShareCounts, gram: np.ndarray, columns: list[str], outcome_index: int | None
) -> None:
    """Tie the counts the rules read to the released cross-products (OLS shares).

    With an intercept, ``XᵀX`` holds n and the rows of every 0/1 level column;
    with a 0/1 outcome, ``Xᵀy`` holds the events. A kernel cannot then check
    one set of counts and release a matrix built from other data.
    """

    def agree(value: float, count: int, what: str) -> None:
        if abs(value - count) > _COUNT_RTOL * max(1.0, count):
            raise EvidenceError(f"{what} does not agree with the released cross-products")

    if "Intercept" not in columns:
        return
    i = columns.index("Intercept")
    agree(gram[i, i], counts.n, "n")
    for c, rows in counts.support.items():
        j = columns.index(c)
        if ":" not in c:  # a main-effect level column is 0/1: its sum and its sum of squares
            agree(gram[i, j], rows, f"the row count of {c!r}")
            agree(gram[j, j], rows, f"the row count of {c!r}")
            if counts.binary and outcome_index is not None:
                agree(gram[j, outcome_index], counts.support_events[c], f"the events behind {c!r}")
    if counts.binary and outcome_index is not None and counts.events is not None:
        agree(gram[i, outcome_index], counts.events, "the events")
        agree(gram[outcome_index, outcome_index], counts.events, "the events")


# ---------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------
@dataclass
class ShareEvaluation:
    """A policy applied to a share's counts."""

    checks: pd.DataFrame
    status: str
    reasons: list[str]


def evaluate_counts(counts: ShareCounts, policy: Policy) -> ShareEvaluation:
    """Every rule on one share's counts; ``reasons`` are short templated sentences."""
    m, rows = policy.min_count, []
    short: list[str] = []

    def add(row: str, column: str, rule: str, ok: bool, passed: str, failed: str) -> None:
        rows.append((row, column, rule, "pass" if ok else "fail", passed if ok else failed))
        if not ok and failed not in short:
            short.append(failed)

    add("share", "rows", "threshold", counts.n >= m, f"at least {m} rows", f"fewer than {m} rows")
    df_resid = counts.n - counts.rank
    add(
        "share",
        "df_resid",
        "dof",
        df_resid >= policy.min_dof,
        f"at least {policy.min_dof} residual degrees of freedom",
        f"residual degrees of freedom below {policy.min_dof}",
    )
    if counts.binary and counts.events is not None:
        for label, value in (("events", counts.events), ("non-events", counts.n - counts.events)):
            add(
                "outcome",
                label,
                "threshold",
                value >= m,
                f"at least {m} {label}",
                f"{label} below {m}",
            )
    for col, ones in counts.support.items():
        for side, value in (("non-zero", ones), ("zero", counts.n - ones)):
            if value == 0:
                rows.append(
                    (
                        col,
                        side,
                        "zeros",
                        "pass",
                        "no row on this side at this site: the column "
                        "contributes nothing (the level was fixed by the coordinator)",
                    )
                )
                continue
            add(
                col,
                side,
                "threshold",
                value >= m,
                f"at least {m} rows behind {col} ({side} side)",
                f"counts behind {col} below {m}",
            )
            if counts.binary and counts.events is not None:
                e = (
                    counts.support_events[col]
                    if side == "non-zero"
                    else (counts.events - counts.support_events[col])
                )
                for label, v in (("events", e), ("non-events", value - e)):
                    add(
                        col,
                        f"{side} {label}",
                        "threshold",
                        v >= m,
                        f"at least {m} {label} behind {col} ({side} side)",
                        f"{label} behind {col} below {m}",
                    )
    checks = pd.DataFrame(rows, columns=CHECK_COLUMNS)
    status = worst(list(checks["status"]))
    reasons = short if short else ["every check passed every rule"]
    if status == "fail":
        reasons.append("the whole share is withheld: a site's statistics cannot be partly released")
    return ShareEvaluation(checks, status, reasons)


# ---------------------------------------------------------------------------
# the common output kind
# ---------------------------------------------------------------------------
class FederatedShare(SDCOutput[ShareEvaluation]):
    """Base of the federated regression's shares: checked counts plus released statistics.

    Subclasses set ``self.design``, ``self.columns``, ``self.counts`` and
    ``self._table`` (the releasable matrix, NaN throughout when failing) and
    implement :meth:`public` (the numbers the coordinator needs).
    """

    design: Design
    columns: list[str]
    counts: ShareCounts

    def _evaluate(self) -> None:
        self._eval = evaluate_counts(self.counts, self.policy)

    @property
    def n(self) -> int:
        """Rows used at this site (local information; released only when the share passes)."""
        return self.counts.n

    @abstractmethod
    def public(self) -> dict[str, Any]:
        """The statistics the coordinator combines (numbers ``None`` when the share fails)."""

    def to_payload(self) -> dict[str, Any]:
        """The structured payload plus a ``federate`` block with what the coordinator needs."""
        payload = super().to_payload()
        payload["federate"] = self.public()
        return payload

    def __repr__(self) -> str:
        head = f"[{self.status.upper()}] {self.kind}: {self.design.formula}"
        return "\n".join([head, *(f"- {r}" for r in self.reasons)])

    def _table_html(self) -> str:
        return f"<p>{len(self.columns)} design columns; matrices travel in the share</p>"


def matrix_table(matrix: np.ndarray, labels: list[str], failed: bool) -> pd.DataFrame:
    """A square releasable matrix as a labelled frame (NaN throughout when the share fails)."""
    values = np.full(matrix.shape, np.nan) if failed else matrix.copy()
    return pd.DataFrame(values, index=pd.Index(labels), columns=pd.Index(labels))


def r_factor(a: np.ndarray) -> np.ndarray:
    """The square upper-triangular factor R of ``a`` (``RᵀR = aᵀa``), zero-padded when short.

    Sites share R instead of the cross-products: the same information (R is
    the Cholesky factor of ``aᵀa``), but stacking the sites' R and factoring
    again is as stable as one QR of the pooled data, where summing
    cross-products would square the design's condition number.
    """
    p = a.shape[1]
    r = np.asarray(np.linalg.qr(a, mode="r")) if a.shape[0] else np.zeros((0, p))
    out = np.zeros((p, p))
    out[: r.shape[0], :] = r[:p, :]
    return out


def matrix_from_json(data: Any, p: int, what: str) -> np.ndarray:
    """A ``p × p`` finite matrix from evidence; :class:`EvidenceError` otherwise."""
    try:
        matrix = array_from_json(data)
    except ValueError as exc:
        raise EvidenceError(f"{what}: {exc}") from None
    if matrix.shape != (p, p) or not np.all(np.isfinite(matrix)):
        raise EvidenceError(f"{what} must be a finite {p} x {p} matrix")
    if np.any(np.tril(matrix, -1) != 0):
        raise EvidenceError(f"{what} must be upper triangular")
    return matrix


def matrix_to_json(matrix: np.ndarray) -> list[Any]:
    """Strict JSON of a matrix."""
    return array_to_json(matrix)


# ---------------------------------------------------------------------------
# coordinator side: reading shares in any form
# ---------------------------------------------------------------------------
@dataclass
class Collected:
    """Shares ready to combine: ``used`` (site, public block) and ``dropped`` (site, reason, n)."""

    used: list[tuple[str, dict[str, Any]]]
    dropped: list[tuple[str, str, int | None]]


def collect(shares: Any, kind: str) -> Collected:
    """Normalise shares (objects, released payloads, placeholders; list or site mapping).

    A share that failed, is a placeholder or is missing (``None``) is dropped
    with its reason; a share of another kind or a malformed payload is an error.
    """
    if isinstance(shares, Mapping):
        items = [(str(site), value) for site, value in shares.items()]
    elif isinstance(shares, Sequence) and not isinstance(shares, (str, bytes)):
        items = [(f"site {i + 1}", value) for i, value in enumerate(shares)]
    else:
        raise ShareError("shares must be a list of shares or a mapping site -> share")
    if not items:
        raise ShareError("no shares given")
    used: list[tuple[str, dict[str, Any]]] = []
    dropped: list[tuple[str, str, int | None]] = []
    for site, value in items:
        if value is None:
            dropped.append((site, "no share", None))
            continue
        local_n: int | None = None
        if isinstance(value, FederatedShare):
            local_n = value.n
            payload = value.release_payload()
        elif isinstance(value, Mapping):
            payload = dict(value)
        else:
            raise ShareError(f"{site}: a share must be a {kind} output or its released payload")
        if payload.get("schema") == WITHHELD_SCHEMA:
            dropped.append((site, str(payload.get("reason", "withheld by the site")), None))
            continue
        if payload.get("schema") != "phds.output" or payload.get("kind") != kind:
            raise ShareError(
                f"{site}: not a {kind} share (kind {payload.get('kind')!r}); "
                "was it made for another analysis?"
            )
        if payload.get("status") == "fail":
            reasons = [str(r) for r in payload.get("reasons", []) if "whole share" not in str(r)]
            dropped.append((site, "; ".join(reasons) or "failed the site's checks", local_n))
            continue
        if not isinstance(payload.get("federate"), dict):
            raise ShareError(f"{site}: the {kind} payload has no 'federate' block")
        used.append((site, payload))
    if not used:
        why = "; ".join(f"{s} withheld ({r})" for s, r, _ in dropped)
        raise ShareError(f"every site's share was withheld, nothing to combine: {why}")
    return Collected(used, dropped)


def dropped_lines(collected: Collected, n_used: int) -> list[str]:
    """One sentence per dropped site, saying how the answer changes."""
    lines = []
    sites = len(collected.used) + len(collected.dropped)
    for site, reason, n in collected.dropped:
        if n is not None:
            effect = f"n {n_used} instead of {n_used + n}"
        else:
            effect = f"n {n_used} from {len(collected.used)} of {sites} sites"
        lines.append(f"{site} withheld ({reason}): {effect}")
    return lines


# ---------------------------------------------------------------------------
# reading released results
# ---------------------------------------------------------------------------
def load_shares(results_dir: str | Path, name: str) -> dict[str, dict[str, Any]]:
    """Site -> released payload of the shared result ``name`` (signatures were verified by the client).

    ``results_dir`` is what ``phds results STUDY --out DIR`` wrote
    (``<site>/release/shared/<name>.json`` per site, plus ``results.json``), or
    one release folder (``shared/<name>.json`` inside it, or ``release/``
    beside it). A site whose release lacks the share, or whose run was not
    released, maps to a placeholder ``{"schema": WITHHELD_SCHEMA, "reason": ...}``
    that :func:`~phds_tre.federate.ols` and ``GLM.update`` report as dropped.
    A malformed file is an error.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ShareError(f"{root}: not a folder of released results")
    for single in (root, root / "release"):
        if (single / "manifest.json").is_file():
            return {_site_of(single): _read_share(single, name)}
    summary_path = root / "results.json"
    statuses: dict[str, str] = {}
    if summary_path.is_file():
        summary = _read_json(summary_path)
        sites = summary.get("sites") if isinstance(summary, dict) else None
        if not isinstance(sites, dict):
            raise ShareError(f"{summary_path}: no 'sites' object (not written by phds results?)")
        statuses = {str(s): str(e.get("status")) for s, e in sites.items() if isinstance(e, dict)}
    found = sorted(p.parent.parent.name for p in root.glob("*/release/manifest.json"))
    out: dict[str, dict[str, Any]] = {}
    for site in sorted(set(found) | set(statuses)):
        if site in found:
            out[site] = _read_share(root / site / "release", name)
        else:
            out[site] = _withheld(name, f"the run was not released (status {statuses[site]})")
    if not out:
        raise ShareError(f"{root}: no site release folders (<site>/release/manifest.json)")
    return out


def _site_of(release: Path) -> str:
    manifest = _read_json(release / "manifest.json")
    site = manifest.get("site") if isinstance(manifest, dict) else None
    return str(site) if isinstance(site, str) and site else release.resolve().parent.name


def _withheld(name: str, reason: str) -> dict[str, Any]:
    return {"schema": WITHHELD_SCHEMA, "name": name, "reason": reason}


def _read_share(release: Path, name: str) -> dict[str, Any]:
    path = release / "shared" / f"{name}.json"
    if not path.is_file():
        manifest = _read_json(release / "manifest.json")
        outputs = (
            (manifest.get("release") or {}).get("outputs", []) if isinstance(manifest, dict) else []
        )
        # The manifest names outputs by kind, not by share name: a withheld federated
        # share (or a withheld raw share) is the best available explanation.
        held = [
            o
            for o in outputs
            if isinstance(o, dict)
            and str(o.get("kind")).startswith(("share", "structured/federate."))
            and o.get("state") != "released"
        ]
        reason = (
            f"not in the release; the site {held[0].get('reason', 'withheld a shared result')}"
            if held
            else f"the release holds no shared result {name!r}"
        )
        return _withheld(name, reason)
    payload = _read_json(path)
    if (
        not isinstance(payload, dict)
        or payload.get("schema") != "phds.output"
        or not isinstance(payload.get("kind"), str)
    ):
        raise ShareError(f"{path}: not a released phds output payload")
    if "evidence" in payload:
        raise ShareError(f"{path}: carries evidence, which never leaves a site")
    return payload


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShareError(f"{path}: cannot read JSON ({exc})") from None


def coefficient_table(result: Any, statistic: str) -> pd.DataFrame:
    """statsmodels' summary table of a fitted result: coef, std err, ``statistic``, P, 95% CI."""
    ci = result.conf_int()
    return pd.DataFrame(
        {
            "coef": result.params,
            "std err": result.bse,
            statistic: result.tvalues,
            f"P>|{statistic}|": result.pvalues,
            "[0.025": ci[0],
            "0.975]": ci[1],
        }
    )
