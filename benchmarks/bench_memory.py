"""Peak RSS of the plant's commands at two camera resolutions (issue #17, point 4): `iumad add-class`,
`iumad predict` (with overlays), `iumad evaluate` and `iumad benchmark --method memory-bank`, each its own
process, on the shared half-size tire (300x400) and on it upsampled 2x (600x800, the original size).

    python benchmarks/bench_memory.py [--work DIR] [--epochs 1]

The 2x copy is generated under --work (RGB bicubic, gt nearest), never inside the repository. Training
runs `--epochs` epochs (1 by default: what a step holds in memory does not depend on how many epochs
it trains, and this keeps the run to a few CPU minutes). The memory-bank run learns cable_gland (224 px,
RGB + xyz) and then tire, so its evaluation holds two classes at different resolutions. Each command
runs under a small Python wrapper whose only child it is, and its peak RSS is that child's ru_maxrss.
Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IUMAD_SHARED", ROOT.parent / "shared"))
LIMIT_MB = 2048
WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")


def upsample_class(src: Path, dst: Path, factor: int) -> Path:
    """A copy of the class folder `src` at `factor` times its size: RGB bicubic, gt masks nearest (defect
    ids kept), other files as they are. Skipped when `dst` is complete from an earlier run."""
    done = dst / ".complete"
    if done.is_file():
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    for p in sorted(src.rglob("*")):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() == ".png":
            with Image.open(p) as im:
                mask = p.parent.name == "gt"
                im.resize((im.width * factor, im.height * factor), Image.NEAREST if mask else Image.BICUBIC).save(q)
        else:
            shutil.copyfile(p, q)
    done.write_text("")
    return dst


def peak_rss(args: list[str]) -> dict:
    """Run `python -m iumad ARGS`: its peak RSS (MB), wall time, exit code and the JSON it printed."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-m", "iumad", *args],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    lines = res.stderr.strip().splitlines()
    row = {"args": args, "peak_rss_mb": round(int(lines[-1]) * 1024 / 2 ** 20, 1), "wall_s": round(wall, 1),
           "exit_code": res.returncode}
    if res.returncode:
        row["error"] = "\n".join(lines[-6:-1])
    return row


def size_of(class_dir: Path) -> str:
    """'WxH' of the class's first training image."""
    first = next(iter(sorted((class_dir / "train" / "good" / "rgb").iterdir())))
    with Image.open(first) as im:
        return f"{im.width}x{im.height}"


def run_resolution(label: str, tire: Path, cable_gland: Path, config: Path, work: Path) -> list[dict]:
    """The four commands on one copy of tire (a fresh store each time)."""
    store = work / f"store-{label}"
    out = work / f"out-{label}"
    for p in (store, out):
        shutil.rmtree(p, ignore_errors=True)
    view = work / f"bank-data-{label}"  # cable_gland, then tire: a memory-bank protocol of two classes
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    (view / "cable_gland").symlink_to(cable_gland.resolve())
    (view / "tire").symlink_to(tire.resolve())
    s = ["--store", str(store)]
    commands = {
        "add-class": ["add-class", "tire", "--data", str(tire), "--config", str(config), *s, "--json"],
        "predict": ["predict", str(tire / "test"), "--class", "tire", "--out", str(out / "predict"), *s, "--json"],
        "evaluate": ["evaluate", *s, "--json"],
        "benchmark memory-bank": ["benchmark", "--data", str(view), "--protocol", "1x2", "--method", "memory-bank",
                                  "--classes", "cable_gland,tire", "--config", str(config),
                                  "--out", str(out / "bank"), "--json"],
    }
    rows = []
    for i, (name, args) in enumerate(commands.items()):
        print(f"bench_memory: {label}: {name} ({i + 1}/{len(commands)})", file=sys.stderr, flush=True)
        row = {"data": label, "size": size_of(tire), "command": name, **peak_rss(args)}
        row["args"] = " ".join(a if a not in (str(store), str(work)) else "STORE" for a in row["args"])
        print(json.dumps({k: row[k] for k in ("data", "size", "command", "peak_rss_mb", "wall_s", "exit_code")}),
              flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iumad-bench-memory"))
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    args = ap.parse_args()
    half = SHARED / "data" / "mvtec3d-tire-rgb-half" / "tire"
    cable_gland = SHARED / "data" / "mvtec3d-cable_gland-224" / "cable_gland"
    for p in (half, cable_gland):
        if not p.is_dir():
            sys.exit(f"{p}: not found; set IUMAD_SHARED to the shared folder")
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(args.config.read_text()) or {}
    cfg.setdefault("train", {})["epochs"] = args.epochs
    config = args.work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))

    from iumad.config import load_config

    print(f"bench_memory: upsampling {half} 2x into {args.work / 'tire-2x'}", file=sys.stderr, flush=True)
    full = upsample_class(half, args.work / "tire-2x" / "tire", 2)
    rows = run_resolution("tire half (shared)", half, cable_gland, config, args.work)
    rows += run_resolution("tire 2x", full, cable_gland, config, args.work)
    report = {"benchmark": "memory", "command": "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]),
              "commit": git_commit(), "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT)
              else str(args.config), "overrides": {"train.epochs": args.epochs},
              "config_hash": load_config(config).hash(), "machine": machine(), "limit_mb": LIMIT_MB,
              "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    bad = [r for r in rows if r["exit_code"] or r["peak_rss_mb"] > LIMIT_MB]
    if bad:
        print(f"over {LIMIT_MB} MB or failed: {[(r['data'], r['command']) for r in bad]}", file=sys.stderr)


if __name__ == "__main__":
    main()
