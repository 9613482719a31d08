"""VisA layout: `<class>/Data/Images/{Normal,Anomaly}/*.JPG`, `<class>/Data/Masks/Anomaly/*.png`, and the
split file `split_csv/1cls.csv` in the dataset folder above the classes.

The split is the CSV's, never guessed from the folders: its rows `object,split,label,image,mask` name
each image (paths relative to the dataset folder), whether it is for training or test, normal or anomaly,
and the anomaly's mask. VisA masks mark defects with small values (1, 2, ...), not 255: any non-zero pixel
is a defect.
"""

from __future__ import annotations

import csv
from pathlib import Path

from iumad.data.sample import SampleRecord
from iumad.errors import DataError

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": "good", "anomaly": "anomaly"}
SPLITS = ("train", "test")


def is_class_dir(path: Path) -> bool:
    return (path / "Data" / "Images").is_dir()


def split_csv(class_dir: Path) -> Path:
    """The dataset's split_csv/1cls.csv above `class_dir` (also when `class_dir` is a link to the class)."""
    tried = []
    for root in (class_dir.parent, class_dir.resolve().parent):
        if root not in tried:
            tried.append(root)
            if (root / SPLIT_CSV).is_file():
                return root / SPLIT_CSV
    raise DataError(f"{class_dir}: a VisA class is read from {SPLIT_CSV} in the dataset folder above it, not found "
                    f"in {class_dir.parent}; restore it from the VisA download", file=class_dir,
                    fix=f"restore {SPLIT_CSV} from the VisA download")


def list_records(class_dir: Path, split: str, class_name: str) -> list[SampleRecord]:
    """The rows of this class and split in 1cls.csv; every listed file must exist."""
    if split not in SPLITS:
        return []
    path = split_csv(class_dir)
    root = path.parent.parent
    names = {class_dir.name, class_dir.resolve().name}
    rows = [(line, row) for line, row in _rows(path) if row["object"] in names]
    if not rows:
        raise DataError(f"{path}: lists no sample of class {class_dir.name!r}; use the VisA split file that "
                        "belongs to this dataset", file=path, fix="use the VisA split file of this dataset")
    records, seen = [], set()
    for line, row in rows:
        where = f"{path}:{line}"
        if row["split"] not in SPLITS:
            raise DataError(f"{where}: split {row['split']!r} is neither train nor test; fix the row",
                            file=path, fix="fix the row")
        if row["label"] not in LABELS:
            raise DataError(f"{where}: label {row['label']!r} is neither normal nor anomaly; fix the row",
                            file=path, fix="fix the row")
        if row["split"] != split:
            continue
        image = _listed(root, row["image"], where)
        if image is None:
            raise DataError(f"{where}: names no image; fix the row", file=path, fix="fix the row")
        if image in seen:
            raise DataError(f"{where}: {image} is listed twice; remove one row", file=path, fix="remove one row")
        seen.add(image)
        label = LABELS[row["label"]]
        mask = _listed(root, row["mask"], where) if label != "good" else None
        records.append(SampleRecord(class_name=class_name, split=split, label=label, rgb=image, gt=mask))
    return records


def _listed(root: Path, relative: str, where: str) -> Path | None:
    if not relative.strip():
        return None
    if any(ord(c) < 32 for c in relative):
        raise DataError(f"{where}: a path with control characters ({relative[:60]!r}); fix the row",
                        file=where.rsplit(":", 1)[0], fix="fix the row")
    path = root / relative.strip()
    try:
        listed = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system
        listed = False
    if not listed:
        raise DataError(f"{path}: listed in {where} but missing (or not a file); restore it or remove its row",
                        file=path, fix="restore it or remove its row")
    return path


def _rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of the CSV; a malformed file is a DataError naming it."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: lacks the column(s) {', '.join(missing)} of a VisA split file "
                                f"({','.join(COLUMNS)}); restore it from the VisA download", file=path,
                                fix="restore it from the VisA download")
            rows, line = [], reader.line_num + 1
            for row in reader:  # a quoted field may span lines: a row is named by the line it starts on
                rows.append((line, {c: (row.get(c) or "").strip() for c in COLUMNS}))
                line = reader.line_num + 1
            return rows
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or type(exc).__name__}); restore it", file=path,
                        fix="restore it") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"{path}: malformed CSV ({first}); restore it from the VisA download", file=path,
                        fix="restore it from the VisA download") from None
