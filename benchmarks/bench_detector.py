"""Detector budget and quality: training time, end-to-end inference speed, peak memory, and metrics.

Real class: ../shared/data/mvtec3d-cable_gland-224 (train on train, calibrate on validation normals,
report on test; nothing is selected on test). Synthetic: per defect family (rgb-only, geometry-only,
both), AUPRO of the fused model and of RGB-only and geometry-only models, to show that fusion sees what a
single modality cannot.

    python benchmarks/bench_detector.py [--config configs/default.yaml] [--skip-synth] [--skip-single]
                                        [--synth-classes 3]

Writes benchmarks/results/detector.json. Timings are wall clock on this machine with torch threads = 2;
feature caches start empty, so training and inference times include reading files and the backbone.
Inference runs three times over the test split (the first pass cold); the median rate is reported and
every pass is recorded, because this host's speed drifts by a fifth from one minute to the next.
Each cable_gland run (RGB + geometry, RGB only, geometry only) is a process of its own, so its peak RSS
(fit and inference of one model, read before the metrics) is its own. The model and the memory the
allocator kept from it are released before the metrics, which hold every test map at once;
`peak_rss_mb_with_evaluation` is the process's peak with them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, only  # noqa: E402

from iumad.config import load_config
from iumad.data import find_classes
from iumad.data.synth import DEFECT_FAMILIES, generate_dataset
from iumad.eval.metrics import aupro, compute_all
from iumad.data.loading import read_gt, record_size
from iumad.model.detector import Detector
from iumad.model.device import resolve_device
from iumad.progress import StderrProgress

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IUMAD_SHARED", ROOT.parent / "shared"))
KEYS = ("i_auroc", "p_auroc", "aupro@0.3")
PASSES = 3  # end-to-end inference passes over the test split; the median is reported


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Free what is unreferenced and hand glibc's kept free memory back to the system (where there is
    glibc): the metrics then do not stack on top of the fitted model's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_class(config: Path | None, data: Path, modality: str | None, cache: Path) -> dict:
    """Fit one class, then time end-to-end inference on its test split (`PASSES` passes, the first one
    cold; the median is reported, every pass recorded) and score it.

    Runs in a process of its own (`in_own_process`), so its peak RSS is that of one model."""
    torch.set_num_threads(2)
    cfg = load_config(config)
    progress = StderrProgress()
    (source,) = find_classes(data)
    det = Detector(cfg, cache_dir=cache)
    t0 = time.perf_counter()
    det.fit({source.name: only(source.records("train"), modality)},
            validation={source.name: only(source.records("validation"), modality)}, progress=progress)
    fit_s = time.perf_counter() - t0
    test = only(source.records("test"), modality)
    det._extractor.cache = None  # inference measured end to end: files -> backbone -> maps
    rates = []
    for _ in range(PASSES):
        t0 = time.perf_counter()
        preds = det.predict_records(test, source.name, progress=progress)
        rates.append(len(test) / (time.perf_counter() - t0))
    peak_mb = peak_rss_mb()  # fit and inference; the metrics below hold every map of the test split at once
    del det
    release_memory()
    gts = np.stack([read_gt(r, record_size(r)) for r in test])
    metrics = {}
    for key in preds[0].maps:
        m = compute_all(np.stack([p.maps[key] for p in preds]), gts)
        metrics[key] = {k: round(float(m[k]), 4) for k in KEYS}
    return {"modalities": modality or "rgb+geometry", "fit_s": round(fit_s, 1),
            "inference_samples_per_s": round(float(np.median(rates)), 2),
            "inference_passes_samples_per_s": [round(r, 2) for r in rates], "n_test": len(test),
            "peak_rss_mb": round(peak_mb, 1), "peak_rss_mb_with_evaluation": round(peak_rss_mb(), 1),
            "metrics": metrics}


def in_own_process(fn, *args):
    """fn(*args) in a fresh process: each run's peak RSS is its own, not the sum of the runs before it."""
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def synth_families(cfg, out: Path, cache: Path, progress, n_classes: int) -> dict:
    """AUPRO@0.3 per defect family for fused, RGB-only and geometry-only models (joint fit)."""
    generate_dataset(out, n_classes=n_classes, seed=0, n_train=40, n_val=6, n_test=28)
    sources = find_classes(out)
    result = {}
    for modality in (None, "rgb", "geometry"):
        det = Detector(cfg, cache_dir=cache)
        det.fit({s.name: only(s.records("train"), modality) for s in sources},
                validation={s.name: only(s.records("validation"), modality) for s in sources}, progress=progress)
        per_family: dict[str, list] = {f: [] for f in ("rgb", "geometry", "both")}
        goods = []
        for s in sources:
            test = only(s.records("test"), modality)
            preds = det.predict_records(test, s.name)
            for r, p in zip(test, preds):
                item = (p.maps["fused"], read_gt(r, p.maps["fused"].shape))
                (goods if r.label == "good" else per_family[DEFECT_FAMILIES[r.label]]).append(item)
        name = modality or "rgb+geometry"
        result[name] = {}
        for fam, items in per_family.items():
            maps = np.stack([m for m, _ in items + goods])
            gts = np.stack([g for _, g in items + goods])
            result[name][f"aupro@0.3 {fam} defects"] = round(float(aupro(maps, gts, 0.3)), 4)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--skip-synth", action="store_true")
    ap.add_argument("--skip-single", action="store_true", help="skip the RGB-only and geometry-only runs")
    ap.add_argument("--synth-classes", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detector.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config)
    progress = StderrProgress()
    report = {"benchmark": "detector", "command": "python benchmarks/bench_detector.py " + " ".join(sys.argv[1:]),
              "commit": git_commit(), "config_hash": cfg.hash(), "config": cfg.to_dict(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "device": str(resolve_device(cfg.train.device)),
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "targets": {"inference_samples_per_s": 15, "fit_s_220_samples": 600, "peak_rss_mb": 2048,
                          "cable_gland_must": {"i_auroc": 0.85, "p_auroc": 0.97, "aupro@0.3": 0.90}}}
    data = SHARED / "data" / "mvtec3d-cable_gland-224"
    with tempfile.TemporaryDirectory() as tmp:
        if data.is_dir():
            runs = [None] if args.skip_single else [None, "rgb", "geometry"]
            report["cable_gland"] = [in_own_process(run_class, args.config, data, m, Path(tmp) / f"cache-{m}")
                                     for m in runs]
        else:
            report["cable_gland"] = f"skipped: {data} not found"
        if not args.skip_synth:
            report["synthetic_families"] = synth_families(cfg, Path(tmp) / "synth", Path(tmp) / "cache-s", progress,
                                                          args.synth_classes)
            report["peak_rss_mb_synthetic_families"] = round(peak_rss_mb(), 1)  # cable_gland runs have their own
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
