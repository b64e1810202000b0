"""The node's local review API: the review queue over REST, for the JupyterLab extension.

A FastAPI app (OpenAPI spec at ``/openapi.json``) over the same
:class:`~phds_tre.node.review.ReviewQueue` as ``phds review …`` — one implementation of
the rules. It is served on loopback only (``127.0.0.1``), in a background thread of
``phds node serve --review-port PORT``: the reviewer's JupyterLab runs on the node.

Endpoints::

    GET  /review/runs                                    the queue (?all=true: every held run)
    GET  /review/runs/{run_id}                           outputs, verdicts, content, decisions
    POST /review/runs/{run_id}/outputs/{output}/decision {"decision": …, "comment": …}
    POST /review/runs/{run_id}/release                   {"comment": …} (optional)

Authentication: ``Authorization: Bearer phdsr_<id>_<secret>``, a reviewer token made
with ``phds review token NAME`` (shown once); node state keeps only the secret's
sha256 (:func:`phds_tre.hub.auth.hash_secret`, as the hub does). The token's reviewer
is the one recorded for every decision. Refusals are JSON ``{"reason": …}``: 401
without or with a wrong token, 403 the study's author or an identifier, 404 unknown,
409 released or undecided outputs, 422 missing comment or bad input.
"""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from phds_tre import __version__
from phds_tre.hub.auth import hash_secret
from phds_tre.node.review import ReviewError, ReviewQueue
from phds_tre.node.state import NodeState

__all__ = [
    "LOOPBACK",
    "TOKEN_PREFIX",
    "ReviewServer",
    "create_review_app",
    "issue_reviewer_token",
    "revoke_reviewer_token",
    "serve_review_api",
]

#: The only address the review API listens on.
LOOPBACK = "127.0.0.1"
#: Reviewer tokens: ``phdsr_<16 hex id>_<secret>`` (the hub's are ``phds_…``).
TOKEN_PREFIX = "phdsr_"
_TOKEN_RE = re.compile(r"phdsr_([0-9a-f]{16})_([A-Za-z0-9_\-]{20,100})")


def issue_reviewer_token(work_dir: str | Path, reviewer: str) -> str:
    """A new bearer token for ``reviewer`` at this node; the secret is not stored."""
    reviewer = " ".join(reviewer.split())
    if not reviewer or len(reviewer) > 200 or not reviewer.isprintable():
        raise ValueError("reviewer name must be 1-200 printable characters")
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    NodeState(Path(work_dir) / "node.sqlite").add_reviewer_token(
        token_id, reviewer, hash_secret(secret)
    )
    return f"{TOKEN_PREFIX}{token_id}_{secret}"


def revoke_reviewer_token(work_dir: str | Path, token_id: str) -> None:
    """Revoke a reviewer token by its id (the 16 hex digits after ``phdsr_``)."""
    if not NodeState(Path(work_dir) / "node.sqlite").revoke_reviewer_token(token_id):
        raise ValueError(f"no live reviewer token {token_id!r}")


class DecisionIn(BaseModel):
    """A reviewer's decision on one output."""

    decision: Literal["approve", "reject", "redact"]
    comment: str = Field("", max_length=2000)


class ReleaseIn(BaseModel):
    """Releasing a reviewed run (the comment goes into the release manifest)."""

    comment: str = Field("", max_length=2000)


class DecisionOut(BaseModel):
    """A recorded decision."""

    run_id: str
    output: str
    decision: str
    comment: str
    reviewer: str
    decided_at: str


class RunSummaryOut(BaseModel):
    """One run of the review queue."""

    run_id: str
    study_id: str
    status: str
    researcher: str
    held: int
    decided: int
    opened_at: str
    released_by: str | None


class OutputOut(BaseModel):
    """One output as the reviewer sees it."""

    output: str
    output_type: str
    kind: str
    verdict: str
    reasons: list[str]
    release: str | None
    content: str
    files: list[str]
    identifier_found: bool
    needs_decision: bool
    decision: dict[str, str] | None


class RunReviewOut(RunSummaryOut):
    """A held run with every output."""

    outputs: list[OutputOut]


class ReleaseOut(BaseModel):
    """A released run: the node builds, signs and uploads the release on its next turn."""

    run_id: str
    status: str
    released_by: str
    detail: str


class ErrorOut(BaseModel):
    """A refusal."""

    reason: str


_REFUSALS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422)
}


def current_reviewer(request: Request) -> str:
    """The reviewer behind the bearer token (401 for none, unknown or revoked)."""
    queue: ReviewQueue = request.app.state.queue
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ReviewError(401, "a reviewer token is required (Authorization: Bearer …)")
    match = _TOKEN_RE.fullmatch(token.strip())
    found = queue.state.reviewer_token(match.group(1)) if match else None
    if match is None or found is None:
        raise ReviewError(401, "unknown or revoked reviewer token")
    name, digest = found
    if not hmac.compare_digest(digest, hash_secret(match.group(2))):
        raise ReviewError(401, "unknown or revoked reviewer token")
    return name


#: A route parameter that is the authenticated reviewer's name.
Reviewer = Annotated[str, Depends(current_reviewer)]


def create_review_app(work_dir: str | Path) -> FastAPI:
    """The review API over the node working folder ``work_dir``."""
    queue = ReviewQueue(work_dir)
    app = FastAPI(
        title="phds node review API",
        version=__version__,
        description=__doc__,
        responses=_REFUSALS,
    )
    app.state.queue = queue

    @app.exception_handler(ReviewError)
    async def refused(_request: Request, exc: ReviewError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"reason": exc.reason}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"reason": f"bad request: {problems}"}, status_code=422)

    @app.get("/review/runs", tags=["review"])
    def list_runs(
        _who: Reviewer, include_released: Annotated[bool, Query(alias="all")] = False
    ) -> list[RunSummaryOut]:
        """Runs awaiting review (``all=true``: every run ever held), oldest first."""
        return [RunSummaryOut(**vars(s)) for s in queue.list(include_released=include_released)]

    @app.get("/review/runs/{run_id}", tags=["review"])
    def show_run(run_id: str, _who: Reviewer) -> RunReviewOut:
        """Every output of a held run: verdict, the rules' reasons, kind, content, decision."""
        return RunReviewOut.model_validate(queue.show(run_id).to_dict())

    @app.post("/review/runs/{run_id}/outputs/{output}/decision", tags=["review"])
    def decide(run_id: str, output: str, body: DecisionIn, who: Reviewer) -> DecisionOut:
        """Approve, reject or redact one output (``cell:output``); changeable until release."""
        stored = queue.decide(run_id, output, body.decision, body.comment, who)
        return DecisionOut(run_id=run_id, **stored.to_dict())

    @app.post("/review/runs/{run_id}/release", tags=["review"])
    def release(run_id: str, who: Reviewer, body: ReleaseIn | None = None) -> ReleaseOut:
        """Release a run whose held outputs are all decided (409 otherwise)."""
        run = queue.release(run_id, who, body.comment if body else "")
        return ReleaseOut(
            run_id=run_id,
            status=run.status,
            released_by=who,
            detail="the node rebuilds the release with the decisions, signs and uploads it",
        )

    return app


class ReviewServer:
    """The review API served by uvicorn in a background thread, on loopback only."""

    def __init__(self, work_dir: str | Path, port: int) -> None:
        """Prepare (not start) a server for ``work_dir`` on ``127.0.0.1:port`` (0: any free port)."""
        import uvicorn

        config = uvicorn.Config(
            create_review_app(work_dir), host=LOOPBACK, port=port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="review-api", daemon=True)

    @property
    def port(self) -> int:
        """The port listened on (the real one when 0 was asked for)."""
        servers = getattr(self.server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self.server.config.port)

    def start(self, timeout_s: float = 15.0) -> ReviewServer:
        """Start serving; raises ``RuntimeError`` when it did not start (e.g. port taken)."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the review API did not start on {LOOPBACK}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_review_api(work_dir: str | Path, port: int) -> ReviewServer:
    """Start the review API for ``work_dir`` on ``127.0.0.1:port`` in a background thread."""
    return ReviewServer(work_dir, port).start()
