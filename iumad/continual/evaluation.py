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

Thresholds: F1-optimal image score on the evaluation set when it has defect samples ('defects'); else
the `threshold_quantile` of the held-out normal scores ('normal-quantile', with a warning). With
`continual.threshold_from: normals` (the benchmark harness) always the latter: nothing is chosen on a test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from iumad.data.sample import SampleRecord
from iumad.eval.metrics import compute_all
from iumad.data.loading import read_gt, record_size
from iumad.model.detector import Detector
from iumad.model.features import SampleFeatures
from iumad.progress import ProgressFn, no_progress
from iumad.store.repository import EvaluationRecord, ThresholdRecord

R_METRICS = {"i_auroc": "i_auroc", "p_auroc": "p_auroc", "aupro": "aupro@0.3"}  # ours -> compute_all's
REPORT_METRICS = (*R_METRICS, *(f"{k}_given" for k in R_METRICS), "class_accuracy")


@dataclass
class ClassResult:
    """One class under one model version."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)  # R metrics (nan = undefined)
    n_eval: int = 0
    threshold: ThresholdRecord | None = None
    normal_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    warning: str | None = None  # why a metric could not be measured (e.g. its evaluation set is gone)

    def warnings(self) -> str | None:
        """This result's warnings, its threshold's included, as one line (None when there is none)."""
        found = [w for w in (self.warning, self.threshold.warning if self.threshold else None) if w]
        return "; ".join(found) or None

    def evaluation_records(self) -> list[EvaluationRecord]:
        rows = [EvaluationRecord(self.name, k, v, self.n_eval) for k, v in self.metrics.items()]
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
                   threshold_from: str = "evaluation") -> ClassResult:
    """Metrics, threshold and held-out normal scores of one class under `det`."""
    res = ClassResult(name)
    if holdout:
        preds = det.predict_features(list(holdout), [name] * len(holdout), list(holdout_sizes))
        res.normal_scores = np.array([p.score for p in preds])
    if evaluation:
        feats = det.extractor.extract(evaluation, det.classes[name].modalities, progress, stage="features")
        sizes = sizes_of(evaluation)
        auto = det.predict_features(feats, [None] * len(feats), sizes)
        given = list(auto)  # where the class was predicted right, both modes give the same maps
        wrong = [i for i, p in enumerate(auto) if p.class_name != name]
        if wrong:
            for i, p in zip(wrong, det.predict_features([feats[i] for i in wrong], [name] * len(wrong),
                                                        [sizes[i] for i in wrong])):
                given[i] = p
        gts = np.stack([read_gt(r, p.maps["fused"].shape) for r, p in zip(evaluation, given)])
        labels = gts.reshape(len(gts), -1).any(axis=1)
        res.metrics["class_accuracy"] = 1 - len(wrong) / len(auto)
        if labels.any() and not labels.all():
            for suffix, preds in (("", auto), ("_given", given)):
                if suffix and not wrong:  # the same maps: the same metrics
                    res.metrics.update({k + suffix: res.metrics[k] for k in R_METRICS})
                    continue
                m = compute_all(np.stack([p.maps["fused"] for p in preds]), gts, fpr_limits=(0.3,))
                res.metrics.update({k + suffix: float(m[v]) for k, v in R_METRICS.items()})
            if threshold_from == "evaluation":
                scores = np.array([p.score for p in given])
                res.threshold = ThresholdRecord(name, f1_threshold(labels, scores), "defects")
        res.n_eval = len(evaluation)
    if res.threshold is None and len(res.normal_scores):
        why = "no defect samples to evaluate" if threshold_from == "evaluation" else "thresholds from normals"
        res.threshold = ThresholdRecord(
            name, float(np.quantile(res.normal_scores, quantile)), "normal-quantile",
            f"{why} ({name!r}): threshold is the {quantile:g} quantile of "
            f"{len(res.normal_scores)} held-out normal scores" if threshold_from == "evaluation" else None)
    return res


def sizes_of(records: Sequence[SampleRecord]) -> list[tuple[int, int]]:
    return [record_size(r) for r in records]
