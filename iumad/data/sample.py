"""The one sample type every reader returns and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

GeometryKind = Literal["xyz", "depth"]
SPLITS = ("train", "validation", "test")  # the project's split names, whatever a layout calls them


@dataclass
class Sample:
    """One inspected part.

    rgb: HxWx3 uint8, or None for a geometry-only class.
    geometry: organized xyz HxWx3 float32 in metres (missing points are (0,0,0)), or depth HxW float32 in
        metres (missing = 0), or None for an RGB-only class. `geometry_kind` says which.
    valid: HxW bool, True where the geometry holds a measured point (all False-free if no geometry).
    gt: HxW bool defect mask, or None when unknown (train data, or a test image without a mask).
    label: "good" or the defect type.
    """

    class_name: str
    label: str
    rgb: np.ndarray | None = None
    geometry: np.ndarray | None = None
    geometry_kind: GeometryKind | None = None
    valid: np.ndarray | None = None
    gt: np.ndarray | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    split: str = "train"

    @property
    def is_anomalous(self) -> bool:
        return self.label != "good"

    @property
    def modalities(self) -> tuple[str, ...]:
        mods = []
        if self.rgb is not None:
            mods.append("rgb")
        if self.geometry is not None:
            mods.append("geometry")
        return tuple(mods)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of whichever modality is present."""
        arr = self.rgb if self.rgb is not None else self.geometry
        if arr is None:
            raise ValueError(f"sample {self.paths} has no modality")
        return int(arr.shape[0]), int(arr.shape[1])


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample lives on disk, before any pixel is read.

    Readers list records cheaply; `iumad.data.load_sample` turns one into a `Sample`. Keeping the two
    apart lets callers hash files for caches and prove which files a step read.
    """

    class_name: str
    split: str
    label: str
    rgb: Path | None = None
    geometry: Path | None = None
    geometry_kind: GeometryKind | None = None
    gt: Path | None = None
    depth_range: tuple[float, float] | None = None  # Eyecandies: (min, max) metres for 16-bit depth
    more_gt: tuple[Path, ...] = ()  # further masks of the same image, merged with gt (MVTec LOCO: one per defect)
    defect_kind: str | None = None  # MVTec LOCO: "logical" or "structural"; None where a layout has no kinds

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, p in (("rgb", self.rgb), ("geometry", self.geometry)) if p is not None)

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.rgb, self.geometry, self.gt, *self.more_gt) if p is not None]
