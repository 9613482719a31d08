"""The feature cache is bounded: least recently used entries go first, a store stays under its limit
through several steps, and eviction loses no exemplar (their features are recomputed from the files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from iumad.cli import app
from iumad.model.feature_cache import FeatureCache, cache_key
from iumad.store import repository as repo
from iumad.store.db import Store
from tests.tiny import tiny_config, tiny_data


def _entry(i: int) -> tuple[str, np.ndarray]:
    return cache_key(f"{i:064x}", "rgb", "b", 64, "p"), np.full((4, 16, 16), i, np.float32)  # 2 KiB + header


def test_a_bounded_cache_evicts_the_least_recently_used_entries(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, limit=None)
    keys = []
    for i in range(6):
        key, arr = _entry(i)
        cache.put(key, arr)
        os.utime(cache.path(key), (1000 + i, 1000 + i))  # written one after another
        keys.append(key)
    size = cache.path(keys[0]).stat().st_size
    os.utime(cache.path(keys[0]), (2000, 2000))  # the oldest entry was read since
    bounded = FeatureCache(tmp_path, limit=int(6.5 * size))
    key, arr = _entry(6)
    bounded.put(key, arr)  # 7 entries > limit: evict to 90 % of it (5 entries)
    left = {k for k in keys + [key] if bounded.path(k).exists()}
    assert sum(e.size for e in bounded.entries()) <= 0.9 * bounded.limit
    assert keys[0] in left and key in left  # recently used and new: kept
    assert keys[1] not in left and keys[2] not in left  # the least recently used: gone
    assert bounded.evicted == 2 and bounded.get(keys[1]) is None
    np.testing.assert_array_equal(bounded.get(keys[0]), np.zeros((4, 16, 16), np.float16))
    assert FeatureCache(tmp_path).stats()["entries"] == 5


@pytest.mark.slow
def test_a_store_stays_under_its_cache_limit_and_keeps_every_exemplar(tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "synth", seed=5, n_classes=3)
    names = sorted(p.name for p in data.iterdir() if p.is_dir())
    config = tiny_config(tmp_path / "tiny.yaml")
    store = tmp_path / "store"
    runner = CliRunner()
    limit_gb = 0.0003  # about 315 KiB: less than one tiny class's features
    summaries = []
    for name in names:
        r = runner.invoke(app, ["add-class", name, "--data", str(data), "--config", str(config), "--store",
                                str(store), "--cache-limit", str(limit_gb), "--json"])
        assert r.exit_code == 0, r.output
        summaries.append(json.loads(r.stdout.strip().splitlines()[-1]))
        stats = json.loads(runner.invoke(app, ["cache", "stats", "--store", str(store), "--json"]).stdout)
        assert 0 < stats["bytes"] <= limit_gb * 2 ** 30  # each class's features alone exceed it
    assert summaries[-1]["n_replay"] > 0  # the old classes were replayed from their files
    with Store.open(store, create=False) as opened, opened.session() as s:
        for name, summary in zip(names[:-1], summaries):
            assert len(repo.list_exemplars(s, name)) >= summary["exemplars"][name] > 0
    cleared = json.loads(runner.invoke(app, ["cache", "clear", "--store", str(store), "--json"]).stdout)
    assert cleared["removed_entries"] > 0
    assert json.loads(runner.invoke(app, ["cache", "stats", "--store", str(store), "--json"]).stdout)["entries"] == 0
    predicted = runner.invoke(app, ["predict", str(data / names[0] / "test"), "--class", names[0], "--store",
                                    str(store), "--json"])
    assert predicted.exit_code == 0, predicted.output
