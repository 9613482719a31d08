"""Memory that does not grow with the camera's resolution (issue #17, point 4): samples read at the
backbone's input size, maps kept at it until read, pixel metrics accumulated one sample at a time; and
a generated 2048x2048 class learned, evaluated and predicted in subprocesses under 2 GB peak RSS."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from iumad.data import find_classes
from iumad.data.io import read_geometry_tiff, read_rgb, resample_nearest
from iumad.data.loading import at_size, load_sample
from iumad.data.sample import SampleRecord
from iumad.eval import metrics as M
from iumad.eval.bounded import image_maxima, prediction_metrics
from iumad.model.detector import Prediction
from iumad.model.maps import GridMaps, upsample
from tests.conftest import scene, write_png, write_tiff

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 2 * 1024 ** 3


# ---------------------------------------------------------------------- reading at the input size


def test_original_files_read_at_224_equal_the_shared_224_copy(shared_data: Path) -> None:
    """The byte-exact 400x400 MVTec 3D-AD originals, read at 224, give exactly the arrays of the shared
    224 px copy (rgb bilinear, xyz nearest): full-size data is scored on the inputs the 224 px numbers
    were measured on."""
    fixtures = shared_data / "mvtec3d-fixtures" / "cable_gland"
    small = shared_data / "mvtec3d-cable_gland-224" / "cable_gland"
    if not fixtures.is_dir() or not small.is_dir():
        pytest.skip("shared fixtures or the 224 px cable_gland copy are missing")
    pairs = [(p, small / p.relative_to(fixtures)) for p in sorted(fixtures.rglob("xyz/*.tiff"))]
    assert pairs
    for xyz, xyz_224 in pairs:
        rgb, rgb_224 = (p.parent.parent / "rgb" / f"{p.stem}.png" for p in (xyz, xyz_224))
        rec = SampleRecord("cable_gland", "test", xyz.parent.parent.name, rgb=rgb, geometry=xyz, geometry_kind="xyz")
        s = load_sample(rec, 224)
        assert np.array_equal(s.rgb, read_rgb(rgb_224))
        assert np.array_equal(s.geometry, read_geometry_tiff(xyz_224)[0])
        assert s.gt is None and s.valid.shape == (224, 224)
        full = at_size(load_sample(rec), 224)  # arrays already in memory take the same path
        assert np.array_equal(full.rgb, s.rgb) and np.array_equal(full.geometry, s.geometry)


def test_reading_at_a_size_equals_resizing_what_was_read(tmp_path: Path) -> None:
    rgb, xyz = scene(96, seed=3)
    xyz = np.ascontiguousarray(np.repeat(xyz, 2, axis=1)[:, :96 * 2])  # 96 x 192: not square
    rgb = np.ascontiguousarray(np.repeat(rgb, 2, axis=1))
    xyz[5, 7] = np.nan  # a non-finite coordinate: the point is missing, before or after resampling
    rec = SampleRecord("c", "test", "good", rgb=write_png(tmp_path / "rgb" / "0.png", rgb),
                       geometry=write_tiff(tmp_path / "xyz" / "0.tiff", xyz), geometry_kind="xyz")
    full = load_sample(rec)
    assert full.gt is not None and full.gt.shape == (96, 192)  # a good test sample: an empty mask
    for size in (32, 64, 200):
        small = load_sample(rec, size)
        moved = at_size(full, size)
        assert small.size == (size, size) and small.gt is None
        assert np.array_equal(small.rgb, moved.rgb) and np.array_equal(small.geometry, moved.geometry)
        assert np.array_equal(small.valid, moved.valid)
        assert np.array_equal(small.rgb, np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)))
    read = load_sample(rec, 64)
    assert at_size(read, 64) is read  # already at the size: nothing is copied
    rows = np.arange(64) * 96 // 64
    cols = np.arange(64) * 192 // 64
    assert np.array_equal(resample_nearest(full.geometry, 64), full.geometry[rows][:, cols])


def test_depth_read_at_a_size_equals_resizing_what_was_read(tmp_path: Path) -> None:
    depth = (np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) % 5000 + 1000).astype(np.uint16)
    depth[10:20, 10:20] = 0
    rec = SampleRecord("c", "train", "good", geometry=write_png(tmp_path / "d_depth.png", depth),
                       geometry_kind="depth")
    assert np.array_equal(load_sample(rec, 48).geometry, at_size(load_sample(rec), 48).geometry)


def test_read_at_a_size_still_refuses_rgb_and_geometry_of_different_sizes(tmp_path: Path) -> None:
    from iumad.errors import DataError

    rgb, xyz = scene(32)
    rec = SampleRecord("c", "train", "good", rgb=write_png(tmp_path / "a.png", rgb[:, :30]),
                       geometry=write_tiff(tmp_path / "a.tiff", xyz), geometry_kind="xyz")
    for size in (None, 16):
        with pytest.raises(DataError, match="rgb and geometry must have the same size"):
            load_sample(rec, size)


# ---------------------------------------------------------------------- maps kept at the grid


def test_grid_maps_read_at_the_sample_size_and_keep_only_the_grid() -> None:
    rng = np.random.default_rng(0)
    grid = {"fused": rng.normal(size=(32, 32)).astype(np.float32), "rgb": rng.normal(size=(32, 32)).astype(np.float32)}
    maps = GridMaps(grid, (90, 70))
    assert set(maps) == {"fused", "rgb"} and len(maps) == 2
    want = F.interpolate(torch.from_numpy(grid["fused"])[None, None], size=(90, 70), mode="bilinear",
                         align_corners=False)[0, 0].numpy()
    assert np.array_equal(maps["fused"], want)
    assert maps["fused"].min() >= grid["fused"].min() - 1e-6 and maps["fused"].max() <= grid["fused"].max() + 1e-6
    assert GridMaps(grid, (32, 32))["rgb"] is grid["rgb"]
    assert all(a.shape == (32, 32) for a in maps.grid.values())


# ---------------------------------------------------------------------- metrics one sample at a time


def _reference(shared_data: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    ref = shared_data / "metric-reference"
    test = shared_data / "mvtec3d-cable_gland-224" / "cable_gland" / "test"
    if not (ref / "cable_gland_224_maps.npz").is_file() or not test.is_dir():
        pytest.skip("metric reference data not found")
    data = np.load(ref / "cable_gland_224_maps.npz")
    gts = []
    for name in data["names"]:
        defect, stem = str(name).split("/")
        gts.append(np.asarray(Image.open(test / defect / "gt" / f"{stem}.png")) > 0)
    expected = json.loads((ref / "cable_gland_224_expected.json").read_text())["expected"]
    return data["maps"].astype(np.float32), np.stack(gts), expected


def _binned(maps: np.ndarray, gts: np.ndarray, bins: int = M.DEFAULT_BINS) -> dict[str, float]:
    acc = M.BinnedMetrics(float(maps.min()), float(maps.max()), bins)
    for m, g in zip(maps, gts):
        acc.add(m, g)
    return acc.result()


def test_binned_metrics_reproduce_the_official_values(shared_data: Path) -> None:
    maps, gts, expected = _reference(shared_data)
    got = _binned(maps, gts)
    assert got["i_auroc"] == pytest.approx(expected["i_auroc_max"], abs=1e-6)
    assert got["p_auroc"] == pytest.approx(expected["p_auroc"], abs=1e-6)
    for limit in (0.3, 0.1, 0.05, 0.01):
        assert got[f"aupro@{limit:g}"] == pytest.approx(expected[f"aupro_{limit}_v2_exact"], abs=1e-6)


def test_binned_metrics_match_the_exact_ones_on_continuous_maps_at_twice_the_resolution(shared_data: Path) -> None:
    """The reference maps upsampled to 448 (1.4 M distinct float32 scores, no float16 ties left) and
    their masks: the bins lose less than 1e-6 against the exact sort of every pixel."""
    maps, gts, _ = _reference(shared_data)
    maps, gts = maps[::2], gts[::2]
    up = F.interpolate(torch.from_numpy(maps)[:, None], size=(448, 448), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    big = gts.repeat(2, axis=1).repeat(2, axis=2)
    exact = M.compute_all(up, big)
    got = _binned(up, big)
    for key, value in exact.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    coarse = _binned(up, big, bins=64)  # the bins matter: 64 of them are visibly coarser
    assert max(abs(coarse[k] - exact[k]) for k in exact) > 1e-4


def test_binned_metrics_on_toy_data_and_degenerate_sets() -> None:
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(6, 20, 30)).astype(np.float32)
    gts = np.zeros((6, 20, 30), bool)
    gts[1, 3:8, 4:9] = gts[2, 10:12, 10:20] = gts[2, 0, 0] = True
    maps[gts] += 1.5
    exact = M.compute_all(maps, gts)
    got = _binned(maps, gts)
    assert got.keys() == exact.keys()
    for key in exact:
        assert got[key] == pytest.approx(exact[key], abs=1e-6), key
    no_defect = _binned(maps, np.zeros_like(gts))
    assert np.isnan(no_defect["p_auroc"]) and np.isnan(no_defect["aupro@0.3"]) and np.isnan(no_defect["i_auroc"])
    flat = M.BinnedMetrics(1.0, 1.0)
    for g in gts:
        flat.add(np.ones((20, 30), np.float32), g)
    assert flat.result()["p_auroc"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.BinnedMetrics(0.0, float("nan"))
    with pytest.raises(ValueError, match="no map"):
        M.BinnedMetrics(0.0, 1.0).result()
    with pytest.raises(ValueError, match="NaN"):
        M.BinnedMetrics(0.0, 1.0).add(np.full((2, 2), np.nan), np.zeros((2, 2), bool))


def test_prediction_metrics_equal_compute_all_on_the_full_size_maps(tmp_path: Path) -> None:
    """Predictions whose maps are kept at a 32 px grid, masks at 90x70: the same metrics as stacking
    every upsampled map and mask and sorting all their pixels."""
    rng = np.random.default_rng(2)
    preds, records, sizes, gts = [], [], [], []
    for i in range(8):
        gt = np.zeros((90, 70), np.uint8)
        if i % 2:
            gt[20 + i:40 + i, 10:30 + i] = 255
        grid = rng.normal(size=(32, 32)).astype(np.float32)
        if i % 2:
            grid[8:14, 4:10] += 2.0
        maps = GridMaps({"fused": grid}, (90, 70))
        preds.append(Prediction("c", 1.0, True, float(maps["fused"].max()), maps, {}))
        label = "good" if i % 2 == 0 else "cut"
        records.append(SampleRecord("c", "test", label, rgb=tmp_path / f"{i}.png",
                                    gt=write_png(tmp_path / "gt" / f"{i}.png", gt) if i % 2 else None))
        sizes.append((90, 70))
        gts.append(gt > 0)
    exact = M.compute_all(np.stack([p.maps["fused"] for p in preds]), np.stack(gts), fpr_limits=(0.3,))
    got = prediction_metrics(preds, records, sizes, fpr_limits=(0.3,))
    for key, value in exact.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert np.array_equal(image_maxima(preds), M.image_scores(np.stack([p.maps["fused"] for p in preds])))


# ---------------------------------------------------------------------- peak RSS of real commands


def _peak_rss(args: list[str], env: dict[str, str]) -> tuple[int, subprocess.CompletedProcess]:
    """Run `python -m iumad ARGS` under a wrapper whose only child it is: that child's peak RSS (bytes)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "iumad", *args],
                         capture_output=True, text=True, env=env, timeout=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stderr.strip().splitlines()[-1]) * 1024, res


@pytest.mark.slow
def test_a_2048_px_class_is_learned_evaluated_and_predicted_under_2_gb(tmp_path: Path) -> None:
    """A generated 2048x2048 class (RGB + xyz, 50 MB per point cloud): add-class, evaluate and predict
    (with overlays, which come out at 2048x2048) each peak under 2 GB."""
    from iumad.data.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, n_classes=1, size=2048, n_train=4, n_val=1, n_test=3, workers=1)
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    cfg["train"]["epochs"] = 1  # what training costs in memory does not depend on the epochs
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IUMAD_DEVICE": "cpu"}
    store = ["--store", str(tmp_path / "store")]
    (name,) = [c.name for c in find_classes(data)]
    peak_add, res = _peak_rss(["add-class", name, "--data", str(data / name), "--config", str(config), *store,
                               "--json"], env)
    step = json.loads(res.stdout)
    assert 0.0 <= step["results"][0]["p_auroc"] <= 1.0
    peak_eval, res = _peak_rss(["evaluate", *store, "--json"], env)
    assert json.loads(res.stdout)
    image = next((data / name / "test").glob("*/rgb/000.png"))
    peak_predict, res = _peak_rss(["predict", str(image), "--class", name, "--out", str(tmp_path / "out"), *store,
                                   "--json"], env)
    overlays = json.loads(res.stdout)[0]["overlays"]
    assert overlays and all(Image.open(p).size == (2048, 2048) for p in overlays)
    peaks = {"add-class": peak_add, "evaluate": peak_eval, "predict": peak_predict}
    assert all(v <= LIMIT_BYTES for v in peaks.values()), {k: f"{v / 1e6:.0f} MB" for k, v in peaks.items()}
