"""Retention: a model version can be pinned (`iumad pin`, kept by `iumad gc`) and records when gc removed
its files (the row stays, for history and the steps that reference it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# Plain ALTER TABLE on every backend (SQLite >= 3.35 drops columns natively): a batch copy of the table
# would have to drop model_versions, which steps reference, and SQLite refuses that with foreign keys on.
def upgrade() -> None:
    op.add_column("model_versions", sa.Column("pinned", sa.Boolean(), nullable=False,
                                              server_default=sa.text("false")))
    op.add_column("model_versions", sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("model_versions", "removed_at")
    op.drop_column("model_versions", "pinned")
