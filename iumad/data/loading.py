"""Turn a `SampleRecord` into a validated `Sample`: every modality read, sizes cross-checked.

For the backbone, a sample is read at its input size (`load_sample(record, size)`): the RGB image
bilinearly (the backbone's own resize), the geometry by nearest neighbour (every point one the sensor
measured) before any full-size float array exists, so what a batch holds does not grow with the
camera's resolution. A full-size MVTec 3D-AD file read at 224 gives the same arrays as the shared
224 px copy of it (`tests/test_memory_bound.py`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from iumad.data.io import (image_size, read_depth_png, read_geometry_tiff, read_mask, read_rgb,
                           resample_nearest, validity)
from iumad.data.sample import Sample, SampleRecord
from iumad.errors import DataError


def load_sample(record: SampleRecord, size: int | None = None) -> Sample:
    """Read one sample's files; raise DataError naming the file on any inconsistency. With `size`, rgb
    and geometry come at size x size (see the module docstring) and the gt is not read."""
    rgb = read_rgb(record.rgb, size) if record.rgb is not None else None
    geometry = kind = valid = None
    if record.geometry is not None:
        geometry, kind = _read_geometry(record, size)
        valid = validity(geometry)
        if not valid.any():
            raise DataError(
                f"{record.geometry}: geometry has no valid point (all missing, zero or NaN); "
                "remove the sample or re-export its point cloud",
                file=record.geometry, fix="remove the sample or re-export its point cloud",
            )
        if rgb is not None:  # at a size, both files were resampled: their headers give the sizes they have
            _check_same_size(record, *((rgb.shape[:2], geometry.shape[:2]) if size is None else
                                       (image_size(record.rgb), image_size(record.geometry))))
    if rgb is None and geometry is None:
        raise DataError(f"sample of class {record.class_name!r} has neither rgb nor geometry; check the layout")
    shape = (rgb if rgb is not None else geometry).shape[:2]
    gt = read_masks(record, shape) if record.gt is not None and size is None else None
    if gt is None and size is None and record.label == "good" and record.split == "test":
        gt = np.zeros(shape, dtype=bool)
    paths = {name: p for name, p in (("rgb", record.rgb), ("geometry", record.geometry), ("gt", record.gt))
             if p is not None}
    return Sample(
        class_name=record.class_name,
        label=record.label,
        rgb=rgb,
        geometry=geometry,
        geometry_kind=kind,
        valid=valid,
        gt=gt,
        paths=paths,
        split=record.split,
    )


def at_size(sample: Sample, size: int) -> Sample:
    """An already loaded sample as `load_sample(record, size)` would have read it (the same arrays), its
    gt dropped; the sample itself when it is already size x size."""
    if sample.size == (size, size):
        return sample
    rgb = None
    if sample.rgb is not None:
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(sample.rgb)).resize((size, size), Image.BILINEAR))
    geometry = None if sample.geometry is None else resample_nearest(sample.geometry, size)
    valid = None if geometry is None else validity(geometry)
    return dataclasses.replace(sample, rgb=rgb, geometry=geometry, valid=valid, gt=None)


def _check_same_size(record: SampleRecord, rgb: tuple[int, ...], geometry: tuple[int, ...]) -> None:
    if tuple(rgb) != tuple(geometry):
        raise DataError(
            f"{record.geometry}: geometry is {geometry[1]}x{geometry[0]} but "
            f"{record.rgb.name} is {rgb[1]}x{rgb[0]}; rgb and geometry must have the same size",
            file=record.geometry,
        )


def _read_geometry(record: SampleRecord, size: int | None = None) -> tuple[np.ndarray, str]:
    path = record.geometry
    assert path is not None
    if path.suffix.lower() == ".png":
        return read_depth_png(path, record.depth_range, size=size), "depth"
    geometry, kind = read_geometry_tiff(path, size)
    if record.geometry_kind is not None and kind != record.geometry_kind:
        want = "HxWx3 xyz points" if record.geometry_kind == "xyz" else "HxW depth"
        raise DataError(f"{path}: holds {kind} data of shape {geometry.shape}; this layout expects {want}",
                        file=path)
    return geometry, kind


def record_size(record: SampleRecord) -> tuple[int, int]:
    """(H, W) of a record's images from their headers."""
    return image_size(record.rgb if record.rgb is not None else record.geometry)


def read_masks(record: SampleRecord, shape: tuple[int, int]) -> np.ndarray:
    """The record's masks merged (MVTec LOCO keeps one file per defect): defective where any is non-zero."""
    assert record.gt is not None
    mask = read_mask(record.gt, shape)
    for more in record.more_gt:
        mask |= read_mask(more, shape)
    return mask


def read_gt(record: SampleRecord, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask of a test record; all-False for a good sample without a mask file. A defective
    sample without one is an error here: callers that accept image-level labels never ask for its mask
    (see `iumad.data.labels`)."""
    if record.gt is not None:
        return read_masks(record, shape)
    if record.label != "good":
        raise DataError(f"{record.rgb or record.geometry}: defective test sample without a gt mask; add it, or "
                        "evaluate the class on image-level labels (--image-labels)",
                        file=record.rgb or record.geometry, fix="add its gt mask, or pass --image-labels")
    return np.zeros(shape, dtype=bool)
