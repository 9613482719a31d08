"""Quarantine review: the samples `nightly` held back (where their files lie, score and z-score, the
step) and one final decision per sample (accept: learned at the next nightly run; reject: kept out).

Quarantines from before this revision keep only their `ingested_files` rows (status `quarantined`) and
are not listed for review.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "quarantined_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("z", sa.Float(), nullable=False),
        sa.Column("quarantined_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_quarantined_samples"),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name="fk_quarantined_samples_step_id_steps"),
    )
    op.create_index("ix_quarantined_samples_step_id", "quarantined_samples", ["step_id"])
    op.create_table(
        "quarantine_decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("decided_at", TS, nullable=False),
        sa.Column("decided_by", sa.String(length=255), nullable=True),
        sa.Column("learned_step_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_quarantine_decisions"),
        sa.UniqueConstraint("sample_id", name="uq_quarantine_decisions_sample_id"),
        sa.CheckConstraint("decision IN ('accept', 'reject')", name=op.f("ck_quarantine_decisions_decision")),
        sa.ForeignKeyConstraint(["sample_id"], ["quarantined_samples.id"],
                                name="fk_quarantine_decisions_sample_id_quarantined_samples"),
        sa.ForeignKeyConstraint(["learned_step_id"], ["steps.id"],
                                name="fk_quarantine_decisions_learned_step_id_steps"),
    )
    op.create_index("ix_quarantine_decisions_learned_step_id", "quarantine_decisions", ["learned_step_id"])


def downgrade() -> None:
    op.drop_table("quarantine_decisions")
    op.drop_table("quarantined_samples")
