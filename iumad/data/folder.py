"""A plant's own data: a class folder with good/, defect*/ and masks/.

Accepted inside good/ and each defect*/ folder, either flat files paired by stem or per-modality folders:
  001.png            rgb (8-bit; .png .jpg .jpeg .bmp)
  001.tiff           geometry: HxWx3 xyz points in metres, or HxW depth in metres (.tif too)
  001_depth.png      geometry: 16-bit depth in millimetres
  rgb/001.png, xyz/001.tiff, depth/001.png   the same, one folder per modality
Masks: masks/<defect folder>/001.png, masks/001.png or 001_mask.png beside the image.
Good samples are the training split; defect folders (with their masks) the test split. A class may be
RGB-only or geometry-only: the missing modality is recorded as absent, never faked.
"""

from __future__ import annotations

from pathlib import Path

from iumad.data.io import RGB_SUFFIXES, TIFF_SUFFIXES, is_stray
from iumad.data.sample import SampleRecord
from iumad.errors import DataError


def is_class_dir(path: Path) -> bool:
    return (path / "good").is_dir()


def defect_dirs(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.is_dir() and p.name.lower().startswith("defect"))


def list_records(class_dir: Path, split: str, class_name: str) -> list[SampleRecord]:
    """Good samples for split 'train'; defect samples for 'test'; 'validation' is empty in this layout."""
    if split == "train":
        return _records(class_dir / "good", class_dir, class_name, "train", "good")
    if split == "test":
        out: list[SampleRecord] = []
        for d in defect_dirs(class_dir):
            out += _records(d, class_dir, class_name, "test", _defect_label(d.name))
        return out
    return []


def _defect_label(dirname: str) -> str:
    rest = dirname[len("defect"):].lstrip("_-. ").lower()
    return rest if rest and rest != "s" else "defect"


def _records(folder: Path, class_dir: Path, class_name: str, split: str, label: str) -> list[SampleRecord]:
    rgb, geom, masks = {}, {}, {}
    for sub, target in (("rgb", "rgb"), ("xyz", "geom"), ("depth", "geom"), (".", "flat")):
        d = folder / sub
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if not p.is_file() or is_stray(p):
                continue
            stem, suffix = p.stem, p.suffix.lower()
            if stem.endswith("_mask"):
                masks[stem[: -len("_mask")]] = p
            elif stem.endswith("_depth") or (target == "geom"):
                key = stem[: -len("_depth")] if stem.endswith("_depth") else stem
                _put(geom, key, p)
            elif suffix in TIFF_SUFFIXES:
                _put(geom, stem, p)
            elif suffix in RGB_SUFFIXES:
                _put(rgb, stem, p)
    mask_dirs = [class_dir / "masks" / folder.name, class_dir / "masks"]
    for md in mask_dirs:
        if md.is_dir():
            for p in sorted(md.iterdir()):
                if p.is_file() and not is_stray(p):
                    masks.setdefault(p.stem, p)
    out = []
    for stem in sorted(set(rgb) | set(geom)):
        g = geom.get(stem)
        out.append(SampleRecord(
            class_name=class_name, split=split, label=label, rgb=rgb.get(stem), geometry=g,
            geometry_kind=None if g is None or g.suffix.lower() in TIFF_SUFFIXES else "depth",
            gt=masks.get(stem) if label != "good" else None,
        ))
    return out


def _put(table: dict[str, Path], stem: str, path: Path) -> None:
    if stem in table:
        raise DataError(f"{path}: clashes with {table[stem].name} (same sample id {stem!r}); keep one of them",
                        file=path, fix="keep one of them")
    table[stem] = path
