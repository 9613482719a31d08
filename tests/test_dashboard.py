"""The dashboard and quarantine review: `nightly` records what it holds back, a decision is one final row
(401 without the token, 404 for an unknown sample, 409 for the other decision, idempotent otherwise),
`history` shows it, the next `nightly` learns an accepted sample; heatmap=true overlays and the bounded
memories they live in; the page itself, and once in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from typer.testing import CliRunner

from iumad.cli import app as cli_app
from iumad.continual.nightly import nightly
from iumad.continual.step import StepRequest, learn
from iumad.continual.quarantine import decide, list_samples
from iumad.data.synth import generate_dataset
from iumad.serve.app import create_app
from iumad.serve.maps import MapCache, RecentPredictions
from iumad.store import repository as repo
from iumad.store.atomic import file_sha256
from iumad.store.db import Store
from iumad.store.models import QuarantineDecision

from tests.test_serve import _free_port, files_of, rgb_xyz, store_state, wait_ready
from tests.tiny import tiny_config, tiny_data

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _deliver(fresh: Path, inbox: Path, cls: str) -> None:
    """A flat inbox folder: the fresh class's normal training samples plus one of RGB noise (900)."""
    good = fresh / cls / "train" / "good"
    (inbox / cls).mkdir(parents=True)
    for rgb in sorted((good / "rgb").iterdir()):
        shutil.copy(rgb, inbox / cls / rgb.name)
        shutil.copy(good / "xyz" / f"{rgb.stem}.tiff", inbox / cls / f"{rgb.stem}.tiff")
    noise = np.random.default_rng(0).integers(0, 256, np.asarray(Image.open(inbox / cls / "000.png")).shape,
                                              dtype=np.uint8)
    Image.fromarray(noise).save(inbox / cls / "900.png")
    shutil.copy(inbox / cls / "000.tiff", inbox / cls / "900.tiff")


@pytest.fixture(scope="module")
def quarantined(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, config, store root): bolt and disc learned, then a nightly run that held back one of bolt's
    delivered samples (the one with the largest z-score, above 4)."""
    folder = tmp_path_factory.mktemp("dash")
    data = tiny_data(folder / "synth", seed=1, n_train=8, n_val=6, n_test=4)  # 6 held-out normals: the z reference
    config = tiny_config(folder / "tiny.yaml", train={"epochs": 2}, continual={"exemplar_budget": 4, "holdout": 6})
    root = folder / "store"
    with Store.open(root) as store:
        for name in ("bolt", "disc"):
            learn(store, StepRequest(name, data, config=config))
    generate_dataset(folder / "fresh", n_classes=3, seed=1, size=64, n_train=12, n_val=0, n_test=1, workers=1)
    _deliver(folder / "fresh", folder / "inbox", "bolt")
    with Store.open(root) as store:
        report = nightly(store, folder / "inbox", config=config)
    assert report["exit_code"] == 0, report
    assert len(report["classes"][0]["quarantined"]) == 1  # at most 5 % of 13, at least 1: the worst z
    return data, config, root


@pytest.fixture
def own(quarantined: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A copy of the quarantined store that a test may decide on."""
    return Path(shutil.copytree(quarantined[2], tmp_path / "store"))


def decisions(root: Path) -> int:
    with Store.open(root, create=False) as store, store.session() as s:
        return s.scalar(select(func.count()).select_from(QuarantineDecision))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


# ---------------------------------------------------------------------- the store and the CLI


def test_nightly_records_the_held_back_sample_where_its_files_now_lie(quarantined) -> None:
    _, _, root = quarantined
    with Store.open(root, create=False) as store:
        rows = list_samples(store)
        with store.session() as s:
            step = repo.list_steps(s)[-1]
    assert len(rows) == 1
    q = rows[0]
    assert (q["class"], q["step"], q["decision"], q["learned_step"]) == ("bolt", step.step_index, None, None)
    stem = Path(q["source"]).stem
    assert q["z"] > 4 and Path(q["source"]).parent.name == "bolt"
    folder = f"quarantine/step-{step.step_index:04d}/bolt"
    for m, ext in (("rgb", "png"), ("geometry", "tiff")):  # named <sha256[:12]>-<name>: no two can collide
        digest = file_sha256(root / q["files"][m])
        assert q["files"][m] == f"{folder}/{digest[:12]}-{stem}.{ext}"


def test_quarantined_files_of_the_same_name_never_overwrite_each_other(own: Path, tmp_path: Path) -> None:
    """Two runs that each refuse a whole delivery put both into quarantine/unlearned/bolt/: two different
    900.png files must both be kept, each where its row says (the screening is bypassed: which sample a
    tiny model finds anomalous is not what this checks)."""
    from iumad.continual.nightly import Delivery, _learn
    from iumad.data.sample import SampleRecord

    for run in range(2):
        inbox = tmp_path / f"inbox{run}" / "bolt"
        inbox.mkdir(parents=True)
        Image.fromarray(np.full((64, 64, 3), 40 * run, np.uint8)).save(inbox / "900.png")
        rec = SampleRecord("bolt", "train", "good", rgb=inbox / "900.png")
        sha = file_sha256(rec.rgb)
        dl = Delivery("bolt", inbox, True, records=[rec], digests=[[sha]], shas=[{"rgb": sha}],
                      quarantined=[{"index": 0, "score": 9.0, "z": 9.0}])
        with Store.open(own, create=False) as store:
            assert _learn(store, dl, None, None, lambda *a, **k: None)["step"] is None
        assert not rec.rgb.exists()
    with Store.open(own, create=False) as store:
        rows = [r for r in list_samples(store) if r["step"] is None]
        paths = [store.path(r["files"]["rgb"]) for r in rows]
    assert len(rows) == 2 and paths[0] != paths[1]
    assert all(p.parent == own / "quarantine" / "unlearned" / "bolt" for p in paths)
    assert [file_sha256(p)[:12] for p in paths] == [p.name[:12] for p in paths]
    assert len({file_sha256(p) for p in paths}) == 2  # both files kept


def test_cli_lists_accepts_idempotently_refuses_a_change_and_history_shows_it(own: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli_app, ["quarantine", "list", "--store", str(own), "--json"])
    assert res.exit_code == 0, res.output
    [row] = json.loads(res.stdout)
    sid = row["id"]
    res = runner.invoke(cli_app, ["quarantine", "list", "--store", str(own)])
    assert res.exit_code == 0 and Path(row["files"]["rgb"]).name in res.stdout and "open" in res.stdout
    res = runner.invoke(cli_app, ["quarantine", "accept", str(sid), "--store", str(own), "--json"])
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)
    assert (first["decision"], first["created"]) == ("accept", True) and first["decided_by"].startswith("cli ")
    res = runner.invoke(cli_app, ["quarantine", "accept", str(sid), "--store", str(own), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["created"] is False
    before = store_state(own)
    res = runner.invoke(cli_app, ["quarantine", "reject", str(sid), "--store", str(own), "--json"])
    assert res.exit_code == 1 and "already accepted" in json.loads(res.stderr)["error"]
    res = runner.invoke(cli_app, ["quarantine", "reject", "999", "--store", str(own), "--json"])
    assert res.exit_code == 2 and "no quarantined sample has id 999" in json.loads(res.stderr)["error"]
    assert store_state(own) == before and decisions(own) == 1
    res = runner.invoke(cli_app, ["history", "--store", str(own), "--json"])
    held = [q for step in json.loads(res.stdout) for q in step["quarantined"]]
    assert [(q["id"], q["decision"], q["learned_step"]) for q in held] == [(sid, "accept", None)]
    res = runner.invoke(cli_app, ["history", "--store", str(own)])
    assert f"#{sid} accept" in res.stdout


def test_the_next_nightly_learns_an_accepted_sample_and_never_a_rejected_one(quarantined, own: Path,
                                                                            tmp_path: Path) -> None:
    _, config, _ = quarantined
    with Store.open(own, create=False) as store:
        [row] = list_samples(store)
        empty = tmp_path / "inbox"
        empty.mkdir()
        plan = nightly(store, empty, dry_run=True)
        assert plan["classes"] == []  # undecided: nothing to learn
        decide(store, row["id"], "accept", decided_by="test")
        plan = nightly(store, empty, dry_run=True)
        assert [(c["class"], c["new_samples"], c["accepted_samples"]) for c in plan["classes"]] == [("bolt", 0, 1)]
        report = nightly(store, empty, config=config)
        assert report["exit_code"] == 0, report
        [entry] = report["classes"]
        assert (entry["class"], entry["action"], entry["accepted_samples"], entry["quarantined"]) == \
            ("bolt", "update", 1, [])
        learned_in = entry["step"]["step"]
        [after] = list_samples(store)
        assert after["learned_step"] == learned_in
        with store.session() as s:
            bolt_rgb = {Path(e.record["files"]["rgb"]["path"]).name for e in repo.list_exemplars(s, "bolt")
                        if e.record and e.record["files"].get("rgb")}
        again = nightly(store, empty, config=config)  # learned once: nothing left to do
        assert again["classes"] == [] and again["message"] == "nothing new in the inbox"
    history = json.loads(CliRunner().invoke(cli_app, ["history", "--store", str(own), "--json"]).stdout)
    assert next(h for h in history if h["step"] == learned_in)["learned_accepted"] == [row["id"]]
    assert bolt_rgb  # the update kept an exemplar set (the accepted sample was part of its training data)


def test_a_rejected_sample_is_never_learned(quarantined, own: Path, tmp_path: Path) -> None:
    with Store.open(own, create=False) as store:
        [row] = list_samples(store)
        assert decide(store, row["id"], "reject")["decision"] == "reject"
        (tmp_path / "inbox" / "bolt").mkdir(parents=True)
        shutil.copy(own / row["files"]["rgb"], tmp_path / "inbox" / "bolt" / "again.png")  # re-delivered
        plan = nightly(store, tmp_path / "inbox", dry_run=True)
    assert plan["classes"] == []


# ---------------------------------------------------------------------- the HTTP routes


def test_quarantine_routes_need_the_token_to_decide_and_answer_404_409(quarantined, own: Path) -> None:
    with TestClient(create_app(own)) as client:  # no token: read-only
        wait_ready(client)
        [row] = client.get("/v1/quarantine").json()
        r = client.post(f"/v1/quarantine/{row['id']}/accept")
        assert r.status_code == 401 and "without a token" in r.json()["error"]
        page = client.get("/dashboard")
        assert page.status_code == 200 and 'id="read-only"' in page.text and "disabled" in page.text
    assert decisions(own) == 0
    with TestClient(create_app(own, token=TOKEN)) as client:
        wait_ready(client)
        sid = row["id"]
        assert client.get("/v1/quarantine").status_code == 401
        before = store_state(own)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = client.post(f"/v1/quarantine/{sid}/accept", headers=headers)
            assert r.status_code == 401 and r.json()["field"] == "authorization"
        r = client.post("/v1/quarantine/999/accept", headers=AUTH)
        assert r.status_code == 404 and "999" in r.json()["error"]
        assert client.post("/v1/quarantine/nope/accept", headers=AUTH).status_code == 400
        assert store_state(own) == before
        one = client.get(f"/v1/quarantine/{sid}", headers=AUTH).json()
        assert one["decision"] is None and one["z"] == pytest.approx(row["z"])
        overlay = client.get(f"/v1/quarantine/{sid}/overlay.png", headers=AUTH)
        assert overlay.status_code == 200 and png_size(overlay.content) == (64, 64)
        assert client.get("/v1/quarantine/999/overlay.png", headers=AUTH).status_code == 404
        r = client.post(f"/v1/quarantine/{sid}/reject", headers=AUTH)
        assert r.status_code == 200 and (r.json()["decision"], r.json()["created"]) == ("reject", True)
        r = client.post(f"/v1/quarantine/{sid}/reject", headers=AUTH)
        assert r.status_code == 200 and r.json()["created"] is False
        r = client.post(f"/v1/quarantine/{sid}/accept", headers=AUTH)
        assert r.status_code == 409 and "already rejected" in r.json()["error"]
        assert client.get("/v1/quarantine?undecided=true", headers=AUTH).json() == []
    assert decisions(own) == 1


def test_dashboard_login_sets_a_cookie_that_opens_the_page_and_decides(own: Path) -> None:
    with TestClient(create_app(own, token=TOKEN)) as client:
        wait_ready(client)
        page = client.get("/dashboard")
        assert page.status_code == 401 and 'name="token"' in page.text
        assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard"
        r = client.post("/dashboard/login", data={"token": "wrong"}, follow_redirects=False)
        assert r.status_code == 401 and "wrong token" in r.text and "iumad_session" not in r.cookies
        r = client.post("/dashboard/login", data={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303 and TOKEN not in r.headers["set-cookie"]
        assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        page = client.get("/dashboard")
        assert page.status_code == 200
        assert '<tr data-class="bolt">' in page.text and '<tr data-class="disc">' in page.text
        assert 'id="r-matrix"' in page.text and 'class="accept"' in page.text
        png = client.get("/v1/forgetting.png?metric=i_auroc")
        assert png.status_code == 200 and png_size(png.content)[0] > 0
        assert client.get("/v1/forgetting.png?metric=nope").status_code == 400
        sid = client.get("/v1/quarantine").json()[0]["id"]
        r = client.post(f"/v1/quarantine/{sid}/accept")  # the cookie alone
        assert r.status_code == 200 and r.json()["decided_by"].startswith("serve ")
        client.post("/dashboard/logout")
        assert client.get("/dashboard").status_code == 401
    assert decisions(own) == 1


def test_heatmap_true_gives_a_map_url_base64_gives_the_png_and_recent_lists_them(quarantined) -> None:
    data, _, root = quarantined
    rgb, xyz = rgb_xyz(data)
    files = files_of(("rgb", rgb, "image/png"), ("xyz", xyz, "image/tiff"))
    with TestClient(create_app(root)) as client:
        wait_ready(client)
        plain = client.post("/v1/predict", files=files)
        assert plain.status_code == 200 and "heatmap_url" not in plain.json()
        r = client.post("/v1/predict", files=files, data={"heatmap": "true"})
        assert r.status_code == 200, r.text
        row = r.json()
        assert row["score"] == pytest.approx(plain.json()["score"], abs=1e-6)
        overlay = client.get(row["heatmap_url"])
        assert overlay.status_code == 200 and png_size(overlay.content) == Image.open(rgb).size
        inline = client.post("/v1/predict", files=files, data={"heatmap": "base64"}).json()
        assert base64.b64decode(inline["heatmap_png"]) == overlay.content  # same sample, same model
        batch = client.post("/v1/predict/batch", data={"heatmap": "true"},
                            files=files_of(("rgb.0", rgb, "image/png"), ("xyz.0", xyz, "image/tiff"),
                                           ("rgb.1", rgb, "image/png"), ("xyz.1", xyz, "image/tiff")))
        assert batch.status_code == 200 and all(png_size(client.get(x["heatmap_url"]).content) == (64, 64)
                                                for x in batch.json()["results"])
        bad = client.post("/v1/predict", files=files, data={"heatmap": "maybe"})
        assert bad.status_code == 400 and bad.json()["field"] == "heatmap"
        assert client.get("/v1/maps/" + "0" * 32 + ".png").status_code == 404
        assert client.get("/v1/maps/..%2F..%2Fiumad.sqlite.png").status_code == 404
        recent = client.get("/v1/recent").json()
        assert len(recent) == 5 and recent[0]["id"] == \
            batch.json()["results"][1]["heatmap_url"].removeprefix("/v1/maps/").removesuffix(".png")
        first_plain = recent[-1]  # scored without heatmap: drawn when asked for
        assert first_plain["score"] == pytest.approx(plain.json()["score"])
        assert client.get(first_plain["overlay"]).content == overlay.content
        page = client.get("/dashboard")
        assert page.text.count('class="thumb"') >= 5


def test_map_cache_and_recent_ring_stay_within_their_bounds() -> None:
    cache = MapCache(max_items=3, max_bytes=100)
    for i in range(5):
        cache.put(f"k{i}", b"x" * 10)
    assert len(cache) == 3 and cache.get("k0") is None and cache.get("k4") is not None
    cache.get("k2")  # used: k3 goes first
    cache.put("big", b"y" * 80)
    assert cache.get("k3") is None and cache.get("k2") is not None and cache.nbytes <= 100
    ring = RecentPredictions(max_items=3, max_bytes=1000)
    fused = np.zeros((10, 10), np.float32)  # 400 bytes
    ids = [ring.add({"n": i}, {"rgb": ("rgb", b"z" * 100)}, {"fused": fused}) for i in range(4)]
    latest = ring.latest()
    assert [r.row["n"] for r in latest] == [3, 2, 1] and ring.find(ids[0]) is None
    assert latest[0].uploads is not None and latest[1].uploads is not None and latest[2].uploads is None


# ---------------------------------------------------------------------- a real browser


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
def test_the_dashboard_in_headless_chromium_logs_in_shows_classes_and_accepts(own: Path, tmp_path: Path) -> None:
    found = _chromium()
    if found is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                    ".ci/run installs them where apt-get works)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    env = os.environ | {"IUMAD_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "iumad.cli", "serve", "--store", str(own), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(client)
        driver = webdriver.Chrome(service=Service(found[1]), options=options)
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/dashboard")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login").click()
        wait.until(lambda d: d.find_elements(By.ID, "classes"))
        names = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#classes tbody tr td:nth-child(2)")]
        assert names == ["bolt", "disc"]
        image = driver.find_element(By.ID, "r-matrix")
        wait.until(lambda d: d.execute_script("return arguments[0].complete", image))
        assert driver.execute_script("return arguments[0].naturalWidth", image) > 0
        row = driver.find_element(By.CSS_SELECTOR, "#quarantine tbody tr[data-id]")
        sid = int(row.get_attribute("data-id"))
        row.find_element(By.CSS_SELECTOR, "button.accept").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#quarantine tr[data-id="{sid}"] .outcome'))
        assert row.find_element(By.CSS_SELECTOR, ".outcome").text == "accept"
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    with Store.open(own, create=False) as store, store.session() as s:
        sample, decision = repo.get_quarantined(s, sid)
        assert decision is not None and decision.decision == "accept" and decision.decided_by.startswith("serve ")
    history = json.loads(CliRunner().invoke(cli_app, ["history", "--store", str(own), "--json"]).stdout)
    assert [q["decision"] for h in history for q in h["quarantined"]] == ["accept"]
