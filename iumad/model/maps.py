"""Token scores -> anomaly maps: upsampling and smoothing, the scored region, and image scores.

A token map T becomes A @ T @ A.T at the input size, where A is bilinear upsampling followed by Gaussian
smoothing along one axis (both linear and separable). Pixels farther than a few pixels from the object
(when the geometry gives a foreground) are not scored: they get the map's minimum on the object.

Maps stay at the input size (S x S) in a prediction (`GridMaps`) and reach the sample's own resolution
only when read, one at a time, so what a set of predictions holds does not grow with the camera's
resolution.
"""

from __future__ import annotations

import functools
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from iumad.data.geometry import cross_dilation


@functools.lru_cache(maxsize=16)
def _map_operator(grid: int, size: int, sigma: float) -> torch.Tensor:
    """(size, grid): bilinear upsampling (align_corners=False), then Gaussian smoothing with reflect
    padding (radius 4 sigma), along one axis: two small matrix products instead of upsampling and then
    two 33-tap convolutions over the full map."""
    up = F.interpolate(torch.eye(grid)[None], size=size, mode="linear", align_corners=False)[0]  # row j: U[:, j]
    if sigma > 0:
        radius = max(1, int(4 * sigma + 0.5))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        up = F.conv1d(F.pad(up[:, None], (radius, radius), mode="reflect"), (k / k.sum()).view(1, 1, -1))[:, 0]
    return up.t().contiguous()


def token_maps_to_image(tokens: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B, G, G) per-token scores -> (B, size, size) maps, upsampled bilinearly and smoothed (sigma in
    pixels of the output)."""
    a = _map_operator(tokens.shape[-1], size, float(sigma))
    return a @ tokens.float() @ a.t()


def tokens_reaching(region: torch.Tensor, grid: int, sigma: float) -> torch.Tensor:
    """(B, S, S) bool scored pixels -> (B, G, G) bool: the tokens whose value reaches one of them through
    `token_maps_to_image`. The others cannot change a scored pixel, so their retrieval search is skipped
    (about half the tokens on an MVTec 3D object). A sample without scored pixels needs every token."""
    support = (_map_operator(grid, region.shape[-1], float(sigma)) != 0).float()  # (S, G)
    reach = (support.t() @ region.float() @ support) > 0
    reach[~region.flatten(1).any(1)] = True
    return reach


def score_region(foregrounds: Sequence[np.ndarray | None], size: int, dilation: int) -> torch.Tensor | None:
    """(B, S, S) bool: pixels within `dilation` px of the object; every pixel of a sample without a
    foreground (None when no sample has one), so a sample's maps do not depend on its batch."""
    if all(f is None for f in foregrounds):
        return None
    shape = next(f.shape for f in foregrounds if f is not None)
    region = torch.from_numpy(cross_dilation(np.stack([np.ones(shape, dtype=bool) if f is None else f
                                                       for f in foregrounds]), dilation))
    if region.shape[-1] != size:
        region = F.interpolate(region[:, None].float(), size=(size, size), mode="nearest")[:, 0] > 0.5
    return region


def floor_outside(maps: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """(B, S, S) maps with every pixel outside the region set to the map's minimum inside it."""
    if region is None:
        return maps
    floor = maps.masked_fill(~region, float("inf")).amin(dim=(1, 2))
    floor = torch.where(torch.isfinite(floor), floor, maps.amin(dim=(1, 2)))
    return torch.where(region, maps, floor[:, None, None])


def image_scores(maps: np.ndarray, reduce: str = "max", topk: float = 0.01) -> np.ndarray:
    """(B, H, W) -> (B,) image scores: the maximum, or the mean of the top `topk` share of pixels."""
    flat = maps.reshape(len(maps), -1)
    if reduce == "topk":
        k = max(1, int(topk * flat.shape[1]))
        return np.partition(flat, -k, axis=1)[:, -k:].mean(1)
    return flat.max(1)


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) float32 map -> (H, W) float32, bilinear (align_corners=False)."""
    if tuple(grid_map.shape) == tuple(size):
        return grid_map
    t = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


class GridMaps(Mapping[str, np.ndarray]):
    """A prediction's maps: kept at the model's input size (`grid`), read at the sample's `size`.

    Each read upsamples one map (`upsample`) and keeps nothing, so a prediction holds S*S floats per map
    whatever the image's resolution; `grid` and `size` serve callers that want the small maps."""

    def __init__(self, grid: Mapping[str, np.ndarray], size: tuple[int, int]) -> None:
        self.grid = dict(grid)
        self.size = (int(size[0]), int(size[1]))

    def __getitem__(self, key: str) -> np.ndarray:
        return upsample(self.grid[key], self.size)

    def __iter__(self) -> Iterator[str]:
        return iter(self.grid)

    def __len__(self) -> int:
        return len(self.grid)

    def __repr__(self) -> str:
        grid = next(iter(self.grid.values())).shape if self.grid else None
        return f"GridMaps({list(self.grid)}, grid {grid}, size {self.size})"
