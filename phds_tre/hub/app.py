"""The hub's REST service: ``create_app(db_url, data_dir)`` builds the FastAPI application.

Roles: the hub admin registers principals and issues tokens; a researcher submits
signed study bundles and sees only their own studies; a site node long-polls for the
runs of its own site, reports status and progress, and uploads the signed release; the
hub verifies every bundle and release before storing it and never receives anything
else from a site. Every state change and every refused request is appended to the hub
audit log (``data_dir/audit.sqlite``), naming who did what but never a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
import threading
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import nbformat
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select, update
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from phds_tre.audit import AuditLog
from phds_tre.bundle import (
    MAX_BUNDLE_BYTES,
    NOTEBOOK_MEMBER,
    BundleError,
    StudyManifest,
    verify_bundle,
)
from phds_tre.hub.archive import ArchiveError, unpack
from phds_tre.hub.auth import (
    Caller,
    HubError,
    create_principal,
    issue_token,
    parse_public_key,
    require,
    revoke_token,
)
from phds_tre.hub.models import (
    ACTIVE_STATUSES,
    Principal,
    Release,
    Round,
    Run,
    RunEvent,
    Study,
    utc_now,
)
from phds_tre.hub.schemas import (
    AuditVerifyOut,
    ErrorOut,
    HealthOut,
    NextRunOut,
    PrincipalIn,
    PrincipalOut,
    ReleaseOut,
    RoundIn,
    RoundOut,
    RunEventOut,
    RunOut,
    StatusIn,
    StudyOut,
    StudySummary,
    TokenIn,
    TokenOut,
    TokenRevokedOut,
)
from phds_tre.hub.store import Store
from phds_tre.release.signing import key_id
from phds_tre.release.verify import ReleaseInputError, verify_release
from phds_tre.rounds import RoundError, check_round_parameters, parse_round, verify_round

__all__ = ["MAX_RELEASE_BYTES", "NODE_TRANSITIONS", "Hub", "SiteNotifier", "create_app"]

#: Largest release archive a node may upload (compressed).
MAX_RELEASE_BYTES = 50 * 1024 * 1024

#: Status moves a node may make (``released`` only by uploading a verified release).
NODE_TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"awaiting_approval", "running", "rejected", "failed"}),
    "awaiting_approval": frozenset({"running", "rejected", "failed"}),
    "running": frozenset({"running", "checking", "failed"}),
    "checking": frozenset({"checking", "awaiting_review", "rejected", "failed"}),
    "awaiting_review": frozenset({"awaiting_review", "rejected", "failed"}),
}
#: Statuses from which a release may be uploaded.
RELEASABLE = frozenset({"checking", "awaiting_review"})

#: The audit log has a fixed vocabulary: each hub event is filed under the nearest action,
#: and ``details["event"]`` says exactly what happened.
_STATUS_ACTION = {
    "awaiting_approval": "verdict",
    "running": "run_started",
    "checking": "run_finished",
    "awaiting_review": "verdict",
    "rejected": "rejection",
    "failed": "run_failed",
    "cancelled": "rejection",
}

_REFUSALS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 415, 422)
}
_ZIP_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_ARCHIVE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("application/zip", "application/gzip")
        },
    }
}


# Module level (not inside create_app): with postponed annotations FastAPI resolves these
# names in the module's globals.
admin = Annotated[Caller, Depends(require("admin"))]
researcher = Annotated[Caller, Depends(require("researcher"))]
node = Annotated[Caller, Depends(require("node"))]


class SiteNotifier:
    """Wakes the long-polls of one site when a run for it is queued, in every hub process.

    Waiters may sit in different event loops (one per server worker, or per test
    client), so each registers its own event and a notification is delivered with
    ``call_soon_threadsafe``. With a PostgreSQL store, :meth:`notify` also announces the
    run to the other hub processes (``NOTIFY``), whose listeners call :meth:`heard`;
    the long-poll's periodic re-check is the safety net when a notification is lost.
    """

    def __init__(self, store: Store | None = None) -> None:
        """No waiters yet; ``store`` carries announcements to other hub processes."""
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._store = store
        #: Tells this process's own announcements (already delivered here) from others'.
        self.origin = uuid.uuid4().hex

    @contextlib.contextmanager
    def waiting(self, site: str) -> Iterator[asyncio.Event]:
        """Register an event (of the running loop) set whenever ``site`` gets a queued run."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(site, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._waiters.get(site, set()).discard(entry)

    def notify(self, site: str) -> None:
        """A run for ``site`` was queued: wake its waiters here and in other hub processes."""
        self.wake(site)
        if self._store is not None:
            self._store.announce_queued([site], self.origin)

    def heard(self, origin: str, site: str) -> None:
        """An announcement from any hub process: wake the waiters here unless it was ours."""
        if origin != self.origin:
            self.wake(site)

    def wake(self, site: str) -> None:
        """Wake every waiter of ``site`` in this process (callable from any thread)."""
        with self._lock:
            waiters = list(self._waiters.get(site, ()))
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(ev.set)


@dataclass
class Hub:
    """The application's state: store, data folder, audit log and long-poll settings."""

    store: Store
    data_dir: Path
    audit: AuditLog
    notifier: SiteNotifier = field(default_factory=SiteNotifier)
    poll_interval_s: float = 2.0
    lease_s: float = 300.0
    max_study_bytes: int = MAX_BUNDLE_BYTES
    max_release_bytes: int = MAX_RELEASE_BYTES

    def record(self, actor: str, action: str, subject: str, **details: Any) -> None:
        """Append one audit entry."""
        self.audit.append(actor, action, subject, details)

    def path(self, relative: str) -> Path:
        """A stored file's absolute path."""
        return self.data_dir / relative


# -- conversions -----------------------------------------------------------------------


def _run_out(run: Run) -> RunOut:
    return RunOut(
        id=run.id,
        study_id=run.study_id,
        site=run.site,
        round=run.round,
        status=run.status,
        cells_done=run.cells_done,
        cells_total=run.cells_total,
        created=run.created,
        updated=run.updated,
        released=run.status == "released",
        history=[
            RunEventOut(at=e.at, status=e.status, actor=e.actor, detail=e.detail)
            for e in run.events
        ],
    )


def _sites(study: Study) -> list[str]:
    """The study's sites, once each (a site has one run per round)."""
    return list(dict.fromkeys(r.site for r in study.runs))


def _study_out(study: Study) -> StudyOut:
    return StudyOut(
        id=study.id,
        title=study.title,
        researcher=study.researcher.name,
        created=study.created,
        sites=_sites(study),
        bundle_sha256=study.bundle_sha256,
        rounds=max((r.round for r in study.runs), default=1),
        cancelled=study.cancelled_at is not None,
        runs=[_run_out(r) for r in study.runs],
    )


def _principal_out(p: Principal) -> PrincipalOut:
    key = key_id(parse_public_key(p.public_key)) if p.public_key else None
    return PrincipalOut(id=p.id, name=p.name, role=p.role, site=p.site, key_id=key)


def _load_study(session: Session, study_id: str) -> Study | None:
    return session.scalars(
        select(Study)
        .where(Study.id == study_id)
        .options(selectinload(Study.runs).selectinload(Run.events), selectinload(Study.researcher))
    ).first()


def _own_study(session: Session, study_id: str, caller: Caller) -> Study:
    study = _load_study(session, study_id)
    if study is None:
        raise HubError(404, f"no study {study_id}", subject=study_id)
    if study.researcher_id != caller.principal_id:
        raise HubError(403, "this study belongs to another researcher", subject=study_id)
    return study


def _site_run(session: Session, run_id: str, caller: Caller) -> Run:
    run = session.scalars(
        select(Run).where(Run.id == run_id).options(selectinload(Run.events))
    ).first()
    if run is None:
        raise HubError(404, f"no run {run_id}", subject=run_id)
    if run.site != caller.site:
        raise HubError(403, f"run {run_id} is for another site", subject=run_id)
    if run.claimed_by != caller.principal_id:
        raise HubError(
            403, "this node does not hold the run (claim it with POST /nodes/next)", subject=run_id
        )
    return run


def _refuse_nul(request: Request) -> None:
    """Every route: refuse a NUL character in the path or query (PostgreSQL text cannot hold one)."""
    if "\x00" in request.url.path or any(
        "\x00" in key or "\x00" in value for key, value in request.query_params.multi_items()
    ):
        raise HubError(400, "the request URL contains a NUL character")


async def _read_body(request: Request, limit: int, what: str, media: tuple[str, ...]) -> bytes:
    """The request body, refused (415/413) before or while reading when it cannot be right."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in (*media, "application/octet-stream"):
        raise HubError(415, f"{what} must be sent as {' or '.join(media)}, not {content_type!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HubError(413, f"{what} is {declared} bytes, more than the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a missing or lying Content-Length
            raise HubError(413, f"{what} is more than the limit of {limit} bytes")
        chunks.append(chunk)
    if not size:
        raise HubError(400, f"{what}: empty request body")
    return b"".join(chunks)


# -- the operations, run in worker threads (the store is synchronous) ---------------------


def _queue_runs(
    session: Session,
    study_id: str,
    sites: Sequence[str],
    round_number: int,
    actor: str,
    now: dt.datetime,
    submitted: str,
    queued: str,
) -> list[str]:
    """One queued run per site for a study's round, with its first two history entries."""
    run_ids = []
    for site in sites:
        run = Run(
            id=str(uuid.uuid4()),
            study_id=study_id,
            site=site,
            round=round_number,
            status="queued",
            cells_done=0,
            cells_total=0,
            created=now,
            updated=now,
            claims=0,
        )
        session.add(run)
        session.add_all(
            [
                RunEvent(run_id=run.id, at=now, status="submitted", actor=actor, detail=submitted),
                RunEvent(run_id=run.id, at=now, status="queued", actor="hub", detail=queued),
            ]
        )
        run_ids.append(run.id)
    return run_ids


def _submit(hub: Hub, caller: Caller, data: bytes) -> tuple[StudyOut, bool]:
    """Verify and store a study bundle; (the study, whether it is new)."""
    trusted = [parse_public_key(caller.public_key)] if caller.public_key else []
    tmp_dir = hub.data_dir / "tmp"
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, suffix=".zip")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            result = verify_bundle(tmp, trusted)
        except BundleError as exc:
            raise HubError(400, str(exc).replace(str(tmp), "upload")) from None
        if not result.ok or result.bundle is None or result.study_id is None:
            problems = [p.replace(str(tmp), "upload") for p in result.problems]
            if result.trusted is False and all("not a trusted key" in p for p in problems):
                raise HubError(
                    403,
                    "the bundle is not signed with your registered key",
                    problems,
                    subject=result.study_id or "",
                )
            raise HubError(400, "the study bundle failed verification", problems)
        manifest = result.bundle.manifest
        study_id = result.study_id
        with hub.store.session() as session:
            known = set(
                session.scalars(
                    select(Principal.site).where(Principal.role == "node").distinct()
                ).all()
            )
            unknown = sorted(set(manifest.sites) - known)
            if unknown:
                raise HubError(
                    422,
                    f"unknown sites (no registered node): {', '.join(unknown)}",
                    [f"unknown site {s!r}" for s in unknown],
                    subject=study_id,
                )
            existing = _load_study(session, study_id)
            if existing is not None:
                if existing.researcher_id != caller.principal_id:
                    raise HubError(
                        409, "this study was submitted by another researcher", subject=study_id
                    )
                return _study_out(existing), False
        blob = Path("blobs") / f"{study_id}.zip"
        os.replace(tmp, hub.path(str(blob)))  # same bytes for the same id: replacing is harmless
        now = utc_now()
        study = Study(
            id=study_id,
            researcher_id=caller.principal_id,
            title=manifest.title,
            bundle_sha256=hashlib.sha256(data).hexdigest(),
            bundle_path=blob.as_posix(),
            manifest_json=manifest.canonical_bytes().decode("utf-8"),
            created=now,
        )
        try:
            with hub.store.session() as session:
                session.add(study)
                _queue_runs(
                    session, study_id, manifest.sites, 1, caller.actor, now, "", "bundle verified"
                )
        except IntegrityError:
            # The same study submitted twice at once: the other request stored it.
            return _submit_existing(hub, caller, study_id)
        hub.record(
            caller.actor,
            "submission",
            study_id,
            event="study_submitted",
            sites=manifest.sites,
            key_id=result.key_id,
            bundle_sha256=study.bundle_sha256,
        )
        for site in manifest.sites:
            hub.notifier.notify(site)
        with hub.store.session() as session:
            stored = _load_study(session, study_id)
            assert stored is not None
            return _study_out(stored), True
    finally:
        tmp.unlink(missing_ok=True)


def _submit_existing(hub: Hub, caller: Caller, study_id: str) -> tuple[StudyOut, bool]:
    with hub.store.session() as session:
        existing = _load_study(session, study_id)
        if existing is None or existing.researcher_id != caller.principal_id:
            raise HubError(409, "this study was submitted by another researcher", subject=study_id)
        return _study_out(existing), False


def _submit_round(hub: Hub, caller: Caller, study_id: str, body: RoundIn) -> RoundOut:
    """Verify and store follow-up round of the caller's study; one queued run per target site."""
    with hub.store.session() as session:
        study = _own_study(session, study_id, caller)
        if study.cancelled_at is not None:
            raise HubError(409, "the study is cancelled: no further rounds", subject=study_id)
        manifest = StudyManifest.model_validate(json.loads(study.manifest_json))
        latest = max((r.round for r in study.runs), default=1)
        bundle_path = hub.path(study.bundle_path)
    trusted = [parse_public_key(caller.public_key)] if caller.public_key else []
    try:
        signed = verify_round(body.model_dump(), trusted)
    except RoundError as exc:
        untrusted = "not a trusted key" in str(exc)
        reason = "the round is not signed with your registered key" if untrusted else str(exc)
        raise HubError(403 if untrusted else 400, reason, subject=study_id) from None
    document = signed.document
    if document.study_id != study_id:
        raise HubError(
            422, f"the round document is for study {document.study_id}", subject=study_id
        )
    if document.round <= latest:
        raise HubError(
            409, f"round {document.round} exists already (the latest is {latest})", subject=study_id
        )
    if document.round != latest + 1:
        raise HubError(
            422, f"the next round is {latest + 1}, not {document.round}", subject=study_id
        )
    outside = [s for s in document.sites if s not in manifest.sites]
    if outside:
        raise HubError(422, f"not sites of the study: {', '.join(outside)}", subject=study_id)
    # The hub holds the notebook, so a parameter it does not declare (or of the wrong
    # type) is refused here rather than after a trip to every site.
    with zipfile.ZipFile(bundle_path) as archive:
        notebook = nbformat.reads(archive.read(NOTEBOOK_MEMBER).decode("utf-8"), as_version=4)
    problems = check_round_parameters(document, manifest, notebook)
    if problems:
        raise HubError(
            422, "the round's parameters do not fit the notebook", problems, subject=study_id
        )
    now = utc_now()
    run_ids: list[str]
    try:
        with hub.store.session() as session:
            session.add(
                Round(
                    study_id=study_id,
                    number=document.round,
                    document_json=document.canonical_bytes().decode("utf-8"),
                    signature_json=json.dumps(dict(signed.signature), sort_keys=True),
                    key_id=signed.key_id,
                    created=now,
                )
            )
            session.flush()  # the unique (study, number) refuses a concurrent duplicate here
            run_ids = _queue_runs(
                session,
                study_id,
                document.sites,
                document.round,
                caller.actor,
                now,
                f"round {document.round}",
                f"round {document.round} verified",
            )
    except IntegrityError:
        raise HubError(409, f"round {document.round} exists already", subject=study_id) from None
    hub.record(
        caller.actor,
        "submission",
        study_id,
        event="round_submitted",
        round=document.round,
        sites=document.sites,
        key_id=signed.key_id,
    )
    for site in document.sites:
        hub.notifier.notify(site)
    with hub.store.session() as session:
        runs = session.scalars(
            select(Run)
            .where(Run.id.in_(run_ids))
            .order_by(Run.site)
            .options(selectinload(Run.events))
        ).all()
        return RoundOut(
            study_id=study_id,
            round=document.round,
            sites=document.sites,
            key_id=signed.key_id,
            created=now,
            runs=[_run_out(r) for r in runs],
        )


def _cancel(hub: Hub, caller: Caller, study_id: str) -> StudyOut:
    with hub.store.session() as session:
        study = _own_study(session, study_id, caller)
        runs = [(r.id, r.status, r.site) for r in study.runs]
        if study.cancelled_at is None:  # no further rounds from now on
            study.cancelled_at = utc_now()
    cancelled = []
    for run_id, status, site in runs:
        # Compare-and-set; a node may move the run meanwhile, so retry from what it is now.
        for _ in range(5):
            if status not in ACTIVE_STATUSES:
                break
            if hub.store.set_status(run_id, status, "cancelled", caller.actor, "by the researcher"):
                cancelled.append(site)
                break
            with hub.store.session() as session:
                status = session.get_one(Run, run_id).status
    hub.record(caller.actor, "rejection", study_id, event="study_cancelled", sites=cancelled)
    with hub.store.session() as session:
        return _study_out(_own_study(session, study_id, caller))


def _claim(hub: Hub, caller: Caller) -> NextRunOut | None:
    assert caller.site is not None
    run_id = hub.store.claim_next(caller.site, caller.principal_id, caller.actor, hub.lease_s)
    if run_id is None:
        return None
    with hub.store.session() as session:
        run = session.scalars(
            select(Run).where(Run.id == run_id).options(selectinload(Run.events))
        ).one()
        manifest = StudyManifest.model_validate(json.loads(run.study.manifest_json))
        parameters = manifest.parameters_for(run.site)
        follow_up: dict[str, Any] = {}
        if run.round > 1:
            # The node verifies the signed round document itself; parameters are a hint.
            stored = session.scalars(
                select(Round).where(Round.study_id == run.study_id, Round.number == run.round)
            ).one()
            document = json.loads(stored.document_json)
            try:
                parameters = parse_round(document).parameters_for(manifest, run.site)
            except RoundError:  # a stored document that no longer fits: the node refuses it
                parameters = {}
            follow_up = {
                "round_document": document,
                "round_signature": json.loads(stored.signature_json),
            }
        out = NextRunOut(
            run=_run_out(run),
            study_id=run.study_id,
            parameters=parameters,
            bundle_url=f"/nodes/bundles/{run.study_id}",
            lease_until=run.lease_until or utc_now(),
            round=run.round,
            **follow_up,
        )
    hub.record(caller.actor, "run_started", run_id, event="run_claimed", study=out.study_id)
    return out


def _update_status(hub: Hub, caller: Caller, run_id: str, body: StatusIn) -> RunOut:
    with hub.store.session() as session:
        run = _site_run(session, run_id, caller)
        current, done, total = run.status, run.cells_done, run.cells_total
    allowed = NODE_TRANSITIONS.get(current, frozenset())
    if body.status not in allowed:
        raise HubError(
            409,
            f"a run that is {current} cannot become {body.status}"
            + (" (it is finished)" if not allowed else ""),
            subject=run_id,
        )
    done = body.cells_done if body.cells_done is not None else done
    total = body.cells_total if body.cells_total is not None else total
    if done > total:
        raise HubError(
            422, f"cells_done ({done}) is more than cells_total ({total})", subject=run_id
        )
    if not hub.store.set_status(
        run_id,
        current,
        body.status,
        caller.actor,
        body.detail,
        cells_done=body.cells_done,
        cells_total=body.cells_total,
    ):
        raise HubError(
            409, "the run changed meanwhile (cancelled?); fetch it again", subject=run_id
        )
    if body.status == current and body.detail:
        # The same status with something to say (a re-run after the node was interrupted):
        # the history keeps it, as set_status writes history only when the status changes.
        with hub.store.session() as session:
            session.add(
                RunEvent(
                    run_id=run_id,
                    at=utc_now(),
                    status=current,
                    actor=caller.actor,
                    detail=body.detail,
                )
            )
    if body.status != current or body.detail:
        hub.record(
            caller.actor,
            _STATUS_ACTION[body.status],
            run_id,
            event="run_status",
            status=body.status,
            previous=current,
            detail=body.detail,
        )
    with hub.store.session() as session:
        return _run_out(_site_run(session, run_id, caller))


def _release(hub: Hub, caller: Caller, run_id: str, data: bytes) -> ReleaseOut:
    with hub.store.session() as session:
        run = _site_run(session, run_id, caller)
        status, study_id, round_number = run.status, run.study_id, run.round
        if session.scalars(select(Release.id).where(Release.run_id == run_id)).first():
            raise HubError(
                409, "this run already has a release: nothing is released twice", subject=run_id
            )
        keys = [
            parse_public_key(k)
            for k in session.scalars(
                select(Principal.public_key).where(
                    Principal.role == "node", Principal.site == run.site
                )
            ).all()
            if k
        ]
    if status not in RELEASABLE:
        raise HubError(409, f"a run that is {status} cannot be released", subject=run_id)
    digest = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory(dir=hub.data_dir / "tmp") as tmp:
        root = Path(tmp)
        try:
            fmt = unpack(data, root)
            result = verify_release(root, keys)
        except (ArchiveError, ReleaseInputError) as exc:
            raise HubError(
                400, f"release archive: {str(exc).replace(tmp, '')}", subject=run_id
            ) from None
        if not result.ok:
            raise HubError(400, "the release failed verification", result.problems, subject=run_id)
        manifest_path = root / "manifest.json"
        if not manifest_path.exists():
            manifest_path = root / "release" / "manifest.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    # The signature says the site made it; these say it was made for this run's study and
    # site, so a release cannot be replayed against another study.
    # A release made before rounds existed names no round: it is round 1.
    manifest.setdefault("round", 1)
    wrong = [
        f"manifest {name} is {manifest.get(name)!r}, expected {want!r}"
        for name, want in (("study_id", study_id), ("site", caller.site), ("round", round_number))
        if manifest.get(name) != want
    ]
    if wrong:
        raise HubError(400, "the release is not for this run", wrong, subject=run_id)
    relative = f"releases/{digest}.{fmt}"
    hub.path(relative).write_bytes(data)
    now = utc_now()
    try:
        with hub.store.session() as session:
            session.add(
                Release(
                    run_id=run_id,
                    key_id=result.key_id or "",
                    sha256=digest,
                    path=relative,
                    archive_format=fmt,
                    created=now,
                )
            )
            session.flush()  # the unique run_id refuses a concurrent second release here
            moved = session.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == status)
                .values(status="released", updated=now, lease_until=None)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise HubError(409, "the run changed meanwhile (cancelled?)", subject=run_id)
            session.add(
                RunEvent(
                    run_id=run_id,
                    at=now,
                    status="released",
                    actor=caller.actor,
                    detail=f"release {digest} signed by key {result.key_id}",
                )
            )
    except IntegrityError:
        raise HubError(
            409, "this run already has a release: nothing is released twice", subject=run_id
        ) from None
    hub.record(
        caller.actor,
        "release",
        run_id,
        event="release_stored",
        sha256=digest,
        key_id=result.key_id,
        files=result.files,
    )
    return ReleaseOut(
        run_id=run_id, key_id=result.key_id or "", sha256=digest, files=result.files, created=now
    )


# -- the application ----------------------------------------------------------------------


def create_app(
    db_url: str,
    data_dir: Path,
    *,
    poll_interval_s: float = 2.0,
    lease_s: float = 300.0,
    max_study_bytes: int = MAX_BUNDLE_BYTES,
    max_release_bytes: int = MAX_RELEASE_BYTES,
) -> FastAPI:
    """The hub application on the database at ``db_url`` (migrated) and the folder ``data_dir``.

    ``data_dir`` holds the audit log, the study bundles (``blobs/``) and the release
    archives (``releases/``); with several hub processes it must be shared by all.
    """
    data_dir = Path(data_dir)
    for sub in ("blobs", "releases", "tmp"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    store = Store(db_url)
    hub = Hub(
        store=store,
        data_dir=data_dir,
        audit=AuditLog(data_dir / "audit.sqlite"),
        notifier=SiteNotifier(store),
        poll_interval_s=poll_interval_s,
        lease_s=lease_s,
        max_study_bytes=max_study_bytes,
        max_release_bytes=max_release_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Runs queued through other hub processes (PostgreSQL LISTEN); returns on SQLite.
        watcher = asyncio.create_task(store.watch_queued(hub.notifier.heard))
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    app = FastAPI(
        title="phds_tre hub",
        version="1",
        description=__doc__,
        responses=_REFUSALS,
        lifespan=lifespan,
        dependencies=[Depends(_refuse_nul)],
    )
    app.state.hub = hub

    def actor_of(request: Request) -> str:
        return str(getattr(request.state, "actor", "anonymous"))

    @app.exception_handler(HubError)
    async def refused(request: Request, exc: HubError) -> JSONResponse:
        await run_in_threadpool(
            hub.record,
            actor_of(request),
            "rejection",
            exc.subject or request.url.path,
            event="request_refused",
            status=exc.status,
            reason=exc.reason,
            problems=exc.problems[:50],
            method=request.method,
            path=request.url.path,
        )
        return JSONResponse(
            ErrorOut(reason=exc.reason, problems=exc.problems).model_dump(),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        ]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        reason = f"invalid request: {problems[0]}{more}" if problems else "invalid request"
        return await refused(request, HubError(422, reason, problems))

    @app.exception_handler(DataError)
    async def unstorable(request: Request, exc: DataError) -> JSONResponse:
        # A value the database refuses (a NUL in a JSON string, text longer than its column
        # on PostgreSQL) is the client's input, not a server fault.
        problem = str(exc.orig).strip().splitlines()[0] if exc.orig else "invalid value"
        return await refused(request, HubError(422, f"a value cannot be stored: {problem}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's and Starlette's own refusals (a body that cannot be decoded, an unknown
        # route or method) get the hub's error shape and an audit entry like every other.
        reason = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in reason:
            reason = "the request body cannot be decoded (expected UTF-8 JSON)"
        headers = dict(exc.headers) if exc.headers else None
        return await refused(request, HubError(exc.status_code, reason, headers=headers))

    @app.get("/health", tags=["hub"])
    def health() -> HealthOut:
        """The service is up and its database answers."""
        with hub.store.session() as session:
            session.execute(select(1))
        return HealthOut(status="ok", database=hub.store.dialect)

    # -- admin ---------------------------------------------------------------------------

    @app.post("/admin/principals", status_code=201, tags=["admin"])
    def add_principal(body: PrincipalIn, caller: admin) -> PrincipalOut:
        """Register a researcher, site node, site reviewer or another admin."""
        try:
            principal = create_principal(
                hub.store, body.name, body.role, body.site, body.public_key
            )
        except ValueError as exc:
            status = 409 if "already exists" in str(exc) else 422
            raise HubError(status, str(exc), subject=body.name) from None
        out = _principal_out(principal)
        hub.record(
            caller.actor,
            "key_accepted",
            f"principal:{out.name}",
            event="principal_created",
            role=out.role,
            site=out.site,
            key_id=out.key_id,
        )
        return out

    @app.post("/admin/tokens", status_code=201, tags=["admin"])
    def add_token(body: TokenIn, caller: admin) -> TokenOut:
        """Issue a token; the bearer string is in this response only (the hub keeps a hash)."""
        try:
            bearer, token = issue_token(hub.store, body.principal, body.expires_in_s)
        except LookupError as exc:
            raise HubError(404, str(exc).strip("'\""), subject=body.principal) from None
        hub.record(
            caller.actor,
            "key_accepted",
            f"token:{token.id}",
            event="token_issued",
            principal=body.principal,
            scope=token.scope,
            expires=token.expires.isoformat(),
        )
        return TokenOut(
            id=token.id,
            token=bearer,
            principal=body.principal,
            scope=token.scope,
            expires=token.expires,
        )

    @app.post("/admin/tokens/{token_id}/revoke", tags=["admin"])
    def revoke(token_id: str, caller: admin) -> TokenRevokedOut:
        """Revoke a token at once (idempotent)."""
        try:
            token = revoke_token(hub.store, token_id)
        except LookupError:
            raise HubError(404, f"no token {token_id}", subject=f"token:{token_id}") from None
        hub.record(caller.actor, "key_revoked", f"token:{token_id}", event="token_revoked")
        return TokenRevokedOut(id=token.id, revoked=token.revoked, revoked_at=token.revoked_at)

    @app.get("/admin/audit/verify", tags=["admin"])
    def audit_verify(caller: admin) -> AuditVerifyOut:
        """Recompute the hub audit log's hash chain."""
        result = hub.audit.verify()
        return AuditVerifyOut(
            ok=result.ok, count=result.count, head_hash=result.head_hash, problems=result.problems
        )

    # -- researcher ------------------------------------------------------------------------

    @app.post(
        "/studies",
        status_code=201,
        tags=["researcher"],
        openapi_extra=_ZIP_BODY,
        response_model=StudyOut,
        responses={200: {"model": StudyOut, "description": "Already submitted by you"}},
    )
    async def submit_study(request: Request, caller: researcher) -> Any:
        """Submit a signed study bundle (zip); one queued run per target site.

        201 with the new study; 200 with the stored one when the caller submitted it before.
        """
        data = await _read_body(request, hub.max_study_bytes, "study bundle", ("application/zip",))
        study, created = await run_in_threadpool(_submit, hub, caller, data)
        return JSONResponse(study.model_dump(mode="json"), status_code=201 if created else 200)

    @app.get("/studies", tags=["researcher"])
    def list_studies(caller: researcher) -> list[StudySummary]:
        """The caller's own studies, newest first."""
        with hub.store.session() as session:
            studies = session.scalars(
                select(Study)
                .where(Study.researcher_id == caller.principal_id)
                .order_by(Study.created.desc())
                .options(selectinload(Study.runs), selectinload(Study.researcher))
            ).all()
            return [
                StudySummary(
                    id=s.id,
                    title=s.title,
                    researcher=s.researcher.name,
                    created=s.created,
                    sites=_sites(s),
                )
                for s in studies
            ]

    @app.get("/studies/{study_id}", tags=["researcher"])
    def get_study(study_id: str, caller: researcher) -> StudyOut:
        """One of the caller's studies with every run's status, progress and history."""
        with hub.store.session() as session:
            return _study_out(_own_study(session, study_id, caller))

    @app.post("/studies/{study_id}/cancel", tags=["researcher"])
    def cancel_study(study_id: str, caller: researcher) -> StudyOut:
        """Cancel every run of the study that has not finished."""
        return _cancel(hub, caller, study_id)

    @app.post("/studies/{study_id}/rounds", status_code=201, tags=["researcher"])
    def submit_round(study_id: str, body: RoundIn, caller: researcher) -> RoundOut:
        """Submit a signed follow-up round (same notebook, new parameters); one run per site."""
        return _submit_round(hub, caller, study_id, body)

    @app.get(
        "/studies/{study_id}/bundle",
        tags=["researcher"],
        response_class=FileResponse,
        responses={200: {"content": {"application/zip": {}}}},
    )
    def study_bundle(study_id: str, caller: researcher) -> FileResponse:
        """The caller's own study bundle (to build a round's parameters against its notebook)."""
        with hub.store.session() as session:
            path = _own_study(session, study_id, caller).bundle_path
        return FileResponse(
            hub.path(path), media_type="application/zip", filename=f"{study_id}.zip"
        )

    @app.get(
        "/runs/{run_id}/release",
        tags=["researcher"],
        response_class=FileResponse,
        responses={200: {"content": {"application/zip": {}, "application/gzip": {}}}},
    )
    def download_release(run_id: str, caller: researcher) -> FileResponse:
        """The signed release archive of a released run of the caller's study."""
        with hub.store.session() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise HubError(404, f"no run {run_id}", subject=run_id)
            if run.study.researcher_id != caller.principal_id:
                raise HubError(
                    403, "this run belongs to another researcher's study", subject=run_id
                )
            release = session.scalars(select(Release).where(Release.run_id == run_id)).first()
            if run.status != "released" or release is None:
                raise HubError(409, f"the run is {run.status}, not released", subject=run_id)
            path, fmt, digest = release.path, release.archive_format, release.sha256
        hub.record(caller.actor, "download", run_id, event="release_downloaded", sha256=digest)
        return FileResponse(
            hub.path(path),
            media_type="application/zip" if fmt == "zip" else "application/gzip",
            filename=f"release-{run_id}.{fmt}",
        )

    # -- node ------------------------------------------------------------------------------

    @app.post(
        "/nodes/next",
        tags=["node"],
        response_model=NextRunOut,
        responses={204: {"description": "Nothing for this site arrived in time"}},
    )
    async def next_run(
        request: Request,
        caller: node,
        wait: Annotated[int, Query(ge=0, le=60, description="seconds to wait")] = 25,
    ) -> NextRunOut | Response:
        """Long-poll: claim the oldest queued run of the caller's site, waiting up to ``wait`` s."""
        assert caller.site is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with hub.notifier.waiting(caller.site) as arrived:
            while True:
                # Cleared before looking, so a submission between the look and the wait
                # still wakes us; the timeout re-checks for other hub processes' runs.
                arrived.clear()
                if await request.is_disconnected():
                    # The node gave up on this poll (a dropped connection): a run claimed
                    # now would never reach it and would stay leased to it for lease_s.
                    return Response(status_code=204)
                found = await run_in_threadpool(_claim, hub, caller)
                if found is not None:
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return Response(status_code=204)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), min(hub.poll_interval_s, remaining))

    @app.get(
        "/nodes/bundles/{study_id}",
        tags=["node"],
        response_class=FileResponse,
        responses={200: {"content": {"application/zip": {}}}},
    )
    def node_bundle(study_id: str, caller: node) -> FileResponse:
        """The study bundle, for a node whose site is one of the study's sites."""
        with hub.store.session() as session:
            study = session.get(Study, study_id)
            if study is None:
                raise HubError(404, f"no study {study_id}", subject=study_id)
            if caller.site not in {r.site for r in study.runs}:
                raise HubError(403, "this study does not target your site", subject=study_id)
            path = study.bundle_path
        hub.record(caller.actor, "download", study_id, event="bundle_downloaded")
        return FileResponse(
            hub.path(path), media_type="application/zip", filename=f"{study_id}.zip"
        )

    @app.post("/runs/{run_id}/status", tags=["node"])
    def run_status(run_id: str, body: StatusIn, caller: node) -> RunOut:
        """Report a run's status (validated against the lifecycle) and progress."""
        return _update_status(hub, caller, run_id, body)

    @app.post("/runs/{run_id}/release", status_code=201, tags=["node"], openapi_extra=_ARCHIVE_BODY)
    async def upload_release(request: Request, run_id: str, caller: node) -> ReleaseOut:
        """Upload the signed release folder (zip or tar.gz); verified before it is stored."""
        data = await _read_body(
            request,
            hub.max_release_bytes,
            "release archive",
            ("application/zip", "application/gzip", "application/x-gzip", "application/x-tar"),
        )
        return await run_in_threadpool(_release, hub, caller, run_id, data)

    return app
