"""Metrics of a set of predictions in memory that does not grow with the images' resolution.

Stacking every fused map and mask of an evaluation set at the masks' resolution and sorting all their
pixels (`metrics.compute_all`) took 2-3 GB for the 112 tire test images at 800x600. Here each sample's
map is upsampled from the model's input size and its mask read one at a time, counted into
`metrics.BinnedMetrics`, and dropped: the metrics stay at the masks' full resolution (as the official
MVTec evaluation computes them), and memory is the bins' 24 MB plus one sample.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from iumad.data.loading import read_gt
from iumad.data.sample import SampleRecord
from iumad.eval.metrics import DEFAULT_FPR_LIMITS, BinnedMetrics
from iumad.model.detector import Prediction


def _small(maps: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """The map as the model made it (a `GridMaps`'s grid), or as given; its range bounds the upsampled map's."""
    grid = getattr(maps, "grid", None)
    return grid[key] if grid is not None else maps[key]


def prediction_metrics(preds: Sequence[Prediction], records: Sequence[SampleRecord],
                       sizes: Sequence[tuple[int, int]], key: str = "fused",
                       fpr_limits: Sequence[float] = DEFAULT_FPR_LIMITS) -> dict[str, float]:
    """`compute_all`'s metrics (exact PRO curve, read at 2^20 score bins) of each prediction's `key` map
    against its record's mask at `sizes` (the images' own)."""
    if not preds or len(preds) != len(records) or len(records) != len(sizes):
        raise ValueError(f"need one record and size per prediction; got {len(preds)}, {len(records)}, {len(sizes)}")
    lo = min(float(_small(p.maps, key).min()) for p in preds)
    hi = max(float(_small(p.maps, key).max()) for p in preds)
    acc = BinnedMetrics(lo, hi)
    for p, rec, size in zip(preds, records, sizes):
        acc.add(p.maps[key], read_gt(rec, tuple(size)))
    return acc.result(fpr_limits)


def image_maxima(preds: Sequence[Prediction], key: str = "fused") -> np.ndarray:
    """Each prediction's `key` map's maximum at its sample's resolution (compute_all's image score)."""
    return np.array([float(np.max(p.maps[key])) for p in preds])
