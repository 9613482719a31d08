"""Initial task store: classes, steps, model versions, exemplars, evaluation sets, evaluations (R),
thresholds, ingested files.

Written by hand to match iumad/store/models.py (tests/test_store.py compares them with autogenerate).
Enumerations are CHECK constraints on strings (no database ENUM types); timestamps are timezone-aware.

Revision ID: 0001
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TS = sa.DateTime(timezone=True)

# steps <-> model_versions reference each other. SQLite accepts a foreign key to a table created later
# (and cannot add one afterwards); PostgreSQL needs the second half of the cycle added with ALTER.
STEP_VERSION_FKS = (
    ("fk_steps_parent_version_id_model_versions", "parent_version_id"),
    ("fk_steps_result_version_id_model_versions", "result_version_id"),
)


def upgrade() -> None:
    inline = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("result_version_id", sa.Integer(), nullable=True),
        sa.Column("config_hash", sa.String(length=64), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_steps"),
        sa.UniqueConstraint("step_index", name="uq_steps_step_index"),
        sa.CheckConstraint("kind IN ('add-class', 'update', 'rollback')", name=op.f("ck_steps_kind")),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')", name=op.f("ck_steps_status")),
        *([sa.ForeignKeyConstraint([col], ["model_versions.id"], name=name) for name, col in STEP_VERSION_FKS]
          if inline else []),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_dir", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=True),
        sa.Column("alias", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("checkpoint_dir", name="uq_model_versions_checkpoint_dir"),
        sa.UniqueConstraint("alias", name="uq_model_versions_alias"),
        sa.CheckConstraint("alias IN ('production', 'candidate')", name=op.f("ck_model_versions_alias")),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name="fk_model_versions_step_id_steps"),
    )
    op.create_index("ix_model_versions_step_id", "model_versions", ["step_id"])
    if not inline:
        for name, col in STEP_VERSION_FKS:
            op.create_foreign_key(name, "steps", "model_versions", [col], ["id"])

    op.create_table(
        "classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("modalities", sa.JSON(), nullable=False),
        sa.Column("arrival_order", sa.Integer(), nullable=False),
        sa.Column("data_root", sa.Text(), nullable=False),
        sa.Column("data_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("text_embedding", sa.LargeBinary(), nullable=True),
        sa.Column("added_at", TS, nullable=False),
        sa.Column("added_step_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_classes"),
        sa.UniqueConstraint("name", name="uq_classes_name"),
        sa.UniqueConstraint("arrival_order", name="uq_classes_arrival_order"),
        sa.ForeignKeyConstraint(["added_step_id"], ["steps.id"], name="fk_classes_added_step_id_steps"),
    )
    op.create_index("ix_classes_added_step_id", "classes", ["added_step_id"])

    op.create_table(
        "exemplars",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("cache_key", sa.String(length=128), nullable=True),
        sa.Column("step_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_exemplars"),
        sa.UniqueConstraint("class_id", "rank", name="uq_exemplars_class_id_rank"),
        sa.ForeignKeyConstraint(["class_id"], ["classes.id"], name="fk_exemplars_class_id_classes"),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name="fk_exemplars_step_id_steps"),
    )
    op.create_index("ix_exemplars_class_id", "exemplars", ["class_id"])
    op.create_index("ix_exemplars_step_id", "exemplars", ["step_id"])

    op.create_table(
        "evaluation_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("split", sa.String(length=32), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_evaluation_sets"),
        sa.UniqueConstraint("class_id", "split", name="uq_evaluation_sets_class_id_split"),
        sa.ForeignKeyConstraint(["class_id"], ["classes.id"], name="fk_evaluation_sets_class_id_classes"),
    )
    op.create_index("ix_evaluation_sets_class_id", "evaluation_sets", ["class_id"])

    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_evaluations"),
        sa.UniqueConstraint("step_id", "class_id", "metric", name="uq_evaluations_step_id_class_id_metric"),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name="fk_evaluations_step_id_steps"),
        sa.ForeignKeyConstraint(["class_id"], ["classes.id"], name="fk_evaluations_class_id_classes"),
    )
    op.create_index("ix_evaluations_class_id", "evaluations", ["class_id"])

    op.create_table(
        "thresholds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("warning", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_thresholds"),
        sa.UniqueConstraint("model_version_id", "class_id", name="uq_thresholds_model_version_id_class_id"),
        sa.CheckConstraint("method IN ('defects', 'normal-quantile')", name=op.f("ck_thresholds_method")),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"],
                                name="fk_thresholds_model_version_id_model_versions"),
        sa.ForeignKeyConstraint(["class_id"], ["classes.id"], name="fk_thresholds_class_id_classes"),
    )
    op.create_index("ix_thresholds_class_id", "thresholds", ["class_id"])

    op.create_table(
        "ingested_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=True),
        sa.Column("ingested_at", TS, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ingested_files"),
        sa.UniqueConstraint("sha256", name="uq_ingested_files_sha256"),
        sa.CheckConstraint("status IN ('ingested', 'quarantined')", name=op.f("ck_ingested_files_status")),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name="fk_ingested_files_step_id_steps"),
    )
    op.create_index("ix_ingested_files_step_id", "ingested_files", ["step_id"])


def downgrade() -> None:
    inline = op.get_bind().dialect.name == "sqlite"
    for table in ("ingested_files", "thresholds", "evaluations", "evaluation_sets", "exemplars", "classes"):
        op.drop_table(table)
    # Break the cycle first: SQLite (foreign keys on) refuses to drop a table that rows still reference.
    op.execute("UPDATE steps SET parent_version_id = NULL, result_version_id = NULL")
    if not inline:
        for name, _ in STEP_VERSION_FKS:
            op.drop_constraint(name, "steps", type_="foreignkey")
    op.drop_table("model_versions")
    op.drop_table("steps")
