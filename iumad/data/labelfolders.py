"""Label folders, the MVTec family's way of storing a split: `<split>/<label>/<id>.png`, with the masks of
a defect in `<ground truth>/<label>/`, one file (`<id>_mask.png` or `<id>.png`) or one folder of files
(`<id>/000.png`, ...: MVTec LOCO) per image.

Shared by the MVTec AD, MVTec AD 2 and MVTec LOCO readers and by described folders, so that the four
pair images with masks, and refuse what cannot be paired, the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from iumad.data.io import RGB_SUFFIXES
from iumad.data.sample import SampleRecord
from iumad.errors import DataError

GOOD_DIRS = ("good", "ok")  # BTAD names its normal folders ok/
MASK_SUFFIX = "_mask"


def entries(folder: Path) -> list[Path]:
    """Sorted visible entries of `folder`; [] when it is no directory (missing, a loop, a file)."""
    try:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{folder}: unreadable folder ({exc.strerror or type(exc).__name__}); check its "
                        "permissions", file=folder, fix="check its permissions") from None


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of `folder`, sorted."""
    return [p for p in entries(folder) if p.is_dir()]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in RGB_SUFFIXES and path.is_file()


def has_images(folder: Path) -> bool:
    """Whether `folder` holds at least one image file directly (what tells layouts apart)."""
    return any(_is_image(p) for p in entries(folder))


def images_by_stem(folder: Path) -> dict[str, Path]:
    """The image files directly in `folder` by stem; two files of one stem (000.png, 000.jpg) are refused."""
    found: dict[str, Path] = {}
    for p in entries(folder):
        if not _is_image(p):
            continue  # notes, .DS_Store, FIFOs, sub-folders
        if p.stem in found:
            raise DataError(f"{p}: clashes with {found[p.stem].name} (same sample id {p.stem!r}); keep one of them",
                            file=p, fix="keep one of them")
        found[p.stem] = p
    return found


def is_good(folder: Path) -> bool:
    return folder.name.lower() in GOOD_DIRS


def masks_in(folder: Path) -> dict[str, tuple[Path, ...]]:
    """Masks of one defect folder by image id: `<id>_mask.png` or `<id>.png`, or a folder `<id>/` whose
    images are all masks of that image (merged when read)."""
    found: dict[str, tuple[Path, ...]] = {}
    for p in entries(folder):
        if p.is_dir():
            key, files = p.name, tuple(f for f in entries(p) if _is_image(f))
            if not files:
                raise DataError(f"{p}: mask folder holds no mask image; add its masks or remove the folder",
                                file=p, fix="add its masks or remove the folder")
        elif _is_image(p):
            key = p.stem[: -len(MASK_SUFFIX)] if p.stem.endswith(MASK_SUFFIX) else p.stem
            files = (p,)
        else:
            continue
        if key in found:
            raise DataError(f"{p}: a second mask entry for image {key!r} (with {found[key][0].name}); keep one "
                            "of them", file=p, fix="keep one of them")
        found[key] = files
    return found


def good_records(folder: Path, class_name: str, split: str) -> list[SampleRecord]:
    """The normal images directly in `folder` (train/good, validation/good)."""
    return [SampleRecord(class_name=class_name, split=split, label="good", rgb=p)
            for p in images_by_stem(folder).values()]


def split_records(split_dir: Path, gt_dir: Path | None, class_name: str, split: str, *,
                  skip: tuple[str, ...] = (), kinds: Mapping[str, str] | None = None) -> list[SampleRecord]:
    """Every `split_dir/<label>/` image, its masks from `gt_dir/<label>/`.

    `good/` (or `ok/`) is the normal label. A defect image may lack a mask (image-level labels; see
    `iumad.data.labels`), but a mask without its image, or masks of a label with no image folder, are
    refused: they mean misnamed files, which would otherwise silently turn pixel labels into image labels.
    `kinds` maps a label folder to its defect kind (MVTec LOCO); `skip` names sub-folders that are no label.
    """
    loose = next((p for p in entries(split_dir) if _is_image(p)), None)
    if loose is not None:
        raise DataError(f"{loose}: an image directly in {split_dir.name}/; move it into {split_dir.name}/good/ or "
                        f"{split_dir.name}/<defect>/", file=loose, fix=f"move it into {split_dir.name}/good/ or "
                        f"{split_dir.name}/<defect>/")
    records: list[SampleRecord] = []
    labels = [d for d in subdirs(split_dir) if d.name not in skip]
    for label_dir in labels:
        good = is_good(label_dir)
        label = "good" if good else label_dir.name
        images = images_by_stem(label_dir)
        masks = masks_in(gt_dir / label_dir.name) if gt_dir is not None and not good else {}
        orphan = next((k for k in masks if k not in images), None)
        if orphan is not None:
            where = masks[orphan][0]
            raise DataError(f"{where}: a mask without its image {label_dir}/{orphan}.png; add the image or remove "
                            "the mask (mask names must be <id>_mask.png, <id>.png or <id>/*.png)",
                            file=where, fix="add the image or remove the mask")
        for stem, image in images.items():
            files = masks.get(stem, ())
            records.append(SampleRecord(
                class_name=class_name, split=split, label=label, rgb=image,
                gt=files[0] if files else None, more_gt=files[1:],
                defect_kind=None if good or kinds is None else kinds.get(label_dir.name),
            ))
    if gt_dir is not None:
        names = {d.name for d in labels}
        stray = next((d for d in subdirs(gt_dir) if d.name not in names and not is_good(d)), None)
        if stray is not None:
            raise DataError(f"{stray}: masks of a defect with no {split_dir.name}/{stray.name}/ image folder; add "
                            "the images or remove the masks", file=stray, fix="add the images or remove the masks")
    return records
