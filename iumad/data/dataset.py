"""Find the classes under a path and list their samples, whatever the layout.

`READERS` is the one table of layouts: `inspect`, `add-class`, `predict`, `nightly` and `benchmark`
all find classes through it, so a layout added here is read the same way everywhere. Detection refuses
rather than guesses: a folder two layouts could both read, and a class folder named like a split
(`train`, `test`, ...: a split of one class read as a class of its own), are errors that say what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping

from iumad.data import described, eyecandies, folder, mvtec3d, mvtec_ad, mvtec_ad2, mvtec_loco, visa
from iumad.data.described import FolderSpec
from iumad.data.sample import SampleRecord
from iumad.errors import DataError

Layout = Literal["mvtec3d", "mvtec_ad", "mvtec_ad2", "mvtec_loco", "visa", "eyecandies", "folder", "described"]
SPLIT_NAMES = frozenset({"train", "test", "validation", "val", "ground_truth", "good", "test_public"})
"""Folder names of splits and labels: a class folder called so is a part of a class, not a class."""


@dataclass(frozen=True)
class Reader:
    """One layout: how to recognise one of its class folders and list a split of it."""

    layout: Layout
    title: str  # as messages name it
    shape: str  # what `is_class_dir` looks for, for messages
    is_class_dir: Callable[[Path], bool]
    list_records: Callable[[Path, str, str], list[SampleRecord]]
    split_dirs: Mapping[str, str] = field(default_factory=dict)  # the project's split -> the layout's folder
    refines: tuple[str, ...] = ()  # layouts whose folders this one's also match (LOCO is MVTec AD and more)


_MVTEC_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
READERS: tuple[Reader, ...] = (
    Reader("mvtec3d", "MVTec 3D-AD", "<class>/train/good/{rgb,xyz}/", mvtec3d.is_class_dir, mvtec3d.list_records,
           _MVTEC_SPLITS),
    Reader("mvtec_ad", "MVTec AD", "<class>/train/good/*.png", mvtec_ad.is_class_dir, mvtec_ad.list_records,
           mvtec_ad.SPLIT_DIRS),
    Reader("mvtec_ad2", "MVTec AD 2", "<class>/test_public/{good,bad}/", mvtec_ad2.is_class_dir,
           mvtec_ad2.list_records, mvtec_ad2.SPLIT_DIRS),
    Reader("mvtec_loco", "MVTec LOCO", "<class>/test/{logical,structural}_anomalies/", mvtec_loco.is_class_dir,
           mvtec_loco.list_records, mvtec_loco.SPLIT_DIRS, refines=("mvtec_ad",)),
    Reader("visa", "VisA", "<class>/Data/Images/", visa.is_class_dir, visa.list_records),
    Reader("eyecandies", "Eyecandies", "<Class>/train/data/", eyecandies.is_class_dir, eyecandies.list_records,
           eyecandies.SPLIT_DIRS),
    Reader("folder", "folder", "<class>/good/", folder.is_class_dir, folder.list_records),
    Reader("described", "described folders", f"<class>/{described.DESCRIPTION_FILE}", described.is_class_dir,
           described.list_records),
)
LAYOUTS: dict[str, Reader] = {r.layout: r for r in READERS}


@dataclass(frozen=True)
class ClassSource:
    """One product class on disk: its normalised name, folder and layout (and, for folders described on
    the command line, the description)."""

    name: str
    path: Path
    layout: Layout
    folders: FolderSpec | None = None

    def records(self, split: str) -> list[SampleRecord]:
        """The split's samples (train, validation or test); [] when the layout has no such split."""
        if self.folders is not None:
            return described.spec_records(self.folders, split, self.name)
        return LAYOUTS[self.layout].list_records(self.path, split, self.name)

    @property
    def locator(self) -> str:
        """What the store keeps to find this class's data again: its folder, or the folder description."""
        return described.encode(self.folders) if self.folders is not None else str(self.path.resolve())


def described_source(name: str, spec: FolderSpec) -> ClassSource:
    """The class that `--normal/--abnormal/--masks/--normal-test` describe."""
    return ClassSource(name, spec.normal, "described", spec)


def class_name_from_dir(dirname: str) -> str:
    """Folder name -> class name: CamelCase (Eyecandies) becomes snake_case, spaces become underscores."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", dirname.strip())
    return re.sub(r"\s+", "_", name).lower()


def layout_of(path: Path) -> Layout | None:
    """The layout `path` is a class folder of, None if none; DataError if two layouts could read it."""
    claims = [r for r in READERS if r.is_class_dir(path)]
    claims = [r for r in claims if not any(r.layout in other.refines for other in claims)]
    if len(claims) > 1:
        a, b = claims[:2]
        raise DataError(
            f"{path}: both the {a.title} layout ({a.shape}) and the {b.title} layout ({b.shape}) could read this "
            "folder; keep the folders of one layout only, or describe the class with --normal/--abnormal",
            file=path, fix="keep the folders of one layout only, or use --normal/--abnormal")
    return claims[0].layout if claims else None


def _quiet_layout(path: Path) -> Layout | None:
    try:
        return layout_of(path)
    except DataError:
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
        _refuse_split_named(path)
        return [ClassSource(class_name_from_dir(path.name), path, own)]
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        layout = layout_of(sub)
        if layout is not None:
            found.append(ClassSource(class_name_from_dir(sub.name), sub, layout))
    split_named = sorted(c.path.name for c in found if c.path.name.lower() in SPLIT_NAMES)
    if split_named:
        raise DataError(
            f"{path}: holds folders named like splits ({', '.join(split_named)}) that would be read as classes; "
            "this looks like one MVTec AD class, not a dataset: give it train/good/ images (and test/<defect>/, "
            "ground_truth/<defect>/) and pass it, or use --normal/--abnormal",
            file=path, fix="this looks like one MVTec AD class: give it train/good/ images and pass it, or use "
                           "--normal/--abnormal")
    found.sort(key=lambda c: c.name)  # protocols take classes in alphabetical order
    if not found:
        shapes = "; ".join(f"{r.title} ({r.shape})" for r in READERS)
        raise DataError(f"{path}: no class found; expected one of these layouts: {shapes}", file=path,
                        fix="arrange the data in one of the layouts, or use --normal/--abnormal")
    return found


def _refuse_split_named(path: Path) -> None:
    """A class folder called train, test, good, ... is a part of a class: refuse it, naming the class."""
    if path.name.lower() not in SPLIT_NAMES:
        return
    parent = _quiet_layout(path.parent)
    if parent is not None:
        title = LAYOUTS[parent].title
        raise DataError(f"{path}: a folder named like a split ({path.name!r}) is no class; this looks like part of "
                        f"one {title} class: pass its parent {path.parent}", file=path,
                        fix=f"this looks like one {title} class: pass its parent")
    raise DataError(f"{path}: a class folder named like a split ({path.name!r}); if it is a split of one MVTec AD "
                    "class, pass its parent (with train/good/ and test/<defect>/), else rename the folder after its "
                    "product or use --normal/--abnormal", file=path,
                    fix="this looks like one MVTec AD class: pass its parent, or use --normal/--abnormal")


def split_folder(path: Path) -> tuple[ClassSource, str] | None:
    """(class, split) when `path` is a split folder of a class (bottle/test, candy/test_public), else None."""
    path = Path(path)
    layout = _quiet_layout(path.parent)
    if layout is None:
        return None
    for split, dirname in LAYOUTS[layout].split_dirs.items():
        if path.name == dirname:
            return ClassSource(class_name_from_dir(path.parent.name), path.parent, layout), split
    return None


def require_records(source: ClassSource, split: str) -> list[SampleRecord]:
    """Like `ClassSource.records` but an empty split is an error naming the folder."""
    records = source.records(split)
    if not records:
        raise DataError(f"{source.path}: split {split!r} holds no sample; add images or pick another split",
                        file=source.path, fix="add images or pick another split")
    return records
