"""Crash safety: `iumad add-class` and `iumad nightly` run as real processes and are killed (SIGKILL,
through the IUMAD_FAULT hook) at every phase of a step. After each kill: `iumad db check` passes, the
production model gives exactly the scores it gave before, a rerun of the same command succeeds and no
temporary file or stray checkpoint folder is left once it has started.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from iumad.cli import app
from iumad.continual.versions import load_production
from iumad.data.dataset import find_classes
from iumad.faults import STEP_PHASES
from iumad.store import repository as repo
from iumad.store.atomic import TMP_PREFIX
from iumad.store.db import Store
from iumad.store.models import IngestedFile, ModelVersion
from tests.tiny import tiny_world

pytestmark = pytest.mark.slow  # subprocesses or benchmark-sized training: not in the fast subset

SURVIVED: list[str] = []  # kill points survived, reported at the end of the run (see conftest)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path, Path, np.ndarray]:
    """(data, config, store that learned bolt, production scores of bolt's test split)."""
    data, config, root = tiny_world(tmp_path_factory.mktemp("crash"), seed=3)
    with Store.open(root) as store:
        scores = production_scores(store, data)
    return data, config, root, scores


def production_scores(store: Store, data: Path) -> np.ndarray:
    det, _ = load_production(store)
    return np.array([p.score for p in det.predict_records(find_classes(data / "bolt")[0].records("test"), "bolt")])


def iumad(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "IUMAD_FAULT"}
    if fault:
        env["IUMAD_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "iumad", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(f"{TMP_PREFIX}*")]


def assert_intact(root: Path, data: Path, scores: np.ndarray) -> None:
    check = iumad("db", "check", "--store", str(root), "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["ok"]
    with Store.open(root) as store:
        assert np.array_equal(production_scores(store, data), scores)


@pytest.mark.parametrize("phase", STEP_PHASES)
def test_add_class_killed_at_every_phase(base, tmp_path: Path, phase: str) -> None:
    data, config, src, scores = base
    root = tmp_path / "store"
    shutil.copytree(src, root)
    cmd = ("add-class", "disc", "--data", str(data), "--config", str(config), "--store", str(root))
    killed = iumad(*cmd, fault=phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_intact(root, data, scores)
    with Store.open(root) as store, store.session() as s:
        assert repo.get_class(s, "disc") is None and repo.get_production(s).id == 1
    rerun = iumad(*cmd, "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["class"] == "disc"
    assert leftovers(root) == []
    with Store.open(root) as store:
        with store.session() as s:
            steps = repo.list_steps(s)
            assert steps[-1].status == "succeeded" and repo.get_production(s).id == 2
            assert all(st.status != "running" for st in steps)
            known = {v.checkpoint_dir for v in s.scalars(select(ModelVersion))}
        assert {f"checkpoints/{d.name}" for d in store.checkpoints_dir.iterdir()} == known
    SURVIVED.append(f"add-class@{phase}")


def test_nightly_killed_mid_training_then_rerun(base, tmp_path: Path) -> None:
    data, config, src, scores = base
    root = tmp_path / "store"
    shutil.copytree(src, root)
    inbox = tmp_path / "inbox" / "ring"
    inbox.mkdir(parents=True)
    for rgb in sorted((data / "ring" / "train" / "good" / "rgb").iterdir()):
        shutil.copy(rgb, inbox / rgb.name)
        shutil.copy(data / "ring" / "train" / "good" / "xyz" / f"{rgb.stem}.tiff", inbox / f"{rgb.stem}.tiff")
    cmd = ("nightly", "--inbox", str(inbox.parent), "--config", str(config), "--store", str(root), "--json")
    killed = iumad(*cmd, fault="train")
    assert killed.returncode == -signal.SIGKILL
    assert_intact(root, data, scores)
    with Store.open(root) as store, store.session() as s:
        assert not list(s.scalars(select(IngestedFile)))  # nothing counts as ingested before a commit
    rerun = iumad(*cmd)
    assert rerun.returncode == 0, rerun.stderr
    assert [c["class"] for c in json.loads(rerun.stdout)["classes"]] == ["ring"]
    assert leftovers(root) == []
    SURVIVED.append("nightly@train")


class _FullDisk:
    """A file object that writes half of what it is given, then fails as a full or read-only disk does."""

    def __init__(self, fh, code: int) -> None:
        self.fh, self.code = fh, code

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name: str):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


@pytest.mark.parametrize("folder,code", [("checkpoints", errno.ENOSPC), ("features", errno.EROFS)])
def test_full_or_read_only_disk_is_a_clear_error_and_changes_nothing(base, tmp_path: Path, monkeypatch,
                                                                     folder: str, code: int) -> None:
    data, config, src, scores = base
    root = tmp_path / "store"
    shutil.copytree(src, root)
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        target = os.readlink(f"/proc/self/fd/{fd}")
        fh = real_fdopen(fd, *args, **kwargs)
        return _FullDisk(fh, code) if f"/{folder}/" in target and str(root) in target else fh

    monkeypatch.setattr(os, "fdopen", fdopen)
    res = CliRunner().invoke(app, ["add-class", "disc", "--data", str(data), "--config", str(config),
                                   "--store", str(root)])
    monkeypatch.undo()
    assert res.exit_code == 1, res.output
    assert "cannot write" in res.output and os.strerror(code) in res.output and "nothing was changed" in res.output
    assert len(res.output.strip().splitlines()[-1]) > 0 and "Traceback" not in res.output
    assert leftovers(root) == []
    assert_intact(root, data, scores)
    with Store.open(root) as store, store.session() as s:
        steps = repo.list_steps(s)
        assert repo.get_class(s, "disc") is None and repo.get_production(s).id == 1
        assert all(st.status in ("succeeded", "failed") for st in steps)
        assert [f"checkpoints/{d.name}" for d in store.checkpoints_dir.iterdir()] == ["checkpoints/step-0000"]
