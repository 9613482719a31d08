"""`iumad demo`: the quick start's main job on data the project generates itself.

Generate the synthetic set (reused when the same one is already there), learn its classes one at a
time in a fresh store, then write the forgetting report (text, JSON, CSV, plot) next to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from iumad.continual.report import drift_text, forgetting, forgetting_json
from iumad.continual.step import StepRequest, learn
from iumad.data.synth import MANIFEST, generate_dataset
from iumad.errors import UsageError
from iumad.eval.forgetting import plot, render_text, write_csv
from iumad.progress import ProgressFn, no_progress
from iumad.store.atomic import atomic_write_bytes
from iumad.store.db import Store


def _same_synth(folder: Path, want: dict[str, int]) -> bool:
    try:
        have = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return all(have.get(k) == v for k, v in want.items()) and len(have.get("classes", [])) == want["n_classes"]


def run_demo(out: Path, *, n_classes: int = 4, seed: int = 0, n_train: int = 40, n_val: int = 8,
             n_test: int = 30, config: Path | None = None, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Returns the forgetting report as JSON plus where everything was written."""
    out = Path(out)
    data, store_dir = out / "synth", out / "store"
    want = {"seed": seed, "size": 224, "n_train": n_train, "n_val": n_val, "n_test": n_test, "n_classes": n_classes}
    if not _same_synth(data, want):
        generate_dataset(data, n_classes=n_classes, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                         progress=progress)
    if store_dir.exists():
        if not (store_dir / "iumad.sqlite").is_file():
            raise UsageError(f"{store_dir}: exists and is not an iumad store; choose another --out")
        shutil.rmtree(store_dir)  # the demo always starts from an empty store
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    steps = []
    with Store.open(store_dir) as store:
        for name in classes:
            steps.append(learn(store, StepRequest(name, data, config=config), progress=progress))
        report, drift = forgetting(store, "i_auroc")
    text = render_text(report) + drift_text(drift)
    result = {**forgetting_json(report, drift), "store": str(store_dir), "data": str(data),
              "report": str(out / "forgetting.txt"), "plot": str(out / "forgetting.png"),
              "csv": str(out / "forgetting.csv"), "seconds": sum(s["seconds"] for s in steps)}
    atomic_write_bytes(out / "forgetting.txt", text.encode())
    atomic_write_bytes(out / "forgetting.json", json.dumps(result, indent=2).encode())
    write_csv(report, out / "forgetting.csv")
    plot(report, out / "forgetting.png")
    result["text"] = text
    return result
