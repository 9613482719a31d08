"""Incremental protocols, the suite of issue #6: every method on every modality, through `iumad benchmark`'s
code path (`iumad.eval.protocol.run_protocol`, a fresh store per run).

- Synthetic set (`generate_dataset` defaults, seed 0, 10 classes, alphabetical): protocols 6-1x4 and 1x10.
- A real class arriving last: the first `--base-classes` synthetic classes as one base step, then
  MVTec 3D-AD cable_gland from ../shared (protocol "B-1x1"); reported: cable_gland's final I-AUROC,
  P-AUROC and AUPRO, and how much the base classes forgot when it was added. Skipped, with a message,
  when the shared data is absent.
- Methods: iumad (replay + distillation), finetune (lower bound), joint (upper bound, one step),
  memory-bank (per-class PatchCore-style banks, no training); modalities rgb, geometry, both.

Thresholds come from held-out normals only and nothing is selected on a test split (see
iumad/eval/protocol.py). Every run is a fresh process (so its peak RSS is its own); all runs share one
feature cache. Results are merged into `--out` (a run replaces the earlier one of the same sequence,
protocol, method and modalities; `--fresh` starts a new file), so parts can be rerun:

    python benchmarks/bench_protocol.py                                   # everything (hours on 2 cores)
    python benchmarks/bench_protocol.py --protocols 6-1x4 --methods iumad,finetune --modalities both
    python benchmarks/bench_protocol.py --protocols cable_gland --base-classes 5
    python benchmarks/bench_protocol.py --quick                           # fast-cpu config, fewer samples

Writes benchmarks/results/protocol.json (command, machine, per run: final averages, FM, BWT, R,
seconds per step, peak RSS, model and store sizes).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IUMAD_SHARED", ROOT.parent / "shared"))
CABLE = SHARED / "data" / "mvtec3d-cable_gland-224"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "protocol.json"
CABLE_SEQ = "cable_gland"
SYNTH_SIZES = {"n_train": 60, "n_val": 10, "n_test": 40}  # generate_dataset's defaults
QUICK_SIZES = {"n_train": 20, "n_val": 6, "n_test": 16}
SUMMARY_METRICS = ("i_auroc", "p_auroc", "aupro", "i_auroc_given", "p_auroc_given", "aupro_given",
                   "class_accuracy")
R_METRICS = ("i_auroc", "p_auroc", "aupro")


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _same_synth(folder: Path, want: dict[str, Any]) -> bool:
    try:
        have = json.loads((folder / "synth.json").read_text())
    except (OSError, ValueError):
        return False
    return all(have.get(k) == v for k, v in want.items() if k != "n_classes") and \
        len(have.get("classes", [])) == want["n_classes"]


def _one_run(job: dict[str, Any]) -> dict[str, Any]:
    """One protocol run (in its own process): run_protocol, then the compact row for the results file."""
    import torch

    from iumad.eval.protocol import run_protocol
    from iumad.progress import StderrProgress

    torch.set_num_threads(job["threads"])
    res = run_protocol(Path(job["data"]), job["protocol"], job["method"], job["modalities"],
                       classes=job["classes"], seed=job["seed"], out=Path(job["out"]),
                       config=Path(job["config"]) if job["config"] else None, progress=StderrProgress(),
                       cache=Path(job["cache"]))
    row = {
        "sequence": job["sequence"], "protocol": job["protocol"], "method": job["method"],
        "modalities": job["modalities"], "classes": res["classes"], "steps_run": res["steps_run"],
        "class_modalities": res["class_modalities"],
        "summary": res["summary"],
        "R": {m: res["reports"][m]["R"] for m in R_METRICS},
        "forgetting": {m: res["reports"][m]["forgetting"] for m in R_METRICS},
        "seconds_per_step": [s["seconds"] for s in res["steps"]],
        "n_train_per_step": [s["n_train"] for s in res["steps"]],
        "n_replay_per_step": [s["n_replay"] for s in res["steps"]],
        "total_seconds": res["total_seconds"], "peak_rss_mb": res["peak_rss_mb"],
        "model_bytes": res["model_bytes"], "store_bytes": res["store_bytes"],
        "threshold_methods": sorted({t["method"] for t in res["thresholds"].values()}),
        "config": job["config_label"], "data": job["data_label"], "seed": job["seed"],
        "command": job["command"], "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if job["sequence"] == CABLE_SEQ:
        names = res["classes"]
        last = names[-1]
        row["cable_gland"] = {m: res["reports"][m]["R"][-1][names.index(last)] for m in SUMMARY_METRICS}
        row["base_forgetting"] = {  # the base classes are the only ones learned before the last step
            m: {"FM": res["reports"][m]["FM"], "BWT": res["reports"][m]["BWT"],
                "base_average_before": res["reports"][m]["average"][0] if len(res["steps"]) > 1 else None,
                "base_average_after": _mean(res["reports"][m]["R"][-1][:-1])}
            for m in SUMMARY_METRICS}
    return row


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    from iumad.data.dataset import find_classes
    from iumad.data.synth import generate_dataset
    from iumad.eval.protocol import METHODS, MODALITY_CHOICES, parse_protocol
    from iumad.progress import StderrProgress

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocols", default=f"6-1x4,1x10,{CABLE_SEQ}",
                    help=f"comma list of protocols on the synthetic set, and/or {CABLE_SEQ} (the real-class sequence)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--modalities", default=",".join(MODALITY_CHOICES))
    ap.add_argument("--config", type=Path, default=None,
                    help="base config (default: configs/default.yaml; configs/fast-cpu.yaml with --quick)")
    ap.add_argument("--quick", action="store_true", help="fast-cpu config and fewer synthetic samples "
                    f"({QUICK_SIZES['n_train']} train, {QUICK_SIZES['n_val']} validation, {QUICK_SIZES['n_test']} test)")
    ap.add_argument("--synth-classes", type=int, default=10)
    ap.add_argument("--synth-size", type=int, default=224, help="synthetic image side in pixels")
    ap.add_argument("--base-classes", type=int, default=5, help=f"synthetic base classes before {CABLE_SEQ}")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the synthetic set always uses seed 0)")
    ap.add_argument("--data", type=Path, default=None, help="reuse a generated synthetic set")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep stores, data and the feature cache here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--fresh", action="store_true", help="do not merge with the runs already in --out")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--in-process", action="store_true",
                    help="run in this process (peak RSS then accumulates over runs)")
    args = ap.parse_args(argv)

    protocols, methods, modalities = _csv(args.protocols), _csv(args.methods), _csv(args.modalities)
    bad = [m for m in methods if m not in METHODS] + [m for m in modalities if m not in MODALITY_CHOICES]
    if bad or not (protocols and methods and modalities):
        ap.error(f"unknown or empty choices {bad}: methods {METHODS}, modalities {MODALITY_CHOICES}")
    synth_protocols = [p for p in protocols if p != CABLE_SEQ]
    for p in synth_protocols:  # refuse a protocol that does not fit before anything runs
        try:
            parse_protocol(p, args.synth_classes)
        except Exception as exc:  # UsageError
            ap.error(str(exc))
    if CABLE_SEQ in protocols and not 1 <= args.base_classes <= args.synth_classes:
        ap.error(f"--base-classes {args.base_classes}: choose 1..{args.synth_classes}")
    config = args.config or (ROOT / "configs" / ("fast-cpu.yaml" if args.quick else "default.yaml"))
    sizes = dict(QUICK_SIZES if args.quick else SYNTH_SIZES)
    command = "python benchmarks/bench_protocol.py " + " ".join(sys.argv[1:] if argv is None else argv)
    progress = StderrProgress()

    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="iumad-bench-protocol-")
        work = Path(tmp)
    else:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    failures = 0
    try:
        want = {"seed": 0, "size": args.synth_size, "n_classes": args.synth_classes, **sizes}
        data = args.data.resolve() if args.data else work / "synth"
        if args.data is None and not _same_synth(data, want):
            generate_dataset(data, n_classes=args.synth_classes, seed=0, size=args.synth_size, progress=progress,
                             **sizes)
        synth_classes = [s.name for s in find_classes(data)]
        data_label = {"synthetic": {"path": str(data) if args.data else "generated", **want,
                                    "classes": synth_classes}}
        cache = work / "features"
        cache.mkdir(exist_ok=True)

        jobs = []
        base = dict(seed=args.seed, config=str(config.resolve()), config_label=_rel(config), cache=str(cache),
                    threads=args.threads, command=command)
        for p in synth_protocols:
            for method in methods:
                for mod in modalities:
                    jobs.append({**base, "sequence": "synthetic", "protocol": p, "method": method,
                                 "modalities": mod, "data": str(data), "classes": None,
                                 "data_label": data_label, "out": str(work / "runs" / f"{p}_{method}_{mod}")})
        cable_note = None
        if CABLE_SEQ in protocols:
            if not CABLE.is_dir():
                cable_note = f"skipped: {CABLE} not found (set IUMAD_SHARED to the folder beside the checkout)"
                print(f"{CABLE_SEQ} sequence {cable_note}", file=sys.stderr)
            else:
                real = find_classes(CABLE)
                view = work / "cable_sequence"
                shutil.rmtree(view, ignore_errors=True)
                view.mkdir(parents=True)
                base_names = sorted(synth_classes)[:args.base_classes]
                for n in base_names:
                    (view / n).symlink_to(data / n, target_is_directory=True)
                (view / real[0].name).symlink_to(real[0].path.resolve(), target_is_directory=True)
                order = base_names + [real[0].name]
                label = {**data_label, "cable_gland": str(CABLE), "base_classes": base_names}
                for method in methods:
                    for mod in modalities:
                        jobs.append({**base, "sequence": CABLE_SEQ, "protocol": f"{len(base_names)}-1x1",
                                     "method": method, "modalities": mod, "data": str(view), "classes": order,
                                     "data_label": label,
                                     "out": str(work / "runs" / f"{CABLE_SEQ}_{method}_{mod}")})

        rows = []
        for i, job in enumerate(jobs):
            tag = f"[{i + 1}/{len(jobs)}] {job['sequence']} {job['protocol']} {job['method']} {job['modalities']}"
            print(f"{tag}: start", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                if args.in_process:
                    row = _one_run(job)
                else:
                    ctx = multiprocessing.get_context("spawn")
                    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                        row = pool.submit(_one_run, job).result()
            except Exception as exc:  # one failed run must not lose the others
                failures += 1
                traceback.print_exc()
                row = {k: job[k] for k in ("sequence", "protocol", "method", "modalities", "config_label",
                                           "command")}
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rows.append(row)
            s = row.get("summary", {}).get("i_auroc", {})
            print(f"{tag}: {time.perf_counter() - t0:.0f} s; I-AUROC final {s.get('final_average')}, "
                  f"FM {s.get('FM')}, BWT {s.get('BWT')}" + (f"; ERROR {row['error']}" if "error" in row else ""),
                  file=sys.stderr, flush=True)
            _write(args.out, rows, args.fresh, command, args.threads, cable_note)  # after every run
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


def _key(row: dict[str, Any]) -> tuple:
    return row["sequence"], row["protocol"], row["method"], row["modalities"]


def _write(out: Path, rows: list[dict[str, Any]], fresh: bool, command: str, threads: int,
           cable_note: str | None) -> None:
    from iumad.store.atomic import atomic_write_bytes

    old: list[dict[str, Any]] = []
    if not fresh and out.is_file():
        try:
            old = json.loads(out.read_text()).get("runs", [])
        except (OSError, ValueError):
            old = []
    new = {_key(r): r for r in rows}
    merged = [r for r in old if _key(r) not in new] + rows
    merged.sort(key=lambda r: (r["sequence"] != "synthetic", r["protocol"], r["method"], r["modalities"]))
    doc = {
        "benchmark": "protocol",
        "command": command,
        "machine": machine(threads),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": ("R: rows = steps, columns = classes in learning order; FM/BWT (Chaudhry) as in "
                  "iumad/eval/forgetting.py; metrics with the class predicted by the model (unified protocol) "
                  "and *_given with the class given; thresholds from held-out normals only "
                  "(continual.threshold_from = normals); peak RSS per run (each run its own process); "
                  "store bytes exclude the shared feature cache."),
        "runs": merged,
    }
    if cable_note:
        doc["cable_gland"] = cable_note
    atomic_write_bytes(out, (json.dumps(doc, indent=2) + "\n").encode())


if __name__ == "__main__":
    sys.exit(main())
