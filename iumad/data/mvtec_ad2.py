"""MVTec AD 2 layout: `<class>/{train,validation}/good/*.png`, `<class>/test_public/{good,bad}/*.png`,
`<class>/test_public/ground_truth/bad/<id>_mask.png`.

Only the public test split has labels; test_private/ and test_private_mixed/ are not read.
"""

from __future__ import annotations

from pathlib import Path

from iumad.data.labelfolders import split_records
from iumad.data.mvtec_ad import train_records
from iumad.data.sample import SampleRecord

SPLIT_DIRS = {"train": "train", "validation": "validation", "test": "test_public"}
GT_DIR = "ground_truth"


def is_class_dir(path: Path) -> bool:
    """test_public/ holds good/, bad/ or ground_truth/ (Eyecandies' test_public/ holds data/)."""
    public = path / "test_public"
    return any((public / d).is_dir() for d in ("good", "bad", GT_DIR))


def list_records(class_dir: Path, split: str, class_name: str) -> list[SampleRecord]:
    if split in ("train", "validation"):
        return train_records(class_dir / SPLIT_DIRS[split], class_name, split)
    if split == "test":
        public = class_dir / SPLIT_DIRS["test"]
        return split_records(public, public / GT_DIR, class_name, "test", skip=(GT_DIR,))
    return []
