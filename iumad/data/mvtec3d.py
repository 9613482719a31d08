"""MVTec 3D-AD layout: <class>/{train,validation}/good/{rgb,xyz}, <class>/test/<defect>/{rgb,xyz,gt}."""

from __future__ import annotations

from pathlib import Path

from iumad.data.io import RGB_SUFFIXES, TIFF_SUFFIXES, is_stray
from iumad.data.sample import SPLITS, SampleRecord
from iumad.errors import DataError



def is_class_dir(path: Path) -> bool:
    """A class folder has train/good/ with an rgb/ or xyz/ folder inside."""
    good = path / "train" / "good"
    return (good / "rgb").is_dir() or (good / "xyz").is_dir()


def list_records(class_dir: Path, split: str, class_name: str | None = None) -> list[SampleRecord]:
    """List the samples of one split; stems pair rgb/<id>.png, xyz/<id>.tiff and gt/<id>.png."""
    if split not in SPLITS:
        raise DataError(f"{class_dir}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    name = class_name or class_dir.name
    split_dir = class_dir / split
    if not split_dir.is_dir():
        return []
    records: list[SampleRecord] = []
    for label_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rgb = _by_stem(label_dir / "rgb", RGB_SUFFIXES)
        xyz = _by_stem(label_dir / "xyz", TIFF_SUFFIXES)
        gt = _by_stem(label_dir / "gt", RGB_SUFFIXES)
        stems = sorted(set(rgb) | set(xyz))
        for stem in stems:
            if rgb and stem not in rgb:
                raise DataError(f"{xyz[stem]}: has no matching rgb/{stem}.png; add it or remove the xyz file",
                                file=xyz[stem], fix="add the rgb file or remove the xyz file")
            if xyz and stem not in xyz:
                raise DataError(f"{rgb[stem]}: has no matching xyz/{stem}.tiff; add it or remove the rgb file",
                                file=rgb[stem], fix="add the xyz file or remove the rgb file")
            records.append(SampleRecord(
                class_name=name, split=split, label=label_dir.name,
                rgb=rgb.get(stem), geometry=xyz.get(stem), geometry_kind="xyz" if xyz else None,
                gt=gt.get(stem),
            ))
    return records


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and not is_stray(p) and p.suffix.lower() in suffixes}
