"""Forgetting when classes arrive one at a time: the synthetic 10-class set through the same code path
as `iumad add-class` (a fresh store per run), in three variants:

- `replay` (replay+distill): the given config;
- `no-replay` (no replay, no distill): the same without replay and distillation; the frozen per-class
  memories (retrieval banks, class prototypes) stay;
- `finetune`: nothing protects old classes (the `finetune` baseline of `iumad benchmark`: no replay,
  no distillation, no retrieval, class predicted by the learned text classifier).

    python benchmarks/bench_incremental.py [--classes 10] [--config configs/default.yaml]
                                           [--runs replay,no-replay,finetune]

Writes benchmarks/results/incremental.json: R per metric, FM and BWT (Chaudhry; formulas in
iumad/eval/forgetting.py), final averages, wall time per step and peak RSS (of the process up to the
end of that run), per run; a run replaces the earlier one of the same name in the file, so variants can
be rerun one at a time. The default synthetic
set (`iumad synth` defaults: 60 train, 10 validation, 40 test per class) and the given config are used;
the runs share one feature cache, so later runs do not recompute the frozen backbone.
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
from iumad.eval.protocol import METHOD_OVERRIDES, apply_overrides
from iumad.progress import StderrProgress
from iumad.store.db import Store

ROOT = Path(__file__).resolve().parents[1]
NO_REPLAY = {"continual.replay": False, "continual.distill": False}
VARIANTS = {"replay": ("replay+distill", {}),  # --runs name -> (name in the results, config overrides)
            "no-replay": ("no replay, no distill", NO_REPLAY),
            "finetune": ("finetune (no replay, no distill, no memories)", METHOD_OVERRIDES["finetune"])}
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
    ap.add_argument("--runs", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--data", type=Path, default=None, help="reuse a generated synthetic set")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "incremental.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    command = "python benchmarks/bench_incremental.py " + " ".join(sys.argv[1:])
    progress = StderrProgress()
    base = load_config(args.config).to_dict()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in VARIANTS for r in runs):
        ap.error(f"--runs {args.runs!r}: use a comma-separated subset of {', '.join(VARIANTS)}")
    variants = {VARIANTS[r][0]: apply_overrides(base, VARIANTS[r][1]) for r in runs}
    with tempfile.TemporaryDirectory(prefix="iumad-bench-inc-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "synth"
            generate_dataset(data, n_classes=args.classes, seed=0, progress=progress)
        cache = work / "features"
        cache.mkdir()
        results = {}
        for name, cfg in variants.items():
            results[name] = run(name.split(" (")[0].replace(" ", "_").replace(",", ""), data, cfg, work,
                                cache, progress)
            results[name]["command"] = command
            results[name]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    same_setting = earlier.get("data", {}).get("synthetic_classes") == args.classes
    for r in earlier.get("runs", {}).values():  # files written before runs carried their own provenance
        r.setdefault("command", earlier.get("command"))
        r.setdefault("peak_rss_mb", earlier.get("peak_rss_mb"))
    out = {
        "command": command,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "data": {"synthetic_classes": args.classes, "seed": 0, "protocol": "1 x N, alphabetical"},
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "runs": {**(earlier.get("runs", {}) if same_setting else {}), **results},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        for m in ("i_auroc", "i_auroc_given", "class_accuracy"):
            s = r["summary"][m]
            print(f"{name} {m}: FM {s['FM']}, BWT {s['BWT']}, final {s['final_average']}, {r['total_s']} s")


if __name__ == "__main__":
    main()
