"""Described folders (anomalib's Folder convention): say which folder holds what, instead of a layout.

  normal:       normal images, the training split (required)
  abnormal:     defective test images (label "abnormal")
  masks:        their masks, `<id>.png`, `<id>_mask.png` or a folder `<id>/` of masks per image
  normal_test:  normal test images (needed with abnormal: without them no I-AUROC can be measured)

Given as `iumad add-class NAME --normal DIR [--abnormal DIR --masks DIR --normal-test DIR]`, or as these
keys in `iumad-data.yaml` inside the class folder (paths relative to it). Images are RGB, read directly
in each folder. A description from the command line is stored with the class's evaluation set as a
locator string (`encode`), so later steps re-read the same folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from iumad.data.labelfolders import good_records, images_by_stem, masks_in
from iumad.data.sample import SampleRecord
from iumad.errors import DataError

DESCRIPTION_FILE = "iumad-data.yaml"
KEYS = ("normal", "abnormal", "masks", "normal_test")
OPTIONS = {"normal": "--normal", "abnormal": "--abnormal", "masks": "--masks", "normal_test": "--normal-test"}
LOCATOR_PREFIX = "folders:"
ABNORMAL = "abnormal"


@dataclass(frozen=True)
class FolderSpec:
    """Which folder holds what; `where` names the description (the YAML file, or "the command line")."""

    normal: Path
    abnormal: Path | None = None
    masks: Path | None = None
    normal_test: Path | None = None
    where: str = "the command line"

    def folders(self) -> dict[str, Path]:
        return {k: v for k in KEYS if (v := getattr(self, k)) is not None}


def make_spec(folders: dict[str, Path | None], where: str = "the command line",
              base: Path | None = None) -> FolderSpec:
    """Check a description: `normal` given, every folder a folder, none given twice, masks only with
    abnormal images. `base` resolves relative paths (the YAML file's folder)."""
    named = {k: (Path(base) / v if base is not None else Path(v)) for k, v in folders.items() if v is not None}
    cite = (lambda k: OPTIONS[k]) if base is None else (lambda k: k)
    if "normal" not in named:
        raise DataError(f"{where}: gives no {cite('normal')} folder of normal training images; add it",
                        file=None if base is None else where, fix=f"add {cite('normal')}")
    for key, path in named.items():
        if not _is_dir(path):
            raise DataError(f"{path}: {cite(key)} is not a folder; check {cite(key)}", file=path,
                            fix=f"check {cite(key)}")
    if "masks" in named and "abnormal" not in named:
        raise DataError(f"{named['masks']}: masks without {cite('abnormal')} images; add {cite('abnormal')} or drop "
                        f"{cite('masks')}", file=named["masks"], fix=f"add {cite('abnormal')}")
    seen: dict[Path, str] = {}
    for key, path in named.items():
        real = path.resolve()
        if real in seen:
            raise DataError(f"{path}: given as both {cite(seen[real])} and {cite(key)}; each folder holds one kind "
                            "of image", file=path, fix="give each kind of image its own folder")
        seen[real] = key
    return FolderSpec(where=where, **named)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system
        return False


def is_class_dir(path: Path) -> bool:
    return (path / DESCRIPTION_FILE).is_file()


def read_spec(class_dir: Path) -> FolderSpec:
    """The description in `class_dir/iumad-data.yaml`."""
    path = class_dir / DESCRIPTION_FILE
    data = _read_yaml(path)
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        key = unknown[0][:40] if isinstance(unknown[0], str) else f"<{type(unknown[0]).__name__}>"
        raise DataError(f"{path}: unknown key {key!r}; the keys are {', '.join(KEYS)}", file=path,
                        fix=f"use the keys {', '.join(KEYS)}")
    folders: dict[str, Path | None] = {}
    for key, value in data.items():
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            raise DataError(f"{path}: {key} must be a folder path, got {type(value).__name__}; fix the key",
                            file=path, fix="fix the key")
        folders[key] = Path(value.strip())
    return make_spec(folders, where=str(path), base=class_dir)


def list_records(class_dir: Path, split: str, class_name: str) -> list[SampleRecord]:
    return spec_records(read_spec(class_dir), split, class_name)


def spec_records(spec: FolderSpec, split: str, class_name: str) -> list[SampleRecord]:
    """train: the normal images; test: normal_test and abnormal images with their masks; no validation."""
    if split == "train":
        return good_records(spec.normal, class_name, "train")
    if split != "test":
        return []
    records = good_records(spec.normal_test, class_name, "test") if spec.normal_test is not None else []
    if spec.abnormal is None:
        return records
    images = images_by_stem(spec.abnormal)
    masks = masks_in(spec.masks) if spec.masks is not None else {}
    orphan = next((k for k in masks if k not in images), None)
    if orphan is not None:
        where = masks[orphan][0]
        raise DataError(f"{where}: a mask without its image {spec.abnormal}/{orphan}.*; add the image or remove "
                        "the mask", file=where, fix="add the image or remove the mask")
    for stem, image in images.items():
        files = masks.get(stem, ())
        records.append(SampleRecord(class_name=class_name, split="test", label=ABNORMAL, rgb=image,
                                    gt=files[0] if files else None, more_gt=files[1:]))
    return records


def encode(spec: FolderSpec) -> str:
    """The locator string of a description (absolute paths), as the store keeps an evaluation set's root."""
    return LOCATOR_PREFIX + json.dumps({k: str(v.resolve()) for k, v in spec.folders().items()}, sort_keys=True)


def is_locator(text: str) -> bool:
    return text.startswith(LOCATOR_PREFIX)


def decode(text: str) -> FolderSpec:
    """The description a locator string names, checked again (its folders may have gone since)."""
    try:
        folders = json.loads(text[len(LOCATOR_PREFIX):])
        if not isinstance(folders, dict) or not all(k in KEYS and isinstance(v, str) for k, v in folders.items()):
            raise ValueError("not a mapping of folder keys to paths")
    except ValueError as exc:
        raise DataError(f"stored folder description {text[:120]!r} is malformed ({exc}); register the evaluation "
                        "set again with --test", fix="register the evaluation set again") from None
    return make_spec({k: Path(v) for k, v in folders.items()}, where="the stored folder description")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():  # a FIFO or device would block or never end
        raise DataError(f"{path}: not a regular file; write the description as a YAML file", file=path,
                        fix="write the description as a YAML file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or type(exc).__name__}); check the file", file=path,
                        fix="check the file") from None
    except RecursionError:
        raise DataError(f"{path}: malformed YAML (nested too deeply); fix the file", file=path,
                        fix="fix the file") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: bad UTF-8
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"{path}: malformed YAML ({first}); fix the file", file=path, fix="fix the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of {', '.join(KEYS)}, got {type(data).__name__}; fix the file",
                        file=path, fix="fix the file")
    return data
