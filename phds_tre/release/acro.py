"""``results.json`` in ACRO's format, so an output checker can open a release in SACRO-Viewer.

The format followed is the one ACRO writes in ``Records.finalise_json``
(``acro/record.py`` of github.com/AI-SDC/ACRO) and SACRO-Viewer reads in
``sacro/models.py`` (``ACROOutputs``; github.com/AI-SDC/SACRO-Viewer)::

    {"version": "0.4.x",
     "results": {uid: {"uid", "status", "type", "properties",
                       "files": [{"name": <file beside results.json>, "sdc": {...}}],
                       "outcome", "command", "summary", "timestamp",
                       "comments", "exception"}}}

* ``sdc`` is ACRO's ``get_table_sdc`` dictionary: ``summary`` (``suppressed``
  plus a count of cells per check, ACRO's names ``threshold``, ``p-ratio``,
  ``nk-rule``, ``all-values-are-same``, ``negative``, ``missing``; phds rules
  without an ACRO name keep their own) and ``cells`` (check → list of
  ``[row, column]`` positions in the table);
* ``outcome`` is ACRO's per-cell outcome table as ``DataFrame.to_json()``
  writes it: ``{column: {row: "ok" | "threshold; " …}}``;
* SACRO-Viewer needs ``version`` ≥ 0.4 and at least one ``files`` entry with a
  ``name`` per result; it checks each file against ``checksums/<name>.txt``
  (sha256 hex), which ACRO's ``write_checksums`` writes and so does this module.

Only released outputs appear: a table as a CSV file (the released,
suppressed table: suppressed cells empty), anything else as one file per
released representation (``type`` ``custom``, as ACRO's ``add_custom``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from phds_tre.check.structured import STRUCTURED_MIME
from phds_tre.release.notebook import ReleaseItem, ReleaseNotebook
from phds_tre.sdc.jsonio import array_from_json, label_from_json

__all__ = ["ACRO_VERSION", "acro_results", "table_frame"]

#: The ACRO results format version written (SACRO-Viewer accepts 0.4.x and later).
ACRO_VERSION = "0.4.11"

#: phds rule names → ACRO's check names.
_ACRO_CHECKS = {
    "threshold": "threshold",
    "p_percent": "p-ratio",
    "nk": "nk-rule",
    "single_value": "all-values-are-same",
    "negative": "negative",
    "missing": "missing",
}
_ACRO_TYPES = {"model": "regression", "survival": "survival table"}
#: Released representation → file extension (custom outputs).
_EXTENSIONS = {
    "text/plain": ".txt",
    "text/markdown": ".md",
    "text/html": ".html",
    "text/latex": ".tex",
    "application/json": ".json",
    "image/svg+xml": ".svg",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
}
_BINARY = frozenset({"image/png", "image/jpeg", "image/gif"})


def table_frame(table: Mapping[str, Any]) -> pd.DataFrame:
    """The released table of a structured payload (its ``table`` JSON) as a DataFrame."""
    index = _labels(table["index"], table.get("index_names") or [None])
    columns = _labels(table["columns"], table.get("column_names") or [None])
    values = array_from_json(table["data"]).reshape(len(index), len(columns))
    return pd.DataFrame(values, index=index, columns=columns)


def _labels(labels: Sequence[Any], names: Sequence[Any]) -> pd.Index:
    values = [label_from_json(x) for x in labels]
    if len(names) > 1:
        return pd.MultiIndex.from_tuples(values, names=list(names))
    return pd.Index(values, name=names[0], dtype=object)


def _label_text(label: object) -> str:
    return " / ".join(str(x) for x in label) if isinstance(label, tuple) else str(label)


def _positions(labels: Sequence[Any]) -> dict[str, int]:
    return {json.dumps(label, sort_keys=True): i for i, label in enumerate(labels)}


def _sdc(payload: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]], str]:
    """ACRO's ``sdc`` dictionary, per-cell outcomes and summary sentence for a released payload."""
    table = payload["table"]
    rows, cols = _positions(table["index"]), _positions(table["columns"])
    summary: dict[str, Any] = {"suppressed": any(v is None for row in table["data"] for v in row)}
    cells: dict[str, list[list[int]]] = {}
    for name in _ACRO_CHECKS.values():
        summary[name] = 0
        cells[name] = []
    outcomes: dict[str, list[str]] = {}
    for check in (payload.get("checks") or {}).get("not_pass") or []:
        name = _ACRO_CHECKS.get(str(check.get("rule")), str(check.get("rule")))
        summary[name] = summary.get(name, 0) + 1
        cells.setdefault(name, [])
        r = rows.get(json.dumps(check.get("row"), sort_keys=True))
        c = cols.get(json.dumps(check.get("column"), sort_keys=True))
        if r is not None and c is not None:
            cells[name].append([r, c])
            outcomes.setdefault(f"{r},{c}", []).append(name)
    status = str(payload.get("status"))
    suppressed = "suppressed" if summary["suppressed"] else "may need suppressing"
    parts = [
        f"{name}: {n} cells {suppressed}"
        for name, n in summary.items()
        if name != "suppressed" and n
    ]
    sentence = f"{status}; " + "; ".join(parts) + "; " if parts else status
    return {"summary": summary, "cells": cells}, outcomes, sentence


def _outcome(
    payload: Mapping[str, Any], per_cell: Mapping[str, list[str]]
) -> dict[str, dict[str, str]]:
    table = payload["table"]
    outcome: dict[str, dict[str, str]] = {}
    for c, column in enumerate(table["columns"]):
        column_key = _label_text(label_from_json(column))
        outcome[column_key] = {
            _label_text(label_from_json(row)): (
                "".join(f"{name}; " for name in per_cell[f"{r},{c}"])
                if f"{r},{c}" in per_cell
                else "ok"
            )
            for r, row in enumerate(table["index"])
        }
    return outcome


def _comments(item: ReleaseItem) -> list[str]:
    comments = [f"released from cell {item.cell_index}, output {item.output_index}: {item.reason}"]
    if item.decision:
        comments.append(f"reviewer decision: {item.decision}")
    return comments


def acro_results(release: ReleaseNotebook, created: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The ``results.json`` document and the files it names (name → bytes), checksums included.

    File names are relative to ``results.json``; the checksum files are
    ``checksums/<name>.txt`` as ACRO and SACRO-Viewer expect.
    """
    results: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for item in release.items:
        if item.state != "released":
            continue
        uid = f"cell_{item.cell_index}_output_{item.output_index}"
        output = release.output(item.cell_index, item.output_index)
        cell = release.notebook.cells[item.cell_index]
        record: dict[str, Any] = {
            "uid": uid,
            "status": item.verdict,
            "type": "custom",
            "properties": {"cell_index": item.cell_index, "output_index": item.output_index},
            "files": [],
            "outcome": {},
            "command": cell.source,
            "summary": item.verdict,
            "timestamp": created,
            "comments": _comments(item),
            "exception": "",
        }
        data = output.get("data") or {}
        if STRUCTURED_MIME in data:
            payload = data[STRUCTURED_MIME]
            sdc, per_cell, summary = _sdc(payload)
            name = f"{uid}.csv"
            files[name] = table_frame(payload["table"]).to_csv().encode("utf-8")
            kind = str(payload.get("kind"))
            record.update(
                type=_ACRO_TYPES.get(kind, "table"),
                properties={
                    **record["properties"],
                    "method": str(payload.get("call")),
                    "kind": kind,
                    "policy_hash": payload.get("policy_hash"),
                },
                outcome=_outcome(payload, per_cell),
                summary=summary,
            )
            record["files"].append({"name": name, "sdc": sdc})
        else:
            for suffix, content in _custom_files(output):
                name = f"{uid}{suffix}"
                files[name] = content
                record["files"].append({"name": name, "sdc": {}})
        if record["files"]:
            results[uid] = record
    checksums = {
        f"checksums/{name}.txt": hashlib.sha256(content).hexdigest().encode("ascii")
        for name, content in files.items()
    }
    return {"version": ACRO_VERSION, "results": results}, {**files, **checksums}


def _custom_files(output: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """One file per released representation of a non-table output."""
    output_type = output.get("output_type")
    if output_type == "stream":
        return [(".txt", str(output.get("text", "")).encode("utf-8"))]
    if output_type == "error":
        lines = [f"{output.get('ename')}: {output.get('evalue', '')}".rstrip(": ")]
        lines += [str(line) for line in output.get("traceback") or []]
        return [(".txt", ("\n".join(lines) + "\n").encode("utf-8"))]
    found = []
    data = output.get("data") or {}
    for mime, suffix in _EXTENSIONS.items():
        if mime not in data:
            continue
        value = data[mime]
        if mime in _BINARY:
            found.append((suffix, base64.b64decode(value)))
        elif mime == "application/json":
            found.append((suffix, json.dumps(value, indent=1, sort_keys=True).encode("utf-8")))
        else:
            found.append((suffix, str(value).encode("utf-8")))
    return found
