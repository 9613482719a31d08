"""Eyecandies layout: <Class>/{train,val,test_public}/data/<id>_{image_0..5,depth,normals,mask}.png.

Depth PNGs are 16-bit; `<id>_info_depth.yaml` gives `normalization: {min, max}` so that
depth_m = png / 65535 * (max - min) + min. `<id>_metadata.yaml` says whether the sample is anomalous and
which anomaly kinds it holds (bumps, colors, dents, normals).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

from iumad.data.sample import SampleRecord
from iumad.errors import DataError

SPLIT_DIRS = {"train": "train", "validation": "val", "test": "test_public"}
ANOMALY_KINDS = ("bumps", "colors", "dents", "normals")
DEFAULT_LIGHT = 4
_IMAGE_RE = re.compile(r"^(?P<id>.+)_image_(?P<light>\d+)\.png$")


def is_class_dir(path: Path) -> bool:
    return (path / "train" / "data").is_dir() or (path / "test_public" / "data").is_dir()


def list_records(class_dir: Path, split: str, class_name: str, light: int = DEFAULT_LIGHT) -> list[SampleRecord]:
    """List one split's samples; `light` picks which of the six lighting images is the rgb input."""
    if split not in SPLIT_DIRS:
        raise DataError(f"{class_dir}: unknown split {split!r}; use one of {', '.join(SPLIT_DIRS)}")
    data = class_dir / SPLIT_DIRS[split] / "data"
    if not data.is_dir():
        return []
    ids = sorted({m["id"] for p in data.iterdir() if (m := _IMAGE_RE.match(p.name))})
    records = []
    for sid in ids:
        rgb = data / f"{sid}_image_{light}.png"
        depth = data / f"{sid}_depth.png"
        for need in (rgb, depth):
            if not need.is_file():
                raise DataError(f"{need}: missing; every Eyecandies sample needs image_{light} and depth PNGs")
        info = _read_yaml(data / f"{sid}_info_depth.yaml")
        try:
            norm = info["normalization"]
            depth_range = (float(norm["min"]), float(norm["max"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise DataError(
                f"{data / f'{sid}_info_depth.yaml'}: lacks normalization: {{min, max}}; re-export the sample"
            ) from None
        if not all(math.isfinite(v) for v in depth_range):
            raise DataError(f"{data / f'{sid}_info_depth.yaml'}: normalization {{min, max}} must be finite "
                            f"numbers, got {depth_range}; re-export the sample")
        label = _label(data / f"{sid}_metadata.yaml", split)
        mask = data / f"{sid}_mask.png"
        records.append(SampleRecord(
            class_name=class_name, split=split, label=label, rgb=rgb, geometry=depth,
            geometry_kind="depth", gt=mask if (split == "test" and mask.is_file()) else None,
            depth_range=depth_range,
        ))
    return records


def _label(path: Path, split: str) -> str:
    if not path.is_file():
        if split == "test":
            raise DataError(f"{path}: missing; test samples need their metadata to know if they are anomalous")
        return "good"
    meta = _read_yaml(path)
    if not _truthy(meta.get("anomalous", 0)):
        return "good"
    kinds = [k for k in ANOMALY_KINDS if _truthy(meta.get(k, 0))]
    return "+".join(kinds) if kinds else "anomalous"


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():  # a FIFO or device would block or never end; a directory or loop is no file
        what = "not a regular file" if path.exists() or path.is_symlink() else "missing"
        raise DataError(f"{path}: {what}; every Eyecandies sample needs it")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; every Eyecandies sample needs it") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or type(exc).__name__}); re-export the file") from None
    except RecursionError:
        raise DataError(f"{path}: malformed YAML (nested too deeply); re-export the file") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: bad UTF-8, an int beyond Python's digit limit
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"{path}: malformed YAML ({first}); re-export the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a YAML mapping, got {type(data).__name__}; re-export the file")
    return data
