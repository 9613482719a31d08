"""Geometry preprocessing: organized xyz (or depth) -> a 3-channel image a 2D backbone can read.

Pipeline (`geometry_image`), all vectorized numpy/scipy, ~25-30 ms for 224x224 on one core
(`benchmarks/bench_geometry.py`; the budget is 50 ms):

1. Validity: a pixel is valid when its point is finite and not the (0,0,0) "missing" marker (xyz) or
   its depth is finite and > 0 (depth). NaN/inf are treated as missing, not as an error; only a sample
   with (almost) nothing valid raises `DataError`.
2. Depth input (HxW) is back-projected with a nominal pinhole camera, ``x = (u-cx) z / f``,
   ``y = (v-cy) z / f`` with ``f = depth_focal_px`` (default ``5 * max(H, W)`` pixels, a ~11 degree
   field of view typical of industrial 3D sensors; MVTec 3D-AD's own lens is ~7 W). Any pinhole
   back-projection maps 3D planes to 3D planes (a wrong focal length is only a linear rescaling of x
   and y), so the background stays planar and the same plane fit / fill / normals path applies; an
   orthographic "depth as height" reading would bend a tilted table under perspective. Pass the true
   focal length when known to get metric lateral scale.
3. Background plane: deterministic RANSAC (fixed seed, all hypotheses scored at once with an MSAC
   cost) on valid points of the image border band, where the table is in MVTec 3D-AD / Eyecandies (the
   object is roughly centred), then least-squares (PCA) refits on the inliers. With too few border
   points it falls back to all valid points (the table must then still be the dominant plane).
   The plane normal is oriented toward the camera (negative z), so heights of objects are positive.
4. Missing points are filled with their nearest valid neighbour (Euclidean distance transform),
   which keeps valid points bit-identical and never invents geometry between distant surfaces.
5. Surface normals: the measured points are first averaged with a Gaussian (sigma `normal_sigma`,
   1 px) by normalized convolution - only measured points count, so the fine checkerboard of dropouts
   on MVTec 3D-AD tables does not bias derivatives the way duplicated nearest-fill points would -
   then Sobel-style finite differences (central difference along u or v, 1-2-1 smoothing across),
   cross product, normalised, oriented toward the camera (a finite-difference normal facing away from
   the camera is a surface the sensor cannot see), and expressed in the *plane frame* (the minimal
   rotation that takes the table normal onto the camera axis). The table therefore always reads as a
   flat (0, 0) normal whatever the table tilt of a capture, and the image axes stay aligned with the
   pixel axes.
6. Height above the plane (on the nearest-filled cloud), normalised (see below).
7. Foreground: filled height above max(1.5 mm, 5 sigma of the plane residual, 10% of the object
   height), 3x3 opening, components under 0.2% of the image dropped. Pixels more than 2 px outside
   it are set to the flat-table value (0.5, 0.5, 0) unless ``flatten_background=False``.

Output channels of `GeometryImage.image` (HxWx3 float32, each in [0, 1] except channel 2, [0, 1.5]):

* 0: ``(n_x + 1) / 2`` - x (image-right) component of the unit surface normal in the plane frame;
  0.5 on flat surfaces parallel to the table, > 0.5 on surfaces facing image-right.
* 1: ``(n_y + 1) / 2`` - y (image-down) component, likewise. (n_z is implied by n_x, n_y.)
* 2: ``clip(height / height_scale, 0, 1.5)`` - height above the fitted background plane.

Height normalisation. With ``height_scale=None`` (default) the scale is per sample: the 99th percentile
of the foreground height (floored at 1 mm). That makes the channel independent of the physical size
of the class and of the data's depth units (useful for depth sources of uncertain scale) and is
stable for local defects (a dent, hole or cut lowers a few pixels but not the 99th percentile).
Its weakness: a defect that changes the top of the object (a part sticking up, a missing top)
rescales the whole channel. A fixed physical scale (``height_scale=<metres>``, e.g. the median
per-sample scale over a class's training images, see `GeometryImage.auto_height_scale`) keeps each
pixel's value a function of local geometry only and is preferable once a class's training data is
known; the upper clip at 1.5 keeps anomalies that rise above the normal top visible. The raw height
in metres is returned too (`GeometryImage.height`), so callers can renormalise without rerunning.

The feature cache must key on `preprocessing_key(...)` (version + every parameter that changes the
output), and `PREPROCESSING_VERSION` must be bumped whenever the output of the defaults changes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from iumad.errors import DataError

PREPROCESSING_VERSION: str = "geom-v1"

# Defaults (metres unless stated); exposed so callers and the cache key see the same numbers.
DEFAULT_BORDER_FRACTION = 0.1
DEFAULT_INLIER_THRESHOLD = 1e-3
DEFAULT_MIN_FOREGROUND_HEIGHT = 1.5e-3
DEFAULT_DEPTH_FOCAL_FACTOR = 5.0
FOREGROUND_RELATIVE_HEIGHT = 0.1
BACKGROUND_MARGIN_PX = 2
HEIGHT_CLIP = 1.5
_MIN_BORDER_POINTS = 50
_MIN_VALID_POINTS = 3
_MIN_HEIGHT_SCALE = 1e-3
_RANSAC_HYPOTHESES = 256
_RANSAC_MAX_POINTS = 1024
_REFITS = 2
_MAD_TO_SIGMA = 1.4826


Plane = tuple[float, float, float, float]


@dataclass
class GeometryImage:
    """Result of `geometry_image`.

    image: HxWx3 float32, channels (normal-x, normal-y, normalised height); see the module docstring.
    foreground: HxW bool, points (missing ones filled by their nearest measured neighbour) more than
        `foreground_threshold` above the plane, after a 3x3 morphological opening and removal of
        components smaller than 0.2% of the image.
    valid: HxW bool, measured (finite, non-missing) points of the input.
    height: HxW float32, signed height above the plane in input units (metres), missing points filled.
    plane: (a, b, c, d) with unit normal (a, b, c) toward the camera (c < 0); a*x+b*y+c*z+d = height.
    plane_residual: robust sigma (1.4826 * median |residual|) of the plane inliers, metres.
    height_scale: the scale channel 2 was divided by (metres).
    auto_height_scale: the per-sample robust scale (99th percentile of foreground height), reported
        even when a fixed scale was used, so a class-level scale can be estimated from training data.
    foreground_threshold: the height (metres) above which a point counted as foreground.
    version: `PREPROCESSING_VERSION` that produced it.
    """

    image: np.ndarray
    foreground: np.ndarray
    valid: np.ndarray
    height: np.ndarray
    plane: Plane
    plane_residual: float
    height_scale: float
    auto_height_scale: float
    foreground_threshold: float
    version: str = PREPROCESSING_VERSION


def preprocessing_key(**params: Any) -> str:
    """Stable string naming the preprocessing: version plus every parameter that differs from its default.

    `params` are `geometry_image` keyword options (height_scale, normal_sigma, ...); passing a default
    value explicitly gives the same key as leaving it out, and ints equal floats (700 == 700.0).
    Feature caches key on this so a change of code version or of a parameter never reuses stale
    features. Unknown names raise TypeError.
    """
    sig = inspect.signature(geometry_image)
    options = {
        k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY and k != "source"
    }
    unknown = sorted(set(params) - set(options))
    if unknown:
        raise TypeError(f"preprocessing_key: unknown geometry_image option(s) {unknown}")

    def norm(v: Any) -> Any:
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, float, np.integer, np.floating)):
            return float(v)
        return v

    parts = [PREPROCESSING_VERSION]
    for k in sorted(params):
        v = norm(params[k])
        if v != norm(options[k]):
            parts.append(f"{k}={v!r}")
    return ";".join(parts)


# --------------------------------------------------------------------------------------------------
# validation


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _check_valid_shape(valid: np.ndarray | None, hw: tuple[int, int], source: str | None) -> np.ndarray | None:
    if valid is None:
        return None
    valid = np.asarray(valid)
    if valid.shape != hw:
        raise DataError(
            f"valid mask shape {valid.shape} does not match geometry {hw}{_where(source)}; "
            "pass the mask that belongs to this geometry (or none)"
        )
    return valid.astype(bool, copy=False)


def _prepare_xyz(
    xyz: np.ndarray, valid: np.ndarray | None, source: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (xyz float32 with missing points zeroed, valid mask) after shape and NaN checks."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(
            f"organized point cloud must be HxWx3, got shape {xyz.shape}{_where(source)}; "
            "store xyz as a 3-channel float TIFF (or pass depth with kind='depth')"
        )
    if xyz.shape[0] < 3 or xyz.shape[1] < 3:
        raise DataError(f"geometry {xyz.shape[:2]} is too small (need at least 3x3){_where(source)}")
    if not np.issubdtype(xyz.dtype, np.floating) and not np.issubdtype(xyz.dtype, np.integer):
        raise DataError(f"geometry has non-numeric dtype {xyz.dtype}{_where(source)}; use float32 metres")
    xyz = xyz.astype(np.float32, copy=True)
    x, y, z = xyz[:, :, 0], xyz[:, :, 1], xyz[:, :, 2]  # per channel: reductions over a length-3 axis are slow
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(z) & ((x != 0) | (y != 0) | (z != 0))
    given = _check_valid_shape(valid, xyz.shape[:2], source)
    if given is not None:
        ok &= given
    xyz[~ok] = 0.0
    _require_points(ok, source)
    return xyz, ok


def _require_points(valid: np.ndarray, source: str | None) -> None:
    n = int(valid.sum())
    if n < _MIN_VALID_POINTS:
        raise DataError(
            f"geometry has {n} valid point(s) (all missing, zero or NaN){_where(source)}; "
            "re-export the file or drop the sample from the split"
        )


def depth_to_xyz(
    depth: np.ndarray,
    valid: np.ndarray | None = None,
    focal_px: float | None = None,
    source: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Back-project HxW depth (metres, missing = 0/NaN) with a nominal pinhole at the image centre.

    Returns (xyz HxWx3 float32 with missing points (0,0,0), valid HxW bool). `focal_px` defaults to
    ``5 * max(H, W)``; any focal length keeps planes planar (see module docstring).
    """
    depth = np.asarray(depth)
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.ndim != 2:
        raise DataError(
            f"depth map must be HxW, got shape {depth.shape}{_where(source)}; "
            "pass organized xyz with kind='xyz' instead"
        )
    h, w = depth.shape
    if h < 3 or w < 3:
        raise DataError(f"geometry {depth.shape} is too small (need at least 3x3){_where(source)}")
    z = depth.astype(np.float64, copy=True)
    ok = np.isfinite(z) & (z > 0)
    given = _check_valid_shape(valid, (h, w), source)
    if given is not None:
        ok &= given
    z[~ok] = 0.0
    _require_points(ok, source)
    f = float(focal_px) if focal_px is not None else DEFAULT_DEPTH_FOCAL_FACTOR * max(h, w)
    if not np.isfinite(f) or f <= 0:
        raise DataError(f"depth focal length must be a positive number of pixels, got {focal_px}")
    u = (np.arange(w, dtype=np.float64) - (w - 1) / 2.0) / f
    v = (np.arange(h, dtype=np.float64) - (h - 1) / 2.0) / f
    xyz = np.empty((h, w, 3), dtype=np.float32)
    xyz[:, :, 0] = u[None, :] * z
    xyz[:, :, 1] = v[:, None] * z
    xyz[:, :, 2] = z
    return xyz, ok


# --------------------------------------------------------------------------------------------------
# plane


def _border_mask(hw: tuple[int, int], fraction: float) -> np.ndarray:
    h, w = hw
    b = max(1, int(round(fraction * min(h, w))))
    m = np.ones((h, w), dtype=bool)
    m[b : h - b, b : w - b] = False
    return m


def _orient(n: np.ndarray, d: float) -> tuple[np.ndarray, float]:
    """Orient the plane normal toward the camera (decreasing z)."""
    if n[2] > 0 or (n[2] == 0 and d < 0):
        return -n, -d
    return n, d


def _lsq_plane(pts: np.ndarray) -> tuple[np.ndarray, float]:
    """Total-least-squares plane through pts (N,3): smallest principal axis of the covariance."""
    c = pts.mean(axis=0)
    q = pts - c
    _, vecs = np.linalg.eigh(q.T @ q)
    n = vecs[:, 0]
    return n, float(-n @ c)


def _fit_plane(
    xyz: np.ndarray,
    valid: np.ndarray,
    rng_seed: int,
    border_fraction: float,
    inlier_threshold: float,
) -> tuple[np.ndarray, float, float]:
    """Return (unit normal toward camera, d, robust residual sigma of inliers)."""
    band = valid & _border_mask(valid.shape, border_fraction)
    if int(band.sum()) < _MIN_BORDER_POINTS:
        band = valid
    pts = xyz[band].astype(np.float64)
    origin = pts.mean(axis=0)
    pts = pts - origin  # centred for numerical stability; d is shifted back at the end
    rng = np.random.default_rng(rng_seed)
    sample = pts
    if len(sample) > _RANSAC_MAX_POINTS:
        sample = sample[rng.choice(len(sample), _RANSAC_MAX_POINTS, replace=False)]
    m = len(sample)
    idx = rng.integers(0, m, size=(_RANSAC_HYPOTHESES, 3))
    p0, p1, p2 = sample[idx[:, 0]], sample[idx[:, 1]], sample[idx[:, 2]]
    e1, e2 = p1 - p0, p2 - p0
    normals = np.cross(e1, e2)
    norm = np.linalg.norm(normals, axis=1)
    scale = np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1)
    good = norm > 1e-6 * np.maximum(scale, 1e-30)
    thr2 = inlier_threshold**2
    if good.any():
        normals = normals[good] / norm[good, None]
        ds = -np.einsum("ij,ij->i", normals, p0[good])
        dist = sample @ normals.T  # (m, K) signed distances, computed in place below
        dist += ds
        np.multiply(dist, dist, out=dist)
        np.minimum(dist, thr2, out=dist)
        cost = dist.sum(axis=0)  # MSAC: truncated quadratic loss
        best = int(np.argmin(cost))
        n, d = normals[best], float(ds[best])
    else:  # all hypotheses degenerate (e.g. collinear points): plain least squares
        n, d = _lsq_plane(pts)
    inl = np.abs(pts @ n + d) < inlier_threshold
    for _ in range(_REFITS):
        if inl.sum() < 3:
            break
        n, d = _lsq_plane(pts[inl])
        inl = np.abs(pts @ n + d) < inlier_threshold
    if inl.sum() >= 3:
        resid = float(_MAD_TO_SIGMA * np.median(np.abs(pts[inl] @ n + d)))
    else:
        resid = float(_MAD_TO_SIGMA * np.median(np.abs(pts @ n + d)))
    d = d - float(n @ origin)
    n, d = _orient(n, d)
    return n, d, resid


def fit_background_plane(
    xyz: np.ndarray,
    valid: np.ndarray | None = None,
    rng_seed: int = 0,
    *,
    border_fraction: float = DEFAULT_BORDER_FRACTION,
    inlier_threshold: float = DEFAULT_INLIER_THRESHOLD,
    source: str | None = None,
) -> Plane:
    """Robustly fit the background (table) plane of an organized HxWx3 cloud.

    Uses valid points in the outer `border_fraction` band of the image (all valid points if the band
    has fewer than 50), deterministic RANSAC/MSAC with `rng_seed`, then least-squares refits on points
    within `inlier_threshold` (metres). Returns (a, b, c, d), unit normal with c <= 0 (toward the
    camera), so that ``a*x + b*y + c*z + d`` is the signed height above the plane.
    """
    xyz64, ok = _prepare_xyz(xyz, valid, source)
    n, d, _ = _fit_plane(xyz64, ok, rng_seed, border_fraction, inlier_threshold)
    return (float(n[0]), float(n[1]), float(n[2]), float(d))


def height_above_plane(xyz: np.ndarray, valid: np.ndarray | None, plane: Plane) -> np.ndarray:
    """Signed distance (HxW float32) of every point to `plane`; positive toward the camera.

    Pixels not in `valid` (when given) are 0.
    """
    a, b, c, d = plane
    xyz = np.asarray(xyz, dtype=np.float64)
    h = xyz[:, :, 0] * a + xyz[:, :, 1] * b + xyz[:, :, 2] * c + d
    if valid is not None:
        h = np.where(valid, h, 0.0)
    return h.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# fill and normals


def fill_missing(arr: np.ndarray, valid: np.ndarray, source: str | None = None) -> np.ndarray:
    """Fill pixels where `valid` is False with the nearest valid pixel's value (all channels alike).

    `arr` is HxW or HxWxC; returns a new array of the same dtype. Valid pixels are unchanged.
    """
    arr = np.asarray(arr)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != arr.shape[:2]:
        raise DataError(f"valid mask shape {valid.shape} does not match array {arr.shape[:2]}{_where(source)}")
    if valid.all():
        return arr.copy()
    if not valid.any():
        raise DataError(f"nothing to fill from: no valid pixel{_where(source)}; drop the sample")
    iy, ix = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    h, w = valid.shape  # a gather of flat rows: 8x faster than arr[iy, ix]
    return np.take(arr.reshape(h * w, -1), (iy * w + ix).ravel(), axis=0).reshape(arr.shape)


def _sobel_du_dv(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel-style derivatives of a channel-first (C, H, W) array along u (columns) and v (rows)."""
    q = np.pad(p, ((0, 0), (1, 1), (1, 1)), mode="edge")
    cu = (q[:, :, 2:] - q[:, :, :-2]) * 0.5  # (C, H+2, W): central difference along u
    du = (cu[:, :-2] + 2.0 * cu[:, 1:-1] + cu[:, 2:]) * 0.25
    cv = (q[:, 2:, :] - q[:, :-2, :]) * 0.5  # (C, H, W+2)
    dv = (cv[:, :, :-2] + 2.0 * cv[:, :, 1:-1] + cv[:, :, 2:]) * 0.25
    return du, dv


def surface_normals(xyz_filled: np.ndarray) -> np.ndarray:
    """Unit normals (HxWx3 float32) of a filled organized cloud (HxWx3), oriented toward the camera.

    d/du and d/dv are Sobel-style (central difference, 1-2-1 smoothing across, edge replicated); the
    normal is d/du x d/dv, flipped where it points away from the camera (n . p > 0, camera at the
    origin looking along +z). Where the derivatives are degenerate (e.g. a constant patch) the normal
    is (0, 0, -1).
    """
    p = np.asarray(xyz_filled, dtype=np.float32)
    if p.ndim != 3 or p.shape[2] != 3:
        raise DataError(f"surface_normals needs an HxWx3 organized cloud, got shape {p.shape}")
    pc = np.moveaxis(p, 2, 0)
    du, dv = _sobel_du_dv(pc)
    nx = du[1] * dv[2] - du[2] * dv[1]
    ny = du[2] * dv[0] - du[0] * dv[2]
    nz = du[0] * dv[1] - du[1] * dv[0]
    norm = np.sqrt(nx * nx + ny * ny + nz * nz)
    scale = np.sqrt((du * du).sum(0) * (dv * dv).sum(0))
    bad = norm <= 1e-6 * scale + 1e-30
    inv = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, norm)).astype(np.float32)
    # orientation: flip where the normal points away from the camera; ties fall back to -z
    facing = nx * pc[0] + ny * pc[1] + nz * pc[2]
    flip = (facing > 0) | ((facing == 0) & (nz > 0))
    inv[flip] *= -1.0
    out = np.empty(p.shape, dtype=np.float32)
    out[:, :, 0] = nx * inv
    out[:, :, 1] = ny * inv
    out[:, :, 2] = np.where(bad, -1.0, nz * inv)
    return out


def _rotation_to_camera_axis(n: np.ndarray) -> np.ndarray:
    """Minimal rotation R with R @ n = (0, 0, -1) for a unit n with n_z <= 0."""
    b = np.array([0.0, 0.0, -1.0])
    v = np.cross(n, b)
    c = float(n @ b)
    if c <= -1.0 + 1e-12:  # opposite: cannot happen for an oriented normal, rotate pi about x
        return np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


# --------------------------------------------------------------------------------------------------
# the whole path


def _smooth_valid(xyz: np.ndarray, valid: np.ndarray, filled: np.ndarray, sigma: float) -> np.ndarray:
    """Normalized convolution: Gaussian average of valid points only; far from any, the nearest fill.

    On scanners that drop points in fine patterns (MVTec 3D-AD's background is a checkerboard of
    holes at 224 px) nearest filling duplicates points in scan order and biases derivatives; averaging
    only measured points denoises and inpaints at once.
    """
    if sigma <= 0:
        return filled
    w = valid.astype(np.float32)
    den = ndimage.gaussian_filter(w, sigma, mode="nearest", truncate=3.0)
    num = np.empty_like(xyz)
    for c in range(3):  # xyz is already 0 at missing points, so xyz * w == xyz
        ndimage.gaussian_filter(xyz[:, :, c], sigma, output=num[:, :, c], mode="nearest", truncate=3.0)
    ok = den > 0.05
    num /= np.maximum(den, 0.05)[:, :, None]
    return np.where(ok[:, :, None], num, filled)


def _square_filter(mask: np.ndarray, side: int, combine: np.ufunc) -> np.ndarray:
    """`combine` (logical or / and) over every side x side window (odd side), outside the image False.

    Separable, as shifted whole-array operations: as fast as ndimage's byte filters on one thread, and
    unlike them it releases the GIL, so feature workers preparing samples side by side do not queue."""
    r = side // 2
    h, w = mask.shape
    padded = np.pad(mask, r)
    rows = padded[:, :w].copy()
    for k in range(1, side):
        combine(rows, padded[:, k:k + w], out=rows)
    out = rows[:h].copy()
    for k in range(1, side):
        combine(out, rows[k:k + h], out=out)
    return out


def _square_dilation(mask: np.ndarray, side: int) -> np.ndarray:
    """Binary dilation by a side x side square, outside the image counting as False (equal to
    `ndimage.binary_dilation` with a 3x3 square iterated (side - 1) / 2 times)."""
    return _square_filter(mask, side, np.logical_or)


def _square_erosion(mask: np.ndarray, side: int) -> np.ndarray:
    """Binary erosion by a side x side square, outside the image counting as False (as ndimage's)."""
    return _square_filter(mask, side, np.logical_and)


def cross_dilation(masks: np.ndarray, steps: int) -> np.ndarray:
    """(..., H, W) bool dilated `steps` times by the 3x3 cross, outside the image False: what
    `ndimage.binary_dilation(mask, iterations=steps)` gives, as whole-array shifts that release the GIL
    (workers score side by side)."""
    out = masks.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[..., 1:, :] |= out[..., :-1, :]
        grown[..., :-1, :] |= out[..., 1:, :]
        grown[..., :, 1:] |= out[..., :, :-1]
        grown[..., :, :-1] |= out[..., :, 1:]
        out = grown
    return out


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """3x3 opening, then drop connected components smaller than 0.2% of the image (at least 16 px).

    Scanner ghosts on the table (MVTec 3D-AD shows bands 1-2 mm above the plane near the object)
    otherwise leave speckles just above the threshold.
    """
    fg = _square_dilation(_square_erosion(mask, 3), 3)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(16, int(0.002 * mask.size))
        keep[0] = False
        fg = keep[labels]
    return fg


def geometry_image(
    geometry: np.ndarray,
    kind: str = "xyz",
    valid: np.ndarray | None = None,
    *,
    height_scale: float | None = None,
    foreground_threshold: float | None = None,
    normal_sigma: float = 1.0,
    flatten_background: bool = True,
    depth_focal_px: float | None = None,
    border_fraction: float = DEFAULT_BORDER_FRACTION,
    inlier_threshold: float = DEFAULT_INLIER_THRESHOLD,
    rng_seed: int = 0,
    source: str | None = None,
) -> GeometryImage:
    """Organized xyz (HxWx3, kind "xyz") or depth (HxW, kind "depth") -> `GeometryImage`.

    height_scale: metres that map to 1.0 in channel 2; None = per sample (99th percentile of
        foreground height, at least 1 mm).
    foreground_threshold: metres above the plane a point must be to count as foreground;
        None = max(1.5 mm, 5 x plane residual sigma, 10% of the per-sample object height). The
        relative term keeps scanner ghosts off the mask: MVTec 3D-AD tables carry bands 2-4 mm
        high next to ~40 mm objects; visible object surfaces rarely sit that low (a lying cylinder
        shows only its upper half).
    normal_sigma: Gaussian sigma (pixels) of the normalized-convolution smoothing of valid points
        before differentiation (0 = differentiate the nearest-filled cloud directly).
    flatten_background: set pixels more than 2 px outside the foreground to the flat-table value
        (0.5, 0.5, 0): table texture noise (MVTec 3D-AD: ~0.4 mm on 0.6 mm pixels, i.e. normals
        tilted by ~20 degrees at random) otherwise reaches the backbone as random features and makes
        per-image max scores noisy. The 2 px margin keeps the object's silhouette normals. Ignored
        when the foreground is empty (nothing is flattened then).
    depth_focal_px: nominal focal length for back-projecting depth (default 5 * max(H, W)).
    source: file name used in error messages.

    Foreground is computed on the *filled* height (then a 3x3 opening), not only on measured points:
    points a scanner drops on the object (dropout stripes, steep walls, and often the defect itself,
    e.g. holes) must stay foreground, or a downstream score mask would erase exactly those defects.
    A missing pixel takes the height of its nearest measured point, so the object outline moves by at
    most half the width of a missing rim. `valid` keeps the measured-only mask.
    """
    if kind == "xyz":
        xyz, ok = _prepare_xyz(geometry, valid, source)
    elif kind == "depth":
        xyz, ok = depth_to_xyz(geometry, valid, depth_focal_px, source)
    else:
        raise DataError(f"geometry kind must be 'xyz' or 'depth', got {kind!r}{_where(source)}")
    if height_scale is not None and not (np.isfinite(height_scale) and height_scale > 0):
        raise DataError(f"height_scale must be a positive number of metres, got {height_scale}")

    n_plane, d_plane, resid = _fit_plane(xyz, ok, rng_seed, border_fraction, inlier_threshold)
    filled = fill_missing(xyz, ok, source)
    n32 = n_plane.astype(np.float32)
    height = filled[:, :, 0] * n32[0] + filled[:, :, 1] * n32[1] + filled[:, :, 2] * n32[2] + np.float32(d_plane)

    base_thr = max(DEFAULT_MIN_FOREGROUND_HEIGHT, 5.0 * resid)
    fg = _clean_mask(height > base_thr)
    fg_heights = height[fg & ok]
    auto_scale = float(np.percentile(fg_heights, 99)) if fg_heights.size else 0.0
    auto_scale = max(auto_scale, _MIN_HEIGHT_SCALE)
    if foreground_threshold is not None:
        thr = float(foreground_threshold)
    else:
        thr = max(base_thr, FOREGROUND_RELATIVE_HEIGHT * auto_scale)
    if thr != base_thr:
        fg = _clean_mask(height > thr)
    scale = auto_scale if height_scale is None else float(height_scale)

    normals = surface_normals(_smooth_valid(xyz, ok, filled, float(normal_sigma)))
    rot = _rotation_to_camera_axis(n_plane).astype(np.float32)

    flat = ~_square_dilation(fg, 2 * BACKGROUND_MARGIN_PX + 1) if flatten_background and fg.any() else None
    channels = []  # each clipped and flattened while contiguous, then interleaved once
    for c, (top, table) in enumerate(((1.0, 0.5), (1.0, 0.5), (HEIGHT_CLIP, 0.0))):
        if c < 2:  # x, y components of the normal in the plane frame, mapped to [0, 1]
            r = rot[c]
            v = (normals[:, :, 0] * r[0] + normals[:, :, 1] * r[1] + normals[:, :, 2] * r[2] + 1.0) * 0.5
        else:
            v = height * np.float32(1.0 / scale)
        np.clip(v, 0.0, top, out=v)
        if flat is not None:
            v[flat] = table
        channels.append(v)
    return GeometryImage(
        image=np.stack(channels, axis=-1),
        foreground=fg,
        valid=ok,
        height=height,
        plane=(float(n_plane[0]), float(n_plane[1]), float(n_plane[2]), float(d_plane)),
        plane_residual=resid,
        height_scale=scale,
        auto_height_scale=auto_scale,
        foreground_threshold=thr,
    )


def sample_geometry_image(sample: Any, **kwargs: Any) -> GeometryImage:
    """`geometry_image` for an `iumad.data.sample.Sample`, naming its geometry file in errors."""
    if sample.geometry is None:
        raise DataError(f"sample {sample.paths} has no geometry; this class is RGB-only")
    src = sample.paths.get("geometry") if isinstance(sample.paths, dict) else None
    kwargs.setdefault("source", str(src) if src is not None else None)
    return geometry_image(sample.geometry, sample.geometry_kind or "xyz", sample.valid, **kwargs)


__all__ = [
    "PREPROCESSING_VERSION",
    "GeometryImage",
    "depth_to_xyz",
    "fill_missing",
    "fit_background_plane",
    "geometry_image",
    "height_above_plane",
    "preprocessing_key",
    "sample_geometry_image",
    "surface_normals",
]
