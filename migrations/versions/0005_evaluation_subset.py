"""Evaluation sets record the fixed subset that `continual.evaluation_budget` evaluates old classes on
(one nullable JSON column: strictly additive, so stores without a budget are unchanged).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# Plain ALTER TABLE ADD COLUMN on every backend (as 0003): nothing else in the table changes.
def upgrade() -> None:
    op.add_column("evaluation_sets", sa.Column("subset", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("evaluation_sets", "subset")
