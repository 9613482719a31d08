"""The object region of RGB-only classes (`iumad.data.region`, `Detector.fit_region`): found where a
textured part sits on a plainer background, never where it does not, used by the scorer, and saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iumad.data.geometry import cross_dilation
from iumad.data.region import object_region
from iumad.data.sample import SampleRecord
from iumad.model.detector import Detector
from iumad.model.features import SampleFeatures
from iumad.store.checkpoints import load_detector, save_detector
from tests.test_detector import SIZE, tiny_config


def _part(seed: int, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A grey background with camera noise and a textured square (the part) in the middle."""
    rng = np.random.default_rng(seed)
    img = rng.integers(57, 63, size=(*shape, 3)).astype(np.uint8)
    h, w = shape
    img[h // 3:2 * h // 3, 3 * w // 8:5 * w // 8] = rng.integers(40, 220, size=(h // 3, w // 4, 3))
    return img


def test_the_region_outlines_a_textured_part_on_a_plain_background() -> None:
    region = object_region([_part(s) for s in range(4)])
    assert region is not None
    assert region[36:60, 52:76].all()  # inside the part, away from its edge
    assert not region[:12].any() and not region[:, :24].any()  # the plain background


@pytest.mark.parametrize("kind", ["texture everywhere", "no texture"])
def test_no_region_where_nothing_stands_out(kind: str) -> None:
    rng = np.random.default_rng(0)
    images = ([rng.integers(0, 256, size=(96, 128, 3)).astype(np.uint8) for _ in range(3)]
              if kind == "texture everywhere" else [np.full((96, 128, 3), 90, np.uint8)] * 3)
    assert object_region(images) is None


def _rgb_class(tmp_path: Path, n: int = 5) -> list[SampleRecord]:
    out = []
    for i in range(n):
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(_part(i, (SIZE, SIZE))).save(path)
        out.append(SampleRecord("part", "train", "good", rgb=path))
    return out


def test_an_rgb_class_is_scored_inside_its_region_only_and_keeps_it_across_save_load(tmp_path: Path) -> None:
    text = np.ones(384, np.float32) / np.sqrt(384)
    det = Detector(tiny_config())
    det.register_class("part", ["rgb"], text)
    det.ensure_net().eval()
    records = _rgb_class(tmp_path)
    det.fit_region("part", records)
    region = det.classes["part"].region
    assert region is not None and region.shape == (SIZE, SIZE) and 0 < region.float().mean() < 0.5
    rng = np.random.default_rng(0)
    items = [SampleFeatures({"rgb": rng.normal(size=(det.backbone.out_channels, 8, 8)).astype(np.float16)})
             for _ in range(4)]
    det.calibrate("part", items)
    (pred,) = det.predict_features(items[:1], ["part"], [(SIZE, SIZE)])
    fused = pred.maps["fused"]
    far = ~cross_dilation(region.numpy(), det.config.score.foreground_dilation)  # beyond the dilated region
    assert far.any() and np.all(fused[far] == fused.min())
    assert fused[region.numpy()].max() > fused.min()

    digest = save_detector(det, tmp_path / "model")
    loaded = load_detector(tmp_path / "model", expected_sha256=digest)
    assert np.array_equal(loaded.classes["part"].region.numpy(), region.numpy())
    assert loaded.predict_features(items[:1], ["part"], [(SIZE, SIZE)])[0].score == pred.score

    det.config.score.object_region = False  # switched off: no region, every pixel scored
    det.fit_region("part", records)
    assert det.classes["part"].region is None


def test_an_update_adds_the_new_data_s_region_and_geometry_classes_have_none(tmp_path: Path) -> None:
    text = np.ones(384, np.float32) / np.sqrt(384)
    det = Detector(tiny_config())
    det.register_class("part", ["rgb"], text)
    det.fit_region("part", _rgb_class(tmp_path))
    first = det.classes["part"].region.clone()
    moved = tmp_path / "moved"
    moved.mkdir()
    records = []
    for i in range(5):
        Image.fromarray(np.roll(_part(i, (SIZE, SIZE)), SIZE // 4, axis=1)).save(moved / f"{i}.png")
        records.append(SampleRecord("part", "train", "good", rgb=moved / f"{i}.png"))
    det.fit_region("part", records, extend=True)
    now = det.classes["part"].region
    assert (now >= first).all() and now.sum() > first.sum()
    det.register_class("both", ["rgb", "geometry"], text)
    det.fit_region("both", records)
    assert det.classes["both"].region is None


def test_a_sample_without_a_foreground_is_scored_everywhere_whatever_its_batch() -> None:
    from iumad.model.maps import score_region

    fg = np.zeros((16, 16), bool)
    fg[6:9, 6:9] = True
    alone = score_region([fg], 16, 2)
    mixed = score_region([fg, None], 16, 2)
    assert torch.equal(mixed[0], alone[0]) and mixed[1].all()
    assert score_region([None, None], 16, 2) is None
