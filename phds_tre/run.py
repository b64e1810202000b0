"""One study notebook run at one site: gate → execute → check → release.

``phds run`` and the hospital node share this code path (DESIGN.md, principle 4:
same code, synthetic data locally, real data remotely). A :class:`SiteRun`
moves through stages, each a method with a clear lifecycle, and writes
``OUT/run.json`` after every stage, so a run that is interrupted still leaves a
record of how far it got:

``prepare``  read the notebook, validate parameters against its ``parameters`` cell
``gate``     the code gate reads the code before anything runs
``execute``  a fresh sandboxed kernel from the pool runs the notebook with papermill
``check``    every output gets a verdict (disclosure rules + data-aware scanning)
``release``  the node rebuilds each releasable output, signs and writes ``release/``

``OUT`` holds ``executed.ipynb`` (never leaves the site), ``checked.ipynb``
(verdicts in output metadata), ``run.json`` and ``release/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat

from phds_tre.site_policy import SitePolicy

__all__ = ["RunError", "SiteRun", "default_key_path", "notebook_sha256", "site_identifier_index"]

RUN_SCHEMA = "phds.run/1"
SHARE_MIME = "application/vnd.phds.share+json"


class RunError(Exception):
    """A run that cannot go on; the message is one line for the researcher."""


def notebook_sha256(path: Path) -> str:
    """sha256 of the notebook file's bytes, as submitted."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def default_key_path(site: str) -> Path:
    """Where a site's signing key lives unless one is given: ``$PHDS_HOME/keys/<site>.pem``."""
    home = Path(os.environ.get("PHDS_HOME", Path.home() / ".phds"))
    return home / "keys" / f"{site}.pem"


_INDEXES: dict[tuple[str, tuple[str, ...], tuple[tuple[str, int, int], ...]], Any] = {}


def site_identifier_index(site_dir: Path, columns: tuple[str, ...]) -> Any:
    """The site's identifier index, built once per site and data version.

    A node indexes its own data once, not per run: the cache key holds every
    Parquet file's name, size and modification time, so changed data is
    re-indexed.
    """
    from phds_tre.release.scan import IdentifierIndex

    files = tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(site_dir.glob("*.parquet"))
    )
    key = (str(site_dir.resolve()), tuple(columns), files)
    index = _INDEXES.get(key)
    if index is None:
        index = IdentifierIndex.from_site(site_dir, columns)
        _INDEXES.clear()  # one site per node: keep only the current one
        _INDEXES[key] = index
    return index


def _error_name(nb: nbformat.NotebookNode) -> str:
    """``cell N raised Name`` for the first error output, without its message."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index} raised {output.get('ename', 'an error')}"
    return "a cell raised an error"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON via a temporary file and rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, allow_nan=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class SiteRun:
    """A notebook run at one site without the network (the node adds the network around it)."""

    notebook_path: Path
    site_dir: Path
    out_dir: Path
    parameters: Mapping[str, object] = field(default_factory=dict)
    site_policy: SitePolicy = field(default_factory=SitePolicy)
    site_name: str | None = None
    key_path: Path | None = None
    approved: bool = False
    study_id: str | None = None
    #: The study's round (1, 2, ...) when run for the hub; recorded in the release manifest.
    round: int | None = None
    progress: Callable[[str, int, int], None] | None = None
    echo: Callable[[str], None] = print
    pool: Any = None  # a phds_tre.execute.pool.KernelPool; one is made (size 1) when absent

    record: dict[str, Any] = field(default_factory=dict, init=False)
    _t0: float = field(default=0.0, init=False)

    # -- lifecycle --------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every stage; return ``run.json``'s content. Never raises for a run's own outcome.

        Bad input (unreadable notebook, wrong parameters, unreadable site data)
        raises :class:`RunError` after recording it in ``run.json``.
        """
        self._t0 = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.site_name = self.site_name or self.site_dir.name
        self.record = {
            "schema": RUN_SCHEMA,
            "run_id": uuid.uuid4().hex,
            "study_id": self.study_id,
            "site": self.site_name,
            "status": "running",
            "stage": "prepare",
            "started": _now(),
            "finished": None,
            "notebook": {"path": str(self.notebook_path)},
            "parameters": {},
            "policy_hash": self.site_policy.hash,
            "disclosure_policy_hash": self.site_policy.disclosure.hash,
            "code_gate": None,
            "execution": None,
            "outputs": [],
            "release": None,
            "error": None,
            "timings": {},
        }
        self._save()
        try:
            nb = self.prepare()
            if not self.gate(nb):
                return self._finish()
            executed = self.execute(nb)
            if executed is None:
                return self._finish()
            report, rechecks = self.check(executed)
            self.release(executed, report, rechecks)
        except RunError as exc:
            self.record["status"] = "error"
            self.record["error"] = str(exc)
            self._finish()
            raise
        except OSError as exc:  # e.g. a full disk: recorded, and no release was presented
            self.record["status"] = "error"
            self.record["error"] = f"{type(exc).__name__}: {exc}"
            self._finish()
            raise RunError(f"the run could not write its files: {exc}") from None
        return self._finish()

    def _stage(self, name: str) -> float:
        self.record["stage"] = name
        self._save()
        return time.monotonic()

    def _timed(self, name: str, start: float) -> None:
        self.record["timings"][f"{name}_s"] = round(time.monotonic() - start, 4)

    def _save(self) -> None:
        _write_json_atomic(self.out_dir / "run.json", self.record)

    def _finish(self) -> dict[str, Any]:
        self.record["finished"] = _now()
        self.record["timings"]["total_s"] = round(time.monotonic() - self._t0, 4)
        self._save()
        return self.record

    # -- stages -----------------------------------------------------------------
    def prepare(self) -> nbformat.NotebookNode:
        """Read the notebook and validate the parameters (unknown names and wrong types are errors)."""
        from phds_tre.check.notebook import NotebookError, read_notebook
        from phds_tre.execute.parameters import ParameterError, validate_parameters

        start = self._stage("prepare")
        try:
            nb = read_notebook(self.notebook_path)
        except NotebookError as exc:
            raise RunError(str(exc)) from None
        self.record["notebook"]["sha256"] = notebook_sha256(self.notebook_path)
        try:
            values = validate_parameters(nb, dict(self.parameters))
        except ParameterError as exc:
            raise RunError(str(exc)) from None
        self.record["parameters"] = values
        self._values = values
        if not self.site_dir.is_dir():
            raise RunError(f"{self.site_dir}: no such site data folder")
        self._timed("prepare", start)
        return nb

    def gate(self, nb: nbformat.NotebookNode) -> bool:
        """The code gate; False when the run stops here (blocked, or awaiting approval)."""
        from phds_tre.execute.codegate import code_gate

        start = self._stage("gate")
        result = code_gate(nb, self.site_policy.code_gate)
        self.record["code_gate"] = result.to_dict()
        self._timed("gate", start)
        if result.status == "blocked":
            self.record["status"] = "blocked"
            self.echo(f"code gate: blocked — {result.summary()}")
            return False
        if result.status == "needs_approval" and not self.approved:
            self.record["status"] = "awaiting_approval"
            self.echo(
                f"code gate: needs the site's approval — {result.summary()} "
                "(a site admin approves with --approved)"
            )
            return False
        return True

    def execute(self, nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
        """Run in a fresh sandboxed kernel; None when there is nothing to check (killed, timeout…)."""
        from phds_tre.execute.engine import execute_notebook
        from phds_tre.execute.pool import KernelPool

        start = self._stage("execute")
        run_dir = self.out_dir / "work"
        run_dir.mkdir(exist_ok=True)
        env = {
            "PHDS_SITE_DIR": str(self.site_dir.resolve()),
            "PHDS_SITE_NAME": str(self.site_name),
            "PHDS_RUN_DIR": str(run_dir.resolve()),
            "PHDS_POLICY_JSON": json.dumps(self.site_policy.disclosure.to_dict()),
        }
        own_pool = self.pool is None
        pool = self.pool or KernelPool(
            size=1,
            limits=self.site_policy.limits,
            site_env={k: env[k] for k in ("PHDS_SITE_DIR", "PHDS_SITE_NAME")},
        )
        try:
            kernel = pool.acquire(run_dir, env)
            total = len(nb.cells)

            def cell_done(done: int, of: int) -> None:
                if self.progress is not None:
                    self.progress(str(self.site_name), done, of or total)

            execution = execute_notebook(
                nb, self._values, kernel, self.site_policy.limits, progress=cell_done
            )
        except Exception as exc:  # the sandbox could not start: recorded, nothing executed
            self.record["status"] = "error"
            self.record["error"] = f"the sandboxed kernel could not start: {exc}"
            self._timed("execute", start)
            return None
        finally:
            if own_pool:
                pool.close()
        self.record["execution"] = execution.to_dict()
        if execution.status == "failed":
            # The exception's message can hold data (an identifier in a KeyError): run.json
            # names the exception only; the message stays in executed.ipynb at the site.
            self.record["execution"]["error"] = _error_name(execution.notebook)
        self._timed("execute", start)
        nbformat.write(execution.notebook, self.out_dir / "executed.ipynb")
        self._verify_sources(nb, execution.notebook)
        if execution.status in ("timeout", "killed", "oom"):
            # Outputs of a run that did not end by itself are not released.
            self.record["status"] = execution.status
            self.record["error"] = execution.error
            return None
        return execution.notebook

    def _verify_sources(
        self, submitted: nbformat.NotebookNode, executed: nbformat.NotebookNode
    ) -> None:
        """The executed notebook holds the submitted code, plus only papermill's parameters cell."""

        def text(source: str | list[str]) -> str:  # nbformat allows a source as a list of lines
            return source if isinstance(source, str) else "".join(source)

        ran = [
            text(c.source)
            for c in executed.cells
            if "injected-parameters" not in c.get("metadata", {}).get("tags", [])
        ]
        if ran != [text(c.source) for c in submitted.cells]:
            raise RunError("the executed notebook's cells differ from the submitted notebook")

    def check(self, executed: nbformat.NotebookNode) -> tuple[Any, dict[tuple[int, int], Any]]:
        """Verdict for every output: disclosure rules, structured re-checks, identifier scanning."""
        from phds_tre.check.notebook import check_notebook, save_notebook, write_verdicts
        from phds_tre.sdc import MIME_TYPE, recheck

        start = self._stage("check")
        index = site_identifier_index(self.site_dir, self.site_policy.scan.identifier_columns)
        policy = self.site_policy.disclosure
        # Each structured payload is re-checked once: the checker's re-check is kept
        # (by payload object) and handed to the release builder.
        seen: dict[int, Any] = {}

        def remembered(payload: dict[str, Any], site: Any) -> Any:
            result = recheck(payload, site)
            seen[id(payload)] = result
            return result

        report = check_notebook(executed, policy, recheck=remembered, scanner=index)
        checked = write_verdicts(nbformat.from_dict(json.loads(json.dumps(executed))), report)
        save_notebook(checked, self.out_dir / "checked.ipynb")
        rechecks: dict[tuple[int, int], Any] = {}
        for entry in report.outputs:
            data = executed.cells[entry.cell_index].outputs[entry.output_index].get("data") or {}
            envelope = data.get(SHARE_MIME)
            payload = data.get(MIME_TYPE)
            if payload is None and isinstance(envelope, dict):
                payload = envelope.get("payload")
            if isinstance(payload, dict) and id(payload) in seen:
                rechecks[(entry.cell_index, entry.output_index)] = seen[id(payload)]
        self.record["outputs"] = [
            {
                "cell": o.cell_index,
                "output": o.output_index,
                "output_type": o.output_type,
                "kind": o.kind,
                "status": o.status,
                "reasons": list(o.verdict.reasons),
            }
            for o in report.outputs
        ]
        self.record["verdict"] = report.status
        self._timed("check", start)
        self._index = index
        return report, rechecks

    def release(
        self, executed: nbformat.NotebookNode, report: Any, rechecks: Mapping[tuple[int, int], Any]
    ) -> None:
        """Rebuild every releasable output, collect shared results, sign and write ``release/``."""
        from phds_tre.release.manifest import write_release
        from phds_tre.release.notebook import build_release
        from phds_tre.release.signing import KeyFileError, generate_key, key_id, load_private_key

        start = self._stage("release")
        release = build_release(executed, report, self.site_policy, rechecks, index=self._index)
        shared = self._shared(executed, report)
        key_path = self.key_path or default_key_path(str(self.site_name))
        if not key_path.exists():
            key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            generate_key(key_path)
            self.echo(f"created the site signing key {key_path} (public key beside it)")
        try:
            key = load_private_key(key_path)
        except KeyFileError as exc:
            raise RunError(str(exc)) from None
        states = {(i.cell_index, i.output_index): i.state for i in release.items}
        for out in self.record["outputs"]:
            out["release"] = states.get((out["cell"], out["output"]))
        fields = {
            "study_id": self.study_id,
            "run_id": self.record["run_id"],
            "site": self.site_name,
            "notebook_sha256": self.record["notebook"]["sha256"],
            "parameters": self.record["parameters"],
            "policy_hash": self.site_policy.hash,
            "disclosure_policy_hash": self.site_policy.disclosure.hash,
            "code_gate": (self.record["code_gate"] or {}).get("status"),
            "verdicts": {f"{o['cell']}:{o['output']}": o["status"] for o in self.record["outputs"]},
            "decisions": {},
            "timings": dict(self.record["timings"]),
            "execution_status": (self.record["execution"] or {}).get("status"),
        }
        if self.round is not None:
            fields["round"] = self.round
        path = write_release(self.out_dir, release, fields, shared, key)
        counts = dict(release.counts)
        self.record["release"] = {
            "path": str(path.relative_to(self.out_dir)),
            "counts": counts,
            "shared": sorted(shared),
            "key_id": key_id(key.public_key()),
        }
        held = counts.get("held", 0)
        execution_status = (self.record["execution"] or {}).get("status")
        if execution_status == "failed":
            self.record["status"] = "failed"
            self.record["error"] = (self.record["execution"] or {}).get("error")
        else:
            self.record["status"] = "awaiting_review" if held else "released"
        self._timed("release", start)

    def _shared(self, executed: nbformat.NotebookNode, report: Any) -> dict[str, dict[str, Any]]:
        """``share()``d results whose output releases automatically, re-derived (no evidence)."""
        from phds_tre.sdc import recheck

        auto = set(self.site_policy.release.auto_release)
        shared: dict[str, dict[str, Any]] = {}
        for entry in report.outputs:
            if entry.status not in auto or entry.status == "fail":
                continue
            output = executed.cells[entry.cell_index].outputs[entry.output_index]
            envelope = (output.get("data") or {}).get(SHARE_MIME)
            if not isinstance(envelope, dict):
                continue
            result = recheck(envelope.get("payload"), self.site_policy.disclosure)
            if result.output is None or result.status not in auto:
                continue
            shared[str(envelope["name"])] = result.output.release_payload()
        return shared
