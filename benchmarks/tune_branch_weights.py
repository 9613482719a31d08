"""How the default retrieval weight was chosen: on synthetic data only, never on a test split of real data.

One joint fit on a synthetic set (3 classes); the standardised branch maps are then recombined with
several retrieval weights and scored on the synthetic test split.

    python benchmarks/tune_branch_weights.py

Writes benchmarks/results/tuning.json.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from iumad.config import Config
from iumad.data import find_classes
from iumad.data.synth import generate_dataset
from iumad.eval.metrics import compute_all
from iumad.model.detector import Detector, read_gt
from iumad.progress import StderrProgress

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = (0.0, 1.0, 2.0, 4.0, float("inf"))


def combine(pred, weight: float) -> np.ndarray:
    mods = [m for m in ("rgb", "geometry") if m in pred.maps]
    if weight == float("inf"):
        per = [pred.maps[f"retrieval/{m}"] for m in mods]
    else:
        per = [(pred.maps[f"reconstruction/{m}"] + weight * pred.maps[f"retrieval/{m}"]) / (1 + weight) for m in mods]
    return np.mean(per, axis=0)


def main() -> None:
    torch.set_num_threads(2)
    cfg = Config()
    progress = StderrProgress()
    results: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synth"
        generate_dataset(out, n_classes=3, seed=5, n_train=40, n_val=6, n_test=28)
        sources = find_classes(out)
        det = Detector(cfg, cache_dir=Path(tmp) / "cache")
        det.fit({s.name: s.records("train") for s in sources},
                validation={s.name: s.records("validation") for s in sources}, progress=progress)
        for s in sources:
            recs = s.records("test")
            preds = det.predict_records(recs, s.name)
            gts = np.stack([read_gt(r, p.maps["fused"].shape) for r, p in zip(recs, preds)])
            for w in WEIGHTS:
                m = compute_all(np.stack([combine(p, w) for p in preds]), gts)
                results.setdefault(str(w), []).append([m["i_auroc"], m["p_auroc"], m["aupro@0.3"]])
    table = {w: dict(zip(("i_auroc", "p_auroc", "aupro@0.3"), np.round(np.mean(v, 0), 4).tolist()))
             for w, v in results.items()}
    report = {"benchmark": "branch weight tuning (synthetic only)", "command": "python benchmarks/tune_branch_weights.py",
              "config": cfg.to_dict(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                   "torch": torch.__version__},
              "mean_over_classes_by_retrieval_weight": table}
    path = ROOT / "benchmarks" / "results" / "tuning.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
