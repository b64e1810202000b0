"""The hub's tables as SQLAlchemy 2.0 ORM classes (portable: SQLite and PostgreSQL).

Timestamps are timezone-aware UTC on the way in and out: SQLite keeps no zone, so
:class:`UTCDateTime` stores naive UTC and re-attaches the zone when reading.
Secrets are never stored: a token row holds the sha256 of its secret only.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ACTIVE_STATUSES",
    "ROLES",
    "RUN_STATUSES",
    "TERMINAL_STATUSES",
    "Base",
    "Principal",
    "Release",
    "Round",
    "Run",
    "RunEvent",
    "Study",
    "Token",
    "UTCDateTime",
    "utc_now",
]

#: Who may hold a token.
ROLES = ("admin", "researcher", "node", "reviewer")

#: Every status a run can have, in lifecycle order.
RUN_STATUSES = (
    "submitted",
    "awaiting_approval",
    "queued",
    "running",
    "checking",
    "awaiting_review",
    "released",
    "rejected",
    "failed",
    "cancelled",
)
#: Statuses a run never leaves.
TERMINAL_STATUSES = frozenset({"released", "rejected", "failed", "cancelled"})
#: Statuses of a run that is not finished.
ACTIVE_STATUSES = tuple(s for s in RUN_STATUSES if s not in TERMINAL_STATUSES)


def utc_now() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        """Refuse naive times (ambiguous); store UTC (naive on SQLite, which has no zones)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the hub store; use UTC-aware times")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        """Re-attach UTC to what SQLite gives back naive."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of every hub table."""


class Principal(Base):
    """Someone or something that holds tokens: a hub admin, researcher, site node or reviewer."""

    __tablename__ = "principals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    #: The hospital of a node or reviewer; None for admins and researchers.
    site: Mapped[str | None] = mapped_column(String(64), index=True)
    #: Raw 32-byte Ed25519 public key, base64: researchers sign bundles, nodes releases.
    public_key: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)


class Token(Base):
    """A bearer token: ``phds_<id>_<secret>``; only the secret's sha256 is kept."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    principal_id: Mapped[int] = mapped_column(ForeignKey("principals.id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    #: The role the token acts as (its scope); fixed when issued.
    scope: Mapped[str] = mapped_column(String(16))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)
    expires: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    principal: Mapped[Principal] = relationship()


class Study(Base):
    """A submitted study bundle, addressed by its study id (sha256 of the manifest)."""

    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    researcher_id: Mapped[int] = mapped_column(ForeignKey("principals.id"), index=True)
    title: Mapped[str] = mapped_column(String(500))
    #: sha256 of the bundle zip's bytes (the study id covers the manifest only).
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    #: Where the bundle zip is, relative to the hub's data folder.
    bundle_path: Mapped[str] = mapped_column(String(500))
    #: The manifest as canonical JSON text (so parameters need no re-read of the zip).
    manifest_json: Mapped[str] = mapped_column(Text)
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)
    #: When the researcher cancelled the study (no further rounds); None while it is open.
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    researcher: Mapped[Principal] = relationship()
    runs: Mapped[list[Run]] = relationship(back_populates="study", order_by="[Run.round, Run.site]")


class Run(Base):
    """One study at one site: its status, progress and the node's claim (lease)."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_site_status_created", "site", "status", "created"),
        Index("ix_runs_study_id_round", "study_id", "round"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    site: Mapped[str] = mapped_column(String(64))
    #: 1 for the study as submitted; 2, 3, ... for follow-up rounds (see :class:`Round`).
    round: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    status: Mapped[str] = mapped_column(String(32))
    cells_done: Mapped[int] = mapped_column(Integer, default=0)
    cells_total: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)
    updated: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)
    #: The node principal holding the run, and until when its claim of a queued run holds.
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("principals.id"))
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    claims: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="runs")
    events: Mapped[list[RunEvent]] = relationship(order_by="RunEvent.id")


class Round(Base):
    """A follow-up round (2, 3, ...) of a study: the researcher's signed round document."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("study_id", "number", name="uq_rounds_study_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    #: The round document as canonical JSON text, and its signature document (JSON).
    document_json: Mapped[str] = mapped_column(Text)
    signature_json: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)


class RunEvent(Base):
    """One step of a run's status history (append-only)."""

    __tablename__ = "run_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)
    status: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text, default="")


class Release(Base):
    """The signed release archive of a run, verified before it was stored (one per run)."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), unique=True)
    key_id: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    #: Relative to the hub's data folder.
    path: Mapped[str] = mapped_column(String(500))
    #: ``zip`` or ``tar.gz``: how the archive was uploaded, served back as is.
    archive_format: Mapped[str] = mapped_column(String(8))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)
