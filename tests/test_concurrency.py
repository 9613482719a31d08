"""Concurrency with real processes: while one writer is mid-step, other writers exit 5 at once (or wait
with --wait), and readers keep working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iumad.errors import IumadError
from iumad.store import repository as repo
from iumad.store.db import Store
from tests.tiny import tiny_world

pytestmark = pytest.mark.slow  # subprocesses or benchmark-sized training: not in the fast subset

def iumad(*args: str, env: dict | None = None, background: bool = False):
    full = {k: v for k, v in os.environ.items() if not k.startswith("IUMAD_FAULT")}
    full.update(env or {})
    cmd = [sys.executable, "-m", "iumad", *args]
    if background:
        return subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300)


def wait_for_running_step(root: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Store.open(root, create=False) as store, store.session() as s:
            if any(st.status == "running" for st in repo.list_steps(s)):
                return
        time.sleep(0.2)
    raise AssertionError("the first writer never started its step")


def test_second_writers_are_refused_or_wait_and_readers_keep_working(tmp_path: Path) -> None:
    data, config, root = tiny_world(tmp_path, seed=5)
    release = tmp_path / "release"
    common = ("--data", str(data), "--config", str(config), "--store", str(root))
    first = iumad("add-class", "disc", *common,
                  env={"IUMAD_FAULT": "pause:train", "IUMAD_FAULT_RELEASE": str(release)}, background=True)
    waiter = None
    try:
        wait_for_running_step(root)
        for cmd in (("add-class", "ring", *common), ("rollback", "--store", str(root)),
                    ("nightly", "--inbox", str(tmp_path), "--store", str(root))):
            res = iumad(*cmd)
            assert res.returncode == 5, (cmd, res.stderr)
            assert "being written by pid" in res.stderr and "--wait" in res.stderr
        assert first.poll() is None  # refused at once: the first writer is still paused mid-step
        probe = data / "bolt" / "test" / "good" / "rgb" / "000.png"
        for cmd in (("classes", "--json"), ("history", "--json"), ("forgetting-report", "--json"),
                    ("predict", str(probe), "--class", "bolt", "--json"), ("db", "check", "--json")):
            res = iumad(*cmd, "--store", str(root))
            assert res.returncode == 0, (cmd, res.stderr)
            assert json.loads(res.stdout) is not None
        waiter = iumad("add-class", "ring", *common, "--wait", "120", "--json", background=True)
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting for the lock
    finally:
        release.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert waiter is not None
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert json.loads(out)["class"] == "ring"
    with Store.open(root) as store, store.session() as s:
        assert [c.name for c in repo.list_classes(s)] == ["bolt", "disc", "ring"]


def test_fault_hook_is_inert_without_its_variable(monkeypatch) -> None:
    from iumad import faults

    monkeypatch.delenv("IUMAD_FAULT", raising=False)
    faults.reach("train")  # nothing happens
    monkeypatch.setenv("IUMAD_FAULT", "raise:train")
    faults.reach("evaluate")  # another phase: nothing happens
    with pytest.raises(IumadError, match="fault injected"):
        faults.reach("train")
