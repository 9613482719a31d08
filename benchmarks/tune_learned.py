"""Where the learned model's choices are made: synthetic data generated with a seed kept for tuning.

No reported number comes from this data: the detector, protocol and ablation benchmarks use seed 0
(synthetic) and the real MVTec 3D-AD classes in ../shared, whose test splits no choice has seen.

For every variant (a set of config overrides on the chosen config) and every modality set, one model
per synthetic class is fitted on its train split and calibrated on its validation normals; its test
split is then scored twice: by the learned maps alone (`score.retrieval: false`) and by the full model.
With --protocol 6-1x4, each variant instead learns ten tuning classes in the protocol's steps through
`iumad benchmark`'s code path (what the many-class parts, the bottleneck and text FiLM, are for) and
records the final I-AUROC and FM; the feature cache is shared by the variants.

    python benchmarks/tune_learned.py [--variants base,no-uncertainty] [--modalities both,rgb]
                                      [--classes 3] [--size 224] [--work DIR]
    python benchmarks/tune_learned.py --protocol 6-1x4 --variants base,no-bottleneck,no-text-film
                                      [--n-train 60] [--n-test 40]

Writes benchmarks/results/tuning.json (merged per variant and modality set, so parts can be rerun).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine, only, run_config_protocol  # noqa: E402

from iumad.config import from_dict, load_config
from iumad.data import find_classes
from iumad.data.loading import read_gt, record_size
from iumad.data.synth import generate_dataset
from iumad.eval.metrics import compute_all
from iumad.eval.protocol import apply_overrides
from iumad.model.detector import Detector
from iumad.progress import StderrProgress

ROOT = Path(__file__).resolve().parents[1]
TUNING_SEED = 5  # never used by a reported benchmark (those use seed 0)
KEYS = ("i_auroc", "p_auroc", "aupro@0.3")
VARIANTS: dict[str, dict] = {
    "base": {},
    "memory-only": {"score.learned": False, "train.epochs": 0},
    "no-uncertainty": {"model.uncertainty": False},
    "no-masking": {"model.masking": False},
    "mask-block-2": {"model.mask_block": 2},
    "mask-block-4": {"model.mask_block": 4},
    "no-mapping": {"model.mapping": False},
    "epochs-10-whole-grid": {"train.epochs": 10, "train.crop": 0},
    "epochs-20-whole-grid": {"train.epochs": 20, "train.crop": 0},
    "epochs-80": {"train.epochs": 80},
    "fusion-reliability": {"score.fusion": "reliability"},
    "input-320": {"backbone.input_size": 320},
    "memory-only-input-320": {"score.learned": False, "train.epochs": 0, "backbone.input_size": 320},
    "no-bottleneck": {"model.bottleneck": 0},
    "no-text-film": {"model.text_film": False},
    "conv-decoder": {"model.decoder": "conv"},
    # IB-IUMAD's three parts off together (the rule that kept them on: README, 6-1x4 tuning protocol)
    "lean": {"model.bottleneck": 0, "model.text_film": False, "model.decoder": "conv"},
    "bfloat16": {"score.precision": "bfloat16"},
}
MODALITY_SETS = {"both": None, "rgb": "rgb", "geometry": "geometry"}


def evaluate(det: Detector, name: str, records, retrieval: bool) -> dict[str, float]:
    det.config.score.retrieval = retrieval
    feats = det.extractor.extract(records)
    preds = det.predict_features(feats, [name] * len(records), [record_size(r) for r in records])
    gts = np.stack([read_gt(r, record_size(r)) for r in records])
    m = compute_all(np.stack([p.maps["fused"] for p in preds]), gts)
    return {k: float(m[k]) for k in KEYS}


def run_variant(cfg_dict: dict, sources, modality: str | None, cache: Path) -> dict:
    """Per class: fit, calibrate, score the test split learned-only and full; means over classes."""
    learned, full, fit_s = [], [], 0.0
    for s in sources:
        det = Detector(from_dict(cfg_dict), cache_dir=cache)
        t0 = time.perf_counter()
        det.fit({s.name: only(s.records("train"), modality)},
                validation={s.name: only(s.records("validation"), modality)})
        fit_s += time.perf_counter() - t0
        test = only(s.records("test"), modality)
        if det.config.score.learned:
            learned.append(evaluate(det, s.name, test, retrieval=False))
        full.append(evaluate(det, s.name, test, retrieval=True))
    mean = lambda rows: {k: round(float(np.mean([r[k] for r in rows])), 4) for k in KEYS} if rows else None  # noqa: E731
    return {"learned": mean(learned), "full": mean(full), "fit_s_per_class": round(fit_s / len(sources), 1),
            "per_class_full": {s.name: {k: round(v, 4) for k, v in r.items()} for s, r in zip(sources, full)}}


def run_protocol_variant(cfg_dict: dict, data: Path, protocol: str, work: Path) -> dict:
    """The variant learns the tuning classes in the protocol's steps (`iumad benchmark --method iumad`)."""
    res = run_config_protocol(cfg_dict, data, protocol, work)
    return {"final": {m: round(float(res["summary"][m]["final_average"]), 4) for m in ("i_auroc", "aupro")},
            "fm": {m: round(float(res["summary"][m]["FM"]), 4) for m in ("i_auroc", "aupro")},
            "seconds": round(res["total_seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--variants", default="base", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--modalities", default="both", help="comma-separated, of: both, rgb, geometry")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--size", type=int, default=224, help="side of the generated images (objects keep their size)")
    ap.add_argument("--protocol", default=None, help="e.g. 6-1x4: run the incremental protocol on 10 tuning classes")
    ap.add_argument("--n-train", type=int, default=60, help="training normals per generated class")
    ap.add_argument("--n-test", type=int, default=40, help="test samples per generated class")
    ap.add_argument("--work", type=Path, default=Path("/tmp/iumad-tuning"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tuning.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    n_classes = 10 if args.protocol else args.classes
    shape = f"{args.n_train}-{args.n_test}" if (args.n_train, args.n_test) != (60, 40) else ""
    data = args.work / (f"synth-seed{TUNING_SEED}-{n_classes}" + ("" if args.size == 224 else f"-{args.size}px")
                        + (f"-{shape}" if shape else ""))
    if not data.is_dir():
        generate_dataset(data, n_classes=n_classes, seed=TUNING_SEED, size=args.size, n_train=args.n_train,
                         n_test=args.n_test, progress=StderrProgress())
    sources = find_classes(data)
    described = (f"synthetic, seed {TUNING_SEED}, {n_classes} classes, {args.size} px, {args.n_train} train / "
                 f"{args.n_test} test per class, generate_dataset defaults otherwise")
    base = load_config(args.config).to_dict()
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if report.get("benchmark") != "tuning":
        report = {"benchmark": "tuning", "runs": {}}
    for variant in args.variants.split(","):
        cfg_dict = apply_overrides(base, VARIANTS[variant])
        common = {"variant": variant, "overrides": VARIANTS[variant],
                  "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
                  "config_hash": from_dict(cfg_dict).hash(), "commit": git_commit(), "machine": machine(),
                  "data": described, "command": "python benchmarks/tune_learned.py " + " ".join(sys.argv[1:])}
        if args.protocol:
            row = {**run_protocol_variant(cfg_dict, data, args.protocol, args.work / f"protocol-{variant}"), **common}
            report["runs"][f"{variant}/{args.protocol}" + ("" if args.size == 224 else f"/size{args.size}")
                           + (f"/{shape}" if shape else "")] = row
            print(json.dumps({k: row[k] for k in ("variant", "final", "fm", "seconds")}), flush=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
            continue
        for mods in args.modalities.split(","):
            row = run_variant(cfg_dict, sources, MODALITY_SETS[mods], args.work / "cache")
            row.update({**common, "modalities": mods})
            report["runs"][f"{variant}/{mods}" + ("" if args.size == 224 else f"/size{args.size}")] = row
            print(json.dumps({k: row[k] for k in ("variant", "modalities", "learned", "full", "fit_s_per_class")}),
                  flush=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    report["command"] = "python benchmarks/tune_learned.py " + " ".join(sys.argv[1:])  # the last run's; each row has its own
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
