"""`iumad predict`: score images with the production model; overlays, CSV and JSON rows.

Inputs: one image file (its other modality is paired when it sits in the MVTec-style sibling folder,
rgb/<id>.png beside xyz/<id>.tiff), a folder of images (flat or rgb/ xyz/ depth/ sub-folders, paired
by stem), a split folder of a class (bottle/test, an MVTec AD 2 class's test_public, ...: any layout of
`iumad.data.dataset.READERS`), or a class / dataset folder (its test split, or its training data when it
has no test split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iumad.continual.versions import load_production
from iumad.data import folder
from iumad.data.dataset import find_classes, layout_of, split_folder
from iumad.data.io import RGB_SUFFIXES, TIFF_SUFFIXES
from iumad.data.loading import load_sample
from iumad.data.sample import SampleRecord
from iumad.errors import DataError, UsageError
from iumad.eval.overlay import prediction_rows, safe_stem, write_csv, write_overlays
from iumad.progress import ProgressFn, no_progress
from iumad.store import repository as repo
from iumad.store.atomic import atomic_write_bytes
from iumad.store.db import Store

CHUNK = 64  # samples scored at a time: bounds the memory the maps of a large folder take


def find_inputs(path: Path) -> list[SampleRecord]:
    """The samples at `path` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: does not exist; give an image, a folder or a dataset split", file=path,
                        fix="give an image, a folder or a dataset split")
    if path.is_file():
        return [_file_record(path)]
    split = split_folder(path)
    if split is not None:
        records = split[0].records(split[1])
    elif layout_of(path) is not None or any(layout_of(p) for p in path.iterdir() if p.is_dir()):
        records = []
        for source in find_classes(path):
            records += source.records("test") or source.records("train")
    else:
        records = folder._records(path, path, "", "test", "unknown")
    if not records:
        raise DataError(f"{path}: no image found; expected .png/.jpg rgb or .tiff/_depth.png geometry files",
                        file=path)
    return records


def _file_record(path: Path) -> SampleRecord:
    suffix = path.suffix.lower()
    if suffix not in RGB_SUFFIXES + TIFF_SUFFIXES:
        raise DataError(f"{path}: not an image iumad reads; use .png/.jpg (rgb) or .tiff (xyz points)",
                        file=path, fix="use .png/.jpg (rgb) or .tiff (xyz points)")
    if path.stem.endswith("_depth") and suffix == ".png":
        return SampleRecord("", "test", "unknown", geometry=path, geometry_kind="depth")
    if suffix in TIFF_SUFFIXES:
        rgb = next((p for s in RGB_SUFFIXES for p in [path.parent.parent / "rgb" / f"{path.stem}{s}"]
                    if path.parent.name == "xyz" and p.is_file()), None)
        return SampleRecord("", "test", "unknown", rgb=rgb, geometry=path, geometry_kind="xyz")
    xyz = path.parent.parent / "xyz" / f"{path.stem}.tiff"
    paired = path.parent.name == "rgb" and xyz.is_file()
    return SampleRecord("", "test", "unknown", rgb=path, geometry=xyz if paired else None,
                        geometry_kind="xyz" if paired else None)


def predict_path(store: Store, path: Path, class_name: str | None = None, out_dir: Path | None = None,
                 progress: ProgressFn = no_progress) -> list[dict[str, Any]]:
    """Score every sample at `path` (class given, or predicted when None); with `out_dir`, write
    overlays per sample and predictions.csv / predictions.json. Returns one row per sample."""
    det, version = load_production(store)
    with store.session() as s:
        thresholds = {n: t.value for n, t in repo.thresholds_for(s, version.id).items()}
    if class_name is not None and class_name not in det.classes:
        raise UsageError(f"class {class_name!r} is not in the production model; it knows "
                         f"{', '.join(det.class_names)} (or use --class auto)")
    records = find_inputs(path)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(records), CHUNK):
        chunk = records[start:start + CHUNK]
        preds = det.predict_records(chunk, class_name)
        chunk_rows = prediction_rows(chunk, preds, thresholds)
        for i, (rec, pred, row) in enumerate(zip(chunk, preds, chunk_rows), start):
            row["model_version"] = version.id
            if out_dir is not None:
                written = write_overlays(load_sample(rec), pred, Path(out_dir), safe_stem(row["path"], i),
                                         thresholds.get(pred.class_name))
                row["overlays"] = [str(p) for p in written]
        rows += chunk_rows
        progress("predict", len(rows), len(records))
    if out_dir is not None:
        write_csv([{k: v for k, v in r.items() if k != "overlays"} for r in rows], Path(out_dir) / "predictions.csv")
        atomic_write_bytes(Path(out_dir) / "predictions.json", json.dumps(rows, indent=2).encode())
    return rows
