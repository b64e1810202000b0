"""The hub's REST models: request and response bodies, and so its OpenAPI document."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AuditVerifyOut",
    "ErrorOut",
    "HealthOut",
    "NextRunOut",
    "PrincipalIn",
    "PrincipalOut",
    "ReleaseOut",
    "RoundIn",
    "RoundOut",
    "RunEventOut",
    "RunOut",
    "StatusIn",
    "StudyOut",
    "StudySummary",
    "TokenIn",
    "TokenOut",
    "TokenRevokedOut",
]

Role = Literal["admin", "researcher", "node", "reviewer"]
#: What a node may set with POST /runs/{id}/status (``released`` only by uploading a release).
NodeStatus = Literal[
    "awaiting_approval", "queued", "running", "checking", "awaiting_review", "rejected", "failed"
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorOut(BaseModel):
    """Every refusal: the reason in one line, and the problems found (if any)."""

    reason: str
    problems: list[str] = []


class HealthOut(BaseModel):
    """``GET /health``."""

    status: Literal["ok"]
    database: str


class PrincipalIn(_In):
    """A principal to register."""

    name: str = Field(min_length=1, max_length=200)
    role: Role
    site: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,64}$")
    public_key: str | None = Field(
        default=None, max_length=64, description="base64 of the raw 32-byte Ed25519 public key"
    )


class PrincipalOut(BaseModel):
    """A registered principal."""

    id: int
    name: str
    role: Role
    site: str | None
    key_id: str | None


class TokenIn(_In):
    """A token to issue for a principal (by name)."""

    principal: str = Field(min_length=1, max_length=200)
    expires_in_s: int = Field(default=30 * 24 * 3600, ge=1, le=366 * 24 * 3600)


class TokenOut(BaseModel):
    """An issued token; ``token`` (the bearer string) is shown this once and never again."""

    id: str
    token: str
    principal: str
    scope: Role
    expires: dt.datetime


class TokenRevokedOut(BaseModel):
    """A revoked token."""

    id: str
    revoked: bool
    revoked_at: dt.datetime | None


class AuditVerifyOut(BaseModel):
    """The hub audit log's hash chain, checked."""

    ok: bool
    count: int
    head_hash: str
    problems: list[str]


class RunEventOut(BaseModel):
    """One step of a run's history."""

    at: dt.datetime
    status: str
    actor: str
    detail: str


class RunOut(BaseModel):
    """A run of a study at one site, with its progress and full history."""

    id: str
    study_id: str
    site: str
    #: 1 for the study as submitted; 2, 3, ... for follow-up rounds.
    round: int = 1
    status: str
    cells_done: int
    cells_total: int
    created: dt.datetime
    updated: dt.datetime
    released: bool
    history: list[RunEventOut]


class StudySummary(BaseModel):
    """A study in a list."""

    id: str
    title: str
    researcher: str
    created: dt.datetime
    sites: list[str]


class StudyOut(StudySummary):
    """A study with its runs."""

    bundle_sha256: str
    #: The latest round number (1 until a follow-up round is submitted).
    rounds: int = 1
    #: The researcher cancelled the study: no further rounds.
    cancelled: bool = False
    runs: list[RunOut]


class NextRunOut(BaseModel):
    """What a node gets from ``POST /nodes/next``: the run it now holds and how to fetch it."""

    run: RunOut
    study_id: str
    parameters: dict[str, Any]
    bundle_url: str
    lease_until: dt.datetime
    #: For a follow-up round: the researcher's signed round document (the node verifies it).
    round: int = 1
    round_document: dict[str, Any] | None = None
    round_signature: dict[str, Any] | None = None


class StatusIn(_In):
    """A node's status or progress update of a run it holds."""

    status: NodeStatus
    cells_done: int | None = Field(default=None, ge=0)
    cells_total: int | None = Field(default=None, ge=0)
    detail: str = Field(default="", max_length=2000)


class ReleaseOut(BaseModel):
    """A verified, stored release."""

    run_id: str
    key_id: str
    sha256: str
    files: int
    created: dt.datetime


class RoundIn(_In):
    """A follow-up round: the round document and the researcher's signature over it."""

    document: dict[str, Any] = Field(description="the round document (phds.round/1)")
    signature: dict[str, Any] = Field(description="Ed25519 signature document, as for bundles")


class RoundOut(BaseModel):
    """A stored follow-up round with its new runs (one per target site)."""

    study_id: str
    round: int
    sites: list[str]
    key_id: str
    created: dt.datetime
    runs: list[RunOut]
