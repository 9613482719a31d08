"""Defects painted onto real normal images, for tuning on a real class without its test split.

A real class's test split is for reporting only. To choose a setting for real photographs (resolution,
masking, fusion) we need anomalies on images of that class that no reported number comes from: its held-out
training normals, each with one painted defect and its mask. The families imitate the common
industrial kinds (DRAEM, CutPaste):

* ``patch``: a square cut from another normal image of the class, turned by a multiple of 90 degrees
  and pasted elsewhere (CutPaste): the class's own texture in the wrong place;
* ``hole``: an irregular blob darkened (a hole or a missing piece);
* ``stain``: an irregular blob blended with a foreign colour (contamination);
* ``scratch``: a thin polyline, dark or bright (a cut).

Sizes are drawn relative to the image's shorter side (`scale` = the defect's diameter as a share of it),
so small-defect classes can be imitated with a small scale. Everything comes from the given generator.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FAMILIES = ("patch", "hole", "stain", "scratch")


def _blob(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    """(H, W) bool: an irregular blob of about `radius` px around `centre` (a disc whose edge is shifted by
    smoothed noise)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.hypot(yy - centre[0], xx - centre[1]) / max(radius, 1.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(radius / 3, 1.0))
    noise /= np.abs(noise).max() + 1e-8
    return d + 0.5 * noise < 1.0


def _scratch(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[int, int], length: float,
             width: float) -> np.ndarray:
    """(H, W) bool: a three-segment polyline of about `length` px through `centre`, `width` px wide."""
    angle = rng.uniform(0, np.pi)
    pts = [np.array(centre, float)]
    for _ in range(3):
        angle += rng.uniform(-0.5, 0.5)
        pts.append(pts[-1] + length / 3 * np.array([np.sin(angle), np.cos(angle)]))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    p = np.stack([yy, xx], -1).astype(float)
    dist = np.full(shape, np.inf)
    for a, b in zip(pts[:-1], pts[1:]):
        ab = b - a
        t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-8), 0, 1)
        dist = np.minimum(dist, np.linalg.norm(p - (a + t[..., None] * ab), axis=-1))
    return dist <= width / 2


def paint_defect(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, family: str,
                 scale: tuple[float, float] = (0.03, 0.08), where: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One painted defect: (H, W, 3) uint8 image and another normal image of the class (the patch's
    source) -> (the defective image, its (H, W) bool mask). `where` (H, W) bool: allowed defect centres
    (the object, when known); anywhere when None or empty."""
    if family not in FAMILIES:
        raise ValueError(f"unknown defect family {family!r}; choose from {', '.join(FAMILIES)}")
    h, w = image.shape[:2]
    size = rng.uniform(*scale) * min(h, w)
    allowed = np.argwhere(where) if where is not None and where.any() else None
    centre = tuple(allowed[rng.integers(len(allowed))]) if allowed is not None else \
        (int(rng.integers(h)), int(rng.integers(w)))
    out = image.astype(np.float32)
    if family == "patch":
        half = max(int(size / 2), 2)
        sy, sx = int(rng.integers(half, h - half)), int(rng.integers(half, w - half))
        patch = np.rot90(donor[sy - half: sy + half, sx - half: sx + half], int(rng.integers(1, 4)))
        cy, cx = np.clip(centre[0], half, h - half), np.clip(centre[1], half, w - half)
        mask = np.zeros((h, w), bool)
        mask[cy - half: cy + half, cx - half: cx + half] = True
        out[mask] = patch.reshape(-1, image.shape[2]).astype(np.float32)
    elif family == "scratch":
        mask = _scratch(rng, (h, w), centre, 2 * size, max(1.5, size / 8))
        tone = rng.uniform(0.1, 0.4) if rng.random() < 0.5 else rng.uniform(1.8, 3.0)
        out[mask] = np.clip(out[mask] * tone + (20 if tone > 1 else 0), 0, 255)
    else:
        mask = _blob(rng, (h, w), centre, size / 2)
        if family == "hole":
            out[mask] *= rng.uniform(0.05, 0.35)
        else:
            colour = rng.uniform(0, 255, size=image.shape[2]).astype(np.float32)
            alpha = rng.uniform(0.5, 0.9)
            out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return np.clip(out, 0, 255).astype(np.uint8), mask
