"""`iumad serve --workers N`: every worker loads the production model and swaps it on its own, and
/metrics sums the workers' counters (prometheus-client multiprocess mode) while listing each worker's
serving version."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from iumad.cli import app as cli_app
from iumad.continual.versions import rollback
from iumad.errors import UsageError
from iumad.eval.predict import predict_path
from iumad.serve.app import ENV_MAX_UPLOAD, ENV_POLL, app_from_env
from iumad.serve.metrics import MULTIPROC_ENV, multiprocess_dir
from iumad.serve.security import TOKEN_ENV
from iumad.store.db import Store

from tests.tiny import tiny_world

WAIT_S = 120.0  # how long a test waits for the workers to load (or swap) before it fails


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, store root): bolt learned (version 1), then disc (version 2, production)."""
    data, _config, root = tiny_world(tmp_path_factory.mktemp("workers"), seed=0, learned=("bolt", "disc"))
    return data, root


def rgb_xyz(data: Path) -> tuple[Path, Path]:
    folder = data / "bolt" / "test" / "good"
    return folder / "rgb" / "000.png", folder / "xyz" / "000.tiff"


# ---------------------------------------------------------------------------------------------- options


def test_the_worker_factory_takes_its_options_from_the_environment(world: tuple[Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data, root = world
    monkeypatch.setenv("IUMAD_STORE", str(root))
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    monkeypatch.setenv(ENV_MAX_UPLOAD, str(2 ** 20))
    monkeypatch.setenv(ENV_POLL, "0.1")
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    app = app_from_env()
    assert app.state.holder.poll_s == 0.1
    auth = {"authorization": "Bearer s3cret"}
    with TestClient(app) as client:
        deadline = time.monotonic() + WAIT_S
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/readyz").json()["model_version"] == 2
        assert client.get("/v1/classes").status_code == 401
        assert [c["name"] for c in client.get("/v1/classes", headers=auth).json()] == ["bolt", "disc"]
        rgb, _ = rgb_xyz(data)
        big = rgb.read_bytes() + b"\0" * 2 ** 20
        r = client.post("/v1/predict", headers=auth, files={"rgb": ("a.png", big, "image/png")})
        assert r.status_code == 413, r.text  # the limit came from the environment, not the 64 MiB default


def test_the_metrics_folder_is_fresh_or_cleared_and_a_bad_one_is_refused(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    with multiprocess_dir() as folder:
        assert folder.is_dir() and os.environ[MULTIPROC_ENV] == str(folder)
    assert not folder.exists() and MULTIPROC_ENV not in os.environ

    given = tmp_path / "prom"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"left by an earlier run")
    (given / "notes.txt").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_ENV, str(given))
    with multiprocess_dir() as folder:
        assert folder == given and sorted(p.name for p in given.iterdir()) == ["notes.txt"]
    assert given.is_dir() and os.environ[MULTIPROC_ENV] == str(given)

    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="missing.*PROMETHEUS_MULTIPROC_DIR"):
        with multiprocess_dir():
            pass
    assert not (tmp_path / "missing").exists()


def test_cli_refuses_bad_workers_and_a_bad_metrics_folder(world: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, root = world
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", "--store", str(root), "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in result.output
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "nowhere"))
    result = runner.invoke(cli_app, ["serve", "--store", str(root), "--workers", "2", "--port", "1"])
    assert result.exit_code == 2 and "nowhere" in result.output and MULTIPROC_ENV in result.output
    assert not (tmp_path / "nowhere").exists()
    assert "--workers" in runner.invoke(cli_app, ["serve", "--help"]).output


# ---------------------------------------------------------------------------------------------- real workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _versions_by_worker(text: str) -> dict[str, float]:
    """{pid: serving version} from the per-worker `iumad_model_version` gauge lines."""
    return {pid: float(v) for pid, v in re.findall(r'^iumad_model_version\{pid="(\d+)"\} (\S+)$', text, re.M)}


def _wait(client: httpx.Client, ok, what: str) -> str:
    deadline, last = time.monotonic() + WAIT_S, ""
    while time.monotonic() < deadline:
        try:
            last = client.get("/metrics").text
            if client.get("/readyz").status_code == 200 and ok(last):
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {WAIT_S} s; last /metrics:\n{last}")


@pytest.mark.slow
def test_two_workers_each_load_and_swap_and_metrics_sum_them(world: tuple[Path, Path], tmp_path: Path) -> None:
    data, world_root = world
    root = Path(shutil.copytree(world_root, tmp_path / "store"))
    prom = tmp_path / "prom"
    prom.mkdir()
    (prom / "counter_1.db").write_bytes(b"stale")  # left by an earlier run: removed at start
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "IUMAD_STORE")} | {MULTIPROC_ENV: str(prom)}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "iumad.cli", "serve", "--store", str(root), "--port", str(port),
                                 "--workers", "2", "--poll", "0.2"], stdout=log, stderr=subprocess.STDOUT, env=env)
    rgb, xyz = rgb_xyz(data)
    files = [("rgb", ("a.png", rgb.read_bytes(), "image/png")), ("xyz", ("a.tiff", xyz.read_bytes(), "image/tiff"))]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            text = _wait(client, lambda t: len(_versions_by_worker(t)) == 2 and 0.0 not in _versions_by_worker(t).values(),
                         "two workers serving")  # 0: a worker still loading
            assert set(_versions_by_worker(text).values()) == {2.0}, text
            assert not (prom / "counter_1.db").exists()
            n = 5
            for _ in range(n):
                r = client.post("/v1/predict", files=files)
                assert r.status_code == 200 and r.json()["model_version"] == 2, r.text
            with Store.open(root, create=False) as store:
                want = predict_path(store, rgb)[0]
            assert r.json()["score"] == pytest.approx(want["score"], abs=1e-5)
            text = client.get("/metrics").text
            assert f'iumad_requests_total{{route="/v1/predict",status="200"}} {float(n)}' in text, text
            assert f'iumad_samples_scored_total{{class_name="{want["class"]}"}} {float(n)}' in text, text

            with Store.open(root, create=False) as store:
                assert rollback(store)["to_version"] == 1
            text = _wait(client, lambda t: set(_versions_by_worker(t).values()) == {1.0}, "both workers swapping")
            assert len(_versions_by_worker(text)) == 2
            assert "iumad_model_swaps_total 2.0" in text, text  # one swap per worker, summed
            r = client.post("/v1/predict", files=files)
            assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, log_path.read_text()
    assert not list(prom.glob("gauge_liveall_*.db")), log_path.read_text()  # stopped workers serve nothing
