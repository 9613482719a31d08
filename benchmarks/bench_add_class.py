"""One class learned through `iumad add-class` on a fresh store, as a plant would: the step's metrics
(its registered evaluation set: the test split), loss curve and wall time, for the default model and
for its learned branches alone (`score.retrieval: false`).

    python benchmarks/bench_add_class.py [--data ../shared/data/mvtec3d-cable_gland-224] [--runs default,learned-only]

Writes benchmarks/results/add_class.json (merged per run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IUMAD_SHARED", ROOT.parent / "shared"))
RUNS = {"default": {}, "learned-only": {"score": {"retrieval": False}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "mvtec3d-cable_gland-224")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "add_class.json")
    args = ap.parse_args()
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "add_class", "runs": {}}
    for run in args.runs.split(","):
        cfg = yaml.safe_load(args.config.read_text()) or {}
        for section, values in RUNS[run].items():
            cfg.setdefault(section, {}).update(values)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(yaml.safe_dump(cfg))
            (name,) = [p.name for p in args.data.iterdir() if p.is_dir()]
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "iumad", "add-class", name, "--data", str(args.data),
                                  "--store", str(Path(tmp) / "store"), "--config", str(config), "--json"],
                                 capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
        step = json.loads(res.stdout)
        report["runs"][run] = {"class": name, "overrides": RUNS[run], "wall_s": round(wall, 1),
                               "results": step["results"], "losses": [round(x, 4) for x in step["losses"]],
                               "commit": git_commit(), "machine": machine(), "config": str(args.config),
                               "command": "python benchmarks/bench_add_class.py " + " ".join(sys.argv[1:])}
        print(json.dumps({run: {k: report["runs"][run][k] for k in ("wall_s", "results")}}), flush=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
