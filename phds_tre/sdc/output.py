"""Checked outputs: what a safe-API call returns and how it shows in Jupyter.

Every output has ``status``, ``table`` (what may be released), ``checks`` (one
row per cell and rule evaluated) and displays as a versioned MIME bundle
:data:`MIME_TYPE` beside HTML with verdict badges and plain text.

The JSON payload has two parts: the public part (releasable table, check
summary, verdicts) and ``evidence``, the per-cell contributor statistics the
rules need. Evidence never leaves the site: the node re-runs the rules on it
with the site's own policy (:func:`recheck`) and rebuilds the release from
the result, so the status a kernel claims is never trusted.
"""

from __future__ import annotations

import html
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import pandas as pd

from phds_tre.sdc.policy import Policy

__all__ = [
    "MIME_TYPE",
    "SCHEMA_VERSION",
    "EvidenceError",
    "Recheck",
    "SDCOutput",
    "public_rule",
    "public_rule_counts",
    "recheck",
    "register_kind",
]

MIME_TYPE = "application/vnd.phds.output+json"
SCHEMA_VERSION = 1
CHECK_COLUMNS = ["row", "column", "rule", "status", "detail"]

_BADGE_COLOURS = {"pass": "#1a7f37", "review": "#9a6700", "fail": "#cf222e"}
_BADGE_TEXT = {
    "pass": "PASS · may be released",
    "review": "REVIEW · a site reviewer decides",
    "fail": "FAIL · will be withheld",
}


class EvidenceError(ValueError):
    """A structured payload whose evidence is missing, malformed or inconsistent."""


def badge_html(status: str) -> str:
    """A coloured verdict badge a person can read at a glance."""
    colour = _BADGE_COLOURS.get(status, "#57606a")
    text = _BADGE_TEXT.get(status, status.upper())
    return (
        f'<span class="phds-verdict phds-verdict-{html.escape(status)}" '
        f'style="display:inline-block;padding:2px 8px;border-radius:10px;'
        f'background:{colour};color:white;font-weight:600;font-size:85%">'
        f"{html.escape(text)}</span>"
    )


class Evaluated(Protocol):
    """What every output kind's evaluation provides."""

    status: str
    reasons: list[str]
    checks: pd.DataFrame


EvaluationT = TypeVar("EvaluationT", bound=Evaluated)


def public_rule(rule: str, status: str) -> str:
    """The rule name published for a check: a failed ``zeros`` check is published as ``threshold``.

    A zero cell also fails the threshold (0 < ``min_count``). Naming the zeros rule
    beside a suppressed cell would tell the reader that the hidden count is exactly 0
    (the class disclosure the rule exists to prevent), and naming only ``threshold``
    beside the others that it is not.
    """
    return "threshold" if rule == "zeros" and status == "fail" else rule


def public_rule_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Per-rule counts of suppressed cells with ``zeros`` merged into ``threshold``."""
    merged: dict[str, int] = {}
    for rule, count in counts.items():
        name = public_rule(rule, "fail")
        merged[name] = merged.get(name, 0) + int(count)
    return merged


def _threshold_detail(policy: Policy) -> str:
    return f"fewer than {policy.min_count} contributors (minimum cell count)"


class SDCOutput(ABC, Generic[EvaluationT]):
    """Base of every checked output (tables, summaries, models, survival).

    A subclass evaluates its evidence with the policy into ``self._eval`` and
    builds the releasable ``self._table`` from it; the verdict properties below
    read those, so every kind reports its verdict the same way.
    """

    kind: ClassVar[str] = "output"
    _eval: EvaluationT
    _table: pd.DataFrame | pd.Series

    def __init__(self, policy: Policy, call: str) -> None:
        self.policy = policy
        self.call = call

    @property
    def status(self) -> str:
        """``"pass"``, ``"review"`` or ``"fail"`` for the whole output."""
        return self._eval.status

    @property
    def reasons(self) -> list[str]:
        """Why the output has its status, one sentence each."""
        return list(self._eval.reasons)

    @property
    def checks(self) -> pd.DataFrame:
        """One row per (cell, rule) evaluated: row, column, rule, status, detail."""
        return self._eval.checks

    @property
    def table(self) -> pd.DataFrame | pd.Series:
        """What may be released: unsafe cells suppressed (NaN)."""
        return self._table

    @abstractmethod
    def evidence(self) -> dict[str, Any]:
        """The private statistics the rules need (stays at the site)."""

    def summary_of_checks(self) -> dict[str, dict[str, int]]:
        """Counts of checks by rule and status (a failed zeros check counts as a threshold one)."""
        checks = self.checks
        out: dict[str, dict[str, int]] = {}
        if len(checks):
            counts = checks.groupby(["rule", "status"], sort=True).size()
            for (rule, status), count in counts.items():
                name = public_rule(str(rule), str(status))
                by_status = out.setdefault(name, {})
                by_status[str(status)] = by_status.get(str(status), 0) + int(count)
        return out

    def to_payload(self) -> dict[str, Any]:
        """The JSON payload of :data:`MIME_TYPE` (public part + evidence)."""
        checks = self.checks
        not_pass = checks[checks["status"] != "pass"]
        return {
            "schema": "phds.output",
            "version": SCHEMA_VERSION,
            "kind": self.kind,
            "call": self.call,
            "status": self.status,
            "reasons": self.reasons,
            "policy_hash": self.policy.hash,
            "policy": self.policy.to_dict(),
            "table": table_to_json(self.table),
            "checks": {
                "summary": self.summary_of_checks(),
                "not_pass": [
                    {
                        "row": _json_label(r.row),
                        "column": _json_label(r.column),
                        "rule": public_rule(r.rule, r.status),
                        "status": r.status,
                        "detail": (
                            r.detail
                            if public_rule(r.rule, r.status) == r.rule
                            else _threshold_detail(self.policy)
                        ),
                    }
                    for r in not_pass.itertuples(index=False)
                ],
            },
            "evidence": self.evidence(),
        }

    def release_payload(self) -> dict[str, Any]:
        """The payload without evidence: the form that may leave the site."""
        payload = self.to_payload()
        payload.pop("evidence")
        payload.pop("policy")
        return payload

    # ---- display -------------------------------------------------------
    def _table_html(self) -> str:
        table = self.table
        frame = table.to_frame() if isinstance(table, pd.Series) else table
        return str(frame.to_html(na_rep="<i>suppressed</i>", escape=True, render_links=False))

    def _repr_html_(self) -> str:
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in self.reasons)
        return (
            f'<div class="phds-output"><div>{badge_html(self.status)} '
            f"<code>sdc.{html.escape(self.call)}</code> · policy "
            f"<code>{html.escape(self.policy.hash[7:19])}</code></div>"
            f"{self._table_html()}"
            f"<ul>{reasons}</ul></div>"
        ).replace("<td><i>suppressed</i></td>", '<td style="color:#888"><i>suppressed</i></td>')

    def __repr__(self) -> str:
        lines = [f"[{self.status.upper()}] sdc.{self.call}"]
        lines.append(self.table.to_string(na_rep="suppressed"))
        lines.extend(f"- {r}" for r in self.reasons)
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, Any]:
        return {
            MIME_TYPE: json.loads(json.dumps(self.to_payload(), allow_nan=False)),
            "text/html": self._repr_html_(),
            "text/plain": repr(self),
        }


def _json_label(label: object) -> Any:
    from phds_tre.sdc.jsonio import label_to_json

    return label_to_json(label)


def table_to_json(table: pd.DataFrame | pd.Series) -> dict[str, Any]:
    """The releasable table as strict JSON (NaN → null)."""
    from phds_tre.sdc.jsonio import array_to_json

    frame = table.to_frame() if isinstance(table, pd.Series) else table
    values = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    return {
        "orient": "series" if isinstance(table, pd.Series) else "frame",
        "index": [_json_label(x) for x in frame.index],
        "columns": [_json_label(x) for x in frame.columns],
        "index_names": [_json_label(n) for n in frame.index.names],
        "column_names": [_json_label(n) for n in frame.columns.names],
        "data": array_to_json(values),
    }


@dataclass
class Recheck:
    """The outcome of re-checking a structured payload with a site's policy."""

    status: str
    reasons: list[str]
    output: SDCOutput[Any] | None = None
    claimed_status: str | None = None
    notes: list[str] = field(default_factory=list)


_KINDS: dict[str, Callable[[dict[str, Any], Policy], SDCOutput[Any]]] = {}


def register_kind(
    kind: str, from_payload: Callable[[dict[str, Any], Policy], SDCOutput[Any]]
) -> None:
    """Register how to rebuild an output kind from its payload (for :func:`recheck`)."""
    _KINDS[kind] = from_payload


def recheck(payload: Any, policy: Policy) -> Recheck:
    """Re-run the rules on a payload's evidence with ``policy``; never trust its claimed status.

    A payload that is malformed, of an unknown kind or version, or whose
    evidence is inconsistent gets ``fail`` with the reason.
    """
    import phds_tre.sdc  # noqa: F401  (registers every kind)

    if not isinstance(payload, dict):
        return Recheck("fail", ["structured output is not a JSON object"])
    if payload.get("schema") != "phds.output" or payload.get("version") != SCHEMA_VERSION:
        return Recheck(
            "fail",
            [
                f"unknown structured output schema {payload.get('schema')!r} "
                f"version {payload.get('version')!r} (expected phds.output {SCHEMA_VERSION})"
            ],
        )
    kind = payload.get("kind")
    builder = _KINDS.get(kind) if isinstance(kind, str) else None
    if builder is None and isinstance(kind, str) and kind.startswith("federate."):
        # The federated regression's shares register when their modules load (lazily:
        # they need scipy and the formula engine, which sdc alone does not).
        from importlib import import_module

        for module in ("phds_tre.federate.linear", "phds_tre.federate.glm"):
            import_module(module)
        builder = _KINDS.get(kind)
    if builder is None:
        return Recheck("fail", [f"unknown structured output kind {kind!r}"])
    try:
        output = builder(payload, policy)
        status = output.status
        reasons = list(output.reasons)
    except (EvidenceError, ValueError, KeyError, TypeError, IndexError) as exc:
        return Recheck("fail", [f"evidence cannot be re-checked: {exc}"])
    claimed = payload.get("status")
    notes = []
    if claimed != status:
        notes.append(f"the kernel claimed {claimed!r}; re-checked with the site policy: {status!r}")
    return Recheck(status, reasons, output, claimed if isinstance(claimed, str) else None, notes)
