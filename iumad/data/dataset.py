"""Find the classes under a path and list their samples, whatever the layout."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from iumad.data import eyecandies, folder, mvtec3d
from iumad.data.sample import SampleRecord
from iumad.errors import DataError

Layout = Literal["mvtec3d", "eyecandies", "folder"]
_DETECTORS: tuple[tuple[Layout, object], ...] = (
    ("mvtec3d", mvtec3d.is_class_dir), ("eyecandies", eyecandies.is_class_dir), ("folder", folder.is_class_dir),
)


@dataclass(frozen=True)
class ClassSource:
    """One product class on disk: its normalised name, folder and layout."""

    name: str
    path: Path
    layout: Layout

    def records(self, split: str) -> list[SampleRecord]:
        """The split's samples (train, validation or test); [] when the layout has no such split."""
        if self.layout == "mvtec3d":
            return mvtec3d.list_records(self.path, split, self.name)
        if self.layout == "eyecandies":
            return eyecandies.list_records(self.path, split, self.name)
        return folder.list_records(self.path, split, self.name)


def class_name_from_dir(dirname: str) -> str:
    """Folder name -> class name: CamelCase (Eyecandies) becomes snake_case, spaces become underscores."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", dirname.strip())
    return re.sub(r"\s+", "_", name).lower()


def layout_of(path: Path) -> Layout | None:
    for layout, detect in _DETECTORS:
        if detect(path):  # type: ignore[operator]
            return layout
    return None


def find_classes(path: Path) -> list[ClassSource]:
    """Classes at `path`: the folder itself if it is one class, else its sub-folders that are classes."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: does not exist; check the data path", file=path, fix="check the data path")
    if not path.is_dir():
        raise DataError(f"{path}: is a file; point at a dataset folder or a class folder", file=path,
                        fix="point at a dataset folder or a class folder")
    own = layout_of(path)
    if own is not None:
        return [ClassSource(class_name_from_dir(path.name), path, own)]
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        layout = layout_of(sub)
        if layout is not None:
            found.append(ClassSource(class_name_from_dir(sub.name), sub, layout))
    found.sort(key=lambda c: c.name)  # protocols take classes in alphabetical order
    if not found:
        raise DataError(
            f"{path}: no class found; expected MVTec 3D-AD (<class>/train/good/rgb), Eyecandies "
            "(<Class>/train/data) or folder (<class>/good/) layout", file=path,
        )
    return found


def require_records(source: ClassSource, split: str) -> list[SampleRecord]:
    """Like `ClassSource.records` but an empty split is an error naming the folder."""
    records = source.records(split)
    if not records:
        raise DataError(f"{source.path}: split {split!r} holds no sample; add images or pick another split",
                        file=source.path, fix="add images or pick another split")
    return records
