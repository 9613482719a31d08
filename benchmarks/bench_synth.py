"""Time the default synthetic set (10 classes x 60 train / 10 validation / 40 test at 224x224).

Writes benchmarks/results/synth.json: wall time, samples per second, bytes written, machine info, and the
per-defect-type modality statistics (mean |dRGB| and mean |dz| inside the gt, against the defect-free twin)
at full size. The target is under 60 s on 2 cores.

    python benchmarks/bench_synth.py [--classes 10] [--workers N] [--stat-seeds 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from iumad.data.synth import CLASS_NAMES, DEFECT_FAMILIES, GENERATOR_VERSION, generate_dataset, render_sample, sample_seed

RESULTS = Path(__file__).resolve().parent / "results" / "synth.json"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"platform": platform.platform(), "python": sys.version.split()[0], "numpy": np.__version__,
            "cpu": cpu, "cores_available": cores}


def modality_stats(size: int, n_seeds: int) -> dict:
    """Per defect type, over every class and `n_seeds` samples: change inside the gt vs the twin."""
    out = {}
    for d, fam in DEFECT_FAMILIES.items():
        vals = []
        for c in CLASS_NAMES:
            for k in range(n_seeds):
                seed = sample_seed(101, c, "test", k)
                rgb0, xyz0, _ = render_sample(c, seed, size)
                rgb1, xyz1, gt = render_sample(c, seed, size, defect=d)
                g = gt > 0
                valid = np.all(xyz0 != 0, -1) & np.all(xyz1 != 0, -1)
                drgb = np.abs(rgb1.astype(np.int16) - rgb0).mean(-1)
                dz = np.abs(xyz1[..., 2].astype(np.float64) - xyz0[..., 2]) * 1000.0
                vals.append((drgb[g].mean(), dz[g & valid].mean(), g.mean() * 100))
        v = np.array(vals)
        out[d] = {"family": fam, "mean_abs_drgb_in_gt": round(float(v[:, 0].mean()), 2),
                  "min_abs_drgb_in_gt": round(float(v[:, 0].min()), 2),
                  "mean_abs_dz_mm_in_gt": round(float(v[:, 1].mean()), 3),
                  "min_abs_dz_mm_in_gt": round(float(v[:, 1].min()), 3),
                  "mean_gt_area_percent": round(float(v[:, 2].mean()), 2), "samples": len(vals)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: auto, one per core)")
    ap.add_argument("--stat-seeds", type=int, default=2, help="samples per class and defect type for the stats "
                                                                "(0 to skip)")
    ap.add_argument("--keep", type=Path, default=None, help="write the set here and keep it")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    tmp = None
    if args.keep is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_synth_"))
        target = tmp / "synth"
    else:
        target = args.keep
    try:
        t0 = time.perf_counter()
        manifest = generate_dataset(target, n_classes=args.classes, size=args.size, workers=args.workers)
        wall = time.perf_counter() - t0
        files = [p for p in target.rglob("*") if p.is_file()]
        n_samples = args.classes * (manifest["n_train"] + manifest["n_val"] + manifest["n_test"])
        size_bytes = sum(p.stat().st_size for p in files)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "benchmark": "synth",
        "generator_version": GENERATOR_VERSION,
        "classes": args.classes,
        "size": args.size,
        "samples": n_samples,
        "files": len(files),
        "bytes": size_bytes,
        "workers": args.workers if args.workers is not None else "auto",
        "wall_s": round(wall, 2),
        "samples_per_s": round(n_samples / wall, 1),
        "target_s": 60.0,
        "within_target": wall < 60.0,
        "machine": machine(),
    }
    print(f"synth: {n_samples} samples ({len(files)} files, {size_bytes / 1e6:.0f} MB) in {wall:.1f} s "
          f"({n_samples / wall:.1f}/s)")
    if args.stat_seeds > 0:
        t1 = time.perf_counter()
        stats = modality_stats(args.size, args.stat_seeds)
        result["modality_stats"] = stats
        result["modality_stats_s"] = round(time.perf_counter() - t1, 1)
        print(f"{'defect':8s} {'family':9s} {'mean|dRGB|':>10s} {'min':>6s} {'mean|dz| mm':>11s} {'min':>6s}")
        for d, s in stats.items():
            print(f"{d:8s} {s['family']:9s} {s['mean_abs_drgb_in_gt']:10.2f} {s['min_abs_drgb_in_gt']:6.2f} "
                  f"{s['mean_abs_dz_mm_in_gt']:11.3f} {s['min_abs_dz_mm_in_gt']:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
