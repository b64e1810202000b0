"""The hospital node: claims runs from the hub, runs them at the site, uploads the release.

:class:`NodeAgent` makes outbound HTTPS requests only. Each turn of :meth:`NodeAgent.run_once`
long-polls ``POST /nodes/next`` (so a queued run starts within a fraction of a second),
downloads and verifies the study bundle against the researcher keys the site admin
accepted, runs it with :class:`~phds_tre.run.SiteRun` on a kernel from the agent's
:class:`~phds_tre.execute.pool.KernelPool`, reports status and progress, and uploads the
signed ``release/`` folder (zip). Every step is recorded in the node's local state
(:class:`~phds_tre.node.state.NodeState`) before the hub is told, so after a crash the
agent resumes: an interrupted run is re-run once (then marked failed), a built release is
uploaded (a 409 "already has a release" counts as done), and a status the hub was never
told is reported. While the hub is away every request is retried with exponential
back-off and jitter; the agent never crashes on the network.

A run with outputs held for review uploads nothing: it waits in the site's review queue
(:mod:`phds_tre.node.review`; the hub sees ``awaiting_review``) until a reviewer has
decided every held output and released it; then the agent rebuilds the release with the
decisions, signs it and uploads it once. Executed notebooks of finished runs are deleted
after the site's retention period (:mod:`phds_tre.node.retention`), at start and hourly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nbformat
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from phds_tre.audit import AuditLog
from phds_tre.bundle import BundleError, StudyBundle, read_bundle
from phds_tre.execute.parameters import ParameterError, validate_parameters
from phds_tre.node.state import ACTIVE, LocalRun, NodeState
from phds_tre.rounds import RoundError, verify_round
from phds_tre.run import RunError, SiteRun
from phds_tre.site_policy import SitePolicy

__all__ = [
    "HubRefused",
    "HubUnavailable",
    "NodeAgent",
    "Stopped",
    "approve_run",
    "reject_run",
    "zip_release",
]

log = logging.getLogger("phds_tre.node")

#: Longest reason sent to the hub or logged.
_REASON_CHARS = 500
#: Local statuses of a run that was executed and checked at this site.
_RAN = frozenset({"awaiting_review", "reviewed", "releasing", "uploaded"})
#: Local statuses in which a run waits for a person at the site.
_AWAITING_PERSON = ("awaiting_review", "awaiting_approval")
#: Long-poll wait (s) while a run waits for a person, so their decision is acted on soon.
_PERSON_POLL_S = 1


class HubUnavailable(Exception):
    """The hub did not answer (connection refused, timeout, 5xx)."""


class HubRefused(Exception):
    """The hub answered with a refusal (4xx)."""

    def __init__(self, status: int, reason: str) -> None:
        """``status``: the HTTP status; ``reason``: the hub's one-line reason."""
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class Stopped(Exception):
    """The agent was asked to stop while waiting for the hub."""


def _one_line(text: str, limit: int = _REASON_CHARS) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def zip_release(release_dir: Path) -> bytes:
    """The files of ``release_dir`` as zip bytes (paths relative to it, sorted, fixed times)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in release_dir.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(release_dir).as_posix(), (1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def _gate_summary(record: Mapping[str, Any]) -> str:
    """``code gate blocked: cell 2 line 1 network (reason); …`` from run.json's code_gate."""
    gate = record.get("code_gate") or {}
    findings = [f for f in gate.get("findings", []) if f.get("action") != "allow"]
    parts = [
        f"cell {f.get('cell')} line {f.get('line')} {f.get('category')} ({f.get('reason')})"
        for f in findings[:5]
    ]
    more = f"; and {len(findings) - 5} more" if len(findings) > 5 else ""
    return _one_line(f"code gate {gate.get('status', '?')}: " + "; ".join(parts) + more)


@dataclass
class _NodeRun(SiteRun):
    """A :class:`SiteRun` that tells the agent when execution and checking start."""

    on_stage: Callable[[str, int], None] | None = None

    def execute(self, nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
        """Report ``running`` (0 of the cells), then execute."""
        if self.on_stage is not None:
            self.on_stage("execute", len(nb.cells))
        return super().execute(nb)

    def check(self, executed: nbformat.NotebookNode) -> tuple[Any, dict[tuple[int, int], Any]]:
        """Report ``checking``, then check every output."""
        if self.on_stage is not None:
            self.on_stage("check", len(executed.cells))
        return super().check(executed)


def approve_run(
    work_dir: Path, run_id: str, comment: str = "", *, admin: str = "unknown"
) -> LocalRun:
    """Site admin ``admin`` approves a run awaiting approval; the agent re-runs it (``approved``).

    Only the local state changes here; the running agent picks the run up on its next turn.
    Raises :class:`~phds_tre.node.state.StateError` unless the run awaits approval, and
    ``ValueError`` for a blank admin name (``phds site approve`` always names one; the
    audit entry says ``site-admin:<admin>``).
    """
    admin = _one_line(admin, 200)
    if not admin:
        raise ValueError("no site admin name: give --admin or set PHDS_SITE_ADMIN")
    state = NodeState(Path(work_dir) / "node.sqlite")
    run = state.move(run_id, "approved", expect={"awaiting_approval"}, reset_attempts=True)
    AuditLog(Path(work_dir) / "audit.sqlite").append(
        f"site-admin:{admin}",
        "approval",
        run_id,
        {"event": "run_approved", "study": run.study_id, "comment": _one_line(comment)},
    )
    return run


def reject_run(
    work_dir: Path, run_id: str, comment: str = "", *, admin: str = "unknown"
) -> LocalRun:
    """Site admin ``admin`` rejects a run awaiting approval; the agent tells the hub next turn."""
    admin = _one_line(admin, 200)
    if not admin:
        raise ValueError("no site admin name: give --admin or set PHDS_SITE_ADMIN")
    state = NodeState(Path(work_dir) / "node.sqlite")
    detail = _one_line(f"rejected by the site: {comment}" if comment else "rejected by the site")
    run = state.move(
        run_id, "rejected", expect={"awaiting_approval"}, detail=detail, reported=False
    )
    AuditLog(Path(work_dir) / "audit.sqlite").append(
        f"site-admin:{admin}",
        "rejection",
        run_id,
        {"event": "run_rejected_by_site", "reason": detail},
    )
    return run


class NodeAgent:
    """One site's node: long-polls the hub and runs what it is given (see the module doc)."""

    def __init__(
        self,
        hub_url: str,
        token: str,
        site: str,
        data_dir: Path,
        site_policy: SitePolicy,
        work_dir: Path,
        key_path: Path,
        trusted_researcher_keys: Sequence[Ed25519PublicKey],
        *,
        poll_wait: int = 25,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        max_attempts: int = 2,
        progress_interval_s: float = 0.25,
        isolate: bool | None = None,
    ) -> None:
        """Set up the local state, audit log and HTTP client; nothing is contacted yet.

        ``token``: the node's bearer token (never logged). ``trusted_researcher_keys``:
        the researcher public keys the site admin accepted; a bundle signed by any other
        key is rejected. ``max_attempts``: executions of one run before an interrupted run
        is marked failed.
        """
        self.hub_url = hub_url.rstrip("/")
        self.site = site
        self.data_dir = Path(data_dir)
        self.site_policy = site_policy
        self.work_dir = Path(work_dir)
        self.key_path = Path(key_path)
        self.trusted_keys = list(trusted_researcher_keys)
        self.poll_wait = poll_wait
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_attempts = max_attempts
        self.progress_interval_s = progress_interval_s
        self.isolate = isolate
        self.actor = f"node:{site}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "runs").mkdir(exist_ok=True)
        self.state = NodeState(self.work_dir / "node.sqlite")
        self.audit = AuditLog(self.work_dir / "audit.sqlite")
        self._stop = threading.Event()
        self._pool: Any = None
        self._resumed = False
        self._purged_at: float | None = None  # monotonic time of the last retention purge
        self._client = httpx.Client(
            base_url=self.hub_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=poll_wait + 30.0),
        )

    # -- life cycle ------------------------------------------------------------------
    @property
    def pool(self) -> Any:
        """The agent's kernel pool (size 1), started on first use."""
        if self._pool is None:
            from phds_tre.execute.pool import KernelPool

            self._pool = KernelPool(
                size=1,
                limits=self.site_policy.limits,
                site_env={
                    "PHDS_SITE_DIR": str(self.data_dir.resolve()),
                    "PHDS_SITE_NAME": self.site,
                },
                isolate=self.isolate,
            )
        return self._pool

    def stop(self) -> None:
        """Ask :meth:`run_forever` (and any back-off wait) to stop soon."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    def close(self) -> None:
        """Stop, kill the pool's kernels and close the HTTP client."""
        self._stop.set()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._client.close()

    def __enter__(self) -> NodeAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_forever(self) -> None:
        """Serve until :meth:`stop`: resume, then claim and run one run after another."""
        self.pool  # noqa: B018  -- start a kernel now, so the first run does not wait for it
        failures = 0
        while not self.stopped:
            try:
                self.run_once()
                failures = 0
            except Stopped:
                break
            except Exception as exc:  # never crash the node; the state says what is owed
                failures += 1
                delay = self._delay(failures)
                log.error(
                    "node: unexpected %s (%s); again in %.1f s",
                    type(exc).__name__,
                    _one_line(str(exc), 200),
                    delay,
                )
                self._stop.wait(delay)

    def run_once(self, wait: int | None = None) -> str | None:
        """Do what is owed (resume, approved runs, reports), then claim and run one run.

        Waits up to ``wait`` seconds (default ``poll_wait``) for a queued run; while the
        hub is away, retries with back-off until it answers or :meth:`stop` is called
        (then raises :class:`Stopped`). Returns the id of the run claimed, or None.
        """
        if not self._resumed:
            self.resume()
        self.purge_if_due()
        self._pending()
        if wait is None:
            wait = self.poll_wait
            # While a run waits for a person (a reviewer's release, a site admin's
            # approval), come back soon: the long-poll only wakes for new hub work.
            if self.state.runs(_AWAITING_PERSON):
                wait = min(wait, _PERSON_POLL_S)
        claim = self._claim(wait)
        if claim is None:
            return None
        self.process(claim)
        return str(claim["run"]["id"])

    # -- HTTP ------------------------------------------------------------------------
    def _delay(self, failures: int) -> float:
        cap = min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(failures - 1, 20))
        return random.uniform(cap / 2, cap)  # jitter: nodes that lost the hub together spread out

    def _request(
        self, method: str, path: str, *, retry: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """One request; retried with back-off while the hub is away (unless not ``retry``).

        Raises :class:`HubRefused` for a 4xx answer, :class:`HubUnavailable` (only when not
        ``retry``) and :class:`Stopped` when asked to stop while waiting.
        """
        failures = 0
        while True:
            if self.stopped:
                raise Stopped()
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {_one_line(str(exc), 120)}"
            else:
                if response.status_code < 400:
                    return response
                if response.status_code < 500:
                    try:
                        reason = str(response.json().get("reason", response.text))
                    except (ValueError, AttributeError):
                        reason = response.text
                    raise HubRefused(response.status_code, _one_line(reason, 300))
                problem = f"HTTP {response.status_code}"
            if not retry:
                raise HubUnavailable(problem)
            failures += 1
            delay = self._delay(failures)
            log.warning(
                "hub %s unavailable (%s); retry %d in %.1f s",
                self.hub_url,
                problem,
                failures,
                delay,
            )
            if self._stop.wait(delay):
                raise Stopped()

    def _claim(self, wait: int) -> dict[str, Any] | None:
        response = self._request("POST", "/nodes/next", params={"wait": wait})
        if response.status_code == 204:
            return None
        claim: dict[str, Any] = response.json()
        return claim

    def _status(self, run_id: str, status: str, *, retry: bool = True, **body: Any) -> bool:
        """Tell the hub; False when it refused (logged), e.g. the run was cancelled."""
        payload = {"status": status, **{k: v for k, v in body.items() if v is not None}}
        if "detail" in payload:
            payload["detail"] = _one_line(payload["detail"], 2000)
        try:
            self._request("POST", f"/runs/{run_id}/status", json=payload, retry=retry)
        except HubRefused as exc:
            log.warning("run %s: the hub refused status %s: %s", run_id, status, exc.reason)
            return False
        return True

    def _report(self, run: LocalRun, status: str, detail: str) -> None:
        """Report a final (or waiting) status; a refusal also counts as told (it is logged)."""
        ok = self._status(run.run_id, status, detail=detail)
        if not ok and status == "rejected":
            # The hub allows ``rejected`` only before execution or after checking.
            self._status(run.run_id, "failed", detail=detail)
        self.state.mark_reported(run.run_id)

    def _record(self, action: str, subject: str, **details: Any) -> None:
        self.audit.append(self.actor, action, subject, details)

    # -- resuming --------------------------------------------------------------------
    def resume(self) -> None:
        """After a (crashed) start: re-run or fail interrupted runs, upload built releases."""
        self._resumed = True
        for run in self.state.runs(ACTIVE):
            if run.attempts >= self.max_attempts:
                detail = f"the node was interrupted during {run.attempts} attempts; not re-run"
                failed = self.state.move(run.run_id, "failed", detail=detail, reported=False)
                self._record("run_failed", run.run_id, event="interrupted", attempts=run.attempts)
                log.warning("run %s: %s", run.run_id, detail)
                self._report(failed, "failed", detail)
            else:
                self._record("run_started", run.run_id, event="resumed", attempts=run.attempts)
                log.info("run %s: resuming after an interruption", run.run_id)
                self._start(run)
        for run in self.state.runs({"releasing"}):
            self._upload(run)

    #: Seconds between retention purges while serving.
    PURGE_INTERVAL_S = 3600.0

    def purge_if_due(self) -> None:
        """Delete expired executed notebooks (at start, then every ``PURGE_INTERVAL_S``)."""
        now = time.monotonic()
        if self._purged_at is not None and now - self._purged_at < self.PURGE_INTERVAL_S:
            return
        from phds_tre.node.retention import purge_executed

        self._purged_at = now
        days = self.site_policy.retention.executed_days
        for purged in purge_executed(self.state, self.audit, days, actor=self.actor):
            log.info("run %s: executed notebooks purged after %d days", purged.run_id, days)

    def _pending(self) -> None:
        for run in self.state.unreported():
            status = "awaiting_approval" if run.status == "awaiting_approval" else run.status
            self._report(run, status, run.detail)
        for run in self.state.runs({"reviewed"}):
            self._build_reviewed(run)
        for run in self.state.runs({"releasing"}):
            self._upload(run)
        for run in self.state.runs({"approved"}):
            self._start(run, approved=True)

    # -- one run ---------------------------------------------------------------------
    def process(self, claim: Mapping[str, Any]) -> None:
        """Run a claim from ``POST /nodes/next`` (recorded locally first)."""
        run_id = str(claim["run"]["id"])
        study_id = str(claim["study_id"])
        out_dir = self.work_dir / "runs" / run_id / "out"
        run, new = self.state.claim(run_id, study_id, out_dir, claim.get("parameters") or {})
        if new and int(claim.get("round") or 1) > 1:
            # Kept beside the run (verified in _start, again after a restart).
            self._round_file(run).parent.mkdir(parents=True, exist_ok=True)
            follow_up = {
                "round": claim.get("round"),
                "document": claim.get("round_document"),
                "signature": claim.get("round_signature"),
            }
            self._round_file(run).write_text(json.dumps(follow_up), encoding="utf-8")
        self._record("run_started", run_id, event="run_claimed", study=study_id)
        log.info("run %s of study %s claimed", run_id, study_id[:12])
        if not new and run.status not in ACTIVE:
            log.warning("run %s was handed out again but is %s here", run_id, run.status)
            return
        self._start(run)

    def _reject(self, run: LocalRun, detail: str, **audit: Any) -> None:
        rejected = self.state.move(run.run_id, "rejected", detail=detail, reported=False)
        self._record("rejection", run.run_id, reason=detail, **audit)
        log.warning("run %s rejected: %s", run.run_id, detail)
        self._report(rejected, "rejected", detail)

    def _fail(self, run: LocalRun, detail: str) -> None:
        failed = self.state.move(run.run_id, "failed", detail=detail, reported=False)
        self._record("run_failed", run.run_id, reason=detail)
        log.warning("run %s failed: %s", run.run_id, detail)
        self._report(failed, "failed", detail)

    def _bundle(self, run: LocalRun) -> StudyBundle:
        """Download (once) and verify the bundle; raises BundleError when it is not acceptable."""
        path = run.out_dir.parent / "bundle.zip"
        if not path.exists():
            response = self._request("GET", f"/nodes/bundles/{run.study_id}")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bundle.")
            with os.fdopen(fd, "wb") as handle:
                handle.write(response.content)
            os.replace(tmp, path)
        bundle = read_bundle(path, self.trusted_keys)
        if bundle.study_id != run.study_id:
            raise BundleError(f"the bundle is study {bundle.study_id}, not {run.study_id}")
        if self.site not in bundle.manifest.sites:
            raise BundleError(f"the study does not name this site ({self.site})")
        return bundle

    def _start(self, run: LocalRun, approved: bool = False) -> None:
        """Verify the bundle and execute (or re-execute) the run, then release or report."""
        try:
            bundle = self._bundle(run)
        except BundleError as exc:
            reason = str(exc).replace(str(run.out_dir.parent / "bundle.zip"), "bundle")
            self._reject(run, _one_line(f"bundle refused: {reason}"), event="bundle_refused")
            return
        except HubRefused as exc:
            self._fail(run, f"the hub refused the bundle download: {exc.reason}")
            return
        try:
            number, parameters = self._round(run, bundle)
        except RoundError as exc:
            self._reject(run, _one_line(f"round refused: {exc}"), event="round_refused")
            return
        self._record("submission", run.run_id, event="bundle_verified", key_id=bundle.key_id)
        notebook = run.out_dir.parent / "notebook.ipynb"
        notebook.write_bytes(bundle.notebook)
        if run.out_dir.exists():  # an earlier attempt: kept at the site, never reused
            shutil.move(run.out_dir, run.out_dir.with_name(f"out.attempt-{run.attempts}"))
        run = self.state.move(
            run.run_id, "running", expect={"claimed", "running", "approved"}, attempt=True
        )
        if number > 1 and not approved and not self._later_round_runs(run):
            self._hold_round(run, number)
            return
        last_post = [0.0]
        cells_total = [0]  # the executed notebook may hold one more cell (injected parameters)

        def on_stage(stage: str, cells: int) -> None:
            if stage == "execute":
                cells_total[0] = cells
                self._record("run_started", run.run_id, event="execution_started", cells=cells)
                rerun = (
                    f"re-run after an interruption (attempt {run.attempts} of {self.max_attempts})"
                )
                self._status(
                    run.run_id,
                    "running",
                    cells_done=0,
                    cells_total=cells,
                    detail=rerun if run.attempts > 1 else None,
                )
            else:
                total = max(cells_total[0], cells)
                self._record("run_finished", run.run_id, event="execution_finished")
                self._status(run.run_id, "checking", cells_done=total, cells_total=total)

        def progress(_site: str, done: int, total: int) -> None:
            cells_total[0] = max(cells_total[0], total)
            now = time.monotonic()
            if now - last_post[0] < self.progress_interval_s:
                return
            last_post[0] = now
            with contextlib.suppress(HubUnavailable):  # best effort: never retried or fatal
                self._status(
                    run.run_id,
                    "running",
                    retry=False,
                    cells_done=min(done, cells_total[0]),
                    cells_total=cells_total[0],
                )

        site_run = _NodeRun(
            notebook_path=notebook,
            site_dir=self.data_dir,
            out_dir=run.out_dir,
            parameters=parameters,
            site_policy=self.site_policy,
            site_name=self.site,
            key_path=self.key_path,
            approved=approved,
            study_id=run.study_id,
            round=number,
            progress=progress,
            echo=lambda line: log.info("run %s: %s", run.run_id, line),
            pool=self.pool,
            on_stage=on_stage,
        )
        try:
            record = site_run.run()
        except RunError as exc:
            self._fail(run, _one_line(str(exc)))
            return
        except Stopped:
            raise
        except Exception as exc:  # the node's own fault: the type only (messages may hold data)
            log.exception("run %s: the node failed", run.run_id)
            self._fail(run, f"the node failed: {type(exc).__name__}")
            return
        self._finished(run, record)

    # -- follow-up rounds -------------------------------------------------------------
    @staticmethod
    def _round_file(run: LocalRun) -> Path:
        """``runs/<run>/round.json``: the signed round document of a follow-up run."""
        return run.out_dir.parent / "round.json"

    def _round_of(self, run: LocalRun) -> int:
        path = self._round_file(run)
        if not path.exists():
            return 1
        with contextlib.suppress(OSError, ValueError, TypeError):
            return int(json.loads(path.read_text(encoding="utf-8")).get("round"))
        return 0

    def _round(self, run: LocalRun, bundle: StudyBundle) -> tuple[int, dict[str, Any]]:
        """The run's round and parameters, from the bundle (round 1) or the signed round.

        A follow-up round's document is verified here against the researcher keys the
        site accepted (the hub's parameters are never used): signed by the study's own
        key, for this very study (so the same notebook), naming this site, not a round
        this node ran already, and with parameters the notebook's ``parameters`` cell
        declares. Raises :class:`RoundError`.
        """
        path = self._round_file(run)
        if not path.exists():
            return 1, bundle.parameters_for(self.site)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RoundError(f"unreadable round document ({exc})") from None
        signed = verify_round(data, self.trusted_keys, study_id=bundle.study_id)
        document = signed.document
        if signed.key_id != bundle.key_id:
            raise RoundError("the round is signed with another key than the study")
        if document.round != data.get("round"):
            raise RoundError(f"run of round {data.get('round')} carries round {document.round}")
        if self.site not in document.sites:
            raise RoundError(f"round {document.round} does not name this site ({self.site})")
        for other in self.state.runs():
            if (
                other.run_id != run.run_id
                and other.study_id == run.study_id
                and self._round_of(other) == document.round
            ):
                raise RoundError(f"round {document.round} was handed out before ({other.run_id})")
        parameters = document.parameters_for(bundle.manifest, self.site)
        try:
            nb = nbformat.reads(bundle.notebook.decode("utf-8"), as_version=4)
            validate_parameters(nb, parameters)
        except ParameterError as exc:
            raise RoundError(f"parameters: {exc}") from None
        return document.round, parameters

    def _later_round_runs(self, run: LocalRun) -> bool:
        """A later round runs without fresh approval (the code gate still applies)?

        Only when the site policy says ``later_rounds = "auto"`` and round 1 of the same
        study ran at this site (it was executed and checked, with or without approval).
        """
        if self.site_policy.approval.later_rounds != "auto":
            return False
        return any(
            other.study_id == run.study_id and self._round_of(other) == 1
            for other in self.state.runs(_RAN)
        )

    def _hold_round(self, run: LocalRun, number: int) -> None:
        """Round ``number`` waits for the site admin, like a new study's code-gate approval."""
        why = (
            "the site approves every later round"
            if self.site_policy.approval.later_rounds != "auto"
            else "round 1 of the study did not run at this site"
        )
        detail = f"round {number}: {why} — the site admin approves or rejects it"
        waiting = self.state.move(run.run_id, "awaiting_approval", detail=detail, reported=False)
        self._record("verdict", run.run_id, event="awaiting_approval", round=number, why=why)
        self._report(waiting, "awaiting_approval", detail)

    def _finished(self, run: LocalRun, record: Mapping[str, Any]) -> None:
        status = record.get("status")
        if status == "blocked":
            self._reject(run, _gate_summary(record), event="code_gate_blocked")
        elif status == "awaiting_approval":
            detail = _gate_summary(record) + " — the site admin approves or rejects it"
            waiting = self.state.move(
                run.run_id, "awaiting_approval", detail=detail, reported=False
            )
            self._record("verdict", run.run_id, event="awaiting_approval", gate=detail)
            self._report(waiting, "awaiting_approval", detail)
        elif status in ("released", "awaiting_review"):
            counts = (record.get("release") or {}).get("counts", {})
            self._record("verdict", run.run_id, event="checked", status=status, counts=counts)
            if status == "awaiting_review":
                self._hold(run, counts)
                return
            releasing = self.state.move(run.run_id, "releasing", detail=str(status))
            self._upload(releasing)
        else:
            error = record.get("error") or f"the run ended {status}"
            self._fail(run, _one_line(f"{status}: {error}" if status != "failed" else error))

    # -- the review queue (phds_tre.node.review) ---------------------------------------
    def _hold(self, run: LocalRun, counts: Mapping[str, Any]) -> None:
        """Park a run with held outputs in the review queue; nothing is uploaded."""
        from phds_tre.node.review import open_review

        detail = f"{counts.get('held', 0)} output(s) held at the site for review"
        waiting = open_review(self.state, run, detail)
        self._record("verdict", run.run_id, event="held_for_review", held=counts.get("held", 0))
        self._report(waiting, "awaiting_review", detail)

    def _build_reviewed(self, run: LocalRun) -> None:
        """A reviewer released the run: rebuild with the decisions, sign, then upload once."""
        from phds_tre.node.review import build_reviewed_release
        from phds_tre.release.manifest import sha256_file

        try:
            path = build_reviewed_release(
                self.state, run, self.site_policy, self.data_dir, self.key_path
            )
        except Exception as exc:  # the node's own fault: the type only (messages may hold data)
            log.exception("run %s: the reviewed release could not be built", run.run_id)
            self._fail(run, f"the reviewed release could not be built: {type(exc).__name__}")
            return
        manifest = sha256_file(path / "manifest.json")
        self._record("release", run.run_id, event="reviewed_release_signed", manifest=manifest)
        self._upload(self.state.move(run.run_id, "releasing", detail="reviewed release built"))

    def _upload(self, run: LocalRun) -> None:
        """Upload the release once; a 409 'already has a release' means it was done."""
        from phds_tre.node.review import REVIEWED_DIR, release_dir

        record = json.loads((run.out_dir / "run.json").read_text(encoding="utf-8"))
        if record.get("status") == "awaiting_review" and not (run.out_dir / REVIEWED_DIR).exists():
            # Built before the review queue existed and never uploaded: review it first.
            self._hold(run, (record.get("release") or {}).get("counts", {}))
            return
        final = "uploaded"
        data = zip_release(release_dir(run.out_dir))
        digest = hashlib.sha256(data).hexdigest()
        try:
            self._request(
                "POST",
                f"/runs/{run.run_id}/release",
                content=data,
                headers={"Content-Type": "application/zip"},
            )
        except HubRefused as exc:
            if exc.status == 409 and "already has a release" in exc.reason:
                log.info("run %s: the hub already has its release", run.run_id)
                self._record("release", run.run_id, event="release_already_uploaded")
            else:
                self.state.move(
                    run.run_id, "failed", detail=f"the hub refused the release: {exc.reason}"
                )
                self._record("run_failed", run.run_id, event="release_refused", reason=exc.reason)
                log.warning("run %s: the hub refused the release: %s", run.run_id, exc.reason)
                done = self.state.get(run.run_id)
                if done is not None:
                    self._report(done, "failed", done.detail)
                return
        else:
            self._record("release", run.run_id, event="release_uploaded", sha256=digest)
            log.info("run %s: release uploaded (%s)", run.run_id, digest[:12])
        self.state.move(
            run.run_id, final, release_sha256=digest, uploaded=True, reported=True, detail=final
        )
