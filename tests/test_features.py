"""Feature cache: reused across calls, never stale after a change of file, backbone or preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import pytest

from iumad.data import find_classes
from iumad.model.backbone import BackboneSpec, FrozenBackbone
from iumad.model.feature_cache import FeatureCache
from iumad.model.features import FeatureExtractor, balanced_batches
from iumad.store.atomic import TMP_PREFIX, atomic_write_bytes, remove_temporaries
from tests.conftest import scene, write_png, write_tiff

SIZE = 64


@pytest.fixture(scope="module")
def backbone() -> FrozenBackbone:
    return FrozenBackbone(BackboneSpec(input_size=SIZE))


def _dataset(root: Path, n: int = 3) -> Path:
    for i in range(n):
        rgb, xyz = scene(48, seed=i)
        write_png(root / "part" / "good" / f"{i}.png", rgb)
        write_tiff(root / "part" / "good" / f"{i}.tiff", xyz)
    write_png(root / "flat" / "good" / "0.png", scene(48)[0])  # an RGB-only class
    return root


def test_cache_reuses_and_invalidates(tmp_path: Path, backbone: FrozenBackbone) -> None:
    data = _dataset(tmp_path / "data")
    part, flat = find_classes(data)[1], find_classes(data)[0]
    cache = FeatureCache(tmp_path / "features")
    ex = FeatureExtractor(backbone, cache)
    recs = part.records("train")
    first = ex.extract(recs)
    assert cache.misses > 0 and cache.hits == 0
    assert first[0].features["rgb"].shape == (152, SIZE // 8, SIZE // 8)
    assert first[0].features["rgb"].dtype == np.float16
    assert first[0].foreground.shape == (SIZE, SIZE) and first[0].foreground.dtype == bool
    second = ex.extract(recs)
    assert cache.hits == 3 * len(recs)  # rgb, geometry, foreground for each sample
    for a, b in zip(first, second):
        assert np.array_equal(a.features["geometry"], b.features["geometry"])
        assert np.array_equal(a.foreground, b.foreground)
    # a changed file gets a new key
    before = ex.keys(recs[0], ("rgb", "geometry"))
    write_png(recs[0].rgb, scene(48, seed=99)[0])
    after = ex.keys(recs[0], ("rgb", "geometry"))
    assert before["rgb"] != after["rgb"] and before["geometry"] == after["geometry"]
    # another preprocessing option or backbone input size never reuses entries
    other_prep = FeatureExtractor(backbone, cache, geometry_options={"normal_sigma": 2.0})
    assert other_prep.keys(recs[1], ("geometry",))["geometry"] != ex.keys(recs[1], ("geometry",))["geometry"]
    bigger = FeatureExtractor(FrozenBackbone(BackboneSpec(input_size=96)), cache)
    assert bigger.keys(recs[1], ("rgb",))["rgb"] != ex.keys(recs[1], ("rgb",))["rgb"]
    # an RGB-only class records no geometry and no foreground
    (only,) = ex.extract(flat.records("train"))
    assert only.modalities == ("rgb",) and only.foreground is None


def test_cached_features_match_uncached(tmp_path: Path, backbone: FrozenBackbone) -> None:
    from iumad.data import load_sample

    part = find_classes(_dataset(tmp_path / "data", n=2))[1]
    recs = part.records("train")
    threads = torch.get_num_threads()
    cached = FeatureExtractor(backbone, FeatureCache(tmp_path / "f")).extract(recs)
    direct = FeatureExtractor(backbone).extract_samples([load_sample(r) for r in recs])
    for a, b in zip(cached, direct):
        for m in ("rgb", "geometry"):
            assert np.array_equal(a.features[m], b.features[m])
    assert torch.get_num_threads() == threads  # the workers' one-thread setting does not leak


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 9, 27, 108, 109])
@pytest.mark.parametrize("size, workers", [(4, 1), (4, 2), (4, 3), (1, 2), (16, 2)])
def test_balanced_batches_keep_order_and_size_and_end_together(n: int, size: int, workers: int) -> None:
    got = balanced_batches(list(range(n)), size, workers)
    assert [i for b in got for i in b] == list(range(n))  # every item once, in order
    lengths = [len(b) for b in got]
    assert all(0 < k <= size for k in lengths) and lengths == sorted(lengths, reverse=True)
    assert not lengths or max(lengths) - min(lengths) <= 1
    if n:  # a multiple of the workers (unless there are fewer items), and no more batches than that needs
        assert len(got) % workers == 0 or len(got) == n
        assert len(got) - workers < -(-n // size)


def test_corrupt_cache_entry_is_a_miss(tmp_path: Path, backbone: FrozenBackbone) -> None:
    part = find_classes(_dataset(tmp_path / "data", n=1))[1]
    cache = FeatureCache(tmp_path / "f")
    ex = FeatureExtractor(backbone, cache)
    (good,) = ex.extract(part.records("train"))
    key = ex.keys(part.records("train")[0], ("rgb",))["rgb"]
    cache.path(key).write_bytes(b"garbage")
    (again,) = ex.extract(part.records("train"))
    assert np.array_equal(good.features["rgb"], again.features["rgb"])


def test_atomic_write_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.bin"
    digest = atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello" and len(digest) == 64
    assert not list(target.parent.glob(f"{TMP_PREFIX}*"))
    (target.parent / f"{TMP_PREFIX}left").write_bytes(b"x")
    assert remove_temporaries(tmp_path) == 1
    assert target.exists()


def test_record_without_requested_modality_is_a_data_error(tmp_path: Path, backbone: FrozenBackbone) -> None:
    from iumad.errors import DataError

    flat = find_classes(_dataset(tmp_path / "data", n=1))[0]  # RGB-only class
    with pytest.raises(DataError, match=r"0\.png: has none of the modalities geometry"):
        FeatureExtractor(backbone).extract(flat.records("train"), modalities=("geometry",))
