"""`iumad inspect`: what a dataset folder holds, read-only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from iumad.data.dataset import find_classes
from iumad.data.sample import SPLITS
from iumad.data.loading import load_sample
from iumad.progress import ProgressFn, no_progress


def inspect_path(path: Path, progress: ProgressFn = no_progress) -> dict:
    """Read every sample under `path` and summarise it per class; writes nothing."""
    classes = find_classes(path)
    report = {"path": str(Path(path).resolve()), "classes": []}
    for source in classes:
        records = {split: source.records(split) for split in SPLITS}
        total = sum(len(r) for r in records.values())
        done = 0
        sizes: Counter[str] = Counter()
        modalities: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        missing: list[float] = []
        counts: dict[str, dict[str, int]] = {}
        defect_pixels: list[float] = []
        for split, recs in records.items():
            counts[split] = dict(sorted(Counter(r.label for r in recs).items()))
            for rec in recs:
                sample = load_sample(rec)
                h, w = sample.size
                sizes[f"{w}x{h}"] += 1
                modalities["+".join(sample.modalities)] += 1
                if sample.geometry is not None:
                    kinds[sample.geometry_kind or "?"] += 1
                    missing.append(1.0 - float(sample.valid.mean()))
                if sample.gt is not None and sample.is_anomalous:
                    defect_pixels.append(float(sample.gt.mean()))
                done += 1
                progress(f"inspect {source.name}", done, total)
        report["classes"].append({
            "name": source.name,
            "layout": source.layout,
            "path": str(source.path),
            "splits": counts,
            "n_samples": total,
            "modalities": dict(modalities),
            "geometry_kind": dict(kinds),
            "image_sizes": dict(sizes),
            "missing_geometry_share": float(np.mean(missing)) if missing else None,
            "defect_types": sorted({r.label for r in records["test"] if r.label != "good"}),
            "defect_kinds": dict(sorted(Counter(r.defect_kind for r in records["test"]
                                                if r.label != "good" and r.defect_kind).items())),
            "defects_without_mask": sum(r.label != "good" and r.gt is None for r in records["test"]),
            "mean_defect_area_share": float(np.mean(defect_pixels)) if defect_pixels else None,
        })
    layouts = sorted({c["layout"] for c in report["classes"]})
    report["layout"] = layouts[0] if len(layouts) == 1 else "mixed"
    return report
