"""Presenting a notebook report: JSON for machines, a table for people.

Plain text on purpose: ``rich`` is not a dependency of the project, and a
reviewer's terminal, a CI log and a pipe all read plain text.
"""

from __future__ import annotations

from typing import Any

from phds_tre.check.notebook import NotebookReport

__all__ = ["JSON_SCHEMA", "format_text", "to_json"]

#: Name and version of the JSON document :func:`to_json` produces.
JSON_SCHEMA = "phds.check/1"


def to_json(report: NotebookReport, source: str) -> dict[str, Any]:
    """The report as a JSON-ready document (schema :data:`JSON_SCHEMA`)."""
    return {
        "schema": JSON_SCHEMA,
        "notebook": source,
        "status": report.status,
        "policy_hash": report.policy_hash,
        "counts": report.counts(),
        "notebook_reasons": list(report.notebook.reasons),
        "outputs": [
            {
                "cell_index": o.cell_index,
                "cell_id": o.cell_id,
                "output_index": o.output_index,
                "output_type": o.output_type,
                "kind": o.kind,
                "status": o.status,
                "reasons": list(o.verdict.reasons),
                "redact": list(o.verdict.redact),
            }
            for o in report.outputs
        ],
    }


_HEADER = ("cell", "out", "output_type", "kind", "status", "reasons")


def format_text(report: NotebookReport, source: str) -> str:
    """One line per output (cell, output, type, kind, status, reasons) and a summary line."""
    rows = [
        (
            str(o.cell_index),
            str(o.output_index),
            o.output_type,
            o.kind,
            o.status.upper(),
            "; ".join(_one_line(r) for r in o.verdict.reasons),
        )
        for o in report.outputs
    ]
    lines = []
    if rows:
        widths = [max(len(r[i]) for r in [_HEADER, *rows]) for i in range(len(_HEADER) - 1)]
        for row in [_HEADER, *rows]:
            cells = [
                c.rjust(w) if i < 2 else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=False))
            ]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
    else:
        lines.append("no outputs")
    if report.notebook.reasons:
        lines.append(
            f"notebook: {report.notebook.status.upper()}  "
            + "; ".join(_one_line(r) for r in report.notebook.reasons)
        )
    counts = report.counts()
    lines.append(
        f"{source}: {report.status.upper()} — {len(report.outputs)} outputs: "
        f"{counts['pass']} pass, {counts['review']} review, {counts['fail']} fail "
        f"(policy {report.policy_hash[:19]}…)"
    )
    return "\n".join(lines)


def _one_line(text: str) -> str:
    # Reasons may quote output text (a MIME type, an attribute name): a line break
    # would break the table and a control character would drive the terminal.
    visible = "".join(c if c.isprintable() or c.isspace() else repr(c)[1:-1] for c in text)
    return " ".join(visible.split())
