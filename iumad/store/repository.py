"""Small typed operations on the task store, for the orchestration (add-class, update, nightly, status).

Every function takes the caller's `Session` and only flushes: the caller's `with store.session():` block
decides what commits together. Writers call these while holding `store.writer_lock()`.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from iumad.errors import IumadError, UsageError
from iumad.store.models import (
    ALIASES,
    INGEST_STATUSES,
    MODALITY_NAMES,
    QUARANTINE_DECISIONS,
    STEP_KINDS,
    THRESHOLD_METHODS,
    Evaluation,
    EvaluationSet,
    Exemplar,
    IngestedFile,
    ModelVersion,
    ProductClass,
    QuarantineDecision,
    QuarantinedSample,
    Step,
    Threshold,
    utcnow,
)

CLASS_NAME_RULE = "^[a-z0-9][a-z0-9_-]{0,63}$"
_CLASS_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
R_STEP_KINDS = ("add-class", "update")
_IN_CHUNK = 500  # bound parameters per IN (...) query, well under SQLite's limit


# ---------------------------------------------------------------------- validation helpers


def validate_class_name(name: str) -> str:
    """Class names become folder names and CLI arguments: lowercase ASCII letters, digits, `_`, `-`."""
    if not isinstance(name, str) or not _CLASS_NAME.fullmatch(name):
        shown = repr(name)  # escapes NUL, newlines and other unprintables: the message stays one line
        if len(shown) > 60:  # bound what is printed, not the characters shown (one may repr to 10)
            shown = shown[:60] + (f"… ({len(name)} chars)" if isinstance(name, str) else "…")
        raise UsageError(f"class name {shown} is invalid: it must match {CLASS_NAME_RULE} (start with a "
                         "lowercase letter or digit; then up to 63 of a-z, 0-9, '_', '-')",
                         fix=f"name the class to match {CLASS_NAME_RULE}")
    return name


def _check_sha256(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise IumadError(f"{what}: {value!r} is not a lowercase hex sha256")
    return value


def _store_relative(path: str) -> str:
    rel = PurePosixPath(str(path))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in str(path):
        raise IumadError(f"{path!r}: checkpoint folders are recorded relative to the store root")
    return rel.as_posix()


def embedding_to_bytes(vector: np.ndarray | Sequence[float]) -> bytes:
    """Text embeddings are stored as little-endian float32 bytes (portable LargeBinary)."""
    return np.ascontiguousarray(np.asarray(vector, dtype="<f4").ravel()).tobytes()


def embedding_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


# ---------------------------------------------------------------------- classes


def next_arrival_order(session: Session) -> int:
    current = session.scalar(select(func.max(ProductClass.arrival_order)))
    return 0 if current is None else int(current) + 1


def get_class(session: Session, name: str) -> ProductClass | None:
    return session.scalar(select(ProductClass).where(ProductClass.name == name))


def require_class(session: Session, name: str) -> ProductClass:
    """The class row, or a UsageError listing what has been learned."""
    row = get_class(session, name)
    if row is None:
        known = [c.name for c in list_classes(session)]
        raise UsageError(f"class {name!r} has not been learned; learned classes: {known or 'none'}")
    return row


def list_classes(session: Session) -> list[ProductClass]:
    """Classes in arrival order (the order of the incremental protocol)."""
    return list(session.scalars(select(ProductClass).order_by(ProductClass.arrival_order)))


def register_class(session: Session, name: str, *, modalities: Sequence[str], data_root: str | Path,
                   prompt: str | None = None, data_fingerprint: str | None = None,
                   text_embedding: np.ndarray | bytes | None = None,
                   step_id: int | None = None) -> ProductClass:
    """Add a new class at the next arrival order; a known name is a UsageError (use --update)."""
    validate_class_name(name)
    mods = [m for m in MODALITY_NAMES if m in set(modalities)]
    unknown = sorted(set(modalities) - set(MODALITY_NAMES))
    if unknown or not mods:
        raise UsageError(f"class {name!r}: modalities {list(modalities)} invalid; use one or both of "
                         f"{list(MODALITY_NAMES)}")
    if get_class(session, name) is not None:
        raise UsageError(f"class {name!r} is already learned; use --update to train it on new data")
    emb = text_embedding if isinstance(text_embedding, (bytes, type(None))) else embedding_to_bytes(text_embedding)
    row = ProductClass(name=name, prompt=prompt, modalities=mods, arrival_order=next_arrival_order(session),
                       data_root=str(data_root), data_fingerprint=data_fingerprint, text_embedding=emb,
                       added_at=utcnow(), added_step_id=step_id)
    session.add(row)
    session.flush()
    return row


def delete_class(session: Session, name: str) -> None:
    """Remove a class and its exemplars, evaluation sets, evaluations and thresholds (used to undo a
    failed add-class, so that the name can be learned again)."""
    row = require_class(session, name)
    for model in (Exemplar, EvaluationSet, Evaluation, Threshold):
        session.execute(delete(model).where(model.class_id == row.id))
    session.delete(row)
    session.flush()


# ---------------------------------------------------------------------- steps


def next_step_index(session: Session) -> int:
    current = session.scalar(select(func.max(Step.step_index)))
    return 0 if current is None else int(current) + 1


def begin_step(session: Session, kind: str, classes: Sequence[str], *, parent_version_id: int | None = None,
               config_hash: str | None = None, seed: int | None = None) -> Step:
    """A new `running` step stamped with this process's pid and host; commit it right away so that
    `db check` and `status` see it while it runs."""
    if kind not in STEP_KINDS:
        raise IumadError(f"step kind {kind!r} is not one of {list(STEP_KINDS)}")
    step = Step(step_index=next_step_index(session), kind=kind, classes=list(classes), status="running",
                started_at=utcnow(), parent_version_id=parent_version_id, config_hash=config_hash, seed=seed,
                pid=os.getpid(), host=socket.gethostname())
    session.add(step)
    session.flush()
    return step


def finish_step(session: Session, step: Step | int, *, succeeded: bool, error: str | None = None,
                result_version_id: int | None = None) -> Step:
    """Close a running step as succeeded or failed (with the error text)."""
    row = step if isinstance(step, Step) else session.get(Step, step)
    if row is None:
        raise IumadError(f"step id {step!r} does not exist")
    if row.status != "running":
        raise IumadError(f"step {row.step_index} is already {row.status}")
    row.status = "succeeded" if succeeded else "failed"
    row.finished_at = utcnow()
    row.error = None if succeeded else (error or "failed")
    if result_version_id is not None:
        row.result_version_id = result_version_id
    session.flush()
    return row


def fail_stale_steps(session: Session, reason: str = "interrupted: the process ended without finishing "
                     "the step") -> list[int]:
    """Mark every `running` step failed. Call right after taking the writer lock: steps only run under
    it, so any step still `running` then belongs to a writer that died. Returns their step indices."""
    stale = list(session.scalars(select(Step).where(Step.status == "running").order_by(Step.step_index)))
    for row in stale:
        row.status, row.finished_at, row.error = "failed", utcnow(), reason
    session.flush()
    return [row.step_index for row in stale]


def list_steps(session: Session) -> list[Step]:
    return list(session.scalars(select(Step).order_by(Step.step_index)))


# ---------------------------------------------------------------------- model versions and aliases


def add_model_version(session: Session, checkpoint_dir: str, sha256: str, size_bytes: int, *,
                      step_id: int | None = None) -> ModelVersion:
    """Record a saved detector (folder relative to the store root, model.pt's sha256 and size); no alias."""
    row = ModelVersion(checkpoint_dir=_store_relative(checkpoint_dir), sha256=_check_sha256(sha256, "sha256"),
                       size_bytes=int(size_bytes), created_at=utcnow(), step_id=step_id, alias=None)
    session.add(row)
    session.flush()
    return row


def get_alias(session: Session, alias: str) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.alias == alias))


def get_production(session: Session) -> ModelVersion | None:
    return get_alias(session, "production")


def set_alias(session: Session, version_id: int, alias: str) -> ModelVersion:
    """Give `alias` to one version, taking it from whichever version had it (promoting a candidate to
    production demotes the old production to no alias). Both updates are in the caller's transaction,
    so readers see either the old or the new production, never none or two."""
    if alias not in ALIASES:
        raise IumadError(f"alias {alias!r} is not one of {list(ALIASES)}")
    row = session.get(ModelVersion, version_id)
    if row is None:
        raise IumadError(f"model version {version_id} does not exist")
    for old in session.scalars(select(ModelVersion).where(ModelVersion.alias == alias,
                                                           ModelVersion.id != version_id)):
        old.alias = None
    session.flush()  # the unique alias constraint needs the old holder cleared first
    row.alias = alias
    session.flush()
    return row


def promote(session: Session, version_id: int) -> ModelVersion:
    """Make a version (usually the candidate) production."""
    return set_alias(session, version_id, "production")


def clear_alias(session: Session, alias: str) -> None:
    row = get_alias(session, alias)
    if row is not None:
        row.alias = None
        session.flush()


# ---------------------------------------------------------------------- exemplars


@dataclass(frozen=True)
class ExemplarRecord:
    path: str
    sha256: str
    method: str
    rank: int
    cache_key: str | None = None
    record: dict | None = None  # every file of the sample, for replay (see Exemplar.record)


def record_exemplars(session: Session, class_name: str, exemplars: Iterable[ExemplarRecord], *,
                     step_id: int | None = None) -> int:
    """Replace a class's exemplar set; returns how many were recorded."""
    cls = require_class(session, class_name)
    session.execute(delete(Exemplar).where(Exemplar.class_id == cls.id))
    rows = [Exemplar(class_id=cls.id, path=str(e.path), sha256=_check_sha256(e.sha256, str(e.path)),
                     method=e.method, rank=int(e.rank), cache_key=e.cache_key, step_id=step_id,
                     record=e.record)
            for e in exemplars]
    session.add_all(rows)
    session.flush()
    return len(rows)


def list_exemplars(session: Session, class_name: str) -> list[Exemplar]:
    cls = require_class(session, class_name)
    return list(session.scalars(select(Exemplar).where(Exemplar.class_id == cls.id).order_by(Exemplar.rank)))


# ---------------------------------------------------------------------- evaluation sets


def set_evaluation_set(session: Session, class_name: str, *, root: str | Path, split: str, n_samples: int,
                       fingerprint: str | None = None, subset: dict | None = None) -> EvaluationSet:
    """Record (or replace) where a class's evaluation split lives, and its fixed evaluation subset (a
    replaced set's old subset goes with it)."""
    cls = require_class(session, class_name)
    row = session.scalar(select(EvaluationSet).where(EvaluationSet.class_id == cls.id,
                                                     EvaluationSet.split == split))
    if row is None:
        row = EvaluationSet(class_id=cls.id, split=split, root="", n_samples=0)
        session.add(row)
    row.root, row.n_samples, row.fingerprint, row.subset = str(root), int(n_samples), fingerprint, subset
    session.flush()
    return row


def set_evaluation_subset(session: Session, class_name: str, split: str, subset: dict | None) -> EvaluationSet:
    """Record the fixed subset of a class's registered evaluation set (`continual.evaluation_budget`)."""
    cls = require_class(session, class_name)
    row = session.scalar(select(EvaluationSet).where(EvaluationSet.class_id == cls.id,
                                                     EvaluationSet.split == split))
    if row is None:
        raise IumadError(f"class {class_name!r} has no {split} evaluation set to record a subset of")
    row.subset = subset
    session.flush()
    return row


def evaluation_sets(session: Session, split: str | None = None) -> list[tuple[str, EvaluationSet]]:
    """(class name, evaluation set) in arrival order, optionally of one split."""
    q = (select(ProductClass.name, EvaluationSet).join(EvaluationSet, EvaluationSet.class_id == ProductClass.id)
         .order_by(ProductClass.arrival_order, EvaluationSet.split))
    if split is not None:
        q = q.where(EvaluationSet.split == split)
    return [(name, es) for name, es in session.execute(q)]


# ---------------------------------------------------------------------- evaluations (the matrix R)


@dataclass(frozen=True)
class EvaluationRecord:
    class_name: str
    metric: str
    value: float | None  # None or NaN: undefined (e.g. AUROC with one label)
    n: int


def record_evaluations(session: Session, step_id: int, results: Iterable[EvaluationRecord]) -> int:
    """Write one row of R (the step's metrics for each class); re-recording a cell replaces it."""
    count = 0
    for r in results:
        cls = require_class(session, r.class_name)
        value = None if r.value is None or not math.isfinite(float(r.value)) else float(r.value)
        row = session.scalar(select(Evaluation).where(Evaluation.step_id == step_id,
                                                      Evaluation.class_id == cls.id,
                                                      Evaluation.metric == r.metric))
        if row is None:
            row = Evaluation(step_id=step_id, class_id=cls.id, metric=r.metric, n=0)
            session.add(row)
        row.value, row.n = value, int(r.n)
        count += 1
    session.flush()
    return count


def r_matrix(session: Session, metric: str) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(step indices, class names in arrival order, R) for succeeded add-class/update steps in order;
    R[i][j] is the metric of class j after step i, None where it was not (or could not be) measured."""
    steps = list(session.execute(select(Step.id, Step.step_index)
                                 .where(Step.status == "succeeded", Step.kind.in_(R_STEP_KINDS))
                                 .order_by(Step.step_index)))
    classes = list(session.execute(select(ProductClass.id, ProductClass.name)
                                   .order_by(ProductClass.arrival_order)))
    row_of = {sid: i for i, (sid, _) in enumerate(steps)}
    col_of = {cid: j for j, (cid, _) in enumerate(classes)}
    matrix: list[list[float | None]] = [[None] * len(classes) for _ in steps]
    if steps:
        cells = session.execute(select(Evaluation.step_id, Evaluation.class_id, Evaluation.value)
                                .join(Step, Step.id == Evaluation.step_id)
                                .where(Evaluation.metric == metric, Step.status == "succeeded",
                                       Step.kind.in_(R_STEP_KINDS)))
        for sid, cid, value in cells:
            if sid in row_of and cid in col_of:
                matrix[row_of[sid]][col_of[cid]] = value
    return [idx for _, idx in steps], [name for _, name in classes], matrix


# ---------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ThresholdRecord:
    class_name: str
    value: float
    method: str  # 'defects' | 'normal-quantile'
    warning: str | None = None


def record_thresholds(session: Session, model_version_id: int, thresholds: Iterable[ThresholdRecord]) -> int:
    """Write (or replace) the per-class thresholds of a model version."""
    count = 0
    for t in thresholds:
        if t.method not in THRESHOLD_METHODS:
            raise IumadError(f"threshold method {t.method!r} is not one of {list(THRESHOLD_METHODS)}")
        if not math.isfinite(float(t.value)):
            raise IumadError(f"class {t.class_name!r}: threshold {t.value!r} is not a finite number")
        cls = require_class(session, t.class_name)
        row = session.scalar(select(Threshold).where(Threshold.model_version_id == model_version_id,
                                                     Threshold.class_id == cls.id))
        if row is None:
            row = Threshold(model_version_id=model_version_id, class_id=cls.id, value=0.0, method=t.method)
            session.add(row)
        row.value, row.method, row.warning = float(t.value), t.method, t.warning
        count += 1
    session.flush()
    return count


def thresholds_for(session: Session, model_version_id: int) -> dict[str, Threshold]:
    """Class name -> threshold row of one model version."""
    q = (select(ProductClass.name, Threshold).join(Threshold, Threshold.class_id == ProductClass.id)
         .where(Threshold.model_version_id == model_version_id))
    return {name: t for name, t in session.execute(q)}


# ---------------------------------------------------------------------- ingested files (nightly)


def find_ingested(session: Session, sha256: str) -> IngestedFile | None:
    return session.scalar(select(IngestedFile).where(IngestedFile.sha256 == sha256))


def ingested_among(session: Session, digests: Iterable[str]) -> set[str]:
    """Which of these content sha256s have been seen already (ingested or quarantined)."""
    wanted = sorted(set(digests))
    seen: set[str] = set()
    for i in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[i:i + _IN_CHUNK]
        seen.update(session.scalars(select(IngestedFile.sha256).where(IngestedFile.sha256.in_(chunk))))
    return seen


def record_ingested(session: Session, sha256: str, path: str | Path, class_name: str, *,
                    step_id: int | None = None, status: str = "ingested",
                    reason: str | None = None) -> IngestedFile:
    """Remember a delivered file by content; a second record of the same sha256 is an error."""
    if status not in INGEST_STATUSES:
        raise IumadError(f"ingest status {status!r} is not one of {list(INGEST_STATUSES)}")
    if find_ingested(session, _check_sha256(sha256, str(path))) is not None:
        raise IumadError(f"{path}: content {sha256[:12]}… was already ingested")
    row = IngestedFile(sha256=sha256, path=str(path), class_name=class_name, step_id=step_id,
                       ingested_at=utcnow(), status=status, reason=reason)
    session.add(row)
    session.flush()
    return row


# ---------------------------------------------------------------------- quarantine review


class UnknownSample(UsageError):
    """No quarantined sample has this id (the service answers 404)."""


class DecisionConflict(IumadError):
    """The sample already has the other decision; decisions are final (the service answers 409)."""


def record_quarantined(session: Session, class_name: str, *, source: str | Path, files: dict,
                       score: float, z: float, step_id: int | None = None) -> QuarantinedSample:
    """Remember a sample `nightly` held back; `files` holds its store-relative paths under quarantine/."""
    for key in ("rgb", "geometry"):
        if files.get(key) is not None:
            files = {**files, key: _store_relative(files[key])}
    row = QuarantinedSample(class_name=class_name, step_id=step_id, source=str(source), files=files,
                            score=float(score), z=float(z), quarantined_at=utcnow())
    session.add(row)
    session.flush()
    return row


def list_quarantined(session: Session, *, class_name: str | None = None, undecided: bool = False
                     ) -> list[tuple[QuarantinedSample, QuarantineDecision | None]]:
    """Quarantined samples (oldest first) with their decision, or None while undecided."""
    q = (select(QuarantinedSample, QuarantineDecision)
         .outerjoin(QuarantineDecision, QuarantineDecision.sample_id == QuarantinedSample.id)
         .order_by(QuarantinedSample.id))
    if class_name is not None:
        q = q.where(QuarantinedSample.class_name == class_name)
    if undecided:
        q = q.where(QuarantineDecision.id.is_(None))
    return [(sample, decision) for sample, decision in session.execute(q)]


def get_quarantined(session: Session, sample_id: int) -> tuple[QuarantinedSample, QuarantineDecision | None]:
    """The sample and its decision; UnknownSample when no quarantined sample has this id."""
    sample = session.get(QuarantinedSample, sample_id)
    if sample is None:
        raise UnknownSample(f"no quarantined sample has id {sample_id}",
                            fix="list them with `iumad quarantine list` (or GET /v1/quarantine)")
    decision = session.scalar(select(QuarantineDecision).where(QuarantineDecision.sample_id == sample_id))
    return sample, decision


def decide_quarantined(session: Session, sample_id: int, decision: str, *, decided_by: str | None = None
                       ) -> tuple[QuarantineDecision, bool]:
    """(decision row, True when it is new). Repeating the same decision returns the existing row; the
    other decision on a decided sample is a DecisionConflict. The UNIQUE sample_id makes two racing
    writers end with one row (the loser's flush raises IntegrityError)."""
    if decision not in QUARANTINE_DECISIONS:
        raise UsageError(f"decision {decision!r} is not one of {list(QUARANTINE_DECISIONS)}",
                         fix="use accept or reject")
    _, existing = get_quarantined(session, sample_id)
    if existing is not None:
        if existing.decision != decision:
            raise DecisionConflict(f"quarantined sample {sample_id} was already {existing.decision}ed at "
                                   f"{existing.decided_at.isoformat(timespec='seconds')}; decisions are final",
                                   fix="nothing to do: the first decision stands")
        return existing, False
    row = QuarantineDecision(sample_id=sample_id, decision=decision, decided_at=utcnow(),
                             decided_by=None if decided_by is None else decided_by[:255])
    session.add(row)
    session.flush()
    return row, True


def accepted_unlearned(session: Session) -> list[tuple[QuarantinedSample, QuarantineDecision]]:
    """Accepted samples the next nightly run must learn (no step has learned them yet), oldest first."""
    q = (select(QuarantinedSample, QuarantineDecision)
         .join(QuarantineDecision, QuarantineDecision.sample_id == QuarantinedSample.id)
         .where(QuarantineDecision.decision == "accept", QuarantineDecision.learned_step_id.is_(None))
         .order_by(QuarantinedSample.id))
    return [(sample, decision) for sample, decision in session.execute(q)]


def mark_learned(session: Session, decision_ids: Iterable[int], step_id: int) -> None:
    """Record that step `step_id` learned these accepted samples (in the step's promoting transaction)."""
    for decision_id in decision_ids:
        row = session.get(QuarantineDecision, decision_id)
        if row is None or row.decision != "accept":
            raise IumadError(f"quarantine decision {decision_id} is not an accept")
        row.learned_step_id = step_id
    session.flush()
