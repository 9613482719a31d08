"""Issue #19: the MVTec AD, MVTec AD 2, MVTec LOCO, VisA and described-folder readers on fixtures the
tests write, layout detection and its refusals, and image-level labels (readers only; the learning
end-to-end tests are in test_layouts_e2e.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from iumad.cli import app
from iumad.continual.classdata import class_source, list_class
from iumad.continual.nightly import inbox_records
from iumad.data import find_classes, load_sample, require_records
from iumad.data.dataset import READERS, layout_of, split_folder
from iumad.data.described import DESCRIPTION_FILE, decode, encode, make_spec
from iumad.data.labels import label_level
from iumad.data.sample import SPLITS
from iumad.errors import DataError
from iumad.eval.predict import find_inputs
from tests.conftest import scene, write_png, write_tiff
from tests.layouts import (described_folders, image, loco_class, mask, mvtec_ad2_class, mvtec_ad_class, save,
                           visa_dataset)


def counts(source) -> dict[str, dict[str, int]]:
    out = {}
    for split in SPLITS:
        labels: dict[str, int] = {}
        for r in source.records(split):
            labels[r.label] = labels.get(r.label, 0) + 1
        out[split] = labels
    return out


def described_class(root: Path, **kwargs) -> Path:
    """A class folder holding iumad-data.yaml that names its folders (relative paths)."""
    folders = described_folders(root, **kwargs)
    (root / DESCRIPTION_FILE).write_text(yaml.safe_dump({k: v.name for k, v in folders.items()}))
    return root


# ---------------------------------------------------------------------- detection, one test per layout


def test_every_layout_in_the_table_is_detected(tmp_path: Path) -> None:
    rgb, xyz = scene(16)
    write_png(tmp_path / "m3d" / "train" / "good" / "rgb" / "000.png", rgb)
    write_tiff(tmp_path / "m3d" / "train" / "good" / "xyz" / "000.tiff", xyz)
    (tmp_path / "eyec" / "train" / "data").mkdir(parents=True)
    write_png(tmp_path / "plain" / "good" / "000.png", rgb)
    mvtec_ad_class(tmp_path, "ad")
    mvtec_ad2_class(tmp_path, "ad2")
    loco_class(tmp_path, "loco")
    visa_dataset(tmp_path / "visa_root", ("visa",))
    described_class(tmp_path / "desc")
    expected = {"m3d": "mvtec3d", "eyec": "eyecandies", "plain": "folder", "ad": "mvtec_ad", "ad2": "mvtec_ad2",
                "loco": "mvtec_loco", "visa_root/visa": "visa", "desc": "described"}
    assert {layout_of(tmp_path / p) for p in expected} == {r.layout for r in READERS}
    for rel, layout in expected.items():
        assert layout_of(tmp_path / rel) == layout, rel
        (source,) = find_classes(tmp_path / rel)  # a class folder is one class
        assert source.layout == layout
    # a dataset folder: its class sub-folders, whatever their layouts (VisA's split_csv/ is no class)
    assert [(s.name, s.layout) for s in find_classes(tmp_path / "visa_root")] == [("visa", "visa")]
    mixed = {s.name: s.layout for s in find_classes(tmp_path)}
    assert mixed == {"ad": "mvtec_ad", "ad2": "mvtec_ad2", "loco": "mvtec_loco", "m3d": "mvtec3d",
                     "eyec": "eyecandies", "plain": "folder", "desc": "described"}


# ---------------------------------------------------------------------- MVTec AD


def test_mvtec_ad_class_is_one_class_with_its_splits_and_masks(tmp_path: Path) -> None:
    mvtec_ad_class(tmp_path / "mvtec", "bottle")
    mvtec_ad_class(tmp_path / "mvtec", "metal_nut", defects=("scratch",))
    sources = find_classes(tmp_path / "mvtec")
    assert [(s.name, s.layout) for s in sources] == [("bottle", "mvtec_ad"), ("metal_nut", "mvtec_ad")]
    bottle = sources[0]
    assert counts(bottle) == {"train": {"good": 6}, "validation": {}, "test": {"broken": 2, "crack": 2, "good": 2}}
    for rec in bottle.records("test"):
        s = load_sample(rec)
        assert s.rgb.shape == (32, 32, 3) and s.gt.dtype == bool
        assert s.gt.sum() == (64 if rec.label != "good" else 0)
        assert rec.gt is None if rec.label == "good" else rec.gt.name == f"{rec.rgb.stem}_mask.png"


def test_grayscale_images_are_read_as_three_channel_rgb(tmp_path: Path) -> None:
    cls = mvtec_ad_class(tmp_path, "grid", gray=True)
    from PIL import Image
    assert Image.open(cls / "train" / "good" / "000.png").mode == "L"
    (source,) = find_classes(cls)
    s = load_sample(source.records("train")[0])
    assert s.rgb.shape == (32, 32, 3) and s.rgb.dtype == np.uint8
    raw = np.asarray(Image.open(cls / "train" / "good" / "000.png"))
    for c in range(3):
        np.testing.assert_array_equal(s.rgb[..., c], raw)


@pytest.mark.parametrize("value,bits", [(255, 8), (1, 8), (3, 8), (65535, 16), (1, 16), (1000, 16)])
def test_masks_of_any_nonzero_value_and_depth(tmp_path: Path, value: int, bits: int) -> None:
    mvtec_ad_class(tmp_path, "screw", mask_value=value, mask_bits=bits, defects=("thread",))
    (source,) = find_classes(tmp_path)
    defect = next(r for r in source.records("test") if r.label == "thread")
    s = load_sample(defect)
    assert s.gt.sum() == 64 and s.gt[4:12, 4:12].all()


def test_btad_ok_folders_count_as_good(tmp_path: Path) -> None:
    cls = tmp_path / "01"
    for i in range(3):
        save(cls / "train" / "ok" / f"{i:04d}.bmp", image(i))
    save(cls / "test" / "ok" / "0000.bmp", image(9))
    save(cls / "test" / "ko" / "0000.bmp", image(10, defect=True))
    save(cls / "ground_truth" / "ko" / "0000.png", mask())
    (source,) = find_classes(cls)
    assert source.layout == "mvtec_ad"
    assert counts(source)["test"] == {"good": 1, "ko": 1} and counts(source)["train"] == {"good": 3}
    assert load_sample(next(r for r in source.records("test") if r.label == "ko")).gt.sum() == 64


# ---------------------------------------------------------------------- MVTec AD 2, LOCO, VisA, described


def test_mvtec_ad2_class(tmp_path: Path) -> None:
    cls = mvtec_ad2_class(tmp_path, "vial")
    (source,) = find_classes(cls)
    assert (source.name, source.layout) == ("vial", "mvtec_ad2")
    assert counts(source) == {"train": {"good": 6}, "validation": {"good": 2}, "test": {"bad": 3, "good": 2}}
    bad = [load_sample(r) for r in source.records("test") if r.label == "bad"]
    assert all(s.gt.sum() == 64 for s in bad)
    assert split_folder(cls / "test_public")[1] == "test"
    assert len(find_inputs(cls / "test_public")) == 5  # predict on the split folder reads its labelled test split


def test_mvtec_loco_masks_merged_and_defect_kind_kept(tmp_path: Path) -> None:
    cls = loco_class(tmp_path, "juice_bottle")
    (source,) = find_classes(cls)
    assert source.layout == "mvtec_loco"
    assert counts(source) == {"train": {"good": 6}, "validation": {"good": 2},
                              "test": {"good": 2, "logical_anomalies": 2, "structural_anomalies": 2}}
    test = source.records("test")
    assert {(r.label, r.defect_kind) for r in test} == {("good", None), ("logical_anomalies", "logical"),
                                                       ("structural_anomalies", "structural")}
    two = next(r for r in test if r.label == "logical_anomalies" and r.rgb.stem == "000")
    assert len(two.more_gt) == 1
    s = load_sample(two)
    assert s.gt.sum() == 64 + 40 and s.gt[4:12, 4:12].all() and s.gt[20:24, 20:30].all()  # both masks
    one = next(r for r in test if r.label == "structural_anomalies")
    assert load_sample(one).gt.sum() == 64
    res = CliRunner().invoke(app, ["inspect", str(cls), "--json"])
    assert res.exit_code == 0, res.output
    (c,) = json.loads(res.stdout)["classes"]
    assert c["layout"] == "mvtec_loco" and c["defect_kinds"] == {"logical": 2, "structural": 2}
    assert c["defect_types"] == ["logical_anomalies", "structural_anomalies"] and c["defects_without_mask"] == 0


def test_visa_from_its_split_csv_with_jpeg_images(tmp_path: Path) -> None:
    root = visa_dataset(tmp_path / "VisA", ("candle", "pcb1"))
    sources = find_classes(root)
    assert [(s.name, s.layout) for s in sources] == [("candle", "visa"), ("pcb1", "visa")]
    candle = sources[0]
    assert counts(candle) == {"train": {"good": 6}, "validation": {}, "test": {"anomaly": 3, "good": 2}}
    for rec in candle.records("test"):
        assert rec.rgb.suffix == ".JPG" and rec.rgb.parts[-5] == "candle"
        s = load_sample(rec)
        assert s.rgb.shape == (32, 32, 3)
        assert s.gt.sum() == (64 if rec.label == "anomaly" else 0)  # VisA masks hold 1 and 2, not 255
    # a class reached through a link (benchmark's view of several classes) finds the CSV beside the target
    view = tmp_path / "view"
    view.mkdir()
    (view / "candle").symlink_to(root / "candle", target_is_directory=True)
    assert counts(find_classes(view / "candle")[0]) == counts(candle)


def test_described_folders_from_yaml_and_from_options(tmp_path: Path) -> None:
    cls = described_class(tmp_path / "hinge")
    (source,) = find_classes(cls)
    assert (source.name, source.layout) == ("hinge", "described")
    assert counts(source) == {"train": {"good": 6}, "validation": {}, "test": {"abnormal": 3, "good": 2}}
    assert all(load_sample(r).gt.sum() == 64 for r in source.records("test") if r.label == "abnormal")
    spec = make_spec(described_folders(tmp_path / "cli"))
    listing = list_class("hinge", spec.normal, folders=spec)
    assert listing.labels == "pixel" and len(listing.train) == 6 and len(listing.evaluation) == 5
    # the store keeps a locator that finds the same folders again
    again = class_source("hinge", listing.eval_source.locator)
    assert decode(encode(spec)) == make_spec(spec.folders(), where="the stored folder description")
    assert [r.rgb for r in again.records("test")] == [r.rgb for r in listing.evaluation]


def test_nightly_inbox_reads_a_class_folder_of_any_layout(tmp_path: Path) -> None:
    cls = mvtec_ad_class(tmp_path, "bottle")
    records = inbox_records(cls, "bottle")
    assert len(records) == 6 and all(r.label == "good" and r.split == "train" for r in records)
    flat = tmp_path / "flat"
    save(flat / "x.png", image(1))
    assert [r.rgb.name for r in inbox_records(flat, "flat")] == ["x.png"]


# ---------------------------------------------------------------------- refuse instead of guessing


def test_split_folder_passed_as_a_class_is_refused_naming_its_parent(tmp_path: Path) -> None:
    cls = mvtec_ad_class(tmp_path, "bottle")
    with pytest.raises(DataError, match="looks like part of one MVTec AD class: pass its parent") as info:
        find_classes(cls / "train")
    assert info.value.exit_code == 4 and str(cls) in str(info.value) and "pass its parent" in info.value.fix


def test_folder_of_split_named_classes_exits_4_with_the_fix_and_learns_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bottle"  # train/good/ holds no image (they sit one level deeper): not an MVTec AD class
    save(bad / "train" / "good" / "cam0" / "000.png", image(0))
    save(bad / "test" / "good" / "000.png", image(1))
    save(bad / "test" / "crack" / "000.png", image(2, defect=True))
    (bad / "test" / "crack" / "good").mkdir()  # test/ is a folder-layout class named like a split
    (bad / "train" / "good" / "good").mkdir()
    res = CliRunner().invoke(app, ["inspect", str(bad), "--json"])
    assert res.exit_code == 4
    err = json.loads(res.stderr)
    assert "folders named like splits (test, train)" in err["error"] and err["file"] == str(bad)
    assert "this looks like one MVTec AD class" in err["fix"]
    store = tmp_path / "store"
    res = CliRunner().invoke(app, ["add-class", "bottle", "--data", str(bad), "--store", str(store)])
    assert res.exit_code == 4 and "named like splits" in res.stderr
    assert not store.exists()  # refused before the store was made: nothing learned


@pytest.mark.parametrize("extra,layouts", [
    ("good/000.png", ("MVTec AD", "folder")),
    ("train/good/rgb/000.png", ("MVTec 3D-AD", "MVTec AD")),
    ("test_public/good/000.png", ("MVTec AD", "MVTec AD 2")),
    ("Data/Images/Normal/000.png", ("MVTec AD", "VisA")),
    (DESCRIPTION_FILE, ("MVTec AD", "described folders")),
])
def test_a_folder_two_layouts_could_read_is_refused(tmp_path: Path, extra: str, layouts: tuple[str, str]) -> None:
    cls = mvtec_ad_class(tmp_path, "bottle")
    if extra.endswith(".png"):
        save(cls / extra, image(0))
    else:
        (cls / extra).write_text("normal: train/good\n")
    with pytest.raises(DataError, match="could read this folder") as info:
        find_classes(cls)
    text = str(info.value)
    assert str(cls) in text and all(f"the {t} layout" in text for t in layouts)
    assert "--normal/--abnormal" in info.value.fix


def test_loco_is_mvtec_ad_and_more_not_an_ambiguity(tmp_path: Path) -> None:
    cls = loco_class(tmp_path, "pushpins")
    assert layout_of(cls) == "mvtec_loco"
    save(cls / "test_public" / "bad" / "000.png", image(0))
    with pytest.raises(DataError, match="MVTec AD 2 layout .* MVTec LOCO layout"):
        layout_of(cls)


def test_defects_without_normal_test_images_are_refused(tmp_path: Path) -> None:
    cls = mvtec_ad_class(tmp_path, "bottle", n_good=0)
    (source,) = find_classes(cls)  # listing is fine: inspect shows it
    with pytest.raises(DataError, match="defect samples but no normal one") as info:
        list_class("bottle", cls)
    assert str(cls / "test") in str(info.value) and "--normal-test" in info.value.fix
    spec = make_spec({k: v for k, v in described_folders(tmp_path / "d").items() if k != "normal_test"})
    with pytest.raises(DataError, match="no normal one"):
        list_class("d", spec.normal, folders=spec)


def test_partial_masks_refused_naming_the_first_file_unless_image_labels(tmp_path: Path) -> None:
    cls = mvtec_ad_class(tmp_path, "bottle")
    (cls / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"crack/001\.png: defective test sample without a gt mask while 3 of") as info:
        list_class("bottle", cls)
    assert info.value.file == str(cls / "test" / "crack" / "001.png") and "--image-labels" in info.value.fix
    assert list_class("bottle", cls, image_labels=True).labels == "image"
    # every defect without a mask: image-level labels, no flag needed
    none = mvtec_ad_class(tmp_path / "b", "bottle", with_masks=False)
    assert list_class("bottle", none).labels == "image"
    assert list_class("bottle", mvtec_ad_class(tmp_path / "c", "bottle")).labels == "pixel"
    assert label_level([]) is None


# ---------------------------------------------------------------------- hostile and broken inputs


def _one(tmp_path: Path, **kwargs) -> Path:
    return mvtec_ad_class(tmp_path, "bottle", **kwargs)


def test_orphan_mask_and_mask_folder_without_images_are_refused(tmp_path: Path) -> None:
    cls = _one(tmp_path)
    save(cls / "ground_truth" / "crack" / "007_mask.png", mask())
    with pytest.raises(DataError, match=r"007_mask\.png: a mask without its image"):
        find_classes(cls)[0].records("test")
    (cls / "ground_truth" / "crack" / "007_mask.png").unlink()
    save(cls / "ground_truth" / "dent" / "000_mask.png", mask())
    with pytest.raises(DataError, match=r"ground_truth/dent: masks of a defect with no test/dent/ image folder"):
        find_classes(cls)[0].records("test")


def test_masks_named_unlike_their_images_do_not_become_image_labels(tmp_path: Path) -> None:
    cls = _one(tmp_path, defects=("crack",))
    for p in sorted((cls / "ground_truth" / "crack").iterdir()):
        p.rename(p.with_name("x" + p.name))
    with pytest.raises(DataError, match="a mask without its image"):
        list_class("bottle", cls)


def test_loco_empty_mask_folder_and_clashing_ids(tmp_path: Path) -> None:
    cls = loco_class(tmp_path, "screw_bag")
    for p in (cls / "ground_truth" / "structural_anomalies" / "001").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"structural_anomalies/001: mask folder holds no mask image"):
        find_classes(cls)[0].records("test")
    cls = _one(tmp_path / "b")
    save(cls / "train" / "good" / "000.jpg", image(0))
    with pytest.raises(DataError, match=r"000\.(png|jpg): clashes with 000\.(png|jpg)"):
        find_classes(cls)[0].records("train")


def test_truncated_image_and_mask_of_the_wrong_size(tmp_path: Path) -> None:
    cls = _one(tmp_path)
    png = cls / "test" / "crack" / "000.png"
    png.write_bytes(png.read_bytes()[:50])
    (source,) = find_classes(cls)
    rec = next(r for r in source.records("test") if r.rgb == png)
    with pytest.raises(DataError, match=r"crack/000\.png: unreadable image") as info:
        load_sample(rec)
    assert info.value.exit_code == 4 and info.value.file == str(png)
    save(cls / "ground_truth" / "broken" / "000_mask.png", mask(size=40))
    rec = next(r for r in source.records("test") if r.label == "broken" and r.rgb.stem == "000")
    with pytest.raises(DataError, match=r"000_mask\.png: mask is 40x40 but its image is 32x32"):
        load_sample(rec)


def test_empty_train_folder_and_stray_files(tmp_path: Path) -> None:
    cls = _one(tmp_path)
    for p in (cls / "train" / "good").iterdir():
        p.unlink()
    (cls / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    (cls / "ground_truth").rename(tmp_path / "gt")  # no test-only marker either: no MVTec AD class here
    with pytest.raises(DataError, match=r"holds folders named like splits \(test, train\)"):
        find_classes(cls)  # and its train/ and test/ (folder layout: good/) are no classes either
    cls2 = _one(tmp_path / "b")
    (cls2 / "train" / "good" / "notes.txt").write_text("stray")
    save(cls2 / "train" / "bad" / "000.png", image(0))
    with pytest.raises(DataError, match=r"train/bad: train/ holds normal images only"):
        require_records(find_classes(cls2)[0], "train")


def test_visa_missing_csv_missing_file_and_malformed_csv(tmp_path: Path) -> None:
    root = visa_dataset(tmp_path / "VisA")
    csv_path = root / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    (root / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG").unlink()
    with pytest.raises(DataError, match=r"001\.JPG: listed in .*1cls\.csv:\d+ but missing"):
        find_classes(root)[0].records("test")
    csv_path.write_text(text.replace("object,", "thing,"))
    with pytest.raises(DataError, match=r"1cls\.csv: lacks the column\(s\) object"):
        find_classes(root)[0].records("train")
    csv_path.write_bytes(b"object,split,label,image,mask\n\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"1cls\.csv: malformed CSV"):
        find_classes(root)[0].records("train")
    csv_path.unlink()
    os.mkfifo(csv_path)  # a FIFO would block a reader forever
    with pytest.raises(DataError, match=r"candle: a VisA class is read from split_csv/1cls\.csv"):
        find_classes(root)[0].records("train")


def test_described_yaml_errors(tmp_path: Path) -> None:
    cls = described_class(tmp_path / "c")
    desc = cls / DESCRIPTION_FILE
    desc.write_text("normal: normal\nabnormall: abnormal\n")
    with pytest.raises(DataError, match="unknown key 'abnormall'; the keys are normal, abnormal"):
        find_classes(cls)[0].records("train")
    desc.write_text("normal: nowhere\n")
    with pytest.raises(DataError, match=r"nowhere: normal is not a folder"):
        find_classes(cls)[0].records("train")
    desc.write_text("normal: [a\n")
    with pytest.raises(DataError, match=r"iumad-data\.yaml: malformed YAML"):
        find_classes(cls)[0].records("train")
    with pytest.raises(DataError, match="given as both --normal and --abnormal"):
        make_spec({"normal": cls / "normal", "abnormal": cls / "normal"})


def test_add_class_options_are_checked_before_the_store_exists(tmp_path: Path) -> None:
    folders = described_folders(tmp_path, with_masks=False)
    store = tmp_path / "store"
    runner = CliRunner()
    res = runner.invoke(app, ["add-class", "x", "--abnormal", str(folders["abnormal"]), "--store", str(store)])
    assert res.exit_code == 2 and "--normal DIR" in res.stderr
    res = runner.invoke(app, ["add-class", "x", "--data", str(tmp_path), "--normal", str(folders["normal"]),
                              "--store", str(store)])
    assert res.exit_code == 2
    res = runner.invoke(app, ["add-class", "x", "--normal", str(folders["normal"]), "--abnormal",
                              str(folders["abnormal"]), "--store", str(store)])
    assert res.exit_code == 4 and "no normal one" in res.stderr  # --normal-test missing
    res = runner.invoke(app, ["add-class", "x", "--normal", str(tmp_path / "nope"), "--store", str(store)])
    assert res.exit_code == 4 and "check --normal" in res.stderr
    assert not store.exists()


def test_visa_row_with_a_newline_or_nul_in_its_path_is_one_line_error(tmp_path: Path) -> None:
    root = visa_dataset(tmp_path / "VisA")
    csv_path = root / "split_csv" / "1cls.csv"
    for bad in ("candle/Data/Images/Normal/0000\n.JPG", "candle/\x00.JPG", "x" * 5000):
        csv_path.write_text(f'object,split,label,image,mask\ncandle,train,normal,"{bad}",\n')
        with pytest.raises(DataError) as info:
            find_classes(root)[0].records("train")
        assert len(str(info.value).splitlines()) == 1 and "1cls.csv:2" in str(info.value)


def test_benchmark_refuses_a_bad_class_before_writing_anything(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    mvtec_ad_class(root, "bottle")
    cls = mvtec_ad_class(root, "cable")
    (cls / "ground_truth" / "crack" / "000_mask.png").unlink()  # only some defects of cable have masks
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["benchmark", "--data", str(root), "--protocol", "1x2", "--out", str(out)])
    assert res.exit_code == 4 and "crack/000.png: defective test sample without a gt mask" in res.stderr
    assert not out.exists()
