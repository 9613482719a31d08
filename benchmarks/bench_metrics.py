"""Time AUPRO (exact, v2) and compute_all on the 108 cable_gland reference maps (224x224).

Usage: python benchmarks/bench_metrics.py [--repeats 3]
Reference data is read from ``$IUMAD_SHARED`` or ``../shared`` beside the checkout.
Prints the median time and writes ``benchmarks/results/metrics.json`` with machine info.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from iumad.eval import metrics as M

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    env = os.environ.get("IUMAD_SHARED")
    return Path(env) if env else ROOT.parent / "shared"


def load_reference(shared: Path) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    from PIL import Image

    ref = shared / "data" / "metric-reference"
    test_dir = shared / "data" / "mvtec3d-cable_gland-224" / "cable_gland" / "test"
    data = np.load(ref / "cable_gland_224_maps.npz")
    maps = data["maps"].astype(np.float32)
    gts = []
    for name in data["names"]:
        defect, stem = str(name).split("/")
        gts.append(np.asarray(Image.open(test_dir / defect / "gt" / f"{stem}.png")) > 0)
    expected = json.loads((ref / "cable_gland_224_expected.json").read_text())["expected"]
    return maps, np.stack(gts), expected


def median_time(fn, repeats: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "metrics.json")
    args = parser.parse_args()

    shared = shared_dir()
    if not (shared / "data" / "metric-reference" / "cable_gland_224_maps.npz").is_file():
        print(f"reference data not found under {shared}; set IUMAD_SHARED", file=sys.stderr)
        return 1
    maps, gts, expected = load_reference(shared)

    t_aupro, aupro_times, aupro = median_time(lambda: M.aupro(maps, gts, 0.3), args.repeats)
    t_v1, v1_times, aupro_v1 = median_time(
        lambda: M.aupro(maps, gts, 0.3, exact=False), args.repeats
    )
    t_all, all_times, results = median_time(lambda: M.compute_all(maps, gts), args.repeats)

    print(f"maps: {maps.shape[0]} x {maps.shape[1]}x{maps.shape[2]} ({maps.size:,} pixels)")
    print(f"aupro@0.3 exact (v2):       {t_aupro:.3f} s median of {args.repeats}  -> {aupro:.10f}")
    print(f"aupro@0.3 100 thresh (v1):  {t_v1:.3f} s median of {args.repeats}  -> {aupro_v1:.10f}")
    print(f"compute_all (all metrics):  {t_all:.3f} s median of {args.repeats}")
    print(f"expected aupro_0.3_v2_exact = {expected['aupro_0.3_v2_exact']:.10f}")

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a project dependency
        torch_version = None

    record = {
        "benchmark": "metrics",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"maps": list(maps.shape), "dtype": "float16->float32", "class": "cable_gland"},
        "repeats": args.repeats,
        "seconds_median": {"aupro_exact": t_aupro, "aupro_100thr": t_v1, "compute_all": t_all},
        "seconds_all": {"aupro_exact": aupro_times, "aupro_100thr": v1_times, "compute_all": all_times},
        "values": {"aupro@0.3_exact": aupro, "aupro@0.3_100thr": aupro_v1, **results},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "numpy": np.__version__,
            "torch": torch_version,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
