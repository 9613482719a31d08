"""Tests for iumad.eval.metrics: reference numbers, hand-computed cases, degenerate inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from iumad.eval import metrics as M

LIMITS = (0.3, 0.1, 0.05, 0.01)

# --------------------------------------------------------------------------------------------
# reference data (beside the checkout, or $IUMAD_SHARED)
# --------------------------------------------------------------------------------------------


def _shared_dir() -> Path:
    env = os.environ.get("IUMAD_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def reference():
    shared = _shared_dir()
    ref_dir = shared / "data" / "metric-reference"
    maps_path = ref_dir / "cable_gland_224_maps.npz"
    exp_path = ref_dir / "cable_gland_224_expected.json"
    test_dir = shared / "data" / "mvtec3d-cable_gland-224" / "cable_gland" / "test"
    if not (maps_path.is_file() and exp_path.is_file() and test_dir.is_dir()):
        pytest.skip(
            f"metric reference data not found under {shared} (needs data/metric-reference/"
            "cable_gland_224_{maps.npz,expected.json} and data/mvtec3d-cable_gland-224); "
            "set IUMAD_SHARED to the shared folder"
        )
    from PIL import Image

    data = np.load(maps_path)
    maps = data["maps"].astype(np.float32)  # float16 on disk, scored as float32
    gts = []
    for name in data["names"]:
        defect, stem = str(name).split("/")
        png = test_dir / defect / "gt" / f"{stem}.png"
        if not png.is_file():
            pytest.skip(f"ground-truth mask missing: {png}")
        gts.append(np.asarray(Image.open(png)) > 0)
    expected = json.loads(exp_path.read_text())["expected"]
    return maps, np.stack(gts), expected


@pytest.fixture(scope="module")
def reference_all(reference):
    maps, gts, _ = reference
    return M.compute_all(maps, gts), M.compute_all(maps, gts, exact=False)


def test_reference_image_and_pixel_auroc(reference, reference_all):
    maps, gts, exp = reference
    v2, v1 = reference_all
    assert v2["i_auroc"] == pytest.approx(exp["i_auroc_max"], abs=1e-6)
    assert v2["p_auroc"] == pytest.approx(exp["p_auroc"], abs=1e-6)
    assert v1["i_auroc"] == v2["i_auroc"] and v1["p_auroc"] == v2["p_auroc"]
    labels = M.image_labels(gts)
    assert M.i_auroc(labels, M.image_scores(maps)) == pytest.approx(exp["i_auroc_max"], abs=1e-6)


@pytest.mark.parametrize("limit", LIMITS)
def test_reference_aupro_exact(reference, reference_all, limit):
    _, _, exp = reference
    assert reference_all[0][f"aupro@{limit:g}"] == pytest.approx(
        exp[f"aupro_{limit}_v2_exact"], abs=1e-6
    )


@pytest.mark.parametrize("limit", LIMITS)
def test_reference_aupro_100_thresholds(reference, reference_all, limit):
    _, _, exp = reference
    assert reference_all[1][f"aupro@{limit:g}"] == pytest.approx(
        exp[f"aupro_{limit}_v1_100thr"], abs=1e-6
    )


def test_reference_standalone_functions_agree(reference, reference_all):
    maps, gts, exp = reference
    assert M.aupro(maps, gts) == pytest.approx(exp["aupro_0.3_v2_exact"], abs=1e-6)
    assert M.aupro(maps, gts, fpr_limit=0.05, exact=False) == pytest.approx(
        exp["aupro_0.05_v1_100thr"], abs=1e-6
    )
    assert M.p_auroc(maps, gts) == pytest.approx(exp["p_auroc"], abs=1e-6)
    # float16 input is promoted to float32 and gives the same numbers
    assert M.aupro(maps.astype(np.float16), gts, fpr_limit=0.1) == pytest.approx(
        exp["aupro_0.1_v2_exact"], abs=1e-6
    )
    assert M.p_f1_max(maps, gts) == reference_all[0]["p_f1_max"]


# --------------------------------------------------------------------------------------------
# hand-computed toy
# --------------------------------------------------------------------------------------------

# image 0: defect component {0.9, 0.6} (vertical pair), normal 0.2, 0.1; image 1: all normal.
TOY_MAPS = np.array([[[0.9, 0.2], [0.6, 0.1]], [[0.8, 0.3], [0.4, 0.5]]])
TOY_GTS = np.array([[[1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=bool)


def test_toy_exact_pro_curve_by_hand():
    fprs, pros = M.pro_curve(TOY_MAPS, TOY_GTS)
    # descending: 0.9(d) 0.8 0.6(d) 0.5 0.4 0.3 0.2 0.1 ; 6 normal pixels, 1 component of 2
    np.testing.assert_allclose(fprs, [0, 0, 1 / 6, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
    np.testing.assert_allclose(pros, [0, 0.5, 0.5, 1, 1, 1, 1, 1, 1])


def test_toy_aupro_by_hand():
    # area up to 0.3: 0.5 * 1/6 + 1 * (0.3 - 1/6) = 0.3 - 1/12
    assert M.aupro(TOY_MAPS, TOY_GTS, 0.3) == pytest.approx((0.3 - 1 / 12) / 0.3, abs=1e-12)
    assert M.aupro(TOY_MAPS, TOY_GTS, 1.0) == pytest.approx(11 / 12, abs=1e-12)
    # below the first FPR step the PRO is 0.5
    assert M.aupro(TOY_MAPS, TOY_GTS, 0.1) == pytest.approx(0.5, abs=1e-12)


def test_toy_sampled_pro_curve_by_hand():
    # 2 thresholds at positions 0 and 5 of the sorted normal scores [.1 .2 .3 .4 .5 .8]
    fprs, pros = M.pro_curve(TOY_MAPS, TOY_GTS, exact=False, num_thresholds=2)
    np.testing.assert_allclose(fprs, [0, 5 / 6, 1])
    np.testing.assert_allclose(pros, [0.5, 1, 1])
    # PRO at FPR 0.3 interpolates to 0.5 + 0.5 * 0.3 / (5/6) = 0.68
    expected = 0.5 * (0.68 + 0.5) * 0.3 / 0.3
    assert M.aupro(TOY_MAPS, TOY_GTS, 0.3, exact=False, num_thresholds=2) == pytest.approx(
        expected, abs=1e-12
    )


def test_toy_auroc_and_f1_by_hand():
    # positives .9 .6 against 6 negatives: 6 + 5 of 12 pairs ordered correctly
    assert M.p_auroc(TOY_MAPS, TOY_GTS) == pytest.approx(11 / 12, abs=1e-12)
    assert M.i_auroc([1, 0], M.image_scores(TOY_MAPS)) == 1.0
    # thresholds: >=.9 -> P=1, R=.5, F1=2/3; >=.6 -> P=2/3, R=1, F1=.8 (the best)
    assert M.p_f1_max(TOY_MAPS, TOY_GTS) == pytest.approx(0.8, abs=1e-12)
    out = M.compute_all(TOY_MAPS, TOY_GTS, fpr_limits=(0.3, 1.0))
    assert set(out) == {"i_auroc", "i_f1_max", "p_auroc", "p_f1_max", "aupro@0.3", "aupro@1"}
    assert out["aupro@1"] == pytest.approx(11 / 12, abs=1e-12)
    assert out["i_f1_max"] == 1.0


def test_components_are_8_connected():
    gt = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], dtype=bool)
    scores = np.array([[[0.9, 0.0, 0.0], [0.0, 0.1, 0.1], [0.0, 0.0, 0.0]]])
    scores[0][gt[0] == 0] = -1.0
    _, pros = M.pro_curve(scores, gt)
    # 8-connected: one component of 3 pixels -> the top pixel alone gives PRO 1/3
    # (4-connectivity would give 2 components and PRO 1/2)
    assert pros[1] == pytest.approx(1 / 3)


def test_default_component_weighting_differs_from_pixel_tpr():
    # one big and one small component in different images: PRO averages over components
    gts = np.zeros((2, 4, 4), dtype=bool)
    gts[0, :2, :2] = True  # 4 pixels
    gts[1, 3, 3] = True  # 1 pixel
    maps = np.zeros((2, 4, 4))
    maps[1, 3, 3] = 1.0  # only the small component is found
    fprs, pros = M.pro_curve(maps, gts)
    assert fprs[1] == 0 and pros[1] == pytest.approx(0.5)  # pixel TPR would be 0.2


# --------------------------------------------------------------------------------------------
# extremes and degenerate inputs
# --------------------------------------------------------------------------------------------


def _random_gts(rng, n=3, h=12, w=12):
    gts = np.zeros((n, h, w), dtype=bool)
    gts[0, 2:5, 3:7] = True
    gts[0, 9, 9] = True
    gts[1, 6:, :2] = True
    return gts


@pytest.mark.parametrize("exact", [True, False])
def test_perfect_map(exact):
    gts = _random_gts(np.random.default_rng(0))
    maps = gts.astype(np.float32)
    for lim in LIMITS:
        assert M.aupro(maps, gts, lim, exact=exact) == pytest.approx(1.0)
    out = M.compute_all(maps, gts, exact=exact)
    assert out["p_auroc"] == 1.0 and out["i_auroc"] == 1.0
    assert out["p_f1_max"] == 1.0 and out["i_f1_max"] == 1.0


def test_inverted_map():
    gts = _random_gts(np.random.default_rng(0))
    maps = (~gts).astype(np.float32)
    assert M.p_auroc(maps, gts) == 0.0
    assert M.aupro(maps, gts, 0.3) == 0.0
    # images with a defect get a lower max than the defect-free one
    maps_img = maps.copy()
    maps_img[2] += 1.0
    assert M.i_auroc(M.image_labels(gts), M.image_scores(maps_img)) == 0.0


def test_all_normal_gives_nan():
    maps = np.random.default_rng(1).random((3, 8, 8))
    gts = np.zeros((3, 8, 8), dtype=bool)
    out = M.compute_all(maps, gts)
    assert all(math.isnan(v) for v in out.values()), out
    assert math.isnan(M.aupro(maps, gts))
    assert math.isnan(M.aupro(maps, gts, exact=False))
    assert math.isnan(M.p_auroc(maps, gts))
    assert math.isnan(M.i_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(M.f1_max([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="no defect pixels"):
        M.pro_curve(maps, gts)


def test_all_defect_gives_nan():
    maps = np.random.default_rng(1).random((2, 4, 4))
    gts = np.ones((2, 4, 4), dtype=bool)
    out = M.compute_all(maps, gts)
    assert all(math.isnan(v) for v in out.values()), out
    with pytest.raises(ValueError, match="no normal pixels"):
        M.pro_curve(maps, gts)


def test_defect_free_images_only_add_to_fpr():
    gts = _random_gts(np.random.default_rng(0))
    maps = np.random.default_rng(2).random(gts.shape)
    base = M.aupro(maps[:2], gts[:2], 1.0)
    # a defect-free image scoring below everything changes nothing but the FPR scale
    extra = np.full((1, *gts.shape[1:]), -1.0)
    maps3 = np.concatenate([maps[:2], extra])
    gts3 = np.concatenate([gts[:2], np.zeros_like(gts[:1])])
    fprs, pros = M.pro_curve(maps3, gts3)
    n_ok2 = int((~gts[:2]).sum())
    n_ok3 = int((~gts3).sum())
    f2, p2 = M.pro_curve(maps[:2], gts[:2])
    np.testing.assert_allclose(fprs[: len(f2)], f2 * n_ok2 / n_ok3)
    np.testing.assert_allclose(pros[: len(p2)], p2)
    assert 0 < base < 1


# --------------------------------------------------------------------------------------------
# independent slow implementations on small random data with ties
# --------------------------------------------------------------------------------------------


def _components(gts):
    comps = []
    for i, gt in enumerate(gts):
        lab, n = ndimage.label(gt, structure=np.ones((3, 3), dtype=int))
        comps += [(i, lab == k + 1) for k in range(n)]
    return comps


def _naive_exact(maps, gts):
    comps = _components(gts)
    ok = maps[~gts]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(ok >= t))
        pros.append(np.mean([np.mean(maps[i][m] >= t) for i, m in comps]))
    return np.array(fprs), np.array(pros)


def _naive_sampled(maps, gts, num):
    comps = _components(gts)
    ok = np.sort(maps[~gts])
    fprs, pros = [], []
    for pos in np.linspace(0, ok.size - 1, num=num, dtype=int)[::-1]:
        t = ok[pos]
        fprs.append(1.0 - (pos + 1) / ok.size)
        pros.append(np.mean([np.mean(maps[i][m] > t) for i, m in comps]))
    return np.array(fprs + [1.0]), np.array(pros + [1.0])


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_implementations(seed):
    rng = np.random.default_rng(seed)
    gts = rng.random((4, 10, 10)) < 0.15
    gts[3] = False  # one defect-free image
    maps = rng.integers(0, 12, size=gts.shape).astype(np.float64)  # many ties
    maps += 3.0 * gts
    f, p = M.pro_curve(maps, gts)
    nf, np_ = _naive_exact(maps, gts)
    np.testing.assert_allclose(f, nf, atol=1e-12)
    np.testing.assert_allclose(p, np_, atol=1e-12)
    for num in (2, 7, 100):
        f, p = M.pro_curve(maps, gts, exact=False, num_thresholds=num)
        nf, np_ = _naive_sampled(maps, gts, num)
        np.testing.assert_allclose(f, nf, atol=1e-12)
        np.testing.assert_allclose(p, np_, atol=1e-12)
    assert M.p_auroc(maps, gts) == pytest.approx(roc_auc_score(gts.ravel(), maps.ravel()), abs=1e-12)


def _sk_f1_max(labels, scores):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return f1.max()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=40).filter(
        lambda xs: len({lab for lab, _ in xs}) == 2
    )
)
def test_image_metrics_match_sklearn(pairs):
    labels = np.array([lab for lab, _ in pairs])
    scores = np.array([s for _, s in pairs], dtype=float)
    assert M.i_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.f1_max(labels, scores) == pytest.approx(_sk_f1_max(labels, scores), abs=1e-12)


def test_metrics_invariant_to_monotone_transform():
    rng = np.random.default_rng(3)
    gts = _random_gts(rng)
    maps = rng.random(gts.shape) + gts
    a = M.compute_all(maps, gts)
    b = M.compute_all(np.exp(3 * maps) - 5, gts)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


# --------------------------------------------------------------------------------------------
# image scores
# --------------------------------------------------------------------------------------------


def test_image_scores_max_and_topk():
    maps = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    np.testing.assert_array_equal(M.image_scores(maps), [11, 23])
    np.testing.assert_array_equal(M.image_scores(maps, "topk", k=1), [11, 23])
    np.testing.assert_allclose(M.image_scores(maps, "topk", k=3), [10, 22])
    np.testing.assert_allclose(M.image_scores(maps, "topk", k=0.25), [10, 22])  # 3 of 12
    np.testing.assert_allclose(M.image_scores(maps, "topk", k=1.0), maps.mean(axis=(1, 2)))
    out = M.compute_all(maps, maps > 20, image_reduce="topk", image_k=2)
    assert out["i_auroc"] == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduce": "topk"}, "needs k"),
        ({"reduce": "topk", "k": 0}, "between 1 and"),
        ({"reduce": "topk", "k": 13}, "between 1 and"),
        ({"reduce": "topk", "k": 1.5}, r"\(0, 1\]"),
        ({"reduce": "mean"}, "'max' or 'topk'"),
    ],
)
def test_image_scores_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.image_scores(np.zeros((2, 3, 4)), **kwargs)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_shape_validation():
    maps = np.zeros((2, 4, 4))
    gts = np.zeros((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"maps must have shape \(N, H, W\)"):
        M.aupro(np.zeros((4, 4)), gts[0])
    with pytest.raises(ValueError, match="same shape as maps"):
        M.p_auroc(maps, gts[:1])
    with pytest.raises(ValueError, match="same shape as maps"):
        M.compute_all(maps, np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="non-empty"):
        M.compute_all(np.zeros((0, 4, 4)), np.zeros((0, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.p_auroc(np.full((2, 4, 4), np.nan), gts)
    with pytest.raises(ValueError, match="real numbers"):
        M.p_auroc(maps.astype(bool), gts)
    with pytest.raises(ValueError, match="same length"):
        M.i_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="1-D"):
        M.f1_max(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="0/1"):
        M.i_auroc([0, 2], [0.1, 0.2])


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.5])
def test_fpr_limit_validation(limit):
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(TOY_MAPS, TOY_GTS, fpr_limit=limit)


def test_num_thresholds_validation():
    with pytest.raises(ValueError, match="num_thresholds"):
        M.aupro(TOY_MAPS, TOY_GTS, exact=False, num_thresholds=1)


def test_numeric_gts_are_read_as_positive():
    gts255 = TOY_GTS.astype(np.uint8) * 255
    assert M.aupro(TOY_MAPS, gts255) == M.aupro(TOY_MAPS, TOY_GTS)
