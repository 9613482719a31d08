"""Procedural synthetic multimodal (RGB + xyz) anomaly dataset in the MVTec 3D-AD layout.

Every sample is rendered from a height field in millimetres above a slightly tilted background plane seen
by a camera looking straight down from ~0.6 m:

* geometry: organized point cloud (HxWx3 float32, metres, MVTec 3D-AD convention) with sensor noise in z and
  missing points exactly (0, 0, 0): dropouts at steep edges, a projector shadow beside tall parts, random
  patches and salt;
* RGB: per-class albedo texture shaded by a randomly placed light (Lambert + specular, cast shadows,
  vignetting, colour gain jitter, pixel noise).

Normal variation per sample: rotation, small translation and scale, shape jitter (blob, cookie, ring),
light direction/intensity/colour, texture noise, background-plane tilt and distance, sensor noise and holes.

Defects come in three families, present in every class:

* ``rgb``: visible in RGB only (``stain``, ``color``); the xyz file is byte-identical to the defect-free twin;
* ``geometry``: visible in geometry only (``dent``, ``bump``); the RGB image is byte-identical to the twin
  (shading is taken from the defect-free surface, so a 2D model cannot see it);
* ``both``: visible in both (``crack``, ``hole``, ``cut`` = missing piece).

Randomness: one ``numpy`` generator per sample, seeded by ``(seed, crc32(class), split, index)``, split into a
scene stream and a defect stream, so a sample's pose/lighting/noise never depend on its defect, on the
number of classes, or on how the work is spread over processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion, distance_transform_edt, gaussian_filter, map_coordinates

from iumad.errors import UsageError

GENERATOR = "iumad.synth"
GENERATOR_VERSION = "1.0"

CLASS_NAMES: tuple[str, ...] = (
    "disc", "ring", "bolt", "tile", "cylinder", "blob", "gear", "washer", "hexnut", "bracket", "cookie", "star",
)
"""Fixed order; ``n_classes=N`` takes the first N."""

DEFECT_FAMILIES: dict[str, str] = {
    "stain": "rgb",
    "color": "rgb",
    "dent": "geometry",
    "bump": "geometry",
    "crack": "both",
    "hole": "both",
    "cut": "both",
}
"""Defect type -> family: ``rgb`` (RGB only), ``geometry`` (geometry only) or ``both``."""

DEFECT_TYPES: tuple[str, ...] = tuple(DEFECT_FAMILIES)

SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}

FOV_MM = 60.0
"""Field of view (image side) at the reference distance, millimetres; objects keep their physical size."""
Z_REF_M = 0.6
"""Reference camera distance to the background plane, metres."""
Z_NOISE_MM = 0.04
"""Sensor noise (std) in z, millimetres."""
RGB_NOISE = 1.5 / 255.0
MANIFEST = "synth.json"


# ----------------------------------------------------------------------------------------------------------
# small helpers


def _ramp(d: np.ndarray, w: float) -> np.ndarray:
    """0 for d <= 0, 1 for d >= w, smoothstep between (soft bevel of width w)."""
    s = np.clip(d / w, 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


_NOISE_HALF_MM = 52.0


def _vnoise(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, cell_a: float, cell_b: float | None = None) -> np.ndarray:
    """Smooth value noise (std ~1) sampled at object-local coordinates (a, b) in mm; cells in mm."""
    cell_b = cell_a if cell_b is None else cell_b
    na = int(np.ceil(2 * _NOISE_HALF_MM / cell_a)) + 3
    nb = int(np.ceil(2 * _NOISE_HALF_MM / cell_b)) + 3
    grid = rng.standard_normal((nb, na))
    ca = a / cell_a + _NOISE_HALF_MM / cell_a + 1.0
    cb = b / cell_b + _NOISE_HALF_MM / cell_b + 1.0
    out = map_coordinates(grid, [cb.ravel(), ca.ravel()], order=1, mode="nearest", prefilter=False)
    return out.reshape(a.shape) * 1.5


def _shift(a: np.ndarray, di: int, dj: int) -> np.ndarray:
    """out[i, j] = a[i + di, j + dj], zero outside."""
    out = np.zeros_like(a)
    h, w = a.shape
    if abs(di) >= h or abs(dj) >= w:
        return out
    src_i = slice(max(di, 0), h + min(di, 0))
    dst_i = slice(max(-di, 0), h + min(-di, 0))
    src_j = slice(max(dj, 0), w + min(dj, 0))
    dst_j = slice(max(-dj, 0), w + min(-dj, 0))
    out[dst_i, dst_j] = a[src_i, src_j]
    return out


def _occluded(h: np.ndarray, di: float, dj: float, rise_per_px: float, max_px: int, steps: int = 24) -> np.ndarray:
    """Soft amount by which a ray leaving each pixel along (di, dj) with slope `rise_per_px` is blocked."""
    block = np.zeros_like(h)
    if max_px < 1:
        return block
    ks = np.unique(np.linspace(1, max_px, num=min(steps, max_px)).round().astype(int))
    for k in ks:
        shifted = _shift(h, int(round(k * di)), int(round(k * dj)))
        np.maximum(block, shifted - h - k * rise_per_px, out=block)
    return block


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Pixel-centre coordinates: (x_mm, y_mm, ii, jj, pitch_mm) for a size x size image."""
    pitch = FOV_MM / size
    c = (np.arange(size, dtype=np.float64) + 0.5 - size / 2.0) * pitch
    x_mm, y_mm = np.meshgrid(c, c)
    ii, jj = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    for arr in (x_mm, y_mm, ii, jj):
        arr.flags.writeable = False
    return x_mm, y_mm, ii, jj, pitch


def _lum(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _tint(base: Sequence[float], var: np.ndarray) -> np.ndarray:
    """Albedo image = base colour x (1 + var) (var HxW or HxWx3)."""
    b = np.asarray(base, dtype=np.float64)
    if var.ndim == 2:
        var = var[..., None]
    return b * (1.0 + var)


# ----------------------------------------------------------------------------------------------------------
# classes: each returns (height mm HxW, object albedo HxWx3) from object-local coordinates X, Y (mm)


@dataclass(frozen=True)
class _Material:
    ambient: float
    diffuse: float
    specular: float
    shininess: float
    metal: bool = False
    dropout: float = 1.0  # multiplier on sensor dropouts (dark or shiny surfaces lose more points)


def _disc(X, Y, r, phi, jit, rng, grain):
    R = 20.0
    h = (5.0 + 0.8 * (1 - (r / R) ** 2)) * _ramp(R - r, 1.0)
    h -= 0.35 * np.clip(1 - np.abs(r - 10.0) / 0.5, 0, 1) * (r < R)  # engraved circle
    h += 0.6 * _ramp(1.0 - np.abs(Y), 0.3) * _ramp(X - 13.5, 0.3) * _ramp(17.0 - X, 0.3)  # orientation tab
    lathe = 0.06 * np.sin(2 * np.pi * r / 1.1 + 0.8 * _vnoise(rng, X, Y, 6.0))
    var = lathe + 0.05 * _vnoise(rng, X, Y, 3.0) + 0.03 * grain
    return h, _tint((0.70, 0.71, 0.74), var)


def _ring(X, Y, r, phi, jit, rng, grain):
    rc = 14.0 + 0.4 * jit[0] + 0.4 * jit[1] * np.cos(2 * (phi - jit[2] * np.pi))  # slightly oval, squeezed
    a = 4.5
    h = np.sqrt(np.clip(a * a - (r - rc) ** 2, 0, None))
    var = 0.18 * _vnoise(rng, X, Y, 2.0) + 0.10 * grain
    alb = _tint((0.13, 0.13, 0.15), var)
    return h, alb


def _bolt(X, Y, r, phi, jit, rng, grain):
    rs = 4.5
    shaft = np.sqrt(np.clip(rs * rs - Y * Y, 0, None)) * _ramp(22.0 - X, 0.5) * _ramp(X + 12.5, 0.3)
    thread = (X > -4.0) * (0.5 + 0.5 * np.cos(2 * np.pi * (X - 0.35 * Y) / 1.25))
    shaft = shaft * (1 - 0.08 * thread)
    ay = np.abs(Y)
    head = np.clip(7.4 - np.clip(ay - 4.3, 0, None) * 0.9, 0, None) * _ramp(8.5 - ay, 0.6)
    head = head * _ramp(X + 19.0, 0.4) * _ramp(-12.0 - X, 0.3)
    h = np.maximum(shaft, head)
    var = 0.08 * _vnoise(rng, X, Y, 4.0, 0.35) + 0.05 * _vnoise(rng, X, Y, 5.0) + 0.03 * grain
    alb = _tint((0.80, 0.62, 0.30), var)
    alb = np.where((head > shaft)[..., None], alb * 0.85, alb)  # head slightly darker (forged)
    return h, alb


def _tile(X, Y, r, phi, jit, rng, grain):
    half = 17.0
    sd = half - np.maximum(np.abs(X), np.abs(Y))
    h = 4.0 * _ramp(sd, 0.8)
    groove = np.maximum(np.clip(1 - np.abs(X) / 0.6, 0, 1), np.clip(1 - np.abs(Y) / 0.6, 0, 1)) * (sd > 1.0)
    h = h - 0.5 * groove
    cream = np.array((0.88, 0.85, 0.76))
    cobalt = np.array((0.20, 0.33, 0.68))
    quad = ((X > 0) == (Y > 0))[..., None]
    base = np.where(quad, cream, cobalt)
    speck = _vnoise(rng, X, Y, 0.5)
    var = 0.04 * _vnoise(rng, X, Y, 4.0) + 0.04 * grain - 0.35 * (speck > 2.2)
    alb = base * (1 + var[..., None])
    alb = alb * (1 - groove[..., None]) + np.array((0.58, 0.57, 0.55)) * groove[..., None]
    return h, alb


def _cylinder(X, Y, r, phi, jit, rng, grain):
    R, H = 12.0, 13.0
    h = H * _ramp(R - r, 0.4)
    h = np.minimum(h, np.clip(H - 1.0 * np.clip(r - 10.8, 0, None), 0, None))
    h = h - 2.5 * _ramp(2.5 - r, 0.3)
    var = 0.04 * _vnoise(rng, X, Y, 5.0) + 0.025 * grain + 0.04 * np.sin(2 * np.pi * r / 2.0) * (r < 10.5)
    return h, _tint((0.16, 0.36, 0.78), var)


def _blob(X, Y, r, phi, jit, rng, grain):
    rb = 16.0 * (1 + 0.12 * np.cos(2 * (phi - jit[0])) + 0.07 * np.cos(3 * (phi - jit[1]))
                 + 0.04 * np.cos(5 * phi + 2 * jit[2]))
    rr = r / rb
    h = (9.0 + 0.5 * jit[3]) * np.sqrt(np.clip(1 - rr * rr, 0, None))
    h = h * (1 + 0.04 * _vnoise(rng, X, Y, 6.0))
    mix = np.clip(0.5 + 0.5 * _vnoise(rng, X, Y, 7.0), 0, 1)[..., None]
    base = np.array((0.42, 0.62, 0.22)) * (1 - mix) + np.array((0.72, 0.55, 0.18)) * mix
    spots = np.clip((_vnoise(rng, X, Y, 0.9) - 1.6) * 2.0, 0, 1)
    var = 0.06 * grain - 0.35 * spots
    return h, base * (1 + var[..., None])


def _gear(X, Y, r, phi, jit, rng, grain):
    n = 14
    tooth = np.clip(2.0 * np.cos(n * phi), -1, 1)
    rb = 15.5 + 2.0 * tooth
    h = 5.0 * _ramp(rb - r, 0.35)
    h = h - 1.2 * _ramp(r - 9.0, 0.5) * _ramp(13.0 - r, 0.5)
    h = h + 1.5 * _ramp(7.5 - r, 0.4)
    h = h * _ramp(r - 3.5, 0.3)
    for k in range(5):
        a = 2 * np.pi * k / 5
        d = np.hypot(X - 11.0 * np.cos(a), Y - 11.0 * np.sin(a))
        h = h * _ramp(d - 1.8, 0.3)
    var = 0.09 * _vnoise(rng, X, Y, 5.0, 0.3) + 0.03 * grain
    return h, _tint((0.38, 0.40, 0.44), var)


def _washer(X, Y, r, phi, jit, rng, grain):
    h = 1.6 * _ramp(17.0 - r, 0.3) * _ramp(r - 5.5, 0.3)
    spangle = np.round(_vnoise(rng, X, Y, 2.2) * 1.5) / 1.5
    var = 0.10 * np.clip(spangle, -1.5, 1.5) + 0.03 * grain
    return h, _tint((0.78, 0.80, 0.84), var)


def _hexnut(X, Y, r, phi, jit, rng, grain):
    d = np.maximum.reduce([np.abs(X * np.cos(k * np.pi / 3) + Y * np.sin(k * np.pi / 3)) for k in range(3)])
    H = 7.5
    h = H * _ramp(14.0 - d, 0.4)
    h = np.minimum(h, np.clip(H - 1.2 * np.clip(r - 13.2, 0, None), 0, None))
    h = np.minimum(h, np.clip(H - 1.0 * np.clip(8.3 - r, 0, None), 0, None))
    h = h * _ramp(r - 7.0, 0.3)
    hue = _vnoise(rng, X, Y, 8.0)
    alb = np.array((0.86, 0.74, 0.30)) * (1 + 0.03 * grain[..., None])
    alb = alb * (1 + np.stack([0.10 * hue, 0.02 * hue, -0.25 * hue], axis=-1))
    return h, alb


def _rect_sd(X, Y, cx, cy, hx, hy):
    return np.minimum(hx - np.abs(X - cx), hy - np.abs(Y - cy))


def _seg_dist(X, Y, ax, ay, bx, by):
    dx, dy = bx - ax, by - ay
    t = np.clip(((X - ax) * dx + (Y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(X - ax - t * dx, Y - ay - t * dy)


def _bracket(X, Y, r, phi, jit, rng, grain):
    sd = np.maximum(_rect_sd(X, Y, 0.0, -12.5, 17.0, 4.5), _rect_sd(X, Y, -12.5, 0.0, 4.5, 17.0))
    h = 3.0 * _ramp(sd, 0.4)
    bead = np.maximum(np.clip(1 - (_seg_dist(X, Y, -6.0, -12.5, 5.0, -12.5) / 1.6) ** 2, 0, None),
                      np.clip(1 - (_seg_dist(X, Y, -12.5, -6.0, -12.5, 5.0) / 1.6) ** 2, 0, None))
    h = h + 1.2 * bead * (sd > 0.5)
    for cx, cy in ((9.0, -12.5), (-12.5, 9.0)):
        h = h * _ramp(np.hypot(X - cx, Y - cy) - 2.2, 0.3)
    var = 0.05 * _vnoise(rng, X, Y, 1.2) + 0.03 * grain
    return h, _tint((0.74, 0.14, 0.11), var)


def _cookie(X, Y, r, phi, jit, rng, grain):
    rb = 18.0 * (1 + 0.035 * np.cos(3 * phi + 3 * jit[0]) + 0.025 * np.cos(5 * phi + 3 * jit[1])
                 + 0.02 * np.cos(7 * phi + 3 * jit[2]))
    base = np.sqrt(np.clip(1 - (r / rb) ** 4, 0, None))
    h = 6.0 * base
    h = h + 0.45 * _vnoise(rng, X, Y, 2.5) * _ramp(h - 0.5, 1.0)
    chips = np.clip((_vnoise(rng, X, Y, 1.6) - 1.1) / 0.25, 0, 1) * (base > 0.3)
    h = h + 0.7 * chips
    tan = np.array((0.80, 0.60, 0.34)) * (1 + (0.08 * _vnoise(rng, X, Y, 3.0) + 0.06 * grain)[..., None])
    choc = np.array((0.25, 0.14, 0.08))
    alb = tan * (1 - chips[..., None]) + choc * chips[..., None]
    return h, alb


def _star(X, Y, r, phi, jit, rng, grain):
    t = np.mod(phi * 5 / (2 * np.pi), 1.0)
    tri = 1 - 2 * np.abs(t - 0.5)
    rb = 7.5 + 11.0 * tri
    h = 1.5 * _ramp(rb - r, 0.5) + 6.5 * np.clip(1 - r / rb, 0, 1)
    var = 0.03 * _vnoise(rng, X, Y, 4.0) + 0.03 * grain
    return h, _tint((0.52, 0.24, 0.66), var)


_CLASSES: dict[str, tuple[Callable, _Material]] = {
    "disc": (_disc, _Material(0.35, 0.55, 0.35, 20, metal=True)),
    "ring": (_ring, _Material(0.35, 0.70, 0.10, 8, dropout=1.8)),
    "bolt": (_bolt, _Material(0.32, 0.55, 0.45, 30, metal=True, dropout=1.3)),
    "tile": (_tile, _Material(0.35, 0.60, 0.40, 40)),
    "cylinder": (_cylinder, _Material(0.35, 0.60, 0.25, 30)),
    "blob": (_blob, _Material(0.35, 0.65, 0.12, 10)),
    "gear": (_gear, _Material(0.32, 0.55, 0.40, 25, metal=True, dropout=1.3)),
    "washer": (_washer, _Material(0.33, 0.50, 0.55, 60, metal=True, dropout=1.5)),
    "hexnut": (_hexnut, _Material(0.33, 0.55, 0.40, 30, metal=True)),
    "bracket": (_bracket, _Material(0.35, 0.60, 0.30, 25)),
    "cookie": (_cookie, _Material(0.38, 0.65, 0.05, 6)),
    "star": (_star, _Material(0.35, 0.60, 0.45, 45)),
}
assert tuple(_CLASSES) == CLASS_NAMES


@dataclass(frozen=True)
class ClassLook:
    """A class rendered as a variant of one shape: its albedo multiplied by `tint` (RGB), its footprint
    and height by `size`. `family` names the look-alike group it belongs to (None: none)."""

    name: str
    shape: str
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size: float = 1.0
    family: str | None = None


LOOKALIKE_SHAPE = "bolt"
LOOKALIKE: tuple[tuple[str, tuple[float, float, float], float], ...] = (
    ("bolt", (1.0, 1.0, 1.0), 1.0),  # the shape as it is (brass)
    ("bolt-red", (1.15, 0.45, 0.55), 1.0),
    ("bolt-blue", (0.45, 0.75, 2.2), 1.0),
    ("bolt-green", (0.55, 1.2, 0.8), 1.0),
    ("bolt-small", (1.0, 1.0, 1.0), 0.85),
    ("bolt-large", (1.0, 1.0, 1.0), 1.15),
)
"""The look-alike family of `many_classes`: one part in four colours and three sizes."""


def many_classes(n: int, seed: int = 0) -> list[ClassLook]:
    """`n` distinct classes for scale tests: the look-alike family interleaved with the other eleven
    shapes first (so any n >= 12 holds the whole family), then variants of the shapes with a seeded
    colour (RGB gains in [0.45, 1.6]) and size (0.85-1.15), named `<shape>-vNNN`."""
    if n < 1:
        raise UsageError(f"--classes {n}: choose at least one class")
    family = [ClassLook(name, LOOKALIKE_SHAPE, tint, size, "lookalike") for name, tint, size in LOOKALIKE]
    others = [ClassLook(c, c) for c in CLASS_NAMES if c != LOOKALIKE_SHAPE]
    out: list[ClassLook] = []
    while family or others:
        for pool in (family, others):
            if pool:
                out.append(pool.pop(0))
    rng = np.random.default_rng([int(seed), 0x5CA1E])
    k = len(out)
    while len(out) < n:
        shape = CLASS_NAMES[k % len(CLASS_NAMES)]
        tint = tuple(float(round(v, 3)) for v in rng.uniform(0.45, 1.6, 3))
        out.append(ClassLook(f"{shape}-v{k:03d}", shape, tint, float(round(rng.uniform(0.85, 1.15), 3))))
        k += 1
    return out[:n]


# ----------------------------------------------------------------------------------------------------------
# defects


def _pick(rng: np.random.Generator, mask: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(mask)
    k = int(idx[rng.integers(len(idx))])
    return divmod(k, mask.shape[1])


def _pick_inside(rng: np.random.Generator, edt: np.ndarray, radius_px: float) -> tuple[int, int]:
    """A surface pixel at least ~radius from the object's edge (or as deep as the object allows)."""
    need = min(radius_px * 0.8 + 1.0, 0.8 * float(edt.max()))
    return _pick(rng, edt >= need)


def _wobbly_radius(rng: np.random.Generator, ang: np.ndarray, amount: float) -> np.ndarray:
    wob = np.ones_like(ang)
    for k in (2, 3, 5):
        wob += amount / k * rng.uniform(0.3, 1.0) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    return wob


@dataclass
class _DefectResult:
    h: np.ndarray
    obj_alb: np.ndarray
    m: np.ndarray
    support: np.ndarray
    extra_missing: np.ndarray | None = None


def _apply_defect(kind: str, rng: np.random.Generator, h: np.ndarray, obj_alb: np.ndarray, m: np.ndarray,
                  pitch: float, ii: np.ndarray, jj: np.ndarray) -> _DefectResult:
    surface = m >= 0.999
    if not surface.any():  # pragma: no cover - every class has a surface at every supported size
        surface = m > 0
    edt = distance_transform_edt(surface)
    h_def, alb, m_def, extra = h, obj_alb, m, None

    if kind == "cut":
        foot = m > 0
        boundary = foot & ~binary_erosion(foot)
        ci, cj = _pick(rng, boundary)
        R = max(rng.uniform(3.0, 6.0) / pitch, 3.0)
        w = np.clip(R - np.hypot(ii - ci, jj - cj) + 0.5, 0, 1) * foot
        h_def = h * (1 - w)
        m_def = m * (1 - w)
        return _DefectResult(h_def, alb, m_def, w > 0)

    if kind == "crack":
        nseg = int(rng.integers(3, 6))
        ang = rng.uniform(0, 2 * np.pi)
        pts = [(0.0, 0.0)]
        for _ in range(nseg):
            L = max(rng.uniform(1.5, 3.0) / pitch, 2.0)
            ang += rng.uniform(-0.7, 0.7)
            pts.append((pts[-1][0] + L * np.sin(ang), pts[-1][1] + L * np.cos(ang)))
        p = np.array(pts)
        p -= p.mean(axis=0)
        extent = float(np.hypot(*(p.max(0) - p.min(0)))) / 2
        ci, cj = _pick_inside(rng, edt, extent)
        p += (ci, cj)
        d = np.minimum.reduce([_seg_dist(jj, ii, p[k, 1], p[k, 0], p[k + 1, 1], p[k + 1, 0]) for k in range(nseg)])
        hw = max(rng.uniform(0.3, 0.5) / pitch, 0.9)
        w = np.clip(1 - d / hw, 0, 1) * surface
        hc = float(h[ci, cj])
        depth = float(np.clip(rng.uniform(0.4, 1.2), 0.25, max(0.7 * hc, 0.25)))
        dark = rng.uniform(0.55, 0.8)
        h_def = h - depth * w
        alb = obj_alb * (1 - dark * np.clip(1.5 * w, 0, 1))[..., None]
        return _DefectResult(h_def, alb, m_def, w > 0)

    if kind == "hole":
        R = max(rng.uniform(0.8, 1.8) / pitch, 1.5)
        ci, cj = _pick_inside(rng, edt, R + 1)
        dist = np.hypot(ii - ci, jj - cj)
        w = np.clip(R - dist + 0.5, 0, 1) * surface
        hc = float(h[ci, cj])
        depth = min(hc, rng.uniform(1.5, 4.0))
        h_def = h - depth * w
        alb = obj_alb * (1 - 0.8 * w)[..., None]
        extra = (dist < R - 0.5) & (rng.random(h.shape) < 0.6) & (w > 0)
        return _DefectResult(h_def, alb, m_def, w > 0, extra)

    # round-ish defects: stain, color, dent, bump
    R_mm = {"stain": (1.5, 4.0), "color": (2.5, 5.0), "dent": (1.5, 4.0), "bump": (1.5, 4.0)}[kind]
    R = max(rng.uniform(*R_mm) / pitch, 3.0)
    ci, cj = _pick_inside(rng, edt, R)
    di, dj = ii - ci, jj - cj
    ang = np.arctan2(di, dj)
    rr = np.hypot(di, dj) / (R * _wobbly_radius(rng, ang, 0.35 if kind in ("stain", "color") else 0.15))

    if kind in ("dent", "bump"):
        w = np.clip(1 - rr * rr, 0, 1) ** 2 * m
        hc = float(h[ci, cj])
        amp = float(np.clip(rng.uniform(0.5, 2.0), 0.3, max(0.6 * hc, 0.3)))
        h_def = h + (amp if kind == "bump" else -amp) * w
        return _DefectResult(h_def, alb, m_def, w > 0)

    if kind == "stain":
        w = _ramp(1 - rr, 0.35) * m
        a = rng.uniform(0.3, 0.55)
        local = _lum(obj_alb[ci, cj])
        if local > 0.35:
            palette = ((0.25, 0.17, 0.09), (0.12, 0.12, 0.13), (0.35, 0.28, 0.08))
        else:
            palette = ((0.75, 0.72, 0.62), (0.80, 0.74, 0.50), (0.60, 0.62, 0.66))
        col = np.array(palette[int(rng.integers(len(palette)))])
        wa = (a * w)[..., None]
        alb = obj_alb * (1 - wa) + col * wa
        return _DefectResult(h_def, alb, m_def, w > 0)

    if kind == "color":
        w = _ramp(1 - rr, 0.6) * m
        a = rng.uniform(0.45, 0.75)
        local = obj_alb[ci, cj] / max(float(obj_alb[ci, cj].sum()), 1e-6)
        cands = rng.uniform(0.05, 1.0, (4, 3))
        chroma = np.abs(cands / cands.sum(axis=1, keepdims=True) - local).sum(axis=1)
        col = cands[int(np.argmax(chroma))]  # the candidate hue farthest from the part's own
        # same luminance, other hue (a little lighter on very dark parts, where hue barely shows)
        target = np.maximum(_lum(obj_alb), 0.22)[..., None] * (col / _lum(col))
        target = np.minimum(target, 1.0)
        wa = (a * w)[..., None]
        alb = obj_alb * (1 - wa) + target * wa
        return _DefectResult(h_def, alb, m_def, w > 0)

    raise UsageError(f"unknown defect type {kind!r}; use one of {', '.join(DEFECT_TYPES)}")


# ----------------------------------------------------------------------------------------------------------
# rendering


@dataclass
class RenderedSample:
    """Everything `render` produced; `render_sample` returns the first three."""

    rgb: np.ndarray  # HxWx3 uint8
    xyz: np.ndarray  # HxWx3 float32 metres, missing (0,0,0)
    gt: np.ndarray  # HxW uint8, 255 on defect pixels
    height: np.ndarray  # HxW float64 mm above the background plane (with the defect)
    footprint: np.ndarray  # HxW bool, object pixels (with the defect)
    valid: np.ndarray  # HxW bool


def _seed_sequence(rng_seed: int | Sequence[int]) -> np.random.SeedSequence:
    return np.random.SeedSequence(rng_seed if isinstance(rng_seed, int) else [int(v) for v in rng_seed])


def render(class_name: str, rng_seed: int | Sequence[int], size: int = 224,
           defect: str | None = None, look: "ClassLook | None" = None) -> RenderedSample:
    """Render one sample; the same (class, seed, size) with and without `defect` is the defect-free twin.
    `look` renders `class_name` as a variant of one of the shapes (its colour and size)."""
    shape = look.shape if look is not None else class_name
    if shape not in _CLASSES:
        raise UsageError(f"unknown synthetic class {shape!r}; use one of {', '.join(CLASS_NAMES)}")
    if defect is not None and defect not in DEFECT_FAMILIES:
        raise UsageError(f"unknown defect type {defect!r}; use one of {', '.join(DEFECT_TYPES)}")
    shape_fn, mat = _CLASSES[shape]
    scene_ss, defect_ss = _seed_sequence(rng_seed).spawn(2)
    rng = np.random.default_rng(scene_ss)
    x_mm, y_mm, ii, jj, pitch = _grid(size)
    S = size

    # pose and appearance jitter (fixed draw order: never depends on the defect)
    theta = rng.uniform(0, 2 * np.pi)
    tx, ty = rng.uniform(-3.0, 3.0, 2)
    scale = rng.uniform(0.97, 1.03)
    if look is not None:
        scale *= look.size
    hscale = rng.uniform(0.95, 1.05)
    jit = rng.uniform(-1.0, 1.0, 4)
    light_az = rng.uniform(0, 2 * np.pi)
    light_el = np.deg2rad(rng.uniform(40.0, 70.0))
    intensity = rng.uniform(0.88, 1.12)
    gain = 1.0 + rng.normal(0.0, 0.03, 3)
    vignette = rng.uniform(0.03, 0.12)
    tilt = rng.uniform(-0.03, 0.03, 2)
    z0 = Z_REF_M + rng.uniform(-0.005, 0.005)

    c, s = np.cos(theta), np.sin(theta)
    X = (c * (x_mm - tx) + s * (y_mm - ty)) / scale
    Y = (-s * (x_mm - tx) + c * (y_mm - ty)) / scale
    r = np.hypot(X, Y)
    phi = np.arctan2(Y, X)
    grain = rng.standard_normal((S, S))
    h, obj_alb = shape_fn(X, Y, r, phi, jit, rng, grain)
    h = np.clip(h, 0.0, None) * hscale * scale
    obj_alb = np.clip(obj_alb, 0.0, 1.0)
    if look is not None and look.tint != (1.0, 1.0, 1.0):
        obj_alb = np.clip(obj_alb * np.asarray(look.tint), 0.0, 1.0)
    m = np.clip(h / 0.25, 0.0, 1.0)

    bg_var = 0.05 * _vnoise(rng, x_mm, y_mm, 5.0) + 0.03 * rng.standard_normal((S, S))
    bg_alb = np.array((0.42, 0.43, 0.45)) * (1 + bg_var[..., None])

    # sensor effects drawn from the clean scene
    z_noise = rng.standard_normal((S, S)) * Z_NOISE_MM
    rgb_noise = rng.standard_normal((S, S, 3)) * RGB_NOISE
    u_drop = rng.random((S, S))
    blob_field = _vnoise(rng, x_mm, y_mm, 2.5)
    blob_share = rng.uniform(0.003, 0.012)
    proj_tan = np.tan(np.deg2rad(rng.uniform(15.0, 25.0)))  # projector angle from vertical (triangulation)

    gy, gx = np.gradient(h, pitch)
    slope = np.hypot(gx, gy)
    missing = u_drop < np.clip((slope - 1.0) / 3.0, 0, 0.85) * mat.dropout
    hmax = float(h.max())
    missing |= _occluded(h, 0.0, 1.0, 1.0 / proj_tan * pitch, int(np.ceil(hmax * proj_tan / pitch))) > 0.05
    missing |= blob_field > np.quantile(blob_field, 1.0 - blob_share)
    missing |= u_drop > 1.0 - 0.002 * mat.dropout
    tan_el = np.tan(light_el)
    cast = _occluded(h, np.sin(light_az), np.cos(light_az), tan_el * pitch, int(np.ceil(hmax / (tan_el * pitch))))
    cast = gaussian_filter(np.clip(cast / 0.5, 0, 1), 0.8)

    # defect (own random stream)
    h_def, alb_def, m_def, support, extra = h, obj_alb, m, None, None
    family = DEFECT_FAMILIES.get(defect) if defect else None
    if defect is not None:
        drng = np.random.default_rng(defect_ss.spawn(len(DEFECT_TYPES))[DEFECT_TYPES.index(defect)])
        res = _apply_defect(defect, drng, h, obj_alb, m, pitch, ii, jj)
        h_def, alb_def, m_def, support, extra = res.h, res.obj_alb, res.m, res.support, res.extra_missing
    h_shade = h if family == "geometry" else h_def  # geometry-only defects leave the image untouched

    # RGB
    if h_shade is h:
        sgy, sgx = gy, gx
    else:
        sgy, sgx = np.gradient(h_shade, pitch)
    norm = np.sqrt(sgx * sgx + sgy * sgy + 1.0)
    L = np.array((np.cos(light_el) * np.cos(light_az), np.cos(light_el) * np.sin(light_az), np.sin(light_el)))
    ndotl = np.clip((-sgx * L[0] - sgy * L[1] + L[2]) / norm, 0, None)
    Hv = L + np.array((0.0, 0.0, 1.0))
    Hv /= np.linalg.norm(Hv)
    ndoth = np.clip((-sgx * Hv[0] - sgy * Hv[1] + Hv[2]) / norm, 0, None)
    direct = 1.0 - 0.65 * cast
    md = m_def[..., None]
    alb = bg_alb * (1 - md) + alb_def * md
    spec_k = m_def * mat.specular  # background is matte
    spec = spec_k * ndoth ** mat.shininess * direct
    shade = (0.35 * (1 - m_def) + mat.ambient * m_def) + (0.6 * (1 - m_def) + mat.diffuse * m_def) * ndotl * direct
    rgb = alb * shade[..., None]
    spec_col = (0.5 + 0.5 * alb) if mat.metal else np.ones(3)
    rgb = rgb + spec[..., None] * spec_col
    rad2 = (x_mm * x_mm + y_mm * y_mm) / (FOV_MM * FOV_MM / 2)
    rgb = rgb * (intensity * (1 - vignette * rad2))[..., None] * gain + rgb_noise
    rgb_u8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)

    # geometry
    x_m, y_m = x_mm / 1000.0, y_mm / 1000.0
    z = z0 + tilt[0] * x_m + tilt[1] * y_m - (h_def + z_noise) / 1000.0
    xyz = np.empty((S, S, 3), dtype=np.float32)
    xyz[..., 0] = x_m * z / Z_REF_M
    xyz[..., 1] = y_m * z / Z_REF_M
    xyz[..., 2] = z
    if extra is not None:
        missing = missing | extra
    xyz[missing] = 0.0

    gt = np.zeros((S, S), dtype=np.uint8)
    if support is not None:
        if family == "both":  # the shading of the changed surface reaches one pixel beyond it
            support = binary_dilation(support, structure=np.ones((3, 3), bool))
        gt[support] = 255
    return RenderedSample(rgb=rgb_u8, xyz=np.ascontiguousarray(xyz), gt=gt, height=h_def,
                          footprint=m_def > 0, valid=~missing)


def render_sample(class_name: str, rng_seed: int | Sequence[int], size: int = 224,
                  defect: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb uint8 HxWx3, xyz float32 HxWx3, gt uint8 HxW) for one sample; `defect=None` gives the twin."""
    s = render(class_name, rng_seed, size, defect)
    return s.rgb, s.xyz, s.gt


def sample_seed(seed: int, class_name: str, split: str, index: int) -> tuple[int, int, int, int]:
    """The per-sample seed: independent of the number of classes and of the other splits."""
    return (int(seed), zlib.crc32(class_name.encode()), SPLIT_CODES[split], int(index))


# ----------------------------------------------------------------------------------------------------------
# dataset writing


def labels_for_test_split(n_test: int) -> list[str]:
    """Labels of the test split in index order: ~1/4 good, the rest round-robin over the defect types."""
    n_good = max(1, round(n_test / 4)) if n_test > 1 else n_test
    return ["good"] * n_good + [DEFECT_TYPES[k % len(DEFECT_TYPES)] for k in range(n_test - n_good)]



def _plan(class_name: str, n_train: int, n_val: int, n_test: int) -> list[tuple[str, str, int, int]]:
    """(split, label, global index, file index) of every sample of one class."""
    plan = [("train", "good", i, i) for i in range(n_train)]
    plan += [("validation", "good", i, i) for i in range(n_val)]
    counters: dict[str, int] = {}
    for i, label in enumerate(labels_for_test_split(n_test)):
        plan.append(("test", label, i, counters.get(label, 0)))
        counters[label] = counters.get(label, 0) + 1
    return plan


def _write_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _write_tiff(path: Path, xyz: np.ndarray) -> None:
    tifffile.imwrite(path, xyz, photometric="rgb", planarconfig="contig", metadata=None, software=False,
                     datetime=None, resolution=None)


def _work(task: tuple) -> tuple[str, int]:
    root, class_name, seed, size, items, digits, look = task
    root = Path(root)
    for split, label, index, file_index in items:
        defect = None if label == "good" else label
        s = render(class_name, sample_seed(seed, class_name, split, index), size, defect, look)
        d = root / class_name / split / label
        name = f"{file_index:0{digits}d}"
        _write_png(d / "rgb" / f"{name}.png", s.rgb)
        _write_tiff(d / "xyz" / f"{name}.tiff", s.xyz)
        if split == "test":
            _write_png(d / "gt" / f"{name}.png", s.gt)
    return class_name, len(items)


def is_synth_output(path: Path) -> bool:
    """True when `path` holds a complete earlier `generate_dataset` output (its manifest names this generator)."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("generator") == GENERATOR


def _auto_workers(n_classes: int, per_class: int, size: int) -> int:
    work = n_classes * per_class * size * size
    if work < 3_000_000:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_classes, 8))


def _readme(manifest: dict) -> str:
    lines = [
        f"Synthetic multimodal anomaly dataset written by {GENERATOR} {manifest['version']} (seed {manifest['seed']}).",
        "Layout: MVTec 3D-AD. <class>/{train,validation}/good/{rgb,xyz}/NNN.{png,tiff};",
        "<class>/test/<good|defect>/{rgb,xyz,gt}/NNN.{png,tiff,png}.",
        "rgb: 8-bit RGB PNG. xyz: float32 HxWx3 TIFF in metres (camera looking down, z = distance);",
        "missing points are exactly (0, 0, 0). gt: 8-bit L PNG, 255 on defect pixels.",
        "Defect families: rgb = visible in RGB only, geometry = visible in 3D only, both = visible in both.",
    ]
    for name, fam in manifest["defect_types"].items():
        lines.append(f"  {name}: {fam}")
    lines.append(f"Classes: {', '.join(manifest['classes'])}")
    return "\n".join(lines) + "\n"


def generate_dataset(out: Path, n_classes: int = 10, seed: int = 0, size: int = 224, n_train: int = 60,
                     n_val: int = 10, n_test: int = 40,
                     progress: Callable[[str, int, int], None] | None = None,
                     overwrite: bool = False, workers: int | None = None,
                     looks: Sequence["ClassLook"] | None = None) -> dict:
    """Write the synthetic dataset to `out` (MVTec 3D-AD layout) and return its manifest.

    `out` must be absent, empty, or an earlier output of this function (replaced); any other non-empty
    folder is refused unless `overwrite=True` (which replaces it). The data is generated in a hidden
    sibling folder and renamed into place at the end, so an interrupted run never leaves a dataset that
    looks complete. Output is byte-identical for the same arguments, whatever `workers` is.
    `looks` (e.g. `many_classes(100)`) gives the classes instead of the first `n_classes` shapes.
    """
    out = Path(out).absolute()
    if looks is not None:
        names = [lk.name for lk in looks]
        if not names or len(set(names)) != len(names):
            raise UsageError(f"looks: give each class name once, got {names}")
        n_classes = len(names)
    elif not 1 <= n_classes <= len(CLASS_NAMES):
        raise UsageError(f"--classes {n_classes}: the generator has {len(CLASS_NAMES)} classes; "
                         f"choose 1..{len(CLASS_NAMES)}")
    if seed < 0:
        raise UsageError(f"--seed {seed}: the seed must be >= 0")
    if not 32 <= size <= 4096:
        raise UsageError(f"--size {size}: choose an image side between 32 and 4096 pixels")
    if n_train < 1 or n_val < 0 or n_test < 1:
        raise UsageError(f"sizes train={n_train} validation={n_val} test={n_test}: need train >= 1, "
                         "validation >= 0 and test >= 1")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; choose another --out")
    replace = out.is_dir() and any(out.iterdir())
    if replace and not (overwrite or is_synth_output(out)):
        raise UsageError(f"{out}: folder is not empty and is not an earlier `iumad synth` output; "
                         "choose an empty or new folder (or pass overwrite=True to replace it)")

    classes = [lk.name for lk in looks] if looks is not None else list(CLASS_NAMES[:n_classes])
    look_of = {lk.name: lk for lk in looks} if looks is not None else {}
    labels = labels_for_test_split(n_test)
    per_class = {
        c: {"train": n_train, "validation": n_val,
            "test": {lab: labels.count(lab) for lab in ["good", *DEFECT_TYPES] if lab in labels}}
        for c in classes
    }
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "layout": "mvtec3d",
        "seed": int(seed),
        "size": int(size),
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "classes": classes,
        "defect_types": dict(DEFECT_FAMILIES),
        "families": {
            "rgb": "visible in RGB only (xyz identical to the defect-free twin)",
            "geometry": "visible in geometry only (RGB identical to the defect-free twin)",
            "both": "visible in RGB and geometry",
        },
        "per_class": per_class,
        "units": {"xyz": "metres", "missing_point": [0.0, 0.0, 0.0]},
        "field_of_view_m": FOV_MM / 1000.0,
        "camera_distance_m": Z_REF_M,
    }
    if looks is not None:
        manifest["looks"] = {lk.name: {"shape": lk.shape, "tint": list(lk.tint), "size": lk.size, "family": lk.family}
                             for lk in looks}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.synth-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tasks, total = [], 0
        for c in classes:
            plan = _plan(c, n_train, n_val, n_test)
            total += len(plan)
            for split, label, _, _ in plan:
                for sub in ("rgb", "xyz", "gt") if split == "test" else ("rgb", "xyz"):
                    (tmp / c / split / label / sub).mkdir(parents=True, exist_ok=True)
            digits = max(3, len(str(max(n_train, n_val, n_test) - 1)))
            chunk = 16
            for k in range(0, len(plan), chunk):
                tasks.append((str(tmp), c, int(seed), int(size), plan[k:k + chunk], digits, look_of.get(c)))
            ids = {str(255 - k): name for k, name in enumerate(DEFECT_TYPES)} | {"0": "good"}  # as MVTec 3D-AD
            (tmp / c / "class_ids.json").write_text(json.dumps(ids, indent=2) + "\n")

        n_workers = workers if workers is not None else _auto_workers(n_classes, total // n_classes, size)
        done = 0
        if progress:
            progress("synth", 0, total)
        if n_workers <= 1:
            for t in tasks:
                done += _work(t)[1]
                if progress:
                    progress("synth", done, total)
        else:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                for _, n in pool.map(_work, tasks):
                    done += n
                    if progress:
                        progress("synth", done, total)

        (tmp / "README.txt").write_text(_readme(manifest))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completeness

        old = None
        if out.exists():
            if any(out.iterdir()):
                old = out.parent / f".{out.name}.synth-old-{os.getpid()}"
                if old.exists():
                    shutil.rmtree(old)
                out.rename(old)
            else:
                out.rmdir()
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
