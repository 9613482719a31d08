"""Forgetting when classes arrive one at a time: the synthetic 10-class set, with and without replay and
distillation, through the same code path as `iumad add-class` (a fresh store per run).

    python benchmarks/bench_incremental.py [--classes 10] [--config configs/default.yaml] [--runs both]

Writes benchmarks/results/incremental.json: R per metric, FM and BWT (Chaudhry; formulas in
iumad/eval/forgetting.py), final averages, wall time per step and peak RSS. The default synthetic set
(`iumad synth` defaults: 60 train, 10 validation, 40 test per class) and the given config are used; the
two runs share one feature cache, so the second does not recompute the frozen backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from iumad.config import load_config
from iumad.continual.report import forgetting
from iumad.continual.step import StepRequest, learn
from iumad.data.synth import generate_dataset
from iumad.eval.forgetting import to_dict
from iumad.progress import StderrProgress
from iumad.store.db import Store

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("i_auroc", "p_auroc", "aupro", "i_auroc_given", "p_auroc_given", "aupro_given", "class_accuracy")


def run(name: str, data: Path, config: dict, work: Path, cache: Path, progress) -> dict:
    cfg_file = work / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    root = work / name
    root.mkdir()
    (root / "features").symlink_to(cache, target_is_directory=True)
    steps = []
    with Store.open(root) as store:
        for cls in sorted(p.name for p in data.iterdir() if p.is_dir()):
            t0 = time.perf_counter()
            summary = learn(store, StepRequest(cls, data, config=cfg_file), progress=progress)
            steps.append({"class": cls, "seconds": round(time.perf_counter() - t0, 1),
                          "n_train": summary["n_train"], "n_replay": summary["n_replay"]})
            print(f"[{name}] {cls}: {steps[-1]['seconds']} s, FM so far {summary['fm_i_auroc']}", file=sys.stderr)
        reports = {m: to_dict(forgetting(store, m)[0]) for m in METRICS}
    return {"steps": steps, "total_s": round(sum(s["seconds"] for s in steps), 1),
            "summary": {m: {"FM": r["FM"], "BWT": r["BWT"], "final_average": r["final_average"]}
                        for m, r in reports.items()},
            "reports": reports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--runs", choices=("both", "replay", "finetune"), default="both")
    ap.add_argument("--data", type=Path, default=None, help="reuse a generated synthetic set")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "incremental.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    progress = StderrProgress()
    base = load_config(args.config).to_dict()
    variants = {"replay+distill": base,
                "no replay, no distill": {**base, "continual": {**base["continual"], "replay": False,
                                                               "distill": False}}}
    if args.runs == "replay":
        variants.pop("no replay, no distill")
    elif args.runs == "finetune":
        variants.pop("replay+distill")
    with tempfile.TemporaryDirectory(prefix="iumad-bench-inc-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "synth"
            generate_dataset(data, n_classes=args.classes, seed=0, progress=progress)
        cache = work / "features"
        cache.mkdir()
        results = {name: run(name.replace(" ", "_").replace(",", ""), data, cfg, work, cache, progress)
                   for name, cfg in variants.items()}
    out = {
        "command": "python benchmarks/bench_incremental.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "data": {"synthetic_classes": args.classes, "seed": 0, "protocol": "1 x N, alphabetical"},
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        for m in ("i_auroc", "i_auroc_given", "class_accuracy"):
            s = r["summary"][m]
            print(f"{name} {m}: FM {s['FM']}, BWT {s['BWT']}, final {s['final_average']}, {r['total_s']} s")


if __name__ == "__main__":
    main()
