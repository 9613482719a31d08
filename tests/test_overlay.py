"""Overlay PNGs, report rows, CSV and safe file stems of `iumad.eval.overlay`."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from iumad.data.loading import load_sample
from iumad.data.sample import Sample, SampleRecord
from iumad.eval.overlay import (
    color_range,
    colorize,
    heat_overlay,
    prediction_rows,
    safe_stem,
    threshold_contour,
    write_csv,
    write_overlays,
)
from iumad.model.detector import Prediction
from tests.conftest import scene, write_png, write_tiff

SIZE = 32
SQ = slice(8, 18)  # the anomalous square, rows and columns 8..17
HOT = tuple(int(round(c * 255)) for c in matplotlib.colormaps["jet"](1.0)[:3])
COLD = tuple(int(round(c * 255)) for c in matplotlib.colormaps["jet"](0.0)[:3])
WHITE = (255, 255, 255)


def square_map(size: int = SIZE, value: float = 6.0, sq: slice = SQ) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    m[sq, sq] = value
    return m


def make_prediction(maps: dict[str, np.ndarray], score: float | None = None, class_name: str = "bolt",
                    branch_scores: dict[str, float] | None = None) -> Prediction:
    bs = {k: float(v.max()) for k, v in maps.items()} if branch_scores is None else branch_scores
    return Prediction(class_name, 0.9, False, float(maps["fused"].max()) if score is None else score, maps, bs)


@pytest.fixture
def loaded(tmp_path: Path) -> Sample:
    """RGB (flat grey) + xyz sample read from files like any dataset sample."""
    _, xyz = scene(SIZE)
    rgb = np.full((SIZE, SIZE, 3), 128, np.uint8)
    rec = SampleRecord("bolt", "test", "crack", rgb=write_png(tmp_path / "in" / "rgb.png", rgb),
                       geometry=write_tiff(tmp_path / "in" / "xyz.tiff", xyz), geometry_kind="xyz")
    return load_sample(rec)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _contour_ring(sq: slice = SQ, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((size, size), bool)
    mask[sq, sq] = True
    inner = np.zeros_like(mask)
    inner[sq.start + 1: sq.stop - 1, sq.start + 1: sq.stop - 1] = True
    return mask & ~inner, inner


def test_write_overlays_files_sizes_colours_and_contour(loaded: Sample, tmp_path: Path) -> None:
    pred = make_prediction({"fused": square_map(), "rgb": square_map(), "geometry": square_map()})
    out = tmp_path / "out"
    paths = write_overlays(loaded, pred, out, "0001_bolt", threshold=2.0)
    assert [p.name for p in paths] == ["0001_bolt_rgb.png", "0001_bolt_geometry.png", "0001_bolt_fused.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temporaries left
    ring, inner = _contour_ring()
    outside = np.ones((SIZE, SIZE), bool)
    outside[6:20, 6:20] = False

    fused = _read(out / "0001_bolt_fused.png")
    assert fused.shape == (SIZE, SIZE, 3)
    assert (fused[ring] == WHITE).all()
    assert (fused[inner] == HOT).all()  # 6 sd with vmax = max(3, 1.5 * 2): saturated hot end
    assert (fused[outside] == COLD).all()
    assert not (fused[~ring] == WHITE).all(axis=1).any()  # white only on the contour

    rgb = _read(out / "0001_bolt_rgb.png").astype(int)
    assert rgb.shape == (SIZE, SIZE, 3)
    assert (rgb[ring] == WHITE).all()
    # grey 128 blended half with jet: the hot end inside (red), the cold end outside (blue)
    assert (rgb[inner] == np.round(0.5 * 128 + 0.5 * np.array(HOT))).all()
    assert (rgb[outside] == np.round(0.5 * 128 + 0.5 * np.array(COLD))).all()
    assert (rgb[inner][:, 0] > rgb[inner][:, 2] + 50).all()
    assert (rgb[outside][:, 2] > rgb[outside][:, 0] + 50).all()

    geo = _read(out / "0001_bolt_geometry.png").astype(int)
    assert geo.shape == (SIZE, SIZE, 3)
    assert (geo[ring] == WHITE).all()
    assert geo[inner][:, 0].mean() > geo[outside][:, 0].mean() + 50


def test_geometry_overlay_uses_geometry_map_and_falls_back_to_fused(loaded: Sample, tmp_path: Path) -> None:
    other = np.zeros((8, 8), np.float32)
    other[0:3, 0:3] = 6.0  # top-left after resizing: not where the fused square is
    pred = make_prediction({"fused": square_map(), "geometry": np.kron(other, np.ones((4, 4), np.float32))})
    write_overlays(loaded, pred, tmp_path, "a", threshold=2.0)
    geo = _read(tmp_path / "a_geometry.png")
    ring, _ = _contour_ring()
    assert not (geo[ring] == WHITE).all(axis=1).all()
    white = (geo == WHITE).all(axis=-1)
    assert white[11, 0:11].all() and white[0:11, 11].all()  # the geometry map's square, open at the edge
    assert white.sum() == 23

    pred = make_prediction({"fused": square_map()})  # no geometry map: the fused one is drawn
    write_overlays(loaded, pred, tmp_path, "b", threshold=2.0)
    assert (_read(tmp_path / "b_geometry.png")[ring] == WHITE).all()


def test_map_size_mismatch_is_resized(loaded: Sample, tmp_path: Path) -> None:
    small = np.zeros((16, 16), np.float32)
    small[4:9, 4:9] = 6.0  # covers 8..17 of the 32-pixel image
    pred = make_prediction({"fused": small})
    paths = write_overlays(loaded, pred, tmp_path, "s", threshold=2.0)
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (SIZE, SIZE)
    fused = _read(tmp_path / "s_fused.png")
    assert (fused[12, 12] == HOT).all() and (fused[28, 28] == COLD).all()

    img = np.full((20, 30, 3), 128, np.uint8)
    over = heat_overlay(img, np.ones((5, 6), np.float32) * 9.0, 0.0, 3.0)
    assert over.shape == (20, 30, 3) and over.dtype == np.uint8
    expected = np.round(0.5 * 128 + 0.5 * np.array(HOT)).astype(np.uint8)
    assert (over == expected).all()


def test_no_threshold_no_contour_and_single_modality_samples(tmp_path: Path) -> None:
    rgb_only = Sample("disc", "crack", rgb=np.full((SIZE, SIZE, 3), 50, np.uint8))
    pred = make_prediction({"fused": square_map()})
    paths = write_overlays(rgb_only, pred, tmp_path, "r", threshold=None)
    assert [p.name for p in paths] == ["r_rgb.png", "r_fused.png"]
    fused = _read(tmp_path / "r_fused.png")
    assert not (fused == WHITE).all(axis=-1).any()
    assert (fused[12, 12] == HOT).all()  # vmax = 3 without a threshold

    _, xyz = scene(SIZE)
    geo_only = Sample("ring", "good", geometry=xyz, geometry_kind="xyz", valid=np.any(xyz != 0, axis=-1))
    paths = write_overlays(geo_only, pred, tmp_path / "g", "g", threshold=1.0)
    assert [p.name for p in paths] == ["g_geometry.png", "g_fused.png"]


def test_colour_scale_is_shared_and_clipped() -> None:
    assert color_range(None) == (0.0, 3.0)
    assert color_range(1.0) == (0.0, 3.0)
    assert color_range(4.0) == (0.0, 6.0)
    c = colorize(np.array([[-5.0, 0.0, np.nan, 3.0, 99.0, np.inf]]), 0.0, 3.0)
    assert (c[0, 0] == COLD).all() and (c[0, 1] == COLD).all() and (c[0, 2] == COLD).all()
    assert (c[0, 3] == HOT).all() and (c[0, 4] == HOT).all() and (c[0, 5] == HOT).all()
    mid = colorize(np.array([[1.5]]), 0.0, 3.0)[0, 0]
    assert tuple(mid) not in (HOT, COLD)
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2)), 1.0, 1.0)
    with pytest.raises(ValueError):
        heat_overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4)), 0.0, 1.0)


def test_threshold_contour_is_one_pixel_and_ignores_image_border() -> None:
    ring, inner = _contour_ring()
    assert (threshold_contour(square_map(), 2.0) == ring).all()
    assert not threshold_contour(np.full((8, 8), 5.0), 2.0).any()
    assert not threshold_contour(np.zeros((8, 8)), 2.0).any()


def test_prediction_rows_decisions() -> None:
    f = square_map()
    preds = [
        make_prediction({"fused": f, "rgb": f, "geometry": f}, score=5.0,
                        branch_scores={"fused": 5.0, "rgb": 4.0, "geometry": 3.5}),
        make_prediction({"fused": f, "rgb": f}, score=1.0, branch_scores={"fused": 1.0, "rgb": 0.5}),
        make_prediction({"fused": f, "geometry": f}, score=2.0, branch_scores={"fused": 2.0}),
        make_prediction({"fused": f}, score=9.0, class_name="disc"),
    ]
    rec = SampleRecord("bolt", "test", "good", geometry=Path("bolt/test/good/xyz/3.tiff"))
    rows = prediction_rows(["a.png", Path("b.png"), rec, "d.png"], preds, {"bolt": 2.0, "ring": 1.0})
    assert [r["decision"] for r in rows] == ["anomalous", "normal", "anomalous", "unknown"]  # 2.0 >= 2.0
    assert [r["threshold"] for r in rows] == [2.0, 2.0, 2.0, None]
    assert [r["path"] for r in rows] == ["a.png", "b.png", str(rec.geometry), "d.png"]
    assert rows[0]["score_rgb"] == 4.0 and rows[0]["score_geometry"] == 3.5
    assert rows[1]["score_rgb"] == 0.5 and rows[1]["score_geometry"] is None
    assert rows[2]["score_rgb"] is None and rows[2]["score_geometry"] == pytest.approx(6.0)  # from the map
    assert rows[0]["class"] == "bolt" and rows[0]["class_given"] is False
    assert rows[0]["class_probability"] == pytest.approx(0.9) and rows[0]["score"] == 5.0
    assert list(rows[0]) == list(rows[3])  # the same keys in the same order for every row
    assert prediction_rows(["x"], preds[:1], {"bolt": float("nan")})[0]["decision"] == "unknown"
    with pytest.raises(ValueError):
        prediction_rows(["a", "b"], preds[:1], {})


def test_csv_round_trip(tmp_path: Path) -> None:
    rows = [
        {"path": "dir,with comma/é.png", "score": 1.25, "threshold": None, "decision": "unknown"},
        {"path": 'quote"d\nline', "score": 3.0, "threshold": 2.0, "decision": "anomalous", "extra": "x"},
    ]
    path = write_csv(rows, tmp_path / "sub" / "report.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "score", "threshold", "decision", "extra"]
        back = list(reader)
    assert back[0] == {"path": "dir,with comma/é.png", "score": "1.25", "threshold": "", "decision": "unknown",
                       "extra": ""}
    assert back[1]["path"] == 'quote"d\nline' and back[1]["extra"] == "x" and float(back[1]["threshold"]) == 2.0
    assert [p.name for p in path.parent.iterdir()] == ["report.csv"]

    f = square_map()
    real = prediction_rows(["a.png"], [make_prediction({"fused": f, "rgb": f})], {"bolt": 1.0})
    with open(write_csv(real, tmp_path / "r.csv"), newline="", encoding="utf-8") as fh:
        got = list(csv.DictReader(fh))
    assert got[0]["decision"] == "anomalous" and got[0]["score_geometry"] == ""
    assert float(got[0]["score_rgb"]) == 6.0


@pytest.mark.parametrize("path", [
    "../x", "a/b\\c", "..", "../../etc/passwd", "bolt/test/crack/rgb/000.png", "C:\\data\\ümlaut ñ/中文.tiff",
    "", "/", "...hidden/..../x..y.png", "a" * 500 + "/b",
])
def test_safe_stem_is_file_name_safe(path: str, tmp_path: Path) -> None:
    stem = safe_stem(path, 3)
    assert stem.startswith("0003")
    assert "/" not in stem and "\\" not in stem and ".." not in stem
    assert stem.isascii() and len(stem) <= 120
    assert all(ch.isalnum() or ch in "._-" for ch in stem)
    (tmp_path / f"{stem}_rgb.png").write_bytes(b"")  # usable as a file name, inside tmp_path
    assert (tmp_path / f"{stem}_rgb.png").parent == tmp_path


def test_safe_stem_examples() -> None:
    assert safe_stem("bolt/test/crack/rgb/000.png", 3) == "0003_rgb_000"
    assert safe_stem("../x", 0) == "0000_x"
    assert safe_stem("a/b\\c.tiff", 12) == "0012_b_c"
    assert safe_stem("", 7) == "0007"
    assert safe_stem("x/y.png", 12345) == "12345_x_y"
    assert safe_stem("a/b.png", 1) != safe_stem("c/a/b.png", 2)
    with pytest.raises(ValueError):
        safe_stem("a", -1)
