"""The cost curve of issue #17: synthetic classes learned one per step up to `--classes` (100) on one store,
through the step function `iumad add-class` uses (`iumad.continual.step.learn`).

Data: `iumad.data.synth.many_classes` at 224 px, few samples per class (`--train/--val/--test`), the
look-alike family (one bolt in four colours and three sizes) among the first twelve classes. Config:
`configs/fast-cpu.yaml`'s network with `configs/long-run.yaml`'s continual settings (total exemplar
budget, evaluation budget) and the benchmark's settings below (`--epochs`, 80 as shipped); the merged config
and its hash are recorded and the same for every step. After each step `iumad gc --keep N` runs, as a
plant's nightly job would (`--gc-keep 0`: never), and its time is not part of the step's.

Per step: wall time of the step, store bytes (database + checkpoints + class blobs; not the feature
cache), feature-cache bytes, the step's peak RSS (VmHWM, reset before the step), predict latency of one
sample with the class given and with the class predicted ("auto": scoring from cached features, the
backbone's constant cost left out), class accuracy (auto) over every class and over the look-alike
family (the step's row of R, on each class's evaluation subset), FM so far (R on I-AUROC).
At the marks (K = 1, 10, 20, 50, 100 and the last step), every class is also evaluated on its whole
test split: class accuracy on it, and the budget's cost in R fidelity (|I-AUROC on a subset - on the
whole set| per class, for the recorded subset and for other budgets).

    python benchmarks/bench_scale.py                      # 100 classes (about an hour on 2 cores alone)
    python benchmarks/bench_scale.py --classes 12 --quick  # a few minutes; the JSON says it is a quick run

Writes benchmarks/results/scale.json (commit, config hash, machine, every step, the acceptance checks
with PASS/FAIL) and benchmarks/results/scale.png (each curve against the class count).
"""

from __future__ import annotations

import argparse
import ctypes
import gc as gc_module
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "scale.json"
MARKS = (1, 10, 20, 50, 100)
FIDELITY_BUDGETS = (2, 4, 8, 16)
WINDOW = 2  # step times are medians over the steps K-2 .. K+2


def _tree_bytes(path: Path, skip: tuple[Path, ...] = ()) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each step's peak is its own. Garbage is collected
    and freed heap returned to the system first, so the step starts from what is alive, not from what
    the allocator kept of earlier steps (a step run by `iumad add-class` starts in a fresh process)."""
    gc_module.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def config_for(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """fast-cpu's network + long-run's continual settings + the benchmark's speed settings."""
    cfg = yaml.safe_load((ROOT / "configs" / "fast-cpu.yaml").read_text()) or {}
    long_run = yaml.safe_load((ROOT / "configs" / "long-run.yaml").read_text()) or {}
    for section, values in long_run.items():
        cfg.setdefault(section, {}).update(values)
    cfg.setdefault("train", {}).update({"epochs": args.epochs, "threads": args.threads})
    cfg.setdefault("continual", {}).update({"holdout": args.val, "threshold_from": "normals",
                                            "exemplar_budget": args.exemplar_budget,
                                            "evaluation_budget": args.evaluation_budget})
    cfg.setdefault("backbone", {})["cache_limit_gb"] = args.cache_limit_gb
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def _latency_ms(det, feats, sizes, name: str | None, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        for f, s in zip(feats, sizes):
            t0 = time.perf_counter()
            det.predict_features([f], [name], [s])
            times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def _full_evaluation(det, store, data: Path, names: list[str], family: set[str], seed: int) -> dict[str, Any]:
    """Every class on its whole test split: class accuracy, and |I-AUROC(subset) - I-AUROC(whole)| for the
    recorded subset and for FIDELITY_BUDGETS (subsets chosen as the store chooses them)."""
    import numpy as np

    from iumad.continual.classdata import class_source
    from iumad.continual.evaluation import defect_labels, score_both, set_metrics, sizes_of
    from iumad.continual.subset import choose_subset, indices
    from iumad.data.labels import label_level
    from iumad.store import repository as repo

    with store.session() as s:
        recorded = {n: es.subset for n, es in repo.evaluation_sets(s, "test")}
        _, r_names, matrix = repo.r_matrix(s, "i_auroc")
    row = dict(zip(r_names, matrix[-1])) if matrix else {}
    correct = total = fam_correct = fam_total = 0
    diffs: dict[str, list[float]] = {"recorded": []}
    diffs.update({str(b): [] for b in FIDELITY_BUDGETS})
    r_vs_recomputed = []
    for name in names:
        records = class_source(name, data / name).records("test")
        feats = det.extractor.extract(records, det.classes[name].modalities)
        sizes = sizes_of(records)
        auto, given = score_both(det, name, feats, sizes)
        ok = sum(p.class_name == name for p in auto)
        correct, total = correct + ok, total + len(auto)
        if name in family:
            fam_correct, fam_total = fam_correct + ok, fam_total + len(auto)
        level = label_level(records, False)
        labels = defect_labels(records, sizes, level)

        def auroc(rows: list[int]) -> float | None:
            m = set_metrics([auto[i] for i in rows], [given[i] for i in rows], [records[i] for i in rows],
                            [sizes[i] for i in rows], labels[rows], pixel=level != "image")
            return m.get("i_auroc")

        whole = auroc(list(range(len(records))))
        subsets = {str(b): choose_subset(records, b, seed, name) for b in FIDELITY_BUDGETS}
        if recorded.get(name):
            subsets["recorded"] = recorded[name]
        for key, sub in subsets.items():
            part = auroc(indices(records, sub))
            if whole is not None and part is not None and np.isfinite(whole) and np.isfinite(part):
                diffs[key].append(abs(part - whole))
            if key == "recorded" and row.get(name) is not None and part is not None:
                r_vs_recomputed.append(abs(part - row[name]))

    def summary(v: list[float]) -> dict[str, Any]:
        return {"cells": len(v), "max": round(max(v), 4) if v else None,
                "mean": round(sum(v) / len(v), 4) if v else None}

    return {"class_accuracy": round(correct / total, 4) if total else None,
            "class_accuracy_lookalike": round(fam_correct / fam_total, 4) if fam_total else None,
            "n_samples": total, "n_lookalike": fam_total,
            "i_auroc_abs_diff": {k: summary(v) for k, v in diffs.items()},
            "r_cell_vs_recomputed_max": round(max(r_vs_recomputed), 6) if r_vs_recomputed else None}


def _median_around(steps: list[dict[str, Any]], k: int, key: str) -> float | None:
    vals = [s[key] for s in steps if abs(s["K"] - k) <= WINDOW and s.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def linear_fit(steps: list[dict[str, Any]], key: str = "step_seconds") -> dict[str, Any] | None:
    """Least-squares `key = a + c * K`: the part of a step that does not grow with K, and what each
    learned class adds (calibration, evaluation subset, replay checks); with it, the ratio at 100 and 10."""
    pts = [(s["K"], s[key]) for s in steps if s.get(key) is not None and s["K"] > 1]  # K=1 builds the network
    if len(pts) < 3:
        return None
    n = len(pts)
    mk, mv = sum(k for k, _ in pts) / n, sum(v for _, v in pts) / n
    var = sum((k - mk) ** 2 for k, _ in pts)
    c = sum((k - mk) * (v - mv) for k, v in pts) / var if var else 0.0
    a = mv - c * mk
    ratio = (a + 100 * c) / (a + 10 * c) if a + 10 * c > 0 else None
    return {"a": round(a, 3), "c_per_class": round(c, 4),
            "predicted_ratio_100_over_10": round(ratio, 3) if ratio else None}


def acceptance(steps: list[dict[str, Any]], cache_limit: int | None, exemplars_ok: bool,
               exemplar_note: str, small: int = 10, large: int = 100) -> list[dict[str, Any]]:
    """The issue's criteria, each PASS, FAIL or "not reached" (a run shorter than the K it needs)."""
    by_k = {s["K"]: s for s in steps}
    out = []

    def line(name: str, ok: bool | None, detail: str) -> None:
        out.append({"criterion": name, "result": "not reached" if ok is None else ("PASS" if ok else "FAIL"),
                    "detail": detail})

    for k in (small, large):
        s = by_k.get(k)
        if s is None:
            line(f"store bytes at K={k} <= networks + class artifacts + 10 %", None, f"the run stopped before K={k}")
        else:
            bound = 1.1 * (s["networks_bytes"] + s["class_blob_bytes"])
            line(f"store bytes at K={k} <= networks + class artifacts + 10 %", s["store_bytes"] <= bound,
                 f"{s['store_bytes'] / 1e6:.2f} MB vs {bound / 1e6:.2f} MB ({s['versions_on_disk']} network(s) "
                 f"on disk, {s['class_blob_bytes'] / 1e6:.1f} MB of class blobs, database "
                 f"{s.get('db_bytes', 0) / 1e6:.2f} MB of which write-ahead log "
                 f"{s.get('db_wal_bytes', 0) / 1e6:.2f} MB)")
    for key, factor, what in (("step_seconds", 2.0, "step time"), ("latency_auto_ms", 1.5, "auto predict latency")):
        a, b = _median_around(steps, small, key), _median_around(steps, large, key)
        if large not in by_k or a is None or b is None:
            line(f"{what} at K={large} <= {factor}x at K={small}", None, f"the run stopped before K={large}")
        else:
            line(f"{what} at K={large} <= {factor}x at K={small}", b <= factor * a,
                 f"median {b} vs {a} (x{b / a:.2f}; steps K-{WINDOW}..K+{WINDOW})")
    peak = max((s["cache_bytes"] for s in steps), default=0)
    evicted = any(s["cache_evicted"] for s in steps)
    if cache_limit:
        line("feature cache under its limit at every step", peak <= cache_limit,
             f"peak {peak / 1e6:.1f} MB, limit {cache_limit / 1e6:.1f} MB; eviction "
             f"{'happened' if evicted else 'never happened (raise --classes or lower --cache-limit-gb)'}")
    line("no exemplar lost to eviction", exemplars_ok, exemplar_note)
    return out


def _check_exemplars(store) -> tuple[bool, str]:
    """Every recorded exemplar's files are present with their sha256 (so its features can be recomputed
    after eviction), and `db check` passes."""
    from iumad.continual.exemplars import record_from_json
    from iumad.store import repository as repo
    from iumad.store.check import check_store

    with store.session() as s:
        rows = [(c.name, e.record) for c in repo.list_classes(s) for e in repo.list_exemplars(s, c.name)]
    bad = [n for n, rec in rows if rec is None or record_from_json(rec)[0] is None]
    report = check_store(store)
    errors = [p for p in report["problems"] if p.get("severity", "error") == "error"]
    ok = not bad and report["ok"] and not errors
    return ok, (f"{len(rows)} exemplar records, {len(bad)} unverifiable; db check "
                f"{'ok' if report['ok'] else 'failed: ' + '; '.join(p['message'] for p in errors)[:300]}")


def plot(steps: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [s["K"] for s in steps]
    panels = [("step_seconds", "step wall time (s)"), ("store_bytes", "store (MB)"),
              ("cache_bytes", "feature cache (MB)"), ("peak_rss_mb", "peak RSS of the step (MB)"),
              (("latency_given_ms", "latency_auto_ms"), "predict latency (ms): given, auto"),
              (("class_accuracy", "class_accuracy_lookalike"), "class accuracy (auto): all, look-alike"),
              ("fm_i_auroc", "FM on I-AUROC so far")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (keys, title) in zip(axes.flat, panels):
        for key in (keys if isinstance(keys, tuple) else (keys,)):
            ys = [s.get(key) for s in steps]
            if key.endswith("_bytes"):
                ys = [None if y is None else y / 1e6 for y in ys]
            ax.plot(ks, [float("nan") if y is None else y for y in ys], marker=".", label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("classes learned (K)", fontsize=8)
        if isinstance(keys, tuple):
            ax.legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--train", type=int, default=10, help="training samples per class")
    ap.add_argument("--val", type=int, default=4, help="validation samples per class (its held-out normals)")
    ap.add_argument("--test", type=int, default=24, help="test samples per class (a quarter good, the rest defects; "
                    "scored whole when the class arrives and at the marks, so that the budgets' fidelity is measured)")
    ap.add_argument("--epochs", type=int, default=80, help="the shipped default: a step's training is what it "
                    "would be in a plant (fewer epochs make the per-class part of a step look larger)")
    ap.add_argument("--exemplar-budget", type=int, default=40, help="replay exemplars over all classes")
    ap.add_argument("--evaluation-budget", type=int, default=4, help="samples per old class per step")
    ap.add_argument("--cache-limit-gb", type=float, default=0.5)
    ap.add_argument("--gc-keep", type=int, default=3, help="model versions kept by gc after each step (0: no gc)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="label the results as a quick run (not the full curve)")
    ap.add_argument("--work", type=Path, default=None, help="keep data and store here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.classes < 1:
        ap.error("--classes: at least 1")

    import torch

    from iumad.config import load_config
    from iumad.continual.retention import gc
    from iumad.continual.step import StepRequest, learn
    from iumad.continual.versions import load_version
    from iumad.data.synth import generate_dataset, many_classes
    from iumad.eval.forgetting import forgetting_report
    from iumad.model.feature_cache import FeatureCache, limit_bytes
    from iumad.progress import StderrProgress
    from iumad.store import repository as repo
    from iumad.store.atomic import atomic_write_bytes
    from iumad.store.db import Store

    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    commit = git_commit()  # of the code this process loaded, not of whatever is checked out at the end
    tmp = None
    work = args.work.resolve() if args.work else Path(tmp := tempfile.mkdtemp(prefix="iumad-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    progress = StderrProgress()
    try:
        looks = many_classes(args.classes, args.seed)
        family = {lk.name for lk in looks if lk.family}
        data = work / "synth"
        t0 = time.perf_counter()
        generate_dataset(data, seed=args.seed, size=224, n_train=args.train, n_val=args.val, n_test=args.test,
                         looks=looks, progress=progress, overwrite=True)
        generate_s = round(time.perf_counter() - t0, 1)
        cfg_path = work / "config.yaml"
        cfg = config_for(args, cfg_path)
        config_hash = load_config(cfg_path).hash()
        store_dir = work / "store"
        shutil.rmtree(store_dir, ignore_errors=True)
        limit = limit_bytes(args.cache_limit_gb)  # the cache's own reading of the config (GiB)
        steps: list[dict[str, Any]] = []
        marks: dict[int, dict[str, Any]] = {}
        probe = None
        with Store.open(store_dir) as store:
            features = store.features_dir
            for k, look in enumerate(looks, start=1):
                _reset_peak_rss()
                t0 = time.perf_counter()
                summary = learn(store, StepRequest(look.name, data / look.name, config=cfg_path), progress=progress)
                step_s = time.perf_counter() - t0
                rss = _peak_rss_mb()
                gc_s = None
                if args.gc_keep:
                    t1 = time.perf_counter()
                    gc(store, keep=args.gc_keep)
                    gc_s = round(time.perf_counter() - t1, 2)
                with store.session() as s:
                    prod = repo.get_production(s)
                    r_steps, names, matrix = repo.r_matrix(s, "i_auroc")
                    _, _, acc = repo.r_matrix(s, "class_accuracy")
                det = load_version(store, prod)
                if probe is None:  # the first class's test samples, scored at every step
                    from iumad.continual.classdata import class_source
                    from iumad.continual.evaluation import sizes_of

                    recs = class_source(looks[0].name, data / looks[0].name).records("test")[:4]
                    probe = (det.extractor.extract(recs, det.classes[looks[0].name].modalities), sizes_of(recs))
                row_acc = dict(zip(names, acc[-1]))
                fam_acc = [row_acc[n] for n in names if n in family and row_acc.get(n) is not None]
                all_acc = [v for v in row_acc.values() if v is not None]
                cache_stats = FeatureCache(features).stats()
                ckpt = store.root / "checkpoints"
                nets = [p.stat().st_size for p in ckpt.glob("*/model.pt")] if ckpt.is_dir() else []
                rec = {
                    "K": k, "class": look.name, "step_seconds": round(step_s, 2), "gc_seconds": gc_s,
                    "n_train": summary["n_train"], "n_replay": summary["n_replay"],
                    "n_evaluated": sum(r["n_eval"] for r in summary["results"]),
                    "store_bytes": _tree_bytes(store.root, skip=(features,)),
                    "networks_bytes": sum(nets), "versions_on_disk": len(nets),
                    "class_blob_bytes": _tree_bytes(store.blobs_dir) if store.blobs_dir.is_dir() else 0,
                    "db_bytes": sum(p.stat().st_size for p in store.root.glob("iumad.sqlite*")),
                    "db_wal_bytes": sum(p.stat().st_size for p in store.root.glob("iumad.sqlite-wal")),
                    "cache_bytes": int(cache_stats["bytes"]), "cache_entries": int(cache_stats["entries"]),
                    "peak_rss_mb": rss,
                    "latency_given_ms": _latency_ms(det, probe[0], probe[1], looks[0].name),
                    "latency_auto_ms": _latency_ms(det, probe[0], probe[1], None),
                    "class_accuracy": round(sum(all_acc) / len(all_acc), 4) if all_acc else None,
                    "class_accuracy_lookalike": round(sum(fam_acc) / len(fam_acc), 4) if fam_acc else None,
                    "fm_i_auroc": forgetting_report(r_steps, names, matrix, "i_auroc").fm,
                    "exemplars_skipped": summary["exemplars_skipped"],
                }
                # content-addressed entries, one per sample and modality: fewer than that means eviction
                rec["cache_evicted"] = rec["cache_entries"] < k * (args.train + args.val + args.test) * 2
                steps.append(rec)
                if k in MARKS or k == len(looks):
                    t1 = time.perf_counter()
                    marks[k] = _full_evaluation(det, store, data, names, family, int(cfg["train"].get("seed", 0)))
                    marks[k]["seconds"] = round(time.perf_counter() - t1, 1)
                    print(f"K={k}: whole-set class accuracy {marks[k]['class_accuracy']}, look-alike "
                          f"{marks[k]['class_accuracy_lookalike']}, |dI-AUROC| {marks[k]['i_auroc_abs_diff']}",
                          file=sys.stderr, flush=True)
                del det
                print(f"K={k} {look.name}: step {step_s:.1f} s, store {rec['store_bytes'] / 1e6:.1f} MB, cache "
                      f"{rec['cache_bytes'] / 1e6:.1f} MB, RSS {rss:.0f} MB, latency given/auto "
                      f"{rec['latency_given_ms']}/{rec['latency_auto_ms']} ms", file=sys.stderr, flush=True)
            exemplars_ok, note = _check_exemplars(store)
            skipped = [w for s in steps for w in s["exemplars_skipped"]]
            if skipped:
                exemplars_ok, note = False, f"{note}; skipped during replay: {skipped[:3]}"
        checks = acceptance(steps, limit, exemplars_ok, note, large=100 if args.classes >= 100 else args.classes)
        for c in checks:
            print(f"{c['result']:11} {c['criterion']}: {c['detail']}", flush=True)
        print(f"step seconds ~ a + c K: {linear_fit(steps)}", flush=True)
        doc = {
            "benchmark": "scale", "quick": bool(args.quick),
            "note": ("QUICK RUN: a check of the script on a few classes, not the 100-class curve"
                     if args.quick else None),
            "command": command, "commit": commit, "config_hash": config_hash, "config": cfg,
            "machine": machine(args.threads),
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": {"classes": args.classes, "size": 224, "train": args.train, "val": args.val,
                     "test": args.test, "seed": args.seed, "lookalike": sorted(family),
                     "generate_seconds": generate_s},
            "gc_keep": args.gc_keep, "cache_limit_bytes": limit,
            "notes": ("peak_rss_mb: VmHWM of the step, reset before it after collecting garbage and trimming "
                      "the heap (the benchmark process's own state included); "
                      "step_seconds: learn() alone (gc and the measurements after it excluded); store_bytes: "
                      "database + checkpoints + class blobs; latency: one sample from cached features, median "
                      "of 3 rounds over 4 samples of the first class; class_accuracy: mean of the step's "
                      "row of R (evaluation subsets; the new class on its subset too); marks: every class "
                      "on its whole test split."),
            "fit": {"step_seconds": linear_fit(steps), "latency_auto_ms": linear_fit(steps, "latency_auto_ms")},
            "acceptance": checks, "marks": {str(k): v for k, v in marks.items()}, "steps": steps,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, (json.dumps(doc, indent=1) + "\n").encode())
        plot(steps, args.out.with_suffix(".png"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(c["result"] != "FAIL" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
