"""Follow-up rounds: runs.round, studies.cancelled_at, and the rounds table.

Revision ID: 0002_rounds
Revises: 0001_initial
Create Date: 2026-11-22

Existing rows keep their meaning: every run so far is round 1 (a server default, so the
column is added without rewriting the table), and a study with a run the researcher
cancelled is marked cancelled at the time of that run's last update (``cancelled`` is a
status only the researcher's cancel request sets).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from phds_tre.hub.models import UTCDateTime

revision = "0002_rounds"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the round number to runs, the cancel time to studies, and the rounds table."""
    op.add_column(
        "runs", sa.Column("round", sa.Integer(), nullable=False, server_default=sa.text("1"))
    )
    op.create_index("ix_runs_study_id_round", "runs", ["study_id", "round"])
    op.add_column("studies", sa.Column("cancelled_at", UTCDateTime(), nullable=True))
    op.execute(
        "UPDATE studies SET cancelled_at = (SELECT MAX(runs.updated) FROM runs "
        "WHERE runs.study_id = studies.id AND runs.status = 'cancelled') "
        "WHERE EXISTS (SELECT 1 FROM runs WHERE runs.study_id = studies.id "
        "AND runs.status = 'cancelled')"
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("study_id", sa.String(64), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("document_json", sa.Text(), nullable=False),
        sa.Column("signature_json", sa.Text(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("study_id", "number", name="uq_rounds_study_number"),
    )
    op.create_index("ix_rounds_study_id", "rounds", ["study_id"])


def downgrade() -> None:
    """Drop the rounds table and the new columns (follow-up runs are deleted first)."""
    op.drop_index("ix_rounds_study_id", table_name="rounds")
    op.drop_table("rounds")
    op.execute("DELETE FROM run_events WHERE run_id IN (SELECT id FROM runs WHERE round > 1)")
    op.execute("DELETE FROM releases WHERE run_id IN (SELECT id FROM runs WHERE round > 1)")
    op.execute("DELETE FROM runs WHERE round > 1")
    op.drop_index("ix_runs_study_id_round", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("round")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("cancelled_at")
