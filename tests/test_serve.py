"""`iumad serve`: scores equal `iumad predict`, bad uploads get their documented 4xx and change nothing,
a promotion is swapped in under a stream of requests, a tampered version is refused, a real uvicorn
process answers on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from iumad.cli import app as cli_app
from iumad.continual.report import classes as list_classes
from iumad.continual.report import forgetting, forgetting_json
from iumad.continual.versions import load_version, rollback
from iumad.data.sample import SampleRecord
from iumad.eval.predict import predict_path
from iumad.serve import uploads
from iumad.serve.app import create_app
from iumad.serve.security import check_bind, is_loopback
from iumad.errors import UsageError
from iumad.store import repository as repo
from iumad.store.db import Store
from iumad.store.models import ModelVersion

from tests.tiny import tiny_world

READY_TRIES = 600  # x 0.1 s: how long a test waits for a model to load before it fails


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, store root): bolt learned (version 1), then disc (version 2, production)."""
    data, _config, root = tiny_world(tmp_path_factory.mktemp("serve"), seed=0, learned=("bolt", "disc"))
    return data, root


@pytest.fixture
def own_store(world: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the world's store that a test may change (promote, tamper with)."""
    return Path(shutil.copytree(world[1], tmp_path / "store"))


def wait_ready(client: TestClient | httpx.Client, version: int | None = None) -> dict:
    for _ in range(READY_TRIES):
        try:
            r = client.get("/readyz")
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 200 and (version is None or r.json()["model_version"] == version):
            return r.json()
        time.sleep(0.1)
    raise AssertionError(f"not ready (version {version}): {None if r is None else r.text}")


@contextmanager
def serving(root: Path, **kwargs) -> Iterator[TestClient]:
    with TestClient(create_app(root, **kwargs)) as client:
        wait_ready(client)
        yield client


def files_of(*pairs: tuple[str, Path | bytes, str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(name, ("upload", p.read_bytes() if isinstance(p, Path) else p, ctype)) for name, p, ctype in pairs]


def rgb_xyz(data: Path, label: str = "good", cls: str = "bolt") -> tuple[Path, Path]:
    folder = data / cls / "test" / label
    return folder / "rgb" / "000.png", folder / "xyz" / "000.tiff"


def store_state(root: Path) -> dict[str, str]:
    """What a request could change: every file's sha256 and the database's rows (WAL files aside)."""
    state = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(("-wal", "-shm", ".sqlite")):
            state[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    con = sqlite3.connect(root / "iumad.sqlite")
    try:
        state["iumad.sqlite"] = hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
    finally:
        con.close()
    return state


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack" if arr.ndim == 2 or arr.shape[-1] != 3 else "rgb",
                     planarconfig="contig")
    return buf.getvalue()


def huge_png(side: int) -> bytes:
    """A PNG whose header declares side x side pixels, with no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- scoring


def test_predict_gives_the_scores_of_iumad_predict(world: tuple[Path, Path], tmp_path: Path) -> None:
    data, root = world
    with Store.open(root, create=False) as store:
        expected = {label: predict_path(store, rgb_xyz(data, label)[0])[0] for label in ("good", "dent")}
    with serving(root) as client:
        for label, want in expected.items():
            rgb, xyz = rgb_xyz(data, label)
            r = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")))
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["model_version"] == want["model_version"] == 2
            assert got["class"] == want["class"] and got["decision"] == want["decision"]
            for key in ("score", "score_rgb", "score_geometry", "class_probability", "threshold"):
                assert got[key] == pytest.approx(want[key], abs=1e-5), key
            assert got["latency_ms"] > 0
        rgb, xyz = rgb_xyz(data)
        r = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")),
                        data={"class": "bolt"})
        assert r.status_code == 200 and r.json()["class_given"] is True, r.text
        assert r.json()["score"] == pytest.approx(expected["good"]["score"], abs=1e-5)


def test_depth_png_is_scored_as_iumad_predict_scores_it(world: tuple[Path, Path], tmp_path: Path) -> None:
    data, root = world
    rgb, xyz = rgb_xyz(data)
    z = tifffile.imread(xyz)[..., 2]
    folder = tmp_path / "parts"  # a flat folder `iumad predict` pairs by stem: part.png + part_depth.png (mm)
    folder.mkdir()
    depth = folder / "part_depth.png"
    Image.fromarray(np.round(z * 1000).astype(np.uint16)).save(depth)
    assert np.asarray(Image.open(depth)).dtype == np.uint16
    shutil.copyfile(rgb, folder / "part.png")
    with Store.open(root, create=False) as store:
        want = predict_path(store, folder)[0]
    with serving(root) as client:
        r = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("depth", depth, "image/png")))
    assert r.status_code == 200, r.text
    assert r.json()["score"] == pytest.approx(want["score"], abs=1e-5) and r.json()["class"] == want["class"]
    assert r.json()["score_geometry"] == pytest.approx(want["score_geometry"], abs=1e-5)


def test_batch_scores_every_sample_like_single_requests(world: tuple[Path, Path]) -> None:
    data, root = world
    labels = ("good", "dent", "stain", "color")
    with serving(root) as client:
        singles = []
        for label in labels:
            rgb, xyz = rgb_xyz(data, label)
            r = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")))
            singles.append(r.json())
        parts = []
        for i, label in enumerate(labels):
            rgb, xyz = rgb_xyz(data, label)
            parts += [(f"rgb.{i}", rgb, "image/png"), (f"xyz.{i}", xyz, "image/tiff")]
        r = client.post("/v1/predict/batch", files=files_of(*reversed(parts)))  # order of fields does not matter
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["model_version"] == 2 and len(body["results"]) == len(labels)
    for single, row in zip(singles, body["results"]):
        assert row["score"] == pytest.approx(single["score"], abs=1e-5)
        assert row["class"] == single["class"] and row["model_version"] == 2
    assert len({round(s["score"], 4) for s in singles}) > 1  # the samples differ: the order is checked


def test_read_endpoints_match_the_cli_reports(world: tuple[Path, Path]) -> None:
    _, root = world
    with serving(root) as client:
        classes = client.get("/v1/classes").json()
        versions = client.get("/v1/versions").json()
        report = client.get("/v1/forgetting").json()
        bad = client.get("/v1/forgetting", params={"metric": "accuracy"})
        assert client.get("/healthz").json() == {"status": "ok"}
        paths = client.get("/openapi.json").json()["paths"]
        form = paths["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(form["properties"]) == {"rgb", "xyz", "depth", "class", "heatmap"}
        assert {"/v1/predict/batch", "/v1/classes", "/v1/versions", "/v1/forgetting", "/readyz", "/dashboard",
                "/v1/maps/{map_id}.png", "/v1/quarantine/{sample_id}/accept"} <= set(paths)
        assert all(op.get("summary") for path in paths.values() for op in path.values())
    with Store.open(root, create=False) as store:
        assert classes == list_classes(store)
        want = forgetting_json(*forgetting(store, "i_auroc"))
    assert [c["name"] for c in classes] == ["bolt", "disc"]
    assert [(v["version"], v["alias"], v["serving"]) for v in versions] == [(1, None, False), (2, "production", True)]
    assert report["class_names"] == want["class_names"] == ["bolt", "disc"]
    assert report["R"] == [[None if isinstance(x, float) and x != x else x for x in row] for row in want["R"]]
    assert bad.status_code == 400 and bad.json()["field"] == "metric"


def test_metrics_count_requests_samples_and_the_version(world: tuple[Path, Path]) -> None:
    data, root = world
    with serving(root) as client:
        rgb, xyz = rgb_xyz(data)
        for _ in range(2):
            client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")))
        client.post("/v1/predict", files=files_of(("rgb", b"not a png", "image/png")))
        text = client.get("/metrics").text
    assert 'iumad_requests_total{route="/v1/predict",status="200"} 2.0' in text
    assert 'iumad_requests_total{route="/v1/predict",status="415"} 1.0' in text
    assert 'iumad_samples_scored_total{class_name="bolt"} 2.0' in text
    assert "iumad_model_version 2.0" in text
    assert 'iumad_request_seconds_bucket{le="+Inf",route="/v1/predict"} 3.0' in text
    assert "iumad_model_last_swap_timestamp_seconds" in text


# ---------------------------------------------------------------------------------------------- bad uploads


def _bad_cases(data: Path) -> list[tuple[str, dict, int, str | None]]:
    rgb, xyz = rgb_xyz(data)
    good_rgb, good_xyz = rgb.read_bytes(), xyz.read_bytes()
    h, w = np.asarray(Image.open(rgb)).shape[:2]
    nan_xyz = np.full((h, w, 3), np.nan, np.float32)
    return [
        ("truncated png", {"files": files_of(("rgb", good_rgb[: len(good_rgb) // 2], "image/png"))}, 400, "rgb"),
        ("huge declared size", {"files": files_of(("rgb", huge_png(10000), "image/png"))}, 400, "rgb"),
        ("absurd declared size", {"files": files_of(("rgb", huge_png(100000), "image/png"))}, 400, "rgb"),
        ("wrong tiff shape", {"files": files_of(("xyz", tiff_bytes(np.zeros((h, w, 4), np.float32)), "image/tiff"))},
         400, "xyz"),
        ("depth tiff as xyz", {"files": files_of(("xyz", tiff_bytes(np.ones((h, w), np.float32)), "image/tiff"))},
         400, "xyz"),
        ("nan points", {"files": files_of(("rgb", good_rgb, "image/png"), ("xyz", tiff_bytes(nan_xyz), "image/tiff"))},
         400, "xyz"),
        ("rgb and xyz sizes differ", {"files": files_of(("rgb", png_bytes(np.zeros((h // 2, w // 2, 3), np.uint8)),
                                                           "image/png"), ("xyz", good_xyz, "image/tiff"))}, 400, "xyz"),
        ("8-bit colour as depth", {"files": files_of(("depth", good_rgb, "image/png"))}, 400, "depth"),
        ("wrong content type", {"files": files_of(("rgb", good_rgb, "text/plain"))}, 415, "rgb"),
        ("tiff bytes in rgb", {"files": files_of(("rgb", good_xyz, "application/octet-stream"))}, 415, "rgb"),
        ("json body", {"json": {"rgb": "x"}}, 415, None),
        ("missing files", {"files": {"class": (None, b"bolt")}}, 400, "rgb"),
        ("urlencoded form", {"data": {"class": "bolt"}}, 415, None),
        ("text instead of file", {"data": {"rgb": "abc"}, "files": files_of(("xyz", good_xyz, "image/tiff"))}, 400, "rgb"),
        ("unknown field", {"files": files_of(("image", good_rgb, "image/png"))}, 400, "image"),
        ("unknown class", {"data": {"class": "nut"}, "files": files_of(("rgb", good_rgb, "image/png"))}, 400, "class"),
        ("a modality of the class missing", {"data": {"class": "bolt"}, "files": files_of(("rgb", good_rgb, "image/png"))},
         400, "xyz"),
        ("xyz and depth", {"files": files_of(("xyz", good_xyz, "image/tiff"),
                                             ("depth", png_bytes(np.ones((h, w), np.uint16)), "image/png"))}, 400, "depth"),
    ]


def test_each_bad_upload_gets_its_status_and_changes_nothing(world: tuple[Path, Path]) -> None:
    data, root = world
    rgb, xyz = rgb_xyz(data)
    with serving(root) as client:
        before = store_state(root)
        for name, kwargs, status, field in _bad_cases(data):
            r = client.post("/v1/predict", **kwargs)
            assert r.status_code == status, (name, r.text)
            body = r.json()
            assert set(body) == {"error", "code", "field", "fix"}, name
            assert body["code"] == status and body["field"] == field and body["fix"], (name, body)
            assert "/tmp" not in body["error"] and "iumad-serve-" not in body["error"], (name, body)
        r = client.post("/v1/predict/batch", files=files_of(("rgb.0", rgb, "image/png"), ("rgb.2", rgb, "image/png")))
        assert r.status_code == 400 and r.json()["field"] == "rgb.1", r.text
        r = client.post("/v1/predict/batch", files=files_of(("rgb.0", rgb, "image/png"),
                                                            ("rgb.1", rgb.read_bytes()[:100], "image/png")))
        assert r.status_code == 400 and r.json()["field"] == "rgb.1", r.text
        good = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")))
        assert good.status_code == 200 and good.json()["model_version"] == 2
        assert client.get("/readyz").json()["model_version"] == 2
        assert 'status="500"' not in client.get("/metrics").text
    assert store_state(root) == before


def test_an_unexpected_error_is_a_json_500_and_the_server_keeps_serving(world: tuple[Path, Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data, root = world
    rgb, xyz = rgb_xyz(data)
    payload = files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff"))
    real = uploads.write_records
    calls = []

    def broken_once(*args, **kwargs):  # a bug in the server's own code, not a bad upload
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(uploads, "write_records", broken_once)
    with TestClient(create_app(root), raise_server_exceptions=False) as client:
        wait_ready(client)
        r = client.post("/v1/predict", files=payload)
        assert r.status_code == 500 and r.json()["code"] == 500 and "ZeroDivisionError" in r.json()["error"]
        assert client.post("/v1/predict", files=payload).status_code == 200
        assert 'iumad_requests_total{route="/v1/predict",status="500"} 1.0' in client.get("/metrics").text


def test_bodies_over_the_limit_get_413_declared_or_streamed(world: tuple[Path, Path]) -> None:
    data, root = world
    blob = rgb_xyz(data)[0].read_bytes() + b"\0" * (2 * 2 ** 20)
    with serving(root, max_upload_bytes=2 ** 20) as client:
        r = client.post("/v1/predict", files=files_of(("rgb", blob, "image/png")))
        assert r.status_code == 413 and r.json()["code"] == 413, r.text
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"rgb\"; filename=\"a.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + blob + f"\r\n--{boundary}--\r\n".encode()

        def chunks() -> Iterator[bytes]:  # no Content-Length: the guard counts while streaming
            for i in range(0, len(body), 65536):
                yield body[i:i + 65536]

        r = client.post("/v1/predict", content=chunks(),
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413, r.text
        rgb, xyz = rgb_xyz(data)
        r = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")))
        assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- security


def test_token_guards_v1_and_non_loopback_needs_one(world: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    data, root = world
    with serving(root, token="s3cret") as client:
        assert client.get("/v1/classes").status_code == 401
        assert client.get("/v1/classes", headers={"authorization": "Bearer wrong"}).json()["field"] == "authorization"
        assert client.get("/v1/classes", headers={"authorization": "Bearer s3cret"}).status_code == 200
        r = client.post("/v1/predict", files=files_of(("rgb", rgb_xyz(data)[0], "image/png")))
        assert r.status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(UsageError, match="IUMAD_SERVE_TOKEN"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "s3cret")
    monkeypatch.delenv("IUMAD_SERVE_TOKEN", raising=False)
    result = CliRunner().invoke(cli_app, ["serve", "--store", str(root), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "token" in result.output


# ---------------------------------------------------------------------------------------------- hot swap


def test_hot_swap_under_a_stream_of_requests(own_store: Path, world: tuple[Path, Path]) -> None:
    data, _ = world
    rgb, xyz = rgb_xyz(data)
    payload = files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff"))
    want = {}
    with Store.open(own_store, create=False) as store:
        for version in (1, 2):
            with store.session() as s:
                det = load_version(store, s.get(ModelVersion, version))
            want[version] = det.predict_records([SampleRecord("", "test", "unknown", rgb=rgb, geometry=xyz,
                                                              geometry_kind="xyz")])[0].score
    with serving(own_store, poll_s=0.1) as client:
        stop, failures = threading.Event(), []
        seen: list[list[int]] = [[] for _ in range(3)]
        scores: dict[int, set[float]] = {1: set(), 2: set()}

        def stream(out: list[int]) -> None:
            while not stop.is_set():
                try:
                    r = client.post("/v1/predict", files=payload)
                except Exception as exc:  # a dead thread must end the waits below, not hang them
                    failures.append(repr(exc))
                    return
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    out.append(r.json()["model_version"])
                    scores[r.json()["model_version"]].add(r.json()["score"])

        threads = [threading.Thread(target=stream, args=(out,)) for out in seen]
        for t in threads:
            t.start()
        try:
            while sum(map(len, seen)) < 6 and not failures:
                time.sleep(0.05)
            with Store.open(own_store, create=False) as store:
                assert rollback(store)["to_version"] == 1
            wait_ready(client, version=1)
            counts = [len(s) for s in seen]
            while any(len(s) < c + 2 for s, c in zip(seen, counts)) and not failures:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == []
        for version, got in scores.items():  # each response scored wholly by the version it names
            assert got and all(g == pytest.approx(want[version], abs=1e-5) for g in got), (version, got, want)
        assert abs(want[1] - want[2]) > 1e-3  # the two versions score the part differently: mixing would show
        for versions in seen:
            changes = sum(a != b for a, b in zip(versions, versions[1:]))
            assert versions[0] == 2 and versions[-1] == 1 and changes == 1, versions
        text = client.get("/metrics").text
        assert "iumad_model_version 1.0" in text and "iumad_model_swaps_total 1.0" in text


def test_a_tampered_new_version_is_refused_and_the_old_keeps_serving(own_store: Path,
                                                                       world: tuple[Path, Path]) -> None:
    data, _ = world
    rgb, xyz = rgb_xyz(data)
    with serving(own_store, poll_s=0.1, retry_s=0.5) as client:
        with Store.open(own_store, create=False) as store:
            with store.session() as s:
                assert repo.get_production(s).id == 2
                model_pt = store.path(s.get(ModelVersion, 1).checkpoint_dir) / "model.pt"
            original = model_pt.read_bytes()
            with model_pt.open("ab") as f:  # changed on disk after it was recorded
                f.write(b"tampered")
            with store.session() as s:
                repo.promote(s, 1)
        for _ in range(READY_TRIES):
            text = client.get("/metrics").text
            if 'iumad_model_swap_refused_total{version="1"} 1.0' in text:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the tampered version was never refused")
        r = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")))
        assert r.status_code == 200 and r.json()["model_version"] == 2, r.text
        ready = client.get("/readyz").json()
        assert ready["model_version"] == 2 and "refused" in ready["last_error"]
        versions = {v["version"]: v for v in client.get("/v1/versions").json()}
        assert versions[2]["serving"] and versions[1]["alias"] == "production"
        assert "sha256" in versions[1]["refused"]
        assert "iumad_model_version 2.0" in text
        model_pt.write_bytes(original)  # restored: the next retry swaps it in
        wait_ready(client, version=1)
        r = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")))
        assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
        assert client.get("/readyz").json()["last_error"] is None


# ---------------------------------------------------------------------------------------------- real process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_uvicorn_process_serves_on_loopback(world: tuple[Path, Path], tmp_path: Path) -> None:
    """... and under --json logs one JSON object per line, uvicorn's own and access lines included."""
    data, root = world
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "iumad.cli", "serve", "--store", str(root), "--port", str(port),
                             "--json"], stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            ready = wait_ready(client)
            assert ready["model_version"] == 2
            rgb, xyz = rgb_xyz(data)
            r = client.post("/v1/predict", files=files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff")))
            assert r.status_code == 200, r.text
        with Store.open(root, create=False) as store:
            want = predict_path(store, rgb)[0]
        assert r.json()["score"] == pytest.approx(want["score"], abs=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
    assert any(x["logger"] == "uvicorn.error" and "running on" in x["message"].lower() for x in lines), lines[:5]
    assert any(x.get("path") == "/v1/predict" and x.get("method") == "POST" and x.get("status") == 200
               for x in lines), lines[-5:]
    assert all({"time", "level", "logger", "message"} <= set(x) for x in lines)
