"""The site's review queue: held outputs, reviewer decisions, and the reviewed release.

One implementation behind ``phds review …`` and the local REST API
(:mod:`phds_tre.node.api`). A run whose check held outputs for a person is parked in
``awaiting_review`` by the node agent (:func:`open_review`); nothing of it leaves the
site. A reviewer lists the queue, looks at each held output (:meth:`ReviewQueue.show`:
verdict, the rules' reasons, kind, content), decides ``approve``, ``reject`` or
``redact`` per output (:meth:`ReviewQueue.decide`; a decision can be changed until
release) and releases the run (:meth:`ReviewQueue.release`). The agent then rebuilds
the release from the executed notebook with the decisions
(:func:`build_reviewed_release`: :func:`~phds_tre.release.notebook.build_release`,
written atomically, signed with the site key) and uploads it once.

The rules, enforced here (not in the callers):

* an output is named ``cell:output`` as in ``run.json`` (``3:0``);
* a comment is required to approve a ``fail``, to reject a ``pass`` and for any
  decision on a ``review`` verdict;
* approving an output in which the data-aware scan found one of the site's
  identifiers is refused outright — nobody may release a record number;
* the study's author (the bundle manifest's ``researcher``) may not review it;
* release is refused while any held output is undecided.

Every decision and release is in node state *and* in the node's audit log, with who
and when. Note that the release builder never releases an output whose verdict is
``fail``, even when approved: the approval (and its comment) is recorded, the output
stays withheld.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from phds_tre.audit import AuditLog
from phds_tre.node.state import LocalRun, NodeState, StateError, StoredDecision
from phds_tre.release.notebook import DECISIONS

__all__ = [
    "HeldOutput",
    "ReviewError",
    "ReviewQueue",
    "RunReview",
    "RunSummary",
    "build_reviewed_release",
    "decide",
    "format_review",
    "held_outputs",
    "open_review",
    "release",
    "release_dir",
    "study_researcher",
]

#: Longest comment kept (it travels in the release manifest).
MAX_COMMENT = 2000
#: Where the reviewed release is written, under a run's ``out/``.
REVIEWED_DIR = "reviewed"
#: Files written for the reviewer to look at (images), under a run's ``out/``.
REVIEW_FILES_DIR = "review"
_OUTPUT_KEY = re.compile(r"(\d{1,6}):(\d{1,6})")
# The data-aware scan's reasons (phds_tre.release.scan.Hit.__str__) name a column
# "from the site's data"; the release builder's own re-scan says "a value from the site's data".
_IDENTIFIER_REASON = re.compile(r"a value (of \S+ )?from the site's data")
_IMAGE_SUFFIX = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif"}


class ReviewError(ValueError):
    """A refused review operation: an HTTP-like ``status`` and a one-line ``reason``.

    404 unknown run or output, 403 not allowed for this reviewer or output, 409 not in a
    state that allows it (released, undecided outputs), 422 bad input (missing comment).
    """

    def __init__(self, status: int, reason: str) -> None:
        """``status``: 403, 404, 409 or 422; ``reason``: one line for the reviewer."""
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class HeldOutput:
    """One output of a run as the reviewer sees it."""

    output: str
    output_type: str
    kind: str
    verdict: str
    reasons: list[str]
    release: str | None  # released | held | withheld, as the node's check left it
    content: str
    files: list[str] = field(default_factory=list)
    identifier_found: bool = False
    decision: dict[str, str] | None = None

    @property
    def needs_decision(self) -> bool:
        """Held outputs must be decided before the run can be released."""
        return self.release == "held"

    @property
    def status(self) -> str:
        """The verdict under run.json's name for it (``pass``, ``review``, ``fail``)."""
        return self.verdict


@dataclass(frozen=True)
class RunSummary:
    """One run of the review queue."""

    run_id: str
    study_id: str
    status: str
    researcher: str
    held: int
    decided: int
    opened_at: str
    released_by: str | None


@dataclass(frozen=True)
class RunReview:
    """A run with every output, its content and the decisions so far."""

    summary: RunSummary
    outputs: list[HeldOutput]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the API answer)."""
        return {
            **asdict(self.summary),
            "outputs": [{**asdict(o), "needs_decision": o.needs_decision} for o in self.outputs],
        }


def _one_line(text: str, limit: int = MAX_COMMENT) -> str:
    line = " ".join(str(text).split())
    return line[:limit]


def _same_person(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def study_researcher(run: LocalRun) -> str:
    """The study's author: the ``researcher`` of the run's verified bundle manifest."""
    from phds_tre.bundle import read_bundle

    # The bundle's signature was checked against the accepted keys when it was claimed;
    # read_bundle re-checks its integrity (a file edited since is refused, not trusted).
    return read_bundle(run.out_dir.parent / "bundle.zip").manifest.researcher


def open_review(state: NodeState, run: LocalRun, detail: str) -> LocalRun:
    """Park a run whose outputs are held in the review queue (``awaiting_review``)."""
    return state.hold_for_review(run.run_id, study_researcher(run), detail)


def release_dir(out_dir: Path) -> Path:
    """The release folder to upload: the reviewed one when a reviewer released the run."""
    reviewed = Path(out_dir) / REVIEWED_DIR / "release"
    return reviewed if reviewed.is_dir() else Path(out_dir) / "release"


def _read_record(run: LocalRun) -> dict[str, Any]:
    path = run.out_dir / "run.json"
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReviewError(404, f"run {run.run_id}: run.json cannot be read ({exc})") from None
    return record


def _held_keys(record: Mapping[str, Any]) -> list[str]:
    """``cell:output`` of every output the node's check held for a reviewer."""
    return [
        f"{o['cell']}:{o['output']}"
        for o in record.get("outputs") or []
        if o.get("release") == "held"
    ]


def _identifier_found(reasons: list[str]) -> bool:
    return any(_IDENTIFIER_REASON.search(reason) for reason in reasons)


def _content(
    nb: Mapping[str, Any] | None, cell: int, index: int, out_dir: Path
) -> tuple[str, list[str]]:
    """What the reviewer reads for one executed output: text, a table, where an image is."""
    from phds_tre.check.checkers import text_of
    from phds_tre.check.text import strip_ansi

    if nb is None:
        return "(the executed notebook is no longer kept at the site)", []
    try:
        output = nb["cells"][cell]["outputs"][index]
    except (IndexError, KeyError, TypeError):
        return "(the executed notebook has no such output)", []

    def text(value: object) -> str:
        try:
            return strip_ansi(text_of(value))[0]
        except TypeError:
            return "(not text)"

    kind = output.get("output_type")
    if kind == "stream":
        return text(output.get("text", "")), []
    if kind == "error":
        lines = output.get("traceback") if isinstance(output.get("traceback"), list) else []
        trace = "\n".join(text(line) for line in lines)
        head = f"{output.get('ename', '?')}: {output.get('evalue', '')}"
        return head + ("\n" + trace if trace else ""), []
    data = output.get("data") if isinstance(output.get("data"), Mapping) else {}
    parts: list[str] = []
    files: list[str] = []
    if "text/plain" in data:
        parts.append(text(data["text/plain"]))
    for mime, suffix in _IMAGE_SUFFIX.items():
        if mime not in data:
            continue
        target = out_dir / REVIEW_FILES_DIR / f"cell_{cell}_output_{index}.{suffix}"
        try:
            raw = base64.b64decode("".join(text(data[mime]).split()), validate=True)
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(raw)
        except (binascii.Error, ValueError, OSError):
            parts.append(f"({mime} that could not be decoded)")
            continue
        files.append(str(target))
        parts.append(f"({mime} image: {target})")
    others = sorted(set(data) - {"text/plain", *_IMAGE_SUFFIX})
    if others:
        parts.append("(also: " + ", ".join(others) + ")")
    return "\n".join(parts) if parts else "(no text representation)", files


class ReviewQueue:
    """The review queue of one node (its ``work_dir``): list, show, decide, release."""

    def __init__(self, work_dir: str | Path) -> None:
        """Open the node's state and audit log under ``work_dir`` (made by ``phds node serve``)."""
        self.work_dir = Path(work_dir)
        if not (self.work_dir / "node.sqlite").is_file():
            raise ReviewError(404, f"{self.work_dir}: not a node working folder (no node.sqlite)")
        self.state = NodeState(self.work_dir / "node.sqlite")
        self.audit = AuditLog(self.work_dir / "audit.sqlite")

    # -- reading ---------------------------------------------------------------------
    def _run(self, run_id: str) -> LocalRun:
        run = self.state.get(run_id)
        if run is None:
            raise ReviewError(404, f"no run {run_id} at this node")
        if self.state.review(run_id) is None:
            raise ReviewError(404, f"run {run_id} was not held for review (it is {run.status})")
        return run

    def _summary(self, run: LocalRun, record: Mapping[str, Any] | None = None) -> RunSummary:
        review = self.state.review(run.run_id)
        assert review is not None  # callers only summarise runs with a review
        held = set(_held_keys(record if record is not None else _read_record(run)))
        decided = set(self.state.decisions(run.run_id))
        return RunSummary(
            run_id=run.run_id,
            study_id=run.study_id,
            status=run.status,
            researcher=review.researcher,
            held=len(held),
            decided=len(held & decided),
            opened_at=review.opened_at,
            released_by=review.released_by,
        )

    def list(self, *, include_released: bool = False) -> list[RunSummary]:
        """Runs awaiting review (with ``include_released``, every run ever held), oldest first."""
        runs = [r for r in self.state.runs() if self.state.review(r.run_id) is not None]
        if not include_released:
            runs = [r for r in runs if r.status == "awaiting_review"]
        return [self._summary(r) for r in runs]

    def show(self, run_id: str) -> RunReview:
        """Every output of a held run: verdict, reasons, kind, content, current decision."""
        run = self._run(run_id)
        record = _read_record(run)
        executed_path = run.out_dir / "executed.ipynb"
        nb = (
            json.loads(executed_path.read_text(encoding="utf-8"))
            if executed_path.is_file()
            else None
        )
        decisions = self.state.decisions(run_id)
        outputs = []
        for entry in record.get("outputs") or []:
            key = f"{entry['cell']}:{entry['output']}"
            content, files = _content(nb, int(entry["cell"]), int(entry["output"]), run.out_dir)
            reasons = [str(r) for r in entry.get("reasons") or []]
            stored = decisions.get(key)
            outputs.append(
                HeldOutput(
                    output=key,
                    output_type=str(entry.get("output_type")),
                    kind=str(entry.get("kind")),
                    verdict=str(entry.get("status")),
                    reasons=reasons,
                    release=entry.get("release"),
                    content=content,
                    files=files,
                    identifier_found=_identifier_found(reasons),
                    decision=stored.to_dict() if stored else None,
                )
            )
        return RunReview(self._summary(run, record), outputs)

    # -- deciding --------------------------------------------------------------------
    def _check_reviewer(self, run: LocalRun, reviewer: str) -> str:
        reviewer = _one_line(reviewer, 200)
        if not reviewer:
            raise ReviewError(422, "no reviewer name: give --reviewer or set PHDS_REVIEWER")
        review = self.state.review(run.run_id)
        if review is not None and _same_person(reviewer, review.researcher):
            raise ReviewError(
                403, f"{reviewer} is the study's author: authors cannot review their own study"
            )
        return reviewer

    def decide(
        self, run_id: str, output: str, decision: str, comment: str, reviewer: str
    ) -> StoredDecision:
        """Record (or change) ``reviewer``'s decision on ``output`` (``cell:output``)."""
        run = self._run(run_id)
        reviewer = self._check_reviewer(run, reviewer)
        if decision not in DECISIONS:
            raise ReviewError(422, f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
        if not _OUTPUT_KEY.fullmatch(output):
            raise ReviewError(422, f"output {output!r}: expected CELL:OUTPUT, e.g. 3:0")
        if run.status != "awaiting_review":
            raise ReviewError(409, f"run {run_id} is {run.status}: decisions are closed")
        record = _read_record(run)
        entry = next(
            (o for o in record.get("outputs") or [] if f"{o['cell']}:{o['output']}" == output),
            None,
        )
        if entry is None:
            raise ReviewError(404, f"run {run_id} has no output {output}")
        verdict = str(entry.get("status"))
        reasons = [str(r) for r in entry.get("reasons") or []]
        comment = _one_line(comment)
        if decision == "approve" and _identifier_found(reasons) and verdict == "fail":
            raise ReviewError(
                403,
                f"output {output} holds an identifier from the site's data: it cannot be "
                "approved (reject or redact it)",
            )
        needs = {
            ("approve", "fail"): "approving an output that failed the checks",
            ("reject", "pass"): "rejecting an output that passed the checks",
        }.get((decision, verdict))
        if verdict == "review":
            needs = f"a decision on an output with verdict review ({decision})"
        if needs and not comment:
            raise ReviewError(422, f"a comment is required for {needs}: give --comment")
        try:
            stored = self.state.decide(run_id, output, decision, comment, reviewer)
        except StateError as exc:  # released meanwhile
            raise ReviewError(409, str(exc)) from None
        self.audit.append(
            f"reviewer:{reviewer}",
            "review_decision",
            run_id,
            {
                "event": "output_decided",
                "output": output,
                "decision": decision,
                "verdict": verdict,
                "comment": comment,
            },
        )
        return stored

    def release(self, run_id: str, reviewer: str, comment: str = "") -> LocalRun:
        """Release a reviewed run: every held output decided; the agent builds and uploads it."""
        run = self._run(run_id)
        reviewer = self._check_reviewer(run, reviewer)
        if run.status != "awaiting_review":
            raise ReviewError(409, f"run {run_id} is {run.status}: it was already released")
        required = _held_keys(_read_record(run))
        try:
            released = self.state.release_review(run_id, reviewer, _one_line(comment), required)
        except StateError as exc:
            raise ReviewError(409, f"run {run_id} cannot be released: {exc}") from None
        decisions = self.state.decisions(run_id)
        self.audit.append(
            f"reviewer:{reviewer}",
            "release",
            run_id,
            {
                "event": "release_approved_by_reviewer",
                "comment": _one_line(comment),
                "decisions": {k: d.decision for k, d in sorted(decisions.items())},
            },
        )
        return released


def held_outputs(work_dir: str | Path, run_id: str) -> list[HeldOutput]:
    """The outputs of ``run_id`` that need a reviewer's decision (:meth:`ReviewQueue.show`)."""
    return [o for o in ReviewQueue(work_dir).show(run_id).outputs if o.needs_decision]


def decide(
    work_dir: str | Path,
    run_id: str,
    output: str,
    decision: str,
    comment: str = "",
    *,
    reviewer: str,
) -> StoredDecision:
    """:meth:`ReviewQueue.decide` on the node working folder ``work_dir``."""
    return ReviewQueue(work_dir).decide(run_id, output, decision, comment, reviewer)


def release(work_dir: str | Path, run_id: str, *, reviewer: str, comment: str = "") -> LocalRun:
    """:meth:`ReviewQueue.release` on the node working folder ``work_dir``."""
    return ReviewQueue(work_dir).release(run_id, reviewer, comment)


def format_review(review: RunReview) -> str:
    """``phds review show``: each held (or decided) output in full, the others one line each."""
    s = review.summary
    lines = [
        f"run {s.run_id}  study {s.study_id[:12]}  {s.status}  author {s.researcher}",
        f"{s.decided} of {s.held} held output(s) decided"
        + (f"; released by {s.released_by}" if s.released_by else ""),
    ]
    others = []
    for o in review.outputs:
        if not o.needs_decision and o.decision is None:
            others.append(f"  {o.output}  {o.verdict:6}  {o.release or '-':8}  {o.kind}")
            continue
        lines.append("")
        flag = "  (identifier of the site's data: cannot be approved)" if o.identifier_found else ""
        lines.append(f"output {o.output}  verdict {o.verdict}  {o.kind} ({o.output_type}){flag}")
        lines.extend(f"  rule: {r}" for r in o.reasons)
        lines.append("  content:")
        lines.extend("    " + line for line in o.content.splitlines() or [""])
        if o.decision:
            d = o.decision
            note = f" — {d['comment']}" if d["comment"] else ""
            lines.append(
                f"  decision: {d['decision']} by {d['reviewer']} at {d['decided_at']}{note}"
            )
        else:
            lines.append("  decision: (none yet)")
    if others:
        lines += ["", "other outputs (not held):", *others]
    return "\n".join(lines)


def _report_from(checked: Mapping[str, Any], record: Mapping[str, Any]) -> Any:
    """The check report the reviewer saw: run.json's outputs, verdicts as stored in checked.ipynb."""
    from phds_tre.check.notebook import NotebookReport, OutputReport, stored_verdict
    from phds_tre.check.verdict import Verdict

    outputs = []
    for entry in record.get("outputs") or []:
        cell, index = int(entry["cell"]), int(entry["output"])
        stored = stored_verdict(checked, cell, index) or {}
        cell_id = checked["cells"][cell].get("id")
        outputs.append(
            OutputReport(
                cell_index=cell,
                cell_id=cell_id if isinstance(cell_id, str) else None,
                output_index=index,
                output_type=str(entry["output_type"]),
                kind=str(entry["kind"]),
                verdict=Verdict(
                    entry["status"],
                    tuple(str(r) for r in entry.get("reasons") or []),
                    tuple(stored.get("redact") or ()),
                ),
            )
        )
    check = (checked.get("metadata") or {}).get("phds", {}).get("check", {})
    # Notebook-level findings (e.g. saved widget state) are failures; their reasons are kept.
    findings = tuple(str(r) for r in check.get("reasons") or ())
    return NotebookReport(
        tuple(outputs),
        Verdict.fail(*findings) if findings else Verdict.passed(),
        str(check.get("policy_hash", "")),
    )


def _shared(executed: Mapping[str, Any], release: Any, site_policy: Any) -> dict[str, Any]:
    """Shared results whose output the release carries, re-derived (no evidence)."""
    from phds_tre.kernel.share import SHARE_MIME
    from phds_tre.sdc import recheck

    shared: dict[str, Any] = {}
    for item in release.items:
        if item.state != "released":
            continue
        output = executed["cells"][item.cell_index]["outputs"][item.output_index]
        envelope = (output.get("data") or {}).get(SHARE_MIME)
        if not isinstance(envelope, Mapping):
            continue
        result = recheck(envelope.get("payload"), site_policy.disclosure)
        if result.output is not None and result.status != "fail":
            shared[str(envelope["name"])] = result.output.release_payload()
    return shared


def build_reviewed_release(
    state: NodeState, run: LocalRun, site_policy: Any, site_dir: Path, key_path: Path
) -> Path:
    """Rebuild, sign and write ``out/reviewed/release/`` with the reviewer's decisions.

    Idempotent: a reviewed release already written (the node crashed before uploading
    it) is returned as it is, never rebuilt — so the hub receives one release, byte
    for byte the one that was signed.
    """
    from phds_tre.release.manifest import write_release
    from phds_tre.release.notebook import build_release
    from phds_tre.release.signing import key_id, load_private_key
    from phds_tre.run import _write_json_atomic, site_identifier_index

    target = run.out_dir / REVIEWED_DIR / "release"
    if target.is_dir():
        return target
    review = state.review(run.run_id)
    if review is None or review.released_by is None:
        raise StateError(f"run {run.run_id} was not released by a reviewer")
    record = _read_record(run)
    executed = nbformat.read(run.out_dir / "executed.ipynb", as_version=4)
    checked = json.loads((run.out_dir / "checked.ipynb").read_text(encoding="utf-8"))
    report = _report_from(checked, record)
    decisions = state.decisions(run.run_id)
    keyed = {(int(k.split(":")[0]), int(k.split(":")[1])): d.decision for k, d in decisions.items()}
    index = site_identifier_index(Path(site_dir), site_policy.scan.identifier_columns)
    release = build_release(executed, report, site_policy, decisions=keyed, index=index)
    shared = _shared(executed, release, site_policy)
    key = load_private_key(key_path)
    fields = {
        "study_id": run.study_id,
        "run_id": record.get("run_id"),
        "site": record.get("site"),
        "notebook_sha256": (record.get("notebook") or {}).get("sha256"),
        "parameters": record.get("parameters"),
        "policy_hash": site_policy.hash,
        "disclosure_policy_hash": site_policy.disclosure.hash,
        "code_gate": (record.get("code_gate") or {}).get("status"),
        "verdicts": {f"{o['cell']}:{o['output']}": o["status"] for o in record["outputs"]},
        "decisions": {k: d.to_dict() for k, d in sorted(decisions.items())},
        "review": {
            "released_by": review.released_by,
            "released_at": review.released_at,
            "comment": review.release_comment,
            "checked_under_policy": record.get("policy_hash"),
        },
        "timings": dict(record.get("timings") or {}),
        "execution_status": (record.get("execution") or {}).get("status"),
    }
    path = write_release(run.out_dir / REVIEWED_DIR, release, fields, shared, key)
    # run.json keeps what the check left (``release``: held …) and adds the reviewed outcome.
    states = {f"{i.cell_index}:{i.output_index}": i.state for i in release.items}
    for out in record.get("outputs") or []:
        out["reviewed_release"] = states.get(f"{out['cell']}:{out['output']}")
    record["status"] = "released"
    record["review"] = fields["review"]
    record["reviewed_release"] = {
        "path": str(path.relative_to(run.out_dir)),
        "counts": dict(release.counts),
        "shared": sorted(shared),
        "key_id": key_id(key.public_key()),
    }
    _write_json_atomic(run.out_dir / "run.json", record)
    return path
