"""Shared test fixtures: where ../shared lives, and small writers for dataset files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

SHARED = Path(os.environ.get("IUMAD_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip: the real MVTec 3D-AD files are not part of the repository."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (set IUMAD_SHARED to the folder beside the checkout)")
    return data


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_tiff(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="contig")
    return path


def scene(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tiny rgb image and organized xyz cloud (a box on a plane, a few missing points)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32)
    z = np.full((size, size), 0.6, np.float32)
    z[size // 4: 3 * size // 4, size // 4: 3 * size // 4] -= 0.01
    xyz = np.stack([(u - size / 2) * 1e-3, (v - size / 2) * 1e-3, z], -1).astype(np.float32)
    xyz[0, :3] = 0.0
    return rgb, xyz
