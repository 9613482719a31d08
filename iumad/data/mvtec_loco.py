"""MVTec LOCO layout: `<class>/{train,validation}/good/*.png`, `<class>/test/{good,logical_anomalies,
structural_anomalies}/*.png`, and one mask folder per defect image,
`<class>/ground_truth/<defect>/<id>/000.png` (001.png, ... when the image holds several defects).

A sample's masks are merged when read (a pixel is defective if any mask marks it, whatever its value).
Its defect kind, logical (a rule broken: a missing or extra part) or structural (a damaged part), is kept
on the record so reports can tell the two apart.
"""

from __future__ import annotations

from pathlib import Path

from iumad.data.labelfolders import split_records
from iumad.data.mvtec_ad import train_records
from iumad.data.sample import SampleRecord

KINDS = {"logical_anomalies": "logical", "structural_anomalies": "structural"}
SPLIT_DIRS = {"train": "train", "validation": "validation", "test": "test"}


def is_class_dir(path: Path) -> bool:
    """test/ or ground_truth/ holds logical_anomalies/ or structural_anomalies/."""
    return any((path / top / d).is_dir() for top in ("test", "ground_truth") for d in KINDS)


def list_records(class_dir: Path, split: str, class_name: str) -> list[SampleRecord]:
    if split in ("train", "validation"):
        return train_records(class_dir / split, class_name, split)
    if split == "test":
        return split_records(class_dir / "test", class_dir / "ground_truth", class_name, "test", kinds=KINDS)
    return []
