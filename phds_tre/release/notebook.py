"""The release notebook: what leaves the hospital, rebuilt by the node from checked outputs.

DESIGN.md principles 1 and 3: the kernel is untrusted, so nothing it wrote is
copied into a release. Cells keep the researcher's source (and execution
counts); every output is either

* **released** — rebuilt by the node from the checked representation: a
  structured output from its re-check (``release_payload()`` without
  evidence, HTML and text regenerated), a stream or ``text/plain`` as the text
  the checker read (terminal escapes removed), an error as its name only,
  and HTML, images and other rich output only when a reviewer approved them
  (images re-encoded from their pixels, so metadata chunks do not travel);
  the only metadata it carries is ``metadata.phds.release = "released"``
  (display and execute results only: nbformat forbids metadata on streams
  and errors);
* or a **placeholder** (a ``display_data`` with a ``text/plain`` explanation)
  whose ``metadata.phds.release`` is ``"held"`` (awaiting review) or
  ``"withheld"`` (failed, rejected or redacted). The reason never quotes
  the withheld content: reasons come from a fixed set of sentences, not from
  the checker's verdict (whose reasons may quote numbers found in the text).

Reviewer decisions are ``"approve"``, ``"reject"`` or ``"redact"``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import nbformat
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output, new_raw_cell

from phds_tre.check.checkers import REGISTRY, text_of
from phds_tre.check.notebook import NotebookReport, OutputReport
from phds_tre.check.structured import STRUCTURED_MIME
from phds_tre.check.text import strip_ansi
from phds_tre.check.verdict import Status, as_status, worst
from phds_tre.kernel.share import NAME_PATTERN as _SHARE_NAME
from phds_tre.kernel.share import SHARE_MIME
from phds_tre.site_policy import SitePolicy

if TYPE_CHECKING:
    from phds_tre.release.scan import IdentifierIndex
    from phds_tre.sdc.output import Recheck

__all__ = [
    "DECISIONS",
    "ReleaseError",
    "ReleaseItem",
    "ReleaseNotebook",
    "ReleaseState",
    "build_release",
]

ReleaseState = Literal["released", "held", "withheld"]
#: What a reviewer can decide about one output.
DECISIONS = ("approve", "reject", "redact")
OutputKey = tuple[int, int]

#: Representations released without a reviewer when the verdict auto-releases.
_TEXT_MIMES = ("text/plain", "text/markdown")
#: Representations released only with a reviewer's approval (all understood by the checker).
_APPROVAL_MIMES = frozenset(
    {
        "text/html",
        "text/latex",
        "application/json",
        "image/svg+xml",
        "image/png",
        "image/jpeg",
        "image/gif",
    }
)
_IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF"}
_ENAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
_STREAMS = ("stdout", "stderr")


class ReleaseError(ValueError):
    """A release that cannot be built as asked (unknown decision, report of another notebook)."""


# Every reason a placeholder or an item can give: fixed sentences, never output content.
_REASONS = {
    "passed": "passed the site's checks",
    "approved": "approved by the site's reviewer",
    "error_name": "passed the site's checks; only the error name is released",
    "review": "awaiting review by the site (verdict: review)",
    "review_all": "awaiting review by the site (the site reviews every output)",
    "rich": (
        "awaiting review by the site: HTML, images and other rich output are released "
        "only with a reviewer's approval"
    ),
    "fail": "withheld: it failed the site's disclosure checks",
    "fail_approved": (
        "released as an exception: it failed a disclosure rule and the site's reviewer "
        "approved it with a stated reason"
    ),
    "tampered": (
        "withheld: the kernel's structured output did not match the site's re-check "
        "(a reviewer cannot release it)"
    ),
    "rejected": "rejected by the site's reviewer",
    "redacted": "redacted by the reviewer",
    "no_verdict": "withheld: the checker has no verdict for this output",
    "not_rebuilt": "withheld: the structured output could not be rebuilt from its evidence",
    "not_understood": "withheld: it holds a representation the checker does not understand",
    "bad_image": "withheld: the image could not be re-encoded from its pixels",
    "bad_error": "withheld: the error name is not a plain Python identifier",
    "unknown_type": "withheld: output type not understood",
}


@dataclass(frozen=True)
class ReleaseItem:
    """What happened to one output: its verdict, the reviewer's decision, and the release state."""

    cell_index: int
    output_index: int
    output_type: str
    kind: str
    verdict: str
    decision: str | None
    state: ReleaseState
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the manifest)."""
        return asdict(self)


@dataclass(frozen=True)
class ReleaseNotebook:
    """The release notebook and one :class:`ReleaseItem` per output of the executed notebook."""

    notebook: NotebookNode
    items: tuple[ReleaseItem, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Number of outputs released, held and withheld (every state present)."""
        counts = {"released": 0, "held": 0, "withheld": 0}
        for item in self.items:
            counts[item.state] += 1
        return counts

    def item(self, cell_index: int, output_index: int) -> ReleaseItem:
        """The item of one output; ``KeyError`` when there is none."""
        for item in self.items:
            if (item.cell_index, item.output_index) == (cell_index, output_index):
                return item
        raise KeyError((cell_index, output_index))

    def output(self, cell_index: int, output_index: int) -> NotebookNode:
        """The released output or placeholder standing for one output of the executed notebook."""
        found: NotebookNode = self.notebook.cells[cell_index].outputs[output_index]
        return found

    def dumps(self) -> str:
        """The release notebook as nbformat v4 JSON."""
        text: str = nbformat.writes(self.notebook, version=4)
        return text


def build_release(
    executed_nb: Mapping[str, Any],
    report: NotebookReport,
    site_policy: SitePolicy,
    rechecks: Mapping[OutputKey, Recheck] | None = None,
    decisions: Mapping[OutputKey, str] | None = None,
    *,
    index: IdentifierIndex | None = None,
) -> ReleaseNotebook:
    """Build the release notebook of an executed, checked notebook.

    ``report`` is the checker's report of ``executed_nb`` (verdicts stored in
    the notebook's metadata are never read: the kernel could have written
    them). ``rechecks`` are the structured re-checks by (cell, output); any
    missing is re-run here with ``site_policy.disclosure``. ``decisions`` are
    the reviewer's, by (cell, output). With ``index``, every released form is
    scanned for the site's identifiers once more and withheld on a hit.
    """
    rechecks = rechecks or {}
    decisions = dict(decisions or {})
    cells = list(executed_nb.get("cells") or [])
    existing = {
        (c, o)
        for c, cell in enumerate(cells)
        if cell.get("cell_type") == "code"
        for o in range(len(cell.get("outputs") or []))
    }
    for key, decision in decisions.items():
        if decision not in DECISIONS:
            raise ReleaseError(
                f"decision for {key}: {decision!r} is not one of {', '.join(DECISIONS)}"
            )
        if key not in existing:
            raise ReleaseError(f"decision for {key}: the notebook has no such output")
    verdicts: dict[OutputKey, OutputReport] = {}
    for entry in report.outputs:
        key = (entry.cell_index, entry.output_index)
        if key not in existing:
            raise ReleaseError(f"the report names output {key}, which the notebook does not have")
        verdicts[key] = entry

    builder = _Builder(site_policy, rechecks, decisions, index, max_count=len(cells))
    nb = new_notebook(metadata=_notebook_metadata(executed_nb.get("metadata") or {}))
    for c, cell in enumerate(cells):
        nb.cells.append(builder.cell(c, cell, verdicts))
    release = ReleaseNotebook(nb, tuple(builder.items))
    nb.metadata["phds"] = {"release": {"counts": release.counts, "policy_hash": site_policy.hash}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            nbformat.validate(nb)
        except nbformat.ValidationError as exc:  # pragma: no cover - a bug in this module
            raise ReleaseError(f"the release notebook would not be valid: {exc.message}") from None
    return release


def _notebook_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Only the kernel's name: ``language_info`` comes from the (untrusted) kernel, widgets too."""
    kept: dict[str, Any] = {}
    spec = metadata.get("kernelspec")
    if isinstance(spec, Mapping):
        plain = {
            k: spec[k] for k in ("name", "display_name", "language") if isinstance(spec.get(k), str)
        }
        if "name" in plain and "display_name" in plain:
            kept["kernelspec"] = {k: v[:100] for k, v in plain.items()}
    info = metadata.get("language_info")
    name = info.get("name") if isinstance(info, Mapping) else None
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_+\-]{0,39}", name):
        kept["language_info"] = {"name": name}
    return kept


def _cell_metadata(cell: Mapping[str, Any]) -> dict[str, Any]:
    tags = (cell.get("metadata") or {}).get("tags")
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        return {"tags": list(tags)}
    return {}


def _source(cell: Mapping[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _cell_id(cell: Mapping[str, Any]) -> dict[str, Any]:
    cell_id = cell.get("id")
    return {"id": cell_id} if isinstance(cell_id, str) else {}


class _Builder:
    """Builds cells and outputs, collecting one :class:`ReleaseItem` per output."""

    def __init__(
        self,
        site_policy: SitePolicy,
        rechecks: Mapping[OutputKey, Recheck],
        decisions: Mapping[OutputKey, str],
        index: IdentifierIndex | None,
        max_count: int,
    ) -> None:
        self.policy = site_policy
        self.rechecks = rechecks
        self.decisions = decisions
        self.index = index
        self.max_count = max_count
        self.items: list[ReleaseItem] = []

    def count(self, value: object) -> int | None:
        """An execution count kept only when plausible: the kernel chooses it, and a count is a number."""
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= self.max_count:
            return value
        return None

    def cell(
        self, c: int, cell: Mapping[str, Any], verdicts: Mapping[OutputKey, OutputReport]
    ) -> NotebookNode:
        cell_type = cell.get("cell_type")
        metadata = _cell_metadata(cell)
        if cell_type == "markdown":
            new = new_markdown_cell(_source(cell), metadata=metadata, **_cell_id(cell))
            if isinstance(cell.get("attachments"), Mapping):
                new.attachments = copy.deepcopy(dict(cell["attachments"]))
            return new
        if cell_type != "code":
            return new_raw_cell(_source(cell), metadata=metadata, **_cell_id(cell))
        outputs = [
            self.output((c, o), output, verdicts.get((c, o)))
            for o, output in enumerate(cell.get("outputs") or [])
        ]
        return new_code_cell(
            _source(cell),
            metadata=metadata,
            execution_count=self.count(cell.get("execution_count")),
            outputs=outputs,
            **_cell_id(cell),
        )

    def output(
        self, key: OutputKey, output: Mapping[str, Any], entry: OutputReport | None
    ) -> NotebookNode:
        output_type = str(output.get("output_type"))
        decision = self.decisions.get(key)
        raw_data = output.get("data")
        data: Mapping[str, Any] = raw_data if isinstance(raw_data, Mapping) else {}
        displayed = output_type in ("display_data", "execute_result")
        structured = displayed and STRUCTURED_MIME in data
        shared = displayed and not structured and SHARE_MIME in data
        recheck = None
        if structured:
            recheck = self._recheck(key, data[STRUCTURED_MIME])
        elif shared:
            envelope = data[SHARE_MIME]
            payload = envelope.get("payload") if isinstance(envelope, Mapping) else None
            recheck = self._recheck(key, payload)
            structured = True  # a shared result is a structured output inside an envelope
        kind = entry.kind if entry is not None else "unknown"
        if structured:
            own_kind = getattr(getattr(recheck, "output", None), "kind", None)
            kind = f"structured/{own_kind}" if isinstance(own_kind, str) else "structured"

        def item(
            state: ReleaseState, reason: str, verdict: str, released: NotebookNode | None = None
        ) -> NotebookNode:
            self.items.append(
                ReleaseItem(key[0], key[1], output_type, kind, verdict, decision, state, reason)
            )
            return released if released is not None else _placeholder(state, reason)

        if entry is None or entry.output_type != output_type:
            return item("withheld", _REASONS["no_verdict"], "none")
        status: Status = entry.status
        if recheck is not None:
            status = worst([status, as_status(recheck.status) or "fail"])
        elif structured:
            status = "fail"  # the payload could not be re-checked at all
        if decision == "reject":
            return item("withheld", _REASONS["rejected"], status)
        if decision == "redact":
            return item("withheld", _REASONS["redacted"], status)
        approved = decision == "approve"
        # A reviewer may release a failed output as an exception (SDC practice: a rule
        # can be too strict for one output; the comment says why). What the site cannot
        # rebuild or re-check, and any identifier of the site's data, stays withheld.
        if status == "fail" and not approved:
            return item("withheld", _REASONS["fail"], status)
        if status == "fail" and recheck is not None and (recheck.output is None or recheck.notes):
            # The kernel's payload disagreed with the site's re-check (or could not be
            # re-checked): a sign of tampering, never an exception a reviewer can grant.
            return item("withheld", _REASONS["tampered"], status)
        if not approved and status not in self.policy.release.auto_release:
            return item("held", _REASONS["review" if status == "review" else "review_all"], status)

        rebuilt = self._rebuild(output_type, output, data, recheck, approved)
        if isinstance(rebuilt, str):
            return item("held" if rebuilt == "rich" else "withheld", _REASONS[rebuilt], status)
        if self.index is not None:
            hits = self.index.scan_output(rebuilt)
            if hits:
                columns = ", ".join(sorted({hit.column for hit in hits}))
                reason = f"withheld: a value from the site's data was found ({columns})"
                return item("withheld", reason, "fail")
        if approved:
            reason = _REASONS["fail_approved" if status == "fail" else "approved"]
        elif output_type == "error":
            reason = _REASONS["error_name"]
        else:
            reason = _REASONS["passed"]
        return item("released", reason, status, rebuilt)

    def _recheck(self, key: OutputKey, payload: object) -> Recheck | None:
        found = self.rechecks.get(key)
        if found is not None:
            return found
        from phds_tre.sdc.output import recheck

        try:
            return recheck(payload, self.policy.disclosure)
        except Exception:  # an untrusted payload that crashes the re-check is not understood
            return None

    def _rebuild(
        self,
        output_type: str,
        output: Mapping[str, Any],
        data: Mapping[str, Any],
        recheck: Recheck | None,
        approved: bool,
    ) -> NotebookNode | str:
        """The released form of one output, or the key of the reason it cannot be released."""
        if output_type == "stream":
            name = output.get("name") if output.get("name") in _STREAMS else "stdout"
            try:
                text = strip_ansi(text_of(output.get("text", "")))[0]
            except TypeError:
                return "not_understood"
            return new_output("stream", name=name, text=text)
        if output_type == "error":
            ename = output.get("ename")
            if not isinstance(ename, str) or not _ENAME.fullmatch(ename):
                return "bad_error"
            evalue, traceback = "", []
            if approved:
                evalue = strip_ansi(str(output.get("evalue", "")))[0]
                lines = output.get("traceback")
                traceback = (
                    [strip_ansi(str(line))[0] for line in lines] if isinstance(lines, list) else []
                )
            return new_output("error", ename=ename, evalue=evalue, traceback=traceback)
        if output_type not in ("display_data", "execute_result"):
            return "unknown_type"
        if STRUCTURED_MIME in data:
            rebuilt = _structured(recheck)
            if rebuilt is None:
                return "not_rebuilt"
        elif SHARE_MIME in data:
            rebuilt = _shared(data[SHARE_MIME], recheck)
            if rebuilt is None:
                return "not_rebuilt"
        else:
            rebuilt_or_reason = _unstructured(data, approved)
            if isinstance(rebuilt_or_reason, str):
                return rebuilt_or_reason
            rebuilt = rebuilt_or_reason
        metadata = {"phds": {"release": "released"}}
        if output_type == "execute_result":
            return new_output(
                "execute_result",
                data=rebuilt,
                metadata=metadata,
                execution_count=self.count(output.get("execution_count")),
            )
        return new_output("display_data", data=rebuilt, metadata=metadata)


def _placeholder(state: ReleaseState, reason: str) -> NotebookNode:
    text = f"[phds] This output was {state} by the site: {reason}."
    return new_output(
        "display_data",
        data={"text/plain": text},
        metadata={"phds": {"release": state, "reason": reason}},
    )


def _structured(recheck: Recheck | None) -> dict[str, Any] | None:
    """The structured output rebuilt from its re-check: payload without evidence, HTML, text."""
    output = getattr(recheck, "output", None)
    if output is None:
        return None
    try:
        payload = json.loads(json.dumps(output.release_payload(), allow_nan=False))
        return {
            STRUCTURED_MIME: payload,
            "text/html": output._repr_html_(),
            "text/plain": repr(output),
        }
    except Exception:  # a re-derived output that cannot be shown cannot be released
        return None


def _shared(envelope: object, recheck: Recheck | None) -> dict[str, Any] | None:
    """A shared result rebuilt from its re-check: a new envelope around the payload without evidence.

    The checker has validated the envelope (schema, version, name); only the
    name is carried over from the kernel, everything else is the site's.
    """
    output = getattr(recheck, "output", None)
    name = envelope.get("name") if isinstance(envelope, Mapping) else None
    if output is None or not isinstance(name, str) or not _SHARE_NAME.fullmatch(name):
        return None
    try:
        payload = json.loads(json.dumps(output.release_payload(), allow_nan=False))
    except Exception:  # a re-derived output that cannot be published cannot be released
        return None
    return {
        SHARE_MIME: {"schema": "phds.share", "version": 1, "name": name, "payload": payload},
        "text/plain": f"shared result {name!r}: a {output.kind} output, checked by the site",
    }


def _unstructured(data: Mapping[str, Any], approved: bool) -> dict[str, Any] | str:
    """The checked representations of a MIME bundle, or the key of the reason they cannot be."""
    rebuilt: dict[str, Any] = {}
    needs_approval = False
    for mime, value in data.items():
        if mime not in REGISTRY or (mime not in _TEXT_MIMES and mime not in _APPROVAL_MIMES):
            return "not_understood"
        if mime in _APPROVAL_MIMES:
            needs_approval = True
            if not approved:
                continue
        try:
            if mime in _IMAGE_FORMATS:
                image = _reencode(mime, text_of(value))
                if image is None:
                    return "bad_image"
                rebuilt[mime] = image
            elif mime == "application/json":
                rebuilt[mime] = json.loads(json.dumps(value, allow_nan=False))
            elif mime == "text/plain":
                rebuilt[mime] = strip_ansi(text_of(value))[0]
            else:
                rebuilt[mime] = text_of(value)
        except (TypeError, ValueError):
            return "not_understood"
    if needs_approval and not approved:
        return "rich"
    return rebuilt


def _reencode(mime: str, value: str) -> str | None:
    """A bitmap re-encoded from its pixels (no text chunks, EXIF, ICC profile or comments)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(re.sub(r"\s+", "", value), validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            if image.format != _IMAGE_FORMATS[mime]:
                return None
            image.load()
            clean = image.convert("RGBA") if "transparency" in image.info else image.copy()
            if mime == "image/jpeg" and clean.mode not in ("RGB", "L", "CMYK"):
                clean = clean.convert("RGB")
            clean.info = {}
            out = io.BytesIO()
            clean.save(out, format=_IMAGE_FORMATS[mime])
    except (
        binascii.Error,
        ValueError,
        OSError,
        UnidentifiedImageError,
        Image.DecompressionBombError,
    ):
        return None
    return base64.b64encode(out.getvalue()).decode("ascii")
