"""Where a class's object lies in its images, found from its normal photographs alone.

A class with geometry knows its object (the points off the background plane). An RGB-only class does
not, and on tire half of the held-out normals scored highest in the speckled background around the
part. Most inspection photographs show a textured part on a plainer background in a fixed place, so
the local spread of luminance averaged over the class's normals outlines the part. When it does not
(texture everywhere, or no texture at all), there is no region and the whole image is scored.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

MIN_CONTRAST = 3.0  # mean texture inside the region over outside it; below: no plain background to leave out
SHARE = (0.01, 0.9)  # the region's share of the image, else no region


def texture_map(images: Sequence[np.ndarray], sigma: float = 4.0) -> np.ndarray:
    """(H, W): the local spread of luminance (Gaussian window `sigma` px), averaged over the images."""
    acc = np.zeros(images[0].shape[:2])
    for image in images:
        lum = np.asarray(image, dtype=np.float64).mean(-1)
        mean = ndimage.gaussian_filter(lum, sigma)
        acc += np.sqrt(np.maximum(ndimage.gaussian_filter(lum ** 2, sigma) - mean ** 2, 0))
    return acc / len(images)


def textured_region(images: Sequence[np.ndarray], sigma: float = 4.0, factor: float = 2.0) -> np.ndarray:
    """(H, W) bool: where the images have more than `factor` times the median texture (`texture_map`)."""
    acc = texture_map(images, sigma)
    return acc > factor * np.median(acc)


def object_region(images: Sequence[np.ndarray], sigma: float = 4.0, factor: float = 2.0) -> np.ndarray | None:
    """(H, W) bool: the `textured_region` of a class's normal images, or None where it does not stand out
    from the rest of the image (`MIN_CONTRAST`) or covers too little or too much of it (`SHARE`)."""
    acc = texture_map(images, sigma)
    region = acc > factor * np.median(acc)
    if not SHARE[0] <= region.mean() <= SHARE[1]:
        return None
    return region if acc[region].mean() >= MIN_CONTRAST * max(acc[~region].mean(), 1e-9) else None
