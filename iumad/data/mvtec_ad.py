"""MVTec AD layout, also that of MPDD, BTAD and KSDD2 exports: `<class>/train/good/*.png`,
`<class>/test/{good,<defect>}/*.png`, `<class>/ground_truth/<defect>/<id>_mask.png`.

RGB only; grey images (grid, screw, zipper) are read as 3-channel RGB. BTAD's `ok/` folders count as
`good/`. Training folders hold normal images only; MVTec AD has no validation split (held-out normals
then come from the training images).
"""

from __future__ import annotations

from pathlib import Path

from iumad.data.labelfolders import GOOD_DIRS, good_records, has_images, is_good, split_records, subdirs
from iumad.data.sample import SampleRecord
from iumad.errors import DataError

SPLIT_DIRS = {"train": "train", "test": "test"}


def is_class_dir(path: Path) -> bool:
    """train/good (or ok/) holds images; or, for a test-only copy, test/good and ground_truth/ do.
    A folder with test_public/ and no test/ is MVTec AD 2's, not ours."""
    if (path / "test_public").is_dir() and not (path / "test").is_dir():
        return False
    if any(has_images(path / "train" / g) for g in GOOD_DIRS):
        return True
    return (path / "ground_truth").is_dir() and any(has_images(path / "test" / g) for g in GOOD_DIRS)


def list_records(class_dir: Path, split: str, class_name: str) -> list[SampleRecord]:
    """train: train/good; test: every test/<label>/ with its ground_truth/<label>/ masks; no validation."""
    if split == "train":
        return train_records(class_dir / "train", class_name)
    if split == "test":
        return split_records(class_dir / "test", class_dir / "ground_truth", class_name, "test")
    return []


def train_records(train_dir: Path, class_name: str, split: str = "train") -> list[SampleRecord]:
    """Normal images of train/good (or ok/); any other folder there is refused, never trained on."""
    other = next((d for d in subdirs(train_dir) if not is_good(d)), None)
    if other is not None:
        raise DataError(f"{other}: {train_dir.name}/ holds normal images only ({train_dir.name}/good/); move "
                        "defect images to test/<defect>/", file=other, fix="move defect images to test/<defect>/")
    records: list[SampleRecord] = []
    for d in subdirs(train_dir):
        records += good_records(d, class_name, split)
    return records
