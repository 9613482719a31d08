"""`iumad gc` and `iumad pin`: old versions lose their files (not production, candidate or pinned ones),
unreferenced class blobs go, production scores stay identical, and a gc killed half-way leaves a store
that `db check` passes and the next gc finishes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iumad.continual.retention import gc, pin
from iumad.continual.step import StepRequest, learn
from iumad.continual.versions import load_production, rollback
from iumad.data.dataset import find_classes
from iumad.errors import UsageError
from iumad.store.check import check_store
from iumad.store.db import Store
from tests.tiny import tiny_config, tiny_data


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> tuple[Path, Path]:
    """Versions 1 (bolt), 2 (bolt updated: a new bolt blob), 3 (+ disc), 4 (+ ring); production 4."""
    tmp = tmp_path_factory.mktemp("retention")
    data = tiny_data(tmp / "synth", seed=6)
    config = tiny_config(tmp / "tiny.yaml")
    with Store.open(tmp / "store") as store:
        learn(store, StepRequest("bolt", data, config=config))
        learn(store, StepRequest("bolt", data, config=config, update=True))
        for name in ("disc", "ring"):
            learn(store, StepRequest(name, data, config=config))
    return data, tmp / "store"


@pytest.fixture
def world(learned, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the learned store, to change."""
    data, root = learned
    shutil.copytree(root, tmp_path / "store", ignore=shutil.ignore_patterns(".writer.lock"))
    return data, tmp_path / "store"


def scores(store: Store, data: Path) -> list[float]:
    det, _ = load_production(store)
    return [p.score for p in det.predict_records(find_classes(data / "bolt")[0].records("test"), "bolt")]


def files(root: Path) -> list[str]:
    """Model files: checkpoint folders and class blobs."""
    return sorted(str(p.relative_to(root)) for sub in ("checkpoints", "blobs") for p in (root / sub).rglob("*"))


def test_gc_keeps_the_newest_pinned_and_production_versions_and_their_blobs(world) -> None:
    data, root = world
    with Store.open(root) as store:
        before, listing = scores(store, data), files(root)
        assert gc(store, keep=1, dry_run=True)["removed_versions"] == [1, 2, 3]
        assert files(root) == listing  # a dry run changes nothing
        pin(store, 1)
        report = gc(store, keep=2)
        assert report["removed_versions"] == [2] and report["kept_versions"] == [1, 3, 4]
        assert report["removed_blobs"] == 0  # version 2's bolt blob is version 3's and 4's too
        assert not (root / "checkpoints" / "step-0001").exists() and (root / "checkpoints" / "step-0000").exists()
        pin(store, 1, pinned=False)
        report = gc(store, keep=1)
        assert report["removed_versions"] == [1, 3] and report["removed_blobs"] == 1  # the first bolt blob
        assert sorted(p.resolve() for p in store.blobs_dir.glob("*/*.pt")) == sorted(store.referenced_blobs())
        assert check_store(store)["ok"] and check_store(store)["problems"] == []
        assert scores(store, data) == before
        with pytest.raises(UsageError, match="removed by `iumad gc`"):
            rollback(store, to=3)
        with pytest.raises(UsageError, match="removed by gc"):
            pin(store, 3)
        with pytest.raises(UsageError, match="keep at least"):
            gc(store, keep=0)


@pytest.mark.slow
def test_a_gc_killed_after_marking_leaves_a_passing_store_and_the_next_one_finishes(world) -> None:
    data, root = world
    env = {**os.environ, "IUMAD_FAULT": "gc"}
    with Store.open(root) as store:
        before = scores(store, data)
    killed = subprocess.run([sys.executable, "-m", "iumad", "gc", "--keep", "1", "--store", str(root), "--json"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    with Store.open(root) as store:
        report = check_store(store)
        assert report["ok"] and {p["code"] for p in report["problems"]} == {"gc-leftover"}
        assert scores(store, data) == before
    env.pop("IUMAD_FAULT")
    done = subprocess.run([sys.executable, "-m", "iumad", "gc", "--keep", "1", "--store", str(root), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed_versions"] == []  # already marked; their files go now
    with Store.open(root) as store:
        assert check_store(store)["problems"] == []
        assert [d.name for d in store.checkpoints_dir.iterdir()] == ["step-0003"]
        assert scores(store, data) == before
