"""Initial hub schema: principals, tokens, studies, runs, run_events, releases.

Revision ID: 0001_initial
Revises:
Create Date: 2026-05-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from phds_tre.hub.models import UTCDateTime

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the six hub tables (written out, not generated, so the revision is stable)."""
    op.create_table(
        "principals",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("site", sa.String(64), nullable=True),
        sa.Column("public_key", sa.String(64), nullable=True),
        sa.Column("created", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_principals_site", "principals", ["site"])
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("principal_id", sa.Integer(), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("expires", UTCDateTime(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_tokens_principal_id", "tokens", ["principal_id"])
    op.create_table(
        "studies",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("researcher_id", sa.Integer(), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("bundle_path", sa.String(500), nullable=False),
        sa.Column("manifest_json", sa.Text(), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_studies_researcher_id", "studies", ["researcher_id"])
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("study_id", sa.String(64), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("cells_done", sa.Integer(), nullable=False),
        sa.Column("cells_total", sa.Integer(), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("updated", UTCDateTime(), nullable=False),
        sa.Column("claimed_by", sa.Integer(), sa.ForeignKey("principals.id"), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("claims", sa.Integer(), nullable=False),
    )
    op.create_index("ix_runs_study_id", "runs", ["study_id"])
    op.create_index("ix_runs_site_status_created", "runs", ["site", "status", "created"])
    op.create_table(
        "run_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_run_events_run_id", "run_events", ["run_id"])
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.id"), nullable=False, unique=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("archive_format", sa.String(8), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    """Drop every hub table (children first)."""
    for table in ("releases", "run_events", "runs", "studies", "tokens", "principals"):
        op.drop_table(table)
