"""The procedural synthetic dataset: layout, formats, determinism, modality visibility, distinct classes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from iumad.data.synth import (
    CLASS_NAMES,
    DEFECT_FAMILIES,
    DEFECT_TYPES,
    MANIFEST,
    generate_dataset,
    render,
    render_sample,
    sample_seed,
    labels_for_test_split,
)
from iumad.errors import UsageError

SMALL = dict(size=64, n_train=3, n_val=2, n_test=9)  # 9 test: 2 good + one of each of the 7 defect types


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "all"
    manifest = generate_dataset(out, n_classes=len(CLASS_NAMES), seed=3, workers=1, **SMALL)
    return out, manifest


# ---------------------------------------------------------------- layout and formats


def test_api_constants() -> None:
    assert len(CLASS_NAMES) >= 10 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert all(n.replace("_", "").isalnum() and n == n.lower() for n in CLASS_NAMES)
    assert set(DEFECT_FAMILIES.values()) == {"rgb", "geometry", "both"}
    assert labels_for_test_split(40).count("good") == 10
    labels = labels_for_test_split(40)
    assert {lab for lab in labels if lab != "good"} == set(DEFECT_TYPES)
    counts = [labels.count(d) for d in DEFECT_TYPES]
    assert max(counts) - min(counts) <= 1 and sum(counts) == 30


def test_layout_is_mvtec3d(small_set: tuple[Path, dict]) -> None:
    out, manifest = small_set
    assert manifest["classes"] == list(CLASS_NAMES)
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["defect_types"] == DEFECT_FAMILIES
    assert (out / "README.txt").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted([*CLASS_NAMES, MANIFEST, "README.txt"])
    labels = labels_for_test_split(SMALL["n_test"])
    for c in CLASS_NAMES:
        cdir = out / c
        assert sorted(p.name for p in cdir.iterdir()) == ["class_ids.json", "test", "train", "validation"]
        ids = json.loads((cdir / "class_ids.json").read_text())
        assert ids["0"] == "good" and set(ids.values()) == {"good", *DEFECT_TYPES}
        for split, n in (("train", SMALL["n_train"]), ("validation", SMALL["n_val"])):
            assert [p.name for p in (cdir / split).iterdir()] == ["good"]
            assert sorted(p.name for p in (cdir / split / "good").iterdir()) == ["rgb", "xyz"]
            assert sorted(p.name for p in (cdir / split / "good" / "rgb").iterdir()) == [f"{i:03d}.png" for i in range(n)]
            assert sorted(p.name for p in (cdir / split / "good" / "xyz").iterdir()) == [f"{i:03d}.tiff" for i in range(n)]
        assert sorted(p.name for p in (cdir / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])
        for label in ["good", *DEFECT_TYPES]:
            n = labels.count(label)
            d = cdir / "test" / label
            assert sorted(p.name for p in d.iterdir()) == ["gt", "rgb", "xyz"]
            for sub, ext in (("rgb", "png"), ("xyz", "tiff"), ("gt", "png")):
                assert sorted(p.name for p in (d / sub).iterdir()) == [f"{i:03d}.{ext}" for i in range(n)]
        assert manifest["per_class"][c]["test"] == {lab: labels.count(lab) for lab in ["good", *DEFECT_TYPES]}


def test_file_formats_and_missing_points(small_set: tuple[Path, dict]) -> None:
    out, _ = small_set
    size = SMALL["size"]
    for c in CLASS_NAMES:
        missing_in_class = 0
        for xyz_path in sorted((out / c).rglob("xyz/*.tiff")):
            with tifffile.TiffFile(xyz_path) as tf:
                page = tf.pages[0]
                assert page.photometric == tifffile.PHOTOMETRIC.RGB and page.planarconfig == 1
                assert "DateTime" not in page.tags and "Software" not in page.tags
                xyz = tf.asarray()
            assert xyz.shape == (size, size, 3) and xyz.dtype == np.float32 and xyz.flags.c_contiguous
            assert np.isfinite(xyz).all()
            zero = np.all(xyz == 0, axis=-1)
            assert not np.any((xyz == 0) & ~zero[..., None]), "a point is partly zero"
            missing_in_class += int(zero.sum())
            z = xyz[~zero][:, 2]
            assert 0.5 < z.min() and z.max() < 0.7  # metres from the camera
            assert np.ptp(xyz[~zero][:, 0]) > 0.04  # x spans a few centimetres
            rgb_path = xyz_path.parent.parent / "rgb" / (xyz_path.stem + ".png")
            with Image.open(rgb_path) as im:
                assert im.mode == "RGB" and im.size == (size, size)
            gt_path = xyz_path.parent.parent / "gt" / (xyz_path.stem + ".png")
            if "test" in xyz_path.parts:
                with Image.open(gt_path) as im:
                    assert im.mode == "L" and im.size == (size, size)
                    gt = np.asarray(im)
                assert set(np.unique(gt)) <= {0, 255}
                is_good = xyz_path.parts[-3] == "good"
                assert gt.any() != is_good
            else:
                assert not gt_path.exists()
        assert missing_in_class > 0, f"{c}: no missing points"


# ---------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical_and_workers_do_not_matter(small_set: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = small_set
    again = tmp_path / "again"
    generate_dataset(again, n_classes=len(CLASS_NAMES), seed=3, workers=2, **SMALL)
    assert _hashes(again) == _hashes(out)


def test_other_seed_differs(small_set: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = small_set
    other = tmp_path / "other"
    generate_dataset(other, n_classes=2, seed=4, workers=1, **SMALL)
    a, b = _hashes(out), _hashes(other)
    data = [k for k in b if k.endswith((".png", ".tiff")) and "/gt/" not in k]
    assert data and all(a[k] != b[k] for k in data)


def test_first_classes_do_not_depend_on_class_count(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "two", n_classes=2, seed=1, workers=1, **SMALL)
    generate_dataset(tmp_path / "three", n_classes=3, seed=1, workers=1, **SMALL)
    a, b = _hashes(tmp_path / "two"), _hashes(tmp_path / "three")
    per_class = {k: v for k, v in b.items() if k.split("/")[0] in CLASS_NAMES[:2]}
    assert per_class == {k: v for k, v in a.items() if k.split("/")[0] in CLASS_NAMES[:2]}
    assert any(k.startswith(CLASS_NAMES[2] + "/") for k in b)


# ---------------------------------------------------------------- output folder handling


def test_refuses_foreign_folder_and_replaces_own(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        generate_dataset(foreign, n_classes=1, workers=1, **SMALL)
    assert (foreign / "thesis.tex").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["foreign"]  # no temporary folder left behind

    own = tmp_path / "own"
    generate_dataset(own, n_classes=2, workers=1, **SMALL)
    generate_dataset(own, n_classes=1, workers=1, **SMALL)  # an earlier synth output is replaced
    assert sorted(p.name for p in own.iterdir()) == sorted([CLASS_NAMES[0], MANIFEST, "README.txt"])

    generate_dataset(foreign, n_classes=1, workers=1, overwrite=True, **SMALL)
    assert not (foreign / "thesis.tex").exists() and (foreign / MANIFEST).is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    generate_dataset(empty, n_classes=1, workers=1, **SMALL)
    assert (empty / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign", "own"]


@pytest.mark.parametrize("kwargs", [dict(n_classes=len(CLASS_NAMES) + 1), dict(n_classes=0), dict(seed=-1),
                                    dict(size=8), dict(n_train=0)])
def test_bad_arguments_are_usage_errors(tmp_path: Path, kwargs: dict) -> None:
    args = dict(n_classes=1, workers=1, **SMALL) | kwargs
    with pytest.raises(UsageError):
        generate_dataset(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_interrupted_run_leaves_nothing(tmp_path: Path) -> None:
    calls = []

    def progress(stage: str, done: int, total: int) -> None:
        calls.append((stage, done, total))
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "ds", n_classes=3, workers=1, progress=progress, **SMALL)
    assert list(tmp_path.iterdir()) == []
    assert calls[0][0] == "synth" and calls[0][1] == 0 and calls[0][2] == 3 * 14


def test_progress_reaches_total(tmp_path: Path) -> None:
    calls = []
    generate_dataset(tmp_path / "ds", n_classes=2, workers=1, progress=lambda *a: calls.append(a), **SMALL)
    assert calls[-1] == ("synth", 28, 28)


# ---------------------------------------------------------------- modality visibility of the defect families


def test_each_defect_family_is_seen_by_its_modalities_only() -> None:
    """Render every defect next to its defect-free twin and measure the change inside the gt mask.

    rgb-only defects leave xyz byte-identical, geometry-only defects leave the image byte-identical, so a
    single modality cannot see them; `both` defects change both. Nothing changes outside the gt mask.
    """
    size, seeds = 96, 3
    rows = {d: [] for d in DEFECT_TYPES}
    for c in CLASS_NAMES:
        for d in DEFECT_TYPES:
            for k in range(seeds):
                seed = sample_seed(11, c, "test", k)
                rgb0, xyz0, gt0 = render_sample(c, seed, size)
                rgb1, xyz1, gt1 = render_sample(c, seed, size, defect=d)
                assert not gt0.any()
                g = gt1 > 0
                assert g.any(), f"{c}/{d}: empty gt"
                drgb = np.abs(rgb1.astype(np.int16) - rgb0).mean(axis=-1)
                dz_mm = np.abs(xyz1[..., 2].astype(np.float64) - xyz0[..., 2]) * 1000.0
                both_valid = np.all(xyz0 != 0, -1) & np.all(xyz1 != 0, -1)
                # nothing changes outside the (slightly dilated) gt
                assert drgb[~g].max() == 0 and np.abs(xyz1 - xyz0)[~g].max() == 0, f"{c}/{d}"
                fam = DEFECT_FAMILIES[d]
                if fam == "rgb":
                    assert np.array_equal(xyz0, xyz1), f"{c}/{d}: rgb-only defect changed geometry"
                if fam == "geometry":
                    assert np.array_equal(rgb0, rgb1), f"{c}/{d}: geometry-only defect changed the image"
                if fam in ("rgb", "both"):
                    assert drgb[g].mean() > 1.0, f"{c}/{d}: invisible in RGB"
                if fam in ("geometry", "both"):
                    assert dz_mm[g & both_valid].mean() > 0.05, f"{c}/{d}: invisible in geometry"
                # the gt is not much larger than the change: a good share of it visibly changed
                changed = (drgb > 2) | (dz_mm > 0.05)
                assert changed[g].mean() > 0.25, f"{c}/{d}: gt much larger than the change"
                rows[d].append((drgb[g].mean(), dz_mm[g & both_valid].mean(), changed[g].mean(), g.mean()))

    lines = [f"{'defect':8s} {'family':9s} {'mean|dRGB| in gt (0-255)':>26s} {'mean|dz| in gt (mm)':>20s} "
             f"{'changed share of gt':>20s}"]
    for d, vals in rows.items():
        v = np.array(vals)
        lines.append(f"{d:8s} {DEFECT_FAMILIES[d]:9s} {v[:, 0].mean():26.2f} {v[:, 1].mean():20.3f} {v[:, 2].mean():20.2f}")
        fam = DEFECT_FAMILIES[d]
        # per type: the blind modality sees exactly nothing, the seeing one clearly something
        if fam == "rgb":
            assert v[:, 1].max() == 0 and v[:, 0].mean() > 5
        elif fam == "geometry":
            assert v[:, 0].max() == 0 and v[:, 1].mean() > 0.1
        else:
            assert v[:, 0].mean() > 10 and v[:, 1].mean() > 0.1
    print("\n" + "\n".join(lines))


def test_twin_is_the_same_sample_without_the_defect() -> None:
    seed = sample_seed(0, "gear", "test", 5)
    a = render("gear", seed, 64)
    b = render("gear", seed, 64)
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.xyz, b.xyz)
    with pytest.raises(UsageError):
        render("gear", seed, 64, defect="scratchy")
    with pytest.raises(UsageError):
        render("teapot", seed, 64)


# ---------------------------------------------------------------- classes differ, samples vary


def _features(c: str, k: int, size: int = 64) -> np.ndarray:
    s = render(c, sample_seed(5, c, "train", k), size)
    fp = s.footprint & (s.height > 0.5)
    col = s.rgb[fp].mean(axis=0) / 255.0
    hts = np.percentile(s.height[fp], [50, 95])
    return np.array([*col, *(hts / 5.0), fp.mean() * 5, (s.rgb[fp].std(axis=0).mean() / 255.0) * 5])


def test_classes_are_clearly_distinct() -> None:
    """Nearest-class-mean on colour, height profile and area separates every class (leave-one-out)."""
    n = 4
    feats = {c: np.stack([_features(c, k) for k in range(n)]) for c in CLASS_NAMES}
    errors = []
    for c in CLASS_NAMES:
        for k in range(n):
            x = feats[c][k]
            dists = {}
            for c2, f in feats.items():
                rest = np.delete(f, k, axis=0) if c2 == c else f
                dists[c2] = np.linalg.norm(rest.mean(axis=0) - x)
            if min(dists, key=dists.get) != c:
                errors.append((c, k, min(dists, key=dists.get)))
    assert not errors
    # height profiles: the classes' typical heights span thin parts to tall ones
    top = {c: float(np.median(feats[c][:, 4])) * 5.0 for c in CLASS_NAMES}
    assert min(top.values()) < 2.5 and max(top.values()) > 10


def test_normal_samples_vary() -> None:
    """Pose, lighting and noise change between good samples of one class; the object stays in view."""
    shots = [render("bracket", sample_seed(0, "bracket", "train", k), 64) for k in range(4)]
    centroids = [np.argwhere(s.footprint).mean(axis=0) for s in shots]
    assert max(np.linalg.norm(a - b) for a in centroids for b in centroids) > 1.0
    orient = []
    for s in shots:
        ij = np.argwhere(s.footprint) - np.argwhere(s.footprint).mean(axis=0)
        w, v = np.linalg.eigh(ij.T @ ij)
        orient.append(np.arctan2(v[0, 1], v[1, 1]) % np.pi)
    assert np.ptp(orient) > 0.2
    for s in shots:
        assert not s.footprint[0].any() and not s.footprint[-1].any()
        assert not s.footprint[:, 0].any() and not s.footprint[:, -1].any()
    means = [s.rgb.reshape(-1, 3).mean(axis=0) for s in shots]
    assert np.ptp(np.stack(means), axis=0).max() > 1.0  # lighting / colour jitter
