"""Evaluating a model version on every learned class, and choosing its per-class thresholds.

The row of R a step writes holds, per class, on the class's registered evaluation set:
- `i_auroc`, `p_auroc`, `aupro` (AUPRO@0.3) of the fused map with the class predicted by the model, as
  in the unified incremental protocols (IUF, IB-IUMAD: no class label at test time);
- the same with the class given (`*_given`), as on a line that knows which product passes;
- `class_accuracy`: the share of samples whose class the model predicted right;
and three
label-free numbers on its held-out normals: the median and 99th percentile of their image scores and the
share above the class's threshold (`normal_q50`, `normal_q99`, `normal_fpr`), which the forgetting
report uses as a drift check for classes without defect data.

Image-level labels (`iumad.data.labels`): when the defect samples carry no masks, or the class was added
with `--image-labels`, I-AUROC (on the same image scores, the maps' maxima) and the threshold are
measured; P-AUROC and AUPRO are recorded as None with `not_measured` saying why, never as 0. Each row
also records `pixel_labels` (1: pixel masks, 0: image labels only), so later steps and reports know.

Thresholds: F1-optimal image score on the evaluation set when it has defect samples ('defects'); else
the `threshold_quantile` of the held-out normal scores ('normal-quantile', with a warning). With
`continual.threshold_from: normals` (the benchmark harness) always the latter: nothing is chosen on a test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from sqlalchemy.orm import Session

from iumad.data.labels import NOT_MEASURED, LabelLevel, label_level
from iumad.data.sample import SampleRecord
from iumad.eval.bounded import image_maxima, prediction_metrics
from iumad.eval.metrics import i_auroc
from iumad.data.loading import read_gt, record_size
from iumad.model.detector import Detector, Prediction
from iumad.model.features import SampleFeatures
from iumad.progress import ProgressFn, no_progress
from iumad.store import repository as repo
from iumad.store.repository import EvaluationRecord, ThresholdRecord

R_METRICS = {"i_auroc": "i_auroc", "p_auroc": "p_auroc", "aupro": "aupro@0.3"}  # ours -> compute_all's
REPORT_METRICS = (*R_METRICS, *(f"{k}_given" for k in R_METRICS), "class_accuracy")
PIXEL_METRICS = ("p_auroc", "aupro", "p_auroc_given", "aupro_given")  # need pixel masks
LABELS_METRIC = "pixel_labels"  # 1.0: the evaluation set has pixel masks; 0.0: image-level labels only
EVALUATED_MAPS = ("fused",)  # the maps an evaluation keeps of each prediction (all of them: 8 per sample)


@dataclass
class ClassResult:
    """One class under one model version."""

    name: str
    metrics: dict[str, float | None] = field(default_factory=dict)  # R metrics (nan = undefined, None = not measured)
    n_eval: int = 0
    labels: LabelLevel | None = None  # what the evaluation set's defect samples are labelled with
    n_defects: int = 0
    threshold: ThresholdRecord | None = None
    normal_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    warning: str | None = None  # why a metric could not be measured (e.g. its evaluation set is gone)

    def warnings(self) -> str | None:
        """This result's warnings, its threshold's included, as one line (None when there is none)."""
        pixel = f"class {self.name!r}: P-AUROC and AUPRO {NOT_MEASURED}" if self.not_measured() else None
        found = [w for w in (self.warning, pixel, self.threshold.warning if self.threshold else None) if w]
        return "; ".join(found) or None

    def not_measured(self) -> dict[str, str]:
        """Metrics that these labels cannot measure, and why (empty when everything was measured)."""
        if self.labels != "image":
            return {}
        return {k: NOT_MEASURED for k in PIXEL_METRICS if k in self.metrics}

    def evaluation_records(self) -> list[EvaluationRecord]:
        rows = [EvaluationRecord(self.name, k, v, self.n_eval) for k, v in self.metrics.items()]
        if self.labels is not None:
            rows.append(EvaluationRecord(self.name, LABELS_METRIC, float(self.labels == "pixel"), self.n_defects))
        if len(self.normal_scores):
            q50, q99 = np.quantile(self.normal_scores, [0.5, 0.99])
            fpr = float(np.mean(self.normal_scores > self.threshold.value)) if self.threshold else None
            n = len(self.normal_scores)
            rows += [EvaluationRecord(self.name, "normal_q50", float(q50), n),
                     EvaluationRecord(self.name, "normal_q99", float(q99), n),
                     EvaluationRecord(self.name, "normal_fpr", fpr, n)]
        return rows


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The image-score threshold with the best F1 (midpoint between the deciding score and the next)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each run of equal scores
    f1 = 2 * tp[last] / (tp[last] + fp[last] + y.sum())
    i = last[int(np.argmax(f1))]
    return float((s[i] + s[i + 1]) / 2) if i + 1 < len(s) else float(s[i])


def evaluate_class(det: Detector, name: str, evaluation: Sequence[SampleRecord],
                   holdout: Sequence[SampleFeatures], holdout_sizes: Sequence[tuple[int, int]],
                   quantile: float, progress: ProgressFn = no_progress,
                   threshold_from: str = "evaluation", image_labels: bool = False,
                   metric_rows: Sequence[int] | None = None, normal_scores: np.ndarray | None = None
                   ) -> ClassResult:
    """Metrics, threshold and held-out normal scores of one class under `det`; with image-level labels
    (no masks, or `image_labels`) the pixel metrics are not measured. `metric_rows`: the positions in
    `evaluation` the metrics are measured on (the class's fixed evaluation subset, so that its cells of
    R compare across steps); every record is scored and the threshold uses them all. `normal_scores`:
    the held-out normals' scores when the caller has them (`Detector.calibrate_stats` returns them)."""
    res = ClassResult(name)
    res.labels = label_level(evaluation, image_labels)
    res.n_defects = sum(r.label != "good" for r in evaluation)
    total = 2 * len(evaluation) + 1  # one stage: reading the features, scoring, the metrics
    progress("evaluate", 0, total)
    if normal_scores is not None:
        res.normal_scores = np.asarray(normal_scores, dtype=np.float64)
    elif holdout:
        preds = det.predict_features(list(holdout), [name] * len(holdout), list(holdout_sizes), keep=())
        res.normal_scores = np.array([p.score for p in preds])
    if evaluation:
        feats = det.extractor.extract(evaluation, det.classes[name].modalities,
                                      lambda _, done, __, info="": progress("evaluate", done, total, info))
        sizes = sizes_of(evaluation)
        auto, given = score_both(det, name, feats, sizes)
        progress("evaluate", total - 1, total)
        labels = defect_labels(evaluation, sizes, res.labels)
        rows = list(range(len(evaluation))) if metric_rows is None else list(metric_rows)
        res.metrics = set_metrics([auto[i] for i in rows], [given[i] for i in rows],
                                  [evaluation[i] for i in rows], [sizes[i] for i in rows], labels[rows],
                                  pixel=res.labels != "image")
        if labels.any() and not labels.all() and threshold_from == "evaluation":
            scores = np.array([p.score for p in given])
            res.threshold = ThresholdRecord(name, f1_threshold(labels, scores), "defects")
        res.n_eval = len(rows)
    if res.threshold is None and len(res.normal_scores):
        why = "no defect samples to evaluate" if threshold_from == "evaluation" else "thresholds from normals"
        res.threshold = ThresholdRecord(
            name, float(np.quantile(res.normal_scores, quantile)), "normal-quantile",
            f"{why} ({name!r}): threshold is the {quantile:g} quantile of "
            f"{len(res.normal_scores)} held-out normal scores" if threshold_from == "evaluation" else None)
    progress("evaluate", total, total)
    return res


def score_both(det: Detector, name: str, feats: Sequence[SampleFeatures], sizes: Sequence[tuple[int, int]]
               ) -> tuple[list[Prediction], list[Prediction]]:
    """Predictions of a class's samples with the class predicted ("auto") and given; a sample whose
    class was predicted right is scored once (both modes give the same maps)."""
    auto = det.predict_features(list(feats), [None] * len(feats), list(sizes), keep=EVALUATED_MAPS)
    given = list(auto)
    wrong = [i for i, p in enumerate(auto) if p.class_name != name]
    if wrong:
        for i, p in zip(wrong, det.predict_features([feats[i] for i in wrong], [name] * len(wrong),
                                                    [sizes[i] for i in wrong], keep=EVALUATED_MAPS)):
            given[i] = p
    return auto, given


def defect_labels(evaluation: Sequence[SampleRecord], sizes: Sequence[tuple[int, int]],
                  labels_level: LabelLevel | None) -> np.ndarray:
    """Per sample: does it hold a defect (its image-level label, or any pixel of its mask; masks are read
    one at a time, here and in `prediction_metrics`, so memory stays bounded at any resolution)."""
    if labels_level == "image":
        return np.array([r.label != "good" for r in evaluation], dtype=bool)
    return np.array([read_gt(r, s).any() for r, s in zip(evaluation, sizes)], dtype=bool)


def set_metrics(auto: Sequence[Prediction], given: Sequence[Prediction], records: Sequence[SampleRecord],
                sizes: Sequence[tuple[int, int]], labels: np.ndarray, pixel: bool) -> dict[str, float | None]:
    """The R metrics of a set of samples: class accuracy, and the image and pixel metrics (with the
    class predicted and given) where the set holds both normal and defect samples."""
    if not auto:
        return {}
    wrong = sum(a.class_name != g.class_name for a, g in zip(auto, given))
    out: dict[str, float | None] = {"class_accuracy": 1 - wrong / len(auto)}
    if not (labels.any() and not labels.all()):
        return out
    for suffix, preds in (("", auto), ("_given", given)):
        if suffix and not wrong:  # the same maps: the same metrics
            out.update({k + suffix: out[k] for k in R_METRICS})
            continue
        if not pixel:  # image-level labels: the image metric only, on compute_all's image scores
            out.update({"i_auroc" + suffix: i_auroc(labels, image_maxima(preds)),
                        "p_auroc" + suffix: None, "aupro" + suffix: None})
            continue
        m = prediction_metrics(preds, records, sizes, fpr_limits=(0.3,))
        out.update({k + suffix: float(m[v]) for k, v in R_METRICS.items()})
    return out


def image_labelled(session: Session) -> set[str]:
    """Classes whose latest recorded evaluation used image-level labels only (added with --image-labels,
    or without masks): later steps evaluate them the same way."""
    _, names, matrix = repo.r_matrix(session, LABELS_METRIC)
    out = set()
    for j, name in enumerate(names):
        last = next((row[j] for row in reversed(matrix) if row[j] is not None), None)
        if last == 0.0:
            out.add(name)
    return out


def sizes_of(records: Sequence[SampleRecord]) -> list[tuple[int, int]]:
    return [record_size(r) for r in records]
