"""Time `iumad.data.geometry.geometry_image` on one core; target: under 50 ms for a 224x224 sample.

Usage: python benchmarks/bench_geometry.py [--repeats N] [--out PATH]

Uses the real MVTec 3D-AD cable_gland sample from the shared data folder (../shared next to the
repository, or $IUMAD_SHARED) when present, else a synthetic 224x224 scene, plus the 400x400 HALCON
original when present. Reports wall-clock and CPU (process) time medians; on a shared machine the CPU
time is the steadier number. Writes benchmarks/results/geometry.json with machine info.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one core

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402

from iumad.data.geometry import PREPROCESSING_VERSION, geometry_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 50.0


def _shared() -> Path:
    env = os.environ.get("IUMAD_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def _synthetic(size: int = 224) -> np.ndarray:
    """Tilted table 0.65 m away with a 3 cm hemisphere, 0.3 mm noise and 30% missing points."""
    rng = np.random.default_rng(0)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    pitch = 0.13 / size
    x, y = (u - size / 2) * pitch, (v - size / 2) * pitch
    z = 0.65 + 0.3 * x - 0.2 * y + rng.normal(0, 3e-4, x.shape)
    r = 0.3 * 0.13
    z -= np.sqrt(np.clip(r * r - x * x - y * y, 0, None)) * 0.8
    xyz = np.stack([x, y, z], axis=2).astype(np.float32)
    xyz[rng.random(x.shape) < 0.3] = 0.0
    return xyz


def _machine() -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "cpu_count": os.cpu_count(),
        "threads": 1,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def _time(xyz: np.ndarray, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        geometry_image(xyz)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        geometry_image(xyz)
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    wall.sort()
    return {
        "repeats": repeats,
        "wall_median_ms": round(statistics.median(wall), 2),
        "wall_p10_ms": round(wall[len(wall) // 10], 2),
        "wall_p90_ms": round(wall[(9 * len(wall)) // 10], 2),
        "wall_min_ms": round(wall[0], 2),
        "cpu_median_ms": round(statistics.median(cpu), 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "geometry.json")
    args = ap.parse_args(argv)

    try:  # keep any torch-based code in the process on one thread too (not needed by geometry)
        import threadpoolctl  # type: ignore[import-not-found]

        threadpoolctl.threadpool_limits(1)
    except ImportError:
        pass

    data = _shared() / "data"
    cases: list[tuple[str, str, np.ndarray]] = []
    real224 = data / "mvtec3d-cable_gland-224" / "cable_gland" / "train" / "good" / "xyz" / "000.tiff"
    real400 = data / "mvtec3d-fixtures" / "cable_gland" / "train" / "good" / "xyz" / "000.tiff"
    import tifffile

    if real224.is_file():
        cases.append(("mvtec3d cable_gland 224", str(real224), tifffile.imread(real224)))
    else:
        cases.append(("synthetic 224", "synthetic", _synthetic(224)))
    if real400.is_file():
        cases.append(("mvtec3d cable_gland 400 (HALCON original)", str(real400), tifffile.imread(real400)))

    results = []
    for name, src, xyz in cases:
        r = {"case": name, "source": src, "shape": list(xyz.shape), **_time(xyz, args.repeats)}
        results.append(r)
        print(
            f"{name:45s} {xyz.shape[0]}x{xyz.shape[1]}: wall median {r['wall_median_ms']:.1f} ms "
            f"(p10 {r['wall_p10_ms']:.1f}, p90 {r['wall_p90_ms']:.1f}), cpu median {r['cpu_median_ms']:.1f} ms"
        )
    main_case = results[0]
    report = {
        "benchmark": "geometry_image",
        "preprocessing_version": PREPROCESSING_VERSION,
        "target_ms_224": TARGET_MS,
        "meets_target": main_case["cpu_median_ms"] < TARGET_MS and main_case["wall_min_ms"] < TARGET_MS,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
