"""What the store says about the model's life: classes, steps, versions, forgetting and drift."""

from __future__ import annotations

from typing import Any

from iumad.continual.classdata import class_source
from iumad.continual.quarantine import list_samples
from iumad.continual.evaluation import LABELS_METRIC, PIXEL_METRICS, REPORT_METRICS, evaluate_class, image_labelled
from iumad.data.labels import NOT_MEASURED
from iumad.continual.versions import load_production
from iumad.errors import UsageError
from iumad.eval.forgetting import ForgettingReport, forgetting_report, to_dict, with_not_measured
from iumad.progress import ProgressFn, no_progress
from iumad.store import repository as repo
from iumad.store.db import Store

DRIFT_METRICS = ("normal_q50", "normal_q99", "normal_fpr")


def forgetting(store: Store, metric: str = "i_auroc") -> tuple[ForgettingReport, list[dict[str, Any]]]:
    """R for `metric` with FM, BWT and averages, plus the label-free drift check of every class without
    defect evaluation data: its held-out normal scores' median and 99th percentile and the share above
    its threshold, at the step that learned it and now. Cells of a pixel metric that image-level labels
    could not measure are marked not measured (`ForgettingReport.not_measured`)."""
    if metric not in REPORT_METRICS:
        raise UsageError(f"--metric {metric!r}: use one of {', '.join(REPORT_METRICS)}")
    with store.session() as s:
        report = forgetting_report(*repo.r_matrix(s, metric), metric)
        if metric in PIXEL_METRICS:
            levels = repo.r_matrix(s, LABELS_METRIC)[2]
            report = with_not_measured(report, [[NOT_MEASURED if v == 0.0 else None for v in row] for row in levels])
        drift_r = {m: repo.r_matrix(s, m)[2] for m in DRIFT_METRICS}
        labelled = repo.r_matrix(s, "i_auroc")[2]
    drift = []
    if not report.R:
        return report, drift
    for j, name in enumerate(report.class_names):
        if any(row[j] is not None for row in labelled):
            continue
        own = next((i for i, row in enumerate(drift_r["normal_q50"]) if row[j] is not None), None)
        if own is None:
            continue
        then = {m: drift_r[m][own][j] for m in DRIFT_METRICS}
        now = {m: drift_r[m][-1][j] for m in DRIFT_METRICS}
        drift.append({"class": name, "own_step": report.step_indices[own], "then": then, "now": now,
                      "shift": {m: None if then[m] is None or now[m] is None else now[m] - then[m]
                                for m in DRIFT_METRICS}})
    return report, drift


def drift_text(drift: list[dict[str, Any]]) -> str:
    if not drift:
        return ""
    lines = ["label-free drift check (classes without defect evaluation data; held-out normal image scores):",
             f"  {'class':16} {'q50 then->now':>18} {'q99 then->now':>18} {'FPR at threshold':>18}"]
    for d in drift:
        def pair(m: str, pct: bool = False) -> str:
            f = (lambda v: "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.2f}"))
            return f"{f(d['then'][m])} -> {f(d['now'][m])}"
        lines.append(f"  {d['class']:16} {pair('normal_q50'):>18} {pair('normal_q99'):>18} "
                     f"{pair('normal_fpr', True):>18}")
    return "\n".join(lines) + "\n"


def forgetting_json(report: ForgettingReport, drift: list[dict[str, Any]]) -> dict[str, Any]:
    return {**to_dict(report), "drift": drift}


def classes(store: Store) -> list[dict[str, Any]]:
    """Learned classes in arrival order, with whether the serving model knows them and their threshold."""
    with store.session() as s:
        prod = repo.get_production(s)
        thresholds = repo.thresholds_for(s, prod.id) if prod else {}
        sets = {n: es for n, es in repo.evaluation_sets(s, "test")}
        rows = []
        for c in repo.list_classes(s):
            t = thresholds.get(c.name)
            rows.append({"name": c.name, "arrival_order": c.arrival_order, "modalities": list(c.modalities),
                         "prompt": c.prompt, "data_root": c.data_root, "added_at": c.added_at.isoformat(),
                         "in_production": t is not None,
                         "threshold": t.value if t else None, "threshold_method": t.method if t else None,
                         "evaluation_samples": sets[c.name].n_samples if c.name in sets else 0,
                         "exemplars": len(repo.list_exemplars(s, c.name))})
    return rows


def history(store: Store) -> list[dict[str, Any]]:
    """Every step, oldest first, with the model version it made and which version is production, the
    samples it quarantined with their review decision (`quarantined`), and the accepted ones it learned
    (`learned_accepted`: quarantined sample ids)."""
    samples = list_samples(store)
    held: dict[int | None, list[dict[str, Any]]] = {}
    learned: dict[int | None, list[int]] = {}
    for q in samples:
        held.setdefault(q["step"], []).append({k: q[k] for k in ("id", "class", "source", "z", "decision",
                                                                 "decided_at", "learned_step")})
        if q["learned_step"] is not None:
            learned.setdefault(q["learned_step"], []).append(q["id"])
    with store.session() as s:
        prod = repo.get_production(s)
        return [{"step": st.step_index, "kind": st.kind, "classes": list(st.classes), "status": st.status,
                 "started_at": st.started_at.isoformat(),
                 "finished_at": st.finished_at.isoformat() if st.finished_at else None,
                 "parent_version": st.parent_version_id, "result_version": st.result_version_id,
                 "production": prod is not None and st.result_version_id == prod.id and st.status == "succeeded",
                 "error": st.error, "quarantined": held.get(st.step_index, []),
                 "learned_accepted": learned.get(st.step_index, [])} for st in repo.list_steps(s)]


def evaluate_production(store: Store, class_name: str | None = None,
                        progress: ProgressFn = no_progress) -> list[dict[str, Any]]:
    """R metrics of the serving model on the registered evaluation sets (all classes, or one); reads
    only, records nothing."""
    det, version = load_production(store)
    with store.session() as s:
        sets = [(n, es.root, es.split) for n, es in repo.evaluation_sets(s, "test")]
        image_only = image_labelled(s)
        if class_name is not None:
            repo.require_class(s, class_name)
    rows = []
    for name, root, split in sets:
        if (class_name is not None and name != class_name) or name not in det.classes:
            continue
        records = class_source(name, root).records(split)
        res = evaluate_class(det, name, records, [], [], det.config.continual.threshold_quantile,
                             progress=lambda st, d, t, i="", n=name: progress(f"evaluate {n}", d, t, i),
                             image_labels=name in image_only)
        rows.append({"class": name, "model_version": version.id, "n": res.n_eval, **res.metrics,
                     "not_measured": res.not_measured()})
    return rows
