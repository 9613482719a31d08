"""Replay exemplars: which normal samples of a class are kept, and how they are found again.

An exemplar is a reference to a sample (every file's path and sha256), never a copy; its frozen
features come back from the feature cache. Herding (Welling 2009, as in iCaRL) orders samples so that
the mean of every prefix tracks the class mean in pooled feature space; a smaller budget therefore keeps
a prefix, which is how old classes are re-balanced when the budget is a total.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np

from iumad.config import ContinualConfig
from iumad.data.sample import SampleRecord
from iumad.model.features import SampleFeatures
from iumad.store.atomic import file_sha256

T = TypeVar("T")


def pooled(features: Sequence[SampleFeatures]) -> np.ndarray:
    """(N, D) per-sample descriptor: spatial mean of each modality's features, concatenated, L2-normed."""
    rows = []
    for s in features:
        v = np.concatenate([s.features[m].astype(np.float32).mean(axis=(1, 2)) for m in s.modalities])
        rows.append(v / max(float(np.linalg.norm(v)), 1e-8))
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def herding_order(x: np.ndarray, k: int) -> list[int]:
    """Indices of k rows chosen greedily so that their running mean stays closest to the mean of all."""
    n = len(x)
    k = min(k, n)
    target = x.mean(axis=0)
    chosen: list[int] = []
    total = np.zeros_like(target)
    free = np.ones(n, dtype=bool)
    for t in range(1, k + 1):
        gap = np.linalg.norm(target[None] - (total[None] + x) / t, axis=1)
        gap[~free] = np.inf
        i = int(np.argmin(gap))
        chosen.append(i)
        free[i] = False
        total += x[i]
    return chosen


def select(features: Sequence[SampleFeatures], k: int, method: str, seed: int) -> list[int]:
    """Indices (in rank order) of at most k exemplars among `features`."""
    if method == "random":
        rng = np.random.default_rng(seed)
        return [int(i) for i in rng.permutation(len(features))[:k]]
    return herding_order(pooled(features), k)


def per_class_budget(cfg: ContinualConfig, n_classes: int) -> int:
    """Exemplars each class may keep when `n_classes` classes are learned."""
    if cfg.exemplar_budget_mode == "total":
        return max(1, cfg.exemplar_budget // max(1, n_classes))
    return cfg.exemplar_budget


def replay_rows(kept: dict[str, list[T]], budget: int, rotation: int) -> dict[str, list[T]]:
    """The exemplars a step replays under a total budget, per class (`kept`: each class's exemplars in
    rank order, classes in learning order): whole rank layers (every class's best, then every class's
    second, ...) while they fit in `budget`; a layer that does not fit (more classes than the budget has
    room for) gives a window of its classes that starts `rotation * budget` classes in, so that stepping
    `rotation` by one per step replays every class in turn. A step thus trains on at most `budget`
    replayed samples whatever the number of classes."""
    out: dict[str, list[T]] = {n: [] for n in kept}
    left = budget
    for rank in range(max((len(v) for v in kept.values()), default=0)):
        layer = [n for n, rows in kept.items() if len(rows) > rank]
        if len(layer) > left:
            start = (rotation * budget) % len(layer)
            layer = [layer[(start + i) % len(layer)] for i in range(left)]
        for n in layer:
            out[n].append(kept[n][rank])
        left -= len(layer)
        if left <= 0:
            break
    return out


def split_holdout(records: Sequence[SampleRecord], validation: Sequence[SampleRecord], n: int
                  ) -> tuple[list[SampleRecord], list[SampleRecord]]:
    """(training records, held-out normals). Held-out normals come from the validation split when the
    class has one, else every fifth training sample (at most n), which then is never trained on."""
    if validation:
        return list(records), list(validation)[:n]
    picked = set(list(range(0, len(records), 5))[:n]) if len(records) > 1 else set()
    return ([r for i, r in enumerate(records) if i not in picked],
            [r for i, r in enumerate(records) if i in picked])


def record_to_json(record: SampleRecord) -> dict[str, Any]:
    """Every file of a sample with its sha256, so replay can verify the sample before using it."""
    files = {m: {"path": str(p), "sha256": file_sha256(p)}
             for m, p in (("rgb", record.rgb), ("geometry", record.geometry)) if p is not None}
    return {"class_name": record.class_name, "split": record.split, "label": record.label, "files": files,
            "geometry_kind": record.geometry_kind,
            "depth_range": list(record.depth_range) if record.depth_range else None}


def record_from_json(data: dict[str, Any]) -> tuple[SampleRecord | None, str | None]:
    """(record, None) when every file is present with its recorded sha256, else (None, why)."""
    files = data.get("files") or {}
    for m, f in files.items():
        path = Path(f["path"])
        if not path.is_file():
            return None, f"{path}: exemplar file missing"
        if file_sha256(path) != f["sha256"]:
            return None, f"{path}: exemplar file changed since it was selected (sha256 differs)"
    dr = data.get("depth_range")
    rec = SampleRecord(class_name=data["class_name"], split=data.get("split", "train"),
                       label=data.get("label", "good"),
                       rgb=Path(files["rgb"]["path"]) if "rgb" in files else None,
                       geometry=Path(files["geometry"]["path"]) if "geometry" in files else None,
                       geometry_kind=data.get("geometry_kind"), depth_range=tuple(dr) if dr else None)
    return rec, None
