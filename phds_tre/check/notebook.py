"""Reading, checking and annotating whole notebooks.

* :func:`read_notebook` turns anything that is not a valid nbformat v4
  notebook into one clear :class:`NotebookError` (never a traceback, never
  nbformat's logging);
* :func:`check_notebook` checks every output of every code cell and returns a
  :class:`NotebookReport`;
* :func:`write_verdicts` stores each verdict beside its output, and
  :func:`save_notebook` writes the result, still a valid notebook.

Where a verdict is stored: nbformat v4 allows ``metadata`` only on
``display_data`` and ``execute_result`` outputs (``stream`` and ``error``
outputs forbid extra keys), so those get ``output.metadata["phds"]["verdict"]``
and the others are stored in their cell, under
``cell.metadata["phds"]["output_verdicts"][str(output_index)]``.
:func:`stored_verdict` reads either place.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import nbformat
from nbformat import NotebookNode

from phds_tre.check.checkers import REGISTRY, CheckContext, CheckerRegistry, check_output
from phds_tre.check.structured import Rechecker, load_recheck
from phds_tre.check.verdict import STATUSES, Status, Verdict, worst
from phds_tre.sdc.policy import Policy

__all__ = [
    "IdentifierScanner",
    "NotebookError",
    "NotebookReport",
    "OutputReport",
    "check_notebook",
    "identifier_verdict",
    "parse_notebook",
    "read_notebook",
    "save_notebook",
    "stored_verdict",
    "verdict_metadata",
    "write_verdicts",
]

#: Output types whose schema allows ``metadata``.
_WITH_METADATA = ("display_data", "execute_result")


class NotebookError(ValueError):
    """A file that cannot be read, or is not a valid nbformat v4 notebook; one-line message."""


@dataclass(frozen=True)
class OutputReport:
    """The verdict of one output, and where it is."""

    cell_index: int
    cell_id: str | None
    output_index: int
    output_type: str
    kind: str
    verdict: Verdict

    @property
    def status(self) -> Status:
        """The output's verdict status."""
        return self.verdict.status


@dataclass(frozen=True)
class NotebookReport:
    """Every output's verdict, plus findings about the notebook as a whole (e.g. widget state)."""

    outputs: tuple[OutputReport, ...]
    notebook: Verdict
    policy_hash: str

    @property
    def status(self) -> Status:
        """Worst verdict of the notebook: any fail → fail, else any review → review."""
        return worst([self.notebook.status, *(o.status for o in self.outputs)])

    def counts(self) -> dict[str, int]:
        """Number of outputs per status (every status present, zero included)."""
        counted = Counter(o.status for o in self.outputs)
        return {s: counted.get(s, 0) for s in STATUSES}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Readers disagree on which duplicate wins; a checker must see what a viewer shows.
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise NotebookError(f"duplicate JSON key {duplicate!r}")
    return dict(pairs)


def _validation_message(exc: nbformat.ValidationError) -> str:
    message = str(getattr(exc, "message", exc)).splitlines()[0] if str(exc) else "invalid"
    if "is not valid under any of the given schemas" in message:
        # The message starts with the offending value, which may be data: not repeated here.
        message = "value matches none of the allowed forms"
    elif len(message) > 120:
        message = message[:120] + "…"
    where = "/".join(str(p) for p in getattr(exc, "absolute_path", []) or [])
    return f"{message} (at {where})" if where else message


def parse_notebook(raw: bytes | str, source: str = "notebook") -> NotebookNode:
    """Parse and validate notebook JSON; raise :class:`NotebookError` saying what is wrong."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")  # nbformat files are UTF-8; no guessing of other encodings
        except UnicodeDecodeError:
            raise NotebookError(f"{source}: not UTF-8 text") from None
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except NotebookError as exc:
        raise NotebookError(f"{source}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise NotebookError(
            f"{source}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise NotebookError(f"{source}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict) or "nbformat" not in data or "cells" not in data:
        raise NotebookError(f"{source}: not a Jupyter notebook (no 'nbformat' and 'cells' keys)")
    if data.get("nbformat") != 4:
        raise NotebookError(
            f"{source}: nbformat {data.get('nbformat')!r} is not supported (only version 4)"
        )
    nb = nbformat.from_dict(data)
    # Validate a copy: nbformat "repairs" (adds cell ids) while validating, and warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            nbformat.validate(copy.deepcopy(nb))
        except nbformat.ValidationError as exc:
            raise NotebookError(
                f"{source}: not a valid nbformat v4 notebook: {_validation_message(exc)}"
            ) from None
    return nb


def read_notebook(path: str | Path) -> NotebookNode:
    """Read and validate a notebook file; raise :class:`NotebookError` with a one-line reason."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise NotebookError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_notebook(raw, source=str(path))


def _notebook_findings(nb: Mapping[str, Any]) -> Verdict:
    """Rules about the notebook as a whole."""
    metadata = nb.get("metadata") or {}
    if isinstance(metadata, Mapping) and "widgets" in metadata:
        return Verdict.fail(
            "notebook metadata.widgets: saved widget state cannot be checked and is not released"
        )
    return Verdict.passed()


class IdentifierScanner(Protocol):
    """Data-aware scanning: finds the site's identifiers in an output (``phds_tre.release.scan``)."""

    def scan_output(self, output: Mapping[str, Any]) -> Sequence[Any]:
        """Hits in every representation of ``output``; each has ``kind`` and a value-free ``str``."""
        ...


def identifier_verdict(hits: Sequence[Any]) -> Verdict:
    """Verdict of data-aware scanning: a record number fails, an exact date goes to review.

    Exact dates are weak evidence on their own (among thousands of children,
    nearly every date is somebody's birthday), so a person decides; any other
    identifier of the site's data is withheld.
    """
    if not hits:
        return Verdict.passed()
    reasons = tuple(dict.fromkeys(str(hit) for hit in hits))
    if any(getattr(hit, "kind", "identifier") != "date" for hit in hits):
        return Verdict.fail(*reasons)
    return Verdict.review(*reasons)


def check_notebook(
    nb: Mapping[str, Any],
    policy: Policy,
    *,
    recheck: Rechecker | None = None,
    registry: CheckerRegistry = REGISTRY,
    scanner: IdentifierScanner | None = None,
) -> NotebookReport:
    """Check every output of every code cell of ``nb`` with ``policy``.

    ``recheck`` re-checks structured outputs; by default the real
    :func:`phds_tre.sdc.recheck` (structured outputs fail when it is missing).
    ``scanner`` adds data-aware scanning: an output holding one of the site's
    identifiers, in any representation, fails (see :func:`identifier_verdict`).
    """
    ctx = CheckContext(policy=policy, recheck=recheck if recheck is not None else load_recheck())
    reports = []
    for cell_index, cell in enumerate(nb.get("cells") or []):
        if cell.get("cell_type") != "code":
            continue  # only code cells have outputs
        cell_id = cell.get("id")
        for output_index, output in enumerate(cell.get("outputs") or []):
            result = check_output(output, ctx, registry)
            verdict = result.verdict
            if scanner is not None and isinstance(output, Mapping):
                found = identifier_verdict(scanner.scan_output(output))
                if found.status != "pass":
                    verdict = Verdict(
                        worst([verdict.status, found.status]),
                        (*found.reasons, *verdict.reasons),
                        verdict.redact,
                    )
            reports.append(
                OutputReport(
                    cell_index=cell_index,
                    cell_id=cell_id if isinstance(cell_id, str) else None,
                    output_index=output_index,
                    output_type=str(output.get("output_type")),
                    kind=result.kind,
                    verdict=verdict,
                )
            )
    return NotebookReport(tuple(reports), _notebook_findings(nb), policy.hash)


def verdict_metadata(report: OutputReport, policy_hash: str) -> dict[str, Any]:
    """The verdict of one output as stored in notebook metadata."""
    stored: dict[str, Any] = {
        "status": report.status,
        "reasons": list(report.verdict.reasons),
        "kind": report.kind,
        "policy_hash": policy_hash,
    }
    if report.verdict.redact:
        stored["redact"] = list(report.verdict.redact)
    return stored


def _phds(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata["phds"]`` as a dict, replacing anything else a kernel may have put there."""
    if not isinstance(metadata.get("phds"), dict):
        metadata["phds"] = {}
    # Re-read: a NotebookNode converts the dict it is given into a new node.
    own: dict[str, Any] = metadata["phds"]
    return own


def write_verdicts(nb: NotebookNode, report: NotebookReport) -> NotebookNode:
    """Store every verdict of ``report`` in ``nb``, in place (where: see the module docstring)."""
    by_cell: dict[int, list[OutputReport]] = {}
    for output_report in report.outputs:
        by_cell.setdefault(output_report.cell_index, []).append(output_report)
    for cell_index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        in_cell: dict[str, Any] = {}
        for output_report in by_cell.get(cell_index, []):
            output = cell.outputs[output_report.output_index]
            stored = verdict_metadata(output_report, report.policy_hash)
            if output.get("output_type") in _WITH_METADATA:
                metadata = output.setdefault("metadata", {})
                _phds(metadata)["verdict"] = stored
            else:
                in_cell[str(output_report.output_index)] = stored
        cell_phds = cell.metadata.get("phds")
        if in_cell:
            _phds(cell.metadata)["output_verdicts"] = in_cell
        elif isinstance(cell_phds, dict):
            cell_phds.pop("output_verdicts", None)  # stale verdicts of an earlier check
            if not cell_phds:
                del cell.metadata["phds"]
    _phds(nb.metadata)["check"] = {
        "status": report.status,
        "reasons": list(report.notebook.reasons),
        "counts": report.counts(),
        "policy_hash": report.policy_hash,
    }
    return nb


def stored_verdict(nb: Mapping[str, Any], cell_index: int, output_index: int) -> Any:
    """The verdict :func:`write_verdicts` stored for one output, or None."""
    cell = nb["cells"][cell_index]
    output = cell["outputs"][output_index]
    found = (output.get("metadata") or {}).get("phds", {})
    if isinstance(found, Mapping) and "verdict" in found:
        return found["verdict"]
    in_cell = (cell.get("metadata") or {}).get("phds", {})
    if isinstance(in_cell, Mapping):
        return (in_cell.get("output_verdicts") or {}).get(str(output_index))
    return None


def save_notebook(nb: NotebookNode, path: str | Path) -> None:
    """Validate and write ``nb`` atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            nbformat.validate(nb)
        except nbformat.ValidationError as exc:  # pragma: no cover - a bug in write_verdicts
            raise NotebookError(
                f"{path}: result would not be valid: {_validation_message(exc)}"
            ) from None
        text = nbformat.writes(nb, version=4)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            # mkstemp makes the file private; keep the mode of the file replaced, else 0644.
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise NotebookError(f"{path}: cannot write ({exc.strerror or exc})") from None
