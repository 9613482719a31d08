"""The IB-IUMAD ablation on our data: what each part of the model is worth, measured, not asserted.

Rows (config overrides on the chosen config, `configs/default.yaml` unless --config):
  memory only            no network: the PatchCore-style baseline, `iumad benchmark --method memory-bank`
  learned only           the network's maps alone (score.retrieval false at scoring; same fit as "full")
  full                   the config as it is
  no mamba               a plain depthwise-conv decoder of the same width and depth (model.decoder conv)
  bottleneck             model.bottleneck 64 (the deterministic information bottleneck; off by default)
  variational bottleneck model.bottleneck 64, model.variational true
  no text film           model.text_film false
  no mapping             model.mapping false (both modalities reconstruct themselves, masked)
  no masking             model.masking false (the identity-shortcut reconstruction, for RGB-only tire)
  no uncertainty         model.uncertainty false (errors not divided by the expected error)
  no object region       score.object_region false (RGB-only tire scored everywhere; cable_gland has geometry)
Columns: cable_gland (RGB + xyz, ../shared, 224 px) and tire (RGB only, ../shared, half size), each fitted
on train, calibrated on validation normals, reported on test; the synthetic set (seed 0, 3 classes,
joint fit) as AUPRO@0.3 per defect family; fit time (cable_gland, features cached: network, memories,
calibration) and end-to-end inference speed (cable_gland test, feature cache off, class given); with
--protocol, the synthetic 6-1x4 protocol's final I-AUROC and FM (up to an hour per row on 2 cores; the
rows share its feature cache).

Nothing is chosen here: the config's choices were made by benchmarks/tune_learned.py on synthetic data
of another seed. Each row runs in a process of its own and is merged into --out, so rows can be rerun:

    python benchmarks/bench_ablation.py [--rows full,memory-only] [--protocol] [--config FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine, only, run_config_protocol  # noqa: E402

from iumad.config import from_dict, load_config
from iumad.data import find_classes
from iumad.data.loading import read_gt, record_size
from iumad.data.synth import DEFECT_FAMILIES, generate_dataset
from iumad.eval.metrics import aupro, compute_all
from iumad.eval.protocol import METHOD_OVERRIDES, apply_overrides
from iumad.model.detector import Detector
from iumad.progress import StderrProgress

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IUMAD_SHARED", ROOT.parent / "shared"))
CABLE = SHARED / "data" / "mvtec3d-cable_gland-224"
TIRE = SHARED / "data" / "mvtec3d-tire-rgb-half"
KEYS = ("i_auroc", "p_auroc", "aupro@0.3")
MEMORY_ONLY = METHOD_OVERRIDES["memory-bank"]  # exactly `iumad benchmark --method memory-bank`
# row -> (overrides, what scores at test time: "all", "learned" (retrieval off) )
ROWS: dict[str, tuple[dict, str]] = {
    "memory only": (MEMORY_ONLY, "all"),
    "learned only": ({}, "learned"),
    "full": ({}, "all"),
    "no mamba": ({"model.decoder": "conv"}, "all"),
    "bottleneck": ({"model.bottleneck": 64}, "all"),  # off by default: the 6-1x4 tuning protocol's rule
    "variational bottleneck": ({"model.bottleneck": 64, "model.variational": True}, "all"),
    "no text film": ({"model.text_film": False}, "all"),
    "no mapping": ({"model.mapping": False}, "all"),
    "no masking": ({"model.masking": False}, "all"),
    "no uncertainty": ({"model.uncertainty": False}, "all"),
    "no object region": ({"score.object_region": False}, "all"),
}


def slug(row: str) -> str:
    return row.replace(" ", "-")


def _score(det: Detector, name: str, records, scoring: str) -> list:
    det.config.score.retrieval = scoring != "learned"
    feats = det.extractor.extract(records)
    return det.predict_features(feats, [name] * len(records), [record_size(r) for r in records])


def real_class(cfg_dict: dict, data: Path, modality: str | None, scorings: list[str], cache: Path,
               timed: bool) -> dict:
    """Fit one real class on train (validation normals calibrate), score its test split per scoring."""
    (source,) = find_classes(data)
    det = Detector(from_dict(cfg_dict), cache_dir=cache)
    train, val = only(source.records("train"), modality), only(source.records("validation"), modality)
    det.extractor.extract(train + val)  # warm the cache: fit time is then the model's, not the backbone's
    t0 = time.perf_counter()
    det.fit({source.name: train}, validation={source.name: val})
    out: dict = {"fit_s": round(time.perf_counter() - t0, 1)}
    test = only(source.records("test"), modality)
    gts = np.stack([read_gt(r, record_size(r)) for r in test])
    for scoring in scorings:
        preds = _score(det, source.name, test, scoring)
        m = compute_all(np.stack([p.maps["fused"] for p in preds]), gts)
        out[scoring] = {k: round(float(m[k]), 4) for k in KEYS}
    if timed:  # files -> maps, the full model, cache off
        det.config.score.retrieval = cfg_dict["score"]["retrieval"]
        det.extractor.cache = None
        t0 = time.perf_counter()
        det.predict_records(test, source.name)
        out["inference_samples_per_s"] = round(len(test) / (time.perf_counter() - t0), 2)
    return out


def synthetic_families(cfg_dict: dict, data: Path, scorings: list[str], cache: Path) -> dict:
    """Joint fit on the synthetic set; AUPRO@0.3 of the fused map per defect family, per scoring."""
    sources = find_classes(data)
    det = Detector(from_dict(cfg_dict), cache_dir=cache)
    det.fit({s.name: s.records("train") for s in sources},
            validation={s.name: s.records("validation") for s in sources})
    out = {}
    for scoring in scorings:
        per_family: dict[str, list] = {f: [] for f in ("rgb", "geometry", "both")}
        goods = []
        for s in sources:
            test = s.records("test")
            for r, p in zip(test, _score(det, s.name, test, scoring)):
                item = (p.maps["fused"], read_gt(r, p.maps["fused"].shape))
                (goods if r.label == "good" else per_family[DEFECT_FAMILIES[r.label]]).append(item)
        out[scoring] = {fam: round(float(aupro(np.stack([m for m, _ in items + goods]),
                                               np.stack([g for _, g in items + goods]), 0.3)), 4)
                        for fam, items in per_family.items()}
    return out


def protocol_6_1x4(cfg_dict: dict, data: Path, work: Path, scoring: str) -> dict:
    """The synthetic 6-1x4 protocol through `iumad benchmark`'s code path: final I-AUROC and FM."""
    if scoring == "learned":
        cfg_dict = apply_overrides(cfg_dict, {"score.retrieval": False})
    res = run_config_protocol(cfg_dict, data, "6-1x4", work)
    summary = res["summary"]["i_auroc"]
    return {"final_i_auroc": round(float(summary["final_average"]), 4), "fm_i_auroc": round(float(summary["FM"]), 4),
            "seconds": round(res["total_seconds"], 1), "commit": git_commit()}  # kept when a row reruns without it


def run_rows(rows: list[str], cfg_dict: dict, work: Path, with_protocol: bool) -> dict:
    """The rows that share one set of overrides share one fit per data set (run in this process)."""
    overrides, _ = ROWS[rows[0]]
    cfg_dict = apply_overrides(cfg_dict, overrides)
    scorings = [ROWS[r][1] for r in rows]
    torch.set_num_threads(2)
    progress = StderrProgress()
    result = {r: {"overrides": overrides, "scoring": ROWS[r][1], "config_hash": from_dict(cfg_dict).hash()}
              for r in rows}

    def put(key: str, per_scoring: dict, shared: dict | None = None) -> None:
        for r in rows:
            result[r][key] = {**(shared or {}), **per_scoring[ROWS[r][1]]}

    if CABLE.is_dir():
        progress("ablation cable_gland", 0, 1)
        cg = real_class(cfg_dict, CABLE, None, scorings, work / "cache-real", timed=True)
        put("cable_gland", cg, {k: cg[k] for k in ("fit_s", "inference_samples_per_s")})
    if TIRE.is_dir():
        progress("ablation tire", 0, 1)
        tire = real_class(cfg_dict, TIRE, "rgb", scorings, work / "cache-real", timed=False)
        put("tire", tire, {"fit_s": tire["fit_s"]})
    progress("ablation synthetic families", 0, 1)
    put("synthetic_families", synthetic_families(cfg_dict, work / "synth-families", scorings, work / "cache-synth"))
    if with_protocol:
        for r in rows:
            progress(f"ablation 6-1x4 {r}", 0, 1)
            result[r]["synthetic_6_1x4"] = protocol_6_1x4(cfg_dict, work / "synth-protocol", work / slug(r),
                                                          ROWS[r][1])
    return result


def in_own_process(fn, *args):
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--rows", default=",".join(slug(r) for r in ROWS),
                    help=f"comma-separated, of: {', '.join(slug(r) for r in ROWS)}")
    ap.add_argument("--protocol", action="store_true", help="also run synthetic 6-1x4 per row (slow)")
    ap.add_argument("--work", type=Path, default=None, help="keeps data and feature caches between runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ablation.json")
    args = ap.parse_args()
    by_slug = {slug(r): r for r in ROWS}
    unknown = [s for s in args.rows.split(",") if s not in by_slug]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(by_slug)}")
    wanted = [by_slug[s] for s in args.rows.split(",")]
    cfg_dict = load_config(args.config).to_dict()
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if report.get("benchmark") != "ablation":
        report = {"benchmark": "ablation", "rows": {}}
    groups: dict[str, list[str]] = {}
    for r in wanted:
        groups.setdefault(json.dumps(ROWS[r][0], sort_keys=True), []).append(r)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "synth-families").is_dir():
            generate_dataset(work / "synth-families", n_classes=3, seed=0, n_train=40, n_val=6, n_test=28)
        if args.protocol and not (work / "synth-protocol").is_dir():
            generate_dataset(work / "synth-protocol", n_classes=10, seed=0)
        for rows in groups.values():
            result = in_own_process(run_rows, rows, cfg_dict, work, args.protocol)
            for r, row in result.items():
                old = report["rows"].get(r, {})
                if not args.protocol and "synthetic_6_1x4" in old and old.get("config_hash") == row["config_hash"]:
                    row["synthetic_6_1x4"] = old["synthetic_6_1x4"]  # kept: same config, not rerun
                row.update({"commit": git_commit(), "machine": machine(2),
                            "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT)
                            else str(args.config),
                            "command": "python benchmarks/bench_ablation.py " + " ".join(sys.argv[1:])})
                report["rows"][r] = row
                print(json.dumps({r: {k: v for k, v in row.items() if k not in ("machine", "command")}}), flush=True)
            report["rows"] = {r: report["rows"][r] for r in ROWS if r in report["rows"]}  # table order
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
