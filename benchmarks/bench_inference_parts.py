"""Where detector inference time goes: each part of the RGB + geometry path timed on one core, in
milliseconds per sample, beside the end-to-end rate on both cores.

    python benchmarks/bench_inference_parts.py [--precision float32] [--set KEY=VALUE ...] [--out FILE]

Fits cable_gland from ../shared with both modalities for one epoch (the speed of inference does not depend
on how long the decoder trained; the retrieval memory and the network have their full sizes), then times
on its test split:
  - end to end: `predict_records` (files -> maps, class given, no feature cache) with torch threads 2,
    i.e. two workers that each take batches through every part on one core (`features.inter_op`);
  - each part alone on one thread, as a worker runs it: reading the files, preparing the backbone inputs
    (geometry image, resizing), the backbone (2 images), scoring (class given) and inside scoring the
    retrieval distances (only the tokens that reach the scored region) and the network (encode + decode).
The parts' sum divided by the cores is the rate the end-to-end run would reach with no overhead.
`--set backbone.input_size=256` (repeatable) times a candidate default against the shipped one.
Writes benchmarks/results/inference_parts.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine  # noqa: E402

from iumad.config import from_dict, load_config
from iumad.data import find_classes, load_sample
from iumad.data.loading import record_size
from iumad.eval.protocol import apply_overrides
from iumad.model.detector import Detector
from iumad.model.device import scoring_precision
from iumad.model.maps import score_region, tokens_reaching
from iumad.model.retrieval import nearest_distance

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IUMAD_SHARED", ROOT.parent / "shared"))
BOTH = ("rgb", "geometry")
CORES = 2


def timed(n: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run fn once; wall milliseconds per sample."""
    t = time.perf_counter()
    out = fn()
    return round((time.perf_counter() - t) / n * 1000, 1), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default=None,
                    help="score.precision (default: the config's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, e.g. backbone.input_size=256 (the value is read as YAML)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference_parts.json")
    args = ap.parse_args()
    data = SHARED / "data" / "mvtec3d-cable_gland-224"
    if not data.is_dir():
        print(f"skipped: {data} not found (set IUMAD_SHARED to the folder beside the checkout)", file=sys.stderr)
        return 1
    torch.set_num_threads(CORES)
    (source,) = find_classes(data)
    test = source.records("test")
    n = len(test)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            ap.error(f"--set {item!r}: write section.key=value, e.g. backbone.input_size=256")
        overrides[key] = yaml.safe_load(value)
    cfg = apply_overrides(load_config(None).to_dict(), overrides)
    cfg["train"]["epochs"] = 1
    if args.precision:
        cfg["score"]["precision"] = args.precision
    precision = scoring_precision(cfg["score"]["precision"], torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        det = Detector(from_dict(cfg), cache_dir=Path(tmp))
        det.fit({source.name: source.records("train")}, validation={source.name: source.records("validation")})
        ex = det.extractor
        ex.cache = None  # every part from files, as a first prediction would
        det.predict_records(test[:16], source.name)  # warm-up: thread pools, allocator
        cpu = time.process_time()
        end_ms, _ = timed(n, lambda: det.predict_records(test, source.name))
        cores_busy = round((time.process_time() - cpu) * 1000 / n / end_ms, 2)

        torch.set_num_threads(1)
        parts: dict[str, float] = {}
        step = ex.batch_size
        batches = [test[i:i + step] for i in range(0, n, step)]
        with threadpool_limits(1, user_api="blas"):
            parts["read files"], samples = timed(n, lambda: [load_sample(r) for r in test])
            parts["prepare inputs"], prepared = timed(n, lambda: [ex._prepare_sample(s, BOTH) for s in samples])
            parts["backbone, 2 images"], _ = timed(n, lambda: [ex._run_backbone(prepared[i:i + step])
                                                               for i in range(0, n, step)])
            feats = [f for b in batches for f in ex.extract(b, BOTH, parallel=False)]
            fb = [feats[i:i + step] for i in range(0, n, step)]
            parts["scoring (class given)"], _ = timed(n, lambda: [det.predict_features(
                f, [source.name] * len(f), [record_size(r) for r in b]) for f, b in zip(fb, batches)])
        state, net = det.classes[source.name], det.net.eval()
        tensors = [{m: torch.stack([torch.from_numpy(s.features[m]) for s in f]).float() for m in BOTH} for f in fb]
        sigma = det.config.score.sigma
        dil = det.config.score.foreground_dilation
        reach = [tokens_reaching(score_region([s.foreground for s in f], ex.size, dil), t["rgb"].shape[-1], sigma)
                 for f, t in zip(fb, tensors)]
        with torch.inference_mode():
            low = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
            parts["  of which retrieval distances"], _ = timed(n, lambda: [
                nearest_distance(t[m], state.search_matrix(m, precision), where=r)
                for t, r in zip(tensors, reach) for m in BOTH])

            def network() -> None:
                for t in tensors:
                    with low:
                        net.anomaly_tokens(t, state.text[None].expand(len(t["rgb"]), -1))
            parts["  of which network (learned maps)"], _ = timed(n, network)
    one_core = sum(v for k, v in parts.items() if not k.startswith(" "))
    report = {
        "benchmark": "inference_parts",
        "command": " ".join(["python benchmarks/bench_inference_parts.py", *sys.argv[1:]]),
        "commit": git_commit(), "config": "configs/default.yaml with train.epochs: 1"
                  + (f", score.precision: {args.precision}" if args.precision else "")
                  + "".join(f", {k}: {v}" for k, v in overrides.items()),
        "overrides": overrides,
        "scoring_precision": precision,
        "config_hash": from_dict(cfg).hash(),
        "machine": machine(CORES),
        "n_test": n, "batch_size": step,
        "end_to_end": {"ms_per_sample": end_ms, "samples_per_s": round(1000 / end_ms, 2), "torch_threads": CORES,
                       "cores_busy": cores_busy},
        "parts_one_thread_ms_per_sample": parts,
        "sum_of_parts_ms": round(one_core, 1),
        "no_overhead_samples_per_s": round(1000 / (one_core / CORES), 2),
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
