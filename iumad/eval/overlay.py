"""Human-readable outputs of a prediction: heat-map overlay PNGs, per-sample rows and a CSV.

People check an anomaly detector by looking at where it fires, so every predicted sample can be
written as up to three PNGs (map on the RGB image, map on the rendered geometry, the map alone) plus
one CSV row. Everything is numpy / PIL / scipy; matplotlib is used only for its colormap table (no
pyplot, no display backend).

Colour scale. The detector's maps are z-scores: each class's maps are standardised with the mean and
standard deviation of its held-out normal samples, so normal pixels sit around 0 and rarely exceed 3.
Every overlay therefore uses one fixed scale, ``vmin = 0`` and ``vmax = max(3, 1.5 * threshold)``
(``vmax = 3`` without a threshold), see `color_range`. A fixed scale makes images of one run directly
comparable (a per-image min-max scale would paint every normal image bright red somewhere), and with
a threshold the decision boundary always falls at two thirds of the scale (yellow-orange in "jet"),
with everything clearly above it saturated red. Values outside the range are clipped.

Contour. With a threshold, the pixels on the inner boundary of ``map >= threshold`` (the mask minus
its binary erosion, 4-connected, so a 1-pixel line) are painted white; the image border does not
count as a boundary, so a map above threshold everywhere draws no frame.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from iumad.store.atomic import atomic_write_bytes

if TYPE_CHECKING:  # the detector pulls in torch; overlays do not need it at run time
    from iumad.data.sample import Sample, SampleRecord
    from iumad.model.detector import Prediction

COLORMAP = "jet"
Z_RANGE_MIN = 3.0  # vmax never below 3 standard deviations of normal pixels
THRESHOLD_HEADROOM = 1.5  # vmax = 1.5 x threshold when that is larger: the threshold sits at 2/3
CONTOUR_COLOUR = (255, 255, 255)
MODALITY_SCORE_KEYS = ("rgb", "geometry")
_STEM_MAX = 120
_LUT: np.ndarray | None = None


def _lut() -> np.ndarray:
    """(256, 3) uint8 colour table of `COLORMAP`, built once (importing matplotlib is slow)."""
    global _LUT
    if _LUT is None:
        import matplotlib

        cmap = matplotlib.colormaps[COLORMAP]
        _LUT = np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)
    return _LUT


def color_range(threshold: float | None) -> tuple[float, float]:
    """The shared (vmin, vmax) of every overlay: 0 to max(3, 1.5 x threshold), see the module docstring."""
    if threshold is None or not math.isfinite(threshold):
        return 0.0, Z_RANGE_MIN
    return 0.0, max(Z_RANGE_MIN, THRESHOLD_HEADROOM * float(threshold))


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 map resized bilinearly to `size` = (H, W); returned as is when it already fits.

    Maps may come at the model's input resolution while the image is at its own; the overlay must
    be drawn pixel for pixel on the image.
    """
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D (H, W), got shape {amap.shape}")
    h, w = int(size[0]), int(size[1])
    if amap.shape == (h, w):
        return amap
    resized = Image.fromarray(np.ascontiguousarray(amap)).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 colours of `COLORMAP`, values clipped to [vmin, vmax].

    NaN / -inf count as vmin and +inf as vmax, so a broken pixel never crashes a report.
    """
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= vmin:
        raise ValueError(f"colour range needs finite vmin < vmax, got [{vmin}, {vmax}]")
    a = np.asarray(amap, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D (H, W), got shape {a.shape}")
    a = np.nan_to_num(a, nan=vmin, posinf=vmax, neginf=vmin)
    t = (np.clip(a, vmin, vmax) - vmin) / (vmax - vmin)
    idx = np.round(t * 255.0).astype(np.intp)
    return _lut()[idx]


def threshold_contour(amap: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: inner boundary pixels of ``amap >= threshold`` (1 px, the image edge is no boundary)."""
    mask = np.asarray(amap) >= threshold
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def heat_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                 alpha: float = 0.5) -> np.ndarray:
    """Blend the colour-mapped `amap` onto an (H, W, 3) uint8 image: ``(1-alpha) image + alpha colour``.

    The map is resized bilinearly to the image when the sizes differ; values are clipped to
    [vmin, vmax] so that all overlays of a run share one scale.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {img.shape} dtype {img.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colour = colorize(resize_map(amap, img.shape[:2]), vmin, vmax)
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_geometry(sample: Sample) -> np.ndarray:
    """(H, W, 3) uint8 picture of the sample's geometry: the backbone's 3-channel geometry image.

    Channels are (normal-x, normal-y, height); the height channel (range [0, 1.5]) is divided by 1.5
    so that nothing saturates. Raises DataError when the sample has no geometry.
    """
    from iumad.data.geometry import HEIGHT_CLIP, sample_geometry_image

    img = sample_geometry_image(sample).image.astype(np.float32)
    img = img / np.array([1.0, 1.0, HEIGHT_CLIP], dtype=np.float32)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def rgb_image(sample: Sample) -> np.ndarray:
    """The sample's colour image as (H, W, 3) uint8 (a grey image repeated over three channels)."""
    rgb = np.asarray(sample.rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    return rgb.astype(np.uint8, copy=False)


def paint_contour(image: np.ndarray, amap: np.ndarray, threshold: float | None) -> np.ndarray:
    """A copy of `image` with the white contour of ``amap >= threshold`` (unchanged without a threshold)."""
    if threshold is None or not math.isfinite(threshold):
        return image
    edge = threshold_contour(resize_map(amap, image.shape[:2]), threshold)
    out = image.copy()
    out[edge] = CONTOUR_COLOUR
    return out


def png_bytes(arr: np.ndarray) -> bytes:
    """An image array encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_png(path: Path, arr: np.ndarray) -> Path:
    atomic_write_bytes(path, png_bytes(arr))
    return path


def write_overlays(sample: Sample, prediction: Prediction, out_dir: Path, stem: str,
                   threshold: float | None, alpha: float = 0.5) -> list[Path]:
    """Write `<stem>_rgb.png`, `<stem>_geometry.png`, `<stem>_fused.png` into `out_dir`; return the paths.

    rgb: the fused map on the RGB image (only when the sample has RGB). geometry: the geometry map
    (the fused one when there is none) on the rendered geometry image (only with geometry). fused:
    the fused map alone, colour-mapped. All three are at the sample's size, share `color_range`,
    and carry the white contour of ``map >= threshold`` when a threshold is given. Each file is
    written atomically, so an interrupted run never leaves a truncated PNG.
    """
    if not stem or "/" in stem or "\\" in stem or ".." in stem:
        raise ValueError(f"stem must be a plain file-name part (see safe_stem), got {stem!r}")
    if "fused" not in prediction.maps:
        raise ValueError("prediction has no 'fused' map")
    out_dir = Path(out_dir)
    vmin, vmax = color_range(threshold)
    size = sample.size
    fused = resize_map(prediction.maps["fused"], size)
    written: list[Path] = []
    if sample.rgb is not None:
        img = heat_overlay(rgb_image(sample), fused, vmin, vmax, alpha)
        written.append(_write_png(out_dir / f"{stem}_rgb.png", paint_contour(img, fused, threshold)))
    if sample.geometry is not None:
        gmap = resize_map(prediction.maps.get("geometry", prediction.maps["fused"]), size)
        img = heat_overlay(render_geometry(sample), gmap, vmin, vmax, alpha)
        written.append(_write_png(out_dir / f"{stem}_geometry.png", paint_contour(img, gmap, threshold)))
    img = paint_contour(colorize(fused, vmin, vmax), fused, threshold)
    written.append(_write_png(out_dir / f"{stem}_fused.png", img))
    return written


def _path_of(item: str | Path | SampleRecord) -> str:
    if isinstance(item, (str, PurePath)):
        return str(item)
    for attr in ("rgb", "geometry"):  # a SampleRecord: name it by its first file
        p = getattr(item, attr, None)
        if p is not None:
            return str(p)
    return str(item)


def _modality_score(prediction: Prediction, key: str) -> float | None:
    if key in prediction.branch_scores:
        return float(prediction.branch_scores[key])
    if key in prediction.maps:
        return float(np.max(prediction.maps[key]))
    return None


def prediction_rows(records_or_paths: Sequence[str | Path | SampleRecord], predictions: Sequence[Prediction],
                    thresholds: Mapping[str, float]) -> list[dict[str, Any]]:
    """One report row per sample, in input order.

    Keys (always all present, so CSV columns are stable): path, class, class_given,
    class_probability, score, threshold (None when the class has no finite threshold), decision
    ("anomalous" when score >= threshold, "normal" below it, "unknown" without a threshold),
    score_rgb and score_geometry (the modality maps' image scores, None when the modality is absent).
    """
    if len(records_or_paths) != len(predictions):
        raise ValueError(f"{len(records_or_paths)} paths but {len(predictions)} predictions")
    rows: list[dict[str, Any]] = []
    for item, pred in zip(records_or_paths, predictions):
        thr = thresholds.get(pred.class_name)
        thr = float(thr) if thr is not None and math.isfinite(float(thr)) else None
        score = float(pred.score)
        if thr is None:
            decision = "unknown"
        else:
            decision = "anomalous" if score >= thr else "normal"
        row: dict[str, Any] = {
            "path": _path_of(item),
            "class": pred.class_name,
            "class_given": bool(pred.class_given),
            "class_probability": float(pred.class_probability),
            "score": score,
            "threshold": thr,
            "decision": decision,
        }
        for key in MODALITY_SCORE_KEYS:
            row[f"score_{key}"] = _modality_score(pred, key)
        rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write rows as UTF-8 CSV (columns: union of keys in first-seen order; None -> empty), atomically.

    An empty `rows` gives an empty file. Returns `path`.
    """
    columns: list[str] = []
    seen: set[str] = set()
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    buf = io.StringIO()
    if columns:
        writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return path


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")


def safe_stem(path: str, index: int) -> str:
    """`<index:04d>_<last two path parts>`, ASCII-only, for output file names that never collide.

    The index keeps stems unique even when two inputs share their last two parts; the path parts keep
    them recognisable. Both '/' and '\\' split parts, '.' and '..' parts are dropped, the extension
    of the last part is removed, every character outside [A-Za-z0-9._-] becomes '_', runs of dots
    become '_' (so '..' never appears) and the result is capped at 120 characters.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    parts = [p for p in re.split(r"[\\/]+", str(path)) if p not in ("", ".", "..")]
    tail = parts[-2:]
    if tail:
        last = tail[-1]
        dot = last.rfind(".")
        if dot > 0:
            tail[-1] = last[:dot]
    cleaned = []
    for part in tail:
        p = _DOTS.sub("_", _UNSAFE.sub("_", part)).strip("._")
        if p:
            cleaned.append(p)
    stem = "_".join([f"{int(index):04d}", *cleaned])[:_STEM_MAX].rstrip(".")
    return stem


__all__ = [
    "COLORMAP",
    "color_range",
    "colorize",
    "heat_overlay",
    "prediction_rows",
    "render_geometry",
    "resize_map",
    "safe_stem",
    "threshold_contour",
    "write_csv",
    "write_overlays",
]
