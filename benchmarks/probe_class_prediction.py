"""How well "auto" names the class of a sample among many, look-alike products included, and what the
obvious fixes change: a probe of the store that `bench_scale.py --work DIR` leaves behind.

Every variant scores each class's whole test split (good and defective samples) against all the classes
of the store's production model, and reports accuracy over all classes and over the look-alike family
(one bolt in several colours and sizes; `synth.many_classes`):
- shipped: what the model does (`score.class_by: prototypes`, each prototype the mean of a training
  sample's frozen features over the whole image, both modalities averaged); also RGB only;
- foreground: prototypes pooled over the part only (the geometry's foreground), from the train split;
  RGB only and both modalities;
- rerank: the shipped prototypes' nearest 4 classes re-ranked by the mean distance of the sample's tokens
  (all, or the part's only) to each one's token memory;
- rotations: foreground RGB prototypes of the training images and of their 90, 180 and 270 degree turns.

Nothing here is chosen for the shipped model: the numbers say which direction is worth building.

    python benchmarks/probe_class_prediction.py --work /tmp/scale100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, git_commit, machine  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "class_prediction.json"
SHORTLIST = 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a bench_scale.py --work folder (synth/ and store/)")
    ap.add_argument("--seed", type=int, default=0, help="bench_scale.py's --seed (which classes are look-alikes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from iumad.continual.classdata import class_source
    from iumad.continual.versions import load_version
    from iumad.data.loading import load_sample
    from iumad.data.synth import many_classes
    from iumad.model.memory import prototype_similarities
    from iumad.model.retrieval import nearest_distance
    from iumad.model.scorer import stack_features
    from iumad.progress import StderrProgress
    from iumad.store import repository as repo
    from iumad.store.db import Store

    torch.set_num_threads(args.threads)
    progress = StderrProgress()
    work = args.work.resolve()
    with Store.open(work / "store", create=False) as store:
        with store.session() as s:
            prod = repo.get_production(s)
        det = load_version(store, prod)
    classes = list(det.classes.values())
    names = [c.name for c in classes]
    family = {lk.name for lk in many_classes(len(names), args.seed) if lk.family} & set(names)
    ext = det.extractor
    both = ("rgb", "geometry")

    def feats_of(split: str) -> dict[str, list]:
        out = {}
        for i, n in enumerate(names):
            progress(f"features {split}", i, len(names))
            out[n] = ext.extract(class_source(n, work / "synth" / n).records(split), both, parallel=True)
        progress(f"features {split}", len(names), len(names))
        return out

    test, train = feats_of("test"), feats_of("train")

    def fg_weights(items: list, g: int) -> torch.Tensor:
        fg = torch.from_numpy(np.stack([s.foreground for s in items])).float()[:, None]
        return F.adaptive_avg_pool2d(fg, g)  # (B, 1, G, G): the part's share of each token

    def fg_pooled(items: list, mods: tuple[str, ...]) -> dict[str, torch.Tensor]:
        st = stack_features(items)
        w = fg_weights(items, next(iter(st.values())).shape[-1])
        return {m: F.normalize((st[m] * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-6), dim=1) for m in mods}

    def nearest_prototype(protos: dict[str, dict[str, torch.Tensor]], query: dict[str, torch.Tensor]) -> torch.Tensor:
        sims = torch.stack([torch.stack([(q @ protos[n][m].t()).amax(1) for m, q in query.items()]).mean(0)
                            for n in names], 1)
        return sims.argmax(1)

    def shipped(mods: tuple[str, ...]) -> Callable[[list], torch.Tensor]:
        def run(items: list) -> torch.Tensor:
            st = stack_features(items)
            return prototype_similarities(classes, {m: st[m] for m in mods}).argmax(1)
        return run

    def foreground(mods: tuple[str, ...], protos: dict[str, dict[str, torch.Tensor]]) -> Callable[[list], torch.Tensor]:
        return lambda items: nearest_prototype(protos, fg_pooled(items, mods))

    def rerank(part_only: bool) -> Callable[[list], torch.Tensor]:
        def run(items: list) -> torch.Tensor:
            st = stack_features(items)
            top = prototype_similarities(classes, st).topk(min(SHORTLIST, len(names)), 1).indices
            g = st["rgb"].shape[-1]
            where = (fg_weights(items, g)[:, 0] >= 0.5) if part_only else torch.ones(len(items), g, g, dtype=torch.bool)
            dist = torch.full(top.shape, float("inf"))
            for k in top.unique().tolist():
                rows, cols = (top == k).nonzero(as_tuple=True)
                w = where[rows]
                d = [(nearest_distance(st[m][rows], classes[k].search_matrix(m), where=w) * w).sum((1, 2))
                     / w.sum((1, 2)).clamp_min(1) for m in both]
                dist[rows, cols] = torch.stack(d).mean(0)
            return top.gather(1, dist.argmin(1, keepdim=True))[:, 0]
        return run

    def rotated_train(n: str) -> list:
        samples = [load_sample(r, ext.size) for r in class_source(n, work / "synth" / n).records("train")]
        turns = [replace(s, rgb=np.ascontiguousarray(np.rot90(s.rgb, k)), geometry=np.ascontiguousarray(np.rot90(s.geometry, k)),
                         valid=None if s.valid is None else np.ascontiguousarray(np.rot90(s.valid, k)))
                 for s in samples for k in (1, 2, 3)]
        return list(train[n]) + ext.extract_samples(turns, both)

    fg_rgb = {n: fg_pooled(train[n], ("rgb",)) for n in names}
    fg_both = {n: fg_pooled(train[n], both) for n in names}
    fg_rot = {}
    for i, n in enumerate(names):
        progress("rotated training images", i, len(names))
        fg_rot[n] = fg_pooled(rotated_train(n), ("rgb",))
    progress("rotated training images", len(names), len(names))

    variants: dict[str, Callable[[list], torch.Tensor]] = {
        "shipped: prototypes, both modalities": shipped(both),
        "prototypes, RGB only": shipped(("rgb",)),
        "foreground prototypes, RGB only": foreground(("rgb",), fg_rgb),
        "foreground prototypes, both modalities": foreground(both, fg_both),
        f"prototypes' nearest {SHORTLIST} re-ranked by token memory": rerank(False),
        f"prototypes' nearest {SHORTLIST} re-ranked by the part's tokens": rerank(True),
        "foreground prototypes + 90/180/270 degree turns, RGB only": foreground(("rgb",), fg_rot),
    }
    rows = []
    for label, fn in variants.items():
        right = right_family = n_family = n_all = 0
        seconds = 0.0
        for n in names:
            t0 = time.perf_counter()
            pred = fn(test[n])
            seconds += time.perf_counter() - t0
            ok = int((pred == names.index(n)).sum())
            right += ok
            n_all += len(pred)
            if n in family:
                right_family, n_family = right_family + ok, n_family + len(pred)
        rows.append({"variant": label, "accuracy": round(right / n_all, 4),
                     "accuracy_lookalike": round(right_family / n_family, 4) if n_family else None,
                     "ms_per_sample": round(1000 * seconds / n_all, 2)})
        print(f"{label}: {rows[-1]}", file=sys.stderr, flush=True)
    doc = {
        "benchmark": "class_prediction",
        "command": "python benchmarks/probe_class_prediction.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(), "config_hash": det.config.hash(), "machine": machine(args.threads),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"classes": len(names), "lookalike": sorted(family),
                 "test_samples": sum(len(v) for v in test.values()),
                 "train_per_class": len(next(iter(train.values()))), "work": str(work),
                 "production_version": prod.id},
        "shortlist": SHORTLIST,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
