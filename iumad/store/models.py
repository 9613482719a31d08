"""The task store's tables (SQLAlchemy 2.0 declarative, portable to SQLite and PostgreSQL).

Why these choices:
- Enumerations are strings with CHECK constraints, not database ENUM types, so migrations stay the same
  on every backend.
- Timestamps go through `UTCDateTime`: stored as UTC, always read back timezone-aware (SQLite keeps no
  zone, PostgreSQL returns the session zone).
- Constraint names come from a naming convention so that Alembic migrations can address them by name.
- `steps` and `model_versions` reference each other (a step starts from a parent version and may create
  one; a version remembers the step that made it); the steps -> versions keys are `use_alter` so the
  cycle can be created on PostgreSQL. The initial migration mirrors this table by table.
- `model_versions.alias` is UNIQUE: NULLs do not collide on SQLite or PostgreSQL, so at most one
  `production` and one `candidate` exist while any number of versions carry no alias.

Keep `migrations/versions/` in step with this file: `tests/test_store.py` compares them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STEP_KINDS = ("add-class", "update", "rollback")
STEP_STATUSES = ("running", "succeeded", "failed")
ALIASES = ("production", "candidate")
THRESHOLD_METHODS = ("defects", "normal-quantile")
INGEST_STATUSES = ("ingested", "quarantined")
QUARANTINE_DECISIONS = ("accept", "reject")
MODALITY_NAMES = ("rgb", "geometry")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of timestamp the store accepts)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend; naive datetimes are refused (they hide bugs)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps timezone-aware UTC times")
        value = value.astimezone(timezone.utc)
        # SQLite has no zone type: store the UTC wall time; PostgreSQL keeps the aware value.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect: Dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ProductClass(Base):
    """A learned product class; `arrival_order` is the order of the incremental protocol (0, 1, ...)."""

    __tablename__ = "classes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    prompt: Mapped[Optional[str]] = mapped_column(Text)
    modalities: Mapped[list[str]] = mapped_column(JSON)
    arrival_order: Mapped[int] = mapped_column(Integer, unique=True)
    data_root: Mapped[str] = mapped_column(Text)
    data_fingerprint: Mapped[Optional[str]] = mapped_column(String(64))
    text_embedding: Mapped[Optional[bytes]] = mapped_column(LargeBinary)  # little-endian float32
    added_at: Mapped[datetime] = mapped_column(UTCDateTime())
    added_step_id: Mapped[Optional[int]] = mapped_column(ForeignKey("steps.id"), index=True)

    def __repr__(self) -> str:
        return f"ProductClass(id={self.id}, name={self.name!r}, arrival_order={self.arrival_order})"


class Step(Base):
    """One unit of incremental work; `pid`/`host` let `db check` tell a live `running` step from a dead one."""

    __tablename__ = "steps"
    __table_args__ = (
        CheckConstraint(_in("kind", STEP_KINDS), name="kind"),
        CheckConstraint(_in("status", STEP_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_index: Mapped[int] = mapped_column(Integer, unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    classes: Mapped[list[str]] = mapped_column(JSON)  # class names the step touched
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    error: Mapped[Optional[str]] = mapped_column(Text)
    parent_version_id: Mapped[Optional[int]] = mapped_column(ForeignKey("model_versions.id", use_alter=True))
    result_version_id: Mapped[Optional[int]] = mapped_column(ForeignKey("model_versions.id", use_alter=True))
    config_hash: Mapped[Optional[str]] = mapped_column(String(64))
    seed: Mapped[Optional[int]] = mapped_column(BigInteger)
    pid: Mapped[Optional[int]] = mapped_column(Integer)
    host: Mapped[Optional[str]] = mapped_column(String(255))

    def __repr__(self) -> str:
        return f"Step(id={self.id}, index={self.step_index}, kind={self.kind!r}, status={self.status!r})"


class ModelVersion(Base):
    """A saved detector: `checkpoint_dir` is relative to the store root; `sha256`/`size_bytes` are model.pt's."""

    __tablename__ = "model_versions"
    __table_args__ = (CheckConstraint(_in("alias", ALIASES), name="alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_dir: Mapped[str] = mapped_column(Text, unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    step_id: Mapped[Optional[int]] = mapped_column(ForeignKey("steps.id"), index=True)
    alias: Mapped[Optional[str]] = mapped_column(String(16), unique=True)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))  # gc keeps it
    removed_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())  # when gc deleted its files

    def __repr__(self) -> str:
        return f"ModelVersion(id={self.id}, dir={self.checkpoint_dir!r}, alias={self.alias!r})"


class Exemplar(Base):
    """A replay exemplar: a reference to a normal sample by path + content sha256, never a copy."""

    __tablename__ = "exemplars"
    __table_args__ = (UniqueConstraint("class_id", "rank"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("classes.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    rank: Mapped[int] = mapped_column(Integer)
    cache_key: Mapped[Optional[str]] = mapped_column(String(128))
    step_id: Mapped[Optional[int]] = mapped_column(ForeignKey("steps.id"), index=True)
    # every file of the sample: {"rgb": {"path", "sha256"}, "geometry": {...}, "geometry_kind", ...}
    record: Mapped[Optional[dict]] = mapped_column(JSON)


class EvaluationSet(Base):
    """Where a class's held-out evaluation data lives, so later steps re-evaluate old classes the same way."""

    __tablename__ = "evaluation_sets"
    __table_args__ = (UniqueConstraint("class_id", "split"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("classes.id"), index=True)
    root: Mapped[str] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(32))
    n_samples: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[Optional[str]] = mapped_column(String(64))
    # continual.evaluation_budget's fixed subset: {"budget", "seed", "keys": [sample keys]}; None = none chosen
    subset: Mapped[Optional[dict]] = mapped_column(JSON)


class Evaluation(Base):
    """One cell of the matrix R: metric of class `class_id` after step `step_id` (None = undefined)."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("step_id", "class_id", "metric"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("steps.id"))
    class_id: Mapped[int] = mapped_column(ForeignKey("classes.id"), index=True)
    metric: Mapped[str] = mapped_column(String(32))
    value: Mapped[Optional[float]] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)


class Threshold(Base):
    """The decision threshold of one class under one model version, with how it was chosen."""

    __tablename__ = "thresholds"
    __table_args__ = (
        UniqueConstraint("model_version_id", "class_id"),
        CheckConstraint(_in("method", THRESHOLD_METHODS), name="method"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    class_id: Mapped[int] = mapped_column(ForeignKey("classes.id"), index=True)
    value: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(32))
    warning: Mapped[Optional[str]] = mapped_column(Text)


class IngestedFile(Base):
    """A file the nightly job has seen, by content sha256, so re-delivered files are not learned twice."""

    __tablename__ = "ingested_files"
    __table_args__ = (CheckConstraint(_in("status", INGEST_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    class_name: Mapped[str] = mapped_column(String(64))
    step_id: Mapped[Optional[int]] = mapped_column(ForeignKey("steps.id"), index=True)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[Optional[str]] = mapped_column(Text)



class QuarantinedSample(Base):
    """A delivered "good" sample that `nightly` held back (its z-score was too high): where its files lie
    now (store-relative, under quarantine/), what it scored, and the step that held it back (None when
    that run learned nothing). Its files' content rows stay in `ingested_files` as `quarantined`."""

    __tablename__ = "quarantined_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    class_name: Mapped[str] = mapped_column(String(64))
    step_id: Mapped[Optional[int]] = mapped_column(ForeignKey("steps.id"), index=True)
    source: Mapped[str] = mapped_column(Text)  # the inbox path it was delivered at
    # {"rgb": "quarantine/step-0003/bolt/900.png" or None, "geometry": ... or None, "geometry_kind": ...}
    files: Mapped[dict] = mapped_column(JSON)
    score: Mapped[float] = mapped_column(Float)
    z: Mapped[float] = mapped_column(Float)
    quarantined_at: Mapped[datetime] = mapped_column(UTCDateTime())


class QuarantineDecision(Base):
    """A person's decision on a quarantined sample: `accept` (learned at the next nightly run, which
    sets `learned_step_id`) or `reject` (kept out for good). One per sample: decisions are final."""

    __tablename__ = "quarantine_decisions"
    __table_args__ = (CheckConstraint(_in("decision", QUARANTINE_DECISIONS), name="decision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("quarantined_samples.id"), unique=True)
    decision: Mapped[str] = mapped_column(String(16))
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime())
    decided_by: Mapped[Optional[str]] = mapped_column(String(255))
    learned_step_id: Mapped[Optional[int]] = mapped_column(ForeignKey("steps.id"), index=True)
