"""Where detector inference time goes: each part of the RGB + geometry path timed on its own, in wall and
CPU milliseconds per sample, beside the end-to-end rate.

    python benchmarks/bench_inference_parts.py

Fits cable_gland from ../shared with both modalities for one epoch (the speed of inference does not depend
on how long the decoder trained; the retrieval memory and the network have their full sizes), then times
on its test split: reading the files, preparing the backbone inputs (geometry image, resizing), the
backbone, extraction end to end (loader threads beside the backbone, as `predict_records` runs it),
scoring end to end (class given), and inside scoring the retrieval distances and the network (encode +
decode). CPU time is the process's, so "cores" says how busy the 2 cores were (the one-thread parts can
show 2: numpy's BLAS threads spin beside the caller). Torch threads 2.
Writes benchmarks/results/inference_parts.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from iumad.config import from_dict, load_config
from iumad.data import find_classes, load_sample
from iumad.model.detector import Detector, record_size
from iumad.model.retrieval import nearest_distance

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IUMAD_SHARED", ROOT.parent / "shared"))
BOTH = ("rgb", "geometry")


def timed(n: int, fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Run fn once; wall and process CPU milliseconds per sample, and the cores that were busy."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    w, c = time.perf_counter() - w, time.process_time() - c
    return {"wall_ms": round(w / n * 1000, 1), "cpu_ms": round(c / n * 1000, 1), "cores": round(c / w, 2)}, out


def batched(items: list, size: int = 16) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def main() -> int:
    data = SHARED / "data" / "mvtec3d-cable_gland-224"
    if not data.is_dir():
        print(f"skipped: {data} not found (set IUMAD_SHARED to the folder beside the checkout)", file=sys.stderr)
        return 1
    torch.set_num_threads(2)
    (source,) = find_classes(data)
    test = source.records("test")
    n = len(test)
    cfg = load_config(None).to_dict()
    cfg["train"]["epochs"] = 1
    with tempfile.TemporaryDirectory() as tmp:
        det = Detector(from_dict(cfg), cache_dir=Path(tmp))
        det.fit({source.name: source.records("train")}, validation={source.name: source.records("validation")})
        ex = det.extractor
        ex.cache = None  # every part from files, as a first prediction would
        parts: dict[str, dict[str, float]] = {}
        timed(n, lambda: ex.extract(test[:16], BOTH))  # warm-up: thread pools, allocator
        parts["extract end to end (read, prepare, backbone)"], feats = timed(n, lambda: ex.extract(test, BOTH))
        parts["read files (1 thread)"], samples = timed(n, lambda: [load_sample(r) for r in test])
        parts["prepare inputs (1 thread)"], prepared = timed(n, lambda: [ex._prepare_sample(s, BOTH) for s in samples])
        parts["backbone, 2 images"], _ = timed(n, lambda: [ex._run_backbone(b) for b in batched(prepared)])
        sizes = [record_size(r) for r in test]
        names = [source.name] * n
        parts["score end to end (class given)"], _ = timed(n, lambda: det.predict_features(feats, names, sizes))
        state, net = det.classes[source.name], det.net.eval()
        tensors = [{m: torch.stack([torch.from_numpy(f.features[m]) for f in b]).float() for m in BOTH}
                   for b in batched(feats)]
        with torch.inference_mode():
            parts["retrieval distances, 2 modalities"], _ = timed(
                n, lambda: [nearest_distance(t[m], state.banks[m]) for t in tensors for m in BOTH])

            def network() -> None:
                for t in tensors:
                    _, gated, _ = net.encode(t)
                    g = t["rgb"].shape[-1]
                    net.decode(gated, state.text[None].expand(len(t["rgb"]), -1), (g, g), BOTH)
            parts["network (encode + decode)"], _ = timed(n, network)
    report = {
        "benchmark": "inference_parts", "command": "python benchmarks/bench_inference_parts.py",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "n_test": n, "parts": parts,
        "end_to_end_samples_per_s": round(1000 / (parts["extract end to end (read, prepare, backbone)"]["wall_ms"]
                                                   + parts["score end to end (class given)"]["wall_ms"]), 2),
    }
    out = ROOT / "benchmarks" / "results" / "inference_parts.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
