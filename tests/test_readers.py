"""Readers: real MVTec 3D-AD files, an Eyecandies mini fixture, folder trees, and broken inputs."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from iumad.cli import app
from iumad.data import find_classes, load_sample, require_records
from iumad.data.io import MAX_PIXELS
from iumad.errors import DataError
from tests.conftest import scene, write_png, write_tiff

# ---------------------------------------------------------------- MVTec 3D-AD, real files


def test_halcon_fixture_files_read_exactly(shared_data: Path) -> None:
    (source,) = find_classes(shared_data / "mvtec3d-fixtures")
    assert source.layout == "mvtec3d" and source.name == "cable_gland"
    test = [load_sample(r) for r in source.records("test")]
    assert sorted(s.label for s in test) == ["bent", "good", "hole"]
    for s in test:
        assert s.rgb.shape == (400, 400, 3) and s.rgb.dtype == np.uint8
        assert s.geometry.shape == (400, 400, 3) and s.geometry.dtype == np.float32
        assert s.geometry_kind == "xyz"
        # missing points are exactly (0,0,0) and make up a large share of a real scan
        missing = ~s.valid
        assert 0.2 < missing.mean() < 0.7
        assert np.all(s.geometry[missing] == 0)
        assert np.all(s.geometry[s.valid][:, 2] > 0.3)  # metres from the sensor
        assert s.gt.dtype == bool
        assert s.gt.any() == (s.label != "good")
    hole = next(s for s in test if s.label == "hole")
    raw = np.asarray(Image.open(hole.paths["gt"]))
    assert set(np.unique(raw)) - {0} and set(np.unique(raw)) - {0} <= {252, 253, 254, 255}
    assert np.array_equal(hole.gt, raw > 0)


def test_full_cable_gland_class(shared_data: Path) -> None:
    (source,) = find_classes(shared_data / "mvtec3d-cable_gland-224" / "cable_gland")
    counts = {split: len(source.records(split)) for split in ("train", "validation", "test")}
    assert counts == {"train": 223, "validation": 23, "test": 108}
    test = source.records("test")
    assert sorted({r.label for r in test}) == ["bent", "cut", "good", "hole", "thread"]
    s = load_sample(test[-1])
    assert s.rgb.shape == (224, 224, 3) and s.geometry.shape == (224, 224, 3)


def test_cli_inspect_json(shared_data: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(shared_data / "mvtec3d-cable_gland-224"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (c,) = report["classes"]
    assert report["layout"] == "mvtec3d"
    assert c["splits"]["train"] == {"good": 223}
    assert c["image_sizes"] == {"224x224": 354}
    assert c["defect_types"] == ["bent", "cut", "hole", "thread"]
    assert 0.2 < c["missing_geometry_share"] < 0.7


def _mvtec_class(root: Path, n: int = 2, size: int = 32) -> Path:
    cls = root / "widget"
    for split, label in (("train", "good"), ("validation", "good"), ("test", "good"), ("test", "crack")):
        for i in range(n):
            rgb, xyz = scene(size, seed=i)
            write_png(cls / split / label / "rgb" / f"{i:03d}.png", rgb)
            write_tiff(cls / split / label / "xyz" / f"{i:03d}.tiff", xyz)
            if split == "test":
                gt = np.zeros((size, size), np.uint8)
                if label != "good":
                    gt[4:8, 4:8] = 255
                write_png(cls / split / label / "gt" / f"{i:03d}.png", gt)
    (cls / "train" / "good" / "rgb" / ".DS_Store").write_bytes(b"\0junk")
    (cls / "train" / "good" / "notes.txt").write_text("stray note")
    return cls


def test_mvtec_layout_ignores_stray_files(tmp_path: Path) -> None:
    cls = _mvtec_class(tmp_path)
    (source,) = find_classes(tmp_path)
    assert source.path == cls
    assert len(source.records("train")) == 2
    crack = [load_sample(r) for r in source.records("test") if r.label == "crack"]
    assert all(s.gt.sum() == 16 for s in crack)


# ---------------------------------------------------------------- Eyecandies mini fixture


def _eyecandies_class(root: Path, size: int = 24) -> Path:
    cls = root / "CandyCane"
    rng = np.random.default_rng(0)
    for split_dir, n, anomalous in (("train", 2, False), ("val", 1, False), ("test_public", 2, True)):
        data = cls / split_dir / "data"
        for i in range(n):
            sid = f"{i:03d}"
            for light in range(6):
                write_png(data / f"{sid}_image_{light}.png", rng.integers(0, 255, (size, size, 3), np.uint8))
            depth = rng.integers(1, 65535, (size, size)).astype(np.uint16)
            depth[0, 0] = 0
            write_png(data / f"{sid}_depth.png", depth)
            write_png(data / f"{sid}_normals.png", rng.integers(0, 255, (size, size, 3), np.uint8))
            is_bad = anomalous and i == 1
            mask = np.zeros((size, size), np.uint8)
            if is_bad:
                mask[2:6, 2:6] = 255
            write_png(data / f"{sid}_mask.png", mask)
            (data / f"{sid}_info_depth.yaml").write_text(yaml.safe_dump({"normalization": {"min": 0.4, "max": 0.9}}))
            meta = {"anomalous": int(is_bad), "bumps": 0, "colors": int(is_bad), "dents": int(is_bad), "normals": 0}
            (data / f"{sid}_metadata.yaml").write_text(yaml.safe_dump(meta))
    return cls


def test_eyecandies_reader(tmp_path: Path) -> None:
    cls = _eyecandies_class(tmp_path)
    (source,) = find_classes(tmp_path)
    assert (source.layout, source.name) == ("eyecandies", "candy_cane")
    assert [len(source.records(s)) for s in ("train", "validation", "test")] == [2, 1, 2]
    test = [load_sample(r) for r in source.records("test")]
    assert [s.label for s in test] == ["good", "colors+dents"]
    s = test[1]
    assert s.geometry_kind == "depth" and s.geometry.shape == (24, 24)
    raw = np.asarray(Image.open(cls / "test_public/data/001_depth.png"))
    expected = raw.astype(np.float32) / 65535 * 0.5 + 0.4
    np.testing.assert_allclose(s.geometry[raw > 0], expected[raw > 0], rtol=1e-6)
    assert not s.valid[0, 0] and s.valid.sum() == raw.size - (raw == 0).sum()
    assert s.gt.sum() == 16 and not test[0].gt.any()
    # the default light is image_4
    assert s.paths["rgb"].name == "001_image_4.png"


def test_eyecandies_malformed_yaml(tmp_path: Path) -> None:
    cls = _eyecandies_class(tmp_path)
    bad = cls / "train/data/000_info_depth.yaml"
    bad.write_text("normalization: [min: : 0.4\n")
    (source,) = find_classes(tmp_path)
    with pytest.raises(DataError, match="000_info_depth.yaml"):
        source.records("train")


# ---------------------------------------------------------------- folder layout


def test_folder_flat_and_modality_subfolders(tmp_path: Path) -> None:
    rgb, xyz = scene(16)
    flat = tmp_path / "bracket"
    write_png(flat / "good" / "a.png", rgb)
    write_tiff(flat / "good" / "a.tiff", xyz)
    write_png(flat / "defect_scratch" / "b.png", rgb)
    write_tiff(flat / "defect_scratch" / "b.tiff", xyz)
    write_png(flat / "masks" / "defect_scratch" / "b.png", np.full((16, 16), 255, np.uint8))
    sub = tmp_path / "Hinge Plate"
    write_png(sub / "good" / "rgb" / "1.png", rgb)
    write_png(sub / "good" / "depth" / "1.png", np.full((16, 16), 600, np.uint16))
    sources = find_classes(tmp_path)
    assert [(s.name, s.layout) for s in sources] == [("bracket", "folder"), ("hinge_plate", "folder")]
    b = load_sample(sources[0].records("test")[0])
    assert b.label == "scratch" and b.gt.all() and b.modalities == ("rgb", "geometry")
    h = load_sample(sources[1].records("train")[0])
    assert h.geometry_kind == "depth"
    np.testing.assert_allclose(h.geometry, 0.6, rtol=1e-6)  # 16-bit depth PNG in millimetres


def test_folder_single_modality_is_recorded_not_faked(tmp_path: Path) -> None:
    rgb, xyz = scene(16)
    write_png(tmp_path / "rgbonly" / "good" / "a.png", rgb)
    write_tiff(tmp_path / "geomonly" / "good" / "a.tiff", xyz)
    by_name = {s.name: s for s in find_classes(tmp_path)}
    r = load_sample(by_name["rgbonly"].records("train")[0])
    g = load_sample(by_name["geomonly"].records("train")[0])
    assert r.modalities == ("rgb",) and r.geometry is None and r.valid is None
    assert g.modalities == ("geometry",) and g.rgb is None


# ---------------------------------------------------------------- broken inputs


def test_truncated_png(tmp_path: Path) -> None:
    cls = _mvtec_class(tmp_path)
    png = cls / "train/good/rgb/000.png"
    png.write_bytes(png.read_bytes()[:60])
    (source,) = find_classes(tmp_path)
    with pytest.raises(DataError, match=r"000\.png: unreadable image") as info:
        load_sample(source.records("train")[0])
    assert info.value.exit_code == 4


def test_tiff_of_wrong_shape(tmp_path: Path) -> None:
    cls = _mvtec_class(tmp_path)
    write_tiff(cls / "train/good/xyz/000.tiff", np.zeros((32, 32, 4), np.float32))
    (source,) = find_classes(tmp_path)
    with pytest.raises(DataError, match=r"000\.tiff: TIFF declares 32x32 pixels with 4 samples per pixel"):
        load_sample(source.records("train")[0])


def test_depth_tiff_where_xyz_expected(tmp_path: Path) -> None:
    cls = _mvtec_class(tmp_path)
    write_tiff(cls / "train/good/xyz/000.tiff", np.ones((32, 32), np.float32))
    (source,) = find_classes(tmp_path)
    with pytest.raises(DataError, match="expects HxWx3 xyz"):
        load_sample(source.records("train")[0])


def test_mismatched_sizes(tmp_path: Path) -> None:
    cls = _mvtec_class(tmp_path)
    _, xyz = scene(40)
    write_tiff(cls / "train/good/xyz/001.tiff", xyz)
    (source,) = find_classes(tmp_path)
    with pytest.raises(DataError, match=r"001\.tiff: geometry is 40x40 but 001\.png is 32x32"):
        load_sample(source.records("train")[1])


def test_nan_xyz(tmp_path: Path) -> None:
    cls = _mvtec_class(tmp_path)
    _, xyz = scene(32)
    xyz[5:10, 5:10, 2] = np.nan
    xyz[0, 10, 0] = np.inf
    write_tiff(cls / "train/good/xyz/000.tiff", xyz)
    write_tiff(cls / "train/good/xyz/001.tiff", np.full((32, 32, 3), np.nan, np.float32))
    (source,) = find_classes(tmp_path)
    recs = source.records("train")
    s = load_sample(recs[0])  # some NaN points: they become missing, not an error
    assert np.isfinite(s.geometry).all()
    assert not s.valid[5:10, 5:10].any() and not s.valid[0, 10]
    with pytest.raises(DataError, match=r"001\.tiff: geometry has no valid point"):
        load_sample(recs[1])


def test_empty_folder_and_empty_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class found") as info:
        find_classes(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "widget" / "good").mkdir(parents=True)
    (source,) = find_classes(tmp_path)
    with pytest.raises(DataError, match="split 'train' holds no sample"):
        require_records(source, "train")


def test_orphan_rgb_without_xyz(tmp_path: Path) -> None:
    cls = _mvtec_class(tmp_path)
    (cls / "train/good/xyz/001.tiff").unlink()
    (source,) = find_classes(tmp_path)
    with pytest.raises(DataError, match=r"001\.png: has no matching xyz/001\.tiff"):
        source.records("train")


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [9_000, 100_000])  # above our limit; above PIL's bomb limit too
def test_huge_declared_dimensions_are_refused_before_decoding(tmp_path: Path, side: int) -> None:
    cls = _mvtec_class(tmp_path)
    _png_header_only(cls / "train/good/rgb/000.png", side, side)
    assert side ** 2 > MAX_PIXELS
    (source,) = find_classes(tmp_path)
    with pytest.raises(DataError, match=r"000\.png: declares .*pixels"):
        load_sample(source.records("train")[0])


def test_cli_inspect_exit_code_on_bad_data(tmp_path: Path) -> None:
    cls = _mvtec_class(tmp_path)
    (cls / "test/crack/rgb/000.png").write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 4
    assert "000.png: unreadable image" in result.output


# ---------------------------------------------------------------- synthetic data read back


def test_synth_output_is_read_by_the_mvtec_reader(tmp_path: Path) -> None:
    from iumad.data.synth import CLASS_NAMES, DEFECT_FAMILIES

    out = tmp_path / "synth"
    result = CliRunner().invoke(app, ["synth", "--out", str(out), "--classes", "2", "--size", "64",
                                      "--train", "3", "--validation", "1", "--test", "8", "--json"])
    assert result.exit_code == 0, result.output
    sources = find_classes(out)
    assert [(s.name, s.layout) for s in sources] == [(n, "mvtec3d") for n in sorted(CLASS_NAMES[:2])]
    for source in sources:
        assert [len(source.records(s)) for s in ("train", "validation", "test")] == [3, 1, 8]
        for rec in source.records("test"):
            sample = load_sample(rec)
            assert sample.modalities == ("rgb", "geometry") and sample.geometry_kind == "xyz"
            assert sample.rgb.shape == (64, 64, 3) and (~sample.valid).any()
            assert sample.gt.any() == (rec.label != "good")
            assert rec.label == "good" or rec.label in DEFECT_FAMILIES
