"""`iumad nightly`: fold newly delivered normal data into the model, unattended.

The inbox holds one folder per class (`INBOX/<class>/`: flat image files, or a class folder in any layout
`inspect` reads, whose training split is the delivery). A file is new when its content sha256 has never
been ingested, wherever it lies. For each class with new samples, in name order: an existing class gets an `update` step, a new one an
`add-class` step. Before an update, the delivery is scored by the production model; samples whose
robust z-score (against the class's held-out normals) exceeds `continual.quarantine_z` are quarantined
(at most `quarantine_max_share` of the delivery, the worst first; both from --config when given, as the
step's other continual settings, else the production model's): they are not learned, are recorded
with the step, and move to `<store>/quarantine/step-NNNN/<class>/` once the step has committed (to
`quarantine/unlearned/<class>/` when the whole delivery was refused and no step ran).
Each quarantined sample is also a row of `quarantined_samples` for review (`iumad quarantine`, the
service's dashboard): a sample someone *accepted* is learned by the next run (its class gets an update
step even with nothing new in the inbox, and it is not screened again), which marks the decision
learned in the step's promoting transaction; a *rejected* one is never learned (its content stays
recorded as seen, so a re-delivery is skipped too).
The whole run holds the writer lock; a class that fails is reported and the next one still runs.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iumad.config import ContinualConfig, load_config
from iumad.continual.exemplars import record_from_json
from iumad.continual.quarantine import files_of, sample_record
from iumad.continual.step import HOLDOUT, StepRequest, learn_locked
from iumad.continual.versions import load_version
from iumad.data import folder
from iumad.data.dataset import ClassSource, layout_of
from iumad.data.sample import SampleRecord
from iumad.errors import DataError, IumadError
from iumad.model.detector import Detector
from iumad.model.features import MODALITIES
from iumad.progress import ProgressFn, no_progress
from iumad.store import repository as repo
from iumad.store.atomic import file_sha256
from iumad.store.db import Store


@dataclass
class Delivery:
    """New samples of one inbox class folder."""

    name: str
    folder: Path
    known: bool
    records: list[SampleRecord] = field(default_factory=list)
    digests: list[list[str]] = field(default_factory=list)  # per record: sha256 of its new files
    shas: list[dict[str, str]] = field(default_factory=list)  # per record: modality -> sha256 of its file
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[tuple[int, SampleRecord]] = field(default_factory=list)  # (decision id, record): not screened

    @property
    def clean(self) -> list[SampleRecord]:
        out = {q["index"] for q in self.quarantined}
        return [r for i, r in enumerate(self.records) if i not in out] + [r for _, r in self.accepted]


def inbox_records(class_dir: Path, name: str) -> list[SampleRecord]:
    """Good samples of an inbox class folder: the training split of a class folder in any layout that
    `inspect` reads (good/ of the folder layout, train/good/ of MVTec AD, ...), else the files in the
    folder itself."""
    layout = layout_of(class_dir)
    if layout is not None:
        return ClassSource(name, class_dir, layout).records("train")
    return folder._records(class_dir, class_dir, name, "train", "good")


def scan_inbox(store: Store, inbox: Path) -> tuple[list[Delivery], list[str]]:
    """(deliveries with new samples, problems such as invalid folder names), creating nothing."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise DataError(f"{inbox}: inbox folder not found; create it with one sub-folder per class")
    deliveries, problems = [], []
    with store.session() as s:
        learned = {c.name for c in repo.list_classes(s)}
        for d in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                repo.validate_class_name(d.name)
                records = inbox_records(d, d.name)
            except IumadError as exc:
                problems.append(f"{d}: skipped: {exc}")
                continue
            dl = Delivery(d.name, d, d.name in learned)
            for r in records:
                shas = {m: file_sha256(p) for m, p in (("rgb", r.rgb), ("geometry", r.geometry)) if p is not None}
                new = sorted(set(shas.values()) - repo.ingested_among(s, list(shas.values())))
                if new:
                    dl.records.append(r)
                    dl.digests.append(new)
                    dl.shas.append(shas)
            if dl.records:
                deliveries.append(dl)
    return deliveries, problems


def add_accepted(store: Store, deliveries: list[Delivery], problems: list[str]) -> list[Delivery]:
    """Join the accepted, not yet learned quarantined samples to their class's delivery (a class with
    nothing new in the inbox gets a delivery of its own); a sample whose files are gone is a problem."""
    by_name = {dl.name: dl for dl in deliveries}
    with store.session() as s:
        learned = {c.name for c in repo.list_classes(s)}
        for sample, decision in repo.accepted_unlearned(s):
            try:
                record = sample_record(store, sample)
            except IumadError as exc:
                problems.append(f"accepted sample {sample.id} skipped: {exc}")
                continue
            if sample.class_name not in learned:
                problems.append(f"accepted sample {sample.id} skipped: class {sample.class_name!r} is not learned")
                continue
            dl = by_name.get(sample.class_name)
            if dl is None:
                folder_of = (record.rgb or record.geometry).parent
                dl = by_name[sample.class_name] = Delivery(sample.class_name, folder_of, True)
            dl.accepted.append((decision.id, record))
    return sorted(by_name.values(), key=lambda d: d.name)


def robust_z(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(score - median) / (1.4826 * MAD) of the reference: a z-score a few outliers cannot mask."""
    med = float(np.median(reference))
    mad = 1.4826 * float(np.median(np.abs(reference - med)))
    return (scores - med) / max(mad, 1e-6)


def screen(det: Detector, store: Store, dl: Delivery, z_limit: float, max_share: float) -> np.ndarray:
    """Robust z-score of each delivered sample for a learned class (the largest over the fused map and
    each modality's map, so a defect only one modality sees is not diluted); fills `dl.quarantined`.
    The reference is the class's held-out normals scored now (the delivery itself if fewer than 5)."""
    with store.session() as s:
        rows = [e.record for e in repo.list_exemplars(s, dl.name) if e.method == HOLDOUT and e.record]
    reference = [rec for rec, _ in map(record_from_json, rows) if rec is not None]
    preds = det.predict_records(dl.records, dl.name)
    ref_preds = det.predict_records(reference, dl.name) if len(reference) >= 5 else preds
    keys = [k for k in ("fused", *MODALITIES) if k in preds[0].branch_scores]
    z = np.max([robust_z(np.array([p.branch_scores[k] for p in preds]),
                         np.array([p.branch_scores[k] for p in ref_preds])) for k in keys], axis=0)
    cap = max(1, math.floor(max_share * len(preds)))
    worst = [int(i) for i in np.argsort(-z) if z[i] > z_limit][:cap]
    dl.quarantined = [{"index": i, "path": str(dl.records[i].rgb or dl.records[i].geometry),
                       "score": preds[i].score, "z": float(z[i])} for i in worst]
    return z


def nightly(store: Store, inbox: Path, *, dry_run: bool = False, max_forgetting: float | None = None,
            config: Path | None = None, wait: float = 0.0, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Run (or with `dry_run`, only plan) one nightly update; see the module docstring."""
    if dry_run:
        return _plan(store, inbox, config, progress)
    with store.writer_lock(wait):
        deliveries, problems = scan_inbox(store, inbox)
        deliveries = add_accepted(store, deliveries, problems)
        report: dict[str, Any] = {"inbox": str(inbox), "dry_run": False, "classes": [], "problems": problems}
        if not deliveries:
            report["message"] = "nothing new in the inbox"
            return report
        with store.session() as s:
            production = repo.get_production(s)
        det = load_version(store, production) if production is not None else None
        for dl in deliveries:
            entry: dict[str, Any] = {"class": dl.name, "action": "update" if dl.known else "add-class",
                                     "new_samples": len(dl.records), "accepted_samples": len(dl.accepted)}
            report["classes"].append(entry)
            try:
                if dl.known and det is not None and dl.name in det.classes and dl.records:
                    cfg = screening(det, config)
                    screen(det, store, dl, cfg.quarantine_z, cfg.quarantine_max_share)
                entry["quarantined"] = dl.quarantined
                entry["step"] = _learn(store, dl, max_forgetting, config, progress)
                det = _reload(store)
            except IumadError as exc:
                entry["error"], entry["exit_code"] = str(exc), exc.exit_code
        failed = [e for e in report["classes"] if "error" in e]
        report["exit_code"] = failed[0]["exit_code"] if failed else 0
        return report


def _learn(store: Store, dl: Delivery, max_forgetting: float | None, config: Path | None,
           progress: ProgressFn) -> dict[str, Any]:
    """One step for a delivery; ingest rows are written in the step's promoting transaction."""
    clean = dl.clean
    quarantined = {q["index"] for q in dl.quarantined}
    moved: list[tuple[Path, str]] = []  # (file, its store-relative place in quarantine/)

    def on_commit(session, step) -> None:
        seen: set[str] = set()
        for i, (rec, digests) in enumerate(zip(dl.records, dl.digests)):
            bad = i in quarantined
            for d in digests:
                if d not in seen:
                    seen.add(d)
                    repo.record_ingested(session, d, rec.rgb or rec.geometry, dl.name,
                                         step_id=step.id if step else None,
                                         status="quarantined" if bad else "ingested",
                                         reason=_reason(dl, i) if bad else None)
        where = f"quarantine/step-{step.step_index:04d}/{dl.name}" if step else f"quarantine/unlearned/{dl.name}"
        for q in dl.quarantined:
            rec = dl.records[q["index"]]
            files = files_of(rec, where, dl.shas[q["index"]])
            repo.record_quarantined(session, dl.name, source=rec.rgb or rec.geometry, files=files,
                                    score=q["score"], z=q["z"], step_id=step.id if step else None)
            moved.extend((p, files[m]) for m, p in (("rgb", rec.rgb), ("geometry", rec.geometry)) if p is not None)
        if step is not None and dl.accepted:
            repo.mark_learned(session, [d for d, _ in dl.accepted], step.id)

    if not clean:  # nothing to learn: only remember (and move away) what was refused
        with store.session() as s:
            on_commit(s, None)
        summary = {"step": None, "message": "every new sample was quarantined; nothing learned"}
    else:
        req = StepRequest(dl.name, dl.folder, update=dl.known, config=config, max_forgetting=max_forgetting)
        summary = learn_locked(store, req, progress, train_records=clean, on_commit=on_commit)
    for path, rel in moved:  # after the commit: the step already lists them, so a crash here loses nothing
        target = store.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
    return summary


def _reason(dl: Delivery, index: int) -> str:
    q = next(q for q in dl.quarantined if q["index"] == index)
    return f"robust z-score {q['z']:.1f} of image score {q['score']:.2f}"


def _reload(store: Store) -> Detector | None:
    with store.session() as s:
        production = repo.get_production(s)
    return load_version(store, production) if production is not None else None


def screening(det: Detector, config: Path | None) -> ContinualConfig:
    """The continual settings a delivery is screened with: --config's (the step will train with them) or
    the production model's."""
    return load_config(config).continual if config is not None else det.config.continual


def _plan(store: Store, inbox: Path, config: Path | None, progress: ProgressFn) -> dict[str, Any]:
    deliveries, problems = scan_inbox(store, inbox)
    deliveries = add_accepted(store, deliveries, problems)
    det = _reload(store)
    classes = []
    for dl in deliveries:
        if dl.known and det is not None and dl.name in det.classes and dl.records:
            cfg = screening(det, config)
            screen(det, store, dl, cfg.quarantine_z, cfg.quarantine_max_share)
        classes.append({"class": dl.name, "action": "update" if dl.known else "add-class",
                        "new_samples": len(dl.records), "accepted_samples": len(dl.accepted),
                        "quarantined": dl.quarantined})
    return {"inbox": str(inbox), "dry_run": True, "classes": classes, "problems": problems,
            "message": "would learn " + (", ".join(c["class"] for c in classes) or "nothing: nothing new")}
