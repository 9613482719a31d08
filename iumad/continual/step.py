"""One incremental step (`iumad add-class`, `--update`): read, train with replay and distillation,
write the candidate, evaluate every class, promote — or leave production exactly as it was.

Order of work, and what a failure at each point leaves behind:
1. under the writer lock, read and featurise every file of the class(es) (bad data: DataError, nothing
   changed; the feature cache is content-addressed, so what it gained is harmless);
2. a `running` step row is committed so `db check` and readers see the step;
3. train from the production model on the new data + the old classes' exemplars, distilling the
   previous network; write the candidate checkpoint atomically into the step's own folder;
4. evaluate the candidate on every registered evaluation set (the row of R) and set thresholds;
5. one transaction registers the class, its exemplars and evaluation set, the model version, the row of
   R and the thresholds, promotes the version and closes the step.
Any error or Ctrl-C before 5 commits marks the step `failed` with its reason and deletes its folder;
a process killed outright leaves a `running` row and a folder that the next writer fails and deletes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sqlalchemy.orm import Session

from iumad.config import Config, load_config
from iumad import distributed, faults
from iumad.continual.classdata import ClassData, class_source, read_class
from iumad.continual.distill import Distiller
from iumad.continual.evaluation import ClassResult, evaluate_class, image_labelled, sizes_of
from iumad.continual.exemplars import per_class_budget, record_from_json, record_to_json, replay_rows, select
from iumad.continual.subset import budget_of, choose_subset, indices, restrict
from iumad.continual.versions import load_version
from iumad.errors import ForgettingLimitError, IumadError, UsageError
from iumad.eval.forgetting import forgetting_report
from iumad.model.detector import Detector
from iumad.data.described import FolderSpec
from iumad.data.sample import SampleRecord
from iumad.model.features import SampleFeatures
from iumad.progress import ProgressFn, no_progress
from iumad.store import repository as repo
from iumad.store.checkpoints import save_detector
from iumad.store.db import Store
from iumad.store.models import Step
from iumad.store.repository import ExemplarRecord, embedding_from_bytes, embedding_to_bytes

HOLDOUT = "holdout"


@dataclass
class StepRequest:
    """What `iumad add-class` asks for. `name` may list several classes learned in one step (the base
    step of a protocol such as 6-4): each is then a sub-folder of `data`."""

    name: str | tuple[str, ...]
    data: Path
    test: Path | None = None
    prompt: str | None = None
    modalities: tuple[str, ...] | None = None
    config: Path | None = None
    epochs: int | None = None
    update: bool = False
    max_forgetting: float | None = None  # FM on I-AUROC, in points, above which nothing is promoted
    folders: FolderSpec | None = None  # --normal/--abnormal/--masks/--normal-test: replaces `data`
    image_labels: bool = False  # evaluate on image-level labels only, whatever masks exist

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,) if isinstance(self.name, str) else tuple(self.name)


@dataclass
class Replay:
    """An old class's exemplars, re-read and verified: those it keeps (in rank order), those replayed at
    this step (featurised: they are trained on; all of them, unless a total budget picks fewer), and its
    held-out normals (records only: featurised one class at a time when it is calibrated, so that a
    step's memory does not grow with the number of classes)."""

    name: str
    kept: list[dict]
    replay: list[tuple[dict, SampleFeatures]]
    holdout: list[tuple[dict, SampleRecord]]

    def holdout_features(self, det: Detector, progress: ProgressFn) -> list[SampleFeatures]:
        return det.extractor.extract([rec for _, rec in self.holdout], det.classes[self.name].modalities,
                                     progress, stage=f"holdout {self.name}")

    def holdout_sizes(self) -> list[tuple[int, int]]:
        return sizes_of([rec for _, rec in self.holdout])


def learn(store: Store, req: StepRequest, progress: ProgressFn = no_progress, wait: float = 0.0) -> dict[str, Any]:
    """Run one add-class or update step under the writer lock (see the module docstring for guarantees)."""
    for name in req.names:
        repo.validate_class_name(name)
    with store.writer_lock(wait):
        return learn_locked(store, req, progress)


def learn_locked(store: Store, req: StepRequest, progress: ProgressFn = no_progress,
                 train_records: list[SampleRecord] | None = None,
                 on_commit: Callable[[Session, Step], None] | None = None) -> dict[str, Any]:
    """`learn` for a caller that already holds the writer lock (nightly). `train_records` replaces the
    class's train split; `on_commit(session, step)` runs inside the promoting transaction."""
    names = req.names
    if not names or len(set(names)) != len(names):
        raise UsageError(f"classes {list(names)}: give each class once")
    for name in names:
        repo.validate_class_name(name)
    if len(names) != 1 and (train_records is not None or req.test is not None or req.folders is not None):
        raise UsageError("explicit training records, --test or --normal need exactly one class")
    started = time.monotonic()
    with store.session() as s:
        stale = repo.fail_stale_steps(s)
        known = {n: repo.get_class(s, n) for n in names}
        for n, row in known.items():
            if row is not None and not req.update:
                raise UsageError(f"class {n!r} is already learned; pass --update to train it on new data")
            if row is None and req.update:
                raise UsageError(f"class {n!r} has not been learned yet; add it without --update")
        production = repo.get_production(s)
        old_rows = {c.name: c.text_embedding for c in repo.list_classes(s)}
        eval_sets = {n: (es.root, es.split, es.subset) for n, es in repo.evaluation_sets(s, "test")}
        image_only = image_labelled(s)
        exemplars = {n: [(e.method, e.record) for e in repo.list_exemplars(s, n)] for n in old_rows}
    store.remove_unfinished_checkpoints()
    faults.reach("read")
    det = load_version(store, production) if production is not None else None
    det = _configure(det, req, store)
    faults.reach("features")
    datas = {}
    for n in names:
        mods = req.modalities or (tuple(known[n].modalities) if known[n] is not None else None)
        data_dir = req.data if len(names) == 1 else Path(req.data) / n
        datas[n] = read_class(n, data_dir, test=req.test, modalities=mods, holdout=det.config.continual.holdout,
                              extractor=det.extractor, progress=progress, train_records=train_records,
                              folders=req.folders, image_labels=req.image_labels)
    cfg = det.config.continual
    replays, skipped = _read_replay(det, exemplars, progress, set(names),
                                    cfg.exemplar_budget if cfg.exemplar_budget_mode == "total" else None)
    with store.session() as s:
        step = repo.begin_step(s, "update" if req.update else "add-class", list(names),
                               parent_version_id=production.id if production else None,
                               config_hash=det.config.hash(), seed=det.config.train.seed)
    ckpt_rel = Store.checkpoint_dir_for(step.step_index)
    try:
        summary = _run(store, det, req, datas, replays, eval_sets, image_only, old_rows, step, ckpt_rel, progress,
                       on_commit)
    except BaseException as exc:
        if isinstance(exc, ForgettingLimitError):
            raise  # the step is closed and its model kept as candidate
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with store.session() as s:
            repo.finish_step(s, step.id, succeeded=False, error=reason[:2000])
        shutil.rmtree(store.path(ckpt_rel), ignore_errors=True)
        raise
    summary.update(stale_steps_failed=stale, exemplars_skipped=skipped,
                   seconds=round(time.monotonic() - started, 1))
    return summary


def _configure(det: Detector | None, req: StepRequest, store: Store) -> Detector:
    """The detector to train: production's (its architecture is fixed) or a new one for the first class.
    A --config may change training, loss and continual settings of a later step, not the network."""
    cfg = load_config(req.config) if req.config else None
    if det is None:
        det = Detector(cfg or Config(), cache_dir=store.features_dir)
    elif cfg is not None:
        for section in ("backbone", "model", "score"):
            if getattr(cfg, section) != getattr(det.config, section):
                raise UsageError(f"{req.config}: section {section!r} differs from the production model's; "
                                 "the network of an incremental model is fixed at its first class "
                                 "(start a new store to change it)")
        det.config.train, det.config.loss, det.config.continual = cfg.train, cfg.loss, cfg.continual
    if req.epochs is not None:
        det.config.train.epochs = req.epochs
    return det


def _read_replay(det: Detector, exemplars: dict[str, list[tuple[str, dict | None]]], progress: ProgressFn,
                 learning: set[str], budget: int | None) -> tuple[dict[str, Replay], list[str]]:
    """Verify every old class's exemplars (missing or changed files are skipped and listed) and featurise
    the ones this step replays: all of them, or with a total `budget` at most that many over the classes
    (`exemplars.replay_rows`, rotating with the number of classes learned). A class being learned again
    (`learning`: an update) has all of its own featurised, its exemplars are chosen anew among them."""
    verified: dict[str, tuple[list[tuple[dict, SampleRecord]], list[tuple[dict, SampleRecord]]]] = {}
    skipped = []
    for name, rows in exemplars.items():
        if name not in det.classes:
            continue
        good: list[tuple[str, dict, Any]] = []
        for method, data in rows:
            rec, why = record_from_json(data) if data else (None, f"class {name!r}: exemplar without a record")
            if rec is None:
                skipped.append(why)
            else:
                good.append((method, data, rec))
        verified[name] = ([(d, rec) for m, d, rec in good if m != HOLDOUT], [(d, rec) for m, d, rec in good if m == HOLDOUT])
    others = {n: kept for n, (kept, _) in verified.items() if n not in learning}
    chosen = others if budget is None else replay_rows(others, budget, len(exemplars))
    replays = {}
    for name, (kept, hold) in verified.items():
        replayed = chosen.get(name, kept)
        feats = det.extractor.extract([rec for _, rec in replayed], det.classes[name].modalities, progress,
                                      stage=f"replay {name}") if replayed else []  # no empty progress line
        replays[name] = Replay(name, [d for d, _ in kept], [(d, f) for (d, _), f in zip(replayed, feats)], hold)
    return replays, skipped


def _run(store: Store, det: Detector, req: StepRequest, datas: dict[str, ClassData],
         replays: dict[str, Replay], eval_sets: dict[str, tuple[str, str, dict | None]], image_only: set[str],
         old_rows: dict[str, bytes | None],
         step, ckpt_rel: str, progress: ProgressFn, on_commit) -> dict[str, Any]:
    cfg = det.config.continual
    faults.reach("train")
    first = det.net is None
    old_texts = None if first else det.class_texts()
    for n, data in datas.items():
        if n not in det.classes:  # a new class, or one the production model lost to a rollback
            stored = old_rows.get(n)
            det.register_class(n, data.modalities, embedding_from_bytes(stored) if stored else None,
                               description=req.prompt)
    learning = [det.class_names.index(n) for n in datas]
    distill = None
    if not first and cfg.distill:
        distill = Distiller(det.net, old_texts, cfg, learning)
    own = {n: replays.pop(n) for n in datas if n in replays}  # an update's earlier exemplars
    items = [(n, f) for n, data in datas.items() for f in data.train_features]
    items += [(n, f) for n, r in own.items() for _, f in r.replay]
    if cfg.replay:
        items += [(n, f) for n, r in replays.items() for _, f in r.replay]
    if distributed.world_size() > 1:  # torchrun: the other ranks train the same thing with us
        det.ensure_net()
        distributed.share(distributed.training_payload(
            det, items, (len(old_texts), learning) if distill is not None else None))
    losses = det.train(items, progress=progress, distill=distill)

    budget = per_class_budget(cfg, len(det.classes))
    holdouts: dict[str, tuple[list[SampleFeatures], list[dict], list[tuple[int, int]]]] = {}
    normal_scores: dict[str, Any] = {}  # held-out normals' scores, from the calibration's own maps
    grid = (det.spec.input_size, det.spec.input_size)  # where those equal predict's scores (else rescored)
    exemplar_sets: dict[str, list[ExemplarRecord]] = {}
    for n, data in datas.items():
        hold = (list(data.holdout_features), [record_to_json(r) for r in data.holdout], sizes_of(data.holdout))
        pool = [(record_to_json(rec), f) for rec, f in zip(data.train, data.train_features)]
        if n in own:  # an update keeps the earlier held-out normals first (the drift reference)
            r = own[n]
            keep = max(cfg.holdout, len(r.holdout))
            hold = tuple(x[:keep] for x in (r.holdout_features(det, progress) + hold[0],
                                            [d for d, _ in r.holdout] + hold[1],
                                            r.holdout_sizes() + hold[2]))
            pool = r.replay + pool
        holdouts[n] = hold
        det.build_banks(n, data.train_features, extend=n in own)
        det.fit_region(n, data.train, extend=n in own)
        scores = det.calibrate_stats(n, hold[0] or data.train_features[::5])
        if hold[0] and all(tuple(s) == grid for s in hold[2]):
            normal_scores[n] = scores
        chosen = select([f for _, f in pool], budget, cfg.exemplar_method, det.config.train.seed)
        exemplar_sets[n] = _exemplar_records([pool[i][0] for i in chosen], cfg.exemplar_method, hold[1])
    for n, r in replays.items():
        if r.holdout:
            feats, sizes = r.holdout_features(det, progress), r.holdout_sizes()
            scores = det.calibrate_stats(n, feats)
            at_grid = all(tuple(s) == grid for s in sizes)
            if at_grid:  # the scores stand for predict's: the features need not be kept for the evaluation
                normal_scores[n] = scores
            holdouts[n] = ([] if at_grid else feats, [d for d, _ in r.holdout], sizes)
        if cfg.exemplar_budget_mode == "total":  # old classes keep a prefix of their herding order
            exemplar_sets[n] = _exemplar_records(r.kept[:budget], cfg.exemplar_method,
                                                 [d for d, _ in r.holdout])

    faults.reach("checkpoint")
    folder = store.path(ckpt_rel)
    digest = save_detector(det, folder, store.blobs_dir)
    size = (folder / "model.pt").stat().st_size

    faults.reach("evaluate")
    results: list[ClassResult] = []
    subsets: dict[str, dict] = {}  # evaluation subsets chosen at this step, recorded with it
    for n in det.class_names:
        own_set = n in datas and bool(datas[n].evaluation)
        evaluation, missing = ((datas[n].evaluation, None) if own_set else _evaluation_records(n, eval_sets.get(n)))
        evaluation, rows, subset, lost = _budgeted(n, evaluation, own_set, eval_sets.get(n), cfg.evaluation_budget,
                                                   det.config.train.seed)
        if subset is not None:
            subsets[n] = subset
        missing = missing or lost
        image_labels = datas[n].labels == "image" if own_set else n in image_only
        hold, _, hsizes = holdouts.get(n, ([], [], []))
        result = evaluate_class(det, n, evaluation, hold, hsizes, cfg.threshold_quantile,
                                progress=lambda st, d, t, i="", n=n: progress(f"evaluate {n}", d, t, i),
                                threshold_from=cfg.threshold_from, image_labels=image_labels, metric_rows=rows,
                                normal_scores=normal_scores.get(n))
        result.warning = missing
        results.append(result)

    faults.reach("promote")
    fm = _forgetting_with(store, results, step.id)
    refused = None
    with store.session() as s:  # one transaction: all of it, or (on any error) none of it
        version = repo.add_model_version(s, ckpt_rel, digest, size, step_id=step.id)
        if req.max_forgetting is not None and fm is not None and 100 * fm > req.max_forgetting:
            refused = (f"step {step.step_index}: FM on I-AUROC would be {100 * fm:.2f} points, above "
                       f"--max-forgetting {req.max_forgetting:g}; production unchanged, the model is kept "
                       f"as candidate version {version.id}")
            repo.set_alias(s, version.id, "candidate")
            repo.finish_step(s, step.id, succeeded=False, error=refused)
        else:
            _record(s, req, datas, det, step, version, results, exemplar_sets, subsets)
            if on_commit is not None:
                on_commit(s, step)
            repo.promote(s, version.id)
            repo.finish_step(s, step.id, succeeded=True, result_version_id=version.id)
    if refused is not None:
        raise ForgettingLimitError(refused)
    n_train = sum(len(d.train) for d in datas.values())
    return {
        "step": step.step_index, "kind": step.kind, "class": ",".join(datas), "classes": list(datas),
        "model_version": version.id, "checkpoint": ckpt_rel, "sha256": digest, "size_bytes": size,
        "losses": losses, "n_train": n_train, "n_replay": len(items) - n_train, "fm_i_auroc": fm,
        "exemplars": {n: len(r) for n, r in exemplar_sets.items()},
        "evaluation_budget": budget_of(cfg.evaluation_budget),
        "results": [{"class": r.name, "n_eval": r.n_eval, **r.metrics,
                     "threshold": r.threshold.value if r.threshold else None,
                     "threshold_method": r.threshold.method if r.threshold else None,
                     "not_measured": r.not_measured(), "warning": r.warnings()} for r in results],
    }


def _record(s: Session, req: StepRequest, datas: dict[str, ClassData], det: Detector, step: Step, version,
            results: list[ClassResult], exemplar_sets: dict[str, list[ExemplarRecord]],
            subsets: dict[str, dict]) -> None:
    """The rows a successful step adds: its classes, their evaluation sets (and subsets), exemplars, R row,
    thresholds."""
    for name, data in datas.items():
        if not req.update and repo.get_class(s, name) is None:
            repo.register_class(s, name, modalities=data.modalities, data_root=data.root.resolve(),
                                prompt=req.prompt, data_fingerprint=data.fingerprint(),
                                text_embedding=embedding_to_bytes(det.classes[name].text.numpy()),
                                step_id=step.id)
        if data.evaluation_locator is not None:
            repo.set_evaluation_set(s, name, root=data.evaluation_locator, split="test",
                                    n_samples=len(data.evaluation), subset=subsets.get(name))
    for name, subset in subsets.items():
        if name not in datas or datas[name].evaluation_locator is None:  # an old class's first subset
            repo.set_evaluation_subset(s, name, "test", subset)
    for n, recs in exemplar_sets.items():
        repo.record_exemplars(s, n, recs, step_id=step.id)
    repo.record_evaluations(s, step.id, [e for r in results for e in r.evaluation_records()])
    repo.record_thresholds(s, version.id, [r.threshold for r in results if r.threshold is not None])


def _exemplar_records(replay: list[dict], method: str, holdout: list[dict]) -> list[ExemplarRecord]:
    rows = [(method, d) for d in replay] + [(HOLDOUT, d) for d in holdout]
    out = []
    for rank, (m, d) in enumerate(rows):
        primary = d["files"].get("rgb") or d["files"]["geometry"]
        out.append(ExemplarRecord(primary["path"], primary["sha256"], m, rank, record=d))
    return out


def _budgeted(name: str, evaluation: list[SampleRecord], own_set: bool, where: tuple[str, str, dict | None] | None,
              budget: int | None, seed: int) -> tuple[list[SampleRecord], list[int] | None, dict | None, str | None]:
    """What `continual.evaluation_budget` leaves of a class's evaluation set: (records to score, positions
    the metrics use or None for all, a newly chosen subset to record or None, a warning or None).

    A class whose set arrives with this step is scored whole (its features are read anyway and its
    threshold uses every sample) and measured on the subset chosen now; an old class is scored on its
    recorded subset only, chosen now if it has none for this budget (learned before the budget was set)."""
    budget = budget_of(budget)
    if not budget or not evaluation:
        return evaluation, None, None, None
    if own_set:
        chosen = choose_subset(evaluation, budget, seed, name)
        return evaluation, indices(evaluation, chosen), chosen, None
    recorded = where[2] if where is not None else None
    fresh = None
    if not recorded or recorded.get("budget") != budget:
        recorded = fresh = choose_subset(evaluation, budget, seed, name)
    kept, lost = restrict(evaluation, recorded)
    warning = (f"class {name!r}: {lost} sample(s) of its evaluation subset are no longer in {where[0]}; "
               f"its cell of R uses the {len(kept)} left (`iumad evaluate` measures the whole set)"
               if lost and where is not None else None)
    return kept, None, fresh, warning


def _evaluation_records(name: str, where: tuple[str, ...] | None) -> tuple[list, str | None]:
    """An old class's registered evaluation set, re-listed, or no records and the warning the step
    records: its cell of R stays empty instead of failing the step."""
    if where is None:
        return [], (f"class {name!r} has no evaluation set, so its cell of R is empty; register one with "
                    f"`iumad add-class {name} --update --data DIR --test DIR`")
    try:
        records = class_source(name, where[0]).records(where[1])
        problem = None if records else f"its {where[1]} split is empty"
    except IumadError as exc:
        records, problem = [], str(exc)
    if problem is None:
        return records, None
    return [], (f"class {name!r}: its evaluation set {where[0]} cannot be read ({problem}), so its cell of R "
                "is empty; restore the folder or register another with --test")


def _forgetting_with(store: Store, results: list[ClassResult], step_id: int) -> float | None:
    """FM on I-AUROC if this step's row were added to R."""
    with store.session() as s:
        steps, names, matrix = repo.r_matrix(s, "i_auroc")
    row = {r.name: r.metrics.get("i_auroc") for r in results}
    names = names + [n for n in row if n not in names]
    matrix = [r + [None] * (len(names) - len(r)) for r in matrix]
    matrix.append([row.get(n) if row.get(n) == row.get(n) else None for n in names])
    return forgetting_report(steps + [-1], names, matrix, "i_auroc").fm
