"""Anomaly-detection metrics: I-AUROC, P-AUROC, AUPRO (exact and 100-threshold), F1-max.

All pixel-level metrics are computed from a single descending sort of every pixel score, so
scoring a whole test split (e.g. 108 maps of 224x224, ~5.4M pixels) takes about a second.

Conventions
-----------
* ``maps``: anomaly maps, array-like of shape ``(N, H, W)``, real-valued and finite; higher means
  more anomalous. ``float16`` maps are promoted to ``float32`` (as the reference numbers assume);
  ``float32``/``float64`` are used as given (no down-cast, which could create ties).
* ``gts``: ground-truth masks of the same shape ``(N, H, W)``; boolean, or numeric and then read as
  ``gt > 0`` (the convention for MVTec PNG masks with values 0/255).
* Image label = the image has at least one defect pixel.

PRO / AUPRO
-----------
Defect regions are the 8-connected components of each ground-truth mask (``scipy.ndimage.label``
with a 3x3 structure of ones), as in the official MVTec 3D-AD evaluation code.

* ``exact=True`` (official code v2): the PRO curve has one point per distinct score. Each normal
  pixel adds ``1 / num_normal_pixels`` to the FPR, each defect pixel adds
  ``1 / (component_size * num_components)`` to the PRO; pixels are swept by descending score and
  only the last point of each run of equal scores is kept; ``(0, 0)`` is prepended.
* ``exact=False`` (official code v1, as copied in BTF/M3DM ``au_pro_util.py``): the thresholds are
  ``num_thresholds`` equidistant *positions* in the ascending sorted list of normal-pixel scores
  (``np.linspace(0, n_ok - 1, num_thresholds, dtype=int)``), not values spaced between the min and
  max of the maps. At position ``p`` the FPR is ``1 - (p + 1) / n_ok`` (ties ignored, exactly as the
  reference) and the PRO is the mean over components of the fraction of their pixels scoring
  strictly above the threshold. The curve is closed with the point ``(1, 1)`` and has no ``(0, 0)``
  point (its first point is at FPR 0 with the PRO at the highest normal score).

The area is the trapezoidal integral of PRO over FPR from 0 to ``fpr_limit``, with the curve value
at exactly ``fpr_limit`` linearly interpolated, divided by ``fpr_limit``.

Degenerate inputs
-----------------
Metrics that are undefined for the data return ``float('nan')`` instead of raising: AUROC and
F1-max when only one class is present (all-normal or all-defect), AUPRO when there is no defect
pixel or no normal pixel. :func:`pro_curve` raises ``ValueError`` in those cases since there is no
curve to return. Malformed inputs (wrong shapes, NaN/inf scores, bad options) raise ``ValueError``
with a message naming the problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = [
    "DEFAULT_FPR_LIMITS",
    "BinnedMetrics",
    "aupro",
    "compute_all",
    "f1_max",
    "i_auroc",
    "image_labels",
    "image_scores",
    "p_auroc",
    "p_f1_max",
    "pro_curve",
    "trapezoid_area",
]

DEFAULT_FPR_LIMITS: tuple[float, ...] = (0.3, 0.1, 0.05, 0.01)

# 8-connectivity, as in the official MVTec AD / MVTec 3D-AD evaluation code.
_STRUCTURE = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def _check_maps(maps: object, name: str = "maps") -> np.ndarray:
    arr = np.asarray(maps)
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if arr.dtype == np.float16 or np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32 if arr.dtype == np.float16 else np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return arr


def _check_gts(gts: object, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(gts)
    if arr.shape != shape:
        raise ValueError(f"gts must have the same shape as maps {shape}; got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        return arr > 0
    raise ValueError(f"gts must be boolean (or numeric, read as gt > 0); got dtype {arr.dtype}")


def _check_labels_scores(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    lab = np.asarray(labels)
    sc = np.asarray(scores)
    if lab.ndim != 1 or sc.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D; got shapes {lab.shape} and {sc.shape}"
        )
    if lab.shape != sc.shape:
        raise ValueError(
            f"labels and scores must have the same length; got {lab.shape[0]} and {sc.shape[0]}"
        )
    if lab.size == 0:
        raise ValueError("labels and scores are empty")
    if lab.dtype != np.bool_:
        if not (np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.floating)):
            raise ValueError(f"labels must be boolean or 0/1; got dtype {lab.dtype}")
        if not np.isin(lab, (0, 1)).all():
            raise ValueError("labels must be boolean or 0/1")
        lab = lab.astype(bool)
    if sc.dtype == np.bool_ or not (
        np.issubdtype(sc.dtype, np.floating) or np.issubdtype(sc.dtype, np.integer)
    ):
        raise ValueError(f"scores must hold real numbers; got dtype {sc.dtype}")
    if sc.dtype == np.float16 or np.issubdtype(sc.dtype, np.integer):
        sc = sc.astype(np.float64)
    if not np.isfinite(sc).all():
        raise ValueError("scores contain NaN or infinite values")
    return lab, sc


def _check_fpr_limit(fpr_limit: float) -> float:
    lim = float(fpr_limit)
    if not 0.0 < lim <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit!r}")
    return lim


# --------------------------------------------------------------------------------------------
# shared building blocks
# --------------------------------------------------------------------------------------------


class _DescendingRuns:
    """Scores swept from high to low; cumulative sums are read at the end of each run of ties."""

    def __init__(self, scores: np.ndarray) -> None:
        flat = scores.ravel()
        self.order = np.argsort(flat)[::-1]
        s = flat[self.order]
        # last index of each run of equal scores (thresholds where the score changes)
        self.ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
        self.thresholds = s[self.ends]

    def cumulative(self, values: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """Sum of ``values`` over all items scoring >= each threshold (one entry per run)."""
        return np.cumsum(values.ravel()[self.order], dtype=dtype)[self.ends]


def _binary_counts(runs: _DescendingRuns, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) at every distinct threshold, descending."""
    tps = runs.cumulative(positive, dtype=np.int64)
    fps = (runs.ends + 1) - tps
    return tps, fps


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _f1_max_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    denom = tps + fps + n_pos  # 2*tp + fp + fn
    f1 = 2.0 * tps / denom
    return float(f1.max())


def _pro_weights(gts: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1 / (size of its 8-connected defect component), and the component count."""
    weights = np.zeros(gts.shape, dtype=np.float64)
    n_components = 0
    for i, gt in enumerate(gts):
        if not gt.any():
            continue
        labeled, n = ndimage.label(gt, structure=_STRUCTURE)
        sizes = np.bincount(labeled.ravel())
        inv = np.zeros(sizes.shape, dtype=np.float64)
        inv[1:] = 1.0 / sizes[1:]
        weights[i] = inv[labeled]
        n_components += n
    return weights, n_components


def _pro_curve_exact(
    runs: _DescendingRuns, gts: np.ndarray, weights: np.ndarray, n_components: int
) -> tuple[np.ndarray, np.ndarray]:
    n_ok = gts.size - int(np.count_nonzero(gts))
    fprs = runs.cumulative(~gts, dtype=np.int64) / n_ok
    pros = runs.cumulative(weights) / n_components
    np.clip(fprs, 0.0, 1.0, out=fprs)
    np.clip(pros, 0.0, 1.0, out=pros)
    return np.concatenate(([0.0], fprs)), np.concatenate(([0.0], pros))


def _pro_curve_sampled(
    maps: np.ndarray,
    gts: np.ndarray,
    weights: np.ndarray,
    n_components: int,
    num_thresholds: int,
) -> tuple[np.ndarray, np.ndarray]:
    ok_scores = np.sort(maps[~gts].astype(np.float64))
    n_ok = ok_scores.size
    positions = np.linspace(0, n_ok - 1, num=num_thresholds, dtype=int)
    thresholds = ok_scores[positions]  # non-decreasing
    fprs = 1.0 - (positions + 1) / n_ok
    # pro(t_j) = sum of weights of defect pixels scoring > t_j, divided by the component count.
    defect_scores = maps[gts].astype(np.float64)
    defect_weights = weights[gts]
    n_below = np.searchsorted(thresholds, defect_scores, side="left")  # thresholds < score
    w_per_bin = np.bincount(n_below, weights=defect_weights, minlength=num_thresholds + 1)
    # pixels with n_below > j count at threshold j
    pros = np.cumsum(w_per_bin[::-1])[::-1][1:] / n_components
    # ascending FPR order, closed with (1, 1) like the reference implementation
    return (
        np.concatenate((fprs[::-1], [1.0])),
        np.concatenate((pros[::-1], [1.0])),
    )


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def trapezoid_area(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                   x_max: float | None = None) -> float:
    """Trapezoidal area under ``y(x)`` (``x`` ascending) from ``x[0]`` up to ``x_max``.

    When ``x_max`` falls between two samples, ``y(x_max)`` is linearly interpolated and the last
    partial trapezoid is added, as in the official MVTec evaluation code.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length; got {xa.shape} and {ya.shape}")
    correction = 0.0
    if x_max is not None:
        if not np.any(xa == x_max):
            ins = int(np.searchsorted(xa, x_max, side="right"))
            if not 0 < ins < xa.size:
                raise ValueError(f"x_max={x_max} lies outside the curve's x range")
            x0, x1, y0, y1 = xa[ins - 1], xa[ins], ya[ins - 1], ya[ins]
            y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y_interp + y0) * (x_max - x0)
        keep = xa <= x_max
        xa, ya = xa[keep], ya[keep]
    return float(np.sum(0.5 * (ya[1:] + ya[:-1]) * (xa[1:] - xa[:-1])) + correction)


def image_labels(gts: object) -> np.ndarray:
    """Image-level labels: True where the mask has at least one defect pixel. Shape (N,)."""
    arr = np.asarray(gts)
    if arr.ndim != 3:
        raise ValueError(f"gts must have shape (N, H, W); got shape {arr.shape}")
    g = _check_gts(arr, arr.shape)
    return g.reshape(g.shape[0], -1).any(axis=1)


def image_scores(
    maps: object,
    reduce: Literal["max", "topk"] = "max",
    k: int | float | None = None,
) -> np.ndarray:
    """Image anomaly scores from maps, shape (N,).

    ``reduce="max"``: maximum of each map (default). ``reduce="topk"``: mean of the ``k`` highest
    pixels of each map; an ``int`` ``k`` is a pixel count (>= 1), a ``float`` ``k`` in (0, 1] a
    fraction of the pixels (rounded up, at least one pixel).
    """
    m = _check_maps(maps)
    flat = m.reshape(m.shape[0], -1)
    if reduce == "max":
        return flat.max(axis=1).astype(np.float64)
    if reduce != "topk":
        raise ValueError(f"reduce must be 'max' or 'topk'; got {reduce!r}")
    n_pix = flat.shape[1]
    if k is None or isinstance(k, bool):
        raise ValueError("reduce='topk' needs k (an int pixel count or a float fraction in (0, 1])")
    if isinstance(k, (int, np.integer)):
        count = int(k)
        if not 1 <= count <= n_pix:
            raise ValueError(f"k must be between 1 and {n_pix} pixels; got {k}")
    elif isinstance(k, (float, np.floating)):
        if not 0.0 < float(k) <= 1.0:
            raise ValueError(f"a float k is a fraction and must be in (0, 1]; got {k}")
        count = max(1, math.ceil(float(k) * n_pix - 1e-9))
    else:
        raise ValueError(f"k must be an int or a float; got {type(k).__name__}")
    top = np.partition(flat, n_pix - count, axis=1)[:, n_pix - count:]
    return top.astype(np.float64).mean(axis=1)


def i_auroc(labels: object, scores: object) -> float:
    """Image-level AUROC (equals ``sklearn.metrics.roc_auc_score``); nan if one class only."""
    lab, sc = _check_labels_scores(labels, scores)
    return _auroc_from_counts(*_binary_counts(_DescendingRuns(sc), lab))


def f1_max(labels: object, scores: object) -> float:
    """Maximum F1 over all thresholds of the precision-recall curve; nan if one class only."""
    lab, sc = _check_labels_scores(labels, scores)
    return _f1_max_from_counts(*_binary_counts(_DescendingRuns(sc), lab))


def p_auroc(maps: object, gts: object) -> float:
    """Pixel-level AUROC over all pixels of all maps; nan without defect or normal pixels."""
    m = _check_maps(maps)
    g = _check_gts(gts, m.shape)
    return _auroc_from_counts(*_binary_counts(_DescendingRuns(m), g))


def p_f1_max(maps: object, gts: object) -> float:
    """Pixel-level F1-max over all pixels of all maps; nan without defect or normal pixels."""
    m = _check_maps(maps)
    g = _check_gts(gts, m.shape)
    return _f1_max_from_counts(*_binary_counts(_DescendingRuns(m), g))


def _check_num_thresholds(num_thresholds: int) -> int:
    if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)):
        raise ValueError(f"num_thresholds must be an int; got {num_thresholds!r}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2; got {num_thresholds}")
    return int(num_thresholds)


def pro_curve(
    maps: object,
    gts: object,
    exact: bool = True,
    num_thresholds: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve ``(fprs, pros)``, FPR ascending (see the module docstring for both modes).

    Raises ``ValueError`` when the ground truth has no defect pixel or no normal pixel.
    """
    m = _check_maps(maps)
    g = _check_gts(gts, m.shape)
    n_def = int(np.count_nonzero(g))
    if n_def == 0:
        raise ValueError("PRO curve undefined: ground truth has no defect pixels")
    if n_def == g.size:
        raise ValueError("PRO curve undefined: ground truth has no normal pixels")
    weights, n_comp = _pro_weights(g)
    if exact:
        return _pro_curve_exact(_DescendingRuns(m), g, weights, n_comp)
    return _pro_curve_sampled(m, g, weights, n_comp, _check_num_thresholds(num_thresholds))


def aupro(
    maps: object,
    gts: object,
    fpr_limit: float = 0.3,
    exact: bool = True,
    num_thresholds: int = 100,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``; nan when undefined."""
    lim = _check_fpr_limit(fpr_limit)
    m = _check_maps(maps)
    g = _check_gts(gts, m.shape)
    n_def = int(np.count_nonzero(g))
    if n_def == 0 or n_def == g.size:
        return float("nan")
    fprs, pros = pro_curve(m, g, exact=exact, num_thresholds=num_thresholds)
    return trapezoid_area(fprs, pros, x_max=lim) / lim


def compute_all(
    maps: object,
    gts: object,
    fpr_limits: Sequence[float] = DEFAULT_FPR_LIMITS,
    image_reduce: Literal["max", "topk"] = "max",
    image_k: int | float | None = None,
    exact: bool = True,
    num_thresholds: int = 100,
) -> dict[str, float]:
    """All metrics for one class.

    Keys: ``i_auroc``, ``i_f1_max``, ``p_auroc``, ``p_f1_max`` and ``aupro@<limit>`` for each limit
    (formatted with ``:g``, e.g. ``aupro@0.3``, ``aupro@0.05``). Undefined values are nan.
    Pixel metrics share one sort of all pixel scores.
    """
    limits = [_check_fpr_limit(lim) for lim in fpr_limits]
    m = _check_maps(maps)
    g = _check_gts(gts, m.shape)

    labels = g.reshape(g.shape[0], -1).any(axis=1)
    scores = image_scores(m, reduce=image_reduce, k=image_k)
    img_counts = _binary_counts(_DescendingRuns(scores), labels)

    runs = _DescendingRuns(m)
    pix_counts = _binary_counts(runs, g)
    out: dict[str, float] = {
        "i_auroc": _auroc_from_counts(*img_counts),
        "i_f1_max": _f1_max_from_counts(*img_counts),
        "p_auroc": _auroc_from_counts(*pix_counts),
        "p_f1_max": _f1_max_from_counts(*pix_counts),
    }
    n_def = int(pix_counts[0][-1])
    if n_def == 0 or n_def == g.size:
        for lim in limits:
            out[f"aupro@{lim:g}"] = float("nan")
        return out
    weights, n_comp = _pro_weights(g)
    if exact:
        fprs, pros = _pro_curve_exact(runs, g, weights, n_comp)
    else:
        fprs, pros = _pro_curve_sampled(
            m, g, weights, n_comp, _check_num_thresholds(num_thresholds)
        )
    for lim in limits:
        out[f"aupro@{lim:g}"] = trapezoid_area(fprs, pros, x_max=lim) / lim
    return out


# --------------------------------------------------------------------------------------------
# bounded memory: one map at a time
# --------------------------------------------------------------------------------------------


DEFAULT_BINS = 1 << 20


class BinnedMetrics:
    """The metrics of `compute_all` (exact PRO curve) accumulated one map at a time, in bounded memory.

    `compute_all` sorts every pixel of the whole set at once: about 40 bytes per pixel, 2-3 GB for 112
    maps of 800x600. Here each map's pixels are counted into ``bins`` equal-width score bins between
    ``lo`` and ``hi`` (normal pixels, defect pixels, and each defect pixel's PRO weight, 1 / the size
    of its 8-connected component), so memory is ``24 * bins`` bytes whatever the resolution and the
    number of maps. The curves swept over the bins are the exact curves read at the bin edges only (a
    subset of their vertices); within a bin, scores count as tied. Image scores are each map's maximum,
    kept exactly. Scores outside ``[lo, hi]`` go to the end bins, so give the range of the maps (an
    upsampled map never leaves its grid's range).
    """

    def __init__(self, lo: float, hi: float, bins: int = DEFAULT_BINS) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
            raise ValueError(f"score range must be finite with lo <= hi; got [{lo}, {hi}]")
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
            raise ValueError(f"bins must be an int >= 2; got {bins!r}")
        self.lo, self.bins = float(lo), int(bins)
        self.scale = self.bins / (hi - lo) if hi > lo else 0.0
        self.normal = np.zeros(self.bins, dtype=np.int64)
        self.defect = np.zeros(self.bins, dtype=np.int64)
        self.pro = np.zeros(self.bins, dtype=np.float64)
        self.components = 0
        self.image_scores: list[float] = []
        self.image_labels: list[bool] = []

    def add(self, score_map: object, gt: object) -> None:
        """Count one (H, W) map and its (H, W) ground truth (bool, or numeric read as gt > 0)."""
        m = _check_maps(np.asarray(score_map)[None], "score_map")[0]
        g = _check_gts(np.asarray(gt)[None], (1, *m.shape))[0]
        idx = np.clip(((m.astype(np.float64) - self.lo) * self.scale).astype(np.int64), 0, self.bins - 1)
        inside = idx[g]
        self.normal += np.bincount(idx[~g], minlength=self.bins)
        self.defect += np.bincount(inside, minlength=self.bins)
        if inside.size:
            labeled, n = ndimage.label(g, structure=_STRUCTURE)
            inv = np.zeros(n + 1, dtype=np.float64)
            inv[1:] = 1.0 / np.bincount(labeled.ravel(), minlength=n + 1)[1:]
            self.pro += np.bincount(inside, weights=inv[labeled[g]], minlength=self.bins)
            self.components += n
        self.image_scores.append(float(m.max()))
        self.image_labels.append(bool(inside.size))

    def result(self, fpr_limits: Sequence[float] = DEFAULT_FPR_LIMITS) -> dict[str, float]:
        """The keys of `compute_all` (``i_auroc``, ``i_f1_max``, ``p_auroc``, ``p_f1_max``,
        ``aupro@<limit>``); nan where undefined."""
        limits = [_check_fpr_limit(lim) for lim in fpr_limits]
        if not self.image_scores:
            raise ValueError("no map was added")
        scores = np.asarray(self.image_scores)
        img_counts = _binary_counts(_DescendingRuns(scores), np.asarray(self.image_labels))
        used = np.flatnonzero((self.normal + self.defect)[::-1])  # non-empty bins, highest scores first
        tps = np.cumsum(self.defect[::-1])[used]
        fps = np.cumsum(self.normal[::-1])[used]
        out = {"i_auroc": _auroc_from_counts(*img_counts), "i_f1_max": _f1_max_from_counts(*img_counts),
               "p_auroc": _auroc_from_counts(tps, fps), "p_f1_max": _f1_max_from_counts(tps, fps)}
        if tps[-1] == 0 or fps[-1] == 0:
            return out | {f"aupro@{lim:g}": float("nan") for lim in limits}
        fprs = np.clip(np.concatenate(([0.0], fps / fps[-1])), 0.0, 1.0)
        pros = np.clip(np.concatenate(([0.0], np.cumsum(self.pro[::-1])[used] / self.components)), 0.0, 1.0)
        for lim in limits:
            out[f"aupro@{lim:g}"] = trapezoid_area(fprs, pros, x_max=lim) / lim
        return out
